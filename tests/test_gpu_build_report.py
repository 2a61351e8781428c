"""`python -m riformer_kernels.tools.gpu_build_report`: real-GPU compiles of the Triton kernels, no GPU."""
import subprocess
import sys

import pytest

from riformer_kernels.tools import gpu_build_report as report

pytest.importorskip('triton')


def test_forward_specs_are_discovered_and_well_formed():
    specs = report.collect_specs()
    mine = [s for m, s in specs if m == 'riformer_kernels.backends.triton.forward']
    names = {s[0].__name__ for s in mine}
    assert {'fused_mlp_kernel', 'moments_kernel'} <= names
    for fn, sig, const, desc, *opts in mine:
        assert set(sig) | set(const) == set(fn.arg_names), desc
        assert isinstance(desc, str) and desc
        assert not opts or 'num_warps' in opts[0]


def test_report_compiles_a_forward_subset_for_sm80_and_sm90_without_spills():
    """A representative subset (the full report compiles ~60 configs: minutes on 2 cores)."""
    only = ['fused_mlp C<=64 bf16', 'moments C-block 32 fp16']
    res = subprocess.run([sys.executable, '-m', 'riformer_kernels.tools.gpu_build_report',
                          '--skip-cuda', '--only', *only], capture_output=True, text=True,
                         timeout=600)
    print(res.stdout[-3000:], res.stderr[-3000:])
    assert res.returncode == 0, res.stdout + res.stderr
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith(('fused_mlp', 'moments'))]
    assert len(lines) == 4
    assert {ln.split()[0] for ln in lines} == {'fused_mlp_kernel', 'moments_kernel'}
    assert sum('sm_80' in ln for ln in lines) == 2 and sum('sm_90' in ln for ln in lines) == 2


def test_spills_and_compile_errors_make_the_exit_status_nonzero(monkeypatch, capsys):
    ok = dict(kernel='k', config='c', arch='sm_90', registers=40, spill_stores=0,
              spill_loads=0, stack=0, smem=0)
    monkeypatch.setattr(report, 'run_triton_report', lambda archs, only: [ok])
    assert report.main(['--skip-cuda']) == 0
    spill = dict(ok, spill_stores=8)
    monkeypatch.setattr(report, 'run_triton_report', lambda archs, only: [ok, spill])
    assert report.main(['--skip-cuda']) == 1
    broken = dict(kernel='k', config='c', arch='sm_80', error='CompilationError: boom')
    monkeypatch.setattr(report, 'run_triton_report', lambda archs, only: [broken])
    assert report.main(['--skip-cuda']) == 1
    assert 'COMPILE ERROR' in capsys.readouterr().out


def test_cuda_rows_join_the_table(monkeypatch, capsys):
    cuda_row = dict(kernel='moments_cuda', arch='sm_80', registers=32, spill_stores=0,
                    spill_loads=0, stack=0, smem=1024)
    monkeypatch.setattr(report, 'run_triton_report', lambda archs, only: [])
    monkeypatch.setattr(report, 'run_cuda_report', lambda archs: [dict(cuda_row, config='cuda')])
    assert report.main([]) == 0
    assert 'moments_cuda' in capsys.readouterr().out
