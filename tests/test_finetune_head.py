"""Fine-tuning from a checkpoint with another head: create_model(num_classes=K, checkpoint=...)
loads the backbone exactly, keeps the fresh head and names the skipped keys; everything else
stays strict."""
import copy
import warnings

import pytest
import torch

import riformer_kernels as rk
from riformer_kernels.models import HeadNotLoadedWarning, describe_checkpoint
from helpers import randomize_, rel_err

TINY_ARCH = dict(layers=[1, 2, 1, 1], embed_dims=[8, 16, 24, 32], mlp_ratios=[4, 4, 4, 4])
HEAD = ['head.fc.weight', 'head.fc.bias']


@pytest.fixture(scope='module')
def imagenet_checkpoint(tmp_path_factory):
    """An mmpretrain-style 1000-class S12 file with random weights (training form)."""
    torch.manual_seed(3)
    source = randomize_(rk.create_model('riformer_s12', num_classes=1000))
    path = tmp_path_factory.mktemp('ck') / 'riformer-s12_in1k.pth'
    torch.save({'meta': {'mmpretrain_version': '1.0.0'}, 'state_dict': source.state_dict()}, path)
    return source, path


@pytest.mark.parametrize('deploy', [False, True])
def test_other_head_keeps_the_fresh_head_and_loads_the_backbone(imagenet_checkpoint, deploy):
    source, path = imagenet_checkpoint
    torch.manual_seed(11)
    fresh = rk.create_model('riformer_s12', num_classes=7, deploy=deploy)
    torch.manual_seed(11)
    with pytest.warns(HeadNotLoadedWarning) as record:
        model = rk.create_model('riformer_s12', num_classes=7, checkpoint=path, deploy=deploy)
    (warning,) = [w.message for w in record if isinstance(w.message, HeadNotLoadedWarning)]
    assert warning.keys == HEAD
    assert 'head.fc.weight (checkpoint (1000, 512), model (7, 512))' in str(warning)
    # the head is the fresh initialisation (the same seed builds the same one), untouched
    assert torch.equal(model.head.fc.weight, fresh.head.fc.weight)
    assert torch.equal(model.head.fc.bias, fresh.head.fc.bias)
    assert model.head.fc.weight.shape == (7, 512)
    # the backbone computes what the checkpoint's backbone computes; deploy: as upstream's own
    # route gives it (switch_to_deploy on the fp32 weights, so the fold rounds the same way)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    upstream = copy.deepcopy(source.backbone)
    if deploy:
        upstream.switch_to_deploy()
    with rk.use_backend('reference'):
        want = upstream.double().eval()(x)[-1]
        got = copy.deepcopy(model.backbone).double().eval()(x)[-1]
    assert rel_err(got, want) <= 1e-10
    if not deploy:
        for k, v in model.backbone.state_dict().items():
            assert torch.equal(v, source.state_dict()[f'backbone.{k}']), k


def test_same_head_loads_exactly_without_warning(imagenet_checkpoint):
    source, path = imagenet_checkpoint
    with warnings.catch_warnings():
        warnings.simplefilter('error', HeadNotLoadedWarning)
        for num_classes in (None, 1000):   # None: taken from the checkpoint
            model = rk.create_model('riformer_s12', num_classes=num_classes, checkpoint=path)
            assert torch.equal(model.head.fc.weight, source.head.fc.weight)


def test_num_classes_default_follows_the_checkpoint(tmp_path):
    source = rk.create_model('riformer_s12', num_classes=10)
    torch.save(source.state_dict(), tmp_path / 'ten.pth')
    assert rk.create_model('riformer_s12', checkpoint=tmp_path / 'ten.pth').head.fc.out_features == 10
    assert rk.create_model('riformer_s12').head.fc.out_features == 1000
    with pytest.raises(ValueError, match='num_classes must be a positive int'):
        rk.create_model('riformer_s12', num_classes=0)


