"""rk.convert: upstream-style RIFormer blocks become fused blocks in place, sharing parameters and
keeping their form; modules with the names but not the computation are refused.

The upstream-style tree is built from reference.py's pieces (which mirror mmpretrain's
RIFormerBlock: the same children, names and forward), plus a PoolFormer teacher block (same
names but for the mixer) that must be left alone. With mmpretrain importable, its own RIFormer
backbone is converted too."""
import copy

import pytest
import torch
from torch import nn

import riformer_kernels as rk
from riformer_kernels import reference
from riformer_kernels.convert import DEPLOY_FORM_NAMES, TRAINING_FORM_NAMES
from helpers import randomize_, rel_err

CPU = rk.available_backends()['cpu']
needs_cpu = pytest.mark.skipif(not CPU.usable, reason=f"cpu backend unusable: {CPU.reason}")


class UpstreamBlock(nn.Module):
    """mmpretrain's RIFormerBlock as its own class (not rk's): its children and names, with
    the norm and activation upstream's configs would build (overridable to build wrong ones)."""

    def __init__(self, dim, mlp_ratio=4.0, drop_path=0.0, deploy=False, norm=None, act=None):
        super().__init__()
        norm = norm or (lambda: nn.GroupNorm(1, dim))
        if deploy:
            self.norm_reparam = norm()
        else:
            self.norm1 = norm()
            self.token_mixer = reference.Affine(dim)
        reference.add_channel_mlp_branch(self, dim, mlp_ratio, 0.0, drop_path, 1e-5)
        self.norm2 = norm()
        if act is not None:
            self.mlp.act = act
        del self.dim                 # upstream keeps dim, but convert must not rely on it

    def forward(self, x):
        if hasattr(self, 'norm_reparam'):
            x = x + self.drop_path(self.layer_scale_1[:, None, None] * self.norm_reparam(x))
        else:
            x = x + self.drop_path(self.layer_scale_1[:, None, None]
                                   * self.token_mixer(self.norm1(x)))
        return x + self.drop_path(self.layer_scale_2[:, None, None] * self.mlp(self.norm2(x)))


def upstream_tree():
    """A small upstream-style network: stem, a stage of two training-form blocks, a
    downsampling conv, a deploy-form block next to a PoolFormer block, a head."""
    torch.manual_seed(0)
    model = nn.Sequential(
        reference.PatchEmbed(3, 2, 1, 3, 8),
        nn.Sequential(UpstreamBlock(8, drop_path=0.2), UpstreamBlock(8)),
        reference.PatchEmbed(3, 2, 1, 8, 16),
        nn.Sequential(UpstreamBlock(16, deploy=True), rk.PoolFormerBlock(16)),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5))
    return randomize_(model).double()


@needs_cpu
def test_convert_replaces_shares_parameters_and_keeps_outputs_and_gradients():
    model = upstream_tree()
    original = copy.deepcopy(model)
    params_before = dict(model.named_parameters())
    keys_before = list(model.state_dict())
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    model.eval()
    with torch.no_grad():
        want = model(x)
    converted, count = rk.convert(model, backend='cpu')
    assert not any(m.training for m in model.modules())            # the mode is kept
    assert converted is model and count == 3
    blocks = [m for m in model.modules() if isinstance(m, rk.RIFormerBlock)]
    assert len(blocks) == 3
    assert [b.deploy for b in blocks] == [False, False, True]
    assert isinstance(model[3][1], rk.PoolFormerBlock)              # left alone
    assert list(model.state_dict()) == keys_before
    for name, p in model.named_parameters():
        assert p is params_before[name], name                       # the same Parameter objects
    assert blocks[0].chain_statistics and not blocks[1].chain_statistics
    assert blocks[0].drop_path_prob == 0.2
    assert 'requested: cpu' in rk.explain_dispatch(blocks[0], torch.randn(1, 8, 4, 4).double())

    model.train()
    original.train()
    g = torch.randn(2, 5, dtype=torch.float64)
    torch.manual_seed(5)
    out = model(x)
    out.backward(g)
    torch.manual_seed(5)                                             # the same drop-path masks
    ref = original(x)
    ref.backward(g)
    assert rel_err(out, ref) <= 1e-10                                # fp64: rounding only
    ref_params = dict(original.named_parameters())
    for name, p in params_before.items():                           # the originals were trained
        assert p.grad is not None, name
        want_grad = ref_params[name].grad
        if name == '3.1.norm1.bias':
            # The pooling mixer ignores a per-channel shift: this gradient is zero up to
            # rounding in both runs, so only its absolute size means something.
            assert p.grad.abs().max() <= 1e-12 and want_grad.abs().max() <= 1e-12
            continue
        assert rel_err(p.grad, want_grad) <= 1e-10, name
    model.eval()
    with torch.no_grad():
        assert rel_err(model(x), want) <= 1e-10


