"""The CUDA backward kernels (csrc/cuda/mlp_backward_kernels.cuh) under the SIMT emulator.

Two levels:

* the kernels through their wrappers (`cuda_emu.mlp_backward_weights_and_sums`,
  `cuda_emu.mlp_backward_dx`), in this process, against float64 autograd of the folded MLP
  formula computed from the very values the kernels read (rounded to the dtype): every output
  of phase 1 (dW1, db1, dW2, db2, the five per-(n,c) sums) and phase 2 (dx), on shapes that hit
  the edges (odd C, H*W = 1, N = 1, a partial last token tile, several channel chunks, a partial
  hidden chunk, splits of several tiles, saved u);
* the `cuda` kernel set through the pipeline (RIFORMER_CUDA_EMULATE=1, which tests/helpers.py
  sets where there is no GPU): every gradient of a block, both forms, both memory modes,
  against the float64 reference; drop path with a dropped sample; fp16/bf16 within twice the
  reference's own error over several draws; bitwise determinism; torch.compile(fullgraph) of a
  training step.

Every output the wrappers return starts as NaN (and so does the phase-1 scratch), and rel_err
refuses non-finite values, so an element a kernel fails to write fails the test. Inputs are
random draws, never zeros or ones. Shapes are small: the emulator runs every thread as a fiber.
Skips only when g++ is missing.
"""
import copy

import helpers
import pytest
import torch
from helpers import make_block, random_input, rel_err

import riformer_kernels as rk
import riformer_kernels.block as block_module
from riformer_kernels import fold
from riformer_kernels.backends import cuda_emu

pytestmark = pytest.mark.skipif(cuda_emu.compiler() is None,
                                reason='g++ not found: the emulated CUDA build compiles with it')

# Kernel level: fp32 FFMA sums of at most a few hundred terms per output, against the fp64
# truth of the same rounded inputs: ~1e-7 measured; 1e-5 is the fp32 budget the forward kernels
# are held to. fp64: rounding only.
KERNEL_TOL = {torch.float32: 1e-5, torch.float64: 1e-12}
# Block level (issue 12): fp32 gradients within 1e-4 of the fp64 reference, as for triton/cpu.
FP32_TOL = 1e-4
# fp64 blocks: the fold's algebra against the module-by-module reference, both in fp64.
FP64_TOL = 1e-10


@pytest.fixture(scope='module', autouse=True)
def emu():
    cuda_emu.library()  # build (or load from the cache) once for the module
    cuda_emu.set_seed(5)


# ---------------------------------------------------------------------------------------------
# kernel level

def _inputs(n, c, hd, h, w, dtype, channels_last, seed=0):
    """x, g, (mean, A, B, l2), (w1, b1, w2, b2), (P, Q, R, S): random, of order one."""
    gen = torch.Generator().manual_seed(seed * 7919 + c * 31 + hd + n)
    sd = fold.stats_dtype(dtype)

    def rnd(*shape, scale=1.0, shift=0.0):
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale + shift

    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = (rnd(n, c, h, w, scale=1.5, shift=0.3)).to(dtype).contiguous(memory_format=fmt)
    g = rnd(n, c, h, w).to(dtype).contiguous(memory_format=fmt)
    coeffs = [rnd(n, c, scale=0.3, shift=0.3), rnd(n, c, scale=0.4, shift=0.8),
              rnd(n, c, scale=0.5), rnd(n, c, scale=0.5, shift=1.0)]
    weights = [rnd(hd, c, scale=c ** -0.5), rnd(hd, scale=0.5), rnd(c, hd, scale=hd ** -0.5),
               rnd(c, scale=0.5)]
    pqrs = [rnd(n, c) for _ in range(4)]
    return (x, g, [t.to(sd) for t in coeffs], [t.to(dtype) for t in weights],
            [t.to(sd) for t in pqrs])


