"""Block microbenchmarks: every (shape, mode, implementation) row, checked, then measured."""
from __future__ import annotations

import traceback

import torch

import riformer_kernels as rk

from . import measure
from .impls import (Impl, Runner, backend_supports, compare, randomize_, reference_result,
                    tolerance)
from .shapes import BlockShape

MIB = 1024 * 1024


def block_flops(shape: BlockShape, batch: int, mode: str) -> float:
    """Two 1x1-conv GEMMs (C->4C->C): 16 N T C^2 FLOPs forward; backward twice that."""
    forward = 16 * batch * shape.size ** 2 * shape.channels ** 2
    return forward if mode == 'forward' else 3 * forward


def gemm_step(shape: BlockShape, batch: int, dtype: torch.dtype, generator):
    """The block's two GEMMs as plain torch.mm calls ([N*T, C] x [C, 4C], then [N*T, 4C] x
    [4C, C]): what a GEMM of the block's shape runs at on this machine, the same run, the same
    threads. Their FLOPs are the block forward's (block_flops)."""
    tokens, c = batch * shape.size * shape.size, shape.channels
    a = torch.randn(tokens, c, generator=generator).to(dtype)
    w1t = torch.randn(c, 4 * c, generator=generator).to(dtype)
    w2t = torch.randn(4 * c, c, generator=generator).to(dtype)
    h = torch.empty(tokens, 4 * c, dtype=dtype)
    o = torch.empty(tokens, c, dtype=dtype)

    def step():
        torch.mm(a, w1t, out=h)
        torch.mm(h, w2t, out=o)
    return step


def floor_bytes(x_bytes: int, param_bytes: int, mode: str) -> int:
    """The least traffic any implementation needs: forward reads x and writes out (2|x|);
    forward+backward also reads x and dout and writes dx (5|x|); weights read once per pass and
    weight gradients written once."""
    if mode == 'forward':
        return 2 * x_bytes + param_bytes
    return 5 * x_bytes + 3 * param_bytes


def run_shape(shape: BlockShape, impls: list[Impl], modes, batch: int, dtype: torch.dtype,
              device: torch.device, args, ceilings, bar) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    master = randomize_(rk.RIFormerBlock(shape.channels), generator).to(device=device, dtype=dtype)
    x = (torch.randn(shape.input_shape(batch), generator=generator) * 1.5 + 0.3).to(device, dtype)
    g = torch.randn(x.shape, generator=generator).to(device, dtype)
    x_bytes = x.numel() * x.element_size()
    param_bytes = sum(p.numel() * p.element_size() for p in master.parameters())

    def backward(out):
        out.backward(g.to(out.dtype))

    rows = []
    for mode in modes:
        ref_out, ref_grads = reference_result(master, x, mode, backward, x_requires_grad=True)
        # The eager reference's own error in this dtype sets the bar for half precision, so it is
        # measured even when --impl leaves the eager row out.
        eager = Runner(Impl('eager', 'eager'), master, x, mode, backward, is_block=True,
                       x_requires_grad=True)
        eager_err, _ = compare(*eager.first_call()[1:], ref_out, ref_grads)
        del eager
        mode_rows, runners = [], []
        for impl in impls:
            bar.set_postfix_str(f"{shape.label} {mode} {impl.name}: check")
            row = dict(archs='/'.join(shape.archs), stage=shape.stage, res=shape.res, batch=batch,
                       channels=shape.channels, height=shape.size, width=shape.size,
                       dtype=str(dtype).replace('torch.', ''), mode=mode, impl=impl.name,
                       x_mib=x_bytes / MIB)
            runner = guarded(row, args, prepare_row, row, impl, master, x, mode, backward,
                             ref_out, ref_grads, eager_err, dtype)
            mode_rows.append(row)
            if runner is not None:
                runners.append((row, runner))
            else:
                bar.update(1)
        bar.set_postfix_str(f"{shape.label} {mode}: timing {len(runners)} implementations")
        # CPU: the GEMM floor's rate is timed in the same interleaved rounds as the rows.
        extra = [gemm_step(shape, batch, dtype, generator)] if device.type == 'cpu' and runners \
            else []
        timings = time_together(runners, device, args, extra)
        if extra and timings:
            gemm_timing = timings.pop()
            rate = block_flops(shape, batch, 'forward') / (gemm_timing.median_ms * 1e-3)
            floor_ms = block_flops(shape, batch, mode) / rate * 1e3
            for row in mode_rows:
                row.update(gemm_gflops=rate / 1e9, floor_ms=floor_ms)
        for (row, runner), timing in zip(runners, timings):
            bar.set_postfix_str(f"{shape.label} {mode} {row['impl']}: memory, bytes")
            row.update(status='ok', median_ms=timing.median_ms, p20_ms=timing.p20_ms,
                       p80_ms=timing.p80_ms, timing=timing.method,
                       spread_pct=100 * (timing.p80_ms - timing.p20_ms) / timing.median_ms)
            if 'floor_ms' in row:
                row['x_floor'] = timing.median_ms / row['floor_ms']
            guarded(row, args, measure_row, row, runner, mode, device, args, ceilings, x_bytes,
                    param_bytes, shape, batch)
            bar.update(1)
        if not timings:
            bar.update(len(runners))
        runners.clear()
        add_speedups(mode_rows)
        rows += mode_rows
    return rows