def test_backbone_only_checkpoint_keeps_the_fresh_head(tmp_path):
    source = randomize_(rk.RIFormer('s12'))
    torch.save({'state_dict': source.state_dict()}, tmp_path / 'backbone.pth')
    with pytest.warns(HeadNotLoadedWarning, match='head.fc.weight \\(not in the checkpoint\\)'):
        model = rk.create_model('riformer_s12', num_classes=3, checkpoint=tmp_path / 'backbone.pth')
    for k, v in source.state_dict().items():
        assert torch.equal(model.backbone.state_dict()[k], v), k


def test_a_mismatch_outside_the_head_still_raises(imagenet_checkpoint, tmp_path):
    source, _ = imagenet_checkpoint
    state = dict(source.state_dict())
    state['backbone.norm6.weight'] = torch.ones(7)          # mis-shaped, not in the head
    state.pop('backbone.network.0.0.mlp.fc1.bias')           # missing
    state['backbone.extra'] = torch.zeros(1)                 # unexpected
    torch.save(state, tmp_path / 'bad.pth')
    with pytest.raises(ValueError) as err:
        rk.create_model('riformer_s12', num_classes=7, checkpoint=tmp_path / 'bad.pth')
    text = str(err.value)
    for expected in ['backbone.norm6.weight: checkpoint (7,) vs model (512,)',
                     'backbone.network.0.0.mlp.fc1.bias', 'backbone.extra']:
        assert expected in text
    assert 'head.fc' not in text


def test_load_checkpoint_stays_strict_about_the_head_by_default(imagenet_checkpoint):
    source, _ = imagenet_checkpoint
    model = rk.create_model('riformer_s12', num_classes=7)
    with pytest.raises(ValueError, match=r'head.fc.weight: checkpoint \(1000, 512\) vs model'):
        rk.load_checkpoint(model, source.state_dict())
    before = copy.deepcopy(model.head.state_dict())
    with pytest.warns(HeadNotLoadedWarning):
        rk.load_checkpoint(model, source.state_dict(), skip_mismatched_head=True)
    assert all(torch.equal(model.head.state_dict()[k], v) for k, v in before.items())
    assert torch.equal(model.backbone.patch_embed.proj.weight,
                       source.backbone.patch_embed.proj.weight)


def test_a_half_fitting_head_is_skipped_whole():
    """A checkpoint head whose weight fits but whose bias does not is not a head to keep half
    of: both keys stay fresh."""
    source = rk.RIFormerClassifier(TINY_ARCH, num_classes=4)
    state = dict(source.state_dict())
    state['head.fc.bias'] = torch.zeros(5)
    model = rk.RIFormerClassifier(TINY_ARCH, num_classes=4)
    before = copy.deepcopy(model.head.state_dict())
    with pytest.warns(HeadNotLoadedWarning) as record:
        rk.load_checkpoint(model, state, skip_mismatched_head=True)
    assert [w.message.keys for w in record] == [HEAD]
    assert all(torch.equal(model.head.state_dict()[k], v) for k, v in before.items())


def test_describe_checkpoint_reads_the_arch():
    assert describe_checkpoint(rk.create_model('riformer_m36', num_classes=5, deploy=True)
                               .state_dict()) == dict(arch='m36', num_classes=5, deploy=True,
                                                      in_channels=3, in_patch_size=7,
                                                      out_indices=(6,))
    info = describe_checkpoint({'state_dict': rk.RIFormer(TINY_ARCH, out_indices=(2, 6),
                                                          in_channels=1).state_dict()})
    assert info == dict(arch=dict(layers=[1, 2, 1, 1], embed_dims=[8, 16, 24, 32],
                                  mlp_ratios=[4.0] * 4),
                        num_classes=None, deploy=False, in_channels=1, in_patch_size=7,
                        out_indices=(2, 6))
    with pytest.raises(ValueError, match='no RIFormer stages'):
        describe_checkpoint({'fc.weight': torch.zeros(2, 2)})
