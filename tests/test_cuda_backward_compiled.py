"""The torch CUDA binding of the CUDA backward (csrc/cuda/mlp_backward.cu):
riformer::cuda_mlp_backward_weights_and_sums and riformer::cuda_mlp_backward_dx.

* here (no GPU needed): the schemas are registered, with CUDA kernels when the extension was
  built with CUDA; on fake CUDA tensors (FakeTensorMode: shapes, dtypes and devices only, the
  ops' fake implementations instead of kernels) a training step of the `cuda` backend dispatches
  to the two compiled ops -- not the emulated ones -- with no tensor built from host data, and
  the gradients have the parameters' shapes and dtypes and dx x's layout; the step also traces
  (make_fx) into a graph holding the two ops;
* on a GPU (marker `gpu`): the compiled ops against the emulated kernels (the same launch
  sequence, on CPU copies) and the float64 truth, every output, both layouts, FFMA and mma,
  recomputed and saved u; every gradient of a block, both forms, both memory modes, against the
  float64 reference; and bitwise determinism over two runs.
"""
import copy
import warnings

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx

import helpers
import riformer_kernels as rk
from helpers import OpLog, make_block, random_input, rel_err
from riformer_kernels import _ext
from riformer_kernels.backends import cuda as cuda_backend
from riformer_kernels.backends import cuda_emu

OPS = ('cuda_mlp_backward_weights_and_sums', 'cuda_mlp_backward_dx')
COMPILED = tuple(f'riformer.{op}.default' for op in OPS)
EMULATED = ('riformer_cuda_emu.mlp_backward_weights_and_sums.default',
            'riformer_cuda_emu.mlp_backward_dx.default')

needs_schemas = pytest.mark.skipif(
    _ext._C is None or not all(hasattr(torch.ops.riformer, op) for op in OPS),
    reason=_ext.LOAD_ERROR or 'this build of riformer_kernels._C predates the CUDA backward '
                              'ops (rebuild: python setup.py build_ext --inplace)')


@needs_schemas
def test_backward_ops_have_schemas_and_cuda_kernels():
    for op in OPS:
        schema = str(getattr(torch.ops.riformer, op).default._schema)
        assert 'Tensor? u' in schema, schema
    if not _ext.has_kernel('moments', 'CUDA'):
        pytest.skip('the extension was built without CUDA kernels (RIFORMER_SKIP_CUDA, or no '
                    'CUDA toolkit / CUDA build of torch at build time)')
    for op in OPS:
        assert _ext.has_kernel(op, 'CUDA'), op
        assert not _ext.has_kernel(op, 'CPU'), op   # CPU tensors take the emulated ops
    assert set(OPS) <= set(cuda_backend.COMPILED_OPS)


def _fake_cuda_step(block, shape, dtype, channels_last, recompute, trace=False):
    """Forward and the Function's backward on fake CUDA tensors under the `cuda` backend, with
    the compiled kernels taken as available (no device here): (x, out, grads, op log, block,
    graph or None). The backward is called through the graph node (`grad_fn.apply`): the
    autograd engine would want a real CUDA context."""
    b = copy.deepcopy(block)
    b.recompute = recompute
    graph = None
    with warnings.catch_warnings(), FakeTensorMode(allow_non_fake_inputs=True):
        warnings.simplefilter('ignore')      # data_ptr of a fake tensor (the chain record)
        b = b.to('cuda', dtype)
        x = torch.randn(shape, device='cuda', dtype=dtype)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x.requires_grad_(True)

        def step(x):
            out = b(x)
            return out, out.grad_fn.apply(torch.ones_like(out), None, None)

        log = OpLog()
        with log, rk.use_backend('cuda'):
            out, grads = step(x)
            if trace:
                graph = make_fx(step)(x)
    return x, out, grads, log, b, graph


FAKE_CASES = [  # (dtype, C, channels_last): FFMA fp32/fp64, mma bf16/fp16, FFMA fp16 (C = 40)
    (torch.float32, 64, False), (torch.float32, 64, True), (torch.float64, 24, True),
    (torch.bfloat16, 64, True), (torch.float16, 32, False), (torch.float16, 40, True),
]


