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


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
    yield
