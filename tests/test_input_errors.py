"""Inputs no backend computes correctly are rejected with an error naming the problem."""
import pytest
import torch

from helpers import make_block, random_input


@pytest.fixture
def block():
    return make_block(8)


def test_wrong_rank_is_a_value_error(block):
    with pytest.raises(ValueError, match='4-D'):
        block(random_input((2, 8, 4)))


def test_wrong_channel_count_is_a_value_error(block):
    with pytest.raises(ValueError, match='dim=8.*6 channels'):
        block(random_input((2, 6, 4, 4)))


def test_integer_dtype_is_a_type_error(block):
    with pytest.raises(TypeError, match='floating-point'):
        block(torch.randint(0, 5, (2, 8, 4, 4)))


def test_parameters_and_input_on_different_devices(block):
    x = torch.empty((2, 8, 4, 4), dtype=torch.float64, device='meta')
    with pytest.raises(ValueError, match='meta.*cpu|cpu.*meta'):
        block(x)


def test_dtype_mismatch_is_a_type_error(block):
    with pytest.raises(TypeError, match='float32.*float64'):
        block(random_input((2, 8, 4, 4), dtype=torch.float32))


def test_not_a_tensor_is_a_type_error(block):
    with pytest.raises(TypeError, match='torch.Tensor'):
        block([[1.0]])


def test_empty_spatial_extent_is_a_value_error(block):
    with pytest.raises(ValueError, match='empty'):
        block(torch.empty((2, 8, 0, 4), dtype=torch.float64))


# ---------------------------------------------------------------------------------------------
# every backend usable here: dtype mismatch, NaN/Inf, empty batch

import copy  # noqa: E402

import riformer_kernels as rk  # noqa: E402
import helpers  # noqa: E402
from helpers import rel_err  # noqa: E402

# The kernel-test device for triton (CUDA, or CPU under the interpreter); CPU for the rest.
DEVICE = {'reference': torch.device('cpu'), 'torch': torch.device('cpu'),
          'cpu': torch.device('cpu'), 'triton': helpers.KERNEL_DEVICE,
          'cuda': helpers.KERNEL_DEVICE}
BACKENDS = [pytest.param(name, marks=pytest.mark.skipif(
    not rk.available_backends()[name].usable, reason=rk.available_backends()[name].reason))
    for name in DEVICE]
FORMS = pytest.mark.parametrize('deploy', [False, True], ids=['train_form', 'deploy_form'])


@FORMS
@pytest.mark.parametrize('backend', BACKENDS)
def test_input_and_parameter_dtypes_differ_outside_autocast(backend, deploy):
    """A TypeError naming both dtypes, before any backend runs: also when only one parameter
    (here norm2's weight) was cast."""
    dev = DEVICE[backend]
    block = make_block(8, deploy=deploy, dtype=torch.float32, device=dev)
    with rk.use_backend(backend):
        with pytest.raises(TypeError, match=r'input dtype torch.bfloat16 .* dtype torch.float32'):
            block(random_input((2, 8, 3, 3), dtype=torch.bfloat16, device=dev))
        block.norm2.weight.data = block.norm2.weight.data.double()
        with pytest.raises(TypeError, match=r'torch.float32 .* torch.float64 \(norm2.weight\)'):
            block(random_input((2, 8, 3, 3), dtype=torch.float32, device=dev))


@FORMS
@pytest.mark.parametrize('backend', BACKENDS)
# the Triton interpreter computes in numpy, which warns on the NaN arithmetic this test asks for
@pytest.mark.filterwarnings('ignore:invalid value encountered:RuntimeWarning')
def test_nan_and_inf_propagate_like_the_reference(backend, deploy):
    """A NaN in sample 0 and an Inf in sample 1 make those samples' outputs (and their dx)
    NaN everywhere, through their statistics, as in the reference; sample 2 stays finite and
    correct; the parameter gradients, sums over the batch, are non-finite where the
    reference's are."""
    dev = DEVICE[backend]
    block = make_block(8, deploy=deploy, dtype=torch.float32, device=dev)
    x = random_input((3, 8, 3, 3), dtype=torch.float32, device=dev)
    x[0, 2, 1, 1] = float('nan')
    x[1, 5, 0, 2] = float('inf')
    g = random_input(x.shape, dtype=torch.float32, device=dev)
    results = {}
    for name in ('reference', backend):
        b, xi = copy.deepcopy(block), x.clone().requires_grad_(True)
        with rk.use_backend(name):
            out = b(xi)
        out.backward(g)
        results[name] = (out.detach(), {'x': xi.grad, **{n: p.grad for n, p in
                                                           b.named_parameters()}})
    (ref, ref_grads), (out, grads) = results['reference'], results[backend]
    assert torch.isnan(ref[:2]).all() and torch.isfinite(ref[2]).all()   # what "like" means
    assert torch.equal(torch.isnan(out), torch.isnan(ref))
    assert torch.equal(torch.isinf(out), torch.isinf(ref))
    assert rel_err(out[2], ref[2]) <= 1e-5                 # the fp32 block contract
    for k in ref_grads:
        assert torch.equal(torch.isfinite(grads[k]), torch.isfinite(ref_grads[k])), k
    assert torch.isfinite(grads['x'][2]).all()


@FORMS
@pytest.mark.parametrize('backend', BACKENDS)
def test_empty_batch_gives_empty_output_and_zero_parameter_gradients(backend, deploy):
    """N=0: an empty output of the input's shape, dtype and device, forward and backward (the
    reference's gradients: an empty dx, every parameter gradient zero), with and without
    autograd."""
    dev = DEVICE[backend]
    block = make_block(8, deploy=deploy, dtype=torch.float32, device=dev)
    x = torch.empty((0, 8, 3, 3), dtype=torch.float32, device=dev, requires_grad=True)
    with rk.use_backend(backend):
        out = block(x)
        with torch.no_grad():
            assert block(x.detach()).shape == (0, 8, 3, 3)
    assert out.shape == x.shape and out.dtype == x.dtype and out.device == x.device
    out.sum().backward()
    assert x.grad.shape == x.shape
    for name, p in block.named_parameters():
        assert p.grad is not None and torch.equal(p.grad, torch.zeros_like(p)), name
