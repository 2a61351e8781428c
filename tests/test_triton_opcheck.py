"""torch.library.opcheck, all of its checks, for every riformer_triton custom op: schema, autograd
registration, fake tensor (the fake's shapes, dtypes and strides against the real kernel's) and
AOT dispatch with dynamic shapes (what torch.compile(dynamic=True) and torch.export rely on).

The ops run on helpers.KERNEL_DEVICE: under the Triton interpreter on CPU here (small shapes,
so the interpreter stays quick), compiled on a GPU. Both backward paths (small C: weight
gradients with the sums, then dx; large C: hidden/du scratch then weight gradients with dx
fused) and both forward paths (flash, two GEMMs), with and without the saved u."""
import pytest

pytest.importorskip('triton', reason='triton is not installed (optional: pip install triton)')
import torch  # noqa: E402

import riformer_kernels as rk  # noqa: E402
from riformer_kernels import fold  # noqa: E402
from riformer_kernels.params import BlockParams  # noqa: E402
from helpers import KERNEL_DEVICE as DEV, make_block, random_input  # noqa: E402

INFO = rk.available_backends()['triton']
pytestmark = pytest.mark.skipif(not INFO.usable, reason=INFO.reason)
OPS = torch.ops.riformer_triton


def _inputs(c, shape_hw=(2, 3), n=2):
    """What the pipeline hands the kernels for one fp32 block of width c (detached)."""
    block = make_block(c, dtype=torch.float32, device=DEV)
    x = random_input((n, c) + shape_hw, torch.float32, device=DEV)
    g = random_input(x.shape, torch.float32, device=DEV)
    p = BlockParams.of(block)
    mean, var = fold.channel_moments(x)
    s, t, l1, l2 = p.fold_inputs(n, mean.dtype)
    cf = fold.fold_coefficients(mean, var, s, t, l1, p.g2, p.beta2, p.eps1, p.eps2)
    d = lambda v: v.detach().contiguous()                                         # noqa: E731
    return dict(x=x, g=g, mean=d(mean), A=d(cf.A), B=d(cf.B), a=d(cf.a), b=d(cf.b),
                l2=d(l2), w1=d(p.w1), b1=d(p.b1), w2=d(p.w2), b2=d(p.b2),
                P=torch.randn(n, c, device=DEV))


def test_forward_ops():
    v = _inputs(16)
    x, A, B, a, b, l2, w1, b1, w2, b2 = (v[k] for k in ('x', 'A', 'B', 'a', 'b', 'l2', 'w1',
                                                        'b1', 'w2', 'b2'))
    torch.library.opcheck(OPS.moments_partials, (x,))
    torch.library.opcheck(OPS.fused_mlp_forward, (x, A, B, a, b, l2, w1, b1, w2, b2))
    for path in ('flash', 'two_gemm'):
        for save_u in (False, True):
            torch.library.opcheck(OPS.mlp_forward, (x, A, B, a, b, l2, w1, b1, w2, b2),
                                  {'save_u': save_u, 'path': path})
    for save_u in (False, True):
        torch.library.opcheck(OPS.mlp_hidden, (x, A, B, w1, b1), {'save_u': save_u})
    h, _ = OPS.mlp_hidden(x, A, B, w1, b1)
    torch.library.opcheck(OPS.mlp_output, (h, x, a, b, l2, w2, b2))


@pytest.mark.parametrize('save_u', [False, True], ids=['recompute', 'save_u'])
def test_backward_ops_small_and_large_channel_paths(save_u, monkeypatch):
    from riformer_kernels.backends.triton import backward as tb
    v = _inputs(16)
    g, x, P = v['g'], v['x'], v['P']
    fixed = tuple(v[k] for k in ('mean', 'A', 'B', 'w1', 'b1', 'w2', 'b2', 'l2'))
    u = (OPS.mlp_forward(x, v['A'], v['B'], v['a'], v['b'], v['l2'], v['w1'], v['b1'], v['w2'],
                         v['b2'], save_u=True)[3] if save_u else None)
    torch.library.opcheck(OPS.mlp_backward, (g, x) + fixed + (u,))
    torch.library.opcheck(OPS.input_grad, (g, g.clone(), x, v['mean'], P, P, P, P))
    torch.library.opcheck(OPS.backward_weights_sums, (g, x) + fixed + (u,))
    torch.library.opcheck(OPS.backward_dx, (g, x) + fixed + (u, P, P, P, P))
    monkeypatch.setattr(tb, 'SMALL_PATH_MAX_CHANNELS', 0)      # the large-C path at C=16
    torch.library.opcheck(OPS.backward_dz, (g, x) + fixed + (u,))
    dz, _, _, *scratch = OPS.backward_dz(g, x, *fixed, u)
    torch.library.opcheck(OPS.backward_weights_dx, (g, x, dz) + fixed + (u, *scratch, P, P, P, P))


def test_every_op_of_the_namespace_is_checked_here():
    """A new riformer_triton op must be added to the checks above."""
    checked = {'moments_partials', 'fused_mlp_forward', 'mlp_forward', 'mlp_hidden',
               'mlp_output', 'mlp_backward', 'input_grad', 'backward_weights_sums',
               'backward_dx', 'backward_dz', 'backward_weights_dx'}
    registered = {name for name in dir(OPS) if not name.startswith('_')
                  and isinstance(getattr(OPS, name), torch._ops.OpOverloadPacket)}
    assert registered == checked, registered ^ checked
