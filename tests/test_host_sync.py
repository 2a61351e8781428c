"""No host synchronisation in any forward or backward path, on every backend usable here.

A host sync is a read of tensor data by Python: `.item()`, `.tolist()`, `bool`/`int`/`float` of
a tensor, an `if` on a tensor value -- each dispatches `aten._local_scalar_dense` -- or a copy
of a device tensor to the host. On a GPU each one stalls the launch queue (and breaks CUDA-graph
capture). Three checks:

* eager: forward and backward of a small model (stages of several blocks, so chained statistics
  run; training form with drop path, and deploy form) under a dispatch mode that records every
  such op, per backend (and the cpu kernels under autocast);
* torch.compile(fullgraph=True) of a block, forward and backward (AOTAutograd traces the
  backward with fake tensors, where any data read fails), per backend and form;
* on a CUDA GPU: torch.cuda.set_sync_debug_mode('error') around a triton training step.
"""
import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import riformer_kernels as rk
from riformer_kernels import fold, pipeline
import helpers
from helpers import make_block, randomize_, random_input, rel_err

DEVICE = {'cpu': torch.device('cpu'), 'torch': torch.device('cpu'),
          'reference': torch.device('cpu'), 'triton': helpers.KERNEL_DEVICE,
          'cuda': helpers.KERNEL_DEVICE}
BACKENDS = [pytest.param(name, marks=pytest.mark.skipif(
    not rk.available_backends()[name].usable, reason=rk.available_backends()[name].reason))
    for name in DEVICE]
ARCH = {'layers': [2, 1, 3, 1], 'embed_dims': [8, 12, 16, 24], 'mlp_ratios': [4, 4, 4, 4],
        'layer_scale_init_value': 1e-5}


class HostSyncLog(TorchDispatchMode):
    """Every op that hands tensor data to the host: `_local_scalar_dense` (item, tolist,
    bool/int/float of a tensor), or a copy whose input is on a device and output on the CPU."""

    def __init__(self):
        super().__init__()
        self.syncs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        ins = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        if 'local_scalar_dense' in str(func) or (
                any(t.device.type != 'cpu' for t in ins)
                and any(t.device.type == 'cpu' for t in outs)):
            self.syncs.append(str(func))
        return out


def _train_step(model, x, backend, autocast=False):
    log = HostSyncLog()
    with rk.use_backend(backend), torch.autocast(x.device.type, dtype=torch.bfloat16,
                                                 enabled=autocast), log:
        out = model(x)[-1]
        out.float().square().mean().backward()
    return log.syncs


@pytest.mark.parametrize('backend', BACKENDS)
def test_no_host_sync_in_training_and_deploy_forms(backend):
    dev = DEVICE[backend]
    torch.manual_seed(0)
    model = randomize_(rk.RIFormer(ARCH, drop_path_rate=0.3)).to(dev).train()
    x = random_input((2, 3, 32, 32), torch.float32, device=dev)
    assert _train_step(model, x, backend) == []
    model.switch_to_deploy()
    assert _train_step(model, x, backend) == []
    log = HostSyncLog()
    with torch.no_grad(), rk.use_backend(backend), log:
        model.eval()(x)
    assert log.syncs == []


@pytest.mark.skipif(not rk.available_backends()['cpu'].usable,
                    reason=rk.available_backends()['cpu'].reason)
def test_no_host_sync_under_autocast():
    model = randomize_(rk.RIFormer(ARCH)).train()
    assert _train_step(model, random_input((2, 3, 32, 32), torch.float32), 'cpu',
                       autocast=True) == []


@pytest.mark.skipif(not rk.available_backends()['cpu'].usable,
                    reason=rk.available_backends()['cpu'].reason)
def test_the_log_sees_a_sync_in_the_backward(monkeypatch):
    """The check can fail: a value read planted in the pipeline's backward is caught."""
    real = fold.backward_coefficients

    def with_a_sync(*args, **kwargs):
        coefficients = real(*args, **kwargs)
        if coefficients.P.sum() > -1e30:      # an `if` on a tensor value
            pass
        return coefficients
    monkeypatch.setattr(pipeline.fold, 'backward_coefficients', with_a_sync)
    model = randomize_(rk.RIFormer(ARCH)).train()
    assert _train_step(model, random_input((2, 3, 32, 32), torch.float32), 'cpu')


@pytest.mark.parametrize('recompute', [True, pytest.param(False, marks=pytest.mark.skipif(
    not rk.available_backends()['cpu'].usable, reason='only the kernel sets save u'))],
    ids=['recompute', 'save_u'])
@pytest.mark.parametrize('deploy', [False, True], ids=['train_form', 'deploy_form'])
@pytest.mark.parametrize('backend', BACKENDS)
def test_block_compiles_fullgraph_forward_and_backward(backend, deploy, recompute):
    """fullgraph=True raises on any graph break (a data-dependent branch or value read in the
    forward); aot_eager traces the backward with fake tensors, where a value read raises too.
    Compiled and eager agree. (recompute=False: the kernel sets' save-u ops; cpu and cuda here,
    the triton one is compiled with it in tests/test_triton_training.py.)"""
    if not recompute and backend not in ('cpu', 'cuda'):
        pytest.skip("save-u is compiled here for the cpu and cuda kernel sets")
    dev = DEVICE[backend]
    block = make_block(16, deploy=deploy, dtype=torch.float32, device=dev, drop_path=0.2).train()
    block.recompute = recompute
    x = random_input((2, 16, 5, 4), torch.float32, device=dev)
    g = random_input(x.shape, torch.float32, device=dev)
    twin = copy.deepcopy(block)
    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True, backend='aot_eager')
    results = []
    for module in (compiled, twin):
        xi = x.clone().requires_grad_(True)
        torch.manual_seed(3)                       # the same drop-path masks in both
        with rk.use_backend(backend):
            out = module(xi)
        out.backward(g)
        results.append((out, {'x': xi.grad, **{n: p.grad for n, p in
                                                (block if module is compiled else twin)
                                                .named_parameters()}}))
    (out_c, grads_c), (out_e, grads_e) = results
    assert rel_err(out_c, out_e) <= 1e-6
    for k in grads_e:
        assert rel_err(grads_c[k], grads_e[k]) <= 1e-5, k


@pytest.mark.gpu
def test_triton_training_step_passes_cuda_sync_debug_mode():
    block = make_block(64, dtype=torch.float32, device='cuda').train()
    x = random_input((4, 64, 14, 14), torch.float32, device='cuda').requires_grad_(True)
    with rk.use_backend('triton'):
        block(x).sum().backward()             # warm-up: compilation and autotuning may sync
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode('error')
        try:
            block(x).sum().backward()
        finally:
            torch.cuda.set_sync_debug_mode(0)
