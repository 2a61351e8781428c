"""Tests of the compiled extension riformer_kernels._C (torch.ops.riformer.*).

The whole module skips, with the import error as the reason, when the extension was
not built. The nvcc resource check at the bottom needs only nvcc, not the extension.
"""
import importlib
import os
import shutil

import pytest
import torch

try:
    importlib.import_module("riformer_kernels._C")
    _IMPORT_ERROR = None
except ImportError as err:  # only a missing/broken build skips; other errors fail
    _IMPORT_ERROR = f"riformer_kernels._C cannot be imported ({err}); build it with " \
                    f"`pip install -e . --no-build-isolation`"

needs_ext = pytest.mark.skipif(_IMPORT_ERROR is not None, reason=_IMPORT_ERROR or "")

# Tolerances (relative to the float64 statistics of the very same input values):
# - fp32/fp16/bf16 inputs accumulate in fp32. Each per-(n,c) result goes through an
#   fp32 corrected two-pass over <=4096-value chunks (16 lanes, so <=256-term chains)
#   plus Chan merges; typical error ~sqrt(chain) * 2^-24 ~ 1e-7..1e-6 (measured max
#   6e-7 on a 1024x1024 plane), so 2e-6 rel.
#   Half inputs are compared with the moments of the *same* half values upcast to
#   fp64, so the half rounding of the input is not part of the error: only fp32
#   accumulation is, and the tolerance is the fp32 one.
# - fp64 accumulates in fp64: 1e-12.
# The mean is checked relative to |mean| + std, since a zero-mean channel has a mean
# that is pure rounding noise around 0.
RTOL = {torch.float32: 2e-6, torch.float16: 2e-6, torch.bfloat16: 2e-6,
        torch.float64: 1e-12}


def _moments(x):
    return torch.ops.riformer.moments(x)


def _truth(x):
    """Population var/mean over H, W in float64 of exactly the values in x."""
    v, m = torch.var_mean(x.double(), dim=(2, 3), unbiased=False)
    return m, v


def _rand(shape, dtype=torch.float32, seed=0, scale=1.0, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    # Non-zero mean per channel so mean and variance are both exercised.
    x = torch.randn(shape, generator=g, dtype=torch.float64) * scale
    x = x + torch.randn(shape[:2] + (1, 1), generator=g, dtype=torch.float64) + offset
    return x.to(dtype)


def _check(x, rtol):
    mean, var = _moments(x)
    ref_m, ref_v = _truth(x)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    assert mean.dtype == acc and var.dtype == acc
    assert mean.shape == x.shape[:2] and var.shape == x.shape[:2]
    assert mean.device == x.device
    mean, var = mean.double(), var.double()
    std = ref_v.sqrt()
    assert torch.all((mean - ref_m).abs() <= rtol * (ref_m.abs() + std) + 1e-30), \
        f"mean max err {(mean - ref_m).abs().max().item()}"
    assert torch.all((var - ref_v).abs() <= rtol * ref_v + 1e-30), \
        f"var max rel err {((var - ref_v).abs() / ref_v).max().item()}"


SHAPES = [
    (2, 3, 4, 5),
    (1, 64, 56, 56),     # N = 1
    (3, 13, 7, 9),       # C not a multiple of 8, non-square
    (4, 5, 1, 1),        # H*W = 1
    (2, 7, 1, 9),        # degenerate H
    (1, 1, 97, 131),     # one (n, c) with a large H*W: several chunks merged
    (2, 3, 64, 64),      # H*W = 4096 exactly one CPU chunk
    (2, 3, 65, 64),      # one past a chunk boundary
]


@needs_ext
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16,
                                   torch.float64], ids=str)
def test_moments_matches_float64(shape, dtype):
    _check(_rand(shape, dtype, seed=sum(shape)), RTOL[dtype])