def _truth(x, g, coeffs, weights, pqrs):
    """float64 autograd of sum(g * l2 * o), o = W2 GELU(W1 (A x + B) + b1) + b2, and the
    derived phase-1 sums and phase-2 dx: (dw1, db1, dw2, db2, sums, dx, u)."""
    x, g = x.double(), g.double()
    mean, A, B, l2 = (t.double()[:, :, None, None] for t in coeffs)
    P, Q, R, S = (t.double()[:, :, None, None] for t in pqrs)
    w1, b1, w2, b2 = (t.double().requires_grad_(True) for t in weights)
    z = (A * x + B).requires_grad_(True)
    u = torch.nn.functional.conv2d(z, w1[:, :, None, None], b1)
    o = torch.nn.functional.conv2d(torch.nn.functional.gelu(u), w2[:, :, None, None], b2)
    (g * l2 * o).sum().backward()
    xc = x - mean
    dz = z.grad
    sums = torch.stack([g.sum((2, 3)), (g * xc).sum((2, 3)), dz.sum((2, 3)),
                        (dz * xc).sum((2, 3)), (g * o).sum((2, 3))])
    dx = P * g + Q * dz + R * xc + S
    return w1.grad, b1.grad, w2.grad, b2.grad, sums.detach(), dx.detach(), u.detach()


def _run(x, g, coeffs, weights, pqrs, u=None, tiles_per_split=0, kernel='auto'):
    mean, A, B, l2 = coeffs
    phase1 = cuda_emu.mlp_backward_weights_and_sums(g, x, mean, A, B, l2, *weights, u=u,
                                                    tiles_per_split=tiles_per_split,
                                                    kernel=kernel)
    dx = cuda_emu.mlp_backward_dx(g, x, mean, A, B, l2, *weights, *pqrs, u=u, kernel=kernel)
    return (*phase1, dx)


NAMES = ('dw1', 'db1', 'dw2', 'db2', 'sums', 'dx')

KERNEL_CASES = [  # (N, C, hidden, H, W, tiles_per_split)
    (1, 16, 64, 5, 7, 0),    # T = 35: a partial second tile
    (2, 5, 20, 3, 3, 0),     # odd C, fewer hidden units than a chunk
    (1, 80, 72, 6, 7, 0),    # two channel chunks (the second partial), a partial hidden chunk
    (2, 16, 64, 1, 1, 0),    # H*W = 1
    (2, 8, 32, 9, 8, 2),     # T = 72: 3 tiles a sample, splits of 2: the middle one spans two
    (3, 16, 64, 5, 7, 3),    # 2 tiles a sample, splits of 3 tiles across sample boundaries
    (4, 8, 32, 3, 3, 3),     # one tile a sample: a split holds three whole samples
]


@pytest.mark.parametrize('channels_last', [False, True], ids=['nchw', 'channels_last'])
@pytest.mark.parametrize('case', KERNEL_CASES, ids=lambda c: 'x'.join(map(str, c)))
def test_backward_kernels_fp32_fp64(case, channels_last):
    n, c, hd, h, w, tps = case
    for dtype in (torch.float32, torch.float64):
        args = _inputs(n, c, hd, h, w, dtype, channels_last)
        got = _run(*args, tiles_per_split=tps)
        truth = _truth(*args)
        sd = fold.stats_dtype(dtype)
        for name, a, b in zip(NAMES, got, truth):
            assert a.dtype == (dtype if name == 'dx' else sd), name
            assert rel_err(a, b) <= KERNEL_TOL[dtype], (dtype, name, rel_err(a, b))
        assert got[-1].stride() == args[0].stride()   # dx in x's layout


@pytest.mark.parametrize('u_layout', ['channels_last', 'nchw'])
def test_backward_kernels_read_saved_u(u_layout):
    # recompute=False: u comes from the saved tensor (any of the two layouts), not from W1 z.
    args = _inputs(2, 16, 72, 5, 7, torch.float32, channels_last=True)
    truth = _truth(*args)
    u = truth[-1].float()
    u = u.contiguous(memory_format=torch.channels_last) if u_layout == 'channels_last' else u
    got = _run(*args, u=u)
    for name, a, b in zip(NAMES, got, truth):
        assert rel_err(a, b) <= KERNEL_TOL[torch.float32], (name, rel_err(a, b))
    # ... and it is really read: another u gives other gradients.
    other = _run(*args, u=u + 0.5)
    for name, a, b in zip(NAMES, other, got):
        if name != 'db2':   # db2 = sum l2 g does not involve u
            assert rel_err(a, b) > 1e-3, name