@needs_cpu
def test_converted_block_runs_the_fused_kernels_and_switches_to_deploy():
    block = randomize_(UpstreamBlock(8)).float()
    fused, count = rk.convert(block)                                 # the root itself
    assert count == 1 and isinstance(fused, rk.RIFormerBlock) and fused.backend == 'auto'
    assert fused.norm1 is block.norm1 and fused.mlp.fc1 is block.mlp.fc1
    x = torch.randn(2, 8, 5, 5, requires_grad=True)
    with rk.use_backend('cpu'):
        out = fused(x)
    assert type(out.grad_fn).__name__ == 'FusedBlockFunctionBackward'
    assert rel_err(out, block(x)) <= 1e-5                           # fp32 block contract
    fused.switch_to_deploy()
    with rk.use_backend('cpu'), torch.no_grad():
        assert rel_err(fused(x), block(x)) <= 1e-5


def test_a_block_reachable_twice_is_replaced_once_everywhere():
    shared = randomize_(UpstreamBlock(8))
    model = nn.Sequential(shared, nn.Sequential(shared))
    model, count = rk.convert(model)
    assert count == 1 and model[0] is model[1][0] and isinstance(model[0], rk.RIFormerBlock)


def test_converting_twice_and_fused_models_change_nothing():
    model = rk.RIFormer({'layers': [1, 1], 'embed_dims': [8, 16], 'mlp_ratios': [4, 4],
                         'layer_scale_init_value': 1e-5}, out_indices=(2,))
    assert rk.convert(model)[1] == 0
    tree = upstream_tree()
    assert rk.convert(tree)[1] == 3 and rk.convert(tree)[1] == 0


def test_custom_eps_is_kept_through_conversion_and_deploy():
    block = randomize_(UpstreamBlock(8, norm=lambda: nn.GroupNorm(1, 8, eps=1e-3))).double()
    x = torch.randn(2, 8, 3, 3, dtype=torch.float64)
    want = block(x)
    fused, _ = rk.convert(copy.deepcopy(block))
    fused.switch_to_deploy()
    assert fused.norm_reparam.eps == 1e-3
    with rk.use_backend('torch'):
        assert rel_err(fused(x), want) <= 1e-10


class NoFirstResidual(UpstreamBlock):
    def forward(self, x):
        x = self.layer_scale_1[:, None, None] * self.token_mixer(self.norm1(x))
        return x + self.layer_scale_2[:, None, None] * self.mlp(self.norm2(x))


class EpsOutsideSqrt(nn.GroupNorm):
    """A norm with the same parameters that adds eps to the standard deviation."""
    def forward(self, x):
        mean = x.mean((1, 2, 3), keepdim=True)
        std = x.var((1, 2, 3), keepdim=True, unbiased=False).sqrt()
        return (x - mean) / (std + self.eps) * self.weight[:, None, None] + self.bias[:, None, None]


class PlainDifference(nn.Module):
    """Structure-preserving wrapper whose forward forgets to subtract its input."""
    def __init__(self, dim):
        super().__init__()
        self.affine = nn.Conv2d(dim, dim, 1, groups=dim)

    def forward(self, x):
        return self.affine(x)


def _mixer_without_minus(dim):
    block = UpstreamBlock(dim)
    block.token_mixer = PlainDifference(dim)
    return block