@needs_ext
@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (2, 64, 56, 56), (1, 5, 97, 131),
                                   (3, 1000, 3, 3), (2, 13, 1, 1)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_moments_channels_last(shape, dtype):
    x = _rand(shape, dtype, seed=3).contiguous(memory_format=torch.channels_last)
    _check(x, RTOL[dtype])
    # Same numbers (up to accumulation order) as the NCHW copy.
    m1, v1 = _moments(x)
    m2, v2 = _moments(x.contiguous())
    torch.testing.assert_close(v1, v2, rtol=RTOL[dtype], atol=0)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_moments_noncontiguous_views(dtype):
    base = _rand((4, 10, 20, 24), dtype, seed=5)
    views = [
        base[:, ::2],                  # channel slice
        base[1:3, :, 2:17, 3:20],      # spatial crop
        base[..., ::3],                # strided W
        base.transpose(2, 3),          # H/W swapped
        base.permute(1, 0, 2, 3),      # N/C swapped
        base.contiguous(memory_format=torch.channels_last)[:, 1:7],  # sliced CL
    ]
    for v in views:
        assert not v.is_contiguous()
        _check(v, RTOL[dtype])


@needs_ext
@pytest.mark.parametrize("shape", [(2, 3, 56, 56), (1, 2, 97, 131)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "cl"])
def test_moments_large_offset_keeps_precision(shape, cl):
    # x + 1e4 with unit spread: E[x^2] - E[x]^2 in fp32 would cancel ~1e8 against
    # ~1e8 with an ulp of 8, i.e. a variance of ~1 with absolute error ~10 (garbage).
    x = _rand(shape, torch.float32, seed=11, offset=1e4)
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    mean, var = _moments(x)
    ref_m, ref_v = _truth(x)
    rel = ((var.double() - ref_v).abs() / ref_v).max().item()
    assert rel <= 1e-3, rel
    assert ((mean.double() - ref_m).abs() / ref_m.abs()).max().item() <= 1e-6


@needs_ext
@pytest.mark.parametrize("value", [0.0, 0.1, -3.7, 1e4], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "cl"])
def test_moments_constant_input_exact_zero_var(value, dtype, cl):
    x = torch.full((2, 5, 67, 71), value, dtype=dtype)
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    mean, var = _moments(x)
    assert torch.isfinite(mean).all() and torch.isfinite(var).all()
    assert torch.equal(var, torch.zeros_like(var))
    # The mean is the (upcast) constant itself, exactly.
    assert torch.equal(mean, torch.full_like(mean, x.flatten()[0].item()))


@needs_ext
@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "cl"])
def test_moments_deterministic(cl):
    x = _rand((2, 6, 97, 131), torch.float32, seed=21)
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    a = _moments(x)
    b = _moments(x)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    # Chunking depends on the shape only, never on the thread count.
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        c = _moments(x)
    finally:
        torch.set_num_threads(n)
    assert torch.equal(a[0], c[0]) and torch.equal(a[1], c[1])


@needs_ext
def test_moments_empty_batch():
    mean, var = _moments(torch.randn(0, 3, 4, 4))
    assert mean.shape == (0, 3) and var.shape == (0, 3)


@needs_ext
@pytest.mark.parametrize("shape", [(3, 4, 5), (2, 3, 4, 5, 6), (7,)])
def test_moments_rejects_wrong_rank(shape):
    with pytest.raises(RuntimeError, match="4-D"):
        _moments(torch.randn(shape))


@needs_ext
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.uint8, torch.bool])
def test_moments_rejects_non_float(dtype):
    with pytest.raises(RuntimeError, match="float32, float16, bfloat16 or float64"):
        _moments(torch.zeros(2, 3, 4, 5, dtype=dtype))


@needs_ext
def test_moments_rejects_empty_spatial():
    with pytest.raises(RuntimeError, match="H\\*W must be positive"):
        _moments(torch.randn(2, 3, 0, 4))


@needs_ext
def test_other_schemas_are_registered():
    for op in ("mlp_forward", "mlp_backward", "input_grad", "cuda_mlp_backward_weights_and_sums",
               "cuda_mlp_backward_dx"):
        assert hasattr(torch.ops.riformer, op), op


@needs_ext
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible")
@pytest.mark.parametrize("shape", [(2, 64, 56, 56), (1, 1, 97, 131), (4, 5, 1, 1),
                                   (3, 13, 7, 9)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16,
                                   torch.float64], ids=str)
@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "cl"])
def test_moments_cuda_matches_float64(shape, dtype, cl):
    if not torch._C._dispatch_has_kernel_for_dispatch_key("riformer::moments", "CUDA"):
        pytest.skip("extension built without CUDA kernels")
    x = _rand(shape, dtype, seed=7).cuda()
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    _check(x, RTOL[dtype])
    a, b = _moments(x), _moments(x)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    c = torch.full_like(x, 0.1)
    assert torch.equal(_moments(c)[1], torch.zeros_like(a[1]))


