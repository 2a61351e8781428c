// Which instruction-set level the CPU block kernels run, and the cap on it.
//
// The extension is built without -march=native, so that one binary runs on
// any x86-64 CPU (and builds on any other architecture). Its hot loops are
// compiled several times instead, once per LEVEL (block_mlp.cpp), and each
// kernel call picks the copy for
//
//     active level = min(what this CPU supports, the cap)
//
// Levels are the x86-64 psABI micro-architecture levels the compilers know:
//   baseline  plain x86-64 (SSE2), and every non-x86 build
//   avx2      x86-64-v3: AVX2, FMA, BMI1/2, F16C, MOVBE
//   avx512    x86-64-v4: AVX-512 F, BW, CD, DQ, VL
// The cap comes from RIFORMER_CPU_ISA (baseline | avx2 | avx512; read once,
// at the first kernel call) and can be changed at run time through the op
// riformer::cpu_isa_set_cap (Python: riformer_kernels.use_cpu_isa). It exists
// so that one machine can run and time the code paths of other CPUs: an
// AVX-512 machine capped at avx2 runs exactly what an AVX2 machine runs,
// except inside MKL, which picks its own code path (MKL_ENABLE_INSTRUCTIONS
// is MKL's own knob; the cap does not reach it).
//
// The GEMM route follows the level too (blas.h): oneDNN brgemm only at avx512,
// MKL sgemm below.
//
// Builds with RIFORMER_NO_ISA_DISPATCH defined (setup.py: RIFORMER_CPU_ISA_DISPATCH=0),
// and every non-x86 or non-GCC build, compile the baseline copy only: that is
// how an aarch64 build compiles, and the test suite builds and runs it that way.
#pragma once

#include <atomic>
#include <cstdint>

namespace riformer {
namespace isa {

enum Level : int { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && \
    !defined(RIFORMER_NO_ISA_DISPATCH)
#define RIFORMER_ISA_DISPATCH 1
constexpr Level kHighestBuilt = kAvx512;
#else
#define RIFORMER_ISA_DISPATCH 0
constexpr Level kHighestBuilt = kBaseline;
#endif

const char* name(int level);
// -1 when `text` names no level.
int parse(const char* text);

// What this CPU (and its OS, for the wider registers' state) supports, capped
// at what this build compiled.
Level supported();
// The cap: RIFORMER_CPU_ISA at the first call, unless set since. An invalid
// RIFORMER_CPU_ISA raises (c10::Error naming the value) at the kernel call.
Level cap();
void set_cap(Level level);
// min(supported(), cap()): the copy a kernel call runs.
Level active();

// The level the most recent block kernel call ran at (-1 before the first):
// what tests read to see that the cap took effect.
void record_run(Level level);
int last_run();

// The fp32 GEMM route at the active level: "onednn-brgemm" or "mkl-sgemm"
// (blas.h; defined in block_mlp.cpp, which owns the GEMM calls).
const char* fp32_gemm_route();

}  // namespace isa
}  // namespace riformer
