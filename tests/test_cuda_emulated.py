"""The CUDA kernels of csrc/cuda run on the CPU through the SIMT emulator (backends/cuda_emu.py).

Every launch is checked by the emulator (shared-memory races, uninitialised shared reads,
barrier misuse, bounds) and its result compared with a float64 reference. Outputs start as NaN
(the wrappers poison them), and rel_err refuses non-finite values, so an element a kernel fails
to write fails the test. The emulator is slow (~1M checked shared accesses/s), so shapes are
small but chosen to hit the edges: H*W not a multiple of the 32-token tile, N = 1, several
output-channel slices (C > 64), partial hidden chunks, channels_last.

The block-level test runs in a subprocess with RIFORMER_CUDA_EMULATE=1 (it must be set before
riformer_kernels is imported, and this process keeps the normal `cuda` backend for the other
tests). Skips only when g++ is missing.
"""
import ctypes
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from helpers import random_input, rel_err
from riformer_kernels import fold
from riformer_kernels.backends import cuda_emu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.skipif(cuda_emu.compiler() is None,
                                reason='g++ not found: the emulated CUDA build compiles with it')


@pytest.fixture(scope='module', autouse=True)
def emu():
    cuda_emu.library()  # build (or load from the cache) once for the module
    cuda_emu.set_seed(11)


# ---------------------------------------------------------------------------------------------
# the build

def test_build_is_cached_and_written_atomically(tmp_path, monkeypatch):
    monkeypatch.setenv('RIFORMER_EMU_CACHE', str(tmp_path))
    path = cuda_emu.build()
    assert path.parent == tmp_path and path.is_file()
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary left behind
    mtime = path.stat().st_mtime_ns
    assert cuda_emu.build() == path and path.stat().st_mtime_ns == mtime  # cache hit: no rebuild
    # The key covers every source the build reads.
    names = {str(f.relative_to(cuda_emu.ROOT)) for f in cuda_emu._sources()}
    assert {'csrc/emu/cuda_emu.h', 'csrc/emu/FLAGS', 'csrc/cuda/moments_kernels.cuh',
            'csrc/cuda/mlp_forward_kernels.cuh', 'csrc/cuda/ptx.cuh',
            'csrc/emu/emulated_kernels.cpp'} <= names


def test_kernel_headers_stay_free_of_torch():
    # What the emulator compiles must be plain CUDA: the torch binding lives in moments.cu.
    for name in ('moments_kernels.cuh', 'mlp_forward_kernels.cuh'):
        with open(os.path.join(ROOT, 'csrc', 'cuda', name)) as f:
            text = f.read()
        assert 'ATen' not in text and 'torch/' not in text and 'TORCH_' not in text, name


# ---------------------------------------------------------------------------------------------
# moments

def _moments_truth(x):
    var, mean = torch.var_mean(x.double(), dim=(2, 3), unbiased=False)
    return mean, var


# fp64 keeps fp64 statistics (near-exact); the others accumulate in fp32 from the rounded input
# (the truth is computed from the same rounded values), two-pass per chunk + Chan merges: a few
# fp32 ulps of the data's scale.
MOMENTS_TOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 2e-6,
               torch.bfloat16: 2e-6}


