"""rk.export_onnx: the file onnxruntime runs reproduces the float64 reference of the model.

Each export already checks itself (export_onnx raises above 1e-5); the tests check again here,
independently, on inputs the export never saw, at batch sizes it was not traced at.
"""
import copy
import importlib.util
import json
import os

import pytest
import torch

import riformer_kernels as rk
from riformer_kernels import onnx_export
from helpers import randomize_, rel_err

onnx = pytest.importorskip('onnx', reason='the [export] extra (onnx) is not installed')
ort = pytest.importorskip('onnxruntime', reason='the [export] extra (onnxruntime) is not installed')
pytest.importorskip('onnxscript', reason="torch.onnx's exporter needs onnxscript ([export])")

TINY_ARCH = dict(layers=[1, 2, 1, 1], embed_dims=[8, 16, 24, 32], mlp_ratios=[4, 4, 4, 4])
# fp32 onnxruntime against the float64 reference, relative to the largest logit: the library's
# own limit. Measured 2.9e-7 (tiny) to 4.2e-7 (S12 at 224), docs/deployment.md.
RTOL = 1e-5


def _reference(model, x):
    with torch.no_grad(), rk.use_backend('reference'):
        return copy.deepcopy(model).double().eval()(x)


def _run(path, x):
    session = ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    return [torch.from_numpy(o) for o in session.run(None, {'input': x.float().numpy()})]


def _group_norms(model):
    return sum(isinstance(m, torch.nn.GroupNorm) for m in model.modules())


def _check_file(path, model, shape, batches):
    for n in batches:
        x = torch.randn((n,) + shape[1:], dtype=torch.float64)
        (got,) = _run(path, x)
        assert got.shape == (n, model.head.fc.out_features)
        assert rel_err(got, _reference(model, x)) <= RTOL


@pytest.mark.parametrize('deploy', [False, True], ids=['training-form', 'deploy-form'])
def test_s12_at_224_matches_the_reference(tmp_path, deploy):
    torch.manual_seed(0)
    model = randomize_(rk.create_model('riformer_s12'))
    given = copy.deepcopy(model)
    if deploy:
        given.switch_to_deploy()   # in fp32, as a user would
    before = copy.deepcopy(given.state_dict())
    path = tmp_path / 's12.onnx'
    result = rk.export_onnx(given, path, (1, 3, 224, 224))
    # the caller's model is untouched: same form, same values, still in training mode
    assert given.state_dict().keys() == before.keys()
    assert all(torch.equal(given.state_dict()[k], v) for k, v in before.items())
    assert given.training and given.backbone.network[0][0].deploy == deploy
    assert result.max_rel_err <= RTOL and result.checked_batches == (1, 2)
    # 12 blocks x 2 norms + the output norm, each as two ReduceMeans; no GroupNorm node
    assert result.op_histogram['ReduceMean'] == 2 * 25 + 1   # + the global average pool
    assert 'GroupNormalization' not in result.op_histogram
    assert 'InstanceNormalization' not in result.op_histogram
    assert result.node_count == sum(result.op_histogram.values()) == len(
        onnx.load(str(path)).graph.node)
    # against the original training-form model either way: the fold is checked too
    _check_file(path, model, (1, 3, 224, 224), batches=(1, 3))


@pytest.mark.parametrize('deploy', [False, True], ids=['training-form', 'deploy-form'])
def test_tiny_arch_with_dynamic_batch(tmp_path, deploy):
    model = randomize_(rk.RIFormerClassifier(TINY_ARCH, num_classes=10))
    given = copy.deepcopy(model)
    if deploy:
        given.switch_to_deploy()
    path = tmp_path / 'tiny.onnx'
    result = rk.export_onnx(given, path, (2, 3, 32, 32))
    graph = onnx.load(str(path))
    assert graph.graph.input[0].type.tensor_type.shape.dim[0].dim_param == 'batch'
    assert all(n.domain in ('', 'ai.onnx') for n in graph.graph.node)
    assert 'GroupNormalization' not in result.op_histogram
    _check_file(path, model, (2, 3, 32, 32), batches=(1, 5))


def test_fixed_batch_backbone_with_several_outputs(tmp_path):
    backbone = randomize_(rk.RIFormer(TINY_ARCH, out_indices=(0, 2, 4, 6)))
    path = tmp_path / 'backbone.onnx'
    result = rk.export_onnx(backbone, path, (2, 3, 32, 32), dynamic_batch=False)
    assert result.output_names == ('output0', 'output1', 'output2', 'output3')
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    got, truth = _run(path, x), _reference(backbone, x)
    assert len(got) == len(truth) == 4
    for a, b in zip(got, truth):
        assert rel_err(a, b) <= RTOL
    # the batch axis is fixed: onnxruntime refuses batch 3
    with pytest.raises(Exception, match='invalid dimensions for input: input'):
        _run(path, torch.randn(3, 3, 32, 32))


def test_group_norm_node_flag_emits_one_node_per_norm(tmp_path):
    model = randomize_(rk.RIFormerClassifier(TINY_ARCH, num_classes=10))
    path = tmp_path / 'gn.onnx'
    result = rk.export_onnx(model, path, (2, 3, 32, 32), opset=21, group_norm_node=True)
    deployed = copy.deepcopy(model)
    deployed.switch_to_deploy()
    assert result.op_histogram['GroupNormalization'] == _group_norms(deployed) == 11
    # the global average pool is the one ReduceMean left
    assert result.op_histogram.get('ReduceMean', 0) == 1
    _check_file(path, model, (2, 3, 32, 32), batches=(3,))
    with pytest.raises(ValueError, match='opset >= 21'):
        rk.export_onnx(model, tmp_path / 'gn18.onnx', (2, 3, 32, 32), opset=18,
                       group_norm_node=True)


