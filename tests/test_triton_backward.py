"""Triton backward kernels (riformer_kernels.backends.triton.backward) against float64 autograd.

Every tensor is built on helpers.KERNEL_DEVICE: compiled kernels on CUDA when torch sees a GPU,
else the Triton interpreter on CPU (conftest); the float64 truths run on the same device. Tests
marked `gpu` need compiled kernels. Every output buffer of the module is NaN-filled before
launch, so an element a kernel fails to write fails the test.
"""
import copy
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
pytest.importorskip('triton', reason='triton is not installed (optional: pip install triton)')
import torch
import torch.nn.functional as F

import riformer_kernels as rk
from riformer_kernels import fold
from riformer_kernels.backends.triton import KERNELS as triton_kernels
from riformer_kernels.backends.triton import backward as tb
from riformer_kernels.params import BlockParams
from riformer_kernels.reference import drop_path_factors
import helpers
from helpers import INTERPRETER, KERNEL_DEVICE as DEV, rel_err, run_block

# Blocks and inputs of this module live on the kernel-test device (their values are drawn on the
# CPU, identical on every device).
make_block = helpers.on_kernel_device(helpers.make_block)
random_input = helpers.on_kernel_device(helpers.random_input)

FP32_TOL = 1e-4
NAMES = ('dz', 'dw1', 'db1', 'dw2', 'db2', 'sums')


@pytest.fixture(autouse=True)
def _nan_poisoned_outputs(monkeypatch):
    def empty(shape, dtype, device):
        return torch.full(shape, float('nan'), dtype=dtype, device=device)

    def empty_like(x):
        return torch.full_like(x, float('nan'))

    monkeypatch.setattr(tb, '_empty', empty)
    monkeypatch.setattr(tb, '_empty_like', empty_like)


def pc(v):
    return v[:, :, None, None]


def kernel_inputs(block, x, dp1=None, dp2=None):
    """What the autograd Function hands the kernels: statistics and coefficients in fp32 (fp64
    for fp64 inputs), computed by the shared fold from x in its own dtype."""
    p = BlockParams.of(block)
    mean, var = fold.channel_moments(x)
    s, t, l1, l2 = p.fold_inputs(x.shape[0], mean.dtype, dp1, dp2)
    cf = fold.fold_coefficients(mean, var, s, t, l1, p.g2, p.beta2, p.eps1, p.eps2)
    return p, mean, var, cf, s, t, l1, l2


def mlp_truth(block, x, g, dp2=None, dtype=torch.float64):
    """dz, dW1, db1, dW2, db2 and the five sums by torch autograd, everything in `dtype`."""
    block = copy.deepcopy(block).to(dtype)
    x, g = x.to(dtype), g.to(dtype)
    p, mean, _, cf, _, _, _, l2 = kernel_inputs(block, x, dp2=dp2)
    w1, b1, w2, b2 = (v.detach().clone().requires_grad_(True) for v in (p.w1, p.b1, p.w2, p.b2))
    z = (pc(cf.A) * x.to(mean.dtype) + pc(cf.B)).to(dtype).detach().requires_grad_(True)
    o = F.conv2d(F.gelu(F.conv2d(z, w1, b1)), w2, b2)
    dO = (pc(l2) * g.to(mean.dtype)).to(dtype)
    dz, dw1, db1, dw2, db2 = torch.autograd.grad(o, [z, w1, b1, w2, b2], dO)
    with torch.no_grad():
        xc = x - pc(mean).to(dtype)
        sums = torch.stack([g.sum((2, 3)), (g * xc).sum((2, 3)), dz.sum((2, 3)),
                            (dz * xc).sum((2, 3)), (g * o).sum((2, 3))])
    return dz, dw1, db1, dw2, db2, sums


def run_mlp_backward(block, x, g, dp2=None, u_saved=None):
    p, mean, _, cf, _, _, _, l2 = kernel_inputs(block, x, dp2=dp2)
    with torch.no_grad():
        return tb.mlp_backward(g, x, mean, cf.A, cf.B, p.w1, p.b1, p.w2, p.b2, l2, u_saved)


def sample_factors(n, seed):
    torch.manual_seed(seed)
    # on the device the block draws its masks on: block_grads_reference(seed) redraws these
    dp1 = drop_path_factors(n, 0.5, torch.float64, DEV)
    dp2 = drop_path_factors(n, 0.5, torch.float64, DEV)
    return dp1, dp2


def factors_with_zeros(n):
    """A seed whose drop-path draws drop some samples and keep others in both branches."""
    for seed in range(100):
        dp1, dp2 = sample_factors(n, seed)
        if all(0 < (d == 0).sum() < n for d in (dp1, dp2)):
            return seed, dp1, dp2
    raise AssertionError("no seed with mixed drop-path factors")


SHAPES = [
    pytest.param((2, 16, 5, 7), False, id='N2-C16-5x7'),
    pytest.param((1, 48, 3, 3), True, id='N1-C48-3x3-channels_last'),
    pytest.param((2, 10, 4, 5), False, id='C10-not-multiple-of-16'),
    pytest.param((3, 16, 1, 1), False, id='HW1'),
    pytest.param((2, 16, 6, 6), True, id='HW36-two-tiles-channels_last'),
]


@pytest.mark.parametrize('shape,channels_last', SHAPES)
@pytest.mark.parametrize('deploy', [False, True], ids=['training-form', 'deploy-form'])
def test_mlp_backward_fp32_matches_float64_autograd(shape, channels_last, deploy):
    block = make_block(shape[1], deploy=deploy, dtype=torch.float32)
    x = random_input(shape, torch.float32, channels_last)
    g = random_input(shape, torch.float32)
    got = run_mlp_backward(block, x, g)
    truth = mlp_truth(block, x, g)
    for name, a, b in zip(NAMES, got, truth):
        assert a.dtype == (x.dtype if name == 'dz' else torch.float32), name
        assert rel_err(a, b) <= FP32_TOL, name


