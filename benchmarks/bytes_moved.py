"""Bytes moved by a computation, measured rather than computed from a formula.

`measure_bytes(fn, *args, **kwargs)` runs `fn` once and counts

* aten ops (a TorchDispatchMode): each op reads the bytes of its tensor inputs and writes the
  bytes of its tensor outputs. View ops and allocations (`empty*`) cost 0. A tensor's bytes are
  those of the memory it spans once (a broadcast / expanded operand counts its real extent, not
  its logical numel).
* Triton kernels (instrumenting the interpreter, so this needs TRITON_INTERPRET=1 for them): every
  masked-in element of every `tl.load` / `tl.store` x its element size. Two numbers per launch:
  `triton_*_requests`, all accesses (what the load/store units see, L1/L2 included), and
  `triton_read` / `triton_write`, the distinct addresses each launch touches -- the DRAM model:
  every byte a kernel needs crosses DRAM at least once per launch, and re-reads inside a launch
  (weights shared by all programs, an x tile re-read in the epilogue) are cache hits. Only the
  latter enters `total`.
* CUDA kernels run by the SIMT emulator (the `cuda` backend under RIFORMER_CUDA_EMULATE=1): the
  emulator counts every global load and store of every launch (`cuda_emu.counting_global_bytes`),
  with the same DRAM model: `cuda_read` / `cuda_write` are the distinct bytes each launch
  touches (entering `total`), `cuda_*_requests` every access, and `cuda_*_per_cta` the distinct
  bytes of each CTA summed over CTAs (re-reads by other CTAs counted again: an L1-only bound).
  Ops of the `riformer_cuda_emu` namespace are not counted at the op level: their kernels are.
* Ops of other namespaces (for example compiled extension ops) are opaque: their tensor inputs
  and outputs are counted like aten ops, as `opaque_read` / `opaque_write`. Ops of the
  `riformer_triton` namespace are not counted at the op level: their kernels are.

    >>> m = measure_bytes(block, x)
    >>> m['total'] / (x.numel() * x.element_size())   # in units of |x|

`python -m benchmarks.bytes_moved` prints the per-block table (forward, units of |x|).
"""
from __future__ import annotations

import argparse
import contextlib
from collections import defaultdict

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

