"""Fused blocks under torch.autocast: the mixed-precision mode of the kernel sets.

Under autocast an fp32 block runs with the MLP weights (and so every GEMM operand: z, h, the
backward's dO and du) in the autocast dtype with fp32 accumulation, while x, the output, the
output's gradient, dz and dx stay fp32 -- the residual stream the reference under autocast keeps
in fp32 (its fp32 layer scales promote `x + l1 * mixer`, so it returns fp32 for fp32 and for
half inputs alike). The statistics, the fold and the O(C) parameters are fp32 throughout. A
half input is cast to fp32 by the pipeline first.

Accuracy rule: each error against the fp64 reference -- the output and the gradient of x and of
every parameter -- is at most twice the error of the reference run under the same autocast, on
the same input and output gradient, over several seeds, both forms, with drop path, for fp32
inputs and for inputs in the autocast dtype (a stage's first block after a conv). The output
dtype (and x's gradient's) is the reference's.

The triton kernels run under the interpreter on CPU tensors here (CPU autocast, bf16 and fp16),
and compiled on a GPU under CUDA autocast (marker `gpu`); the cuda kernels under the SIMT
emulator on CPU tensors (RIFORMER_CUDA_EMULATE=1, set by tests/helpers.py) under CPU autocast in
both half dtypes -- the kernels a GPU runs under CUDA autocast, with every emulator check on.
"""
import copy
import dataclasses

import pytest
import torch

import riformer_kernels as rk
from riformer_kernels import pipeline
import helpers
from helpers import make_block, random_input, rel_err

AUTOCAST_DTYPE = torch.bfloat16    # what CPU autocast runs; the CUDA path is the same code


def _usable(name):
    info = rk.available_backends()[name]
    return pytest.param(name, marks=pytest.mark.skipif(not info.usable, reason=info.reason))


def _emulated_cuda():
    """The `cuda` kernel set on CPU tensors: its emulated build (helpers.py sets
    RIFORMER_CUDA_EMULATE=1 where there is no GPU; with a GPU it takes CUDA tensors only, and
    the gpu-marked test below runs it)."""
    info = rk.available_backends()['cuda']
    if not info.usable:          # no g++ for the emulated build, or no kernels at all
        why = info.reason
    elif not helpers.CUDA_EMULATED:   # a GPU machine: CUDA tensors only
        why = 'the cuda kernel set runs on CPU tensors only emulated (RIFORMER_CUDA_EMULATE=1)'
    else:
        return pytest.param('cuda')
    return pytest.param('cuda', marks=pytest.mark.skip(reason=why))


class _masks_drawn_in_fp32:
    """torch.rand draws in fp32 (then casts) while active: the fp64 truth run then draws the
    drop-path masks of the fp32 runs (an fp64 draw consumes the generator differently and gives
    other masks: the truth would differ from both runs by whole branches)."""
    def __enter__(self):
        self._rand = torch.rand

        def rand(*size, dtype=None, **kwargs):
            return self._rand(*size, dtype=torch.float32, **kwargs).to(dtype or torch.float32)
        torch.rand = rand
        return self

    def __exit__(self, *exc):
        torch.rand = self._rand
        return False


def _run(block, x, g, backend, autocast, dtype=AUTOCAST_DTYPE):
    block = copy.deepcopy(block)
    x = x.detach().clone().requires_grad_(True)
    with rk.use_backend(backend), torch.autocast(x.device.type, dtype=dtype, enabled=autocast):
        out = block(x)
    out.backward(g.to(out.dtype))
    grads = {'x': x.grad}
    grads.update({n: p.grad for n, p in block.named_parameters()})
    return out.detach(), grads