@needs_schemas
@pytest.mark.parametrize('recompute', [True, False], ids=['recompute', 'save-u'])
@pytest.mark.parametrize('deploy', [False, True], ids=['training-form', 'deploy-form'])
@pytest.mark.parametrize('dtype,c,channels_last', FAKE_CASES,
                         ids=lambda v: str(v)[6:] if isinstance(v, torch.dtype) else
                         ('cl' if v is True else 'nchw' if v is False else f'C{v}'))
def test_fake_cuda_training_step_dispatches_to_the_compiled_ops(monkeypatch, dtype, c,
                                                                channels_last, deploy,
                                                                recompute):
    monkeypatch.setattr(cuda_backend, '_COMPILED', None)
    block = make_block(c, deploy=deploy, dtype=torch.float32).train()
    x, out, grads, log, b, _ = _fake_cuda_step(block, (4, c, 7, 9), dtype, channels_last,
                                               recompute)
    assert type(out.grad_fn).__name__ == 'FusedBlockFunctionBackward'
    assert out.device.type == 'cuda' and out.dtype == dtype
    for name in COMPILED:
        assert log.counts.get(name) == 1, (name, log.counts)
    for name in EMULATED:
        assert name not in log.counts, name
    forward = 'riformer.mlp_forward_save_u.default' if not recompute else \
        'riformer.mlp_forward.default'
    assert log.counts.get(forward) == 1, log.counts
    assert not log.host_to_device, log.host_to_device
    # grads: x, s, t, l1, l2, g2, beta2, w1, b1, w2, b2 (pipeline.FusedBlockFunction)
    dx, *rest = grads[:11]
    assert dx.shape == x.shape and dx.dtype == dtype and dx.device == x.device
    assert dx.is_contiguous(memory_format=torch.channels_last) == channels_last
    assert all(t is not None and t.device.type == 'cuda' for t in rest)
    mlp = b.mlp
    for got, p in zip(grads[7:11], (mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias)):
        assert got.shape == p.shape and got.dtype == p.dtype


@needs_schemas
def test_fake_cuda_training_step_traces_into_the_compiled_ops(monkeypatch):
    # make_fx over the fake step: the graph holds the two backward ops as opaque calls (what
    # torch.compile's tracing sees: the fakes give every shape, no kernel runs), with the saved
    # u passed to phase 1 only.
    monkeypatch.setattr(cuda_backend, '_COMPILED', None)
    block = make_block(32, dtype=torch.float32).train()
    *_, graph = _fake_cuda_step(block, (2, 32, 5, 7), torch.bfloat16, True, recompute=False,
                                trace=True)
    calls = {str(n.target): n for n in graph.graph.nodes if n.op == 'call_function'}
    assert set(COMPILED) <= set(calls), sorted(calls)
    p1, p2 = (calls[name] for name in COMPILED)
    assert p1.args[-1] is not None and p2.args[-1] is None
    assert not any(name.startswith('riformer_cuda_emu') for name in calls)


class _cuda_autocast_without_a_device:
    """CUDA autocast switched on through the global setters: `torch.autocast('cuda')` disables
    itself where no CUDA device is visible, and the fake step needs the pipeline to see CUDA
    autocast on. Restores the previous state."""
    def __init__(self, dtype):
        self.dtype = dtype

    def __enter__(self):
        self.saved = (torch.is_autocast_enabled('cuda'), torch.get_autocast_dtype('cuda'))
        torch.set_autocast_enabled('cuda', True)
        torch.set_autocast_dtype('cuda', self.dtype)
        return self

    def __exit__(self, *exc):
        torch.set_autocast_enabled('cuda', self.saved[0])
        torch.set_autocast_dtype('cuda', self.saved[1])
        return False


