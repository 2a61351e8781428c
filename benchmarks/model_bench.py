"""Whole-model benchmarks: RIFormer classifiers, inference throughput and training-step time and
peak memory per batch size, eager vs torch.compile vs each fused backend.

Training step = forward, cross-entropy on random labels, backward (gradients set to None before
each step; no optimizer update, which is the same for every implementation). Each (arch, mode,
implementation) is checked once, at the smallest batch, against the float64 eager model on the
same images: logits and every parameter gradient.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

import riformer_kernels as rk

from . import measure
from .impls import Impl, Runner, compare, randomize_, reference_result
from .micro import add_speedups, guarded, time_together

MIB = 1024 * 1024
NUM_CLASSES = 1000


def model_tolerance(dtype: torch.dtype, eager_err: float) -> float:
    """A deep network accumulates rounding the block bar does not allow for: an implementation
    passes at 1e-4 or at twice the eager model's own error in the same dtype, whichever is
    larger (so a fused model is held to what the dtype costs the reference itself)."""
    base = 1e-4 if dtype in (torch.float32, torch.float64) else 0.0
    return max(base, 2 * eager_err)


def run_models(archs, batches, resolution, impls, modes, dtype, device, args, bar) -> list[dict]:
    rows = []
    for arch in archs:
        generator = torch.Generator().manual_seed(0)
        # Layer scales of order 0.1: blocks that matter, in a net that stays well scaled.
        master = randomize_(rk.create_model(f'riformer_{arch}', num_classes=NUM_CLASSES),
                            generator, layer_scale=(0.05, 0.25)).to(device=device, dtype=dtype)
        # A training step's peak includes the parameter gradients: this much, whatever the batch.
        param_mib = sum(p.numel() * p.element_size() for p in master.parameters()) / MIB
        for mode in modes:
            verdicts = {}
            for batch in sorted(batches):
                images = torch.randn(batch, 3, resolution, resolution,
                                     generator=generator).to(device, dtype)
                labels = torch.randint(0, NUM_CLASSES, (batch,), generator=generator).to(device)

                def backward(logits, labels=labels):
                    F.cross_entropy(logits, labels).backward()

                check = None
                if not verdicts:
                    check = check_inputs(master, images, mode, backward)
                batch_rows, runners = [], []
                for impl in impls:
                    bar.set_postfix_str(f"{arch} b{batch} {mode} {impl.name}: check")
                    row = dict(arch=arch, res=resolution, batch=batch, mode=mode, impl=impl.name,
                               dtype=str(dtype).replace('torch.', ''), param_mib=param_mib)
                    runner = guarded(row, args, prepare_model_row, row, impl, master, images,
                                     mode, backward, dtype, verdicts, check)
                    batch_rows.append(row)
                    if runner is None:
                        bar.update(1)
                    else:
                        runners.append((row, runner))
                bar.set_postfix_str(f"{arch} b{batch} {mode}: timing")
                args_model = copy.copy(args)
                args_model.rounds = max(3, args.rounds // 2)
                timings = time_together(runners, device, args_model)
                for (row, runner), timing in zip(runners, timings):
                    row.update(status='ok', median_ms=timing.median_ms, p20_ms=timing.p20_ms,
                               p80_ms=timing.p80_ms, timing=timing.method,
                               spread_pct=100 * (timing.p80_ms - timing.p20_ms) /
                               timing.median_ms,
                               images_per_s=batch / (timing.median_ms * 1e-3))
                    bar.set_postfix_str(f"{arch} b{batch} {mode} {row['impl']}: memory")
                    peak = guarded(row, args, measure.peak_step_bytes, runner.step, device)
                    if peak is not None:
                        row['peak_mib'] = peak / MIB
                    bar.update(1)
                if not timings:
                    bar.update(len(runners))
                runners.clear()
                add_speedups(batch_rows)
                rows += batch_rows
    return rows


def check_inputs(master, images, mode, backward):
    ref_out, ref_grads = reference_result(master, images, mode, backward, x_requires_grad=False)
    eager = Runner(Impl('eager', 'eager'), master, images, mode, backward, is_block=False,
                   x_requires_grad=False)
    eager_err, _ = compare(*eager.first_call()[1:], ref_out, ref_grads)
    return ref_out, ref_grads, eager_err


def prepare_model_row(row, impl, master, images, mode, backward, dtype, verdicts, check):
    """A checked Runner for `impl` at this batch, or None with the row saying why not."""
    if impl.skip_reason or impl.supports_mode(mode):
        row['status'], row['detail'] = 'skipped', impl.skip_reason or impl.supports_mode(mode)
        return None
    if verdicts.get(impl.name, 'ok') != 'ok':
        row['status'] = 'skipped'
        row['detail'] = f"was {verdicts[impl.name]} at a smaller batch"
        return None
    runner = Runner(impl, master, images, mode, backward, is_block=False, x_requires_grad=False)
    try:
        seconds, out, grads = runner.first_call()
    except Exception as err:
        verdicts[impl.name] = 'error'
        row['status'] = 'error'
        row['detail'] = f"first call failed: {type(err).__name__}: {err}".splitlines()[0][:300]
        return None
    if impl.kind == 'compile':
        row['compile_s'] = seconds
    if check is not None:
        ref_out, ref_grads, eager_err = check
        err, where = compare(out, grads, ref_out, ref_grads)
        tol = model_tolerance(dtype, eager_err)
        row['max_rel_err'], row['tolerance'] = err, tol
        if not err <= tol:
            verdicts[impl.name] = 'wrong'
            row['status'] = 'wrong'
            row['detail'] = f"rel error {err:.3g} on {where} > {tol:.1g}; not timed"
            return None
        verdicts[impl.name] = 'ok'
    return runner
