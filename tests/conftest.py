"""Shared test helpers: seeded random blocks and inputs, error measures, NaN-poisoned outputs."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
    yield