HALF_KERNEL_CASES = [  # (N, C, hidden, H, W, tiles_per_split)
    (2, 16, 64, 5, 7, 0),
    (1, 80, 96, 3, 3, 0),  # two channel chunks, a partial hidden chunk of whole k-steps
    (3, 16, 64, 5, 7, 3),  # splits across sample boundaries (several flushes per CTA)
]


@pytest.mark.parametrize('kernel', ['ffma', 'mma'])
@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
@pytest.mark.parametrize('seed', [0, 1, 2])
@pytest.mark.parametrize('case', HALF_KERNEL_CASES, ids=lambda c: 'x'.join(map(str, c)))
def test_backward_kernels_half_within_twice_reference_error(case, seed, dtype, kernel):
    # The reference's own error: the same computation in torch ops in `dtype` (autograd of the
    # half formula); the kernels accumulate in fp32 from the same half inputs (the mma kernels
    # round their GEMM operands to `dtype` first, as the reference does).
    *shape, tps = case
    args = _inputs(*shape, dtype, channels_last=bool(seed % 2), seed=seed)
    truth = _truth(*args)
    x, g, coeffs, weights, pqrs = args
    mean, A, B, l2 = (t.to(dtype)[:, :, None, None] for t in coeffs)
    P, Q, R, S = (t.to(dtype)[:, :, None, None] for t in pqrs)
    w1, b1, w2, b2 = (t.detach().clone().requires_grad_(True) for t in weights)
    z = (A * x + B).detach().requires_grad_(True)
    u = torch.nn.functional.conv2d(z, w1[:, :, None, None], b1)
    o = torch.nn.functional.conv2d(torch.nn.functional.gelu(u), w2[:, :, None, None], b2)
    (g * l2 * o).sum().backward()
    xc = x - mean
    ref = (w1.grad, b1.grad, w2.grad, b2.grad,
           torch.stack([g.sum((2, 3)), (g * xc).sum((2, 3)), z.grad.sum((2, 3)),
                        (z.grad * xc).sum((2, 3)), (g * o).sum((2, 3))]),
           P * g + Q * z.grad + R * xc + S)
    got = _run(*args, kernel=kernel, tiles_per_split=tps)
    for name, a, r, t in zip(NAMES, got, ref, truth):
        err, ref_err = rel_err(a, t), rel_err(r.detach(), t)
        assert err <= 2 * ref_err, (name, err, ref_err)
    # dx is stored in the half dtype: it cannot beat a fraction of its ulp (not vacuous)
    assert rel_err(got[-1], truth[-2]) >= 0.05 * torch.finfo(dtype).eps


MIXED_KERNEL_CASES = [  # (N, C, hidden, H, W, tiles_per_split, channels_last)
    (2, 16, 64, 5, 7, 0, False),
    (1, 80, 72, 3, 3, 0, True),   # two channel chunks, a partial hidden chunk
    (3, 16, 64, 5, 7, 3, True),   # splits across sample boundaries
]


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
@pytest.mark.parametrize('case', MIXED_KERNEL_CASES, ids=lambda c: 'x'.join(map(str, c[:6])))
def test_backward_kernels_mixed_precision(case, dtype):
    """The mixed-precision mode (autocast): fp32 x, g, dx and biases, w1 / w2 (and a saved u)
    in a half dtype. The FFMA kernels run it (the mma kernels take half activations only) and
    round nothing: against the fp64 truth of the same rounded weights, the fp32 budget; with a
    saved half u, GELU and GELU' see u rounded once, nothing else (within one eps)."""
    *shape, tps, channels_last = case
    x, g, coeffs, weights, pqrs = _inputs(*shape, torch.float32, channels_last)
    weights = [weights[0].to(dtype), weights[1], weights[2].to(dtype), weights[3]]
    args = (x, g, coeffs, weights, pqrs)
    truth = _truth(*args)
    assert cuda_emu.mlp_backward_kernel(shape[1], shape[2], torch.float32) == 'ffma'
    got = _run(*args, tiles_per_split=tps)
    for name, a, b in zip(NAMES, got, truth):
        assert a.dtype == torch.float32, name
        assert rel_err(a, b) <= KERNEL_TOL[torch.float32], (dtype, name, rel_err(a, b))
    assert got[-1].stride() == x.stride()
    u = truth[-1].to(dtype).contiguous(memory_format=torch.channels_last)
    saved = _run(*args, u=u, tiles_per_split=tps)
    # The saved u's single rounding (<= eps/2 per element) carried through GELU and GELU':
    # measured at most 0.27 eps (fp16) and 0.22 eps (bf16) over these cases.
    for name, a, b in zip(NAMES, saved, truth):
        assert rel_err(a, b) <= torch.finfo(dtype).eps, (dtype, name, rel_err(a, b))
    with pytest.raises(ValueError, match='u is .* expected .*' + str(dtype).split('.')[-1]):
        _run(*args, u=truth[-1].float())          # u must be in the weights' dtype
    with pytest.raises(ValueError, match='mma backward kernels'):
        _run(*args, kernel='mma')                 # fp32 activations: FFMA only