# ----------------------------------------------------------------------------------
# CUDA resource check: compiles without a GPU.

_PTXAS_SAMPLE = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_Z4kernPf' for 'sm_80'
ptxas info    : Function properties for _Z4kernPf
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 30 registers, used 1 barriers, 96 bytes smem, 380 bytes cmem[0]
ptxas info    : Function properties for _Z6helperf
    16 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads
ptxas info    : Compiling entry function '_Z4kernPf' for 'sm_90'
ptxas info    : Function properties for _Z4kernPf
    24 bytes stack frame, 20 bytes spill stores, 20 bytes spill loads
ptxas info    : Used 255 registers, used 0 barriers, 380 bytes cmem[0]
"""


def test_ptxas_parser_sees_spills_and_stack():
    # The resource check below is only as good as this parser: it must find every
    # kernel per arch and must not read a spill as zero.
    from riformer_kernels.tools.nvcc_report import parse_ptxas

    rows = {(r["kernel"], r["arch"]): r for r in parse_ptxas(_PTXAS_SAMPLE)}
    k80, k90 = rows[("_Z4kernPf", "sm_80")], rows[("_Z4kernPf", "sm_90")]
    assert (k80["registers"], k80["spill_stores"], k80["stack"], k80["smem"]) == (30, 0, 0, 96)
    assert (k90["registers"], k90["spill_stores"], k90["spill_loads"], k90["stack"],
            k90["smem"]) == (255, 20, 20, 24, 0)
    helper = rows[("_Z6helperf", "sm_80")]
    assert not helper["entry"] and (helper["stack"], helper["spill_stores"]) == (16, 8)


@pytest.mark.skipif(shutil.which("nvcc") is None and not os.environ.get("CUDA_HOME"),
                    reason="nvcc not found (set CUDA_HOME or put nvcc on PATH)")
def test_cuda_kernels_no_spills_no_stack():
    from riformer_kernels.tools import nvcc_report as _nvcc_report

    if _nvcc_report.find_nvcc() is None:
        pytest.skip("nvcc not found")
    # The bindings include c10/cuda headers, which CPU builds of torch ship too: no CUDA build of
    # torch (and no GPU) is needed to compile the kernels for real GPUs.
    from torch.utils import cpp_extension
    if not any(os.path.exists(os.path.join(d, "c10", "cuda", "CUDAStream.h"))
               for d in cpp_extension.include_paths()):
        pytest.skip("this torch install has no c10/cuda headers")
    archs = ("80", "90")
    rows = _nvcc_report.compile_cuda_report(archs=archs)
    print("\n" + _nvcc_report.format_report(rows))
    for arch in archs:
        entries = [r for r in rows if r["arch"] == f"sm_{arch}" and r["entry"]]
        for r in entries:
            assert r["registers"] is not None and r["stack"] is not None, r
        per_source = {}
        for r in entries:
            per_source[r["source"]] = per_source.get(r["source"], 0) + 1
        # Every instantiation the bindings can launch: moments.cu partial_nchw, partial_cl and
        # merge x 4 dtypes; mlp_forward.cu the FFMA kernel x 3 modes (fused, hidden, output) x
        # 6 type pairs (4 dtypes, and fp32 activations with fp16 / bf16 weights: the
        # mixed-precision mode), the mma kernel x 3 modes x 4 pairs (the 2 half dtypes, the 2
        # mixed pairs), and the merge x 4 dtypes; mlp_backward.cu the partials, weights, sums
        # and dx kernels x 6 pairs and the mma partials and dx kernels x 2 half dtypes (each
        # launched by the binding, no other).
        assert per_source == {"csrc/cuda/moments.cu": 12, "csrc/cuda/mlp_forward.cu": 34,
                              "csrc/cuda/mlp_backward.cu": 28}, per_source
    bad = [r for r in rows if r["spill_stores"] or r["spill_loads"] or r["stack"]]
    assert not bad, "spills or stack frames:\n" + _nvcc_report.format_report(bad)
    warned = sorted({w for r in rows for w in r["warnings"]})
    assert not warned, "ptxas warnings:\n" + "\n".join(warned)