def _with_buffer(dim):
    block = UpstreamBlock(dim)
    block.register_buffer('running', torch.zeros(dim))
    return block


def _extra_parameter(dim):
    block = UpstreamBlock(dim)
    block.gate = nn.Parameter(torch.ones(dim))
    return block


@pytest.mark.parametrize('make, match', [
    (lambda: UpstreamBlock(8, act=nn.GELU(approximate='tanh')), "approximate='tanh'"),
    (lambda: UpstreamBlock(8, act=nn.ReLU()), 'mlp.act is ReLU'),
    (lambda: UpstreamBlock(8, norm=lambda: nn.GroupNorm(2, 8)), 'num_groups=2'),
    (lambda: UpstreamBlock(8, norm=lambda: EpsOutsideSqrt(1, 8)), 'EpsOutsideSqrt'),
    (lambda: NoFirstResidual(8), 'differs from upstream'),
    (lambda: _mixer_without_minus(8), 'differs from upstream'),
    (lambda: _extra_parameter(8), r"extra \['gate'\]"),
    (lambda: _with_buffer(8), r"buffers \['running'\]"),
], ids=['tanh_gelu', 'relu', 'two_groups', 'gn_subclass', 'no_residual', 'mixer_no_minus',
        'extra_param', 'buffer'])
def test_same_names_different_semantics_is_refused_and_nothing_changes(make, match):
    torch.manual_seed(0)
    bad = make()
    model = nn.Sequential(UpstreamBlock(8), nn.Sequential(bad))
    with pytest.raises(ValueError, match=match) as err:
        rk.convert(model)
    assert '1.0' in str(err.value)                                   # names the module's path
    assert type(model[0]) is UpstreamBlock                            # nothing was replaced
    assert model[1][0] is bad


def test_structure_alone_does_not_pass_a_wrong_forward():
    """The forward probe is what refuses these two: their structure is upstream's."""
    for make in (lambda: NoFirstResidual(8), lambda: _mixer_without_minus(8)):
        with pytest.raises(ValueError, match=r'relative difference \d'):
            rk.convert(make())


def test_parameter_name_sets_are_upstreams():
    assert {n for n, _ in UpstreamBlock(8).named_parameters()} == TRAINING_FORM_NAMES
    assert {n for n, _ in UpstreamBlock(8, deploy=True).named_parameters()} == DEPLOY_FORM_NAMES
    assert {n for n, _ in rk.RIFormerBlock(8).named_parameters()} == TRAINING_FORM_NAMES


def test_backend_argument_is_checked(monkeypatch):
    with pytest.raises(ValueError, match='unknown backend'):
        rk.convert(UpstreamBlock(8), backend='fast')
    # A backend that cannot run here (made so: every backend may be usable on some machine).
    from riformer_kernels import dispatch
    monkeypatch.setattr(dispatch._REGISTRY['cuda'], 'availability', lambda: 'no GPU (stand-in)')
    with pytest.raises(rk.BackendUnavailableError, match="'cuda' is not usable"):
        rk.convert(UpstreamBlock(8), backend='cuda')
    with pytest.raises(TypeError, match='nn.Module'):
        rk.convert(torch.zeros(1))


@needs_cpu
def test_mmpretrain_riformer_backbone_converts_and_matches():
    backbones = pytest.importorskip('mmpretrain.models.backbones')
    arch = {'layers': [2, 1], 'embed_dims': [8, 16], 'mlp_ratios': [4, 4],
            'layer_scale_init_value': 1e-5}
    for deploy in (False, True):
        torch.manual_seed(0)
        model = randomize_(backbones.RIFormer(arch=dict(arch), out_indices=(2,),
                                              deploy=deploy)).double().eval()
        params = dict(model.named_parameters())
        x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
        with torch.no_grad():
            want = model(x)[-1]
        model, count = rk.convert(model, backend='cpu')
        assert count == 3
        assert all(p is params[n] for n, p in model.named_parameters())
        with torch.no_grad():
            assert rel_err(model(x)[-1], want) <= 1e-10