def test_backward_kernels_bitwise_deterministic():
    # No atomics; every output summed by one thread in a fixed order: two runs, and a run with
    # another emulator scheduling seed, give the same bits. Two channel chunks, several hidden
    # chunks and splits of several tiles, so the reductions have many terms.
    args = _inputs(2, 80, 136, 9, 8, torch.float32, channels_last=False)   # splits span samples
    cuda_emu.set_seed(1)
    first = _run(*args, tiles_per_split=2)
    again = _run(*args, tiles_per_split=2)
    cuda_emu.set_seed(977)
    other_seed = _run(*args, tiles_per_split=2)
    cuda_emu.set_seed(5)
    for name, a, b, c in zip(NAMES, first, again, other_seed):
        assert torch.equal(a, b) and torch.equal(a, c), name


def test_backward_mma_kernels_deterministic_and_read_saved_u():
    # The tensor-core kernels: the same fixed orders (two runs and another scheduling seed give
    # the same bits), and recompute=False reads u (checked against the truth, and against
    # another u).
    args = _inputs(2, 80, 96, 9, 8, torch.bfloat16, channels_last=True)
    cuda_emu.set_seed(1)
    first = _run(*args, tiles_per_split=2, kernel='mma')   # the middle split spans two samples
    cuda_emu.set_seed(977)
    other_seed = _run(*args, tiles_per_split=2, kernel='mma')
    cuda_emu.set_seed(5)
    for name, a, b in zip(NAMES, first, other_seed):
        assert torch.equal(a, b), name
    truth = _truth(*args)
    u = truth[-1].to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    with_u = _run(*args, u=u, kernel='mma')
    for name, a, b, t in zip(NAMES, with_u, first, truth):
        # saved u is rounded to bf16 like the recomputed GEMM operands: the same error class
        assert rel_err(a, t) <= 2 * max(rel_err(b, t), torch.finfo(torch.bfloat16).eps), name
    other = _run(*args, u=u + 0.5, kernel='mma')
    assert rel_err(other[0], with_u[0]) > 1e-2   # dw1 changed: u was read


def test_backward_kernel_choice_and_mma_refusals():
    assert cuda_emu.mlp_backward_kernel(16, 64, torch.float16) == 'mma'
    assert cuda_emu.mlp_backward_kernel(16, 80, torch.bfloat16) == 'mma'   # a partial chunk
    assert cuda_emu.mlp_backward_kernel(16, 72, torch.bfloat16) == 'ffma'  # 72 = 4.5 x 16
    assert cuda_emu.mlp_backward_kernel(20, 80, torch.float16) == 'ffma'   # C % 16 != 0
    assert cuda_emu.mlp_backward_kernel(16, 64, torch.float32) == 'ffma'
    args = _inputs(1, 20, 80, 3, 3, torch.float16, False)
    with pytest.raises(ValueError, match='multiples of 16'):
        _run(*args, kernel='mma')
    with pytest.raises(ValueError, match='unknown MLP backward kernel'):
        _run(*args, kernel='wmma')
    # A weight view starting one element into its storage: copied, not read misaligned.
    x, g, coeffs, (w1, b1, w2, b2), pqrs = _inputs(1, 16, 64, 3, 3, torch.float16, False)
    w1v = torch.cat([w1.new_zeros(1), w1.reshape(-1)])[1:].view(64, 16)
    assert w1v.data_ptr() % 4 != 0
    got = _run(x, g, coeffs, (w1v, b1, w2, b2), pqrs, kernel='mma')
    for a, b in zip(got, _run(x, g, coeffs, (w1, b1, w2, b2), pqrs, kernel='mma')):
        assert torch.equal(a, b)


