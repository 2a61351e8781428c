"""Writing results: the run header, CSV files, a markdown report and PNG plots."""
from __future__ import annotations

import csv
import datetime
import os
import platform
import shlex
import subprocess
import sys

import torch

BLOCK_COLUMNS = [
    'archs', 'stage', 'res', 'batch', 'channels', 'height', 'width', 'dtype', 'mode', 'impl',
    'status', 'median_ms', 'p20_ms', 'p80_ms', 'spread_pct', 'speedup_vs_eager',
    'speedup_vs_compile', 'compile_s', 'peak_mib', 'saved_mib', 'saved_x', 'moved_mib', 'moved_x',
    'x_mib', 'roofline_frac', 'bound', 'gemm_gflops', 'floor_ms', 'x_floor', 'max_rel_err',
    'tolerance', 'timing', 'detail']
MODEL_COLUMNS = [
    'arch', 'res', 'batch', 'dtype', 'mode', 'impl', 'status', 'median_ms', 'p20_ms', 'p80_ms',
    'spread_pct', 'images_per_s', 'speedup_vs_eager', 'speedup_vs_compile', 'compile_s',
    'peak_mib', 'param_mib', 'max_rel_err', 'tolerance', 'timing', 'detail']


def command_line() -> str:
    """The command as typed: the console script, `python -m benchmarks` from a checkout, or
    `python -m riformer_kernels.benchmarks` where the package is installed."""
    prog = sys.argv[0]
    if prog.endswith('__main__.py') or prog == '-m':
        prog = f'python -m {__package__}'
    else:
        prog = os.path.basename(prog)
    return ' '.join([prog] + [shlex.quote(a) for a in sys.argv[1:]])


def cpu_model() -> str:
    """The CPU's model name and the vector extensions that matter for these kernels."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    name = line.split(':', 1)[1].strip()
                elif line.startswith('flags'):
                    flags = set(line.split(':', 1)[1].split())
                if name and flags:
                    break
    except OSError:
        pass
    isa = [f for f in ('avx2', 'fma', 'avx512f', 'avx512_bf16', 'amx_tile') if f in flags]
    return f"{name} ({', '.join(isa)})" if isa else name


def memory_total() -> str:
    try:
        with open('/proc/meminfo') as f:
            for line in f:
                if line.startswith('MemTotal'):
                    return f"{int(line.split()[1]) / 1024 ** 2:.0f} GiB"
    except (OSError, ValueError):
        pass
    return 'unknown'


def usable_cores() -> str:
    try:
        return str(len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return 'unknown'


def git_revision() -> str:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        rev = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=root, text=True,
                             capture_output=True, timeout=10).stdout.strip()
        dirty = subprocess.run(['git', 'status', '--porcelain', '--untracked-files=no'], cwd=root,
                               text=True, capture_output=True, timeout=10).stdout.strip()
        return (rev + (' (with uncommitted changes)' if dirty else '')) if rev else 'unknown'
    except (OSError, subprocess.SubprocessError):
        return 'unknown'


def load_average() -> str:
    try:
        return ' '.join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return 'n/a'


def machine_info(device: torch.device) -> dict:
    info = {
        'date': datetime.datetime.now().isoformat(timespec='seconds'),
        'command': command_line(),
        'cpu': cpu_model(),
        'cores': f"{os.cpu_count()} logical, {usable_cores()} usable by this process",
        'memory': memory_total(),
        'load average at start (1/5/15 min)': load_average(),
        'python': platform.python_version(),
        'torch': torch.__version__,
        'triton': _version('triton'),
        'riformer_kernels': git_revision(),
        'device': device.type,
    }
    if device.type == 'cuda':
        info['gpu'] = torch.cuda.get_device_name(device)
        info['cuda'] = torch.version.cuda
    else:
        info['cpu kernels'] = cpu_kernels_path()
    return info


def cpu_kernels_path() -> str:
    """The ISA path the `cpu` backend's kernels take in this process (riformer_kernels.cpu_isa_info)."""
    import riformer_kernels as rk
    try:
        i = rk.cpu_isa_info()
    except (RuntimeError, ValueError) as err:
        return f"unavailable ({err})"
    return (f"ISA path {i.active} (CPU supports {i.supported}, cap {i.cap}, built up to "
            f"{i.built}), fp32 GEMMs {i.gemm}")


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except Exception:
        return 'not installed'


def header_lines(info: dict) -> list[str]:
    return [f"- **{key}**: {value}" for key, value in info.items()]


# ---------------------------------------------------------------------------------------------

def write_csv(path: str, rows: list[dict], columns: list[str]):
    with open(path, 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction='ignore')
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _csv_value(row.get(k)) for k in columns})


