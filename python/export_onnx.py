"""Export a RIFormer classifier to ONNX in deploy form (rk.export_onnx), checked with onnxruntime.

    python python/export_onnx.py riformer_s12 s12.onnx                       # fresh weights
    python python/export_onnx.py s12_in1k.pth s12.onnx --input-shape 1,3,224,224 --opset 18
    python python/export_onnx.py s12_in1k.pth s12.onnx --opset 21 --group-norm-node

MODEL is a model name (riformer_s12 ... riformer_m48, upstream's training initialisation: for
trying a runtime) or a checkpoint (upstream's, or one from convert_checkpoint.py, either form;
the architecture and class count are read from it). The file gets standard ONNX operators only
(explicit ReduceMean norms; no GroupNormalization node unless --group-norm-node), a dynamic
batch axis unless --no-dynamic-batch, and is kept only if onnxruntime reproduces the float64
reference within 1e-5 relative (docs/deployment.md). Prints the node count and op histogram.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

import riformer_kernels as rk
from riformer_kernels import onnx_export
from riformer_kernels.models import describe_checkpoint


def parse_shape(text: str) -> tuple[int, ...]:
    parts = text.replace('x', ',').split(',')
    try:
        return tuple(int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--input-shape takes N,C,H,W integers, got {text!r}")


def build_model(spec: str, num_classes: int | None, trust: bool):
    """A classifier from a model name or a checkpoint file (converted to deploy form on load)."""
    if spec in rk.MODEL_NAMES:
        return rk.create_model(spec, num_classes=num_classes or 1000)
    if not os.path.isfile(spec):
        raise ValueError(f"MODEL must be one of {rk.MODEL_NAMES} or a checkpoint file; "
                         f"{spec!r} is neither")
    state = torch.load(spec, map_location='cpu', weights_only=not trust)
    info = describe_checkpoint(state)
    if info['num_classes'] is None:
        raise ValueError(f"{spec} has no classifier head (a backbone-only checkpoint); export "
                         f"a backbone with rk.export_onnx in Python")
    model = rk.RIFormerClassifier(info['arch'], num_classes=info['num_classes'], deploy=True,
                                  in_channels=info['in_channels'] or 3, init_weights=False)
    return rk.load_checkpoint(model, state)   # training form: folded on the way in


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('model', help=f'one of {", ".join(rk.MODEL_NAMES)}, or a checkpoint file')
    p.add_argument('output', help='ONNX file to write')
    p.add_argument('--input-shape', type=parse_shape, default=None,
                   help='N,C,H,W of the example and check input (default 1,C,224,224)')
    p.add_argument('--opset', type=int, default=onnx_export.DEFAULT_OPSET)
    p.add_argument('--dynamic-batch', action=argparse.BooleanOptionalAction, default=True,
                   help='symbolic batch axis (default on)')
    p.add_argument('--group-norm-node', action='store_true',
                   help='emit GroupNormalization nodes (opset >= 21) instead of explicit '
                   'reductions; only for runtimes known to compute num_groups=1 over (C,H,W)')
    p.add_argument('--num-classes', type=int, default=None,
                   help='head size of a model built by name (default 1000)')
    p.add_argument('--seed', type=int, default=0, help='seed of the random check input')
    p.add_argument('--trust', action='store_true',
                   help='load a checkpoint with weights_only=False (trusted files only)')
    p.add_argument('--json', action='store_true', help='print the result as JSON')
    args = p.parse_args(argv)
    try:
        model = build_model(args.model, args.num_classes, args.trust)
        shape = args.input_shape or (1, model.backbone.patch_embed.proj.in_channels, 224, 224)
        result = rk.export_onnx(model, args.output, shape, opset=args.opset,
                                dynamic_batch=args.dynamic_batch,
                                group_norm_node=args.group_norm_node, seed=args.seed)
    except (ValueError, TypeError, ImportError, onnx_export.ExportError) as err:
        print(f"export_onnx: {err}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(dict(path=result.path, opset=result.opset,
                              node_count=result.node_count, op_histogram=result.op_histogram,
                              max_rel_err=result.max_rel_err,
                              checked_batches=list(result.checked_batches),
                              dynamic_batch=result.dynamic_batch)))
    else:
        print(result.summary())
    return 0


if __name__ == '__main__':
    sys.exit(main())
