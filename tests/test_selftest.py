"""`python -m riformer_kernels.selftest`: passes on this machine, and fails when a backend is wrong."""
import dataclasses

import pytest
import torch

from riformer_kernels import pipeline, selftest
import riformer_kernels as rk

needs_cpu = pytest.mark.skipif(not rk.available_backends()['cpu'].usable,
                               reason=rk.available_backends()['cpu'].reason)


def test_selftest_passes_here(capsys):
    # With the emulated cuda backend where the session runs it (tests/helpers.py sets
    # RIFORMER_CUDA_EMULATE=1 on CPU-only machines).
    emulated = rk.available_backends()['cuda'].usable and not torch.cuda.is_available()
    assert selftest.main(['--quick', '--device', 'cpu'] + ['--emulated'] * emulated) == 0
    out = capsys.readouterr().out
    assert ' 0 failed' in out and 'FAIL' not in out
    if emulated:
        assert 'ok   cuda ' in out
        assert 'cuda ran forward only' not in out   # the emulated backward ran too


@pytest.mark.skipif(not rk.available_backends()['cuda'].usable or torch.cuda.is_available(),
                    reason="the cuda backend on CPU tensors is the emulated one "
                           "(RIFORMER_CUDA_EMULATE=1, which tests/helpers.py sets without a GPU)")
def test_selftest_runs_the_emulated_cuda_forward_and_backward(capsys):
    assert selftest.main(['--quick', '--device', 'cpu', '--emulated']) == 0
    out = capsys.readouterr().out
    # three fp32 cases, and an fp32 block under CPU autocast bf16 (the mixed-precision mode)
    assert out.count('ok   cuda') == 4 and ' 0 failed' in out and 'FAIL' not in out
    assert out.count('ok   cuda    autocast bfloat16') == 1
    assert 'cuda ran forward only' not in out   # the backward ran too


@needs_cpu
def test_selftest_reports_a_wrong_kernel(monkeypatch, capsys):
    """A cpu kernel set whose MLP output is off by 1e-3 of its scale fails the fp32 cases."""
    ks = pipeline.kernel_set('cpu')

    def off(x, cf, l2, w1, b1, w2, b2, save_u, emit_moments):
        out, m1, m2, u = ks.mlp_forward(x, cf, l2, w1, b1, w2, b2, save_u, emit_moments)
        return out * (1 + 1e-3), m1, m2, u

    monkeypatch.setitem(pipeline._KERNEL_SETS, 'cpu', dataclasses.replace(ks, mlp_forward=off))
    assert selftest.main(['--quick', '--device', 'cpu']) == 1
    assert 'FAIL cpu' in capsys.readouterr().out



@needs_cpu
def test_selftest_checks_the_mixed_precision_mode(monkeypatch, capsys):
    """A cpu kernel set wrong only in its mixed-precision mode (output off by 5% when the
    weights are bf16 and x fp32: what autocast runs) fails the autocast cases and no other."""
    ks = pipeline.kernel_set('cpu')
    assert selftest.autocast_dtypes('cpu', torch.device('cpu')) == (torch.bfloat16,)
    assert selftest.autocast_dtypes('torch', torch.device('cpu')) == ()

    def off(x, cf, l2, w1, b1, w2, b2, save_u, emit_moments):
        out, m1, m2, u = ks.mlp_forward(x, cf, l2, w1, b1, w2, b2, save_u, emit_moments)
        mixed = x.dtype == torch.float32 and w1.dtype == torch.bfloat16
        return (out * 1.05 if mixed else out), m1, m2, u

    monkeypatch.setitem(pipeline._KERNEL_SETS, 'cpu', dataclasses.replace(ks, mlp_forward=off))
    assert selftest.main(['--quick', '--device', 'cpu']) == 1
    out = capsys.readouterr().out
    failed = [line for line in out.splitlines() if line.startswith('  FAIL')]
    assert failed and all('FAIL cpu     autocast bfloat16' in line for line in failed), failed