def _csv_value(value):
    if value is None:
        return ''
    if isinstance(value, float):
        return f"{value:.6g}"
    return value


def _fmt(value, spec='.2f', suffix=''):
    if value is None or value == '':
        return '–'
    return f"{value:{spec}}{suffix}"


def block_table(rows: list[dict], mode: str, gpu: bool) -> list[str]:
    rows = [r for r in rows if r['mode'] == mode]
    if not rows:
        return []
    cols = ['stage', 'archs', 'shape (N,C,H,W)', 'impl', 'status', 'median ms', 'p20–p80 ms',
            'vs eager', 'vs compile', 'compile s', 'peak MiB']
    if mode == 'train':
        cols.append('saved (x)')
    cols += ['moved (x)', 'rel err']
    if gpu:
        cols.append('roofline')
    else:
        cols += ['GEMM GFLOP/s', 'floor ms', 'x floor']
    lines = ['| ' + ' | '.join(cols) + ' |', '|' + '---|' * len(cols)]
    for r in rows:
        ok = r.get('status') == 'ok'
        cells = [f"{r['stage']} @{r['res']}", r['archs'],
                 f"{r['batch']},{r['channels']},{r['height']},{r['width']}", r['impl'],
                 r['status'] if r['status'] != 'ok' else 'ok',
                 _fmt(r.get('median_ms')),
                 f"{r['p20_ms']:.2f}–{r['p80_ms']:.2f}" if ok else '–',
                 _fmt(r.get('speedup_vs_eager'), '.2f', '×'),
                 _fmt(r.get('speedup_vs_compile'), '.2f', '×'),
                 _fmt(r.get('compile_s'), '.1f'),
                 _fmt(r.get('peak_mib'), '.1f')]
        if mode == 'train':
            cells.append(_fmt(r.get('saved_x'), '.1f'))
        cells += [_fmt(r.get('moved_x'), '.1f'), _fmt(r.get('max_rel_err'), '.1e')]
        if gpu:
            cells.append(_fmt(r.get('roofline_frac'), '.0%'))
        else:
            cells += [_fmt(r.get('gemm_gflops'), '.0f'), _fmt(r.get('floor_ms')),
                      _fmt(r.get('x_floor'), '.2f', '×')]
        lines.append('| ' + ' | '.join(str(c) for c in cells) + ' |')
    return lines


