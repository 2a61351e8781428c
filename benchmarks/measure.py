"""What is measured about one step, and how.

Time. CPU: `time.perf_counter` around `reps` back-to-back calls after a warm-up, repeated for
several rounds; each round gives one per-call time, and median / p20 / p80 are taken over rounds.
The implementations of one shape and mode are timed in interleaved rounds (see `time_cpu`).
GPU: `triton.testing.do_bench_cudagraph` (the steps replayed from one CUDA graph, so launch overhead
is excluded) and, when graph capture fails, `triton.testing.do_bench`; quantiles over its samples.

Peak memory: the most bytes the step allocated beyond what was alive when it started (inputs and
parameters excluded; the step's output, saved activations, gradients and temporaries included),
measured the same way for every implementation. GPU: `torch.cuda.max_memory_allocated` minus
`memory_allocated` at the start, after `reset_peak_memory_stats`. CPU: tracemalloc cannot see
torch's allocator, so the step runs once under `torch.profiler` with `profile_memory=True`, which
records every allocation and free of c10's CPU allocator (what every CPU tensor is made from,
including tensors made inside compiled code and C++ extensions); the peak of the running sum of
those events is the answer. Scratch a kernel obtains from raw malloc is not seen.

Saved for backward: the unique storages packed by `torch.autograd.graph.saved_tensors_hooks`
during the forward of a training step, parameters excluded (the input x counts: it is kept alive
for backward).

Bytes moved: `benchmarks.bytes_moved.measure_bytes` (a dispatch-level counter), when present.
"""
from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time
from dataclasses import dataclass

import torch


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    samples: int
    method: str


def quantile(values, q: float) -> float:
    values = sorted(values)
    point = q * (len(values) - 1)
    lower, upper = int(point), min(int(point) + 1, len(values) - 1)
    frac = point - lower
    return values[lower] * (1 - frac) + values[upper] * frac


def _summary(per_call_ms, method: str) -> Timing:
    return Timing(statistics.median(per_call_ms), quantile(per_call_ms, 0.2),
                  quantile(per_call_ms, 0.8), len(per_call_ms), method)


def time_cpu(steps, rounds: int = 10, round_s: float = 0.1, warmup_s: float = 0.2) -> list:
    """Per-call times of several `steps`, interleaved: each is warmed up and given its own `reps`
    (calls per round, so a round lasts about `round_s`), then every round times each step once,
    in an order that rotates. On a shared machine the load drifts; interleaving exposes every
    implementation to the same drift, so their ratios stay meaningful when absolute times do not.
    """
    reps = []
    for step in steps:
        start = time.perf_counter()
        calls = 0
        while calls < 2 or time.perf_counter() - start < warmup_s:
            step()
            calls += 1
        per_call = (time.perf_counter() - start) / calls
        reps.append(max(1, int(round(round_s / max(per_call, 1e-9)))))
    samples = [[] for _ in steps]
    for r in range(rounds):
        for k in range(len(steps)):
            i = (k + r) % len(steps)
            t0 = time.perf_counter()
            for _ in range(reps[i]):
                steps[i]()
            samples[i].append((time.perf_counter() - t0) / reps[i] * 1e3)
    return [_summary(s, f"perf_counter {rounds}x{n} interleaved") for s, n in zip(samples, reps)]


def time_gpu(step, rep_ms: int = 100, use_cuda_graph: bool = True) -> Timing:
    """The step clears its own gradients (set to None before backward), so nothing accumulates
    across replays and no grad_to_none is needed."""
    import triton.testing
    quantiles = [0.5, 0.2, 0.8]
    if use_cuda_graph:
        try:
            median, p20, p80 = triton.testing.do_bench_cudagraph(
                step, rep=rep_ms, quantiles=quantiles)
            return Timing(median, p20, p80, 10, "do_bench_cudagraph")
        except Exception as err:  # capture fails for some code paths; time without the graph
            torch.cuda.synchronize()
            fallback = f"do_bench (graph capture failed: {type(err).__name__})"
    else:
        fallback = "do_bench"
    median, p20, p80 = triton.testing.do_bench(step, rep=rep_ms, quantiles=quantiles)
    return Timing(median, p20, p80, 0, fallback)


