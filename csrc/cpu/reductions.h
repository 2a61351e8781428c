// Reductions shared by the CPU kernels: lane-split sums and the corrected
// two-pass moments. The moments op (moments.cpp) and the forward's moments of
// its output (block_mlp.cpp, emit_moments) use the same scheme; it is written
// once here so that the two cannot drift apart.
//
// Everything is forced inline: block_mlp.cpp calls these from its tile code,
// which it compiles once per ISA level (isa.h), and each copy must get its own
// inlined copy, compiled for its level, as when the loops were written out in
// place.
#pragma once

#include <cstdint>

#include "../common/block_math.h"

#if defined(__GNUC__)
#define RIFORMER_INLINE inline __attribute__((always_inline))
#else
#define RIFORMER_INLINE inline
#endif

namespace riformer {
namespace cpu {

// Independent accumulator lanes: the compiler may not reassociate one fp sum
// (no -ffast-math), but it vectorises independent lanes, and the shorter
// per-lane chains also round less.
constexpr int64_t kLanes = 16;

template <typename T>
RIFORMER_INLINE T sum_lanes(const T* lane) {
  T s = 0;
  for (int64_t i = 0; i < kLanes; ++i) s += lane[i];
  return s;
}

// Moments of L contiguous values. Pass 1 sums x - x[0] (removes any large
// common offset before summing, and is exactly 0 for constant data); pass 2
// is the corrected two-pass around the pass-1 mean.
template <typename A>
RIFORMER_INLINE Moments<A> contiguous_moments(const A* __restrict p, int64_t L) {
  const A c0 = p[0];
  A lane[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= L; i += kLanes)
    for (int64_t q = 0; q < kLanes; ++q) lane[q] += p[i + q] - c0;
  for (; i < L; ++i) lane[i % kLanes] += p[i] - c0;
  const A m = c0 + sum_lanes(lane) / A(L);
  A l1[kLanes] = {}, l2[kLanes] = {};
  i = 0;
  for (; i + kLanes <= L; i += kLanes)
    for (int64_t q = 0; q < kLanes; ++q) {
      const A d = p[i + q] - m;
      l1[q] += d;
      l2[q] += d * d;
    }
  for (; i < L; ++i) {
    const A d = p[i] - m;
    l1[i % kLanes] += d;
    l2[i % kLanes] += d * d;
  }
  return moments_from_shifted_sums<A>(A(L), m, sum_lanes(l1), sum_lanes(l2));
}

// The same per column of a row-major [R, C] block (pass 1 around row 0). The
// inner loops run over c (unit stride, independent per c), so they vectorise
// without reassociating any sum. `scratch` holds 3 C values; out(c, moments)
// is called for c = 0 .. C-1 in order.
template <typename A, typename Out>
RIFORMER_INLINE void column_moments(const A* __restrict v, int64_t R, int64_t C,
                                    A* __restrict scratch, Out&& out) {
  A* __restrict m = scratch;
  A* __restrict s1 = scratch + C;
  A* __restrict s2 = scratch + 2 * C;
  for (int64_t c = 0; c < C; ++c) s1[c] = 0;
  for (int64_t r = 0; r < R; ++r)
    for (int64_t c = 0; c < C; ++c) s1[c] += v[r * C + c] - v[c];
  for (int64_t c = 0; c < C; ++c) m[c] = v[c] + s1[c] / A(R);
  for (int64_t c = 0; c < C; ++c) s1[c] = s2[c] = 0;
  for (int64_t r = 0; r < R; ++r)
    for (int64_t c = 0; c < C; ++c) {
      const A d = v[r * C + c] - m[c];
      s1[c] += d;
      s2[c] += d * d;
    }
  for (int64_t c = 0; c < C; ++c) out(c, moments_from_shifted_sums<A>(A(R), m[c], s1[c], s2[c]));
}

}  // namespace cpu
}  // namespace riformer
