"""Demo: RIFormer-S12 with random weights, the reference against the best fused backend.

Runs on whatever device is present (CUDA if torch sees one, else the CPU), prints which backend
`auto` picks and why it skipped the others, the largest difference between the two on the same
weights and inputs, and a small table of time and memory for inference and one training step:
the reference, the fused backend running every block, and `auto` (the default, which leaves to
the reference any block whose class of shapes was measured slower with the fused kernels).
Nothing is downloaded: the weights are random (with layer scales of order one, so every block's
branches matter to the output).
"""
from __future__ import annotations

import argparse

import torch

import riformer_kernels as rk
from riformer_kernels.benchmarks.measure import saved_for_backward_bytes, time_steps


def timed_together(fns, device, rounds: int) -> list:
    """Median milliseconds of each of `fns`, timed in interleaved rounds after a warm-up (the
    benchmarks' method: load drift on a shared machine then hits every backend alike)."""
    return [t.median_ms for t in time_steps(fns, device, rounds=rounds)]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--batch', type=int, default=4)
    parser.add_argument('--size', type=int, default=224)
    parser.add_argument('--rounds', type=int, default=5)
    parser.add_argument('--model', default='riformer_s12', choices=rk.MODEL_NAMES)
    args = parser.parse_args(argv)

    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    torch.manual_seed(0)
    model = rk.create_model(args.model).to(device)
    with torch.no_grad():  # layer scales of order one instead of 1e-5: the blocks really act
        for name, p in model.named_parameters():
            if 'layer_scale' in name:
                p.uniform_(0.5, 1.5)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    first_block = model.backbone.network[0][0]
    stage1_input = model.backbone.patch_embed(x)

    print(f"riformer_kernels {rk.__version__} | torch {torch.__version__} | device {device} | "
          f"{args.model} batch {args.batch} at {args.size}px, fp32")
    print("backends:")
    for name, info in rk.available_backends().items():
        print(f"  {name:10s} {'usable' if info.usable else 'unusable: ' + info.reason}")
    if device.type == 'cpu' and rk.available_backends()['cpu'].usable:
        i = rk.cpu_isa_info()
        print(f"cpu kernels: ISA path {i.active} (this CPU supports {i.supported}), fp32 GEMMs "
              f"{i.gemm}")
    print("dispatch for the first block:\n  " +
          rk.explain_dispatch(first_block, stage1_input).replace("\n", "\n  "))
    fused = [n for n in ('triton', 'cuda', 'cpu', 'torch') if rk.available_backends()[n].usable]
    fused_name = next(n for n in fused if n != 'triton' or device.type == 'cuda')

    model.eval()
    with torch.no_grad():
        with rk.use_backend('reference'):
            ref = model(x)
        with rk.use_backend(fused_name):
            out = model(x)
    diff = (out - ref).abs().max().item()
    print(f"max |logits({fused_name}) - logits(reference)| = {diff:.3e} "
          f"(logit scale {ref.abs().max().item():.3g})")

    # 'auto' (what a user gets by default) may run some blocks on the reference: those whose
    # class the benchmarks measured slower with the fused kernels (rk.explain_dispatch says).
    names = ('reference', fused_name, 'auto')

    def under(name, fn, train):
        def run():
            with rk.use_backend(name):
                model.train(train)
                if not train:
                    with torch.no_grad():
                        return fn()
                model.zero_grad(set_to_none=True)
                return fn().logsumexp(1).sum().backward()
        return run

    infer_ms = timed_together([under(n, lambda: model(x), False) for n in names], device,
                              args.rounds)
    train_ms = timed_together([under(n, lambda: model(x), True) for n in names], device,
                              args.rounds)
    rows = []
    for name, inf, trn in zip(names, infer_ms, train_ms):
        with rk.use_backend(name):
            model.train()
            saved = saved_for_backward_bytes(lambda: model(x), exclude=list(model.parameters()))
            peak = ''
            if device.type == 'cuda':
                torch.cuda.reset_peak_memory_stats()
                under(name, lambda: model(x), True)()
                peak = f"{torch.cuda.max_memory_allocated() / 2**20:.0f}"
        rows.append((name, inf, trn, saved / 2**20, peak))

    print(f"\n| backend | inference ms | training step ms | saved for backward MiB | "
          f"peak MiB |\n|---|---|---|---|---|")
    for name, infer_ms, train_ms, saved_mib, peak in rows:
        print(f"| {name} | {infer_ms:.1f} | {train_ms:.1f} | {saved_mib:.1f} | {peak or 'n/a (cpu)'} |")
    tolerance = 1e-3 * max(1.0, ref.abs().max().item())
    if not diff <= tolerance:
        raise SystemExit(f"the fused backend disagrees with the reference: {diff:.3e} > "
                         f"{tolerance:.3e}")


if __name__ == '__main__':
    main()
