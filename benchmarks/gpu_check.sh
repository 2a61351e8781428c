#!/usr/bin/env bash
# The prepared GPU check: everything a GPU lent for a few minutes should tell us, in one run.
#
#   OUT=/some/dir bash benchmarks/gpu_check.sh       # on a fresh GPU machine, repository root
#   bash benchmarks/gpu_check.sh --dry-run           # here, without a GPU: every step's CPU path
#
# Steps (each with its own time limit; a failing step never stops the others; the whole check
# stays under 8 minutes on one H100/H200 because later steps are skipped past DEADLINE_S):
#   env        GPU, driver, python/torch/triton versions
#   build      the extension, CUDA kernels for the local GPU's arch only (pip --no-deps: the
#              machine's own torch/triton are used whatever pyproject pins)
#   selftest   python -m riformer_kernels.selftest (every usable backend vs the fp64 reference)
#   launched   registers/spills/shared memory of the Triton variants that really launched at the
#              S12 stage shapes (tools/launched_kernels.py), to hold against the build report
#   bench-*    riformer-bench, S12 block shapes at batch 128, bf16 and fp32: eager, compile, triton
#   gpu-tests  the kernel test modules on the GPU (device-generic tests, graph capture under
#              sync-debug 'error', the GPU-only S12 shapes at N=64), JUnit XML in $OUT; last,
#              with the time that is left (it compiles the most kernel variants)
# Results: $OUT/<step>.log, $OUT/summary.txt (one line per step: rc, seconds, last line),
# $OUT/gpu-tests.xml, $OUT/launched.json, $OUT/bench-*/ (CSV, markdown, plots).
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
[[ "${1:-}" == "--dry-run" ]] && DRY=1
OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"
SUMMARY=$OUT/summary.txt
: > "$SUMMARY"
export PYTHONUNBUFFERED=1
START=$(date +%s)
DEADLINE_S=${DEADLINE_S:-410}      # no step starts after this; the limits keep it < 8 min

if (( DRY )); then
    PY=${PYTHON:-.venv/bin/python}
    export TRITON_INTERPRET=1
else
    PY=${PYTHON:-python3}
fi

step() {  # step NAME SECONDS CMD...: time-limited, logged to $OUT/NAME.log, never aborts
    local name=$1 limit=$2 rc start
    shift 2
    start=$(date +%s)
    if (( start - START > DEADLINE_S )); then
        printf '%-12s skipped: past the %ss deadline\n' "$name" "$DEADLINE_S" | tee -a "$SUMMARY"
        return
    fi
    timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    printf '%-12s rc=%-3s %4ss  %s\n' "$name" "$rc" "$(( $(date +%s) - start ))" \
        "$(grep -v '^\s*$' "$OUT/$name.log" | tail -n 1 | cut -c1-150)" | tee -a "$SUMMARY"
}

KERNEL_TESTS=(tests/test_triton_forward.py tests/test_triton_backward.py
              tests/test_triton_training.py tests/test_gpu_readiness.py tests/test_pipeline.py
              tests/test_extension.py tests/test_selftest.py tests/test_cuda_emulated.py
              tests/test_cuda_backward_compiled.py tests/test_host_sync.py
              tests/test_autocast.py)

step env 60 bash -c "nvidia-smi || true; $PY -c 'import sys, torch, triton; print(sys.version);
print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"triton\", triton.__version__);
print(torch.cuda.get_device_name() if torch.cuda.is_available() else \"no CUDA device\")'"

if (( DRY )); then
    # The tree here is already built by make; the dry run checks the command line only.
    step build 120 "$PY" -m pip install --dry-run --no-deps --no-build-isolation -e .
    step selftest 300 "$PY" -m riformer_kernels.selftest --quick
    step gpu-tests 300 "$PY" -m pytest "${KERNEL_TESTS[@]}" -q -ra -p no:cacheprovider \
        --junitxml="$OUT/gpu-tests.xml" -k "stale_statistics or detector_sees"
    step launched 300 "$PY" -m riformer_kernels.tools.launched_kernels --json "$OUT/launched.json"
    step bench-quick 300 "$PY" -m benchmarks --quick --out "$OUT/bench-quick" --no-progress
else
    ARCH=$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')
    step build 150 env TORCH_CUDA_ARCH_LIST="$ARCH" MAX_JOBS="$(nproc)" RIFORMER_FORCE_CUDA=1 \
        "$PY" -m pip install --no-deps --no-build-isolation -e .
    # 90 s: the selftest's autocast cases compile triton's mixed-precision variants as well.
    step selftest 90 "$PY" -m riformer_kernels.selftest
    step launched 90 "$PY" -m riformer_kernels.tools.launched_kernels --json "$OUT/launched.json"
    step bench-bf16 90 "$PY" -m benchmarks --device cuda --arch s12 --res 224 --batch 128 \
        --dtype bf16 --impl eager,compile,fused-triton --out "$OUT/bench-bf16" --no-progress
    step bench-fp32 60 "$PY" -m benchmarks --device cuda --arch s12 --res 224 --batch 128 \
        --dtype fp32 --impl eager,compile,fused-triton --out "$OUT/bench-fp32" --no-progress
    # Last, with whatever the 8 minutes leave (at least 60 s): the suite compiles the most
    # variants; -v logs each test's outcome as it finishes, so a run the limit cuts short still
    # says what passed.
    LEFT=$(( 470 - ($(date +%s) - START) ))
    step gpu-tests $(( LEFT > 60 ? LEFT : 60 )) "$PY" -m pytest "${KERNEL_TESTS[@]}" -v -rfE \
        -p no:cacheprovider --junitxml="$OUT/gpu-tests.xml"
fi
echo "gpu check finished in $(( $(date +%s) - START )) s; results in $OUT" | tee -a "$SUMMARY"
