// ISA level detection and the cap (isa.h).

#include "isa.h"

#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>
#include <mutex>

namespace riformer {
namespace isa {
namespace {

constexpr int kUnset = -1;
std::atomic<int> g_cap{kUnset};
std::atomic<int> g_last_run{-1};
std::once_flag g_env_once;

Level detect() {
#if RIFORMER_ISA_DISPATCH
  // __builtin_cpu_supports also checks that the OS saves the wider register
  // state (XGETBV), so a feature the OS disabled reads as absent.
  const bool v3 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                  __builtin_cpu_supports("bmi") && __builtin_cpu_supports("bmi2") &&
                  __builtin_cpu_supports("f16c") && __builtin_cpu_supports("movbe");
  const bool v4 = v3 && __builtin_cpu_supports("avx512f") &&
                  __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512cd") &&
                  __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
  return v4 ? kAvx512 : v3 ? kAvx2 : kBaseline;
#else
  return kBaseline;
#endif
}

// The cap from RIFORMER_CPU_ISA, applied once unless set_cap came first.
void read_env_cap() {
  std::call_once(g_env_once, [] {
    const char* text = std::getenv("RIFORMER_CPU_ISA");
    int level = kHighestBuilt;
    if (text != nullptr && *text != '\0') {
      level = parse(text);
      TORCH_CHECK(level >= 0, "RIFORMER_CPU_ISA=", text,
                  " is not an ISA level; use baseline, avx2 or avx512");
    }
    int expected = kUnset;
    g_cap.compare_exchange_strong(expected, level);
  });
}

}  // namespace

const char* name(int level) {
  switch (level) {
    case kBaseline: return "baseline";
    case kAvx2: return "avx2";
    case kAvx512: return "avx512";
    default: return "none";
  }
}

int parse(const char* text) {
  for (int level = kBaseline; level <= kAvx512; ++level)
    if (std::strcmp(text, name(level)) == 0) return level;
  return -1;
}

Level supported() {
  static const Level level = detect();
  return level;
}

Level cap() {
  if (g_cap.load(std::memory_order_relaxed) == kUnset) read_env_cap();
  return static_cast<Level>(g_cap.load(std::memory_order_relaxed));
}

void set_cap(Level level) {
  TORCH_CHECK(level >= kBaseline && level <= kAvx512, "riformer: ISA level ", int(level),
              " out of range");
  // Mark the environment as read, so that a later first kernel call cannot
  // overwrite an explicit choice with RIFORMER_CPU_ISA.
  std::call_once(g_env_once, [] {});
  g_cap.store(level, std::memory_order_relaxed);
}

Level active() {
  const Level s = supported(), c = cap();
  return s < c ? s : c;
}

void record_run(Level level) { g_last_run.store(level, std::memory_order_relaxed); }
int last_run() { return g_last_run.load(std::memory_order_relaxed); }

}  // namespace isa
}  // namespace riformer
