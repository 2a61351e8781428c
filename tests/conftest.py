"""Test session setup: the kernel-test device (and the Triton interpreter on CPU-only machines),
the `gpu` marker, a fixed seed."""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
# The Triton kernels are defined at import time and read TRITON_INTERPRET then, so the device
# rule (helpers.KERNEL_DEVICE: RIFORMER_TEST_DEVICE, else CUDA when torch sees it, else CPU with
# TRITON_INTERPRET=1) must run before anything imports riformer_kernels: helpers first.
import helpers  # noqa: E402
import torch  # noqa: E402

# The repository's top-level benchmarks/ is installed as riformer_kernels.benchmarks, never as a
# top-level `benchmarks`; the tests import it as `benchmarks` from the checkout. Appended, so an
# installed riformer_kernels is not shadowed by the checkout (`python -m pytest` from the root
# puts the checkout first anyway).
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.append(ROOT)

GPU_SKIP_REASON = (
    "GPU-only: needs the Triton kernels compiled for a CUDA device (kernel-test device "
    f"{helpers.KERNEL_DEVICE}, TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')!r}); "
    "too slow for the interpreter, or it checks what the interpreter does not model")


def pytest_configure(config):
    config.addinivalue_line(
        'markers', 'gpu: runs only with the Triton kernels compiled for a CUDA device '
        '(helpers.COMPILED_GPU_KERNELS); skipped, with the reason, elsewhere')


def pytest_collection_modifyitems(config, items):
    if helpers.COMPILED_GPU_KERNELS:
        return
    skip = pytest.mark.skip(reason=GPU_SKIP_REASON)
    for item in items:
        if item.get_closest_marker('gpu') is not None:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
    yield
