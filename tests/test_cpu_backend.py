"""The `cpu` backend (C++ kernels in csrc/cpu) against the upstream reference.

Tolerances: fp32 outputs and every gradient within 1e-5 (relative to each tensor's scale) of the
fp64 reference: the issue's target. fp64 runs of the same kernels within 1e-10 of the fp64
reference: they prove the algebra and the tiling exact up to rounding (the erf/exp
approximations of the fp32 GELU are not used in fp64). bf16: the twice-the-reference's-own-error
rule against the fp64 truth.

Every test here runs once per ISA level this CPU supports (the `isa_cap` fixture caps the
kernels at it: csrc/cpu/isa.h), so the AVX-512, AVX2 and baseline copies of the tile code are
each held to the same tolerances where the machine can run them.
"""
import copy

import pytest
import torch

import riformer_kernels as rk
from riformer_kernels import dispatch, pipeline
from helpers import (check_same_seed_as_reference, gradcheck_block, large_offset_errors,
                     make_block, random_input, rel_err, run_block)

_REASON = rk.available_backends()['cpu'].reason
pytestmark = pytest.mark.skipif(not rk.available_backends()['cpu'].usable,
                                reason=f"cpu backend unusable: {_REASON}")

# Odd shapes on purpose: N=1, C not a multiple of 8 (13), H*W=1, a prime spatial size, H != W.
SHAPES = [(2, 16, 5, 7), (1, 13, 1, 1), (3, 20, 1, 1), (2, 13, 4, 9), (1, 64, 8, 8),
          (2, 8, 11, 1)]
MODES = {'recompute': True, 'save_u': False}


_LEVELS = rk.backends.cpu.ISA_LEVELS
_SUPPORTED = (_LEVELS[:_LEVELS.index(rk.cpu_isa_info().supported) + 1]
              if rk.available_backends()['cpu'].usable else ())