def _check_twice_reference_error(backend, deploy, seed, shape, device='cpu',
                                 dtype=AUTOCAST_DTYPE, x_dtype=torch.float32,
                                 channels_last=False, **block_kwargs):
    """The rule for one draw: block in fp32, x in `x_dtype`, autocast in `dtype`."""
    torch.manual_seed(seed)
    block = make_block(shape[1], deploy=deploy, dtype=torch.float32, device=device,
                       **block_kwargs)
    x = random_input(shape, dtype=x_dtype, device=device, channels_last=channels_last)
    # The output is fp32 under autocast (both runs), so autograd hands it an fp32 gradient.
    g = torch.randn(shape, dtype=torch.float64).float().to(device)
    # One seed for the three runs: with drop path they draw the same masks (a mask drawn
    # differently would change the output by the whole branch, far above the rule).
    torch.manual_seed(seed)
    with _masks_drawn_in_fp32():
        truth, grads_truth = _run(copy.deepcopy(block).double(), x.double(), g.double(),
                                  'reference', False)
    torch.manual_seed(seed)
    ref, grads_ref = _run(block, x, g, 'reference', True, dtype)
    torch.manual_seed(seed)
    out, grads = _run(block, x, g, backend, True, dtype)
    # A drop-in block: the reference's output dtype under autocast (fp32: the residual stream),
    # x's gradient in x's dtype, the parameters' in fp32.
    assert ref.dtype == torch.float32 and out.dtype == ref.dtype
    assert grads['x'].dtype == grads_ref['x'].dtype == x_dtype
    assert all(grads[k].dtype == torch.float32 for k in grads if k != 'x')
    checks = {k: (rel_err(grads[k], grads_truth[k]), 2 * rel_err(grads_ref[k], grads_truth[k]))
              for k in grads_truth}
    checks['out'] = (rel_err(out, truth), 2 * rel_err(ref, truth))
    assert all(bound > 0 for _, bound in checks.values())
    bad = {k: v for k, v in checks.items() if not v[0] <= v[1]}
    assert not bad, f"(fused error, bound) above the rule: {bad}"


_X_DTYPES = pytest.mark.parametrize('x_dtype', [torch.float32, AUTOCAST_DTYPE],
                                    ids=['fp32_input', 'bf16_input'])
_FORMS = pytest.mark.parametrize('deploy', [False, True], ids=['train_form', 'deploy_form'])


@pytest.mark.parametrize('seed', [1234, 1, 2, 3])
@_X_DTYPES
@_FORMS
@pytest.mark.parametrize('backend', [_usable('cpu')])
def test_cpu_under_autocast_within_twice_reference_error(backend, deploy, x_dtype, seed):
    _check_twice_reference_error(backend, deploy, seed, (2, 32, 6, 5), x_dtype=x_dtype)


@_X_DTYPES
@pytest.mark.parametrize('backend', [_usable('cpu')])
def test_cpu_under_autocast_short_wide_samples(backend, x_dtype):
    """S12 stage-4 width on 7x7 samples: the kernels' whole-batch tile and the weight-2 GEMM
    route of the backward (T < 128), both forms."""
    for deploy in (False, True):
        _check_twice_reference_error(backend, deploy, 5, (2, 320, 7, 7), x_dtype=x_dtype)


@_X_DTYPES
@pytest.mark.parametrize('backend', [_usable('cpu')])
def test_cpu_under_autocast_channels_last_and_saved_u(backend, x_dtype):
    """The channels_last tile code, and recompute=False (u saved in bf16 by the forward, read
    by the backward) in both layouts, under autocast."""
    for seed, channels_last, recompute in ((8, True, True), (9, True, False),
                                           (10, False, False)):
        _check_twice_reference_error(backend, seed % 2 == 0, seed, (2, 16, 5, 6),
                                     x_dtype=x_dtype, channels_last=channels_last,
                                     recompute=recompute)


@pytest.mark.gpu
@pytest.mark.parametrize('x_dtype', ['fp32', 'autocast'])
@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16], ids=['fp16', 'bf16'])
@_FORMS
@pytest.mark.parametrize('backend', ['triton', 'cuda'])
def test_under_cuda_autocast_at_s12_stage_widths(backend, deploy, dtype, x_dtype):
    """CUDA autocast, both half dtypes, compiled kernels (triton's, and the cuda kernel set's
    compiled CUDA), S12's stage 1 and 3 widths."""
    xd = torch.float32 if x_dtype == 'fp32' else dtype
    for seed, shape in ((0, (4, 64, 14, 14)), (1, (4, 320, 7, 7))):
        _check_twice_reference_error(backend, deploy, seed, shape, device='cuda', dtype=dtype,
                                     x_dtype=xd)


