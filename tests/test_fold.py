"""The shared algebra of riformer_kernels.fold, checked against autograd in float64."""
import pytest
import torch
import torch.nn.functional as F

from riformer_kernels import fold
from riformer_kernels.params import BlockParams
from helpers import make_block, random_input, rel_err


def test_merge_moments_equals_one_pass_over_the_whole_row():
    x = random_input((3, 5, 7, 11), offset=1e3)
    tiles = x.reshape(3, 5, 7 * 11).split([20, 20, 20, 17], dim=2)
    counts = torch.tensor([t.shape[2] for t in tiles], dtype=torch.float64)
    means = torch.stack([t.mean(2) for t in tiles], dim=2)
    m2s = torch.stack([((t - t.mean(2, keepdim=True)) ** 2).sum(2) for t in tiles], dim=2)
    mean, var = fold.merge_moments(counts, means, m2s, dim=2)
    ref_var, ref_mean = torch.var_mean(x, dim=(2, 3), unbiased=False)
    assert rel_err(mean, ref_mean) <= 1e-14
    assert rel_err(var, ref_var) <= 1e-12


@pytest.mark.parametrize('deploy', [False, True])
@pytest.mark.parametrize('with_drop_path', [False, True])
def test_backward_coefficients_match_autograd(deploy, with_drop_path):
    """docs/design.md section 3 (P, Q, R, S and the O(C) parameter gradients) vs autograd."""
    n, c, h, w = 3, 10, 4, 5
    block = make_block(c, deploy=deploy)
    p = BlockParams.of(block)
    x = random_input((n, c, h, w)).requires_grad_(True)
    dp = torch.tensor([2.0, 0.0, 2.0], dtype=torch.float64) if with_drop_path else None
    s, t, l1, l2 = p.fold_inputs(n, torch.float64, dp, dp)
    mean, var = fold.channel_moments(x)
    cf = fold.fold_coefficients(mean, var, s, t, l1, p.g2, p.beta2, p.eps1, p.eps2)
    pc = lambda v: v[:, :, None, None]  # noqa: E731
    z = pc(cf.A) * x + pc(cf.B)
    z_leaf = z.detach().requires_grad_(True)
    o = F.conv2d(F.gelu(F.conv2d(z_leaf, p.w1, p.b1)), p.w2, p.b2)
    out = pc(cf.a) * x + pc(cf.b) + pc(l2) * o.detach()
    g = torch.randn(out.shape, dtype=torch.float64)
    # dz: gradient of the MLP branch only, as the kernels' phase 1 computes it
    (dz,) = torch.autograd.grad((pc(l2) * o * g).sum(), z_leaf)

    # the truth: autograd through the whole folded forward (reference-equal, tested elsewhere)
    leaves = [x, s, t, p.ls1, p.ls2, p.g2, p.beta2]
    full = pc(cf.a) * x + pc(cf.b) + pc(l2) * F.conv2d(F.gelu(F.conv2d(z, p.w1, p.b1)), p.w2, p.b2)
    truth = torch.autograd.grad((full * g).sum(), leaves, allow_unused=True)

    with torch.no_grad():
        xc = x - pc(mean)
        sums = torch.stack([g.sum((2, 3)), (g * xc).sum((2, 3)), dz.sum((2, 3)),
                            (dz * xc).sum((2, 3)), (g * o).sum((2, 3))])
        bc = fold.backward_coefficients(sums, mean, var, cf, s, t, l1, p.g2, h * w)
        dx = pc(bc.P) * g + pc(bc.Q) * dz + pc(bc.R) * xc + pc(bc.S)
        dpn = dp if dp is not None else torch.ones(n, dtype=torch.float64)
        d_ls1 = (bc.d_l1 * dpn[:, None]).sum(0)
        d_ls2 = (bc.d_l2 * dpn[:, None]).sum(0)
    got = [dx, bc.d_s, bc.d_t, d_ls1, d_ls2, bc.d_g2, bc.d_beta2]
    for name, a, b in zip(['x', 's', 't', 'ls1', 'ls2', 'g2', 'beta2'], got, truth):
        assert rel_err(a, b) <= 1e-12, name