@pytest.fixture(autouse=True, params=_SUPPORTED)
def isa_cap(request):
    """Run the test with the cpu kernels capped at each level the CPU supports."""
    with rk.use_cpu_isa(request.param):
        yield request.param


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles of 16 tokens (the minimum) whatever C is: every test shape with H*W > 16 then runs
    several tiles per sample, uneven last tiles and several accumulation groups. (Without this
    fixture, samples shorter than 384 tokens, as most test shapes, are grouped several whole
    samples per tile.)"""
    monkeypatch.setenv('RIFORMER_CPU_FWD_HIDDEN', '1')
    monkeypatch.setenv('RIFORMER_CPU_BWD_HIDDEN', '1')
    monkeypatch.setenv('RIFORMER_CPU_MIN_TOKENS', '1')
    monkeypatch.setenv('RIFORMER_CPU_SHORT_TOKENS', '1')


@pytest.fixture(params=['whole_batch', 'half_batch'])
def short_sample_tiling(request, monkeypatch):
    """Short samples (H*W < 384) run as one whole-batch tile with MKL-threaded GEMMs when the
    batch has at most 512 tokens (every test shape here), else in tiles of at most half the
    batch; 'half_batch' forces the second route (RIFORMER_CPU_WHOLE_BATCH_TOKENS=0)."""
    if request.param == 'half_batch':
        monkeypatch.setenv('RIFORMER_CPU_WHOLE_BATCH_TOKENS', '0')
    return request.param


def _with_mode(block, recompute):
    block = copy.deepcopy(block)
    block.recompute = recompute
    return block


def _compare(block, x, tol, backend='cpu'):
    """Output and every gradient of `backend` on x vs the reference in float64."""
    ref_block = copy.deepcopy(block).double()
    g = torch.randn(x.shape, dtype=torch.float64)
    out_ref, grads_ref = run_block(ref_block, x.double(), 'reference', g)
    out, grads = run_block(block, x, backend, g.to(x.dtype))
    if backend == 'cpu':
        info = rk.cpu_isa_info()
        assert info.last_run == info.cap, f"the kernels ran at {info.last_run}, capped at {info.cap}"
    assert set(grads) == set(grads_ref)
    errors = {'out': rel_err(out, out_ref)}
    errors.update({k: rel_err(grads[k], grads_ref[k]) for k in grads_ref})
    bad = {k: v for k, v in errors.items() if not v <= tol}
    assert not bad, f"errors above {tol}: {bad}"
    return out, grads


@pytest.mark.parametrize('shape', SHAPES)
@pytest.mark.parametrize('channels_last', [False, True], ids=['nchw', 'cl'])
@pytest.mark.parametrize('deploy', [False, True], ids=['train_form', 'deploy_form'])
@pytest.mark.parametrize('mode', MODES)
def test_fp32_output_and_all_gradients_within_1e5_of_fp64_reference(shape, channels_last, deploy,
                                                                    mode, short_sample_tiling):
    block = _with_mode(make_block(shape[1], deploy=deploy, dtype=torch.float32), MODES[mode])
    x = random_input(shape, dtype=torch.float32, channels_last=channels_last)
    _compare(block, x, tol=1e-5)


@pytest.mark.parametrize('shape', [(2, 16, 5, 7), (3, 20, 1, 1), (1, 64, 8, 8), (2, 40, 20, 20)])
@pytest.mark.parametrize('channels_last', [False, True], ids=['nchw', 'cl'])
@pytest.mark.parametrize('mode', MODES)
def test_fp32_brgemm_route_within_1e5(monkeypatch, shape, channels_last, mode):
    """The oneDNN brgemm route (the default at the avx512 level only) forced on whatever CPU
    this is: transposed weight copies, no whole-batch tiles."""
    monkeypatch.setenv('RIFORMER_CPU_GEMM', 'brgemm')
    # The route exists only where the one-time probe of at::native::cpublas::brgemm succeeds
    # (it runs on this project's AVX2 and AVX-512 machines; a torch built without oneDNN, or a
    # non-x86 CPU, has none): there is then nothing to test.
    if rk.cpu_isa_info().gemm != 'onednn-brgemm':
        pytest.skip("oneDNN's fp32 brgemm does not run on this CPU / torch build")
    block = _with_mode(make_block(shape[1], dtype=torch.float32), MODES[mode])
    x = random_input(shape, dtype=torch.float32, channels_last=channels_last)
    _compare(block, x, tol=1e-5)


@pytest.mark.parametrize('channels_last', [False, True], ids=['nchw', 'cl'])
@pytest.mark.parametrize('mode', MODES)
def test_fp32_at_stage_one_width_with_many_tiles_within_1e5(channels_last, mode):
    """C=64 with 28x28 tokens: several default-size tiles per sample (the S12 stage-1 width)."""
    block = _with_mode(make_block(64, dtype=torch.float32), MODES[mode])
    x = random_input((2, 64, 28, 28), dtype=torch.float32, channels_last=channels_last)
    _compare(block, x, tol=1e-5)


@pytest.mark.parametrize('shape', [(2, 16, 5, 7), (3, 13, 6, 6), (1, 8, 17, 3)])
@pytest.mark.parametrize('channels_last', [False, True], ids=['nchw', 'cl'])
@pytest.mark.parametrize('mode', MODES)
def test_fp64_small_tiles_match_reference_to_rounding(shape, channels_last, mode, small_tiles):
    """fp64 through the same kernels, 16-token tiles: tile edges, uneven last tiles, the
    per-tile partial sums and the grouped weight-gradient merge are exact up to rounding."""
    block = _with_mode(make_block(shape[1]), MODES[mode])
    x = random_input(shape, channels_last=channels_last)
    _compare(block, x, tol=1e-10)


@pytest.mark.parametrize('mode', MODES)
def test_gradcheck_fp64(mode):
    block = _with_mode(make_block(6), MODES[mode])
    assert gradcheck_block(block, 'cpu')


@pytest.mark.parametrize('seed', [1234, 1, 2])
@pytest.mark.parametrize('channels_last', [False, True], ids=['nchw', 'cl'])
@pytest.mark.parametrize('mode', MODES)
def test_bf16_output_and_gradients_within_twice_reference_error(channels_last, mode, seed):
    """bf16: each error vs the fp64 truth is at most twice the bf16 reference's own error, on
    several draws."""
    torch.manual_seed(seed)
    block = _with_mode(make_block(32, dtype=torch.bfloat16), MODES[mode])
    x = random_input((2, 32, 6, 5), dtype=torch.bfloat16, channels_last=channels_last)
    g = torch.randn(x.shape, dtype=torch.float64)
    truth, grads_truth = run_block(copy.deepcopy(block).double(), x.double(), 'reference', g)
    ref, grads_ref = run_block(block, x, 'reference', g.bfloat16())
    out, grads = run_block(block, x, 'cpu', g.bfloat16())
    assert out.dtype == torch.bfloat16
    checks = {'out': (out, ref, truth)}
    checks.update({k: (grads[k], grads_ref[k], grads_truth[k]) for k in grads_truth})
    bad = {}
    for k, (mine, theirs, exact) in checks.items():
        mine_err, ref_err = rel_err(mine, exact), rel_err(theirs, exact)
        assert ref_err > 0, k
        if not mine_err <= 2 * ref_err:
            bad[k] = (mine_err, ref_err)
    assert not bad, f"(cpu error, reference error) above the 2x rule: {bad}"


@pytest.mark.parametrize('deploy', [False, True], ids=['train_form', 'deploy_form'])
@pytest.mark.parametrize('mode', MODES)
def test_drop_path_same_seed_gives_reference_masks(deploy, mode):
    block = _with_mode(make_block(12, deploy=deploy, drop_path=0.5).train(), MODES[mode])
    check_same_seed_as_reference(block, random_input((8, 12, 3, 4)), 'cpu', tol=1e-10)


@pytest.mark.parametrize('mode', MODES)
# (8, 256, 7, 7): a whole-batch tile large enough that MKL threads its GEMMs.
@pytest.mark.parametrize('shape', [(3, 24, 13, 11), (8, 256, 7, 7)])
def test_deterministic_bitwise_twice_and_across_thread_counts(mode, short_sample_tiling, shape):
    block = _with_mode(make_block(shape[1], dtype=torch.float32), MODES[mode])
    x = random_input(shape, dtype=torch.float32)
    g = torch.randn(x.shape, dtype=torch.float32)
    threads = torch.get_num_threads()
    runs = []
    try:
        for n_threads in (threads, threads, 1):
            torch.set_num_threads(n_threads)
            runs.append(run_block(block, x, 'cpu', g))
    finally:
        torch.set_num_threads(threads)
    (out0, grads0), rest = runs[0], runs[1:]
    for out, grads in rest:
        assert torch.equal(out, out0)
        for k in grads0:
            assert torch.equal(grads[k], grads0[k]), k


@pytest.mark.parametrize('channels_last', [False, True], ids=['nchw', 'cl'])
def test_poisoned_outputs_are_fully_written(monkeypatch, channels_last, small_tiles):
    """With RIFORMER_POISON_OUTPUTS=1 every kernel output starts as NaN; results must be finite
    and identical to an unpoisoned run (so every element was written)."""
    block = make_block(20, dtype=torch.float32)
    x = random_input((2, 20, 7, 5), dtype=torch.float32, channels_last=channels_last)
    g = torch.randn(x.shape, dtype=torch.float32)
    results = {}
    for poison in ('0', '1'):
        monkeypatch.setenv('RIFORMER_POISON_OUTPUTS', poison)
        results[poison] = [run_block(_with_mode(block, rec), x, 'cpu', g) for rec in (True, False)]
    for (out_p, grads_p), (out, grads) in zip(results['1'], results['0']):
        assert torch.isfinite(out_p).all() and torch.equal(out_p, out)
        for k in grads:
            assert torch.isfinite(grads_p[k]).all() and torch.equal(grads_p[k], grads[k]), k


@pytest.mark.parametrize('channels_last', [False, True], ids=['nchw', 'cl'])
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16, torch.float64])
def test_emitted_moments_of_out_equal_moments_pass(channels_last, dtype, small_tiles,
                                                   monkeypatch):
    """mlp_forward(emit_moments=True) merges per-tile partial moments of exactly the values it
    stored: equal to riformer::moments of `out` (fp32 statistics tolerance 2e-6)."""
    from riformer_kernels import fold
    from riformer_kernels.params import BlockParams
    monkeypatch.setenv('RIFORMER_POISON_OUTPUTS', '1')
    n, c = 3, 13
    block = make_block(c, dtype=dtype)
    p = BlockParams.of(block)
    x = random_input((n, c, 9, 7), dtype=dtype, channels_last=channels_last, offset=3.0)
    with torch.no_grad():
        mean, var = torch.ops.riformer.moments(x)
        s, t, l1, l2 = p.fold_inputs(n, mean.dtype)
        cf = fold.fold_coefficients(mean, var, s, t, l1, p.g2, p.beta2, p.eps1, p.eps2)
        out, out_mean, out_var = torch.ops.riformer.mlp_forward(
            x, cf.A, cf.B, cf.a, cf.b, p.w1, p.b1, p.w2, p.b2, l2, True)
    true_var, true_mean = torch.var_mean(out.double(), dim=(2, 3), unbiased=False)
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    scale = true_mean.abs() + true_var.sqrt()
    assert ((out_mean.double() - true_mean).abs() <= tol * scale).all()
    assert rel_err(out_var, true_var) <= tol


def test_saved_for_backward_is_x_and_statistics_unless_recompute_is_off():
    """recompute=True keeps nothing of size 4C*H*W; recompute=False keeps exactly u."""
    block = make_block(16, dtype=torch.float32)
    x = random_input((2, 16, 6, 6), dtype=torch.float32).requires_grad_(True)
    for recompute in (True, False):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t,
                                                      lambda t: t):
            with rk.use_backend('cpu'):
                out = _with_mode(block, recompute)(x)
        big = [tuple(t.shape) for t in saved if t.numel() > x.numel()]
        assert big == ([] if recompute else [(2, 64, 6, 6)]), big
        assert sum(t.numel() == x.numel() for t in saved) == 1   # x itself
        out.sum().backward()


def test_set_recompute_overrides_the_block_attribute():
    block = make_block(8, dtype=torch.float32)
    assert dispatch.recompute_for(block) is True            # default
    block.recompute = False
    assert dispatch.recompute_for(block) is False
    try:
        rk.set_recompute(True)
        assert dispatch.recompute_for(block) is True
        rk.set_recompute(False)
        assert dispatch.recompute_for(make_block(8)) is False
    finally:
        rk.set_recompute(None)
    assert dispatch.recompute_for(block) is False
    with pytest.raises(TypeError):
        rk.set_recompute('yes')


def test_auto_picks_cpu_for_cpu_tensors(monkeypatch):
    monkeypatch.delenv('RIFORMER_BACKEND', raising=False)
    block = make_block(8, dtype=torch.float32)
    x = random_input((1, 8, 2, 2), dtype=torch.float32)
    assert 'chosen: cpu' in rk.explain_dispatch(block, x)


def test_unsupported_calls_fall_back_with_reasons(monkeypatch):
    monkeypatch.delenv('RIFORMER_BACKEND', raising=False)
    half = make_block(8, dtype=torch.float16)
    text = rk.explain_dispatch(half, random_input((1, 8, 2, 2), dtype=torch.float16))
    assert 'chosen: reference' in text and 'skipped cpu' in text and 'float16' in text
    dropout = make_block(8, drop=0.1).train()
    text = rk.explain_dispatch(dropout, random_input((1, 8, 2, 2)))
    assert 'chosen: reference' in text and 'dropout' in text
    # in eval mode dropout is the identity and the cpu backend runs it
    assert 'chosen: cpu' in rk.explain_dispatch(dropout.eval(), random_input((1, 8, 2, 2)))


def test_auto_declines_a_class_measured_slower_and_says_why(monkeypatch, isa_cap):
    """A call in a SLOWER_THAN_REFERENCE class goes to the reference under auto, with the
    measurement in explain_dispatch; by name the cpu kernels still run it; other modes, memory
    modes, shapes and ISA paths are unaffected."""
    monkeypatch.delenv('RIFORMER_BACKEND', raising=False)
    cpu_room = rk.backends.cpu
    monkeypatch.setattr(cpu_room, 'SLOWER_THAN_REFERENCE', (cpu_room.SlowerClass(
        levels=(isa_cap,), dtypes=(torch.float32,), mode='train', recompute=True,
        min_channels=16, max_tokens=50,
        measured='0.5x eager in a test'),))
    block = _with_mode(make_block(16, dtype=torch.float32), True)
    x = random_input((2, 16, 7, 7), dtype=torch.float32)
    text = rk.explain_dispatch(block, x)
    assert 'chosen: reference' in text and '0.5x eager in a test' in text, text
    assert f'ISA path {isa_cap}' in text and 'recompute=True' in text
    with torch.no_grad():
        assert 'chosen: cpu' in rk.explain_dispatch(block, x)          # forward: not the class
    assert 'chosen: cpu' in rk.explain_dispatch(_with_mode(block, False), x)   # save-u mode
    assert 'chosen: cpu' in rk.explain_dispatch(
        block, random_input((2, 16, 8, 8), dtype=torch.float32))                 # 64 tokens
    assert 'chosen: cpu' in rk.explain_dispatch(block.double(), x.double())    # another dtype
    block.float()
    assert 'chosen: cpu' in rk.explain_dispatch(
        _with_mode(make_block(8, dtype=torch.float32), True),
        random_input((2, 8, 7, 7), dtype=torch.float32))                         # C < 16
    other = next(lvl for lvl in cpu_room.ISA_LEVELS if lvl != isa_cap)
    monkeypatch.setattr(cpu_room, 'SLOWER_THAN_REFERENCE', (
        cpu_room.SLOWER_THAN_REFERENCE[0]._replace(levels=(other,)),))
    assert 'chosen: cpu' in rk.explain_dispatch(block, x)
    # Named, the class does not matter: the kernels run (and the cap's level is what ran).
    monkeypatch.setattr(cpu_room, 'SLOWER_THAN_REFERENCE', (
        cpu_room.SLOWER_THAN_REFERENCE[0]._replace(levels=(isa_cap,)),))
    _compare(block, x, tol=1e-5)


def test_slower_classes_are_well_formed():
    for cls in rk.backends.cpu.SLOWER_THAN_REFERENCE:
        assert set(cls.levels) <= set(rk.backends.cpu.ISA_LEVELS), cls
        assert set(cls.dtypes) <= set(rk.backends.cpu.SUPPORTED_DTYPES), cls
        assert cls.mode in ('train', 'forward') and cls.recompute in (None, True, False), cls
        assert cls.min_channels > 0 and cls.max_tokens > 0 and cls.measured, cls


def test_channels_last_in_channels_last_out_and_mixed_layout_grad():
    block = make_block(16, dtype=torch.float32)
    x = random_input((2, 16, 5, 5), dtype=torch.float32, channels_last=True).requires_grad_(True)
    with rk.use_backend('cpu'):
        out = block(x)
    assert out.is_contiguous(memory_format=torch.channels_last)
    g = torch.randn(out.shape)                       # NCHW gradient for a channels_last output
    out.backward(g)
    ref_x = x.detach().double().requires_grad_(True)
    with rk.use_backend('reference'):
        copy.deepcopy(block).double()(ref_x).backward(g.double())
    assert rel_err(x.grad, ref_x.grad) <= 1e-5


def test_non_contiguous_view_input():
    block = make_block(12, dtype=torch.float32)
    base = random_input((4, 24, 9, 10), dtype=torch.float32)
    x = base[::2, ::2, 1:, ::3]
    assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
    _compare(block, x, tol=1e-5)


def test_inference_without_grad_equals_training_forward():
    block = make_block(16, dtype=torch.float32)
    x = random_input((2, 16, 9, 9), dtype=torch.float32)
    with rk.use_backend('cpu'):
        with torch.no_grad():
            out_nograd = block(x)
        out_grad = block(x.clone().requires_grad_(True))
    assert torch.equal(out_nograd, out_grad.detach())


def test_large_offset_loses_no_more_precision_than_reference():
    cpu_err, ref_err, _, _ = large_offset_errors('cpu')
    # 2x + one ulp of slack: both are fp32 computations rounding differently.
    assert cpu_err <= 2 * ref_err + 1.2e-7, (cpu_err, ref_err)


@pytest.mark.parametrize('mode', MODES)
def test_recompute_and_saved_u_agree(mode):
    block = make_block(24, dtype=torch.float32)
    x = random_input((2, 24, 10, 10), dtype=torch.float32)
    g = torch.randn(x.shape)
    out_a, grads_a = run_block(_with_mode(block, True), x, 'cpu', g)
    out_b, grads_b = run_block(_with_mode(block, MODES[mode]), x, 'cpu', g)
    assert torch.equal(out_a, out_b)
    for k in grads_a:
        assert rel_err(grads_b[k], grads_a[k]) <= 1e-6, k


def test_ops_reject_bad_inputs_naming_the_problem():
    x = torch.randn(2, 8, 3, 3, dtype=torch.float16)
    coeffs = [torch.ones(2, 8)] * 4
    w1, b1 = torch.ones(32, 8, 1, 1, dtype=torch.float16), torch.zeros(32)
    w2, b2 = torch.ones(8, 32, 1, 1, dtype=torch.float16), torch.zeros(8)
    with pytest.raises(RuntimeError, match='float32, bfloat16 and float64'):
        torch.ops.riformer.mlp_forward(x, *coeffs, w1, b1, w2, b2, torch.ones(2, 8), False)
    x = x.float()
    with pytest.raises(RuntimeError, match="w1 has dtype"):
        torch.ops.riformer.mlp_forward(x, *coeffs, w1, b1, w2.float(), b2, torch.ones(2, 8),
                                       False)
    with pytest.raises(RuntimeError, match=r'l2 must have shape \(2, 8\)'):
        torch.ops.riformer.mlp_forward(x, *coeffs, w1.float(), b1, w2.float(), b2,
                                       torch.ones(8), False)
    g = torch.randn(2, 8, 3, 3).contiguous(memory_format=torch.channels_last)
    with pytest.raises(RuntimeError, match="grad_out must have x's memory format"):
        torch.ops.riformer.mlp_backward(g, x, torch.zeros(2, 8), *coeffs[:2], w1.float(), b1,
                                        w2.float(), b2, torch.ones(2, 8), None)


def test_chained_forward_moves_one_read_of_x_less():
    """Bytes moved (benchmarks.bytes_moved counts every op's inputs and outputs): a cpu block
    reads x for its moments, reads it again in the MLP kernel and writes out (~3 |x|); a block
    whose input carries the previous cpu block's output moments skips the first read (~2 |x|).
    The excess over 3 and 2 is the O(C^2) weights and O(N*C) statistics at this small N."""
    from benchmarks.bytes_moved import measure_bytes

    blocks = [make_block(64, dtype=torch.float32).eval() for _ in range(2)]
    x = random_input((2, 64, 56, 56), dtype=torch.float32)
    unit = x.numel() * x.element_size()
    with torch.no_grad(), rk.use_backend('cpu'):
        alone = measure_bytes(blocks[0], x)               # an isolated block: no moments out
        assert pipeline.chained_moments(alone['result'], 'cpu') is None
        blocks[0].chain_statistics = True                 # as a model's stage sets it
        unchained = measure_bytes(blocks[0], x)
        chained = measure_bytes(blocks[1], unchained['result'])
    assert torch.equal(alone['result'], unchained['result'])
    assert 'riformer.moments.default' in unchained['by_op']
    assert 'riformer.moments.default' not in chained['by_op']
    assert 3.0 <= unchained['total'] / unit <= 3.2
    assert 2.0 <= chained['total'] / unit <= 2.2


def _op_args(dtype, channels_last, N=2, C=12, H=5, W=3):
    """Inputs of every riformer::* cpu op, random, in the layout the kernels take."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    x = random_input((N, C, H, W), dtype=dtype, channels_last=channels_last)
    g = random_input((N, C, H, W), dtype=dtype, channels_last=channels_last)
    coeff = [torch.randn(N, C, dtype=acc) for _ in range(4)]
    w1, w2 = torch.randn(4 * C, C, 1, 1, dtype=dtype), torch.randn(C, 4 * C, 1, 1, dtype=dtype)
    b1, b2, l2 = torch.randn(4 * C, dtype=acc), torch.randn(C, dtype=acc), torch.randn(N, C, dtype=acc)
    mean = torch.randn(N, C, dtype=acc)
    u = random_input((N, 4 * C, H, W), dtype=dtype, channels_last=channels_last)
    ops = torch.ops.riformer
    return [
        (ops.moments.default, (x,)),
        (ops.mlp_forward.default, (x, *coeff, w1, b1, w2, b2, l2, True)),
        (ops.mlp_forward.default, (x, *coeff, w1, b1, w2, b2, l2, False)),
        (ops.mlp_forward_save_u.default, (x, *coeff, w1, b1, w2, b2, l2, True)),
        (ops.mlp_backward.default, (g, x, mean, coeff[0], coeff[1], w1, b1, w2, b2, l2, None)),
        (ops.mlp_backward.default, (g, x, mean, coeff[0], coeff[1], w1, b1, w2, b2, l2, u)),
        (ops.input_grad.default, (g, g.clone(), x, mean, *coeff)),
    ]


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16, torch.float64],
                         ids=['fp32', 'bf16', 'fp64'])
@pytest.mark.parametrize('channels_last', [False, True], ids=['nchw', 'cl'])
def test_ops_pass_opcheck_with_their_fake_implementations(dtype, channels_last, isa_cap):
    """Every riformer::* cpu op: schema, fake implementation (shapes, dtypes, strides of the
    real outputs) and AOT dispatch, by torch.library.opcheck."""
    for op, args in _op_args(dtype, channels_last):
        torch.library.opcheck(op, args, test_utils=('test_schema', 'test_faketensor',
                                                    'test_aot_dispatch_dynamic'))