def test_split_plan_depends_on_the_shape_only():
    # Splits are runs of tiles of the flattened (sample, tile) order, tiles_per_split the larger
    # of the bytes rule (partials at most half of |x|: 2 Hd acc / (32 r scalar) tiles) and the
    # parallel rule (no more splits than give 528 phase-1 CTAs). S12 stage 1 (N = 64, C = 64,
    # 56 x 56, 98 tiles a sample, 4 CTAs a split): bytes 32, parallel 47 -> 47; stage 2
    # (C = 128, 28 x 28, 25 tiles, 16 CTAs a split): bytes 64, parallel 48 -> 64; stage 4
    # (C = 512, 7 x 7, 2 tiles, 256 CTAs a split): bytes 256 > all 128 tiles -> one split.
    f32 = torch.float32
    assert cuda_emu.mlp_backward_splits(64, 3136, 64, 256, f32) == -(-64 * 98 // 47)
    assert cuda_emu.mlp_backward_splits(64, 784, 128, 512, f32) == -(-64 * 25 // 64)
    assert cuda_emu.mlp_backward_splits(64, 49, 512, 2048, f32) == 1
    # Few samples: the scratch cap wins over parallelism (N = 1 at stage 1: 98 tiles, 32 a
    # split, 16 CTAs; the parallel rule alone would make 98 one-tile splits, 16 |x| of partials)
    assert cuda_emu.mlp_backward_splits(1, 3136, 64, 256, f32) == -(-98 // 32)
    assert cuda_emu.mlp_backward_splits(2, 35, 16, 64, f32) == 1
    assert cuda_emu.mlp_backward_splits(2, 72, 8, 32, f32, 2) == 3   # override: 6 tiles / 2
    # bf16 inputs with fp32 partials: the bytes rule wants 64 tiles a split at stage 1
    assert cuda_emu.mlp_backward_splits(64, 3136, 64, 256, torch.bfloat16) == -(-64 * 98 // 64)


def test_backward_wrappers_reject_bad_input():
    x, g, (mean, A, B, l2), (w1, b1, w2, b2), pqrs = _inputs(1, 8, 32, 3, 3, torch.float32, False)
    p1 = cuda_emu.mlp_backward_weights_and_sums
    with pytest.raises(TypeError, match='torch.Tensor'):
        p1([1.0], x, mean, A, B, l2, w1, b1, w2, b2)
    with pytest.raises(ValueError, match='g is'):
        p1(g[:, :4], x, mean, A, B, l2, w1, b1, w2, b2)
    with pytest.raises(ValueError, match='w1 has shape'):
        p1(g, x, mean, A, B, l2, w1[:, :4], b1, w2, b2)
    with pytest.raises(TypeError, match='w2 is torch.float64'):
        p1(g, x, mean, A, B, l2, w1, b1, w2.double(), b2)
    with pytest.raises(TypeError, match='mean is torch.float64'):
        p1(g, x, mean.double(), A, B, l2, w1, b1, w2, b2)
    with pytest.raises(ValueError, match='u is'):
        p1(g, x, mean, A, B, l2, w1, b1, w2, b2, u=x)
    with pytest.raises(ValueError, match='tiles_per_split'):
        p1(g, x, mean, A, B, l2, w1, b1, w2, b2, tiles_per_split=-1)
    with pytest.raises(ValueError, match='P has shape'):
        cuda_emu.mlp_backward_dx(g, x, mean, A, B, l2, w1, b1, w2, b2, pqrs[0][:, :2],
                                 *pqrs[1:])
    big = _inputs(1, 1024, 4, 1, 1, torch.float32, False)
    with pytest.raises(ValueError, match='shared memory'):
        _run(*big)


# ---------------------------------------------------------------------------------------------
# the `cuda` kernel set through the pipeline (helpers.py sets RIFORMER_CUDA_EMULATE=1 on CPU-only
# machines before riformer_kernels is imported, so the backend runs emulated in this process)

needs_emulated_backend = pytest.mark.skipif(
    not helpers.CUDA_EMULATED,
    reason='the cuda backend runs the emulated kernels only with RIFORMER_CUDA_EMULATE=1 '
           '(helpers.py sets it where there is no GPU)')


def _grads(block, x, g, backend, recompute=True):
    block = copy.deepcopy(block)
    block.recompute = recompute
    return helpers.run_block(block, x, backend, g)


def _check_every_gradient(got, truth, tol, what):
    assert set(got) == set(truth), (sorted(got), sorted(truth))
    for k in truth:
        err = rel_err(got[k], truth[k])
        assert err <= tol, (what, k, err)


BLOCK_CASES = [  # (shape, channels_last)
    ((2, 16, 5, 7), False),   # T = 35: a partial second token tile
    ((1, 16, 3, 5), True),    # N = 1
    ((2, 5, 3, 3), False),    # odd C (the FFMA kernels)
    ((2, 10, 1, 1), True),    # H*W = 1
    ((1, 80, 3, 3), False),   # two channel chunks, hidden 320 = five chunks
]


@needs_emulated_backend
@pytest.mark.parametrize('recompute', [True, False], ids=['recompute', 'save-u'])
@pytest.mark.parametrize('deploy', [False, True], ids=['training-form', 'deploy-form'])
@pytest.mark.parametrize('shape,channels_last', BLOCK_CASES,
                         ids=lambda v: 'x'.join(map(str, v)) if isinstance(v, tuple) else
                         ('cl' if v else 'nchw'))
def test_block_fp32_gradients_match_fp64_reference(shape, channels_last, deploy, recompute):
    block = make_block(shape[1], deploy=deploy, dtype=torch.float32).train()
    x = random_input(shape, torch.float32, channels_last=channels_last)
    g = random_input(shape, torch.float32)
    out, got = _grads(block, x, g, 'cuda', recompute)
    out_ref, truth = helpers.run_block(copy.deepcopy(block).double(), x.double(), 'reference',
                                       g.double())
    assert rel_err(out, out_ref) <= 1e-5
    _check_every_gradient(got, truth, FP32_TOL, (shape, channels_last, deploy, recompute))
    assert ('norm_reparam.weight' in got) == deploy
    # dx keeps x's memory format
    assert got['x'].is_contiguous(memory_format=torch.channels_last) == channels_last or \
        shape[2] * shape[3] == 1


@needs_emulated_backend
@pytest.mark.parametrize('recompute', [True, False], ids=['recompute', 'save-u'])
@pytest.mark.parametrize('deploy', [False, True], ids=['training-form', 'deploy-form'])
def test_block_fp64_gradients_match_reference(deploy, recompute):
    block = make_block(5, deploy=deploy, dtype=torch.float64).train()
    x = random_input((2, 5, 3, 3), torch.float64, channels_last=True)
    g = random_input(x.shape, torch.float64)
    _, got = _grads(block, x, g, 'cuda', recompute)
    _, truth = helpers.run_block(block, x, 'reference', g)
    _check_every_gradient(got, truth, FP64_TOL, (deploy, recompute))


def _fixed_drop_path(monkeypatch, factors):
    """Both draws of a block return these per-sample factors (dropped samples get 0)."""
    def draw(n, drop_prob, dtype, device):
        return torch.tensor(factors, dtype=dtype, device=device)
    monkeypatch.setattr(block_module, 'drop_path_factors', draw)


@needs_emulated_backend
@pytest.mark.parametrize('recompute', [True, False], ids=['recompute', 'save-u'])
def test_block_drop_path_with_a_dropped_sample(monkeypatch, recompute):
    # The drop-path factors reach the kernels only through l1 / l2 (the pipeline folds them in,
    # fold.per_sample_scale); sample 1 is dropped in both branches. Truth: the torch backend in
    # fp64 with the same factors (the reference draws its own masks).
    _fixed_drop_path(monkeypatch, [2.0, 0.0, 2.0])
    block = make_block(16, dtype=torch.float32, drop_path=0.5).train()
    x = random_input((3, 16, 4, 4), torch.float32)
    g = random_input(x.shape, torch.float32)
    out, got = _grads(block, x, g, 'cuda', recompute)
    out_ref, truth = _grads(copy.deepcopy(block).double(), x.double(), g.double(), 'torch')
    assert rel_err(out, out_ref) <= 1e-5
    _check_every_gradient(got, truth, FP32_TOL, recompute)
    # the dropped sample's branches vanish: out = x there, and dx = g exactly (P = 1 and
    # Q dz, R, S are 0 when l1 = l2 = 0)
    assert torch.equal(out[1], x[1])
    assert torch.equal(got['x'][1], g[1])


@needs_emulated_backend
@pytest.mark.parametrize('seed', [1234, 1, 2, 3])
@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_block_half_gradients_within_twice_the_reference_error(dtype, seed):
    # C = 32: the tensor-core kernels (forward and backward); odd seeds channels_last, and
    # recompute=False on seed 1.
    torch.manual_seed(seed)
    block = make_block(32, dtype=dtype).train()
    x = random_input((2, 32, 4, 5), dtype, channels_last=seed % 2 == 1)
    g = random_input(x.shape, dtype)
    _, truth = helpers.run_block(copy.deepcopy(block).double(), x.double(), 'reference',
                                 g.double())
    _, ref = helpers.run_block(block, x, 'reference', g)
    _, got = _grads(block, x, g, 'cuda', recompute=seed != 1)
    for k in truth:
        ref_err, err = rel_err(ref[k], truth[k]), rel_err(got[k], truth[k])
        assert err <= 2 * ref_err, (k, err, ref_err)


@needs_emulated_backend
@pytest.mark.parametrize('recompute', [True, False], ids=['recompute', 'save-u'])
def test_block_gradients_bitwise_deterministic(recompute):
    # Every gradient twice, and once with another emulator scheduling seed: the same bits.
    block = make_block(80, dtype=torch.float32).train()
    x = random_input((2, 80, 5, 7), torch.float32)
    g = random_input(x.shape, torch.float32)
    runs = []
    for seed in (3, 3, 4242):
        cuda_emu.set_seed(seed)
        runs.append(_grads(block, x, g, 'cuda', recompute)[1])
    cuda_emu.set_seed(5)
    assert len(runs[0]) == 13
    for k in runs[0]:
        assert all(torch.equal(r[k], runs[0][k]) for r in runs[1:]), k


@needs_emulated_backend
def test_torch_compile_fullgraph_trains_like_eager():
    # Every emulated kernel, forward and backward, is a custom op with a fake implementation and
    # dispatch reads cached answers: fullgraph compiles a training step, whose output and
    # gradients equal eager's (the eager run first also fills the kernel set's caches).
    block = make_block(16, dtype=torch.float32).train()
    x = random_input((2, 16, 5, 7), torch.float32)
    g = random_input(x.shape, torch.float32)
    out_e, grads_e = helpers.run_block(block, x, 'cuda', g)
    cblock = copy.deepcopy(block)
    xc = x.clone().requires_grad_(True)
    compiled = torch.compile(cblock, fullgraph=True, backend='aot_eager')
    with rk.use_backend('cuda'):
        out_c = compiled(xc)
    out_c.backward(g)
    assert torch.equal(out_c.detach(), out_e)
    assert torch.equal(xc.grad, grads_e['x'])
    for n, p in cblock.named_parameters():
        assert torch.equal(p.grad, grads_e[n]), n


# ---------------------------------------------------------------------------------------------
# bytes moved (the emulator's global-memory counter, DRAM model: distinct bytes per launch)

def test_backward_kernels_move_exactly_their_operands():
    # N = 2, T = 42 (two tiles a sample), one tile a split: 4 splits, each in one sample, so no
    # read-modify-write; pairs (s, n) = (0,0), (1,0), (2,1), (3,1) use slots 0, 1, 3, 4 of 6.
    n, c, hd = 2, 32, 128
    args = _inputs(n, c, hd, 6, 7, torch.float32, channels_last=False)
    x, g, coeffs, weights, pqrs = args
    assert cuda_emu.mlp_backward_splits(n, 42, c, hd, torch.float32, 1) == 4
    nbytes = lambda *ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
    with cuda_emu.counting_global_bytes() as log:
        _run(*args, tiles_per_split=1)
    names = [e.kernel for e in log]
    assert [k for k in ('partials', 'weights', 'sums', 'dx') if any(k in n for n in names)] == \
        ['partials', 'weights', 'sums', 'dx'] and len(log) == 4, names
    part, wts, sums, dx = log
    f4, splits, pairs_used, hchunks = 4, 4, 4, 2
    w1, b1, w2, b2 = weights
    mean, A, B, l2 = coeffs
    # phase 1 reads x, g, A, B, mean, l2 and the weights but b2; writes every partial it owns
    assert part.read_distinct == nbytes(x, g, A, B, mean, l2, w1, b1, w2)
    partial_bytes = f4 * (splits * (2 * hd * c + hd) + pairs_used * c * (2 + 3 * hchunks))
    assert part.write_distinct == partial_bytes
    # the reductions read exactly the slots that were written, and the (N, C) factors they need
    assert wts.read_distinct == f4 * (splits * (2 * hd * c + hd) + pairs_used * c) + nbytes(l2)
    assert wts.write_distinct == f4 * (2 * hd * c + hd + c)
    assert sums.read_distinct == f4 * pairs_used * c * (2 + 3 * hchunks) + nbytes(b2)
    assert sums.write_distinct == f4 * 5 * n * c
    # phase 2 reads x, g, eight (N, C) coefficient arrays and the weights but b2; writes dx
    assert dx.read_distinct == nbytes(x, g, A, B, mean, l2, *pqrs, w1, b1, w2)
    assert dx.write_distinct == nbytes(x)


@needs_emulated_backend
@pytest.mark.parametrize('recompute,limit', [(True, 1.2), (False, 5.2)])
def test_saved_for_backward_bytes(recompute, limit):
    """<= 1.2 |x| per block with recompute, <= 5.2 |x| when u is saved (the cuda forward's u)."""
    block = make_block(16, dtype=torch.float32).train()
    block.recompute = recompute
    x = random_input((2, 16, 8, 8), torch.float32).requires_grad_(True)
    ratio = helpers.saved_for_backward_bytes(block, x, 'cuda') / (x.numel() * x.element_size())
    assert ratio <= limit, ratio
    if not recompute:
        assert ratio >= 4.9   # u (4C channels) really is saved


def test_one_split_writes_the_weight_gradients_in_place():
    # N = 2, T = 42: 4 tiles, one split of all of them (the plan's choice for this small shape).
    # Phase 1 writes dW1, dW2, db1 directly (no partials to write, read back and copy) and the
    # weights kernel reads only the per-pair sum g slots and l2, and writes db2.
    n, c, hd = 2, 32, 128
    args = _inputs(n, c, hd, 6, 7, torch.float32, channels_last=False)
    x, g, coeffs, weights, pqrs = args
    assert cuda_emu.mlp_backward_splits(n, 42, c, hd, torch.float32) == 1
    with cuda_emu.counting_global_bytes() as log:
        got = _run(*args)
    part, wts, sums, dx = log
    f4, pairs_used, hchunks = 4, 2, 2          # pairs (0, 0), (0, 1): slots 0 and 1
    w1, b1, w2, b2 = weights
    mean, A, B, l2 = coeffs
    assert part.write_distinct == f4 * ((2 * hd * c + hd) + pairs_used * c * (2 + 3 * hchunks))
    assert wts.read_distinct == f4 * pairs_used * c + l2.numel() * l2.element_size()
    assert wts.write_distinct == f4 * c
    for name, a, b in zip(NAMES, got, _truth(*args)):   # and every output is right
        assert rel_err(a, b) <= KERNEL_TOL[torch.float32], (name, rel_err(a, b))


@needs_emulated_backend
@pytest.mark.parametrize('deploy', [False, True], ids=['training-form', 'deploy-form'])
def test_block_fp64_gradcheck(deploy):
    # Finite differences of the emulated kernels themselves (fp64 oracle path), x and every
    # parameter; tolerances in helpers.gradcheck_block (tighter than gradcheck's defaults).
    assert helpers.gradcheck_block(make_block(6, deploy=deploy, dtype=torch.float64), 'cuda')