@needs_schemas
@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16], ids=str)
def test_fake_cuda_autocast_step_runs_the_compiled_mixed_mode(monkeypatch, dtype):
    """Under CUDA autocast an fp32 block on CUDA tensors runs the cuda kernel set's
    mixed-precision mode through the compiled ops: the forward op gets fp32 x and biases with
    half weights and saves u in the weights' dtype, the backward ops get fp32 g and x with
    the same half weights, and the output and dx are fp32 (the reference's dtype)."""
    monkeypatch.setattr(cuda_backend, '_COMPILED', None)
    block = make_block(32, dtype=torch.float32).train()
    with _cuda_autocast_without_a_device(dtype):
        x, out, grads, log, *_ = _fake_cuda_step(block, (2, 32, 5, 7), torch.float32, False,
                                                 recompute=False)
        *_, graph = _fake_cuda_step(block, (2, 32, 5, 7), torch.float32, False,
                                    recompute=False, trace=True)
    assert out.dtype == torch.float32 and grads[0].dtype == torch.float32
    for name in (*COMPILED, 'riformer.mlp_forward_save_u.default'):
        assert log.counts.get(name) == 1, (name, log.counts)
    assert not any(name.startswith('riformer_cuda_emu') for name in log.counts)
    calls = {str(n.target): n for n in graph.graph.nodes if n.op == 'call_function'}

    def dtypes(node, idx):
        return [node.args[i].meta['val'].dtype for i in idx]
    forward = calls['riformer.mlp_forward_save_u.default']   # x, A, B, a, b, w1, b1, w2, b2, ..
    assert dtypes(forward, (0, 6, 8)) == [torch.float32] * 3
    assert dtypes(forward, (5, 7)) == [dtype] * 2
    p1 = calls[COMPILED[0]]     # g, x, mean, A, B, l2, w1, b1, w2, b2, u
    assert dtypes(p1, (0, 1, 7, 9)) == [torch.float32] * 4
    assert dtypes(p1, (6, 8, 10)) == [dtype] * 3


@needs_schemas
def test_fakes_match_the_emulated_ops_outputs():
    # The compiled ops return what the emulated ops return (the kernel set treats them alike):
    # the fakes of both agree on shapes, dtypes and strides, both layouts and a copied view.
    args_of = _kernel_inputs(2, 24, 96, 5, 7, torch.bfloat16, channels_last=True)
    with FakeTensorMode(allow_non_fake_inputs=True):
        for x_of in (lambda x: x, lambda x: x.contiguous(), lambda x: x[..., 1:]):
            x, g, (mean, A, B, l2), w, pqrs = args_of
            x, g = x_of(x), x_of(g)
            emu = cuda_emu.mlp_backward_weights_and_sums_op(g, x, mean, A, B, l2, *w, None)
            comp = torch.ops.riformer.cuda_mlp_backward_weights_and_sums(g, x, mean, A, B, l2,
                                                                          *w, None)
            for a, b in zip(emu, comp):
                assert (a.shape, a.dtype, a.stride()) == (b.shape, b.dtype, b.stride())
            a = cuda_emu.mlp_backward_dx_op(g, x, mean, A, B, l2, *w, *pqrs, None)
            b = torch.ops.riformer.cuda_mlp_backward_dx(g, x, mean, A, B, l2, *w, *pqrs, None)
            assert (a.shape, a.dtype, a.stride()) == (b.shape, b.dtype, b.stride())


def _kernel_inputs(n, c, hd, h, w, dtype, channels_last, seed=0):
    """x, g, (mean, A, B, l2), (w1, b1, w2, b2), (P, Q, R, S) on the CPU, random, of order one
    (tests/test_cuda_backward_emulated.py's draws)."""
    from test_cuda_backward_emulated import _inputs
    return _inputs(n, c, hd, h, w, dtype, channels_last, seed)


# ---------------------------------------------------------------------------------------------
# on a GPU

needs_cuda_kernels = pytest.mark.skipif(
    not (torch.cuda.is_available() and _ext.has_kernel('cuda_mlp_backward_dx', 'CUDA')),
    reason='needs a CUDA device and the extension built with its CUDA kernels')
needs_emulator = pytest.mark.skipif(cuda_emu.compiler() is None,
                                    reason='g++ not found: the emulated CUDA build compiles '
                                           'with it')

