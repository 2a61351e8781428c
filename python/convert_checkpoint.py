"""Convert an upstream (OpenMMLab mmpretrain) RIFormer checkpoint into one for rk.create_model,
optionally in deploy form, and check it before it is written.

    python python/convert_checkpoint.py riformer-s12_in1k.pth s12.pth            # training form
    python python/convert_checkpoint.py riformer-s12_in1k.pth s12_deploy.pth --deploy

IN is what mmpretrain saves: a dict with a `state_dict` entry (keys `backbone.*`, `head.fc.*`,
maybe `data_preprocessor.*`, `module.` prefixes from DDP) beside `meta`, optimizer state and the
like; a bare state dict or a backbone-only file works too. The architecture, class count and
form are read from the keys and shapes (`--arch` names it instead). OUT holds `state_dict`
(float32, rk's keys, which are upstream's) and `meta` (what was converted and the check).

The check: the model built from IN and the model rk.create_model builds from the written
bytes are run by the float64 reference on one random input; same form: the outputs must be
identical; --deploy: within 1e-5 relative (the folded norm's parameters are rounded to float32,
as upstream's switch_to_deploy rounds them). OUT is written atomically (riformer_kernels.atomic):
a failed check or an interrupted run leaves no OUT (an existing one keeps its old content).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

import riformer_kernels as rk
from riformer_kernels.atomic import replacing
from riformer_kernels.models import ARCH_SETTINGS, describe_checkpoint
from riformer_kernels.testing import rel_err

# --deploy: the output is compared with the training-form input; both run in float64, so the
# only difference is the float32 rounding of the folded (norm_reparam) parameters, ~6e-8
# relative per parameter (S12 with random order-one weights measures 4.8e-8 on its logits at
# 224 px). A wrong fold is off by O(1).
DEPLOY_RTOL = 1e-5


class CheckFailed(RuntimeError):
    """The written checkpoint does not reproduce the input's outputs; OUT was not written."""


def build(info: dict, deploy: bool):
    """The model `info` (describe_checkpoint) describes, in the given form, untrained."""
    kwargs = dict(deploy=deploy, in_channels=info['in_channels'] or 3, init_weights=False,
                  out_indices=list(info['out_indices'] or [-1]))
    if info['num_classes'] is None:
        return rk.RIFormer(info['arch'], **kwargs)
    return rk.RIFormerClassifier(info['arch'], num_classes=info['num_classes'], **kwargs)


def load_written(path: str, info: dict, deploy: bool):
    """The converted file as a user loads it: rk.create_model for a named classifier, else the
    model built and filled by rk.load_checkpoint (strict)."""
    if info['num_classes'] is not None and isinstance(info['arch'], str) and \
            info['in_channels'] in (None, 3) and info['out_indices'] in (None, (6,)):
        return rk.create_model(f"riformer_{info['arch']}", checkpoint=path, deploy=deploy)
    return rk.load_checkpoint(build(info, deploy), path)


def _outputs(model, x):
    with torch.no_grad(), rk.use_backend('reference'):
        out = model.double().eval()(x)
    return torch.cat([t.flatten() for t in out]) if isinstance(out, tuple) else out


def convert(src, out: str, deploy: bool = False, arch: str | None = None,
            image_size: int = 224, seed: int = 0, weights_only: bool = True) -> dict:
    """Convert `src` (a path or a loaded checkpoint dict) to `out`; returns OUT's `meta`."""
    name = os.path.basename(os.fspath(src)) if isinstance(src, (str, os.PathLike)) else None
    if isinstance(src, (str, os.PathLike)):
        try:
            src = torch.load(src, map_location='cpu', weights_only=weights_only)
        except Exception as err:
            if weights_only:
                raise ValueError(f"could not load it with weights_only=True ({err}); if you "
                                 f"trust the file, pass --trust") from err
            raise
    info = describe_checkpoint(src)
    if arch is not None:
        if arch not in ARCH_SETTINGS:
            raise ValueError(f"unknown --arch {arch!r}; choose one of {sorted(ARCH_SETTINGS)}")
        info['arch'] = arch
    if info['deploy'] and not deploy:
        raise ValueError("the input is in deploy form (norm_reparam), and the training form "
                         "cannot be recovered from it (norm1 and the affine mixer are folded "
                         "into one product): pass --deploy")
    # Input model: built in the input's form and loaded strictly (every key used, none missing).
    source = rk.load_checkpoint(build(info, info['deploy']), src)
    converted = build(info, deploy)
    rk.load_checkpoint(converted, src)   # deploy: each block's norm1 + mixer folded on the way
    state = {k: v.detach().float() if v.is_floating_point() else v.detach()
             for k, v in converted.state_dict().items()}

    g = torch.Generator().manual_seed(seed)
    channels = info['in_channels'] or 3
    x = torch.randn(1, channels, image_size, image_size, generator=g, dtype=torch.float64)
    try:
        want = _outputs(source, x)
    except (RuntimeError, ValueError) as err:
        raise ValueError(f"the model cannot run a {image_size}x{image_size} input: {err}") from err
    meta = dict(converted_from=name,
                arch=info['arch'], num_classes=info['num_classes'], deploy=deploy,
                riformer_kernels=rk.__version__)
    with replacing(out, suffix='.pth') as tmp:
        torch.save({'meta': meta, 'state_dict': state}, tmp)
        got = _outputs(load_written(tmp, info, deploy), x)
        err = rel_err(got, want)
        limit = DEPLOY_RTOL if deploy != info['deploy'] else 0.0
        if not err <= limit:
            raise CheckFailed(f"the converted checkpoint's outputs differ from the input's by "
                              f"{err:.3e} relative (limit {limit:g}); {out} not written")
        meta['check'] = dict(input=list(x.shape), max_rel_err=err, limit=limit)
        # Rewritten with the check's result in it, still inside the same atomic replacement.
        torch.save({'meta': meta, 'state_dict': state}, tmp)
    return meta


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('input', help='upstream checkpoint (.pth)')
    p.add_argument('output', help='converted checkpoint to write')
    p.add_argument('--deploy', action='store_true',
                   help='write the deploy form (norm1 + affine mixer folded into norm_reparam)')
    p.add_argument('--arch', default=None, help=f'one of {sorted(ARCH_SETTINGS)} (default: read '
                   'from the checkpoint)')
    p.add_argument('--image-size', type=int, default=224, help='side of the random check input')
    p.add_argument('--seed', type=int, default=0, help='seed of the random check input')
    p.add_argument('--trust', action='store_true',
                   help='load IN with weights_only=False (runs pickled code: trusted files only)')
    args = p.parse_args(argv)
    try:
        meta = convert(args.input, args.output, deploy=args.deploy, arch=args.arch,
                       image_size=args.image_size, seed=args.seed, weights_only=not args.trust)
    except (ValueError, TypeError, CheckFailed) as err:
        print(f"convert_checkpoint: {err}", file=sys.stderr)
        return 1
    arch = meta['arch'] if isinstance(meta['arch'], str) else 'dict arch'
    print(f"wrote {args.output}: {arch}, {meta['num_classes']} classes, "
          f"{'deploy' if meta['deploy'] else 'training'} form; outputs vs the input's "
          f"(float64 reference): max relative error {meta['check']['max_rel_err']:.2e} "
          f"(limit {meta['check']['limit']:g})")
    return 0


if __name__ == '__main__':
    sys.exit(main())
