"""`riformer-bench` / `python -m riformer_kernels.benchmarks` (`python -m benchmarks` in a
checkout): block microbenchmarks and model benchmarks.

Examples:
  riformer-bench --quick --out /tmp/bench                    # CI smoke run (< 60 s on 2 cores)
  riformer-bench --arch s12 --res 224 --threads 2            # S12 stage shapes, fwd and train
  riformer-bench --no-blocks --models --model-batches 1,4    # S12 and M36 classifiers
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

DTYPES = {'float32': torch.float32, 'fp32': torch.float32, 'bfloat16': torch.bfloat16,
          'bf16': torch.bfloat16, 'float16': torch.float16, 'fp16': torch.float16}


def _list(kind):
    def parse(text):
        return [kind(v) for v in text.replace(',', ' ').split()]
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog='riformer-bench', description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--quick', action='store_true',
                   help='smoke mode for CI: one tiny block shape, few rounds, a tiny model sweep')
    p.add_argument('--out', default='bench_results', help='output folder (default bench_results/)')
    p.add_argument('--name', default='bench', help='file name prefix of the outputs')
    p.add_argument('--device', default='auto', choices=['auto', 'cpu', 'cuda'])
    p.add_argument('--dtype', default=None, choices=sorted(DTYPES),
                   help='default float32 on CPU, bfloat16 on GPU')
    p.add_argument('--threads', type=int, default=None, help='torch.set_num_threads')
    p.add_argument('--recompute', choices=('true', 'false'), default=None,
                   help="fused backends' training memory mode for every block "
                        "(rk.set_recompute); default: each block's own (True)")
    p.add_argument('--batch', type=int, default=None, help='block batch (default 8 CPU, 128 GPU)')
    p.add_argument('--arch', type=_list(str), default=None, help='e.g. s12,m36 (default all)')
    p.add_argument('--stage', type=_list(int), default=None, help='e.g. 1,2 (default 1,2,3,4)')
    p.add_argument('--res', type=_list(int), default=None, help='224 and/or 384 (default both)')
    p.add_argument('--mode', type=_list(str), default=None, help='forward,train (default both)')
    p.add_argument('--impl', type=_list(str), default=None,
                   help='eager,deploy,compile,fused-<backend> (default every usable one)')
    p.add_argument('--rounds', type=int, default=10, help='timing rounds per row (CPU)')
    p.add_argument('--cold-compile', action='store_true',
                   help="disable inductor's caches so compile_s is a cold compile")
    p.add_argument('--no-blocks', action='store_true', help='skip the block microbenchmarks')
    p.add_argument('--models', action='store_true', help='also run the model benchmarks')
    p.add_argument('--model-archs', type=_list(str), default=['s12', 'm36'])
    p.add_argument('--model-batches', type=_list(int), default=None,
                   help='default 1,4 on CPU and 32,64,128 on GPU')
    p.add_argument('--model-res', type=int, default=224)
    p.add_argument('--title', default=None, help='report title')
    p.add_argument('--no-progress', action='store_true')
    p.add_argument('--verbose', action='store_true', help='print tracebacks of failing rows')
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    # Imported here so `--help` is instant.
    from . import measure, micro, model_bench, report
    from .impls import MODES, discover_impls
    from .progress import progress_bar
    from .shapes import block_shapes, quick_shape

    if args.device == 'auto':
        device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    else:
        device = torch.device(args.device)
        if device.type == 'cuda' and not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device is visible to torch")
    gpu = device.type == 'cuda'
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if gpu else torch.float32)
    if args.quick and not args.threads:
        # One thread: on a shared machine, OpenMP regions waiting for a descheduled second
        # thread can make tiny shapes 10x slower, and the smoke run has a minute.
        args.threads = 1
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.recompute is not None:
        import riformer_kernels as rk
        rk.set_recompute(args.recompute == 'true')
    if args.cold_compile:
        import torch._inductor.config as inductor_config
        inductor_config.force_disable_caches = True
    modes = args.mode or list(MODES)
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise SystemExit(f"unknown --mode {bad}; choose from {MODES}")
    batch = args.batch or (2 if args.quick else (128 if gpu else 8))
    if args.quick:
        shapes = [quick_shape()]
        args.rounds = min(args.rounds, 3)
        run_models = not args.no_blocks or args.models
        model_archs, model_batches, model_res = ['s12'], [1, 2], 32
    else:
        shapes = [] if args.no_blocks else block_shapes(args.arch, args.stage, args.res)
        run_models = args.models
        model_archs = args.model_archs
        model_batches = args.model_batches or ([32, 64, 128] if gpu else [1, 4])
        model_res = args.model_res

    impls, left_out = discover_impls(device, args.impl)
    # Whole-model compile in quick mode would take most of the minute the smoke run has.
    model_impls = [i for i in impls if i.kind != 'deploy' and not (args.quick and
                                                                   i.kind == 'compile')]
    args.bytes_counter, bytes_note = measure.bytes_moved_counter()
    ceilings = measure.measure_ceilings([dtype]) if gpu else None

    os.makedirs(args.out, exist_ok=True)
    info = report.machine_info(device)
    info.update({'dtype': str(dtype).replace('torch.', ''), 'threads': torch.get_num_threads(),
                 'block batch': batch})
    total = len(shapes) * len(modes) * len(impls)
    if run_models:
        total += len(model_archs) * len(model_batches) * len(modes) * len(model_impls)
    bar = progress_bar(total, 'riformer-bench', enabled=not args.no_progress)
    started = time.perf_counter()
    block_rows, model_rows = [], []
    try:
        for shape in shapes:
            block_rows += micro.run_shape(shape, impls, modes, batch, dtype, device, args,
                                          ceilings, bar)
        if run_models:
            model_rows = model_bench.run_models(model_archs, model_batches, model_res,
                                                model_impls, modes, dtype, device, args, bar)
    finally:
        bar.close()
    info['load average at end (1/5/15 min)'] = report.load_average()
    info['wall time'] = f"{time.perf_counter() - started:.0f} s"

    notes = method_notes(gpu, bytes_note, ceilings, left_out, args)
    title = args.title or f"riformer_kernels benchmarks ({device.type}, {info['dtype']})"
    written = []
    if block_rows:
        path = os.path.join(args.out, f"{args.name}_blocks.csv")
        report.write_csv(path, block_rows, report.BLOCK_COLUMNS)
        written.append(path)
    if model_rows:
        path = os.path.join(args.out, f"{args.name}_models.csv")
        report.write_csv(path, model_rows, report.MODEL_COLUMNS)
        written.append(path)
    plot_title = f"{info['cpu'] if not gpu else info['gpu']}, {info['threads']} threads, " \
                 f"{info['dtype']}, batch {batch}"
    plots = draw_plots(report, args.out, args.name, block_rows, model_rows, plot_title, notes)
    md = os.path.join(args.out, f"{args.name}.md")
    report.write_markdown(md, title, info, notes, block_rows, model_rows, gpu, plots)
    written += plots + [md]
    for path in written:
        print(path)
    return 0


def draw_plots(report, out, name, block_rows, model_rows, title, notes) -> list[str]:
    """The PNG plots, or none, one line on stderr and a note in the report when matplotlib is
    missing (an optional dependency: the CSV and markdown do not need it)."""
    plots = []
    try:
        speedup_png = os.path.join(out, f"{name}_speedup.png")
        if block_rows and report.plot_speedup(speedup_png, block_rows, title):
            plots.append(speedup_png)
        memory_png = os.path.join(out, f"{name}_memory.png")
        if model_rows and report.plot_memory(memory_png, model_rows, title.rsplit(',', 1)[0]):
            plots.append(memory_png)
    except ImportError as err:
        notes.append(f"plots not drawn: matplotlib is not installed ({err})")
        print("riformer-bench: plots skipped: matplotlib is not installed (pip install "
              "matplotlib, or riformer_kernels[bench]); CSV and markdown written",
              file=sys.stderr)
    return plots


def method_notes(gpu, bytes_note, ceilings, left_out, args) -> list[str]:
    notes = []
    if gpu:
        notes.append("time: triton.testing.do_bench_cudagraph (falls back to do_bench when graph "
                     "capture fails; the `timing` CSV column says which), median and p20/p80")
    else:
        notes.append(f"time: perf_counter per call after warm-up, median and p20/p80 over "
                     f"{args.rounds} rounds (each round enough back-to-back calls to last "
                     f"~{'20' if args.quick else '100'} ms); p20–p80 is the noise")
    notes.append("speedups: eager median / this median, and compile median / this median, from "
                 "the same run")
    notes.append("correctness: before timing, every implementation's output (and in training "
                 "mode the gradients of x and every parameter) is compared with the float64 "
                 "reference on the same random inputs and order-one random parameters; fp32 "
                 "must be within 1e-4 relative (max abs error / max abs value), half dtypes "
                 "within twice the eager reference's own error; a failing row is reported "
                 "`wrong` and not timed")
    if gpu:
        notes.append("peak MiB: torch.cuda.max_memory_allocated minus memory_allocated before "
                     "the step (inputs and parameters excluded)")
    else:
        notes.append("peak MiB: the step runs once under torch.profiler(profile_memory=True), "
                     "which records every allocation and free of the c10 CPU allocator; the "
                     "peak of their running sum is the bytes the step held beyond what was "
                     "alive before it (inputs and parameters excluded; outputs, saved "
                     "activations, gradients and temporaries included). Raw malloc scratch "
                     "inside a kernel would not be seen")
    notes.append("columns marked (x) are in units of |x|, the bytes of the block's input")
    notes.append("saved (x): unique storages packed by saved_tensors_hooks in the training "
                 "forward (parameters excluded, the input x included)")
    notes.append("moved (x): " + (bytes_note if bytes_note else
                                  "benchmarks.bytes_moved.measure_bytes(step)['total'] (reads + "
                                  "writes of every dispatched op; see that module)"))
    notes.append("compile: torch.compile(reference computation, dynamic=False); `compile s` is "
                 "the first call's time including compilation, with inductor's on-disk caches "
                 + ("disabled (--cold-compile)" if args.cold_compile else
                    "as they were (a warm cache makes it much shorter)"))
    notes.append("model training step: forward, cross-entropy, backward (no optimizer update); "
                 "its peak includes the parameter gradients (`params MiB`, whatever the "
                 "batch); a model passes its check at max(1e-4, 2x the eager model's own "
                 "error in the same dtype), checked once per implementation at the smallest "
                 "batch")
    if not gpu:
        notes.append("GEMM floor: `GEMM GFLOP/s` is the rate of the block's two GEMMs run as plain "
                     "torch.mm ([N*T, C] x [C, 4C] and [N*T, 4C] x [4C, C]; MKL/oneDNN, the "
                     "same threads), timed in the same interleaved rounds as the rows; `floor "
                     "ms` = block FLOPs / that rate, block FLOPs = 16 N T C^2 forward and 3x "
                     "that for a training step (the six GEMMs any implementation needs; a "
                     "recomputing backward runs a seventh); `x floor` = median / floor ms")
    if ceilings is not None:
        notes.append(f"roofline: ceilings measured on this GPU: {ceilings.describe()}; "
                     "roofline = max(floor bytes / bandwidth, FLOPs / matmul peak) / measured "
                     "time, floor bytes = 2|x| forward and 5|x| forward+backward plus weights, "
                     "FLOPs = 16 N T C^2 forward, 3x that with backward")
    for name, reason in left_out.items():
        notes.append(f"not run: {name}: {reason}")
    return notes
