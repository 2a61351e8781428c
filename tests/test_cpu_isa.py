"""The cpu kernels' ISA levels (csrc/cpu/isa.h): the cap, what each compiled copy contains, and
the baseline-only build that non-x86 machines get.

test_cpu_backend.py runs all its accuracy tests at every level the CPU supports; this file checks
the machinery: that the cap is honoured (from the API and from RIFORMER_CPU_ISA), that each copy
of the tile code really is compiled for its level, and that a build without the per-level copies
compiles and computes the same results.
"""
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import riformer_kernels as rk
from riformer_kernels import _ext
from riformer_kernels.backends.cpu import ISA_LEVELS

ROOT = Path(__file__).resolve().parents[1]
# Only where the extension is not built (it is in every `make test` run).
pytestmark = pytest.mark.skipif(not rk.available_backends()['cpu'].usable,
                                reason=f"cpu backend unusable: {rk.available_backends()['cpu'].reason}")


def _run_cpu_block(C=24, shape=(2, 24, 5, 7)):
    block = rk.RIFormerBlock(C)
    x = torch.randn(shape, requires_grad=True)
    with rk.use_backend('cpu'):
        block(x).sum().backward()


def test_info_names_valid_levels_and_the_gemm_route():
    info = rk.cpu_isa_info()
    for field in ('supported', 'cap', 'active', 'built'):
        assert getattr(info, field) in ISA_LEVELS, (field, info)
    assert ISA_LEVELS.index(info.active) == min(ISA_LEVELS.index(info.supported),
                                                ISA_LEVELS.index(info.cap))
    assert ISA_LEVELS.index(info.supported) <= ISA_LEVELS.index(info.built)
    assert info.gemm in ('mkl-sgemm', 'onednn-brgemm')
    if info.active != 'avx512':
        assert info.gemm == 'mkl-sgemm'   # brgemm only at the avx512 level (blas.h)


@pytest.mark.skipif(platform.machine() not in ('x86_64', 'AMD64'), reason="x86 levels")
def test_supported_level_matches_the_cpu_flags():
    flags = set()
    for line in Path('/proc/cpuinfo').read_text().splitlines():
        if line.startswith('flags'):
            flags = set(line.split(':', 1)[1].split())
            break
    v3 = {'avx2', 'fma', 'bmi1', 'bmi2', 'f16c', 'movbe'} <= flags
    v4 = v3 and {'avx512f', 'avx512bw', 'avx512cd', 'avx512dq', 'avx512vl'} <= flags
    expected = 'avx512' if v4 else 'avx2' if v3 else 'baseline'
    assert rk.cpu_isa_info().supported == expected


@pytest.mark.parametrize('level', ISA_LEVELS)
def test_use_cpu_isa_caps_the_next_call_and_restores(level):
    before = rk.cpu_isa_info()
    with rk.use_cpu_isa(level):
        _run_cpu_block()
        info = rk.cpu_isa_info()
        assert info.cap == level
        expected = ISA_LEVELS[min(ISA_LEVELS.index(level), ISA_LEVELS.index(info.supported))]
        assert info.active == expected and info.last_run == expected
    assert rk.cpu_isa_info().cap == before.cap


def test_use_cpu_isa_rejects_unknown_levels():
    with pytest.raises(ValueError, match="unknown ISA level 'sse4'"):
        rk.use_cpu_isa('sse4')
    with pytest.raises(TypeError, match="level name"):
        rk.use_cpu_isa(2)
    with pytest.raises(ValueError, match="not an ISA level"):
        _ext._C.set_cpu_isa_cap('AVX2')


def _python(code, **env):
    full = dict(os.environ, **env)
    return subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                          env=full, timeout=300)


def test_environment_variable_sets_the_cap_for_the_process():
    code = ("import torch, riformer_kernels as rk\n"
            "b = rk.RIFormerBlock(8); x = torch.randn(1, 8, 3, 3)\n"
            "with rk.use_backend('cpu'): b(x)\n"
            "i = rk.cpu_isa_info(); print(i.cap, i.last_run)\n")
    res = _python(code, RIFORMER_CPU_ISA='baseline')
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ['baseline', 'baseline']


def test_invalid_environment_variable_fails_the_kernel_call_naming_it():
    code = ("import torch, riformer_kernels as rk\n"
            "b = rk.RIFormerBlock(8); x = torch.randn(1, 8, 3, 3)\n"
            "with rk.use_backend('cpu'): b(x)\n")
    res = _python(code, RIFORMER_CPU_ISA='avx3')
    assert res.returncode != 0
    assert 'RIFORMER_CPU_ISA=avx3 is not an ISA level' in res.stderr
    res = _python("import riformer_kernels as rk; rk.cpu_isa_info()", RIFORMER_CPU_ISA='avx3')
    assert 'ValueError' in res.stderr and 'RIFORMER_CPU_ISA=avx3' in res.stderr


def _functions_by_level(so_path):
    """The tile code's copies in the disassembly: ({level: instruction lines},
    {level: number of functions}, {level: instruction lines of its lambdas})."""
    text = subprocess.run(['objdump', '-d', '-C', '--no-show-raw-insn', str(so_path)],
                          capture_output=True, text=True, check=True).stdout
    level_of = {'at_avx512::': 'avx512', 'at_avx2::': 'avx2', 'at_baseline::': 'baseline'}
    code = {level: [] for level in level_of.values()}
    functions = {level: 0 for level in level_of.values()}
    lambdas = {level: [] for level in level_of.values()}
    current, in_lambda = None, False
    header = re.compile(r'^[0-9a-f]+ <(.*)>:$')
    for line in text.splitlines():
        m = header.match(line)
        if m:
            name = m.group(1)
            current = next((lvl for key, lvl in level_of.items() if key in name), None)
            in_lambda = current is not None and '{lambda(long, long)' in name
            if current:
                functions[current] += 1
            continue
        if current and '\t' in line:
            code[current].append(line)
            if in_lambda:
                lambdas[current].append(line)
    return code, functions, lambdas


