"""Backend selection: explicit choice, environment, auto order and its explanations."""
import pytest
import torch

import riformer_kernels as rk
from riformer_kernels import dispatch
from helpers import make_block, random_input


def test_available_backends_lists_every_backend_with_a_reason():
    info = rk.available_backends()
    assert set(info) == {'reference', 'torch', 'triton', 'cuda', 'cpu'}
    assert info['reference'].usable and info['torch'].usable
    for name, (usable, reason) in info.items():
        assert isinstance(reason, str) and reason
        if not usable:
            assert reason != 'usable', name


def test_use_backend_is_a_context_manager_and_a_global_setter(monkeypatch):
    monkeypatch.delenv('RIFORMER_BACKEND', raising=False)
    assert rk.requested_backend() == 'auto'
    with rk.use_backend('reference'):
        assert rk.requested_backend() == 'reference'
        with rk.use_backend('torch'):
            assert rk.requested_backend() == 'torch'
        assert rk.requested_backend() == 'reference'
    assert rk.requested_backend() == 'auto'
    rk.use_backend('torch')
    try:
        assert rk.requested_backend() == 'torch'
    finally:
        rk.use_backend(None)
    assert rk.requested_backend() == 'auto'


def test_environment_variable_selects_and_use_backend_overrides(monkeypatch):
    monkeypatch.setenv('RIFORMER_BACKEND', 'reference')
    block = make_block(8)
    x = random_input((1, 8, 2, 2))
    assert 'chosen: reference' in rk.explain_dispatch(block, x)
    with rk.use_backend('torch'):
        assert 'chosen: torch' in rk.explain_dispatch(block, x)
    monkeypatch.setenv('RIFORMER_BACKEND', 'nonsense')
    with pytest.raises(ValueError, match='nonsense'):
        rk.requested_backend()


def test_unknown_backend_name_raises():
    with pytest.raises(ValueError, match='unknown backend'):
        rk.use_backend('fastest')


def test_unavailable_backend_raises_with_its_reason(monkeypatch):
    monkeypatch.delenv('RIFORMER_BACKEND', raising=False)
    block = make_block(8)
    x = random_input((1, 8, 2, 2))
    # triton without the interpreter on a CPU tensor: unusable, and the error says why.
    monkeypatch.setattr(dispatch._REGISTRY['triton'], 'availability',
                        lambda: 'no CUDA device (test stand-in)')
    reason = rk.available_backends()['triton'].reason
    assert not rk.available_backends()['triton'].usable
    with rk.use_backend('triton'), pytest.raises(rk.BackendUnavailableError) as err:
        block(x)
    assert reason in str(err.value)


def test_auto_explains_each_skipped_backend(monkeypatch):
    monkeypatch.delenv('RIFORMER_BACKEND', raising=False)
    block = make_block(8)
    x = random_input((1, 8, 2, 2))
    choice = dispatch.choose_backend(block, x)
    text = rk.explain_dispatch(block, x)
    assert f"chosen: {choice.backend.name}" in text
    for name, reason in choice.skipped:
        assert f"skipped {name}: {reason}" in text
    order = dispatch.AUTO_ORDER['cpu']
    assert order.index(choice.backend.name) == len(choice.skipped)


def test_autocast_dtype_no_cpu_kernel_takes_falls_back_to_reference_with_reason(monkeypatch):
    """CPU autocast in float16: autocast needs the kernels' mixed-precision mode with float16
    GEMM operands, which the cpu kernels lack (bf16 only), so auto runs the reference and the
    reason names float16, not the input's fp32. (bf16 autocast runs the cpu kernels:
    tests/test_autocast.py.)"""
    monkeypatch.delenv('RIFORMER_BACKEND', raising=False)
    block = make_block(8, dtype=torch.float32)
    x = random_input((1, 8, 2, 2), dtype=torch.float32)
    with torch.autocast('cpu', dtype=torch.float16):
        text = rk.explain_dispatch(block, x)
    assert 'chosen: reference' in text and 'float16 GEMM operands' in text, text