KERNEL_CASES = [  # (N, C, hidden, H, W, emulate): edges of the emulated tests, an S12-like shape
    (1, 16, 64, 5, 7, True),       # a partial second tile
    (2, 5, 20, 3, 3, True),        # odd C, a partial hidden chunk (FFMA only)
    (1, 80, 96, 6, 7, True),       # two channel chunks, a partial one; mma-eligible
    (2, 16, 64, 1, 1, True),       # H*W = 1
    # several tiles a split, splits across samples: too slow emulated (about 40 s a sample),
    # against the truth only
    (3, 64, 256, 28, 28, False),
]


def _cuda(t):
    return t.cuda() if isinstance(t, torch.Tensor) else [_cuda(v) for v in t]


def _compiled(x, g, coeffs, weights, pqrs, u=None):
    mean, A, B, l2 = coeffs
    ops = torch.ops.riformer
    p1 = ops.cuda_mlp_backward_weights_and_sums(g, x, mean, A, B, l2, *weights, u)
    dx = ops.cuda_mlp_backward_dx(g, x, mean, A, B, l2, *weights, *pqrs, u)
    return (*p1, dx)


def _emulated_and_compiled_twice(x, g, coeffs, weights, pqrs, u, emulate=True):
    """(the emulated ops' outputs on the CPU inputs, or None without emulate; the compiled
    ops' outputs on CUDA copies, twice; the CUDA inputs)."""
    emu = None
    if emulate:
        emu = (*cuda_emu.mlp_backward_weights_and_sums(g, x, *coeffs, *weights, u=u),
               cuda_emu.mlp_backward_dx(g, x, *coeffs, *weights, *pqrs, u=u))
    on_gpu = (x.cuda(), g.cuda(), _cuda(coeffs), _cuda(weights), _cuda(pqrs),
              u.cuda() if u is not None else None)
    got, again = _compiled(*on_gpu), _compiled(*on_gpu)
    torch.cuda.synchronize()
    return emu, got, again, on_gpu


@pytest.mark.gpu
@needs_cuda_kernels
@needs_emulator
@pytest.mark.parametrize('saved_u', [False, True], ids=['recompute', 'save-u'])
@pytest.mark.parametrize('channels_last', [False, True], ids=['nchw', 'cl'])
@pytest.mark.parametrize('dtype', [torch.float32, torch.float64, torch.bfloat16, torch.float16],
                         ids=str)
@pytest.mark.parametrize('case', KERNEL_CASES, ids=lambda c: 'x'.join(map(str, c[:5])))
def test_compiled_ops_match_emulated_and_truth(case, dtype, channels_last, saved_u):
    from test_cuda_backward_emulated import KERNEL_TOL, NAMES, _truth
    *shape, emulate = case
    args = _kernel_inputs(*shape, dtype, channels_last)
    truth = _truth(*args)
    u = truth[-1].to(dtype).contiguous(memory_format=torch.channels_last) if saved_u else None
    emu, got, again, on_gpu = _emulated_and_compiled_twice(*args, u, emulate)
    for i, (name, a, b, t) in enumerate(zip(NAMES, got, again, truth)):
        assert torch.equal(a, b), ('two runs differ', name)   # fixed orders, no atomics
        assert a.device == on_gpu[0].device, name
        assert a.dtype == (dtype if name == 'dx' else cuda_emu.stats_dtype(dtype)), name
        a = a.cpu()
        if not emulate:
            # half: the emulated kernels measured at most 0.47 eps on this shape (fp16, bf16)
            bound = KERNEL_TOL.get(dtype, 2 * torch.finfo(dtype).eps)
            assert rel_err(a, t) <= bound, (name, rel_err(a, t))
            continue
        e = emu[i]
        assert a.shape == e.shape and a.stride() == e.stride(), name
        if dtype in KERNEL_TOL:
            assert rel_err(a, t) <= KERNEL_TOL[dtype], (name, rel_err(a, t))
        else:   # the half kernels: the error class of the emulated run of the same kernels
            assert rel_err(a, t) <= 2 * max(rel_err(e, t), torch.finfo(dtype).eps), name
        # the same kernels, plan and orders as the emulator: equal up to the device's own libm
        # (erf, exp) and FMA contraction
        scale = 1e-12 if dtype == torch.float64 else 1e-5 if dtype == torch.float32 else \
            4 * torch.finfo(dtype).eps
        assert rel_err(a, e) <= scale, (name, rel_err(a, e))


