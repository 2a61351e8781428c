"""rk.capture_mixer_io / capture_stage_outputs: the recorded token-mixer input and output of every
block equal the reference modules' intermediates (forward and gradients), under every backend,
while the block itself still runs fused and unchanged."""
import copy

import pytest
import torch
import torch.nn.functional as F

import riformer_kernels as rk
from helpers import OpLog, make_block, random_input, rel_err
from riformer_kernels.reference import reference_block_forward

TINY = dict(layers=[1, 2, 1, 1], embed_dims=[8, 16, 24, 32])


def _case(name, dtype, tol):
    # A backend this process cannot run (triton without a GPU or the interpreter, cpu without
    # the built extension) is skipped with its own reason; on CI every one of them runs.
    info = rk.available_backends()[name]
    return pytest.param(name, dtype, tol, id=name,
                        marks=pytest.mark.skipif(not info.usable, reason=info.reason))


# fp64 backends: the capture is a different op order than norm1 -> conv -> subtract, so the
# two agree to fp64 rounding (a few ulps of values of order one); 1e-12 leaves ~1e3 ulps.
# triton has no fp64 path: fp32, where the reference itself is only good to ~1e-6 relative.
CASES = [_case('reference', torch.float64, 1e-12), _case('torch', torch.float64, 1e-12),
         _case('cpu', torch.float64, 1e-12), _case('triton', torch.float32, 3e-5)]


def x_device(backend):
    if backend == 'triton':
        from helpers import KERNEL_DEVICE
        return KERNEL_DEVICE
    return 'cpu'


def _reference_io(block, x):
    """The reference module's own intermediates: norm1(x), token_mixer(norm1(x)), the output."""
    n1 = block.norm1(x)
    return n1, block.token_mixer(n1), reference_block_forward(block, x)


def _grads(block, x, run, weights):
    """Gradients of x and every parameter of sum(w_in * in) + sum(w_mix * mix) + sum(w * out)."""
    block = copy.deepcopy(block)
    x = x.detach().clone().requires_grad_(True)
    n1, mix, out = run(block, x)
    loss = sum((w * v).sum() for w, v in zip(weights, (n1, mix, out)))
    loss.backward()
    return (n1, mix, out), {'x': x.grad, **{k: p.grad for k, p in block.named_parameters()}}


@pytest.mark.parametrize('backend, dtype, tol', CASES)
def test_captured_io_and_gradients_equal_reference_intermediates(backend, dtype, tol):
    block = make_block(12, dtype=dtype, device=x_device(backend))
    x = random_input((3, 12, 5, 4), dtype=dtype, device=x_device(backend))
    weights = [random_input(x.shape, dtype=dtype, device=x.device) for _ in range(3)]

    def captured(b, x):
        with rk.use_backend(backend), rk.capture_mixer_io(b) as records:
            out = b(x)
        assert len(records) == 1
        return records[0].input, records[0].output, out

    def reference(b, x):
        with rk.use_backend('reference'):
            return _reference_io(b, x)

    got, got_grads = _grads(block, x, captured, weights)
    ref, ref_grads = _grads(block.double(), x.double(), reference,
                            [w.double() for w in weights])
    for name, a, b in zip(('input', 'output', 'block output'), got, ref):
        assert rel_err(a, b) <= tol, name
    assert set(got_grads) == set(ref_grads)
    for k in ref_grads:
        assert rel_err(got_grads[k], ref_grads[k]) <= tol, k


def test_capture_is_differentiable_gradcheck():
    """Finite differences of the capture itself (x and every norm1/affine parameter), fp64."""
    block = make_block(5)
    x = random_input((2, 5, 3, 3)).requires_grad_(True)
    params = [block.norm1.weight, block.norm1.bias, block.token_mixer.affine.weight,
              block.token_mixer.affine.bias]

    def f(x, g1, b1, w, b):
        b_ = copy.deepcopy(block)
        for module, name, value in ((b_.norm1, 'weight', g1), (b_.norm1, 'bias', b1),
                                    (b_.token_mixer.affine, 'weight', w),
                                    (b_.token_mixer.affine, 'bias', b)):
            delattr(module, name)          # the parameter -> the tensor gradcheck perturbs
            setattr(module, name, value)
        io = rk.capture.riformer_mixer_io(b_, x)
        return io.input, io.output

    inputs = (x, *(p.detach().clone().requires_grad_(True) for p in params))
    # fp64 central differences; eps is gradcheck's default, atol/rtol are tighter than its
    # defaults (1e-5 / 1e-3): the capture is a per-(n, c) affine map, smooth in every input.
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