def test_mlp_backward_with_drop_path_factors_some_zero():
    n, c = 4, 16
    _, _, dp2 = factors_with_zeros(n)
    block = make_block(c, dtype=torch.float32)
    x = random_input((n, c, 3, 5), torch.float32)
    g = random_input(x.shape, torch.float32)
    got = run_mlp_backward(block, x, g, dp2=dp2.float())
    truth = mlp_truth(block, x, g, dp2=dp2)
    dropped = dp2 == 0
    assert torch.equal(got[0][dropped], torch.zeros_like(got[0][dropped]))
    for name, a, b in zip(NAMES, got, truth):
        assert rel_err(a, b) <= FP32_TOL, name


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16], ids=['fp16', 'bf16'])
def test_mlp_backward_half_within_twice_torch_error(dtype):
    """Error vs float64 at most twice the error of torch's own autograd in that dtype."""
    shape = (2, 32, 5, 5)
    block = make_block(shape[1], dtype=dtype)
    x = random_input(shape, dtype, channels_last=True)
    g = random_input(shape, dtype)
    got = run_mlp_backward(block, x, g)
    truth = mlp_truth(block, x, g)
    torch_same_dtype = mlp_truth(block, x, g, dtype=dtype)
    for name, a, b, ref in zip(NAMES, got, truth, torch_same_dtype):
        assert a.dtype == (dtype if name == 'dz' else torch.float32), name
        assert rel_err(a, b) <= 2 * rel_err(ref, b), name


def block_grads_reference(block, x, g, seed=None):
    """Input and parameter gradients of the reference block in float64 (drop path drawn from
    `seed` when given, as the block draws it in training mode)."""
    block = copy.deepcopy(block).to(torch.float64)
    x = x.detach().to(torch.float64).requires_grad_(True)
    if seed is not None:
        block.train()
        torch.manual_seed(seed)
    with rk.use_backend('reference'):
        out = block(x)
    out.backward(g.to(torch.float64))
    grads = {'x': x.grad}
    grads.update({k: v.grad for k, v in block.named_parameters()})
    return grads


def fused_backward(g, x, mean, A, B, w1, b1, w2, b2, l2, u_saved, coefficients):
    """The triton kernel set's two backward phases as the pipeline runs them, with
    `coefficients(sums)` (an object with P, Q, R, S) in place of fold.backward_coefficients:
    (dx, dw1, db1, dw2, db2, coefficients(sums))."""
    saved = SimpleNamespace(x=x, mean=mean, A=A, B=B, w1=w1, b1=b1, w2=w2, b2=b2, l2=l2,
                            u=u_saved)
    phase1 = triton_kernels.backward_weights_and_sums(g, saved)
    bc = coefficients(phase1.sums)
    dx, (dw1, db1, dw2) = triton_kernels.backward_dx(g, saved, phase1, bc)
    return dx, dw1, db1, dw2, phase1.db2, bc


def full_backward_with_kernels(block, x, g, dp1=None, dp2=None):
    """The whole block backward as the triton backend composes it (`fused_backward`: phase 1
    kernels, the shared O(N*C) coefficients, phase 2 kernel), and the O(C) chain through (s, t)
    by autograd."""
    n, _, h, w = x.shape
    p, mean, var, cf, s, t, l1, l2 = kernel_inputs(block, x, dp1, dp2)
    with torch.no_grad():
        dx, dw1, db1, dw2, db2, bc = fused_backward(
            g, x, mean, cf.A, cf.B, p.w1, p.b1, p.w2, p.b2, l2, None,
            lambda sums: fold.backward_coefficients(sums, mean, var, cf, s, t, l1, p.g2, h * w))
    ones = torch.ones(n, dtype=mean.dtype, device=x.device)
    dp1 = ones if dp1 is None else dp1.to(mean.dtype)
    dp2 = ones if dp2 is None else dp2.to(mean.dtype)
    grads = {'x': dx, 'mlp.fc1.weight': dw1, 'mlp.fc1.bias': db1, 'mlp.fc2.weight': dw2,
             'mlp.fc2.bias': db2, 'layer_scale_1': (bc.d_l1 * dp1[:, None]).sum(0),
             'layer_scale_2': (bc.d_l2 * dp2[:, None]).sum(0), 'norm2.weight': bc.d_g2,
             'norm2.bias': bc.d_beta2}
    if p.deploy:
        grads.update({'norm_reparam.weight': bc.d_s, 'norm_reparam.bias': bc.d_t})
    else:
        leaves = [p.g1, p.beta1, p.w_aff, p.b_aff]
        d = torch.autograd.grad((s, t), leaves, (bc.d_s.to(s.dtype), bc.d_t.to(t.dtype)))
        grads.update(zip(['norm1.weight', 'norm1.bias', 'token_mixer.affine.weight',
                          'token_mixer.affine.bias'], d))
    return grads


@pytest.mark.parametrize('deploy', [False, True], ids=['training-form', 'deploy-form'])
@pytest.mark.parametrize('drop_path', [False, True], ids=['no-drop-path', 'drop-path'])
@pytest.mark.parametrize('channels_last', [False, True], ids=['nchw', 'channels_last'])
def test_every_gradient_matches_reference_block_float64(deploy, drop_path, channels_last):
    """dx (phase 2 kernel) and every parameter gradient vs autograd of the reference block."""
    n, c = 4, 16
    block = make_block(c, deploy=deploy, dtype=torch.float32,
                       drop_path=0.5 if drop_path else 0.0)
    x = random_input((n, c, 3, 5), torch.float32, channels_last)
    g = random_input(x.shape, torch.float32)
    seed = dp1 = dp2 = None
    if drop_path:
        seed, dp1, dp2 = factors_with_zeros(n)
        dp1, dp2 = dp1.float(), dp2.float()
    truth = block_grads_reference(block, x, g, seed)
    got = full_backward_with_kernels(block, x, g, dp1, dp2)
    assert got['x'].dtype == x.dtype
    assert got['x'].is_contiguous(memory_format=torch.channels_last) == channels_last
    assert set(got) == set(truth)
    for name in truth:
        assert rel_err(got[name].reshape(truth[name].shape), truth[name]) <= FP32_TOL, name


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16], ids=['fp16', 'bf16'])
def test_input_grad_half_within_twice_torch_error(dtype):
    """Phase 2 in half precision: dx error at most twice torch's for the same formula in dtype."""
    shape = (2, 24, 3, 5)
    g, dz, x = (random_input(shape, torch.float64) for _ in range(3))
    P, Q, R, S = (torch.randn(2, 24, dtype=torch.float64).to(DEV) for _ in range(4))
    mean = x.mean((2, 3))
    truth_from = [v.to(dtype) for v in (g, dz, x)]
    g64, dz64, x64 = (v.to(torch.float64) for v in truth_from)
    truth = pc(P) * g64 + pc(Q) * dz64 + pc(R) * (x64 - pc(mean)) + pc(S)
    gd, dzd, xd = (v.contiguous(memory_format=torch.channels_last) for v in truth_from)
    got = tb.input_grad(gd, dzd, xd, *(v.float() for v in (mean, P, Q, R, S)))
    torch_dtype = (pc(P.to(dtype)) * gd + pc(Q.to(dtype)) * dzd
                   + pc(R.to(dtype)) * (xd - pc(mean.to(dtype))) + pc(S.to(dtype)))
    assert got.dtype == dtype and got.is_contiguous(memory_format=torch.channels_last)
    assert rel_err(got, truth) <= 2 * rel_err(torch_dtype, truth)