@_X_DTYPES
@pytest.mark.parametrize('backend', [_usable('cpu'), _usable('triton')])
def test_drop_path_under_autocast_draws_the_reference_masks(backend, x_dtype):
    """Training with drop path 0.5 on 8 samples: under the same seed the fused block draws the
    reference's masks (the same RNG calls) and the same rule holds; the masks are active."""
    device = helpers.KERNEL_DEVICE if backend == 'triton' else 'cpu'
    for seed in (3, 4):
        _check_twice_reference_error(backend, False, seed, (8, 16, 3, 4), device=device,
                                     x_dtype=x_dtype, drop_path=0.5)
    torch.manual_seed(3)
    block = make_block(16, dtype=torch.float32, drop_path=0.5, device=device)
    x = random_input((8, 16, 3, 4), dtype=x_dtype, device=device)
    with torch.autocast(device.type if isinstance(device, torch.device) else device,
                        dtype=AUTOCAST_DTYPE), rk.use_backend(backend):
        torch.manual_seed(3)
        trained = block(x)
        evaluated = block.eval()(x)
    assert not torch.allclose(trained, evaluated)


_TRITON_AUTOCAST = pytest.mark.parametrize(
    'dtype, x_dtype', [(torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16),
                       (torch.float16, torch.float32), (torch.float16, torch.float16)],
    ids=['bf16_fp32_input', 'bf16_bf16_input', 'fp16_fp32_input', 'fp16_fp16_input'])


@pytest.mark.parametrize('seed', [1234, 7])
@_TRITON_AUTOCAST
@_FORMS
@pytest.mark.parametrize('backend', [_usable('triton')])
def test_triton_under_autocast_within_twice_reference_error(backend, deploy, dtype, x_dtype,
                                                            seed):
    """Small C: the flash forward and the backward's small path. On CPU tensors this is the
    interpreter under CPU autocast (fp16 too: the CUDA autocast dtypes), the same kernels."""
    _check_twice_reference_error(backend, deploy, seed, (2, 16, 4, 3),
                                 device=helpers.KERNEL_DEVICE, dtype=dtype, x_dtype=x_dtype)


@_TRITON_AUTOCAST
@pytest.mark.parametrize('backend', [_usable('triton')])
def test_triton_under_autocast_two_gemm_and_large_backward(backend, dtype, x_dtype,
                                                           monkeypatch):
    """The two-GEMM forward and the backward's large-C path (h/du scratch in the half dtype, dz
    and dx in fp32), forced at a small C so the interpreter runs them quickly."""
    from riformer_kernels.backends.triton import backward as tb
    from riformer_kernels.backends.triton import forward as tfw
    monkeypatch.setattr(tfw, 'mlp_path', lambda c, dt: 'two_gemm')
    monkeypatch.setattr(tb, 'SMALL_PATH_MAX_CHANNELS', 0)
    for deploy, seed in ((False, 21), (True, 22)):
        _check_twice_reference_error(backend, deploy, seed, (2, 24, 3, 5),
                                     device=helpers.KERNEL_DEVICE, dtype=dtype,
                                     x_dtype=x_dtype)


_CUDA_AUTOCAST = pytest.mark.parametrize(
    'dtype, x_dtype', [(torch.bfloat16, torch.float32), (torch.float16, torch.float16)],
    ids=['bf16_fp32_input', 'fp16_fp16_input'])


@pytest.mark.parametrize('seed', [31, 32])
@_CUDA_AUTOCAST
@_FORMS
@pytest.mark.parametrize('backend', [_emulated_cuda()])
def test_cuda_under_autocast_within_twice_reference_error(backend, deploy, dtype, x_dtype, seed):
    """The cuda kernel set's mixed-precision mode, emulated: C = 32 takes the tensor-core
    forward (fp32 x and out around fp16/bf16 mma operands) and the FFMA backward (fp32
    activations, half weights widened on load)."""
    _check_twice_reference_error(backend, deploy, seed, (2, 32, 4, 3), dtype=dtype,
                                 x_dtype=x_dtype)


