"""python/train_distill.py --quick: the whole pipeline (teacher, three students, deploy form,
backend timing, table, plot) runs end to end on the digits data in seconds."""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip('sklearn', reason='train_distill needs scikit-learn (the `distill` extra)')

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quick_run_writes_table_json_and_curves(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS='1',
               PYTHONPATH=os.pathsep.join([ROOT, os.environ.get('PYTHONPATH', '')]))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, 'python', 'train_distill.py'),
                           '--quick', '--no-progress', '--threads', '1', '--out', str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(tmp_path / 'results.json') as f:
        results = json.load(f)
    runs = [r['name'] for r in results['results']]
    assert runs == ['teacher', 'a_labels', 'b_soft_kd', 'c_kd_imitation']
    for r in results['results']:
        assert 0.0 <= r['test_acc'] <= 1.0 and r['seconds_per_epoch'] > 0
        assert len(r['history']) == r['epochs'] == 1
    assert set(results['backend_times']) == {'cpu', 'reference'}
    table = (tmp_path / 'results.md').read_text()
    assert table.count('| (a)') == table.count('| (b)') == table.count('| (c)') == 1
    if (tmp_path / 'curves.png').exists():
        assert (tmp_path / 'curves.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    else:
        pytest.importorskip('matplotlib')
        pytest.fail('matplotlib is installed but no curves.png was written')
    # every checkpoint and result was written in place, no temporary file left
    leftovers = [f for _, _, files in os.walk(tmp_path) for f in files if '.tmp' in f]
    assert not leftovers