@pytest.mark.parametrize('dtype', [torch.float32, torch.float16], ids=['fp32', 'fp16'])
def test_u_saved_path_equals_recompute_path(dtype):
    """With fc1's output saved (recompute=False) phase 1 gives the recompute path's result, up
    to u's rounding to the compute dtype, and still meets the float64 check."""
    shape = (2, 16, 4, 5)
    block = make_block(shape[1], dtype=dtype)
    x = random_input(shape, dtype)
    g = random_input(shape, dtype)
    p, mean, _, cf, *_ = kernel_inputs(block, x)
    with torch.no_grad():
        z = (pc(cf.A) * x.to(mean.dtype) + pc(cf.B)).to(dtype)
        u = F.conv2d(z, p.w1, p.b1)
    saved = run_mlp_backward(block, x, g, u_saved=u)
    recomputed = run_mlp_backward(block, x, g)
    truth = mlp_truth(block, x, g)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for name, a, b, t in zip(NAMES, saved, recomputed, truth):
        assert rel_err(a, b) <= tol, name
        if dtype == torch.float32:
            assert rel_err(a, t) <= FP32_TOL, name


def test_two_runs_are_bitwise_equal():
    """Fixed-order two-stage reductions, no atomics: identical bits run to run (several token
    splits in the weight-gradient kernel, several tiles per sample)."""
    shape = (3, 16, 7, 9)
    block = make_block(shape[1], dtype=torch.float32)
    x = random_input(shape, torch.float32)
    g = random_input(shape, torch.float32)
    first = run_mlp_backward(block, x, g)
    second = run_mlp_backward(block, x, g)
    for name, a, b in zip(NAMES, first, second):
        assert torch.equal(a, b), name
    P, Q, R, S = (torch.randn(3, 16).to(DEV) for _ in range(4))
    mean = x.mean((2, 3))
    assert torch.equal(tb.input_grad(g, first[0], x, mean, P, Q, R, S),
                       tb.input_grad(g, first[0], x, mean, P, Q, R, S))


FUSED_CASES = [
    # (dtype, shape, channels_last, u_saved, large path forced)
    (torch.float32, (3, 16, 7, 9), False, False, False),
    (torch.float32, (2, 10, 4, 5), True, True, False),
    (torch.float16, (2, 48, 6, 6), True, False, False),
    (torch.bfloat16, (2, 16, 6, 6), False, True, False),
    (torch.float32, (2, 48, 6, 6), False, True, True),
    (torch.bfloat16, (2, 16, 7, 7), True, False, True),
]


class FixedCoefficients:
    """A `coefficients` callback for fused_backward: records the sums, returns given P..S."""
    def __init__(self, P, Q, R, S):
        self.P, self.Q, self.R, self.S = P, Q, R, S
        self.sums = []

    def __call__(self, sums):
        self.sums.append(sums)
        return self


@pytest.mark.parametrize('case', FUSED_CASES, ids=lambda c: (
    f"{tb._TL_NAME[c[0]]}-C{c[1][1]}-{c[1][2]}x{c[1][3]}{'-cl' if c[2] else ''}"
    f"{'-u' if c[3] else ''}{'-large' if c[4] else ''}"))
def test_fused_backward_equals_the_two_phase_backward(case, monkeypatch):
    """fused_backward (small path: weight gradients and sums in one launch, then dx with dz
    recomputed; large path: phase 2 inside the weight-gradient kernel) gives what
    mlp_backward + input_grad give: the same weight gradients, sums and db2 bit for bit, dx
    to rounding (fp32: the same dz; half: input_grad reads dz rounded to the dtype), bitwise
    equal from run to run; dx in x's dtype and layout, every element written (NaN-poisoned
    outputs)."""
    dtype, shape, cl, with_u, large = case
    if large:
        monkeypatch.setattr(tb, 'SMALL_PATH_MAX_CHANNELS', 0)
    monkeypatch.setattr(tb, '_WEIGHT_GRAD_PROGRAMS', 2)     # several token tiles per split
    block = make_block(shape[1], dtype=dtype)
    x = random_input(shape, dtype, cl)
    g = random_input(shape, dtype)
    p, mean, _, cf, _, _, _, l2 = kernel_inputs(block, x)
    u = None
    if with_u:
        with torch.no_grad():
            u = F.conv2d((pc(cf.A) * x.to(mean.dtype) + pc(cf.B)).to(dtype), p.w1, p.b1)
    args = (mean, cf.A, cf.B, p.w1, p.b1, p.w2, p.b2, l2, u)
    coefficients = FixedCoefficients(*(torch.randn(shape[0], shape[1]).to(DEV)
                                       for _ in range(4)))
    P, Q, R, S = coefficients.P, coefficients.Q, coefficients.R, coefficients.S
    with torch.no_grad():
        dz, dw1, db1, dw2, db2, sums = tb.mlp_backward(g, x, *args)
        dx = tb.input_grad(g, dz, x, mean, P, Q, R, S)
        runs = [fused_backward(g, x, *args, coefficients)[:5] for _ in range(2)]
    for a, b in zip(runs[0], runs[1]):     # run to run, one variant: bitwise everywhere
        assert torch.equal(a, b)
    # the sums and db2 come from the same compiled kernel in both routes (the small path's
    # weight-gradient launch with SUMS, the large path's kernel B): bitwise everywhere
    assert len(coefficients.sums) == 2 and torch.equal(coefficients.sums[0], sums)
    fdx, fdw1, fdb1, fdw2, fdb2 = runs[0]
    assert torch.equal(fdb2, db2)
    for name, a, b in (('dw1', fdw1, dw1), ('db1', fdb1, db1), ('dw2', fdw2, dw2)):
        if not large or INTERPRETER:
            # small path: the same launch in both routes; numpy evaluates the large path's two
            # variants identically
            assert torch.equal(a, b), name
        else:
            # large path on a GPU: the weight-gradient kernel with FUSE_DX=True and with
            # FUSE_DX=False are two compilations; both read the same scratch, tiles and split
            # order, but the compiler may contract the fp32 accumulation's epilogue into FMAs
            # differently (one rounding, 2^-24, per contraction). 1e-6 of the tensor's scale
            # allows that over the fixed-order reduction of the splits and still catches any
            # real defect (a skipped tile or split gives order-one errors).
            assert rel_err(a, b) <= 1e-6, name
    assert fdx.dtype == dtype and not torch.isnan(fdx).any()
    assert fdx.is_contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
    assert rel_err(fdx, dx) <= (1e-6 if dtype == torch.float32 else 1e-2)


