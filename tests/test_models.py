"""Models with upstream structure: keys, sizes, deploy conversion and upstream-format checkpoints."""
import copy

import pytest
import torch

import riformer_kernels as rk
from helpers import randomize_, rel_err

# Parameter counts of the deploy-form backbones with a 1000-class head (docs/design.md table, in M).
PARAMS_M = {'s12': 11.92, 's24': 21.39, 's36': 30.86, 'm36': 56.17, 'm48': 73.47}
TINY_ARCH = dict(layers=[1, 2, 1, 1], embed_dims=[8, 16, 24, 32], mlp_ratios=[4, 4, 4, 4],
                 layer_scale_init_value=1e-5)


@pytest.mark.parametrize('arch', sorted(PARAMS_M))
def test_deploy_parameter_counts_match_upstream(arch):
    model = rk.create_model(f'riformer_{arch}', deploy=True)
    count = sum(p.numel() for p in model.parameters()) / 1e6
    assert round(count, 2) == PARAMS_M[arch]


def test_upstream_key_names():
    keys = set(rk.create_model('riformer_s12').state_dict())
    for k in ['backbone.patch_embed.proj.weight', 'backbone.network.0.0.norm1.weight',
              'backbone.network.0.0.token_mixer.affine.weight', 'backbone.network.0.1.mlp.fc1.bias',
              'backbone.network.1.proj.weight', 'backbone.network.6.1.layer_scale_2',
              'backbone.norm6.weight', 'head.fc.weight']:
        assert k in keys, k
    deploy_keys = set(rk.create_model('riformer_s12', deploy=True).state_dict())
    assert 'backbone.network.0.0.norm_reparam.weight' in deploy_keys
    assert not any('token_mixer' in k or 'norm1.' in k for k in deploy_keys)


def test_backbone_out_indices_and_frozen_stages():
    backbone = rk.RIFormer(TINY_ARCH, out_indices=(0, 2, 4, 6), frozen_stages=1).double()
    outs = backbone(torch.randn(2, 3, 32, 32, dtype=torch.float64))
    assert [tuple(o.shape) for o in outs] == [(2, 8, 8, 8), (2, 16, 4, 4), (2, 24, 2, 2),
                                            (2, 32, 1, 1)]
    assert not any(p.requires_grad for p in backbone.network[1].parameters())
    assert not backbone.network[0].training and not backbone.norm0.training
    assert all(p.requires_grad for p in backbone.network[2].parameters())
    backbone.train()
    assert not backbone.patch_embed.training


@pytest.mark.parametrize('level', ['block', 'backbone', 'classifier'])
def test_switch_to_deploy_keeps_outputs(level):
    if level == 'block':
        model, x = rk.RIFormerBlock(12), torch.randn(2, 12, 5, 5)
    elif level == 'backbone':
        model, x = rk.RIFormer(TINY_ARCH), torch.randn(2, 3, 32, 32)
    else:
        model, x = rk.RIFormerClassifier(TINY_ARCH, num_classes=7), torch.randn(2, 3, 32, 32)
    model = randomize_(model).double().eval()
    x = x.double()
    with rk.use_backend('reference'):
        before = model(x)
        model.switch_to_deploy()
        after = model(x)
    before, after = (torch.cat([t.flatten() for t in v]) if isinstance(v, tuple) else v
                     for v in (before, after))
    assert rel_err(after, before) <= 1e-10
    assert not any(hasattr(m, 'norm1') for m in model.modules() if isinstance(m, rk.RIFormerBlock))


def _upstream_checkpoint(tmp_path, classifier):
    """An mmpretrain-style file: a `state_dict` entry with `backbone.`/`head.` keys, plus meta."""
    path = tmp_path / 'riformer.pth'
    torch.save({'meta': {'epoch': 300, 'mmpretrain_version': '1.0.0'},
                'state_dict': {k: v.float() for k, v in classifier.state_dict().items()}}, path)
    return path


@pytest.mark.parametrize('deploy', [False, True])
def test_checkpoint_round_trip_reproduces_reference_logits_fp64(tmp_path, deploy):
    source = randomize_(rk.RIFormerClassifier(TINY_ARCH, num_classes=10)).float()
    path = _upstream_checkpoint(tmp_path, source)
    upstream = copy.deepcopy(source)
    if deploy:
        # upstream's own route: load the fp32 training checkpoint, switch_to_deploy (in fp32)
        upstream.switch_to_deploy()
    upstream = upstream.double().eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with rk.use_backend('reference'):
        expected = upstream(x)
    model = rk.RIFormerClassifier(TINY_ARCH, num_classes=10, deploy=deploy)
    rk.load_checkpoint(model, path)
    model = model.double().eval()
    got = model(x)   # default dispatch (the fused cpu backend when built)
    assert rel_err(got, expected) <= 1e-10


def test_create_model_loads_a_checkpoint_in_both_forms(tmp_path):
    source = randomize_(rk.create_model('riformer_s12', num_classes=5))
    path = _upstream_checkpoint(tmp_path, source)
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    for deploy in (False, True):
        upstream = copy.deepcopy(source)
        if deploy:
            upstream.switch_to_deploy()
        with rk.use_backend('reference'):
            expected = upstream.double().eval()(x)
        model = rk.create_model('riformer_s12', num_classes=5, checkpoint=str(path),
                                deploy=deploy).double().eval()
        assert rel_err(model(x), expected) <= 1e-10


def test_backbone_takes_bare_and_prefixed_state_dicts():
    source = randomize_(rk.RIFormerClassifier(TINY_ARCH, num_classes=3))
    backbone = rk.RIFormer(TINY_ARCH)
    rk.load_checkpoint(backbone, source.state_dict())          # backbone.* + head.* (head ignored)
    for k, v in backbone.state_dict().items():
        assert torch.equal(v, source.state_dict()[f'backbone.{k}'])
    classifier = rk.RIFormerClassifier(TINY_ARCH, num_classes=3)
    rk.load_checkpoint(classifier, {'state_dict': source.state_dict()})
    for k, v in classifier.state_dict().items():
        assert torch.equal(v, source.state_dict()[k])


def test_mismatched_checkpoint_reports_every_problem_at_once():
    source = rk.RIFormerClassifier(TINY_ARCH, num_classes=3).state_dict()
    source.pop('backbone.norm6.weight')
    source.pop('head.fc.bias')
    source['backbone.extra.weight'] = torch.zeros(1)
    source['head.fc.weight'] = torch.zeros(4, 32)
    with pytest.raises(ValueError) as err:
        rk.load_checkpoint(rk.RIFormerClassifier(TINY_ARCH, num_classes=3), source)
    text = str(err.value)
    for expected in ['backbone.norm6.weight', 'head.fc.bias', 'backbone.extra.weight',
                     'head.fc.weight: checkpoint (4, 32) vs model (3, 32)']:
        assert expected in text


def test_deploy_checkpoint_into_training_model_explains():
    deploy_sd = rk.RIFormerClassifier(TINY_ARCH, num_classes=3, deploy=True).state_dict()
    with pytest.raises(ValueError, match='deploy=True'):
        rk.load_checkpoint(rk.RIFormerClassifier(TINY_ARCH, num_classes=3), deploy_sd)


def test_unknown_model_and_arch_names():
    with pytest.raises(ValueError, match='riformer_s12'):
        rk.create_model('riformer_xl')
    with pytest.raises(ValueError, match='s12'):
        rk.RIFormer('s13')