@pytest.mark.parametrize('dtype', [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize('channels_last', [False, True])
@pytest.mark.parametrize('shape,sms', [((1, 5, 7, 9), 132), ((2, 3, 33, 31), 132),
                                       ((2, 40, 6, 5), 1), ((1, 37, 1, 1), 132)])
def test_moments_against_float64(dtype, channels_last, shape, sms):
    x = random_input(shape, dtype, channels_last=channels_last)
    mean, var = cuda_emu.moments(x, sms=sms)
    assert mean.dtype == var.dtype == fold.stats_dtype(dtype)
    m_ref, v_ref = _moments_truth(x)
    scale = x.double().abs().max().item()
    tol = MOMENTS_TOL[dtype]
    assert rel_err(mean, m_ref) * m_ref.abs().max().item() <= tol * scale
    assert rel_err(var, v_ref) * max(v_ref.abs().max().item(), 1e-30) <= tol * scale * scale
    if shape[2] * shape[3] == 1:
        assert (var == 0).all()   # a single value has zero variance, not a rounding residue


def test_moments_split_reduction_and_offset():
    # T = 4500 tokens: the plan splits H*W into several chunks per (n, c) (K > 1) and the merge
    # kernel folds them. fp32 data at offset 1e4 (std 1.5): E[x^2] - E[x]^2 would lose
    # everything (eps * (mean/std)^2 ~ 5), unshifted chunk means lose ~2e-5 in Chan's merge
    # (measured before the row shift of moments_kernels.cuh); shifted partials stay near the
    # fp64 truth.
    for channels_last in (False, True):
        x = random_input((1, 3, 50, 90), offset=1e4, channels_last=channels_last).float()
        mean, var = cuda_emu.moments(x)
        m_ref, v_ref = _moments_truth(x)
        assert rel_err(var, v_ref) <= 1e-6
        assert rel_err(mean, m_ref) <= 2 * torch.finfo(torch.float32).eps


def test_moments_copies_other_strides():
    x = random_input((2, 6, 9, 10))[:, :, ::2, 1:]   # H and W do not collapse
    mean, var = cuda_emu.moments(x)
    m_ref, v_ref = _moments_truth(x)
    assert rel_err(mean, m_ref) <= 1e-12 and rel_err(var, v_ref) <= 1e-12


def test_moments_rejects_bad_input():
    with pytest.raises(TypeError, match='torch.Tensor'):
        cuda_emu.moments([1.0])
    with pytest.raises(ValueError, match='4-D'):
        cuda_emu.moments(torch.randn(3, 4))
    with pytest.raises(TypeError, match='int32'):
        cuda_emu.moments(torch.ones(1, 2, 3, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match='H\\*W'):
        cuda_emu.moments(torch.randn(1, 2, 0, 3))


# ---------------------------------------------------------------------------------------------
# the fused MLP forward

def _mlp_inputs(n, c, hd, h, w, dtype, channels_last):
    sd = fold.stats_dtype(dtype)
    x = random_input((n, c, h, w), dtype, channels_last=channels_last)
    g = torch.Generator().manual_seed(c * 1000 + hd + n)

    def rnd(*shape, scale=1.0, shift=0.0):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * scale + shift

    coeffs = [rnd(n, c, scale=0.4, shift=0.8), rnd(n, c, scale=0.5), rnd(n, c, scale=0.3, shift=1),
              rnd(n, c, scale=0.5), rnd(n, c, scale=0.5, shift=1.0)]
    coeffs = [t.to(sd) for t in coeffs]
    weights = [rnd(hd, c, scale=c ** -0.5), rnd(hd, scale=0.5), rnd(c, hd, scale=hd ** -0.5),
               rnd(c, scale=0.5)]
    weights = [t.to(dtype) for t in weights]
    return x, coeffs, weights


def _mlp_reference(x, coeffs, weights, dtype=torch.float64):
    """The folded block's MLP formula in torch ops in `dtype` (float64: the truth)."""
    A, B, a, b, l2 = (t.to(dtype)[:, :, None, None] for t in coeffs)
    w1, b1, w2, b2 = (t.to(dtype) for t in weights)
    x = x.to(dtype)
    z = A * x + B
    u = torch.nn.functional.conv2d(z, w1[:, :, None, None], b1)
    o = torch.nn.functional.conv2d(torch.nn.functional.gelu(u), w2[:, :, None, None], b2)
    return a * x + b + l2 * o


MLP_CASES = [  # (N, C, hidden, H, W): T = 35 / 9 / 66 tokens (never a multiple of 32)
    (1, 16, 64, 5, 7),
    (2, 48, 192, 3, 3),
    (1, 64, 256, 11, 6),
    (1, 96, 384, 5, 7),     # two output-channel slices, the second half-empty
    (2, 16, 72, 3, 3),      # a partial hidden chunk (72 = 64 + 8)
    (1, 192, 128, 3, 3),    # three output slices, all full
]


@pytest.mark.parametrize('channels_last', [False, True])
@pytest.mark.parametrize('case', MLP_CASES, ids=lambda c: 'x'.join(map(str, c)))
def test_mlp_forward_fp32_and_fp64(case, channels_last):
    n, c, hd, h, w = case
    for dtype, tol in ((torch.float32, 1e-5), (torch.float64, 1e-12)):
        x, coeffs, weights = _mlp_inputs(n, c, hd, h, w, dtype, channels_last)
        for path in ('fused', 'two_gemm'):
            out = cuda_emu.mlp_forward(x, *coeffs, *weights, path=path).out
            assert out.dtype == dtype and out.stride() == x.stride()
            # The truth from the very values the kernel read (rounded to dtype), in float64.
            assert rel_err(out, _mlp_reference(x, coeffs, weights)) <= tol, (dtype, path)


HALF_CASES = [  # (N, C, hidden, H, W, channels_last, kernels)
    (1, 16, 64, 5, 7, False, ('ffma', 'mma')),
    (2, 48, 192, 3, 3, True, ('ffma', 'mma')),
    (1, 96, 384, 5, 7, True, ('ffma', 'mma')),   # two output-channel slices
    (1, 16, 72, 5, 7, False, ('ffma',)),         # hidden % 16 != 0: the mma kernel declines
    (1, 80, 336, 3, 3, False, ('mma',)),         # a partial hidden chunk of whole k-steps
    (1, 320, 1280, 3, 3, True, ('mma',)),        # five slices; 40 KiB of shared memory
]


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
@pytest.mark.parametrize('case', HALF_CASES, ids=lambda c: 'x'.join(map(str, c[:5])))
def test_mlp_forward_half_within_twice_reference_error(case, dtype):
    n, c, hd, h, w, channels_last, kernels = case
    x, coeffs, weights = _mlp_inputs(n, c, hd, h, w, dtype, channels_last)
    truth = _mlp_reference(x, coeffs, weights)
    # The reference's own error: the same formula in torch ops in `dtype`.
    ref_err = rel_err(_mlp_reference(x, coeffs, weights, dtype), truth)
    for kernel in kernels:
        for path in ('fused', 'two_gemm'):
            out = cuda_emu.mlp_forward(x, *coeffs, *weights, kernel=kernel, path=path).out
            assert out.dtype == dtype and out.stride() == x.stride()
            err = rel_err(out, truth)
            assert err <= 2 * ref_err, (kernel, path, err, ref_err)
            # and not vacuously: the output is rounded to dtype, so it cannot beat ~half an ulp
            assert err >= 0.1 * torch.finfo(dtype).eps, (kernel, path, err)
    assert cuda_emu.mlp_kernel(c, hd, dtype) == ('mma' if 'mma' in kernels else 'ffma')


MIXED_CASES = [  # (N, C, hidden, H, W, channels_last, kernels): fp32 x, half weights
    (1, 16, 64, 5, 7, False, ('ffma', 'mma')),
    (2, 48, 192, 3, 3, True, ('ffma', 'mma')),
    (1, 96, 384, 5, 7, True, ('mma',)),          # two output-channel slices
    (1, 24, 72, 5, 7, False, ('ffma',)),         # C % 16 != 0: the mma kernel declines
]


def _mlp_autocast_reference(x, coeffs, weights, dtype):
    """What the reference under autocast computes for the folded MLP: the convs' inputs (z, h)
    and outputs (u, o) rounded to `dtype`, fp32 around them (in float64 here, so only those
    roundings count)."""
    A, B, a, b, l2 = (t.double()[:, :, None, None] for t in coeffs)
    w1, b1, w2, b2 = (t.double() for t in weights)
    x = x.double()

    def rounded(t):
        return t.to(dtype).double()
    u = rounded(torch.nn.functional.conv2d(rounded(A * x + B), w1[:, :, None, None], b1))
    h = rounded(torch.nn.functional.gelu(u))
    o = rounded(torch.nn.functional.conv2d(h, w2[:, :, None, None], b2))
    return a * x + b + l2 * o


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
@pytest.mark.parametrize('case', MIXED_CASES, ids=lambda c: 'x'.join(map(str, c[:5])))
def test_mlp_forward_mixed_precision(case, dtype):
    """The mixed-precision mode (autocast): fp32 x, out and biases, w1 / w2 in a half dtype.
    The FFMA kernel rounds nothing but what it is given (fp32 budget against the truth of the
    same rounded weights); the mma kernel rounds z and h to the weights' dtype and the two-GEMM
    path stores h in it: within twice the error of the reference under autocast. u is saved in
    the weights' dtype."""
    n, c, hd, h, w, channels_last, kernels = case
    x, coeffs, weights = _mlp_inputs(n, c, hd, h, w, torch.float32, channels_last)
    weights = [weights[0].to(dtype), weights[1], weights[2].to(dtype), weights[3]]
    truth = _mlp_reference(x, coeffs, weights)
    ref_err = rel_err(_mlp_autocast_reference(x, coeffs, weights, dtype), truth)
    u_truth = torch.nn.functional.conv2d(
        coeffs[0].double()[:, :, None, None] * x.double() + coeffs[1].double()[:, :, None, None],
        weights[0].double()[:, :, None, None], weights[1].double())
    assert cuda_emu.mlp_kernel(c, hd, dtype) == ('mma' if 'mma' in kernels else 'ffma')
    for kernel in kernels:
        for path in ('fused', 'two_gemm'):
            res = cuda_emu.mlp_forward(x, *coeffs, *weights, kernel=kernel, path=path,
                                       save_u=True, emit_moments=True)
            assert res.out.dtype == torch.float32 and res.out.stride() == x.stride()
            assert res.u.dtype == dtype and res.mean.dtype == torch.float32
            err = rel_err(res.out, truth)
            if kernel == 'ffma' and path == 'fused':
                assert err <= 1e-5, (kernel, path, err)
            assert err <= 2 * ref_err, (kernel, path, err, ref_err)
            # u rounded once to the weights' dtype (from fp32 z on FFMA, half z on mma): one
            # rounding is <= eps/2 per element; measured at most 0.45 eps over these cases
            assert rel_err(res.u, u_truth) <= torch.finfo(dtype).eps, (kernel, path)
            mean, var = _moments_of(res.out)
            assert rel_err(res.mean, mean) <= 2e-6 and rel_err(res.var, var) <= 2e-6


def test_mlp_forward_mixed_precision_rejects_other_pairs():
    x, coeffs, weights = _mlp_inputs(1, 16, 64, 3, 3, torch.float32, False)
    w1, b1, w2, b2 = weights
    with pytest.raises(TypeError, match='w2 is torch.float16.*bfloat16'):
        cuda_emu.mlp_forward(x, *coeffs, w1.bfloat16(), b1, w2.half(), b2)
    with pytest.raises(TypeError, match='b1 is torch.bfloat16'):
        cuda_emu.mlp_forward(x, *coeffs, w1.bfloat16(), b1.bfloat16(), w2.bfloat16(), b2)
    xh, ch, wh = _mlp_inputs(1, 16, 64, 3, 3, torch.float16, False)
    with pytest.raises(TypeError, match='w1 is torch.float32'):   # only fp32 x mixes
        cuda_emu.mlp_forward(xh, *ch, wh[0].float(), wh[1], wh[2].float(), wh[3])
    xd, cd, wd = _mlp_inputs(1, 16, 64, 3, 3, torch.float64, False)
    with pytest.raises(TypeError, match='w1 is torch.bfloat16'):
        cuda_emu.mlp_forward(xd, *cd, wd[0].bfloat16(), wd[1], wd[2].bfloat16(), wd[3])


def test_mlp_forward_mma_takes_misaligned_weight_views():
    # A weight view starting one element into its storage: copied, not read as misaligned pairs.
    x, coeffs, (w1, b1, w2, b2) = _mlp_inputs(1, 16, 64, 3, 3, torch.float16, False)
    w1v = torch.cat([w1.new_zeros(1), w1.reshape(-1)])[1:].view(64, 16)
    assert w1v.data_ptr() % 4 != 0
    out = cuda_emu.mlp_forward(x, *coeffs, w1v, b1, w2, b2, kernel='mma').out
    assert torch.equal(out, cuda_emu.mlp_forward(x, *coeffs, w1, b1, w2, b2, kernel='mma').out)
    # The library itself refuses the misaligned pointer (what the wrapper's copy avoids).
    keep = [t.contiguous() for t in coeffs]
    dims = (ctypes.c_int64 * 9)(1, 16, 64, 9, x.stride(0), x.stride(1), 1, 0, 0)
    ptrs_c = (ctypes.c_void_p * 5)(*[t.data_ptr() for t in keep])
    ptrs_w = (ctypes.c_void_p * 4)(w1v.data_ptr(), b1.data_ptr(), w2.data_ptr(), b2.data_ptr())
    with pytest.raises(cuda_emu.EmulatorError, match='4-byte aligned'):
        cuda_emu._call(cuda_emu.library().riformer_emu_mlp_forward, 2, 2, x.data_ptr(),
                       torch.empty_like(x).data_ptr(), dims, ptrs_c, ptrs_w, 1, 0, None,
                       None, None)


def _moments_of(t: torch.Tensor):
    t = t.double()
    return t.mean(dim=(2, 3)), t.var(dim=(2, 3), unbiased=False)


EPILOGUE_CASES = [  # (N, C, hidden, H, W, dtype, channels_last, kernel)
    (2, 16, 64, 5, 7, torch.float32, False, 'ffma'),     # T = 35: a 3-token last tile
    (1, 96, 384, 3, 3, torch.float32, True, 'ffma'),     # two slices, the second half-empty
    (1, 48, 192, 9, 9, torch.float64, False, 'ffma'),    # T = 81: three tiles
    (1, 48, 192, 7, 5, torch.float16, True, 'mma'),
    (2, 16, 64, 3, 11, torch.bfloat16, False, 'mma'),
    (1, 16, 72, 3, 3, torch.bfloat16, True, 'ffma'),     # half inputs through the FFMA kernel
]


@pytest.mark.parametrize('case', EPILOGUE_CASES, ids=lambda c: '-'.join(map(str, c[:5] + c[6:])))
def test_mlp_forward_saves_u_and_emits_output_moments(case):
    n, c, hd, h, w, dtype, channels_last, kernel = case
    x, coeffs, weights = _mlp_inputs(n, c, hd, h, w, dtype, channels_last)
    for path in ('fused', 'two_gemm'):
        _check_saved_u_and_moments(x, coeffs, weights, kernel, path)


def _check_saved_u_and_moments(x, coeffs, weights, kernel, path):
    n, c, h, w = x.shape
    hd, dtype = weights[0].shape[0], x.dtype
    res = cuda_emu.mlp_forward(x, *coeffs, *weights, kernel=kernel, save_u=True,
                               emit_moments=True, path=path)
    # The output is the one the plain call writes, bit for bit.
    assert torch.equal(res.out, cuda_emu.mlp_forward(x, *coeffs, *weights, kernel=kernel,
                                                     path=path).out)
    # u = W1 (A x + B) + b1 rounded once to dtype: within an ulp-scale budget of float64.
    A, B = (t.double()[:, :, None, None] for t in coeffs[:2])
    u_true = torch.nn.functional.conv2d(A * x.double() + B, weights[0].double()[:, :, None, None],
                                        weights[1].double())
    assert res.u.shape == (n, hd, h, w) and res.u.dtype == dtype
    assert res.u.is_contiguous(memory_format=torch.channels_last)
    tol = {torch.float64: 1e-12, torch.float32: 1e-5}.get(dtype, 4 * torch.finfo(dtype).eps)
    assert rel_err(res.u, u_true) <= tol
    # The epilogue's moments are those of the values stored in out (float64 of the stored out).
    mean, var = _moments_of(res.out)
    sd_tol = 1e-12 if dtype == torch.float64 else 2e-6
    assert res.mean.dtype == fold.stats_dtype(dtype) and res.mean.shape == (n, c)
    assert rel_err(res.mean, mean) <= sd_tol and rel_err(res.var, var) <= sd_tol


def test_mlp_forward_output_moments_at_a_large_offset():
    # Output offset 1e4, spread ~1: without the shift, fp32 tile means rounded to the offset's ulp
    # would cost ~1e-5 of the variance in Chan's merge; with it the error stays at rounding.
    x, coeffs, weights = _mlp_inputs(1, 16, 64, 16, 9, torch.float32, False)
    coeffs[3] = coeffs[3] + 1e4   # b: a per-channel offset of the output
    res = cuda_emu.mlp_forward(x, *coeffs, *weights, emit_moments=True)
    mean, var = _moments_of(res.out)
    assert rel_err(res.mean, mean) <= 1e-7
    assert rel_err(res.var, var) <= 1e-6


def test_mlp_forward_large_c_rule():
    # The documented rule (mlp_forward_kernels.cuh, prefer_two_gemm): fused while C (k - 1) <=
    # 56 (fp32/fp64) or 250 (fp16/bf16), k = ceil(C / 64) output slices; two-GEMM above.
    for c, fused in ((16, True), (64, True), (96, False), (512, False)):
        assert cuda_emu.mlp_plan(c, 4 * c, torch.float32).path == ('fused' if fused else
                                                                    'two_gemm'), c
    for c, fused in ((64, True), (128, True), (192, False), (768, False)):
        plan = cuda_emu.mlp_plan(c, 4 * c, torch.bfloat16)
        assert plan.kernel == 'mma' and plan.path == ('fused' if fused else 'two_gemm'), c
    two = cuda_emu.mlp_plan(512, 2048, torch.float32)
    assert two.smem_hidden == 512 * 32 * 4 and two.smem == 64 * 36 * 4
    with pytest.raises(ValueError, match='unknown MLP path'):
        cuda_emu.mlp_plan(64, 256, torch.float32, path='split')


# C = 512 and 768 with a small hidden size: the channel count decides the tiling (output
# slices, the two-GEMM split, shared memory); the hidden size only multiplies the work, and the
# emulator is slow. 768 fp32 fused needs 104 KiB of shared memory (over the 48 KiB default).
LARGE_C_CASES = [  # (C, hidden, dtype, channels_last)
    (512, 128, torch.float32, False),
    (768, 64, torch.float32, True),
    (512, 64, torch.bfloat16, True),
    (768, 128, torch.float16, False),
]


@pytest.mark.parametrize('case', LARGE_C_CASES, ids=lambda c: f'{c[0]}-{c[2]}-{c[3]}')
def test_mlp_forward_large_c_both_paths_and_deterministic(case):
    c, hd, dtype, channels_last = case
    x, coeffs, weights = _mlp_inputs(1, c, hd, 5, 7, dtype, channels_last)
    truth = _mlp_reference(x, coeffs, weights)
    bound = 1e-5 if dtype == torch.float32 else 2 * rel_err(
        _mlp_reference(x, coeffs, weights, dtype), truth)
    outs = {}
    for path in ('fused', 'two_gemm'):
        res = cuda_emu.mlp_forward(x, *coeffs, *weights, path=path, emit_moments=True)
        assert rel_err(res.out, truth) <= bound, (path, rel_err(res.out, truth), bound)
        mean, var = _moments_of(res.out)
        assert rel_err(res.var, var) <= 2e-6 and rel_err(res.mean, mean) <= 2e-6
        outs[path] = res.out
    # Two emulator scheduling seeds give bit-identical results (fixed summation order, no
    # atomics), for the path `auto` takes here (two-GEMM: C (k - 1) is over both thresholds).
    assert cuda_emu.mlp_plan(c, hd, dtype).path == 'two_gemm'
    cuda_emu.set_seed(1)
    out1 = cuda_emu.mlp_forward(x, *coeffs, *weights).out
    cuda_emu.set_seed(2)
    out2 = cuda_emu.mlp_forward(x, *coeffs, *weights).out
    assert torch.equal(out1, out2) and torch.equal(out1, outs['two_gemm'])


def test_mlp_forward_rejects_bad_input():
    x, coeffs, weights = _mlp_inputs(1, 16, 64, 3, 3, torch.float32, False)
    with pytest.raises(ValueError, match='w1 has shape'):
        cuda_emu.mlp_forward(x, *coeffs, weights[0][:, :8], *weights[1:])
    with pytest.raises(TypeError, match='w2 is torch.float64'):
        cuda_emu.mlp_forward(x, *coeffs, weights[0], weights[1], weights[2].double(), weights[3])
    with pytest.raises(TypeError, match='A is torch.float64'):
        cuda_emu.mlp_forward(x, coeffs[0].double(), *coeffs[1:], *weights)
    with pytest.raises(ValueError, match='l2 has shape'):
        cuda_emu.mlp_forward(x, *coeffs[:4], coeffs[4][:, :3], *weights)
    with pytest.raises(ValueError, match='mma MLP kernel takes float16/bfloat16'):
        cuda_emu.mlp_forward(x, *coeffs, *weights, kernel='mma')
    with pytest.raises(ValueError, match='unknown MLP kernel'):
        cuda_emu.mlp_forward(x, *coeffs, *weights, kernel='wmma')
    big, cbig, wbig = _mlp_inputs(1, 2048, 4, 1, 1, torch.float32, False)
    with pytest.raises(ValueError, match='shared memory'):
        cuda_emu.mlp_forward(big, *cbig, *wbig)


# ---------------------------------------------------------------------------------------------
# the `cuda` kernel set through the pipeline (subprocess: RIFORMER_CUDA_EMULATE before import)

BACKEND_SCRIPT = textwrap.dedent('''
    import copy, json, sys
    import torch
    sys.path.insert(0, 'tests')
    import helpers, riformer_kernels as rk
    torch.manual_seed(1234)   # the same draws every run (the test session's seed is not inherited)
    res = {'available': list(rk.available_backends()['cuda'])}
    cases = []
    for dim, dtype, cl, deploy, shape in [(16, torch.float32, False, False, (1, 16, 5, 7)),
                                          (64, torch.float32, True, True, (2, 64, 3, 5)),
                                          (48, torch.float64, False, False, (1, 48, 4, 9))]:
        block = helpers.make_block(dim, deploy=deploy, dtype=dtype)
        x = helpers.random_input(shape, dtype, channels_last=cl)
        truth = helpers.run_block(copy.deepcopy(block).double(), x.double(), 'reference')[0]
        with torch.no_grad(), rk.use_backend('cuda'):
            out = block(x)
        cases.append([str(dtype), cl, helpers.rel_err(out, truth),
                      out.is_contiguous(memory_format=torch.channels_last) == cl])
    res['blocks'] = cases
    # Half dtypes (the mma kernel): within twice the reference's own error in that dtype.
    half = []
    for dtype in (torch.float16, torch.bfloat16):
        block = helpers.make_block(64, dtype=dtype)
        x = helpers.random_input((1, 64, 5, 7), dtype)
        truth = helpers.run_block(copy.deepcopy(block).double(), x.double(), 'reference')[0]
        with torch.no_grad():
            ref = helpers.run_block(block, x, 'reference')[0]
            with rk.use_backend('cuda'):
                out = block(x)
        half.append([str(dtype), helpers.rel_err(out, truth), helpers.rel_err(ref, truth)])
    res['half'] = half
    # Two chained blocks: the second takes the first's output moments (computed by the moments
    # kernel on the output) instead of its own statistics pass.
    b1, b2 = (helpers.make_block(16, dtype=torch.float32) for _ in range(2))
    b1.chain_statistics = True
    x = helpers.random_input((1, 16, 6, 6), torch.float32)
    with torch.no_grad(), rk.use_backend('reference'):
        truth = copy.deepcopy(b2).double()(copy.deepcopy(b1).double()(x.double()))
    with torch.no_grad(), rk.use_backend('cuda'):
        y = b1(x)
        res['chained'] = hasattr(y, '_riformer_chained_moments')
        out = b2(y)
        b1.chain_statistics = False
        unchained = b2(b1(x))        # b2 runs its own moments pass on the same values
    res['chain_err'] = helpers.rel_err(out, truth)
    res['chain_vs_unchained'] = helpers.rel_err(out, unchained)
    # fp32 at offset 1e4: the statistics kernel and fold lose no more than the reference does.
    with torch.no_grad():
        res['offset'] = list(helpers.large_offset_errors('cuda')[:2])
    # Training runs (its gradients are tests/test_cuda_backward_emulated.py's).
    with rk.use_backend('cuda'):
        b1(x.requires_grad_(True)).sum().backward()
    res['train'] = bool(torch.isfinite(x.grad).all())
    print(json.dumps(res))
''')


def test_cuda_backend_block_forward_emulated():
    env = dict(os.environ, RIFORMER_CUDA_EMULATE='1')
    r = subprocess.run([sys.executable, '-c', BACKEND_SCRIPT], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res['available'] == [True, 'usable'], res
    for dtype, cl, err, layout_kept in res['blocks']:
        # fp32: 1e-5 of the output scale, the fp32 budget of the block; fp64: the fold and
        # kernel in fp64 agree with the module-by-module reference to rounding.
        assert err <= (1e-5 if dtype == 'torch.float32' else 1e-11), (dtype, cl, err)
        assert layout_kept, (dtype, cl)
    for dtype, err, ref_err in res['half']:
        assert err <= 2 * ref_err, (dtype, err, ref_err)
    assert res['chained'] and res['chain_err'] <= 1e-5, res
    # chained == unchained: the epilogue's moments and the moments kernel describe the same
    # stored values; they differ only by fp32 summation order.
    assert res['chain_vs_unchained'] <= 1e-6, res
    # 2x + one ulp of slack, as for the cpu backend: both are fp32, rounding differently.
    cuda_err, ref_err = res['offset']
    assert cuda_err <= 2 * ref_err + 1.2e-7, res['offset']
    assert res['train'] is True, res['train']


def test_cuda_backend_unchanged_without_the_variable():
    # The test session itself runs emulated (helpers.py sets the variable on CPU-only machines):
    # a fresh interpreter without it sees the compiled-extension backend, not the emulator.
    script = ("import json, riformer_kernels as rk; i = rk.available_backends()['cuda']; "
              "print(json.dumps([i.usable, i.reason]))")
    env = dict(os.environ, RIFORMER_CUDA_EMULATE='0')
    r = subprocess.run([sys.executable, '-c', script], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    usable, reason = json.loads(r.stdout.strip().splitlines()[-1])
    if not torch.cuda.is_available():
        assert not usable and 'no CUDA device' in reason, reason
        assert 'RIFORMER_CUDA_EMULATE=1' in reason, reason   # and says how to emulate


# ---------------------------------------------------------------------------------------------
# the emulated kernels as torch.library custom ops: fake implementations, compile

@pytest.mark.parametrize('dtype,wdtype,channels_last', [
    (torch.float32, torch.float32, False), (torch.float16, torch.float16, True),
    (torch.bfloat16, torch.bfloat16, False),
    (torch.float32, torch.bfloat16, True), (torch.float32, torch.float16, False)])   # mixed
def test_emulated_ops_pass_opcheck(dtype, wdtype, channels_last):
    """Schema, fake implementation (shapes, dtypes, strides of the real outputs) and AOT dispatch
    of every riformer_cuda_emu op (moments, mlp_forward, the two backward ops), by
    torch.library.opcheck; the mixed-precision mode too (fp32 x, half weights: u in the
    weights' dtype)."""
    x, coeffs, weights = _mlp_inputs(2, 32, 64, 3, 5, dtype, channels_last)
    weights = [weights[0].to(wdtype), weights[1], weights[2].to(wdtype), weights[3]]
    utils = ('test_schema', 'test_faketensor', 'test_aot_dispatch_dynamic')
    torch.library.opcheck(cuda_emu.moments_op, (x,), test_utils=utils)
    for save_u, emit in ((False, False), (True, True)):
        torch.library.opcheck(cuda_emu.mlp_forward_op, (x, *coeffs, *weights, save_u, emit),
                              test_utils=utils)
    # The backward ops, with u recomputed and u read from the forward's saved copy.
    A, B, a, b, l2 = coeffs
    g = random_input(tuple(x.shape), dtype, channels_last=channels_last)
    mean = x.to(A.dtype).mean(dim=(2, 3))
    P, Q, R, S = (torch.randn(x.shape[:2], dtype=A.dtype) for _ in range(4))
    u_saved = cuda_emu.mlp_forward(x, *coeffs, *weights, save_u=True).u
    for u in (None, u_saved):
        common = (g, x, mean, A, B, l2, *weights)
        torch.library.opcheck(cuda_emu.mlp_backward_weights_and_sums_op, (*common, u),
                              test_utils=utils)
        torch.library.opcheck(cuda_emu.mlp_backward_dx_op, (*common, P, Q, R, S, u),
                              test_utils=utils)


@pytest.mark.skipif(not cuda_emu.ENABLED, reason='the cuda kernel set runs emulated only with '
                    'RIFORMER_CUDA_EMULATE=1 (tests/helpers.py sets it without a GPU)')
def test_cuda_backend_block_compiles_fullgraph():
    import riformer_kernels as rk
    from helpers import make_block
    block = make_block(32, dtype=torch.float32).eval()
    x = random_input((2, 32, 5, 6), torch.float32, channels_last=True)
    with torch.no_grad(), rk.use_backend('cuda'):
        eager = block(x)
        compiled = torch.compile(block, fullgraph=True, backend='aot_eager')(x)
    assert torch.equal(compiled, eager)