def model_table(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    cols = ['arch', 'res', 'batch', 'mode', 'impl', 'status', 'median ms', 'p20–p80 ms',
            'images/s', 'vs eager', 'vs compile', 'compile s', 'peak MiB', 'params MiB',
            'rel err']
    lines = ['| ' + ' | '.join(cols) + ' |', '|' + '---|' * len(cols)]
    for r in rows:
        ok = r.get('status') == 'ok'
        cells = [r['arch'], r['res'], r['batch'], r['mode'], r['impl'], r['status'],
                 _fmt(r.get('median_ms'), '.1f'),
                 f"{r['p20_ms']:.1f}–{r['p80_ms']:.1f}" if ok else '–',
                 _fmt(r.get('images_per_s'), '.1f'),
                 _fmt(r.get('speedup_vs_eager'), '.2f', '×'),
                 _fmt(r.get('speedup_vs_compile'), '.2f', '×'),
                 _fmt(r.get('compile_s'), '.1f'), _fmt(r.get('peak_mib'), '.1f'),
                 _fmt(r.get('param_mib'), '.1f'), _fmt(r.get('max_rel_err'), '.1e')]
        lines.append('| ' + ' | '.join(str(c) for c in cells) + ' |')
    return lines


def problems(rows: list[dict]) -> list[str]:
    """Rows that were not timed or carry a note, one line per distinct (impl, status, note)."""
    groups = {}
    for r in rows:
        if r.get('status') in ('wrong', 'error', 'skipped') or r.get('detail'):
            where = (f"stage {r['stage']}@{r['res']}" if 'stage' in r
                     else f"{r['arch']} b{r['batch']}")
            key = (r['impl'], r['status'], r.get('detail', ''))
            groups.setdefault(key, []).append(f"{where} {r['mode']}")
    return [f"- {impl} **{status}** ({', '.join(where)}): {detail}"
            for (impl, status, detail), where in groups.items()]


def write_markdown(path: str, title: str, info: dict, notes: list[str], block_rows, model_rows,
                   gpu: bool, plots: list[str]):
    lines = [f"# {title}", ''] + header_lines(info) + ['']
    if notes:
        lines += ['Method and notes:', ''] + [f"- {n}" for n in notes] + ['']
    for mode, heading in (('forward', 'Block forward (inference: eval, no_grad)'),
                          ('train', 'Block forward + backward (training step: out.backward(g))')):
        table = block_table(block_rows, mode, gpu)
        if table:
            lines += [f"## {heading}", ''] + table + ['']
    if model_rows:
        lines += ['## Models', ''] + model_table(model_rows) + ['']
    issues = problems(block_rows + model_rows)
    if issues:
        lines += ['## Rows not timed or with notes', ''] + issues + ['']
    for plot in plots:
        lines += [f"![{os.path.basename(plot)}]({os.path.basename(plot)})", '']
    with open(path, 'w') as f:
        f.write('\n'.join(lines))


# ---------------------------------------------------------------------------------------------
# Plots

def _pyplot():
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    return plt


_IMPL_ORDER = ('eager', 'deploy', 'compile', 'fused-torch', 'fused-cpu', 'fused-triton',
               'fused-cuda')


def _color(impl: str):
    """The same colour for an implementation in every panel and plot."""
    index = _IMPL_ORDER.index(impl) if impl in _IMPL_ORDER else len(_IMPL_ORDER)
    return f"C{index % 10}"


def plot_speedup(path: str, rows: list[dict], title: str) -> bool:
    """Speedup vs eager per stage shape, one panel per mode, one bar per implementation."""
    rows = [r for r in rows if r.get('status') == 'ok']
    if not rows:
        return False
    plt = _pyplot()
    modes = [m for m in ('forward', 'train') if any(r['mode'] == m for r in rows)]
    fig, axes = plt.subplots(1, len(modes), figsize=(6.5 * len(modes), 4.2), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        mrows = [r for r in rows if r['mode'] == mode]
        shapes = list(dict.fromkeys((r['res'], r['stage'], r['channels'], r['height'])
                                    for r in mrows))
        impls = list(dict.fromkeys(r['impl'] for r in mrows))
        width = 0.8 / max(len(impls), 1)
        top = 1.0
        for i, impl in enumerate(impls):
            xs, ys, lo, hi = [], [], [], []
            for j, shape in enumerate(shapes):
                for r in mrows:
                    if (r['res'], r['stage'], r['channels'], r['height']) == shape and \
                            r['impl'] == impl and r.get('speedup_vs_eager'):
                        # Whisker: the eager median over this row's p80 and p20, its noise.
                        eager_ms = r['speedup_vs_eager'] * r['median_ms']
                        xs.append(j + (i - (len(impls) - 1) / 2) * width)
                        ys.append(r['speedup_vs_eager'])
                        lo.append(ys[-1] - eager_ms / r['p80_ms'])
                        hi.append(eager_ms / r['p20_ms'] - ys[-1])
            bars = ax.bar(xs, ys, width, label=impl, color=_color(impl), yerr=[lo, hi],
                          error_kw=dict(elinewidth=0.8, capsize=2, ecolor='0.3'))
            ax.bar_label(bars, fmt='%.2f', fontsize=7, padding=1, label_type='center')
            top = max([top] + [y + h for y, h in zip(ys, hi)])
        ax.set_ylim(0, top * 1.25)
        ax.axhline(1.0, color='gray', lw=0.8, ls='--')
        ax.set_xticks(range(len(shapes)))
        ax.set_xticklabels([f"stage {s}\nC{c} {h}x{h}" + (f"\n@{res}px" if len(
            {x[0] for x in shapes}) > 1 else '') for res, s, c, h in shapes], fontsize=8)
        ax.set_ylabel('speedup vs eager reference (×); whiskers p20–p80')
        ax.set_title(f"{mode}: {'eval, no_grad' if mode == 'forward' else 'out.backward(g)'}")
        ax.legend(fontsize=8, loc='upper left', ncol=min(len(impls), 4))
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_memory(path: str, rows: list[dict], title: str) -> bool:
    """Peak memory per batch size: one panel per model arch, one line per (impl, mode)."""
    rows = [r for r in rows if r.get('status') == 'ok' and r.get('peak_mib') is not None]
    if not rows:
        return False
    plt = _pyplot()
    archs = list(dict.fromkeys(r['arch'] for r in rows))
    fig, axes = plt.subplots(1, len(archs), figsize=(5.5 * len(archs), 4), squeeze=False)
    for ax, arch in zip(axes[0], archs):
        arows = [r for r in rows if r['arch'] == arch]
        for impl in dict.fromkeys(r['impl'] for r in arows):
            for mode, style in (('train', '-o'), ('forward', '--s')):
                pts = sorted((r['batch'], r['peak_mib']) for r in arows
                             if r['impl'] == impl and r['mode'] == mode)
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], style,
                            color=_color(impl), label=f"{impl} {mode}")
        ax.set_xticks(sorted({r['batch'] for r in arows}))
        ax.set_xlabel('batch size')
        ax.set_ylabel('peak memory of one step (MiB)')
        ax.set_title(f"riformer_{arch} @{arows[0]['res']}px")
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