@pytest.mark.gpu
@needs_cuda_kernels
@needs_emulator
@pytest.mark.parametrize('saved_u', [False, True], ids=['recompute', 'save-u'])
@pytest.mark.parametrize('wdtype', [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize('case', KERNEL_CASES[:3], ids=lambda c: 'x'.join(map(str, c[:5])))
def test_compiled_mixed_precision_ops_match_emulated_and_truth(case, wdtype, saved_u):
    """The mixed-precision mode (fp32 x and g, half weights and saved u) through the compiled
    forward and backward ops: the fp32 budget against the truth of the same rounded weights
    (the FFMA backward rounds nothing else), equal to the emulated ops up to the device's
    libm, two runs bitwise equal; the forward's out, u and moments against the emulated op."""
    from test_cuda_backward_emulated import KERNEL_TOL, NAMES, _truth
    *shape, _ = case
    x, g, coeffs, weights, pqrs = _kernel_inputs(*shape, torch.float32, False)
    weights = [weights[0].to(wdtype), weights[1], weights[2].to(wdtype), weights[3]]
    args = (x, g, coeffs, weights, pqrs)
    truth = _truth(*args)
    u = truth[-1].to(wdtype).contiguous(memory_format=torch.channels_last) if saved_u else None
    emu, got, again, _ = _emulated_and_compiled_twice(*args, u)
    # as the emulated test_backward_kernels_mixed_precision: fp32 budget, one eps with a half u
    bound = KERNEL_TOL[torch.float32] if u is None else torch.finfo(wdtype).eps
    for name, a, b, e, t in zip(NAMES, got, again, emu, truth):
        assert torch.equal(a, b), ('two runs differ', name)
        assert a.dtype == torch.float32, name
        a = a.cpu()
        assert a.stride() == e.stride() and rel_err(a, t) <= bound, (name, rel_err(a, t))
        assert rel_err(a, e) <= 1e-5, (name, rel_err(a, e))
    # the forward op: fp32 out and moments, u in the weights' dtype, as the emulated op
    mean, A, B, l2 = coeffs
    fw = (x, A, B, pqrs[0], pqrs[1], *weights, l2)
    want = cuda_emu.mlp_forward_op(x, A, B, pqrs[0], pqrs[1], l2, *weights, True, True)
    have = torch.ops.riformer.mlp_forward_save_u(*_cuda(list(fw)), True)
    for a, e in zip(have, want):
        assert a.dtype == e.dtype and a.shape == e.shape, (a.dtype, e.dtype)
        # The device's erf may round an h to the neighbouring half value where the emulator's
        # does not: a few such flips move the output by ~1e-4 relative, far below the half ulp.
        assert rel_err(a.cpu(), e) <= 0.25 * torch.finfo(wdtype).eps


BLOCK_CASES = [((2, 16, 5, 7), False), ((1, 80, 3, 3), True), ((8, 64, 28, 28), True),
               ((4, 320, 14, 14), False), ((2, 5, 3, 3), False)]


@pytest.mark.gpu
@needs_cuda_kernels
@pytest.mark.parametrize('recompute', [True, False], ids=['recompute', 'save-u'])
@pytest.mark.parametrize('deploy', [False, True], ids=['training-form', 'deploy-form'])
@pytest.mark.parametrize('shape,channels_last', BLOCK_CASES,
                         ids=lambda v: 'x'.join(map(str, v)) if isinstance(v, tuple) else
                         ('cl' if v else 'nchw'))
def test_block_gradients_on_cuda_match_fp64_reference_and_repeat_bitwise(shape, channels_last,
                                                                         deploy, recompute):
    from test_cuda_backward_emulated import FP32_TOL
    block = make_block(shape[1], deploy=deploy, dtype=torch.float32).train()
    x = random_input(shape, torch.float32, channels_last=channels_last)
    g = random_input(shape, torch.float32)
    out_ref, truth = helpers.run_block(copy.deepcopy(block).double(), x.double(), 'reference',
                                       g.double())
    runs = []
    for _ in range(2):
        b = copy.deepcopy(block).cuda()
        b.recompute = recompute
        runs.append(helpers.run_block(b, x.cuda(), 'cuda', g.cuda()))
    (out, got), (_, got2) = runs
    assert rel_err(out.cpu(), out_ref) <= 1e-5
    assert set(got) == set(truth)
    for k in truth:
        assert torch.equal(got[k], got2[k]), ('two runs differ', k)
        assert rel_err(got[k].cpu(), truth[k]) <= FP32_TOL, (k, rel_err(got[k].cpu(), truth[k]))
    assert got['x'].is_contiguous(memory_format=torch.channels_last) == channels_last or \
        shape[2] * shape[3] == 1


@pytest.mark.gpu
@needs_cuda_kernels
@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16], ids=str)
def test_block_half_gradients_on_cuda_within_twice_the_reference_error(dtype):
    block = make_block(64, dtype=dtype).train()
    x = random_input((4, 64, 14, 14), dtype, channels_last=True)
    g = random_input(x.shape, dtype)
    _, truth = helpers.run_block(copy.deepcopy(block).double(), x.double(), 'reference',
                                 g.double())
    _, ref = helpers.run_block(block.cuda(), x.cuda(), 'reference', g.cuda())
    _, got = helpers.run_block(block.cuda(), x.cuda(), 'cuda', g.cuda())
    for k in truth:
        ref_err, err = rel_err(ref[k].cpu(), truth[k]), rel_err(got[k].cpu(), truth[k])
        assert err <= 2 * ref_err, (k, err, ref_err)