def time_steps(steps, device: torch.device, quick: bool = False, rounds: int = 10) -> list:
    """Timings of several steps compared with each other (CPU: interleaved rounds)."""
    if not steps:
        return []
    if device.type == 'cuda':
        return [time_gpu(step, rep_ms=25 if quick else 100) for step in steps]
    return time_cpu(steps, rounds=rounds, round_s=0.02 if quick else 0.1,
                    warmup_s=0.05 if quick else 0.3)


# ---------------------------------------------------------------------------------------------
# Memory

@contextlib.contextmanager
def _quiet_stderr():
    """Kineto prints profiler_start/stop lines from C++ on fd 2; keep them out of the progress
    bar. Python exceptions are unaffected (they are objects, printed later)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, 'w') as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _cpu_peak_bytes(step) -> int:
    from torch.profiler import ProfilerActivity, profile
    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU],
                                  profile_memory=True) as prof:
        step()
    events = [(e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
              if e.name() == '[memory]' and e.device_type() == torch.autograd.DeviceType.CPU]
    running = peak = 0
    for _, nbytes in sorted(events):
        running += nbytes
        peak = max(peak, running)
    return peak


def peak_step_bytes(step, device: torch.device) -> int:
    """Peak bytes allocated by one `step()` above what was alive before it (see module doc)."""
    if device.type == 'cuda':
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    return _cpu_peak_bytes(step)


def saved_for_backward_bytes(forward, exclude=()) -> int:
    """Bytes of the unique storages autograd saves during `forward()` (which returns the output;
    the graph is freed afterwards). Storages of `exclude` (the parameters) are not counted."""
    excluded = {t.untyped_storage().data_ptr() for t in exclude}
    storages = {}

    def pack(t):
        try:
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr not in excluded:
                storages[(t.device, ptr)] = storage.nbytes()
        except (RuntimeError, NotImplementedError):  # tensor subclasses without storage
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    del out
    return sum(storages.values())


# ---------------------------------------------------------------------------------------------
# Bytes moved (another module owns the counter; it may be absent)

def bytes_moved_counter():
    """(measure_bytes, None) when benchmarks.bytes_moved is importable, else (None, reason)."""
    try:
        from . import bytes_moved
        return bytes_moved.measure_bytes, None
    except Exception as err:  # absent or broken: the columns say so instead of guessing
        return None, f"benchmarks.bytes_moved unavailable ({type(err).__name__}: {err})"


# ---------------------------------------------------------------------------------------------
# GPU ceilings for the roofline

@dataclass
class Ceilings:
    copy_bytes_per_s: float
    matmul_flops: dict       # dtype name -> FLOP/s

    def describe(self) -> str:
        mm = ", ".join(f"{k} matmul {v / 1e12:.0f} TFLOP/s" for k, v in self.matmul_flops.items())
        return f"device copy {self.copy_bytes_per_s / 1e12:.2f} TB/s, {mm}"


def measure_ceilings(dtypes) -> Ceilings:
    """Measured on this GPU: copy bandwidth of a 1 GiB tensor (read + write counted) and the FLOP/s
    of an 8192^3 matmul in each dtype (bf16 always, plus the run's dtype)."""
    import triton.testing
    src = torch.empty(256 * 1024 * 1024, dtype=torch.float32, device='cuda').uniform_()
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), rep=200, return_mode='median')
    bandwidth = 2 * src.numel() * 4 / (ms * 1e-3)
    del src, dst
    flops = {}
    n = 8192
    for dtype in dict.fromkeys([torch.bfloat16, *dtypes]):
        a = torch.randn(n, n, device='cuda', dtype=dtype)
        b = torch.randn(n, n, device='cuda', dtype=dtype)
        ms = triton.testing.do_bench(lambda: a @ b, rep=200, return_mode='median')
        flops[str(dtype).replace('torch.', '')] = 2 * n ** 3 / (ms * 1e-3)
    torch.cuda.empty_cache()
    return Ceilings(bandwidth, flops)