@pytest.mark.skipif(platform.machine() not in ('x86_64', 'AMD64') or not shutil.which('objdump'),
                    reason="needs x86 and objdump")
def test_each_copy_of_the_tile_code_is_compiled_for_its_level():
    """The baseline copy has no VEX/EVEX vector code, the avx2 copy uses 256-bit registers and
    FMA, the avx512 copy 512-bit registers: the per-level `#pragma GCC target` reaches every
    function of the copy, the lambdas the drivers run on worker threads included."""
    if rk.cpu_isa_info().built != 'avx512':
        pytest.skip("this build has the baseline copy only")
    code, functions, lambdas = _functions_by_level(_ext._C.__file__)
    assert all(functions[lvl] > 20 for lvl in functions), functions
    joined = {lvl: '\n'.join(lines) for lvl, lines in code.items()}
    assert '%ymm' not in joined['baseline'] and '%zmm' not in joined['baseline']
    assert 'vfmadd' not in joined['baseline']
    assert '%ymm' in joined['avx2'] and 'vfmadd' in joined['avx2']
    assert '%zmm' not in joined['avx2']
    assert '%zmm' in joined['avx512']
    # The parallel_for bodies (lambdas "{lambda(long, long)#1}") are compiled per level too.
    assert lambdas['avx2'] and lambdas['baseline']
    assert any('%ymm' in line for line in lambdas['avx2'])
    assert not any('%ymm' in line for line in lambdas['baseline'])


def test_baseline_only_build_compiles_and_matches_the_reference(tmp_path):
    """RIFORMER_CPU_ISA_DISPATCH=0 compiles the baseline copy only (what a non-x86 build does).
    Built here into a temporary folder and loaded in a subprocess through RIFORMER_EXTENSION_PATH:
    it reports 'baseline' everywhere and its forward and gradients match the fp64 reference."""
    env = dict(os.environ, RIFORMER_CPU_ISA_DISPATCH='0', RIFORMER_SKIP_CUDA='1',
               MAX_JOBS=str(os.cpu_count() or 1))
    build = subprocess.run(
        [sys.executable, 'setup.py', '-q', 'build_ext', '--build-lib', str(tmp_path / 'lib'),
         '--build-temp', str(tmp_path / 'tmp')],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    assert 'baseline x86-64 only' in build.stdout
    (so,) = (tmp_path / 'lib').rglob('_C*.so')
    code = (
        "import copy, torch, riformer_kernels as rk\n"
        "from riformer_kernels.testing import randomize_, rel_err\n"
        "i = rk.cpu_isa_info(); assert (i.built, i.supported, i.active) == ('baseline',) * 3, i\n"
        "torch.manual_seed(0)\n"
        "for shape, cl in [((2, 24, 5, 7), False), ((3, 16, 4, 4), True)]:\n"
        "    b = rk.RIFormerBlock(shape[1]); randomize_(b)\n"
        "    x = torch.randn(shape)\n"
        "    if cl: x = x.contiguous(memory_format=torch.channels_last)\n"
        "    g = torch.randn(shape, dtype=torch.float64)\n"
        "    def run(block, x, backend):\n"
        "        x = x.detach().requires_grad_()\n"
        "        with rk.use_backend(backend): out = block(x)\n"
        "        out.backward(g.to(x.dtype))\n"
        "        return [out, x.grad] + [p.grad for p in block.parameters()]\n"
        "    ref = run(copy.deepcopy(b).double(), x.double(), 'reference')\n"
        "    mine = run(b, x, 'cpu')\n"
        "    errs = [rel_err(m, r) for m, r in zip(mine, ref)]\n"
        "    assert max(errs) <= 1e-5, errs\n"
        "    assert rk.cpu_isa_info().last_run == 'baseline'\n"
        "print('ok')\n")
    res = _python(code, RIFORMER_EXTENSION_PATH=str(so))
    assert res.returncode == 0 and res.stdout.strip().endswith('ok'), res.stdout + res.stderr


@pytest.mark.skipif(shutil.which('aarch64-linux-gnu-g++') is None,
                    reason="no aarch64 cross compiler (Debian: g++-aarch64-linux-gnu; .ci/run "
                           "installs it)")
def test_sources_cross_compile_for_aarch64(tmp_path):
    """Every C++ source of the extension compiles for ARM (aarch64), where only the baseline copy
    of the tile code exists: no x86 intrinsic or attribute leaks out of the x86-only paths."""
    from torch.utils.cpp_extension import include_paths
    import sysconfig
    flags = ['-std=c++20', '-O1', '-fopenmp', '-fPIC', '-fno-trapping-math',
             *[f'-I{p}' for p in include_paths()], f"-I{sysconfig.get_paths()['include']}"]
    sources = sorted(str(p.relative_to(ROOT)) for pattern in ('csrc/*.cpp', 'csrc/cpu/*.cpp')
                     for p in ROOT.glob(pattern))
    assert 'csrc/cpu/block_mlp.cpp' in sources
    for src in sources:
        obj = tmp_path / (Path(src).name + '.o')
        res = subprocess.run(['aarch64-linux-gnu-g++', *flags, '-c', src, '-o', str(obj)],
                             cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, f"{src}:\n{res.stderr[-3000:]}"
    symbols = subprocess.run(['aarch64-linux-gnu-nm', '-C', str(tmp_path / 'block_mlp.cpp.o')],
                             capture_output=True, text=True, check=True).stdout
    assert 'at_baseline::' in symbols and 'at_avx2::' not in symbols
