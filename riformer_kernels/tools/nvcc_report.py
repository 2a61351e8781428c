"""Compile the CUDA sources with `nvcc -Xptxas -v` and report per-kernel resources.

No GPU is needed: ptxas reports registers, spills, stack frame and shared memory per
kernel and architecture at compile time. Used by tests/test_extension.py (which asserts
zero spills and zero stack) and by a later `python -m riformer_kernels.tools.gpu_build_report`.

    compile_cuda_report(["csrc/cuda/moments.cu"], archs=("80", "90")) -> list[dict]
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sysconfig
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[2]   # the repository (csrc/ beside the package)

_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\d+a?)'")
_PROPS = re.compile(r"Function properties for (\S+)")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")


def find_nvcc() -> str | None:
    """nvcc from $CUDA_HOME/bin, else from PATH."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and Path(home, "bin", "nvcc").exists():
        return str(Path(home, "bin", "nvcc"))
    return shutil.which("nvcc")


def cuda_root(nvcc: str) -> str | None:
    """Toolkit root as nvcc itself reports it (`#$ TOP=<root>/bin/..` in -dryrun)."""
    with tempfile.TemporaryDirectory() as tmp:
        probe = Path(tmp, "probe.cu")
        probe.write_text("")
        res = subprocess.run([nvcc, "-dryrun", str(probe)], capture_output=True, text=True,
                             timeout=60)
    m = re.search(r"^#\$ TOP=(.+)$", res.stdout + res.stderr, re.MULTILINE)
    return str(Path(m.group(1).strip()).resolve()) if m else None


def include_flags(nvcc: str) -> list[str]:
    """torch, CUDA toolkit and Python include dirs, as the extension build uses."""
    from torch.utils import cpp_extension

    dirs = list(cpp_extension.include_paths())
    root = cuda_root(nvcc)
    if root:
        dirs.append(str(Path(root, "include")))
    dirs.append(sysconfig.get_paths()["include"])
    return [f"-I{d}" for d in dirs]


def parse_ptxas(text: str) -> list[dict]:
    """Parse `ptxas -v` output into one dict per (entry kernel, arch).

    Keys: kernel (mangled), name (demangled when c++filt is available), arch,
    registers, spill_stores, spill_loads, stack, smem, warnings (the ptxas warning lines of
    the whole compile: spills and local memory, from --warn-on-spills and
    --warn-on-local-memory-usage). Non-entry functions that were not inlined get their own
    rows with entry=False (their stack/spills count too).
    """
    warnings = [ln.strip() for ln in text.splitlines() if "ptxas warning" in ln]
    rows: dict[tuple[str, str], dict] = {}
    current: tuple[str, str] | None = None  # (kernel, arch) being compiled
    props_for: str | None = None
    arch = None
    for line in text.splitlines():
        m = _ENTRY.search(line)
        if m:
            current = (m.group(1), m.group(2))
            arch = m.group(2)
            rows.setdefault(current, dict(kernel=current[0], arch=arch, entry=True,
                                          registers=None, spill_stores=None,
                                          spill_loads=None, stack=None, smem=0))
            continue
        m = _PROPS.search(line)
        if m:
            props_for = m.group(1)
            continue
        m = _FRAME.search(line)
        if m and props_for is not None:
            key = (props_for, arch or "?")
            row = rows.setdefault(key, dict(kernel=props_for, arch=arch, entry=False,
                                            registers=None, spill_stores=None,
                                            spill_loads=None, stack=None, smem=0))
            row["stack"], row["spill_stores"], row["spill_loads"] = map(int, m.groups())
            props_for = None
            continue
        m = _USED.search(line)
        if m and current is not None:
            rows[current]["registers"] = int(m.group(1))
            s = _SMEM.search(line)
            rows[current]["smem"] = int(s.group(1)) if s else 0
    out = list(rows.values())
    for r in out:
        r["warnings"] = warnings
    _demangle(out)
    return out


def _demangle(rows: list[dict]) -> None:
    cxxfilt = shutil.which("c++filt")
    names = [r["kernel"] for r in rows]
    demangled = names
    if cxxfilt and names:
        try:
            res = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True,
                                 text=True, timeout=30)
            lines = res.stdout.splitlines()
            if len(lines) == len(names):
                demangled = lines
        except (OSError, subprocess.SubprocessError):
            pass
    for r, d in zip(rows, demangled):
        r["name"] = d


def _compile_one(nvcc: str, source: Path, arch: str, flags: list[str]) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        # --warn-on-spills / --warn-on-local-memory-usage: ptxas names each kernel that spills
        # or uses local memory (parse_ptxas keeps those lines), on top of the -v counts.
        cmd = [nvcc, "-cubin", "-o", str(Path(tmp, "out.cubin")), str(source),
               f"-gencode=arch=compute_{arch},code=sm_{arch}",
               "-Xptxas", "-v,--warn-on-spills,--warn-on-local-memory-usage"] + flags
        res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"nvcc failed for {source} (sm_{arch}):\n{' '.join(cmd)}\n"
                           f"{res.stdout}\n{res.stderr}")
    return res.stdout + res.stderr


def compile_cuda_report(sources=None, archs=("80", "90"), extra_flags=(),
                        jobs: int | None = None) -> list[dict]:
    """Compile each source for each arch (device code only, -cubin) and return one row
    per kernel and arch: dict(kernel, name, arch, entry, registers, spill_stores,
    spill_loads, stack, smem). Raises RuntimeError if nvcc is missing or fails.

    Flags mirror the extension build (torch's COMMON_NVCC_FLAGS, -O3, C++20,
    RIFORMER_WITH_CUDA) so the numbers are the ones the built library has.
    """
    nvcc = find_nvcc()
    if nvcc is None:
        raise RuntimeError("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
    from torch.utils import cpp_extension

    if sources is None:
        sources = sorted((_ROOT / "csrc" / "cuda").glob("*.cu"))
    sources = [Path(s) if Path(s).is_absolute() else _ROOT / s for s in sources]
    flags = (["-O3", "-std=c++20", "-DRIFORMER_WITH_CUDA=1", "-DTORCH_EXTENSION_NAME=_C"]
             + list(cpp_extension.COMMON_NVCC_FLAGS) + include_flags(nvcc) + list(extra_flags))
    tasks = [(s, a) for s in sources for a in archs]
    jobs = jobs or max(1, min(len(tasks), os.cpu_count() or 1))
    with ThreadPoolExecutor(jobs) as pool:
        logs = list(pool.map(lambda t: _compile_one(nvcc, t[0], t[1], flags), tasks))
    rows = []
    for (src, _), log in zip(tasks, logs):
        for r in parse_ptxas(log):
            r["source"] = str(src.relative_to(_ROOT)) if src.is_relative_to(_ROOT) else str(src)
            rows.append(r)
    return rows


def format_report(rows: list[dict]) -> str:
    lines = [f"{'arch':6} {'regs':>4} {'spill st/ld':>11} {'stack':>5} {'smem':>5}  kernel"]
    for r in sorted(rows, key=lambda r: (r["arch"] or "", r.get("name", r["kernel"]))):
        lines.append(f"{r['arch'] or '?':6} {r['registers'] if r['registers'] is not None else '-':>4} "
                     f"{r['spill_stores']}/{r['spill_loads']:<5} {r['stack']:>5} {r['smem']:>5}  "
                     f"{r.get('name', r['kernel'])}")
    return "\n".join(lines)
