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