def test_fused_backward_dx_half_is_closer_to_float64_than_two_phase():
    """On the small path phase 2 recomputes dz in fp32 instead of reading it rounded to the
    half dtype, so its dx is at least as accurate as the two-phase route's (measured, fp16)."""
    dtype, shape = torch.float16, (2, 32, 6, 6)
    block = make_block(shape[1], dtype=dtype)
    x = random_input(shape, dtype)
    g = random_input(shape, dtype)
    p, mean, _, cf, _, _, _, l2 = kernel_inputs(block, x)
    coefficients = FixedCoefficients(*(torch.randn(shape[0], shape[1]).to(DEV)
                                       for _ in range(4)))
    with torch.no_grad():
        fdx = fused_backward(g, x, mean, cf.A, cf.B, p.w1, p.b1, p.w2, p.b2, l2, None,
                                coefficients)[0]
        dz = tb.mlp_backward(g, x, mean, cf.A, cf.B, p.w1, p.b1, p.w2, p.b2, l2)[0]
        dx = tb.input_grad(g, dz, x, mean, coefficients.P, coefficients.Q, coefficients.R,
                           coefficients.S)
    dz64 = mlp_truth(block, x, g)[0]
    truth = (pc(coefficients.P) * g.double() + pc(coefficients.Q) * dz64
             + pc(coefficients.R) * (x.double() - pc(mean.double())) + pc(coefficients.S))
    assert rel_err(fdx, truth) <= rel_err(dx, truth) * 1.01
    assert rel_err(fdx, truth) <= 2e-3


@pytest.mark.parametrize('want', [1, 2, 3, 7, 10**6],
                         ids=['one-split', 'samples-grouped', 'split-per-sample',
                              'two-splits-per-sample', 'one-tile-per-split'])
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16], ids=['fp32', 'bf16'])
def test_every_split_layout_gives_the_same_phase1(want, dtype, monkeypatch):
    """The weight-gradient kernel's splits (whole-sample groups, ranges inside a sample, one
    tile each) flush the per-(n, c) sums once per (sample, split) and never straddle samples:
    every layout gives phase 1 within rounding of the others and of float64 autograd, with
    every partial written (NaN-poisoned)."""
    n, c = 3, 16
    real = tb.split_layout
    layouts = []

    def forced(n_, tiles, *_):
        layouts.append(real(n_, tiles, want))
        return layouts[-1]

    monkeypatch.setattr(tb, 'weight_grad_splits', forced)
    block = make_block(c, dtype=dtype)
    x = random_input((n, c, 7, 9), dtype)      # 63 tokens: several tiles, a partial last one
    g = random_input(x.shape, dtype)
    got = run_mlp_backward(block, x, g)
    splits, tps, per_sample, samples = layouts[0]
    assert {1: (1, 3), 2: (2, 2), 3: (3, 1), 7: (6, 1)}.get(want, (splits, 1)) == (
        splits, samples)
    if want == 10**6:
        assert tps == 1
    truth = mlp_truth(block, x, g)
    tol = FP32_TOL if dtype == torch.float32 else 2e-2
    for name, a, t in zip(NAMES, got, truth):
        assert not torch.isnan(a).any(), name
        assert rel_err(a, t) <= tol, name


