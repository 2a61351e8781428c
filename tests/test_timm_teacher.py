"""rk.poolformer_from_timm: timm's poolformer_* classifiers, with every parameter randomised to
order-one values (layer scales and norms included, so no wrong mapping hides behind a 1e-5 layer
scale or a unit norm weight), give the same logits through the converted teacher in fp64; the
capture interface and student_from_teacher work on it; other structures are refused."""
import pytest
import torch
from torch import nn

import riformer_kernels as rk

timm = pytest.importorskip("timm", reason="timm is not installed (pip install timm); the timm "
                                          "teacher conversion has nothing to convert")
from timm.models.metaformer import MetaFormer, Pooling  # noqa: E402
from timm.layers import GroupNorm1  # noqa: E402

TOL = 1e-10


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Order-one values everywhere: matrices ~ N(0, 1/fan_in), vectors named *weight or *scale
    (norm weights, layer scales) ~ U(0.5, 1.5), biases ~ N(0, 0.5^2)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) / p[0].numel() ** 0.5)
            elif name.endswith(('weight', 'scale')):
                p.copy_(0.5 + torch.rand(p.shape, generator=g, dtype=p.dtype))
            else:
                p.copy_(0.5 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def tiny_timm_poolformer(num_classes=5):
    """A small timm MetaFormer with poolformer_s12's structure (pooling, GELU, GroupNorm1, layer
    scales, no residual scales or downsampling norms, Linear head) and other widths/depths."""
    return MetaFormer(depths=(1, 2, 1, 1), dims=(8, 16, 24, 32), num_classes=num_classes,
                      token_mixers=Pooling, downsample_norm=None, mlp_act=nn.GELU, mlp_bias=True,
                      norm_layers=GroupNorm1, layer_scale_init_values=1e-5,
                      res_scale_init_values=None, use_mlp_head=False)


CASES = [pytest.param(lambda: timm.create_model('poolformer_s12', pretrained=False), 64,
                      id='poolformer_s12-64px'),
         pytest.param(tiny_timm_poolformer, 64, id='tiny-64px')]
# 64px: the last stage is 2x2 (at 32px a 1x1 map would make both head orders agree and the
# last block's pooling mixer output zero).


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _pair(build, seed=0):
    source = randomize_(build().double().eval(), seed)
    return source, rk.poolformer_from_timm(source)


@pytest.mark.parametrize('build,size', CASES)
def test_logits_equal_timm_fp64(build, size):
    source, teacher = _pair(build)
    assert isinstance(teacher, rk.PoolFormerClassifier) and teacher.head_norm == 'after_pool'
    x = torch.randn(2, 3, size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = source(x), teacher(x)
    assert want.abs().max() > 0.5        # order-one logits: a wrong map cannot hide
    assert rel(got, want) < TOL
    # The head order matters: the same weights with mmpretrain's order (norm, then pool) and
    # the GroupNorm default eps are a different function.
    mm = rk.PoolFormerClassifier(teacher.config['arch'], num_classes=want.shape[1],
                                 init_weights=False).double().eval()
    mm.load_state_dict(teacher.state_dict())
    with torch.no_grad():
        assert rel(mm(x), want) > 1e-3


@pytest.mark.parametrize('build,size', CASES)
def test_every_tensor_mapped_and_copied(build, size):
    source, teacher = _pair(build)
    state, ours = source.state_dict(), teacher.state_dict()
    mapping = rk.timm_teacher.timm_key_map(state, ours)
    assert set(mapping) == set(state)
    assert sorted(mapping.values()) == sorted(ours)        # one to one, nothing left unfilled
    for k, v in mapping.items():
        assert torch.equal(state[k], ours[v]), (k, v)
    assert teacher.output_norm().eps == source.head.norm.eps


def test_state_dict_source_equals_model_source():
    source, teacher = _pair(tiny_timm_poolformer)
    from_sd = rk.poolformer_from_timm(source.state_dict())
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        assert rel(from_sd(x), source(x)) < TOL


def test_capture_on_converted_teacher():
    source, teacher = _pair(tiny_timm_poolformer)
    blocks = [blk for stage in source.stages for blk in stage.blocks]
    timm_io = []   # timm's own token-mixer input and output, per block
    handles = [blk.token_mixer.register_forward_hook(
        lambda _m, args, out: timm_io.append((args[0], out))) for blk in blocks]
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad(), rk.capture_mixer_io(teacher) as records:
        teacher(x)
        source(x)
    for h in handles:
        h.remove()
    assert len(records) == len(timm_io) == len(blocks) == 5
    assert min(out.abs().max() for _, out in timm_io) > 0.1
    for rec, (t_in, t_out) in zip(records, timm_io):
        assert rel(rec.input, t_in) < TOL
        assert rel(rec.output, t_out) < TOL


def test_student_copies_every_shared_weight():
    source, teacher = _pair(tiny_timm_poolformer)
    student = rk.student_from_teacher(teacher)
    assert isinstance(student, rk.RIFormerClassifier) and student.head_norm == 'after_pool'
    assert student.output_norm().eps == teacher.output_norm().eps
    t_sd, s_sd = teacher.state_dict(), student.state_dict()
    assert set(s_sd) - set(t_sd) == {k for k in s_sd if '.token_mixer.affine.' in k}
    for k, v in t_sd.items():
        assert torch.equal(s_sd[k], v), k


@pytest.mark.parametrize('name,text', [
    ('convformer_s18', "token_mixer is SepConv, not pooling"),
    ('poolformerv2_s12', "stem has a norm"),
])
def test_other_structures_refused(name, text):
    model = timm.create_model(name, pretrained=False)
    with pytest.raises(ValueError, match=text):
        rk.poolformer_from_timm(model)


def test_convformer_state_dict_refused():
    sd = timm.create_model('convformer_s18', pretrained=False).state_dict()
    with pytest.raises(ValueError, match="non-pooling mixer or residual scales"):
        rk.poolformer_from_timm(sd)


def test_unmatched_keys_named():
    sd = dict(tiny_timm_poolformer().state_dict())
    sd['stages.1.blocks.0.extra.weight'] = torch.zeros(3)
    del sd['stages.2.blocks.0.mlp.fc2.bias']
    with pytest.raises(ValueError) as err:
        rk.poolformer_from_timm(sd)
    msg = str(err.value)
    assert "timm keys without a counterpart (1): ['stages.1.blocks.0.extra.weight']" in msg
    assert "our keys not filled (1): ['backbone.network.4.0.mlp.fc2.bias']" in msg


def test_not_a_model():
    with pytest.raises(TypeError, match="a timm model or its state_dict"):
        rk.poolformer_from_timm(torch.zeros(3))
