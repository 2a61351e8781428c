"""The benchmark tool runs end to end and writes well-formed results (not how fast anything is)."""
import csv
import importlib.util
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # conftest puts it on sys.path

PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'
NO_MATPLOTLIB = 'matplotlib is not installed (optional: pip install matplotlib) so no plots'


def _has_matplotlib():
    return importlib.util.find_spec('matplotlib') is not None


@pytest.fixture(scope='module')
def quick_run(tmp_path_factory):
    """`python -m benchmarks --quick` into a fresh folder, in a subprocess like a user runs it."""
    out = tmp_path_factory.mktemp('bench')
    env = dict(os.environ)
    env.pop('TRITON_INTERPRET', None)  # as a user's shell would have it
    proc = subprocess.run([sys.executable, '-m', 'benchmarks', '--quick', '--out', str(out),
                           '--no-progress'], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc


def _read_csv(path):
    with open(path, newline='') as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def _assert_number(text, what):
    value = float(text)  # raises on anything that does not parse
    assert math.isfinite(value), f"{what} = {text!r}"
    return value


def test_quick_run_writes_every_output(quick_run):
    out, proc = quick_run
    for name in ('bench_blocks.csv', 'bench_models.csv', 'bench.md'):
        path = out / name
        assert path.is_file() and path.stat().st_size > 0, f"{name} missing or empty"
        assert str(path) in proc.stdout, f"{name} not announced on stdout"
    if not _has_matplotlib():  # said once, plainly, and nothing half-written
        assert 'plots skipped: matplotlib is not installed' in proc.stderr
        assert not list(out.glob('*.png'))


def test_quick_run_writes_plots(quick_run):
    pytest.importorskip('matplotlib', reason=NO_MATPLOTLIB)
    out, proc = quick_run
    for name in ('bench_speedup.png', 'bench_memory.png'):
        path = out / name
        assert path.is_file() and path.stat().st_size > 0, f"{name} missing or empty"
        assert str(path) in proc.stdout, f"{name} not announced on stdout"
    assert '![bench_speedup.png](bench_speedup.png)' in (out / 'bench.md').read_text()
    assert 'plots skipped' not in proc.stderr


def test_plots_are_skipped_with_one_line_without_matplotlib(monkeypatch, capsys, tmp_path):
    """Whether or not matplotlib is installed here: hide it and draw the plots."""
    from benchmarks import cli, report
    monkeypatch.setitem(sys.modules, 'matplotlib', None)  # `import matplotlib` raises
    monkeypatch.setitem(sys.modules, 'matplotlib.pyplot', None)
    rows = [{'status': 'ok', 'mode': 'forward', 'impl': 'eager', 'channels': 64, 'size': 7}]
    notes = []
    plots = cli.draw_plots(report, str(tmp_path), 'bench', rows, rows, 'title, x', notes)
    assert plots == [] and not list(tmp_path.iterdir())
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and 'plots skipped: matplotlib is not installed' in err
    assert any(n.startswith('plots not drawn: matplotlib is not installed') for n in notes)


def test_block_csv_has_columns_and_parsable_numbers(quick_run):
    from benchmarks.report import BLOCK_COLUMNS
    out, _ = quick_run
    columns, rows = _read_csv(out / 'bench_blocks.csv')
    assert columns == BLOCK_COLUMNS
    impls = {r['impl'] for r in rows}
    assert {'eager', 'deploy', 'compile', 'fused-torch'} <= impls
    assert {r['mode'] for r in rows} == {'forward', 'train'}
    for r in rows:
        assert r['status'] in ('ok', 'skipped', 'wrong', 'error'), r
        if r['status'] != 'ok':
            assert r['detail'], f"a row that was not timed must say why: {r}"
            continue
        p20 = _assert_number(r['p20_ms'], 'p20_ms')
        median = _assert_number(r['median_ms'], 'median_ms')
        p80 = _assert_number(r['p80_ms'], 'p80_ms')
        assert 0 < p20 <= median <= p80, r
        assert _assert_number(r['max_rel_err'], 'max_rel_err') <= 1e-4, r
        assert _assert_number(r['speedup_vs_eager'], 'speedup_vs_eager') > 0
        assert _assert_number(r['peak_mib'], 'peak_mib') > 0
        if r['mode'] == 'train':
            assert _assert_number(r['saved_x'], 'saved_x') > 0
        if r['impl'] == 'eager':
            assert float(r['speedup_vs_eager']) == 1.0
        if r['impl'] == 'compile':
            assert _assert_number(r['compile_s'], 'compile_s') > 0
    # Eager reference training: x, the norm and GELU inputs... are saved; far more than 1 |x|.
    eager_train = next(r for r in rows if r['impl'] == 'eager' and r['mode'] == 'train')
    assert float(eager_train['saved_x']) > 2


def test_deploy_form_is_not_run_in_training_mode(quick_run):
    out, _ = quick_run
    _, rows = _read_csv(out / 'bench_blocks.csv')
    deploy_train = [r for r in rows if r['impl'] == 'deploy' and r['mode'] == 'train']
    assert deploy_train and all(r['status'] == 'skipped' for r in deploy_train)


def test_model_csv_has_throughput_and_memory_per_batch(quick_run):
    from benchmarks.report import MODEL_COLUMNS
    out, _ = quick_run
    columns, rows = _read_csv(out / 'bench_models.csv')
    assert columns == MODEL_COLUMNS
    ok = [r for r in rows if r['status'] == 'ok']
    assert {r['batch'] for r in ok} == {'1', '2'}
    for r in ok:
        median = _assert_number(r['median_ms'], 'median_ms')
        ips = _assert_number(r['images_per_s'], 'images_per_s')
        assert ips == pytest.approx(int(r['batch']) / (median * 1e-3), rel=1e-3)
        assert _assert_number(r['peak_mib'], 'peak_mib') >= 0


def test_markdown_has_header_tables_and_plots(quick_run):
    out, _ = quick_run
    text = (out / 'bench.md').read_text()
    for field in ('**command**: python -m benchmarks --quick', '**cpu**', '**cores**',
                  '**torch**', '**triton**', '**dtype**: float32', '**threads**'):
        assert field in text, f"header lacks {field!r}"
    assert '## Block forward (inference' in text and '## Block forward + backward' in text
    assert '## Models' in text
    tables, current = [], []
    for line in text.splitlines() + ['']:
        if line.startswith('|'):
            current.append(line)
        elif current:
            tables.append(current)
            current = []
    assert len(tables) == 3, "expected forward, training and model tables"
    for table in tables:
        assert len(table) > 2 and set(table[1]) <= set('|-'), table[:2]
        widths = {line.count('|') for line in table}
        assert len(widths) == 1, f"ragged table: {table}"


def test_pngs_are_png_files(quick_run):
    pytest.importorskip('matplotlib', reason=NO_MATPLOTLIB)
    out, _ = quick_run
    for name in ('bench_speedup.png', 'bench_memory.png'):
        data = (out / name).read_bytes()
        assert data[:8] == PNG_SIGNATURE, f"{name} is not a PNG"
        assert data[12:16] == b'IHDR'
        width, height = int.from_bytes(data[16:20], 'big'), int.from_bytes(data[20:24], 'big')
        assert width > 100 and height > 100


def test_shapes_cover_every_stage_of_every_arch():
    from benchmarks.shapes import block_shapes
    shapes = block_shapes()
    # two embed-dim families x four stages x two resolutions
    assert len(shapes) == 16
    assert {(s.res, s.size) for s in shapes} == {
        (224, 56), (224, 28), (224, 14), (224, 7), (384, 96), (384, 48), (384, 24), (384, 12)}
    s12 = block_shapes(['s12'], resolutions=[224])
    assert [(s.channels, s.size) for s in s12] == [(64, 56), (128, 28), (320, 14), (512, 7)]
    assert s12[0].archs == ('s12', 's24', 's36')


def _outside_checkout(code, tmp_path):
    """Run `python -c code` from a folder outside the repository, so only what is installed
    counts (not this checkout through the current directory or PYTHONPATH)."""
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
    return subprocess.run([sys.executable, '-c', code], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)


PROBE = """
import importlib.util as u, json
from importlib import metadata
try:
    direct_url = json.loads(metadata.distribution('riformer_kernels').read_text('direct_url.json')
                            or '{}')
except (metadata.PackageNotFoundError, ValueError):
    direct_url = {}
spec = u.find_spec('benchmarks')
print(json.dumps({'installed': u.find_spec('riformer_kernels') is not None,
                  'top_level_benchmarks': spec.origin if spec else None,
                  'direct_url': direct_url}))
"""


def test_installed_as_riformer_kernels_benchmarks(tmp_path):
    """Installed (editable or not), the benchmarks are riformer_kernels.benchmarks, and the
    package puts no top-level `benchmarks` of its own into the environment."""
    import json
    from urllib.parse import unquote, urlparse
    probe = _outside_checkout(PROBE, tmp_path)
    assert probe.returncode == 0, probe.stderr
    found = json.loads(probe.stdout)
    if not found['installed']:
        pytest.skip('riformer_kernels is not installed (pip install -e . --no-build-isolation); '
                    'only this checkout is tested')
    url = found['direct_url']
    if url.get('dir_info', {}).get('editable'):
        source = os.path.realpath(unquote(urlparse(url.get('url', '')).path))
        if source != os.path.realpath(ROOT):
            pytest.skip(f'the installed riformer_kernels is an editable install of another '
                        f'checkout ({source}), not of this one')
    top_level = found['top_level_benchmarks'] or ''
    assert not top_level.startswith(os.path.join(ROOT, 'benchmarks')), \
        f"top-level `benchmarks` importable from outside the checkout: {top_level}"
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
    proc = subprocess.run([sys.executable, '-m', 'riformer_kernels.benchmarks', '--help'],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'riformer-bench' in proc.stdout and '--quick' in proc.stdout
