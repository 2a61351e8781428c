"""python/convert_checkpoint.py: an upstream (mmpretrain-style) checkpoint -> one rk.create_model
loads, in either form, checked before it is written and written atomically."""
import copy
import importlib.util
import os
import subprocess
import sys

import pytest
import torch

import riformer_kernels as rk
from helpers import randomize_, rel_err

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, 'python', 'convert_checkpoint.py')
TINY_ARCH = dict(layers=[1, 2, 1, 1], embed_dims=[8, 16, 24, 32], mlp_ratios=[4, 4, 4, 4])

_spec = importlib.util.spec_from_file_location('convert_checkpoint', SCRIPT)
cc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cc)


def upstream_file(path, model, module_prefix=False):
    """What mmpretrain's runner saves: meta, the model's state_dict (maybe DDP's `module.`
    prefixes, the data preprocessor's buffers) and optimizer state."""
    state = {('module.' if module_prefix else '') + k: v.float()
             for k, v in model.state_dict().items()}
    state['data_preprocessor.mean'] = torch.tensor([123.675, 116.28, 103.53]).view(-1, 1, 1)
    torch.save({'meta': {'epoch': 300, 'mmpretrain_version': '1.0.0'}, 'state_dict': state,
                'optimizer': {'state': {}, 'param_groups': [{'lr': 0.1}]}}, path)
    return path


def _logits(model, x):
    with torch.no_grad(), rk.use_backend('reference'):
        return copy.deepcopy(model).double().eval()(x)


@pytest.fixture(scope='module')
def s12(tmp_path_factory):
    torch.manual_seed(5)
    source = randomize_(rk.create_model('riformer_s12', num_classes=1000))
    path = upstream_file(tmp_path_factory.mktemp('up') / 'riformer-s12_in1k.pth', source,
                         module_prefix=True)
    return source, path


def test_cli_converts_s12_in_both_forms(s12, tmp_path):
    source, path = s12
    env = dict(os.environ, OMP_NUM_THREADS='1',
               PYTHONPATH=os.pathsep.join([ROOT, os.environ.get('PYTHONPATH', '')]))
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    for deploy in (False, True):
        out = tmp_path / f's12_{deploy}.pth'
        proc = subprocess.run([sys.executable, SCRIPT, str(path), str(out), '--image-size', '64']
                              + (['--deploy'] if deploy else []),
                              capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert 'max relative error' in proc.stdout
        written = torch.load(out, weights_only=True)
        assert written['meta']['deploy'] == deploy and written['meta']['arch'] == 's12'
        model = rk.create_model('riformer_s12', checkpoint=out, deploy=deploy)
        upstream = copy.deepcopy(source)
        if deploy:
            upstream.switch_to_deploy()   # upstream's own route, on the fp32 weights
        # the same tensors as upstream's model in that form, bit for bit ...
        assert model.state_dict().keys() == upstream.state_dict().keys()
        for k, v in upstream.state_dict().items():
            assert torch.equal(model.state_dict()[k], v), k
        # ... and the same function as the training-form original (deploy: up to the fp32
        # rounding of the folded parameters, measured 5e-8)
        assert rel_err(_logits(model, x), _logits(source, x)) <= (1e-5 if deploy else 0.0)
    assert sorted(os.listdir(tmp_path)) == ['s12_False.pth', 's12_True.pth']


def test_tiny_dict_arch_and_backbone_only_files(tmp_path):
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    classifier = randomize_(rk.RIFormerClassifier(TINY_ARCH, num_classes=10))
    backbone = randomize_(rk.RIFormer(TINY_ARCH, out_indices=(0, 2, 4, 6)))
    for source in (classifier, backbone):
        src = upstream_file(tmp_path / 'in.pth', source)
        meta = cc.convert(src, tmp_path / 'out.pth', deploy=True, image_size=32)
        assert meta['arch'] == dict(layers=[1, 2, 1, 1], embed_dims=[8, 16, 24, 32],
                                    mlp_ratios=[4.0] * 4)
        assert meta['check']['max_rel_err'] <= 1e-5
        model = type(source)(TINY_ARCH, deploy=True, **(
            dict(num_classes=10) if source is classifier else dict(out_indices=(0, 2, 4, 6))))
        rk.load_checkpoint(model, tmp_path / 'out.pth')
        got, want = _logits(model, x), _logits(source, x)
        if isinstance(got, tuple):
            got, want = torch.cat([t.flatten() for t in got]), torch.cat([t.flatten() for t in want])
        assert rel_err(got, want) <= 1e-5


def test_failed_check_leaves_no_file_and_keeps_an_old_one(tmp_path, monkeypatch):
    """The check can fail: a fold that is off by 1% is caught, OUT is not written, an existing
    OUT keeps its content and no temporary file is left."""
    src = upstream_file(tmp_path / 'in.pth', randomize_(rk.RIFormerClassifier(TINY_ARCH, 10)))
    from riformer_kernels import models
    fold = models.fused_scale_shift
    monkeypatch.setattr(models, 'fused_scale_shift',
                        lambda *args: tuple(1.01 * t for t in fold(*args)))
    with pytest.raises(cc.CheckFailed, match='not written'):
        cc.convert(src, tmp_path / 'out.pth', deploy=True, image_size=32)
    assert sorted(os.listdir(tmp_path)) == ['in.pth']
    (tmp_path / 'out.pth').write_bytes(b'old')
    assert cc.main([str(src), str(tmp_path / 'out.pth'), '--deploy', '--image-size', '32']) == 1
    assert (tmp_path / 'out.pth').read_bytes() == b'old'
    assert sorted(os.listdir(tmp_path)) == ['in.pth', 'out.pth']


def test_interrupted_write_leaves_no_file(tmp_path, monkeypatch):
    src = upstream_file(tmp_path / 'in.pth', randomize_(rk.RIFormerClassifier(TINY_ARCH, 10)))

    def interrupted_save(obj, f, *args, **kwargs):
        with open(f, 'wb') as fh:
            fh.write(b'PK\x03\x04 half a zip')   # a partial file, then Ctrl-C
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, 'save', interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        cc.convert(src, tmp_path / 'out.pth', image_size=32)
    assert sorted(os.listdir(tmp_path)) == ['in.pth']


def test_clear_errors(tmp_path, capsys):
    deploy_src = upstream_file(tmp_path / 'deploy.pth',
                               rk.RIFormerClassifier(TINY_ARCH, num_classes=3, deploy=True))
    with pytest.raises(ValueError, match='pass --deploy'):
        cc.convert(deploy_src, tmp_path / 'out.pth', image_size=32)
    # a deploy-form input converts to the deploy form exactly
    assert cc.convert(deploy_src, tmp_path / 'out.pth', deploy=True,
                      image_size=32)['check']['max_rel_err'] == 0.0
    torch.save({'state_dict': {'fc.weight': torch.zeros(2, 2)}}, tmp_path / 'other.pth')
    assert cc.main([str(tmp_path / 'other.pth'), str(tmp_path / 'x.pth')]) == 1
    assert 'no RIFormer stages' in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown --arch 's13'"):
        cc.convert(deploy_src, tmp_path / 'x.pth', deploy=True, arch='s13')
    with pytest.raises(ValueError, match='cannot run a 2x2 input'):
        cc.convert(deploy_src, tmp_path / 'x.pth', deploy=True, image_size=2)
    (tmp_path / 'junk.pth').write_bytes(b'not a checkpoint')
    with pytest.raises(ValueError, match='could not load'):
        cc.convert(str(tmp_path / 'junk.pth'), tmp_path / 'x.pth')
    assert not (tmp_path / 'x.pth').exists()
