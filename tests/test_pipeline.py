"""The one fused pipeline (riformer_kernels.pipeline) as every kernel backend runs it: one autograd
Function, chained statistics (one moments pass per stage), no stale or foreign statistics.

The cpu kernel set runs on CPU tensors; the triton one on helpers.KERNEL_DEVICE (CUDA when torch
sees a GPU, else CPU under the Triton interpreter)."""
import copy
import os

import pytest
import torch

import riformer_kernels as rk
from riformer_kernels import pipeline
import helpers
from helpers import OpLog, randomize_, random_input, make_block, rel_err

# The kernel set's statistics op, as the dispatcher sees it.
MOMENTS_OP = {'cpu': 'riformer.moments.default',
              'triton': 'riformer_triton.moments_partials.default',
              'cuda': ('riformer.moments.default' if helpers.KERNEL_DEVICE.type == 'cuda'
                       else 'riformer_cuda_emu.moments.default')}
KERNEL_SETS = [pytest.param(name, marks=pytest.mark.skipif(
    not rk.available_backends()[name].usable, reason=rk.available_backends()[name].reason))
    for name in MOMENTS_OP]
# The device each kernel set's tests run on: the cpu kernels take CPU tensors only.
DEVICE = {'cpu': torch.device('cpu'), 'triton': helpers.KERNEL_DEVICE,
          'cuda': helpers.KERNEL_DEVICE}
ARCH = dict(layers=[3, 2, 1, 2], embed_dims=[8, 16, 24, 32], mlp_ratios=[4, 4, 4, 4],
            layer_scale_init_value=1e-5)


@pytest.mark.parametrize('kernels', KERNEL_SETS)
def test_one_moments_pass_per_stage_forward_and_training(kernels):
    """Inside a stage every block after the first takes its statistics from the previous
    block's MLP kernel; only the stage's first block (whose input is the patch embedding or the
    downsampling conv's output) runs the moments kernel. 4 stages: 4 passes, not 8."""
    dev = DEVICE[kernels]
    model = randomize_(rk.RIFormer(ARCH)).float().to(dev)
    x = torch.randn(2, 3, 32, 32).to(dev)
    with torch.no_grad(), rk.use_backend('reference'):
        truth = copy.deepcopy(model).double()(x.double())[-1]
        # The fp32 reference's own error on this model (~3e-7 here): chaining must not make the
        # kernels less precise than it; 2x plus one fp32 ulp of slack, as the other fp32 rules.
        ref_err = rel_err(model(x)[-1], truth)
    for train in (False, True):
        model.train(train)
        counter = OpLog()
        with rk.use_backend(kernels), counter, torch.set_grad_enabled(train):
            out = model(x)[-1]       # the backbone returns a tuple of features
            if train:
                out.sum().backward()
        assert counter.counts.get(MOMENTS_OP[kernels]) == 4, counter.counts
        assert rel_err(out, truth) <= 2 * ref_err + 1.2e-7


@pytest.mark.parametrize('kernels', KERNEL_SETS)
def test_training_runs_the_pipeline_function(kernels):
    block = make_block(16, dtype=torch.float32, device=DEVICE[kernels]).train()
    x = random_input((2, 16, 4, 4), torch.float32, device=DEVICE[kernels]).requires_grad_(True)
    with rk.use_backend(kernels):
        out = block(x)
    assert type(out.grad_fn).__name__ == 'FusedBlockFunctionBackward'
    assert isinstance(pipeline.kernel_set(kernels), pipeline.KernelSet)


@pytest.mark.parametrize('kernels', KERNEL_SETS)
def test_stale_statistics_are_never_used(kernels):
    """An in-place change or a view of a block's output makes the next block compute its own
    moments, and its result stays that of the reference on the changed values."""
    dev = DEVICE[kernels]
    b1, b2 = (make_block(16, dtype=torch.float32, device=dev).eval() for _ in range(2))
    b1.chain_statistics = True            # b1 feeds b2, as in a model's stage
    x = random_input((2, 16, 5, 5), dtype=torch.float32, device=dev)
    with torch.no_grad(), rk.use_backend(kernels):
        y = b1(x)
        assert pipeline.chained_moments(y, kernels) is not None
        y.mul_(3.0).add_(1.0)
        assert pipeline.chained_moments(y, kernels) is None
        counter = OpLog()
        with counter:
            out = b2(y)
            b2(b1(x)[:, :, :, :])
        assert counter.counts.get(MOMENTS_OP[kernels]) == 3, counter.counts
    with torch.no_grad(), rk.use_backend('reference'):
        truth = copy.deepcopy(b2).double()(y.double())
    assert rel_err(out, truth) <= 1e-5     # the fp32 block contract (tests/test_triton_forward.py)