def guarded(row, args, fn, *a, **k):
    """Run one measurement; an exception marks the row (one broken implementation must not end
    the sweep) and returns None."""
    try:
        return fn(*a, **k)
    except Exception as err:
        if row is not None:
            row['status'] = 'error'
            row['detail'] = f"{type(err).__name__}: {err}".splitlines()[0][:300]
        if args.verbose:
            traceback.print_exc()
        return None


def time_together(runners, device, args, extra=()) -> list:
    """Timings of the checked runners, then of the `extra` steps, interleaved; or [] with every
    row marked when timing itself fails."""
    try:
        return measure.time_steps([r.step for _, r in runners] + list(extra), device,
                                  quick=args.quick, rounds=args.rounds)
    except Exception as err:
        for row, _ in runners:
            row['status'] = 'error'
            row['detail'] = f"timing failed: {type(err).__name__}: {err}".splitlines()[0][:300]
        if args.verbose:
            traceback.print_exc()
        return []


def add_speedups(rows):
    base = {r['impl']: r['median_ms'] for r in rows if r.get('status') == 'ok'}
    for row in rows:
        if row.get('status') != 'ok':
            continue
        for ref in ('eager', 'compile'):
            if ref in base:
                row[f'speedup_vs_{ref}'] = base[ref] / row['median_ms']


def prepare_row(row, impl, master, x, mode, backward, ref_out, ref_grads, eager_err, dtype):
    """A checked Runner for `impl`, or None with the row saying why it is not timed."""
    reason = impl.skip_reason or impl.supports_mode(mode) or backend_supports(impl, master, x)
    if reason:
        row['status'], row['detail'] = 'skipped', reason
        return None
    runner = Runner(impl, master, x, mode, backward, is_block=True, x_requires_grad=True)
    try:
        seconds, out, grads = runner.first_call()
    except Exception as err:
        row['status'] = 'error'
        row['detail'] = f"first call failed: {type(err).__name__}: {err}".splitlines()[0][:300]
        return None
    if impl.kind == 'compile':
        row['compile_s'] = seconds
    err, where = compare(out, grads, ref_out, ref_grads)
    # fp32: 1e-4 for everyone, eager included; half dtypes: twice eager's own error.
    tol = tolerance(dtype, eager_err)
    row['max_rel_err'] = err
    row['tolerance'] = tol
    if not err <= tol:
        row['status'] = 'wrong'
        row['detail'] = f"rel error {err:.3g} on {where} > {tol:.1g}; not timed"
        return None
    return runner


def measure_row(row, runner, mode, device, args, ceilings, x_bytes, param_bytes, shape, batch):
    """Everything but time: peak memory, saved-for-backward bytes, bytes moved, roofline."""
    row['peak_mib'] = measure.peak_step_bytes(runner.step, device) / MIB
    if mode == 'train':
        try:
            saved = measure.saved_for_backward_bytes(runner.forward, exclude=runner.params)
            row['saved_mib'] = saved / MIB
            row['saved_x'] = saved / x_bytes
        except Exception as err:
            row['detail'] = f"saved-tensor hooks failed: {type(err).__name__}"
    counter = args.bytes_counter
    if counter is not None and runner.impl.kind == 'compile':
        row['detail'] = ("bytes moved not counted: a dispatch-level counter does not see "
                         "inductor's generated kernels")
    elif counter is not None:
        try:
            moved = counter(runner.step)
            row['moved_mib'] = moved['total'] / MIB
            row['moved_x'] = moved['total'] / x_bytes
        except Exception as err:
            row['detail'] = (row.get('detail', '') + f" bytes counter failed: "
                             f"{type(err).__name__}: {err}").strip()[:300]
    if ceilings is not None:
        peak = ceilings.matmul_flops.get(row['dtype'])
        t_bytes = floor_bytes(x_bytes, param_bytes, mode) / ceilings.copy_bytes_per_s
        t_flops = block_flops(shape, batch, mode) / peak if peak else 0.0
        row['roofline_frac'] = max(t_bytes, t_flops) / (row['median_ms'] * 1e-3)
        row['bound'] = 'memory' if t_bytes >= t_flops else 'compute'
