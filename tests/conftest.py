"""Test session setup: the Triton interpreter on CPU-only machines and a fixed seed."""
import os
import sys

# The Triton kernels are defined at import time and read TRITON_INTERPRET then, so without a GPU
# the interpreter must be switched on before anything imports riformer_kernels.
import torch

if not torch.cuda.is_available():
    os.environ.setdefault('TRITON_INTERPRET', '1')

import pytest  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
# The repository's top-level benchmarks/ is installed as riformer_kernels.benchmarks, never as a
# top-level `benchmarks`; the tests import it as `benchmarks` from the checkout. Appended, so an
# installed riformer_kernels is not shadowed by the checkout (`python -m pytest` from the root
# puts the checkout first anyway).
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.append(ROOT)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
    yield