@pytest.mark.skipif(not all(rk.available_backends()[k].usable for k in ("cpu", "triton")),
                    reason="needs both the cpu and the triton kernel sets")
@pytest.mark.skipif(DEVICE['triton'].type != 'cpu',
                    reason="the cpu kernels take CPU tensors and the triton kernels here take "
                    f"{DEVICE['triton']} tensors: one kernel set's output never reaches the "
                    "other without a copy, which carries no statistics")
def test_one_kernel_sets_statistics_are_not_read_by_another():
    """The partials' form belongs to the kernel set that wrote them (cpu: mean and variance;
    triton: per-span partials), so a triton block after a cpu block runs its own moments."""
    b1, b2 = (make_block(16, dtype=torch.float32).eval() for _ in range(2))
    b1.chain_statistics = True
    x = random_input((2, 16, 5, 5), dtype=torch.float32)
    with torch.no_grad():
        with rk.use_backend('cpu'):
            y = b1(x)
        assert pipeline.chained_moments(y, 'cpu') is not None
        counter = OpLog()
        with rk.use_backend('triton'), counter:
            out = b2(y)
    assert counter.counts.get(MOMENTS_OP['triton']) == 1, counter.counts
    with torch.no_grad(), rk.use_backend('reference'):
        truth = copy.deepcopy(b2).double()(y.double())
    assert rel_err(out, truth) <= 1e-5     # the fp32 block contract (tests/test_triton_forward.py)


def test_kernel_tests_run_on_cuda_when_cuda_is_present():
    """The kernel-test device cannot silently regress to CPU tensors on a GPU machine: with CUDA
    visible (and no RIFORMER_TEST_DEVICE override) it is CUDA, the Triton kernels are compiled
    unless TRITON_INTERPRET was set by hand, and the gpu-marked tests run; without CUDA it is
    the CPU with the interpreter on. The helpers build on the device they are given."""
    override = os.environ.get('RIFORMER_TEST_DEVICE')
    if override:
        assert helpers.KERNEL_DEVICE == torch.device(override)
    elif torch.cuda.is_available():
        assert helpers.KERNEL_DEVICE.type == 'cuda'
        assert helpers.COMPILED_GPU_KERNELS == (not helpers.INTERPRETER)
    else:
        assert helpers.KERNEL_DEVICE.type == 'cpu'
        assert helpers.INTERPRETER and not helpers.COMPILED_GPU_KERNELS
    assert DEVICE['triton'] == helpers.KERNEL_DEVICE
    dev = helpers.KERNEL_DEVICE
    x = helpers.on_kernel_device(helpers.random_input)((1, 4, 2, 2))
    block = helpers.on_kernel_device(helpers.make_block)(4)
    assert x.device.type == block.mlp.fc1.weight.device.type == dev.type
    # values do not depend on the device: drawn on the CPU, then moved
    torch.manual_seed(0)
    cpu_x = helpers.random_input((1, 4, 2, 2))
    torch.manual_seed(0)
    assert torch.equal(helpers.random_input((1, 4, 2, 2), device=dev).cpu(), cpu_x)


def test_a_stage_chains_every_block_but_its_last():
    model = rk.RIFormer(ARCH)
    for stage in model.network[::2]:                      # stages; odd entries downsample
        flags = [block.chain_statistics for block in stage]
        assert flags == [True] * (len(flags) - 1) + [False]
    assert rk.RIFormerBlock(8).chain_statistics is False


@pytest.mark.skipif(not rk.available_backends()['cpu'].usable,
                    reason=rk.available_backends()['cpu'].reason)
def test_an_isolated_cpu_block_asks_its_kernel_for_no_output_moments():
    """The cpu kernels' output moments cost an extra pass per tile: a block whose output no
    fused block reads (chain_statistics False) does not ask for them, and its result is the
    same bits either way."""
    block = make_block(16, dtype=torch.float32).eval()
    x = random_input((2, 16, 5, 5), dtype=torch.float32)
    with torch.no_grad(), rk.use_backend('cpu'):
        alone = block(x)
        block.chain_statistics = True
        chained = block(x)
    assert pipeline.chained_moments(alone, 'cpu') is None
    assert pipeline.chained_moments(chained, 'cpu') is not None
    assert torch.equal(alone, chained)
