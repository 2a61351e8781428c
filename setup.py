"""Build riformer_kernels and its native extension riformer_kernels._C.

    pip install -e . --no-build-isolation      # torch must already be installed

The project's metadata (name, version, dependencies, extras, the `riformer-bench` script) is in
pyproject.toml. This file holds what needs code: the extension (CUDA detection below) and the
package list, which installs the repository's top-level benchmarks/ folder as the subpackage
riformer_kernels.benchmarks (a top-level `benchmarks` package would clash with other projects).

The C++ (CPU) kernels are always built. The CUDA kernels are built when torch
is a CUDA build and a CUDA toolkit (nvcc) is found; no GPU is needed to build.

Environment:
    RIFORMER_SKIP_CUDA=1    never build the CUDA sources
    RIFORMER_CPU_ISA_DISPATCH=0
                            compile the CPU tile code for baseline x86-64 only (no
                            AVX2/AVX-512 copies): what every non-x86 build does; the
                            test suite builds this way to check that path
    RIFORMER_FORCE_CUDA=1   build them even if detection says no; fail loudly
                            if that is impossible
    CUDA_HOME               toolkit root; else derived from `nvcc -dryrun`
    TORCH_CUDA_ARCH_LIST    default "8.0;9.0" (torch raises without a GPU
                            when it is unset)
    MAX_JOBS                parallel compile jobs (ninja)
"""

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
CSRC = "csrc"


def _truthy(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def find_cuda_home():
    """Return the CUDA toolkit root, or None.

    An explicit CUDA_HOME wins. Otherwise ask nvcc itself: `nvcc -dryrun`
    prints `#$ TOP=<root>/bin/..`. torch's own guess follows the nvcc found on
    PATH, which may be a wrapper script outside the toolkit (linking then
    fails with -lcudart not found).
    """
    env = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if env:
        return env if Path(env, "bin").is_dir() else None
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        default = Path("/usr/local/cuda/bin/nvcc")
        nvcc = str(default) if default.exists() else None
    if nvcc is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        probe = Path(tmp, "probe.cu")
        probe.write_text("")
        try:
            res = subprocess.run([nvcc, "-dryrun", str(probe)], capture_output=True,
                                 text=True, timeout=60)
        except (OSError, subprocess.SubprocessError):
            return None
    m = re.search(r"^#\$ TOP=(.+)$", res.stdout + res.stderr, re.MULTILINE)
    if not m:
        return None
    root = Path(m.group(1).strip()).resolve()
    return str(root) if (root / "bin" / "nvcc").exists() else None


def decide_cuda():
    """Return (build_cuda: bool, cuda_home: str|None, reason: str)."""
    import torch

    if _truthy("RIFORMER_SKIP_CUDA"):
        return False, None, "RIFORMER_SKIP_CUDA is set"
    force = _truthy("RIFORMER_FORCE_CUDA")
    cuda_home = find_cuda_home()
    problems = []
    if torch.version.cuda is None:
        problems.append(f"torch {torch.__version__} is not a CUDA build")
    if cuda_home is None:
        problems.append("no CUDA toolkit found (set CUDA_HOME or put nvcc on PATH)")
    if problems:
        if force:
            raise RuntimeError("RIFORMER_FORCE_CUDA=1 but the CUDA sources cannot be "
                               "built: " + "; ".join(problems))
        return False, None, "; ".join(problems)
    why = "RIFORMER_FORCE_CUDA is set" if force else (
        f"torch CUDA {torch.version.cuda}, toolkit at {cuda_home}")
    return True, cuda_home, why


def build_extensions():
    import torch.utils.cpp_extension as cpp_ext

    build_cuda, cuda_home, reason = decide_cuda()
    if build_cuda:
        # torch reads CUDA_HOME at import time; set both the variable and the
        # module attribute before any extension object is created.
        os.environ["CUDA_HOME"] = cuda_home
        cpp_ext.CUDA_HOME = cuda_home
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        arch = os.environ["TORCH_CUDA_ARCH_LIST"]
        print(f"riformer_kernels: building CUDA kernels (archs {arch}): {reason}")
    else:
        print(f"riformer_kernels: NOT building CUDA kernels: {reason}")

    # Few translation units on purpose: each one costs seconds of header
    # parsing, so kernels of one op share a file.
    sources = [f"{CSRC}/ops.cpp", f"{CSRC}/cpu/isa.cpp", f"{CSRC}/cpu/moments.cpp",
               f"{CSRC}/cpu/block_mlp.cpp"]
    # Every file of csrc/ (headers, and the CUDA sources in a CPU-only build): listed so that
    # an sdist made anywhere carries them all (setuptools puts `depends` into the sdist).
    csrc_files = sorted(str(f.relative_to(ROOT)) for f in (ROOT / CSRC).rglob("*") if f.is_file())
    # -fopenmp in compile AND link flags, or at::parallel_for runs on one
    # thread. No -march=native: the wheel must run on other CPUs (the CPU
    # kernels compile their tile code once per ISA level instead: csrc/cpu/isa.h).
    # -fno-trapping-math
    # (as torch's own build) lets the compiler if-convert the branch-free GELU
    # and vectorise it; it changes no result.
    cxx_flags = ["-O3", "-fopenmp", "-fno-trapping-math"]
    link_flags = ["-fopenmp"]
    macros = []
    if os.environ.get("RIFORMER_CPU_ISA_DISPATCH", "").strip() == "0":
        macros.append(("RIFORMER_NO_ISA_DISPATCH", "1"))
        print("riformer_kernels: CPU tile code for baseline x86-64 only (RIFORMER_CPU_ISA_DISPATCH=0)")
    if build_cuda:
        sources += [f"{CSRC}/cuda/moments.cu", f"{CSRC}/cuda/mlp_forward.cu",
                    f"{CSRC}/cuda/mlp_backward.cu"]
        macros.append(("RIFORMER_WITH_CUDA", "1"))
        nvcc_flags = ["-O3", "-lineinfo", "-DRIFORMER_WITH_CUDA=1"]
        ext = cpp_ext.CUDAExtension(
            name="riformer_kernels._C",
            sources=sources,
            depends=csrc_files,
            define_macros=macros,
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            extra_link_args=link_flags,
        )
    else:
        ext = cpp_ext.CppExtension(
            name="riformer_kernels._C",
            sources=sources,
            depends=csrc_files,
            define_macros=macros,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_flags,
        )
    return [ext], cpp_ext.BuildExtension.with_options(use_ninja=True)


def packages():
    """riformer_kernels and its subpackages, plus benchmarks/ installed as riformer_kernels.benchmarks."""
    pkgs = find_packages(include=["riformer_kernels", "riformer_kernels.*"])
    pkgs += ["riformer_kernels.benchmarks"]
    pkgs += [f"riformer_kernels.benchmarks.{p}" for p in find_packages("benchmarks")]
    return pkgs


ext_modules, build_ext_cls = build_extensions()

setup(
    packages=packages(),
    package_dir={"riformer_kernels.benchmarks": "benchmarks"},
    ext_modules=ext_modules,
    cmdclass={"build_ext": build_ext_cls},
)
