"""The `torch` backend (the fold in PyTorch ops) against the upstream reference."""
import copy

import pytest
import torch

import riformer_kernels as rk
from helpers import (check_same_seed_as_reference, gradcheck_block, large_offset_errors,
                     make_block, rel_err, random_input, run_block)

# Odd shapes on purpose: N=1, C not a multiple of 8, H*W=1, non-square, a prime spatial size.
SHAPES = [(2, 16, 5, 7), (1, 24, 3, 3), (3, 20, 1, 1), (2, 13, 4, 9), (1, 64, 8, 8), (2, 8, 11, 1)]


def _compare(block, x, backend='torch', tol=1e-10, ref_dtype=torch.float64):
    """Output and every gradient of `backend` on x vs the reference run in `ref_dtype`."""
    ref_block = copy.deepcopy(block).to(ref_dtype)
    g = torch.randn(x.shape, dtype=torch.float64)
    out_ref, grads_ref = run_block(ref_block, x.to(ref_dtype), 'reference',
                                   g.to(ref_dtype))
    out, grads = run_block(block, x, backend, g.to(x.dtype))
    errors = {'out': rel_err(out, out_ref)}
    errors.update({k: rel_err(grads[k], grads_ref[k]) for k in grads_ref})
    assert set(grads) == set(grads_ref)
    bad = {k: v for k, v in errors.items() if not v <= tol}
    assert not bad, f"errors above {tol}: {bad}"
    return errors


@pytest.mark.parametrize('shape', SHAPES)
@pytest.mark.parametrize('deploy', [False, True])
@pytest.mark.parametrize('channels_last', [False, True])
def test_fp64_output_and_all_gradients_match_reference(shape, deploy, channels_last):
    block = make_block(shape[1], deploy=deploy)
    x = random_input(shape, channels_last=channels_last)
    _compare(block, x, tol=1e-10)


@pytest.mark.parametrize('shape', SHAPES[:4])
@pytest.mark.parametrize('deploy', [False, True])
def test_fp32_within_1e5_of_fp64_reference(shape, deploy):
    block = make_block(shape[1], deploy=deploy, dtype=torch.float32)
    x = random_input(shape, dtype=torch.float32)
    _compare(block, x, tol=1e-5)


def test_non_contiguous_view_input():
    block = make_block(12)
    base = random_input((4, 24, 9, 10))
    x = base[::2, ::2, 1:, ::3]          # strided in every dim
    assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
    _compare(block, x, tol=1e-10)


@pytest.mark.parametrize('deploy', [False, True])
def test_gradcheck_fp64(deploy):
    block = make_block(6, deploy=deploy)
    assert gradcheck_block(block, 'torch')


def test_channels_last_output_keeps_memory_format():
    block = make_block(16)
    x = random_input((2, 16, 5, 5), channels_last=True)
    with rk.use_backend('torch'):
        out = block(x)
    assert out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize('deploy', [False, True])
def test_constant_input_zero_variance_is_finite_and_exact(deploy):
    block = make_block(10, deploy=deploy)
    x = torch.full((2, 10, 4, 4), 3.7, dtype=torch.float64)
    g = torch.randn(x.shape, dtype=torch.float64)
    out_ref, grads_ref = run_block(block, x, 'reference', g)
    out, grads = run_block(block, x, 'torch', g)
    assert rel_err(out, out_ref) <= 1e-10
    # With zero variance the norm1 weight gradient is exactly zero in exact arithmetic and both
    # implementations return rounding noise around it, so gradients are compared absolutely,
    # against the scale of order-one quantities rather than their own (vanishing) scale.
    for k in grads_ref:
        assert torch.isfinite(grads[k]).all(), k
        diff = (grads[k] - grads_ref[k]).abs().max().item()
        assert diff <= 1e-10 * max(1.0, grads_ref[k].abs().max().item()), (k, diff)


def test_large_offset_loses_no_more_precision_than_reference():
    """x + 1e4 in fp32: the fold must not be less precise than the reference itself."""
    fold_err, ref_err, block32, x64 = large_offset_errors('torch')
    x32 = x64.float()
    # 2x + one ulp of slack: both are fp32 computations rounding differently.
    print(f"large offset: fold {fold_err:.3g} reference {ref_err:.3g}")
    assert fold_err <= 2 * ref_err + 1.2e-7, (fold_err, ref_err)
    # and the normalised branch is still right: compare the residual-free part.
    r = run_block(copy.deepcopy(block32).double(), x64, 'reference')[0] - x64
    f = run_block(block32, x32, 'torch')[0].double() - x32.double()
    assert rel_err(f, r) < 0.05


@pytest.mark.parametrize('deploy', [False, True])
def test_drop_path_same_seed_gives_reference_masks(deploy):
    block = make_block(12, deploy=deploy, drop_path=0.5).train()
    check_same_seed_as_reference(block, random_input((8, 12, 3, 4)), 'torch', tol=1e-10)


def test_dropout_same_seed_gives_reference_masks():
    block = make_block(12, drop=0.3).train()
    check_same_seed_as_reference(block, random_input((2, 12, 4, 4)), 'torch', tol=1e-10, seed=3)


@pytest.mark.parametrize('seed', [1234, 1, 2])
@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_half_dtypes_within_twice_reference_error(dtype, seed):
    """Half precision: the fold's error vs fp64 is at most twice the reference's own error, on
    several draws."""
    torch.manual_seed(seed)
    block = make_block(32, dtype=dtype)
    x = random_input((2, 32, 6, 5), dtype=dtype)
    truth = run_block(copy.deepcopy(block).double(), x.double(), 'reference')[0]
    ref_err = rel_err(run_block(block, x, 'reference')[0], truth)
    fold_err = rel_err(run_block(block, x, 'torch')[0], truth)
    print(f"{dtype}: fold {fold_err:.3g} reference {ref_err:.3g}")
    assert ref_err > 0
    assert fold_err <= 2 * ref_err, (fold_err, ref_err)
