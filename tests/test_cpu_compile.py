"""torch.compile(fullgraph=True) and torch.export of models on the `cpu` backend: no graph break,
same results.

The riformer::* cpu ops have fake implementations (backends/cpu.py), and dispatch reads only
Python state (availability and the active ISA level are cached), so dynamo traces a model's
blocks through the pipeline's autograd Function into one graph. Here auto picks per stage: a
measured-slower class is patched in for the second stage's width, so the compiled graph holds
both cpu kernels and reference blocks, as a user's model on such a CPU would.

Single blocks of every backend, training and deploy form (and the cpu set's save-u mode),
forward and backward under fullgraph=True: tests/test_host_sync.py.
"""
import copy

import pytest
import torch

import riformer_kernels as rk
from riformer_kernels.testing import randomize_
from helpers import rel_err

# Only where the extension is not built (it is in every `make test` run).
pytestmark = pytest.mark.skipif(not rk.available_backends()['cpu'].usable,
                                reason=f"cpu backend unusable: {rk.available_backends()['cpu'].reason}")

ARCH = {'layers': [1, 2], 'embed_dims': [16, 24], 'mlp_ratios': [4, 4],
        'layer_scale_init_value': 1e-5}


def _grads(model, x, out):
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    out.backward(g)
    return [x.grad] + [p.grad for p in model.parameters()]


def test_compiled_model_fullgraph_matches_eager_with_mixed_dispatch(monkeypatch):
    monkeypatch.delenv('RIFORMER_BACKEND', raising=False)
    cpu_room = rk.backends.cpu
    level = rk.cpu_isa_info().active
    monkeypatch.setattr(cpu_room, 'SLOWER_THAN_REFERENCE', (cpu_room.SlowerClass(
        levels=(level,), dtypes=(torch.float32,), mode='train', recompute=True, min_channels=24,
        max_tokens=1000, measured='a test class'),))
    torch.manual_seed(0)
    model = randomize_(rk.RIFormer(ARCH, out_indices=(2,)))
    twin = copy.deepcopy(model)
    block0, block1 = model.network[0][0], model.network[2][0]
    probe = torch.randn(2, 24, 4, 4)
    assert 'chosen: reference' in rk.explain_dispatch(block1, probe.requires_grad_())
    assert 'chosen: cpu' in rk.explain_dispatch(block0, torch.randn(2, 16, 8, 8))

    x = torch.randn(2, 3, 32, 32)
    x_eager, x_comp = x.clone().requires_grad_(), x.clone().requires_grad_()
    (out_eager,) = twin(x_eager)
    compiled = torch.compile(model, fullgraph=True)   # fullgraph: a graph break raises
    (out_comp,) = compiled(x_comp)
    assert rel_err(out_comp, out_eager) <= 1e-6
    for got, want in zip(_grads(model, x_comp, out_comp), _grads(twin, x_eager, out_eager)):
        assert rel_err(got, want) <= 1e-5


def test_compiled_inference_graph_calls_the_cpu_kernels_once_per_block():
    """The graph dynamo captures holds one riformer::mlp_forward and one riformer::moments per
    block (three blocks): the fused kernels are in the graph, not a fallback."""
    model = randomize_(rk.RIFormer(ARCH, out_indices=(2,))).eval()
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(model, fullgraph=True, backend=record)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), rk.use_backend('cpu'):
        (out,) = compiled(x)
        (want,) = model(x)
    assert len(graphs) == 1
    code = graphs[0].code
    assert code.count('riformer.mlp_forward') == 3 and code.count('riformer.moments') >= 1, code
    assert torch.equal(out, want)


def test_exported_deploy_classifier_runs_the_cpu_kernels_and_matches():
    """torch.export of a deploy-form classifier on the cpu backend: the exported program holds
    the riformer::* ops (their fake implementations trace it) and computes what eager does."""
    arch = {'layers': [1, 1, 2, 1], 'embed_dims': [8, 16, 24, 32], 'mlp_ratios': [4, 4, 4, 4],
            'layer_scale_init_value': 1e-5}
    model = randomize_(rk.RIFormerClassifier(arch, num_classes=10))
    model.switch_to_deploy()
    model.eval()
    x = torch.randn(2, 3, 64, 64)
    with rk.use_backend('cpu'):
        program = torch.export.export(model, (x,))
        want = model(x)
    graph = str(program.graph)
    assert graph.count('riformer.mlp_forward') == 5, graph     # one per block
    x2 = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(program.module()(x), want)
        with rk.use_backend('reference'):
            ref = model(x2)
        assert rel_err(program.module()(x2), ref) <= 1e-5