@pytest.mark.parametrize('backend', [_emulated_cuda()])
def test_cuda_under_autocast_other_kernels_layouts_and_saved_u(backend):
    """The rest of the mixed mode's launches: the FFMA forward with half weights (C = 24 is
    no multiple of 16), the two-GEMM path (h scratch in the half dtype) on both kernels,
    channels_last, and recompute=False (u saved in the weights' dtype, read by phase 1)."""
    from riformer_kernels.backends import cuda_emu
    assert cuda_emu.mlp_plan(24, 96, torch.bfloat16).kernel == 'ffma'
    assert cuda_emu.mlp_plan(32, 128, torch.float16).kernel == 'mma'
    cases = ((41, (2, 24, 3, 4), torch.bfloat16, dict(channels_last=True)),
             (42, (2, 32, 3, 3), torch.float16, dict(recompute=False)),
             (43, (2, 24, 4, 3), torch.float16, dict(channels_last=True, recompute=False)))
    for seed, shape, dtype, kwargs in cases:
        _check_twice_reference_error(backend, seed % 2 == 0, seed, shape, dtype=dtype, **kwargs)
    real_plan = cuda_emu.mlp_plan
    try:
        cuda_emu.mlp_plan = lambda c, hd, dt, kernel='auto', path='auto': real_plan(
            c, hd, dt, kernel, 'two_gemm')
        for seed, c, dtype in ((44, 32, torch.bfloat16), (45, 24, torch.float16)):
            _check_twice_reference_error(backend, seed % 2 == 0, seed, (2, c, 3, 4), dtype=dtype)
    finally:
        cuda_emu.mlp_plan = real_plan


@pytest.mark.parametrize('backend', [_usable('cpu')])
def test_autocast_runs_the_fused_kernels_and_says_so(backend, monkeypatch):
    """auto picks the fused kernel set under autocast (no reference fallback), the training
    path runs the pipeline's autograd Function, and explain_dispatch says what is cast."""
    monkeypatch.delenv('RIFORMER_BACKEND', raising=False)
    block = make_block(16, dtype=torch.float32)
    x = random_input((2, 16, 4, 4), dtype=torch.float32).requires_grad_(True)
    with torch.autocast('cpu', dtype=AUTOCAST_DTYPE):
        text = rk.explain_dispatch(block, x)
        out = block(x)
    assert f'chosen: {backend}' in text, text
    assert 'note: autocast bfloat16' in text and 'statistics' in text, text
    assert 'GEMMs run on bfloat16 operands' in text and 'stay float32' in text, text
    assert out.dtype == torch.float32       # the reference's under autocast
    # A bf16 input: cast to fp32 by the pipeline, said so; the output is fp32 as well.
    xb = x.detach().to(AUTOCAST_DTYPE)
    with torch.autocast('cpu', dtype=AUTOCAST_DTYPE):
        assert 'bfloat16 input is cast to float32' in rk.explain_dispatch(block, xb)
        assert block(xb).dtype == torch.float32
    # Outside autocast no note: the call runs in the input's dtype.
    assert 'note:' not in rk.explain_dispatch(block, x)


def test_kernel_sets_without_the_mixed_mode_decline_autocast(monkeypatch):
    """A kernel set that does not declare the mixed-precision mode for the autocast dtype
    declines (the pipeline's check, before the kernel set's own `supports`): `auto` runs the
    next backend, a backend asked for by name raises with the reason. The cpu kernels declare
    bf16 only, so CPU autocast in fp16 is such a call; a stand-in without the mode says why."""
    monkeypatch.delenv('RIFORMER_BACKEND', raising=False)
    block = make_block(16, dtype=torch.float32)
    x = random_input((2, 16, 4, 4), dtype=torch.float32)
    stand_in = dataclasses.replace(pipeline.kernel_set('cpu'), mixed_precision=())
    with torch.autocast('cpu', dtype=AUTOCAST_DTYPE):
        reason = pipeline._autocast_supports(stand_in, block, x)
        assert reason is not None and 'no mixed-precision mode' in reason, reason
        assert pipeline._autocast_supports(pipeline.kernel_set('cpu'), block, x) is None
    if not rk.available_backends()['cpu'].usable:
        return
    with torch.autocast('cpu', dtype=torch.float16):
        text = rk.explain_dispatch(block, x)
        assert 'chosen: reference' in text and 'no mixed-precision mode' in text, text
        assert block(x).dtype == torch.float32        # the reference ran
        with rk.use_backend('cpu'), pytest.raises(rk.BackendUnavailableError,
                                                  match='float16 GEMM operands'):
            block(x)


