"""benchmarks/gpu_check.sh --dry-run: the prepared GPU check's CPU path, so it cannot fail on a
typo when a lent GPU's minutes count."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

import riformer_kernels as rk

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(not rk.available_backends()['cpu'].usable or
                    not rk.available_backends()['triton'].usable,
                    reason="the dry run exercises the cpu and (interpreted) triton backends")
def test_gpu_check_dry_run_runs_every_step(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable)
    res = subprocess.run(['bash', str(ROOT / 'benchmarks' / 'gpu_check.sh'), '--dry-run'],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    summary = (tmp_path / 'summary.txt').read_text()
    print(summary, res.stdout[-2000:], res.stderr[-2000:])
    assert res.returncode == 0
    steps = {line.split()[0]: line for line in summary.splitlines() if ' rc=' in line}
    assert set(steps) == {'env', 'build', 'selftest', 'gpu-tests', 'launched', 'bench-quick'}
    failed = {name: line for name, line in steps.items() if ' rc=0 ' not in line}
    assert not failed, failed
    assert (tmp_path / 'gpu-tests.xml').stat().st_size > 0
    assert (tmp_path / 'launched.json').read_text().strip() == '[]'   # nothing compiles here
    assert list((tmp_path / 'bench-quick').glob('*.md'))