@pytest.mark.gpu
@needs_cuda_kernels
def test_compiled_backward_raises_on_mismatched_inputs():
    x, g, coeffs, w, pqrs = _kernel_inputs(1, 8, 32, 3, 3, torch.float32, False)
    x, g = x.cuda(), g.cuda()
    (mean, A, B, l2), w, pqrs = _cuda(coeffs), _cuda(w), _cuda(pqrs)
    p1 = torch.ops.riformer.cuda_mlp_backward_weights_and_sums
    with pytest.raises(RuntimeError, match='g is'):
        p1(g[:, :4], x, mean, A, B, l2, *w, None)
    with pytest.raises(RuntimeError, match='mean is'):
        p1(g, x, mean.double(), A, B, l2, *w, None)
    with pytest.raises(RuntimeError, match='w2 has dtype'):
        p1(g, x, mean, A, B, l2, w[0], w[1], w[2].double(), w[3], None)
    with pytest.raises(RuntimeError, match='u is'):
        p1(g, x, mean, A, B, l2, *w, x)
    with pytest.raises(RuntimeError, match='P has shape'):
        torch.ops.riformer.cuda_mlp_backward_dx(g, x, mean, A, B, l2, *w, pqrs[0][:, :2],
                                                *pqrs[1:], None)


@pytest.mark.gpu
@needs_cuda_kernels
@pytest.mark.parametrize('dtype,channels_last', [(torch.float32, False), (torch.float16, True),
                                                 (torch.bfloat16, False), (torch.float64, True)])
def test_compiled_backward_ops_pass_opcheck(dtype, channels_last):
    """Schema, fake implementation (shapes, dtypes and strides of the real outputs) and AOT
    dispatch of both compiled ops, u recomputed and read, by torch.library.opcheck (as the
    emulated ops are checked in tests/test_cuda_emulated.py)."""
    x, g, coeffs, weights, pqrs = _kernel_inputs(2, 32, 64, 3, 5, dtype, channels_last)
    x, g, coeffs, weights, pqrs = x.cuda(), g.cuda(), _cuda(coeffs), _cuda(weights), _cuda(pqrs)
    u = torch.randn((2, 64, 3, 5), dtype=torch.float64).to('cuda', dtype)
    utils = ('test_schema', 'test_faketensor', 'test_aot_dispatch_dynamic')
    for saved in (None, u, u.contiguous(memory_format=torch.channels_last)):
        common = (g, x, *coeffs, *weights)
        torch.library.opcheck(torch.ops.riformer.cuda_mlp_backward_weights_and_sums.default,
                              (*common, saved), test_utils=utils)
        torch.library.opcheck(torch.ops.riformer.cuda_mlp_backward_dx.default,
                              (*common, *pqrs, saved), test_utils=utils)