@pytest.mark.parametrize('backend', [_usable('cpu')])
def test_measured_slower_classes_do_not_decline_mixed_calls(backend, monkeypatch):
    """`SLOWER_THAN_REFERENCE` holds plain fp32 calls measured against the eager fp32
    reference; the kernel set judges an autocast call on an fp32 stand-in, which must not fall
    into those classes (against the reference under autocast the mixed mode measured faster).
    A wide, short training call: declined in plain fp32 at every ISA level, run under autocast."""
    monkeypatch.delenv('RIFORMER_BACKEND', raising=False)
    block = make_block(320, dtype=torch.float32)
    x = random_input((1, 320, 2, 2), dtype=torch.float32).requires_grad_(True)
    assert 'skipped cpu: measured slower' in rk.explain_dispatch(block, x)
    with torch.autocast('cpu', dtype=AUTOCAST_DTYPE):
        assert f'chosen: {backend}' in rk.explain_dispatch(block, x)


@pytest.mark.parametrize('backend', [_usable('cpu')])
def test_a_stage_under_autocast_keeps_chained_statistics(backend):
    """A bf16 input (a conv's output under autocast) to a stage: the first block casts it to
    fp32; the second block's input is the first's fp32 output, where the cast is a no-op, so
    the chained moments the first block attached still describe it and the second skips its
    moments pass."""
    b1, b2 = (make_block(16, dtype=torch.float32).eval() for _ in range(2))
    b1.chain_statistics = True
    x = random_input((2, 16, 5, 5), dtype=AUTOCAST_DTYPE)
    counter = helpers.OpLog()
    with torch.no_grad(), rk.use_backend(backend), torch.autocast('cpu', dtype=AUTOCAST_DTYPE):
        y = b1(x)
        assert y.dtype == torch.float32
        assert pipeline.chained_moments(y, backend) is not None
        with counter:
            b2(y)
    assert counter.counts.get('riformer.moments.default') is None, counter.counts


@pytest.mark.parametrize('backend', [_usable('cpu')])
def test_autocast_block_compiles_fullgraph_and_matches_eager(backend):
    """Under autocast the casts and the autocast-disabled region trace into one graph; the
    aot_eager backend runs the same kernels eagerly, so output and gradients are the same bits."""
    block = make_block(16, dtype=torch.float32)
    x = random_input((2, 16, 5, 4), AUTOCAST_DTYPE)
    results = []
    for compiled in (False, True):
        b, xi = copy.deepcopy(block), x.clone().requires_grad_(True)
        run = torch.compile(b, fullgraph=True, backend='aot_eager') if compiled else b
        with torch.autocast('cpu', dtype=AUTOCAST_DTYPE), rk.use_backend(backend):
            out = run(xi)
        out.float().square().sum().backward()
        results.append([out, xi.grad] + [p.grad for p in b.parameters()])
    for got, want in zip(*results[::-1]):
        assert torch.equal(got, want)


@pytest.mark.parametrize('backend', [_usable('cpu')])
def test_float64_under_autocast_stays_float64(backend):
    """Autocast never casts float64 operands, so neither does the pipeline: an fp64 block under
    autocast is the fp64 computation, within rounding of the fp64 reference."""
    block = make_block(8)
    x = random_input((2, 8, 3, 3))
    with torch.autocast('cpu', dtype=AUTOCAST_DTYPE):
        assert 'note:' not in rk.explain_dispatch(block, x)
        with rk.use_backend(backend):
            out = block(x)
        with rk.use_backend('reference'):
            want = block(x)
    assert out.dtype == torch.float64 and rel_err(out, want) <= 1e-10