# Only where the extension is not built (it is in every `make test` run).
@pytest.mark.skipif(not rk.available_backends()['cpu'].usable,
                    reason=f"cpu backend unusable: {rk.available_backends()['cpu'].reason}")
def test_block_output_unchanged_and_still_fused_under_capture():
    block = make_block(16, dtype=torch.float32)
    x = random_input((2, 16, 6, 6), dtype=torch.float32).requires_grad_(True)
    with rk.use_backend('cpu'):
        plain = block(x)
        log = OpLog()
        with log, rk.capture_mixer_io(block) as records:
            captured = block(x)
    assert torch.equal(plain, captured)
    assert log.counts.get('riformer.mlp_forward.default') == 1, log.counts
    # the capture adds no GroupNorm / conv of its own: the mixer tensors are affine maps of x
    assert not any('group_norm' in op or 'convolution' in op for op in log.ops), log.counts
    assert len(records) == 1 and records[0].input.requires_grad
    with rk.use_backend('cpu'), rk.capture_mixer_io(block) as by_keyword:
        block(x=x)
    assert torch.equal(by_keyword[0].output, records[0].output)


def test_model_records_every_block_in_forward_order():
    """Against hooks on the reference modules of a whole backbone, fp64, under the cpu (or the
    torch) backend."""
    backend = 'cpu' if rk.available_backends()['cpu'].usable else 'torch'
    model = rk.RIFormerClassifier(TINY, num_classes=5, in_channels=3)
    rk.testing.randomize_(model)
    model = model.double()
    x = random_input((2, 3, 32, 32))
    ref = []
    hooks = [blk.token_mixer.register_forward_hook(
        lambda m, a, out: ref.append((a[0], out))) for blk in model.modules()
        if isinstance(blk, rk.RIFormerBlock)]
    with rk.use_backend('reference'):
        expected_logits = model(x)
    for h in hooks:
        h.remove()
    with rk.use_backend(backend), rk.capture_mixer_io(model) as records:
        logits = model(x)
    assert len(records) == len(ref) == 5
    for rec, (n1, mix) in zip(records, ref):
        assert rel_err(rec.input, n1) <= 1e-12
        assert rel_err(rec.output, mix) <= 1e-12
    assert rel_err(logits, expected_logits) <= 1e-12
    # hooks are gone after the context: a second forward records nothing
    model(x)
    assert len(records) == 5


def test_poolformer_records_its_mixer():
    block = rk.PoolFormerBlock(6)
    rk.testing.randomize_(block)
    block = block.double()
    x = random_input((2, 6, 5, 7))
    with rk.capture_mixer_io(block) as records:
        block(x)
    n1 = F.group_norm(x, 1, block.norm1.weight, block.norm1.bias, 1e-5)
    pooled = F.avg_pool2d(n1, 3, 1, 1, count_include_pad=False)
    assert len(records) == 1
    assert rel_err(records[0].input, n1) <= 1e-14
    assert rel_err(records[0].output, pooled - n1) <= 1e-14
    assert block.mixer_sinks == []


def test_stage_outputs_are_the_stages_last_block_outputs():
    model = rk.RIFormer(TINY).double()
    x = random_input((2, 3, 32, 32))
    with rk.use_backend('reference'):
        with rk.capture_stage_outputs(model) as feats:
            model(x)
        expected = []
        h = model.patch_embed(x)
        for m in model.network:
            h = m(h)
            if isinstance(m, torch.nn.Sequential):
                expected.append(h)
    assert [tuple(f.shape) for f in feats] == [(2, 8, 8, 8), (2, 16, 4, 4), (2, 24, 2, 2),
                                              (2, 32, 1, 1)]
    for f, e in zip(feats, expected):
        assert torch.equal(f, e)


def test_capture_refuses_what_has_no_mixer():
    block = make_block(4)
    block.switch_to_deploy()
    with pytest.raises(ValueError, match='deploy form'):
        with rk.capture_mixer_io(block):
            pass
    with pytest.raises(ValueError, match='no RIFormer or PoolFormer block'):
        with rk.capture_mixer_io(torch.nn.Linear(2, 2)):
            pass
    with pytest.raises(TypeError, match='nn.Module'):
        with rk.capture_mixer_io('model'):
            pass
    live = make_block(4)
    with pytest.raises(ValueError, match='deploy form'):
        with rk.capture_mixer_io(live):
            live.switch_to_deploy()
            live(random_input((1, 4, 2, 2)))