INSTRUMENTED_NAMESPACES = ('riformer_triton', 'riformer_cuda_emu')


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes of memory a tensor spans, each element once (stride-0 dims do not multiply)."""
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            n *= size
    if t.numel() == 0:
        n = 0
    return n * t.element_size()


def _tensors(tree):
    return [v for v in tree_flatten(tree)[0] if isinstance(v, torch.Tensor)]


class _Counter:
    def __init__(self):
        self.counts = defaultdict(int)
        self.by_op = defaultdict(int)
        self.launches = []        # (kernel name, distinct bytes read, distinct bytes written)
        self.paused = 0
        self.launch = None


class _DispatchCounter(TorchDispatchMode):
    def __init__(self, counter: _Counter):
        super().__init__()
        self.c = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.c.paused:
            return out
        ns = func.namespace
        if ns in INSTRUMENTED_NAMESPACES:
            return out
        name = func.__name__ if hasattr(func, '__name__') else str(func)
        if func.is_view or name.startswith(('empty', 'new_empty', 'detach', 'alias', '_unsafe_view',
                                            'lift_fresh', 'sym_', 'set_.')):
            return out
        read = sum(tensor_bytes(t) for t in _tensors((args, kwargs)))
        write = sum(tensor_bytes(t) for t in _tensors(out))
        kind = 'aten' if ns in ('aten', 'prims') else 'opaque'
        self.c.counts[f'{kind}_read'] += read
        self.c.counts[f'{kind}_write'] += write
        self.c.counts[f'{kind}_ops'] += 1
        self.c.by_op[f'{ns}.{name}'] += read + write
        return out


class _Launch:
    def __init__(self):
        self.reads = defaultdict(list)    # element size -> address arrays
        self.writes = defaultdict(list)


def _masked_addresses(ptrs, mask) -> np.ndarray:
    addrs = np.asarray(ptrs.data)
    m = np.broadcast_to(np.asarray(mask.data, dtype=bool), addrs.shape)
    return addrs[m].astype(np.uint64, copy=False).ravel()


def _element_size(ptrs) -> int:
    return max(1, ptrs.get_element_ty().primitive_bitwidth // 8)


@contextlib.contextmanager
def _instrument_triton(counter: _Counter):
    try:
        from triton.runtime import interpreter
    except ImportError:
        yield
        return
    builder_cls = interpreter.InterpreterBuilder
    orig_load, orig_store = builder_cls.create_masked_load, builder_cls.create_masked_store
    orig_call = interpreter.GridExecutor.__call__

    def load(self, ptrs, mask, *a, **k):
        if counter.launch is not None:
            counter.launch.reads[_element_size(ptrs)].append(_masked_addresses(ptrs, mask))
        return orig_load(self, ptrs, mask, *a, **k)

    def store(self, ptrs, value, mask, *a, **k):
        if counter.launch is not None:
            counter.launch.writes[_element_size(ptrs)].append(_masked_addresses(ptrs, mask))
        return orig_store(self, ptrs, value, mask, *a, **k)

    def call(self, *a, **k):
        # The interpreter's own host copies of the arguments are not the kernel's traffic.
        outer, counter.launch = counter.launch, _Launch()
        counter.paused += 1
        try:
            return orig_call(self, *a, **k)
        finally:
            counter.paused -= 1
            launch, counter.launch = counter.launch, outer
            distinct = {}
            for kind, table in (('read', launch.reads), ('write', launch.writes)):
                distinct[kind] = 0
                for size, chunks in table.items():
                    addrs = np.concatenate(chunks) if chunks else np.empty(0, np.uint64)
                    counter.counts[f'triton_{kind}_requests'] += addrs.size * size
                    distinct[kind] += np.unique(addrs).size * size
                counter.counts[f'triton_{kind}'] += distinct[kind]
            counter.counts['triton_launches'] += 1
            name = getattr(getattr(self, 'fn', None), '__name__', '?')
            counter.launches.append((name, distinct['read'], distinct['write']))

    builder_cls.create_masked_load = load
    builder_cls.create_masked_store = store
    interpreter.GridExecutor.__call__ = call
    try:
        yield
    finally:
        builder_cls.create_masked_load = orig_load
        builder_cls.create_masked_store = orig_store
        interpreter.GridExecutor.__call__ = orig_call


@contextlib.contextmanager
def _instrument_cuda_emu(counter: _Counter):
    """Count the emulated CUDA launches, when the emulated library is loaded in this process."""
    import sys
    emu = sys.modules.get('riformer_kernels.backends.cuda_emu')
    if emu is None or (emu._lib is None and not emu.ENABLED):
        yield
        return
    emu.library()   # built before counting starts (the first launch would otherwise build it)
    with emu.counting_global_bytes() as log:
        yield
    for e in log:
        for key, val in (('cuda_read', e.read_distinct), ('cuda_write', e.write_distinct),
                         ('cuda_read_requests', e.read_requests),
                         ('cuda_write_requests', e.write_requests),
                         ('cuda_read_per_cta', e.read_per_cta),
                         ('cuda_write_per_cta', e.write_per_cta)):
            counter.counts[key] += val
        counter.counts['cuda_launches'] += 1
        counter.launches.append((f'cuda:{e.kernel}', e.read_distinct, e.write_distinct))


KEYS = ('aten_read', 'aten_write', 'aten_ops', 'opaque_read', 'opaque_write', 'opaque_ops',
        'triton_read', 'triton_write', 'triton_read_requests', 'triton_write_requests',
        'triton_launches', 'cuda_read', 'cuda_write', 'cuda_read_requests',
        'cuda_write_requests', 'cuda_read_per_cta', 'cuda_write_per_cta', 'cuda_launches')


def measure_bytes(fn, *args, **kwargs) -> dict:
    """Run fn(*args, **kwargs) once; return the bytes it moved (see the module docstring).

    Keys: aten_read, aten_write, aten_ops, opaque_read, opaque_write, opaque_ops, triton_read,
    triton_write (distinct addresses per launch), triton_read_requests, triton_write_requests
    (all accesses), triton_launches, the same cuda_* keys for emulated CUDA launches (plus
    cuda_read_per_cta / cuda_write_per_cta), total (aten + opaque + distinct triton and cuda
    bytes), by_op (op name -> bytes), launches (per Triton or CUDA launch, in order: (kernel,
    distinct bytes read, distinct bytes written)), result (fn's return value).
    """
    counter = _Counter()
    with _instrument_triton(counter), _instrument_cuda_emu(counter), _DispatchCounter(counter):
        result = fn(*args, **kwargs)
    out = {k: int(counter.counts.get(k, 0)) for k in KEYS}
    out['total'] = sum(out[k] for k in ('aten_read', 'aten_write', 'opaque_read',
                                        'opaque_write', 'triton_read', 'triton_write',
                                        'cuda_read', 'cuda_write'))
    out['by_op'] = dict(counter.by_op)
    out['launches'] = list(counter.launches)
    out['result'] = result
    return out


def block_table(n=8, c=64, hw=(56, 56), dtype=torch.float32, backends=('reference', 'torch',
                                                                            'triton'),
                train=False):
    """Bytes per block in units of |x|: forward unchained and (kernel sets) chained, no grad; with
    `train`, also one training step (forward + backward) per memory mode."""
    import riformer_kernels as rk

    torch.manual_seed(0)
    x = torch.randn(n, c, *hw, dtype=dtype)
    unit = x.numel() * x.element_size()
    blocks = [rk.RIFormerBlock(c).to(dtype).eval() for _ in range(2)]
    rows = []
    with torch.no_grad():
        for backend in backends:
            with rk.use_backend(backend):
                m = measure_bytes(blocks[0], x)
                rows.append((backend, 'forward', m['total'] / unit, m))
                if backend in ('triton', 'cpu', 'cuda'):     # the kernel sets chain statistics
                    blocks[0].chain_statistics = True    # as a model's stage sets it
                    y = blocks[0](x)
                    blocks[0].chain_statistics = False
                    m = measure_bytes(blocks[1], y)
                    rows.append((backend, 'forward chained', m['total'] / unit, m))
    if train:
        xg = x.clone().requires_grad_(True)
        g = torch.randn_like(x)
        block = blocks[0].train()
        for backend in backends:
            for recompute in ((True, False) if backend in ('triton', 'cpu', 'cuda') else (True,)):
                block.recompute = recompute
                # fresh gradients: accumulating into the previous row's would add 3 |x|
                xg.grad = None
                block.zero_grad(set_to_none=True)

                def step():
                    with rk.use_backend(backend):
                        block(xg).backward(g)

                m = measure_bytes(step)
                kind = 'fwd+bwd' + ('' if backend not in ('triton', 'cpu', 'cuda') else
                                    (' recompute' if recompute else ' save-u'))
                rows.append((backend, kind, m['total'] / unit, m))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--n', type=int, default=8)
    ap.add_argument('--c', type=int, default=64)
    ap.add_argument('--hw', type=int, nargs=2, default=(56, 56))
    ap.add_argument('--backends', nargs='+', default=['reference', 'torch', 'triton'])
    ap.add_argument('--train', action='store_true', help='also forward+backward per memory mode')
    ap.add_argument('--launches', action='store_true',
                    help='also each Triton launch and the aten/opaque ops, per row')
    a = ap.parse_args(argv)
    rows = block_table(a.n, a.c, tuple(a.hw), backends=tuple(a.backends), train=a.train)
    print(f"N={a.n} C={a.c} HxW={a.hw[0]}x{a.hw[1]} fp32, units of |x|")
    print(f"{'backend':10} {'pass':20} {'total':>7} {'aten':>7} {'opaque':>7} {'triton':>7} "
          f"{'trit.req':>8} {'ops':>4} {'launch':>6}")
    for backend, kind, total, m in rows:
        unit = total and m['total'] / total
        print(f"{backend:10} {kind:20} {total:7.3f} "
              f"{(m['aten_read'] + m['aten_write']) / unit:7.3f} "
              f"{(m['opaque_read'] + m['opaque_write']) / unit:7.3f} "
              f"{(m['triton_read'] + m['triton_write']) / unit:7.3f} "
              f"{(m['triton_read_requests'] + m['triton_write_requests']) / unit:8.3f} "
              f"{m['aten_ops']:4d} {m['triton_launches']:6d}")
    if a.launches:
        for backend, kind, total, m in rows:
            unit = total and m['total'] / total
            print(f"\n{backend} {kind}: read / written, units of |x|")
            for name, r, w in m['launches']:
                print(f"  {name:28} {r / unit:7.3f} {w / unit:7.3f}")
            other = {k: v for k, v in m['by_op'].items() if v}
            print(f"  {'aten/opaque ops':28} {sum(other.values()) / unit:7.3f} (read + written, "
                  f"{len(other)} kinds)")


if __name__ == '__main__':
    main()
