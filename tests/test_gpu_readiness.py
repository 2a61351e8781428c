"""GPU readiness of the triton kernel set, checked without a GPU where that is possible.

* No host synchronisation: the forward and backward never build a tensor from host data (on a
  GPU that is a blocking pageable copy, and it raises under CUDA-graph capture). Checked on
  CPU by running the pipeline on fake CUDA tensors (FakeTensorMode: shapes and devices only,
  the custom ops' fake implementations instead of kernels) under a dispatch mode that sees every
  op: a host-to-device copy shows up as an op with a CPU tensor in and a CUDA tensor out, and a
  tensor made from Python data as `aten.lift_fresh`. On a GPU: a training step is captured in
  a CUDA graph with `torch.cuda.set_sync_debug_mode('error')`.
* Device guard: every `riformer_triton` op body runs under its input's device
  (`device_guard.device_of`), since Triton launches on the current device.
"""
import copy
import warnings

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import riformer_kernels as rk
from helpers import KERNEL_DEVICE, OpLog, make_block, random_input, rel_err

pytest.importorskip('triton', reason='triton is not installed (optional: pip install triton)')
# Our own modules are imported plainly: an ImportError in them must fail, not skip.
from riformer_kernels.backends.triton import backward as tbw  # noqa: E402
from riformer_kernels.backends.triton import forward as tfw  # noqa: E402

pytestmark = pytest.mark.skipif(not rk.available_backends()['triton'].usable,
                                reason=rk.available_backends()['triton'].reason)


def _fake_training_step(block, shape, recompute, chained):
    """Forward (two blocks when `chained`) and the Function's backward on fake CUDA tensors;
    returns the detector. The backward is called through the graph node (`grad_fn.apply`):
    the autograd engine itself would want a real CUDA context for CUDA tensors."""
    b = copy.deepcopy(block)
    b.recompute = recompute
    with warnings.catch_warnings(), FakeTensorMode(allow_non_fake_inputs=True):
        warnings.simplefilter('ignore')      # data_ptr of a fake tensor (the chain record)
        b = b.to('cuda')
        x = torch.randn(shape, device='cuda', requires_grad=True)
        detector = OpLog()
        with detector, rk.use_backend('triton'):
            out = b(x)
            if chained:
                out = b(out)
            grads = out.grad_fn.apply(torch.ones_like(out), None, None)
    assert type(out.grad_fn).__name__ == 'FusedBlockFunctionBackward'
    assert grads[0].shape == out.shape
    return detector


@pytest.mark.parametrize('c,hw', [(64, 56), (320, 14)], ids=['small-C', 'large-C'])
@pytest.mark.parametrize('recompute', [True, False], ids=['recompute', 'save-u'])
def test_no_tensor_is_built_from_host_data(c, hw, recompute):
    """Shapes with several partial-moment spans per sample (the merge needs the per-span token
    counts), chained and unchained statistics, both backward paths, both memory modes."""
    block = make_block(c, dtype=torch.float32).train()
    for chained in (False, True):
        detector = _fake_training_step(block, (8, c, hw, hw), recompute, chained)
        assert not detector.host_to_device, detector.host_to_device
        ran = {op for op in detector.ops if op.startswith('riformer_triton.')}
        assert 'riformer_triton.mlp_forward.default' in ran
        assert ('riformer_triton.backward_dz.default' in ran) == tbw._large_path(c, torch.float32)
    # the spans really were several: the merge of partials ran with a counts tensor
    assert tfw.moments_config(8, c, hw * hw)['n_parts'] > 1


def test_the_detector_sees_a_tensor_built_from_a_host_list(monkeypatch):
    """The check can fail: the former per-call `torch.tensor(list, device=...)` of the
    partial-moment counts is caught."""
    def host_list_counts(t, span, n_parts, device):
        counts = [min(span, t - i * span) for i in range(n_parts)]
        return torch.tensor(counts, dtype=torch.float32, device=device).view(1, n_parts, 1)

    monkeypatch.setattr(tfw, 'partial_counts', host_list_counts)
    detector = _fake_training_step(make_block(64, dtype=torch.float32).train(), (8, 64, 56, 56),
                                   True, False)
    assert 'aten.lift_fresh.default' in detector.host_to_device


def test_every_triton_op_runs_under_its_inputs_device(monkeypatch):
    """Each riformer_triton op the pipeline calls enters `device_of(x)` once per call."""
    guarded = []
    for module in (tfw, tbw):
        real = module.device_of
        monkeypatch.setattr(module, 'device_of', lambda x, real=real: guarded.append(x) or real(x))
    counter = OpLog()
    for c in (16, 320):
        block = make_block(c, dtype=torch.float32, device=KERNEL_DEVICE).train()
        x = random_input((2, c, 3, 3), torch.float32, device=KERNEL_DEVICE).requires_grad_(True)
        with counter, rk.use_backend('triton'):
            block(x).sum().backward()
    calls = [op for op in counter.ops if op.startswith('riformer_triton.')]
    assert len(calls) >= 8 and len(guarded) == len(calls), (calls, len(guarded))


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@needs_cuda
def test_training_step_captures_in_a_cuda_graph_without_syncs():
    torch.manual_seed(0)
    block = make_block(64, dtype=torch.bfloat16).train().cuda()
    x = random_input((8, 64, 28, 28), torch.bfloat16).cuda().requires_grad_(True)
    g = torch.randn_like(x)

    def step():
        out = block(x)
        out.backward(g)
        return out

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):                       # warm-up: compiles and autotunes off-graph
            block.zero_grad(set_to_none=True)
            x.grad = None
            eager = step().detach().clone()
    torch.cuda.current_stream().wait_stream(side)
    eager_dx = x.grad.detach().clone()
    block.zero_grad(set_to_none=True)
    x.grad = None
    graph = torch.cuda.CUDAGraph()
    torch.cuda.set_sync_debug_mode('error')
    try:
        with torch.cuda.graph(graph):
            captured = step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, eager)          # the same kernels on the same inputs
    assert torch.equal(x.grad, eager_dx)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_a_block_on_the_second_gpu_runs_there_while_the_first_is_current():
    block = make_block(32, dtype=torch.float32).eval()
    x = random_input((2, 32, 7, 7), torch.float32)
    with torch.no_grad(), rk.use_backend('reference'):
        truth = copy.deepcopy(block).double()(x.double())
    torch.cuda.set_device(0)
    with torch.no_grad(), rk.use_backend('triton'):
        out = block.to('cuda:1')(x.to('cuda:1'))
    assert out.device == torch.device('cuda:1')
    assert rel_err(out.cpu(), truth) <= 1e-5     # the fp32 block contract