def test_a_wrong_export_raises_and_leaves_no_file(tmp_path, monkeypatch):
    """The built-in check can fail: a norm computed per channel (what issue 4756's runtimes do
    with GroupNormalization(num_groups=1)) is caught and nothing is written."""
    def per_channel(self, x):
        mean = x.mean((2, 3), keepdim=True)
        var = ((x - mean) ** 2).mean((2, 3), keepdim=True)
        return ((x - mean) * torch.rsqrt(var + self.eps) * self.weight.reshape(1, -1, 1, 1)
                + self.bias.reshape(1, -1, 1, 1))

    monkeypatch.setattr(onnx_export.ExplicitGroupNorm, 'forward', per_channel)
    path = tmp_path / 'wrong.onnx'
    with pytest.raises(onnx_export.ExportError, match='nothing written'):
        rk.export_onnx(randomize_(rk.RIFormerBlock(16)), path, (2, 16, 5, 5))
    assert list(tmp_path.iterdir()) == []


def test_single_block_in_both_forms(tmp_path):
    block = randomize_(rk.RIFormerBlock(16))
    x = torch.randn(3, 16, 6, 6, dtype=torch.float64)
    for deploy in (False, True):
        given = copy.deepcopy(block)
        if deploy:
            given.switch_to_deploy()
        path = tmp_path / f'block{deploy}.onnx'
        result = rk.export_onnx(given, path, (2, 16, 6, 6), opset=20)
        assert result.op_histogram['ReduceMean'] == 4 and 'Gelu' in result.op_histogram
        (got,) = _run(path, x)
        assert rel_err(got, _reference(block, x)) <= RTOL


@pytest.mark.parametrize('shape, error, match', [
    ((1, 3, 32), ValueError, '4 entries'),
    ([1, 3, 32, 0], ValueError, 'positive'),
    ((1, 3, 32.0, 32), TypeError, 'ints'),
    ((1, True, 32, 32), TypeError, 'ints'),
    ('1,3,32,32', TypeError, 'tuple'),
    ((1, 4, 32, 32), ValueError, 'takes 3'),
    ((1, 3, 2, 2), ValueError, 'cannot run an input of shape'),
])
def test_bad_input_shape(tmp_path, shape, error, match):
    model = rk.RIFormerClassifier(TINY_ARCH, num_classes=10)
    with pytest.raises(error, match=match):
        rk.export_onnx(model, tmp_path / 'x.onnx', shape)
    assert list(tmp_path.iterdir()) == []


def test_bad_arguments(tmp_path):
    model = rk.RIFormerBlock(8)
    with pytest.raises(ValueError, match='opset must be between 18'):
        rk.export_onnx(model, tmp_path / 'x.onnx', (1, 8, 4, 4), opset=13)
    with pytest.raises(TypeError, match='opset must be an int'):
        rk.export_onnx(model, tmp_path / 'x.onnx', (1, 8, 4, 4), opset='18')
    with pytest.raises(TypeError, match='nn.Module'):
        rk.export_onnx(lambda x: x, tmp_path / 'x.onnx', (1, 8, 4, 4))
    with pytest.raises(TypeError, match='path'):
        rk.export_onnx(model, 3, (1, 8, 4, 4))
    with pytest.raises(ValueError, match='takes 8'):
        rk.export_onnx(model, tmp_path / 'x.onnx', (1, 3, 4, 4))
    assert list(tmp_path.iterdir()) == []


def _script():
    """python/export_onnx.py as a module: its main() runs in this process, where the exporter
    is already warm (a fresh interpreter pays ~15 s for torch, onnxscript and the first
    trace on one core)."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'python',
                        'export_onnx.py')
    spec = importlib.util.spec_from_file_location('export_onnx_script', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_exports_a_checkpoint(tmp_path, capsys):
    source = randomize_(rk.RIFormerClassifier(TINY_ARCH, num_classes=10))
    torch.save({'meta': {}, 'state_dict': source.state_dict()}, tmp_path / 'tiny.pth')
    assert _script().main([str(tmp_path / 'tiny.pth'), str(tmp_path / 'tiny.onnx'),
                           '--input-shape', '2,3,32,32', '--json']) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result['node_count'] == sum(result['op_histogram'].values()) == 172
    assert result['max_rel_err'] <= RTOL and result['checked_batches'] == [2, 3]
    _check_file(tmp_path / 'tiny.onnx', source, (2, 3, 32, 32), batches=(4,))
    assert sorted(os.listdir(tmp_path)) == ['tiny.onnx', 'tiny.pth']


def test_cli_errors_say_what_is_wrong(tmp_path, capsys):
    script = _script()
    assert script.main(['riformer_s99', str(tmp_path / 'x.onnx')]) == 1
    assert 'MODEL must be one of' in capsys.readouterr().err
    assert script.main(['riformer_s12', str(tmp_path / 'x.onnx'), '--group-norm-node']) == 1
    assert 'opset >= 21' in capsys.readouterr().err
    with pytest.raises(SystemExit):
        script.main(['riformer_s12', str(tmp_path / 'x.onnx'), '--input-shape', '1,3,a,224'])
    assert list(tmp_path.iterdir()) == []