def test_split_layout_covers_every_tile_once():
    for n in (1, 2, 3, 8):
        for tiles in (1, 2, 5, 16):
            for want in (1, 2, 3, 5, 8, 13, 64, 10**4):
                splits, tps, per_sample, samples = tb.split_layout(n, tiles, want)
                seen = []
                for split in range(splits):            # the kernel's index arithmetic
                    group, part = divmod(split, per_sample)
                    first = group * samples
                    start = first * tiles + part * tps
                    end = min(start + tps, min(first + samples, n) * tiles)
                    assert start < end
                    assert len({i // tiles for i in range(start, end)}) == (
                        1 if per_sample > 1 else min(samples, n - first))
                    seen += range(start, end)
                assert sorted(seen) == list(range(n * tiles)), (n, tiles, want)
                assert (per_sample == 1) or (samples == 1)


def test_outputs_are_nan_poisoned_before_launch():
    """The fixture that makes unwritten elements fail is really in place for the launches."""
    assert torch.isnan(tb._empty((2,), torch.float32, DEV)).all()
    assert torch.isnan(tb._empty_like(torch.zeros(2, 2, 1, 1, device=DEV))).all()


def test_rejects_unsupported_calls_with_clear_errors():
    x = torch.zeros(1, 16, 2, 2, device=DEV)
    nc = torch.zeros(1, 16, device=DEV)
    with pytest.raises(ValueError, match='share one dtype'):
        tb.mlp_backward(x, x.half(), nc, nc, nc, torch.zeros(64, 16, 1, 1, device=DEV),
                        torch.zeros(64, device=DEV), torch.zeros(16, 64, 1, 1, device=DEV),
                        torch.zeros(16, device=DEV), nc)


def test_custom_ops_have_fake_implementations(monkeypatch):
    """torch.library schema and fake-tensor checks (what torch.compile relies on); each path's
    pair of ops (the large path's scratch outputs; with one db1 partial, db1 must not alias
    it), and each refuses the other path's shapes."""
    block = make_block(16, dtype=torch.float32)
    x = random_input((1, 16, 2, 3), torch.float32)
    g = random_input(x.shape, torch.float32)
    p, mean, _, cf, *_ = kernel_inputs(block, x)
    l2 = fold.per_sample_scale(p.ls2, None, 1, torch.float32).contiguous()
    args = tuple(v.detach() for v in (g, x, mean, cf.A, cf.B, p.w1, p.b1, p.w2, p.b2, l2))
    checks = ('test_schema', 'test_faketensor')
    torch.library.opcheck(torch.ops.riformer_triton.mlp_backward, args + (None,),
                          test_utils=checks)
    P = torch.randn(1, 16).to(DEV)
    torch.library.opcheck(torch.ops.riformer_triton.input_grad,
                          (g, g.clone(), x, mean.detach(), P, P, P, P), test_utils=checks)
    fixed = args[2:]
    torch.library.opcheck(torch.ops.riformer_triton.backward_weights_sums,
                          (g, x) + fixed + (None,), test_utils=checks)
    torch.library.opcheck(torch.ops.riformer_triton.backward_dx,
                          (g, x) + fixed + (None, P, P, P, P), test_utils=checks)
    with pytest.raises(ValueError, match="large-C path's"):
        tb.backward_dz(g, x, *fixed, None)
    monkeypatch.setattr(tb, 'SMALL_PATH_MAX_CHANNELS', 0)
    with pytest.raises(ValueError, match="small-C path's"):
        tb.backward_weights_sums(g, x, *fixed, None)
    torch.library.opcheck(torch.ops.riformer_triton.backward_dz, (g, x) + fixed + (None,),
                          test_utils=checks)
    dz, _, _, *scratch = tb.backward_dz(g, x, *fixed, None)
    torch.library.opcheck(torch.ops.riformer_triton.backward_weights_dx,
                          (g, x, dz) + fixed + (None, *scratch, P, P, P, P), test_utils=checks)


def test_launched_variants_at_the_spill_edge_compile_without_spills():
    """The launched variants (Triton's own specialisation of real launch arguments: the GPU build
    report's default mode) of the configs that sat at the spill edge when the report started
    compiling what launches: fp32 dx at C<=64 and C<=128 in NCHW (600 bytes at sm_90 with 4
    warps), the fp32 large-C hidden kernel (4 bytes with BLOCK_K 32), fp32 GEMM 1 (4 bytes at
    T64 in the one-tile 7x7 channels_last case) and fp16 input_grad in NCHW (28 bytes with 4
    warps). The whole list is `python -m riformer_kernels.tools.gpu_build_report` (0 spills,
    no stack)."""
    only = ['_mlp_dx_kernel fp32 nchw T16 C64 ', '_mlp_dx_kernel fp32 nchw T16 C128 ',
            '_mlp_hidden_kernel fp32 nchw', 'mlp_gemm1_kernel fp32 cl', '_input_grad_kernel fp16 nchw']
    env = {k: v for k, v in os.environ.items() if k != 'TRITON_INTERPRET'}
    res = subprocess.run([sys.executable, '-m', 'riformer_kernels.tools.gpu_build_report',
                          '--skip-cuda', '--jobs', '2', '--only', *only], env=env,
                         capture_output=True, text=True, timeout=900,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    print(res.stdout[-4000:], res.stderr[-2000:])
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    rows = [ln.split()[0] for ln in res.stdout.splitlines() if ' sm_' in ln]
    assert set(rows) == {'_mlp_dx_kernel', '_mlp_hidden_kernel', 'mlp_gemm1_kernel',
                         '_input_grad_kernel'}, rows
    assert ' 0 failed' in res.stdout


def find_specs(fn, tn, const, options, ones):
    """GPU_BUILD_SPECS entries of `fn` whose constexprs are `const` plus the arguments `ones` as
    constant 1 (and nothing else), whose io pointers are `tn` and whose options are `options`."""
    want = dict(const, **{k: 1 for k in ones})
    return [s for s in tb.GPU_BUILD_SPECS
            if s[0] is fn and s[2] == want and s[4] == options
            and s[1]['x_ptr' if 'x_ptr' in s[1] else 'p_ptr'] == '*' + tn]


def test_gpu_build_specs_cover_every_launch_configuration():
    """Every configuration the launch rules can pick, for every dtype and activation layout, has
    exactly one spec, with that layout's unit strides as constants."""
    for dtype, tn in tb._TL_NAME.items():
        prec = tb._precision(dtype)
        for layout in ('nchw', 'cl'):
            unit = 't' if layout == 'nchw' else 'c'
            for bc in tb._DX_CONFIGS:
                if bc > tb._pow2_channels(tb._small_path_max(dtype)):
                    assert not [s for s in tb.GPU_BUILD_SPECS if s[0] is tb._mlp_dx_kernel
                                and s[1]['x_ptr'] == '*' + tn and s[1]['w1_ptr'] == '*' + tn
                                and s[2]['BLOCK_C'] == bc]
                    continue
                bt, _, bh, warps, stages = tb._dx_config(bc, dtype, layout)
                const = dict(BLOCK_T=bt, BLOCK_C=bc, BLOCK_H=bh, DOT_F32=False,
                             PRECISION=prec, ROUND_BF16=False, SPLIT=False)
                assert len(find_specs(tb._mlp_dx_kernel, tn, const,
                                      dict(num_warps=warps, num_stages=stages),
                                      (f'sx{unit}', f'sg{unit}', f'sd{unit}'))) == 1
                for has_u in (False, True):
                    u1 = ('suc',) if has_u else ()
                    bt, bh, bw, bk, warps = tb._wg_config(bc, dtype, layout)
                    const = dict(HAS_U=has_u, SCRATCH=False, SUMS=True, FUSE_DX=False,
                                 BLOCK_T=bt, BLOCK_H=bh, BLOCK_W=bw, BLOCK_K=bk, DOT_F32=False,
                                 PRECISION=prec, ROUND_BF16=False, SPLIT=False)
                    # dz and dx are placeholders (x) in this variant: x's unit strides.
                    assert len(find_specs(tb._mlp_weight_grad_kernel, tn, const,
                                          dict(num_warps=warps),
                                          tuple(f's{r}{unit}' for r in 'xgzd') + u1)) == 1
            cfg = tb._large_config(dtype, layout)
            bt, bh, bk, warps, stages = cfg['hidden']
            for has_u in (False, True):
                for tiles1 in ((), ('TILES',)):
                    const = dict(HAS_U=has_u, BLOCK_T=bt, BLOCK_H=bh, BLOCK_K=bk, DOT_F32=False,
                                 PRECISION=prec, ROUND_BF16=False, SPLIT=False)
                    ones = (f'sx{unit}', f'sg{unit}') + (('suc',) if has_u else ()) + tiles1
                    assert len(find_specs(tb._mlp_hidden_kernel, tn, const,
                                          dict(num_warps=warps, num_stages=stages), ones)) == 1
            bt, bc, bh, warps, stages = cfg['dz']
            for tiles1 in ((), ('TILES',)):
                const = dict(BLOCK_T=bt, BLOCK_C=bc, BLOCK_H=bh, DOT_F32=False, PRECISION=prec,
                             ROUND_BF16=False, SPLIT=False)
                assert len(find_specs(tb._mlp_dz_chunk_kernel, tn, const,
                                      dict(num_warps=warps, num_stages=stages),
                                      (f'sx{unit}', f'sg{unit}', f'sz{unit}') + tiles1)) == 1
            bt, bh, bw, warps = cfg['wg']
            for fuse in (False, True):
                const = dict(HAS_U=False, SCRATCH=True, SUMS=False, FUSE_DX=fuse, BLOCK_T=bt,
                             BLOCK_H=bh, BLOCK_W=bw, BLOCK_K=bw, DOT_F32=False, PRECISION=prec,
                             ROUND_BF16=False, SPLIT=False)
                assert len(find_specs(tb._mlp_weight_grad_kernel, tn, const,
                                      dict(num_warps=warps),
                                      tuple(f's{r}{unit}' for r in 'xgzd'))) == 1
            const = dict(BLOCK_T=tb._INPUT_GRAD_BLOCK_T, BLOCK_C=tb._INPUT_GRAD_BLOCK_C,
                         ROUND_BF16=False)
            assert len(find_specs(tb._input_grad_kernel, tn, const,
                                  dict(num_warps=tb._INPUT_GRAD_WARPS),
                                  tuple(f's{r}{unit}' for r in 'gzxd'))) == 1
    # The mixed-precision mode (fp32 activations, half weights; SPLIT): its own spec of every
    # small- and large-path kernel per dot dtype and layout, on the half configs.
    for dtype, tn in ((torch.float16, 'fp16'), (torch.bfloat16, 'bf16')):
        for layout in ('nchw', 'cl'):
            mixed = [s for s in tb.GPU_BUILD_SPECS if s[1].get('x_ptr') == '*fp32'
                     and s[1].get('w1_ptr') == '*' + tn and (s[2].get('sxt') == 1) == (
                         layout == 'nchw')]
            assert mixed and all(s[2]['SPLIT'] and s[1]['dx_ptr' if 'dx_ptr' in s[1] else
                                                        'x_ptr'] == '*fp32' for s in mixed)
            assert {s[0] for s in mixed} == {tb._mlp_dx_kernel, tb._mlp_weight_grad_kernel,
                                             tb._mlp_hidden_kernel, tb._mlp_dz_chunk_kernel}
            assert len(mixed) == len([s for s in tb.GPU_BUILD_SPECS
                                      if s[1].get('x_ptr') == '*' + tn
                                      and s[0] is not tb._input_grad_kernel
                                      and (s[2].get('sxt') == 1) == (layout == 'nchw')])
    for fn, sig, const, desc, options in tb.GPU_BUILD_SPECS:
        assert set(options) <= {'num_warps', 'num_stages'}
        assert list(sig) == fn.arg_names
        assert all(sig[k] == 'constexpr' for k in const)
        assert ('/cl ' in desc) == any(const.get(k) == 1 for k in ('sxc', 'sgc')), desc
    assert len({s[3] for s in tb.GPU_BUILD_SPECS}) == len(tb.GPU_BUILD_SPECS)


def record_launches(monkeypatch):
    """Wraps every kernel of the module: each launch is recorded as (jit fn, positional
    (runtime) arguments, keyword arguments), then run."""
    from triton.backends.compiler import BaseBackend
    from triton._C.libtriton import native_specialize_impl

    launches = []

    class Recorder:
        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.append((self.fn, args, kwargs))
                return self.fn[grid](*args, **kwargs)
            return launch

    for name in tb._STRIDE_ARGS:
        monkeypatch.setattr(tb, name, Recorder(getattr(tb, name)))

    def specialised_ones(args, fn):
        """The runtime arguments Triton's launcher turns into the constant 1 (its own rule,
        with do_not_specialize as the compiled kernel declares it)."""
        keep = set(tb.WEIGHT_GRAD_RUNTIME_INTS if fn.__name__ == '_mlp_weight_grad_kernel'
                   else ())
        return {k for k, v in zip(fn.arg_names, args)
                if isinstance(v, int) and not isinstance(v, bool)
                and native_specialize_impl(BaseBackend, v, False, k not in keep,
                                           True)[0] == 'constexpr'}

    return launches, specialised_ones


LAUNCH_CASES = [
    # (dtype, C, (H, W), x channels_last, g channels_last, u_saved layout or None, large path)
    (torch.float32, 48, (6, 6), False, False, None, False),
    (torch.float32, 16, (6, 6), True, False, 'nchw', False),       # mixed layouts: normalised
    (torch.float16, 16, (6, 6), True, True, None, False),
    (torch.float16, 48, (6, 6), False, False, 'cl', False),
    (torch.bfloat16, 48, (6, 6), True, True, 'cl', False),
    (torch.float32, 80, (9, 8), False, False, 'cl', True),
    (torch.float32, 80, (7, 7), True, True, None, True),            # TILES == 1 in A and B
    (torch.float16, 80, (9, 8), True, False, None, True),
    (torch.bfloat16, 80, (7, 7), False, False, 'cl', True),
]


@pytest.mark.parametrize('case', LAUNCH_CASES, ids=lambda c: (
    f"{tb._TL_NAME[c[0]]}-C{c[1]}-{c[2][0]}x{c[2][1]}-x{'cl' if c[3] else 'nchw'}"
    f"-g{'cl' if c[4] else 'nchw'}-u{c[5]}{'-large' if c[6] else ''}"))
def test_gpu_build_specs_are_the_kernels_launched(case, monkeypatch):
    """Each launch (representative shapes: no size equal to 1) is exactly one spec: same
    constexprs and options, and the spec's constant-1 arguments are exactly the runtime
    arguments Triton's launcher specialises to 1 (native_specialize_impl, the launcher's own
    rule). The interpreter-only flags DOT_F32 / ROUND_BF16 are False on a GPU."""
    dtype, c, (hh, ww), x_cl, g_cl, u_layout, large = case
    k = {name: getattr(tb, name) for name in tb._STRIDE_ARGS}      # before the recorders
    launches, specialised_ones = record_launches(monkeypatch)
    monkeypatch.setattr(tb, '_WEIGHT_GRAD_PROGRAMS', 1)    # several token tiles per split
    if large:
        monkeypatch.setattr(tb, 'SMALL_PATH_MAX_CHANNELS', 0)
    shape = (2, c, hh, ww)
    block = make_block(c, dtype=dtype)
    x = random_input(shape, dtype, x_cl)
    g = random_input(shape, dtype, g_cl)
    u = None
    if u_layout is not None:
        p, mean, _, cf, *_ = kernel_inputs(block, x)
        with torch.no_grad():
            u = F.conv2d((pc(cf.A) * x.to(mean.dtype) + pc(cf.B)).to(dtype), p.w1, p.b1)
        u = u.contiguous(memory_format=torch.channels_last if u_layout == 'cl'
                         else torch.contiguous_format)
    p, mean, _, cf, _, _, _, l2 = kernel_inputs(block, x)
    with torch.no_grad():
        dz = tb.mlp_backward(g, x, mean, cf.A, cf.B, p.w1, p.b1, p.w2, p.b2, l2, u)[0]
        P = torch.randn(2, c).to(DEV)
        tb.input_grad(g, dz, x, mean, P, P, P, P)
        args = (mean, cf.A, cf.B, p.w1, p.b1, p.w2, p.b2, l2, u)      # the fused backward
        fused_backward(g, x, *args, FixedCoefficients(P, P, P, P))
    modes = [(kw['SUMS'], kw['FUSE_DX']) for fn, _, kw in launches
             if fn is k['_mlp_weight_grad_kernel']]
    assert modes == ([(False, False), (False, True)] if large else [(True, False)] * 2)
    path = (('_mlp_hidden_kernel', '_mlp_dz_chunk_kernel') if large else ('_mlp_dx_kernel',))
    assert {fn for fn, _, _ in launches} == {k[name] for name in path + (
        '_mlp_weight_grad_kernel', '_input_grad_kernel', '_sum_partials_kernel')}
    tn = tb._TL_NAME[dtype]
    for fn, args, kwargs in launches:
        options = {k: kwargs[k] for k in ('num_warps', 'num_stages') if k in kwargs}
        const = {k: v for k, v in kwargs.items() if k not in options}
        const.update({k: False for k in ('DOT_F32', 'ROUND_BF16') if k in const})
        ones = specialised_ones(args, fn)
        matches = find_specs(fn, 'fp32' if fn is k['_sum_partials_kernel'] else tn, const,
                             options, ones)
        assert len(matches) == 1, (fn.__name__, const, options, sorted(ones))
        spec_fn, sig, spec_const, desc, _ = matches[0]
        runtime = set(fn.arg_names[:len(args)])
        assert {a for a in runtime if spec_const.get(a) == 1} == ones, desc
        for a, v in zip(fn.arg_names, args):      # the rest of the signature as launched
            if isinstance(v, torch.Tensor):
                assert sig[a] == '*' + tb._TL_NAME[v.dtype], (desc, a)
            elif a not in ones:
                assert sig[a] == 'i32' and -2**31 <= v < 2**31, (desc, a)


@pytest.mark.parametrize('deploy', [False, True], ids=['training-form', 'deploy-form'])
def test_triton_backend_block_gradients_with_these_kernels(deploy, monkeypatch):
    """End to end through the triton backend's autograd Function with its fused backward
    switched to this module: every gradient vs the float64 reference block."""
    block = make_block(16, deploy=deploy, dtype=torch.float32)
    x = random_input((2, 16, 3, 5), torch.float32, channels_last=True)
    g = random_input(x.shape, torch.float32)
    _, got = run_block(block, x, 'triton', g)
    truth = block_grads_reference(block, x, g)
    for name in truth:
        assert rel_err(got[name], truth[name]) <= FP32_TOL, name


# ---------------------------------------------------------------------------------------------
# large-C path (C > SMALL_PATH_MAX_CHANNELS): kernels A (hidden), B (dz chunk), W (scratch)

@pytest.fixture
def large_path_calls(monkeypatch):
    """Counts the large path's launches; `force()` also sends every C down the large path."""
    class Calls(list):
        def force(self):
            monkeypatch.setattr(tb, 'SMALL_PATH_MAX_CHANNELS', 0)

    calls = Calls()
    phase1_large = tb._phase1_large

    def spy(a):
        calls.append(a['c'])
        return phase1_large(a)

    monkeypatch.setattr(tb, '_phase1_large', spy)
    return calls


def test_path_rule():
    assert tb.SMALL_PATH_MAX_CHANNELS == 256 and tb.SMALL_PATH_MAX_CHANNELS_FP32 == 128
    for dtype in (torch.float16, torch.bfloat16):
        assert not tb._large_path(256, dtype)
        for c in (257, 320, 384, 512, 768):
            assert tb._large_path(c, dtype)
    # fp32: BLOCK_C=256 of the small path spilled compiled as launched (NCHW)
    assert not tb._large_path(128, torch.float32)
    for c in (129, 192, 256, 320):
        assert tb._large_path(c, torch.float32)


@pytest.mark.parametrize('c,channels_last,u_saved', [(320, False, False), (384, True, True)],
                         ids=['C320-nchw', 'C384-channels_last-u_saved'])
def test_large_path_fp32_matches_float64_autograd(c, channels_last, u_saved, large_path_calls):
    shape = (1, c, 3, 3)
    block = make_block(c, dtype=torch.float32)
    x = random_input(shape, torch.float32, channels_last)
    g = random_input(shape, torch.float32)
    u = None
    if u_saved:     # fc1's output as the forward saves it (recompute=False), channels_last
        p, mean, _, cf, *_ = kernel_inputs(block, x)
        with torch.no_grad():
            u = F.conv2d((pc(cf.A) * x + pc(cf.B)).float(), p.w1, p.b1)
        u = u.contiguous(memory_format=torch.channels_last)
    got = run_mlp_backward(block, x, g, u_saved=u)
    assert large_path_calls == [c]
    assert got[0].is_contiguous(memory_format=torch.channels_last) == channels_last
    for name, a, b in zip(NAMES, got, mlp_truth(block, x, g)):
        assert a.dtype == (x.dtype if name == 'dz' else torch.float32), name
        assert rel_err(a, b) <= FP32_TOL, name


@pytest.mark.parametrize('dtype,c', [(torch.float16, 320), (torch.bfloat16, 384)],
                         ids=['fp16-C320', 'bf16-C384'])
def test_large_path_half_within_twice_torch_error(dtype, c, large_path_calls):
    """h and du go through the scratch in the compute dtype: still within twice torch's own
    error in that dtype (torch rounds its h and du tensors to the same dtype)."""
    shape = (1, c, 3, 3)
    block = make_block(c, dtype=dtype)
    x = random_input(shape, dtype, channels_last=True)
    g = random_input(shape, dtype)
    got = run_mlp_backward(block, x, g)
    assert large_path_calls == [c]
    truth = mlp_truth(block, x, g)
    torch_same_dtype = mlp_truth(block, x, g, dtype=dtype)
    for name, a, b, ref in zip(NAMES, got, truth, torch_same_dtype):
        assert a.dtype == (dtype if name == 'dz' else torch.float32), name
        assert rel_err(a, b) <= 2 * rel_err(ref, b), name


@pytest.mark.parametrize('dtype,channels_last,u_saved', [
    pytest.param(torch.float32, False, False, id='fp32-nchw'),
    pytest.param(torch.float32, True, True, id='fp32-channels_last-u_saved'),
    pytest.param(torch.float16, True, False, id='fp16-channels_last'),
])
def test_large_path_forced_on_small_c_equals_small_path(dtype, channels_last, u_saved,
                                                        large_path_calls):
    """C=48 (a partial channel chunk in B, two in fp32 W), 9x8 tokens (two token tiles of
    kernels A and B, three token tiles per sample in W), one sample dropped by drop path: the
    large path against the small path and against float64 autograd."""
    shape = (2, 48, 9, 8)
    dp2 = torch.tensor([0.0, 2.0], device=DEV)
    block = make_block(shape[1], dtype=dtype)
    x = random_input(shape, dtype, channels_last)
    g = random_input(shape, dtype)
    u = None
    if u_saved:
        p, mean, _, cf, *_ = kernel_inputs(block, x)
        with torch.no_grad():
            u = F.conv2d((pc(cf.A) * x.to(mean.dtype) + pc(cf.B)).to(dtype), p.w1, p.b1)
    small = run_mlp_backward(block, x, g, dp2=dp2, u_saved=u)
    assert large_path_calls == []
    large_path_calls.force()
    large = run_mlp_backward(block, x, g, dp2=dp2, u_saved=u)
    assert large_path_calls == [48]
    assert torch.equal(large[0][0], torch.zeros_like(large[0][0]))     # dropped sample
    assert large[0].is_contiguous(memory_format=torch.channels_last) == channels_last
    truth = mlp_truth(block, x, g, dp2=dp2.double())
    if dtype == torch.float32:
        for name, a, b, t in zip(NAMES, large, small, truth):
            assert rel_err(a, b) <= 1e-5, name
            assert rel_err(a, t) <= FP32_TOL, name
    else:
        torch_same_dtype = mlp_truth(block, x, g, dp2=dp2.double(), dtype=dtype)
        for name, a, b, t, ref in zip(NAMES, large, small, truth, torch_same_dtype):
            # same roundings of h and du as the small path; only summation orders differ
            assert rel_err(a, b) <= 5e-3, name
            assert rel_err(a, t) <= 2 * rel_err(ref, t), name


def test_large_path_two_runs_are_bitwise_equal_and_scratch_is_poisoned(large_path_calls,
                                                                        monkeypatch):
    """No atomics and fixed-order reductions (6 token splits in W, 4 db1 partials from A, 4
    token tiles in B); every buffer, the (N, 4C, T) scratch included, comes from `_empty`
    (NaN-filled by the autouse fixture), so an element a kernel fails to write fails the
    float64 comparison."""
    shape = (2, 48, 9, 8)
    allocated = []
    poisoned_empty = tb._empty

    def empty(shape, dtype, device):
        allocated.append((tuple(shape), dtype))
        return poisoned_empty(shape, dtype, device)

    monkeypatch.setattr(tb, '_empty', empty)
    large_path_calls.force()
    block = make_block(shape[1], dtype=torch.float32)
    x = random_input(shape, torch.float32)
    g = random_input(shape, torch.float32)
    first = run_mlp_backward(block, x, g)
    n_alloc = len(allocated)
    second = run_mlp_backward(block, x, g)
    assert large_path_calls == [48, 48]
    scratch = ((2, 192, 72), torch.float32)
    assert allocated[:n_alloc].count(scratch) == 2
    for name, a, b, t in zip(NAMES, first, second, mlp_truth(block, x, g)):
        assert torch.equal(a, b), name
        assert rel_err(a, t) <= FP32_TOL, name


def test_large_path_block_gradients_match_reference_float64(large_path_calls):
    """The whole block backward (phase 1 on the large path, coefficients, phase 2) against
    autograd of the reference block, training form with drop path, channels_last."""
    large_path_calls.force()
    n, c = 4, 16
    block = make_block(c, dtype=torch.float32, drop_path=0.5)
    x = random_input((n, c, 3, 3), torch.float32, channels_last=True)
    g = random_input(x.shape, torch.float32)
    seed, dp1, dp2 = factors_with_zeros(n)
    truth = block_grads_reference(block, x, g, seed)
    got = full_backward_with_kernels(block, x, g, dp1.float(), dp2.float())
    assert large_path_calls == [c]
    assert set(got) == set(truth)
    for name in truth:
        assert rel_err(got[name].reshape(truth[name].shape), truth[name]) <= FP32_TOL, name


# ---------------------------------------------------------------------------------------------
# the kernel-test device, and what only compiled kernels on a GPU can show

def test_this_module_builds_on_the_kernel_device():
    """The module's blocks, inputs and drop-path factors are on KERNEL_DEVICE, which is CUDA
    whenever torch sees a GPU (unless RIFORMER_TEST_DEVICE says otherwise)."""
    x, block = random_input((1, 4, 2, 2)), make_block(4)
    dp1, _ = sample_factors(2, 0)
    assert x.device.type == block.mlp.fc1.weight.device.type == dp1.device.type == DEV.type
    if torch.cuda.is_available() and not os.environ.get('RIFORMER_TEST_DEVICE'):
        assert DEV.type == 'cuda'
    assert tb.INTERPRET == INTERPRETER


@pytest.mark.gpu
@pytest.mark.parametrize('seed', [0, 1, 2])
@pytest.mark.parametrize('channels_last', [False, True], ids=['nchw', 'channels_last'])
@pytest.mark.parametrize('c', [32, 256, 320], ids=lambda c: f'C{c}')
@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16], ids=['fp16', 'bf16'])
def test_gpu_mlp_backward_half_within_twice_torch_error(dtype, c, channels_last, seed):
    """Native half-precision dots and stores (the interpreter runs bf16 dots in fp32 and keeps
    z, dO, du and h unrounded there, so it measures a more accurate backward than the GPU's):
    phase 1 within twice torch's own error in that dtype, several draws, both layouts, the small
    path (C=32, and C=256 at its edge) and the large one (C=320)."""
    torch.manual_seed(seed)
    shape = (2, c, 14, 14)
    block = make_block(c, dtype=dtype)
    x = random_input(shape, dtype, channels_last)
    g = random_input(shape, dtype, channels_last)
    assert x.is_cuda and not tb.INTERPRET
    assert tb._large_path(c, dtype) == (c > 256)
    got = run_mlp_backward(block, x, g)
    truth = mlp_truth(block, x, g)
    torch_same_dtype = mlp_truth(block, x, g, dtype=dtype)
    assert got[0].is_contiguous(memory_format=torch.channels_last) == channels_last
    for name, a, b, ref in zip(NAMES, got, truth, torch_same_dtype):
        assert a.dtype == (dtype if name == 'dz' else torch.float32), name
        assert rel_err(a, b) <= 2 * rel_err(ref, b), name
