// Per-element math shared by the CPU (g++) and CUDA (nvcc) kernels.
//
// Everything here is header-only, free of torch headers, and marked
// RIFORMER_HOST_DEVICE so one definition serves both compilers: the CPU and
// CUDA moments kernels must agree bit-for-bit on the *formula* (not on the
// summation order, which differs), so it lives in exactly one place.
#pragma once

#if defined(__CUDACC__)
#define RIFORMER_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define RIFORMER_HOST_DEVICE inline
#endif

namespace riformer {

// Moments of a set of values: count, mean and M2 = sum (x - mean)^2.
// The count is kept in the accumulation type so that merges need no integer
// division and the struct shuffles as three registers on the GPU. In fp32 a
// count is exact up to 2^24 values per (n, c); beyond that only the merge
// weights n_b / n carry a relative error ~1e-7, which is harmless.
template <typename acc_t>
struct Moments {
  acc_t n;
  acc_t mean;
  acc_t m2;
};

template <typename acc_t>
RIFORMER_HOST_DEVICE Moments<acc_t> moments_empty() {
  return Moments<acc_t>{acc_t(0), acc_t(0), acc_t(0)};
}

// Welford's single-value update. Used where values stream through one at a
// time (a fused epilogue emitting moments of its output); bulk kernels use the
// corrected two-pass form below, which avoids a division per value.
template <typename acc_t>
RIFORMER_HOST_DEVICE void welford_update(Moments<acc_t>& m, acc_t x) {
  m.n += acc_t(1);
  const acc_t d = x - m.mean;
  m.mean += d / m.n;
  m.m2 += d * (x - m.mean);
}

// Chan et al.'s pairwise merge of two partial moments. Never forms
// E[x^2] - E[x]^2, so a large common offset does not cancel catastrophically.
// An empty side returns the other side unchanged (no 0/0).
template <typename acc_t>
RIFORMER_HOST_DEVICE Moments<acc_t> chan_merge(const Moments<acc_t>& a,
                                               const Moments<acc_t>& b) {
  if (b.n == acc_t(0)) return a;
  if (a.n == acc_t(0)) return b;
  const acc_t n = a.n + b.n;
  const acc_t wb = b.n / n;
  const acc_t delta = b.mean - a.mean;
  Moments<acc_t> r;
  r.n = n;
  r.mean = a.mean + delta * wb;
  r.m2 = a.m2 + b.m2 + delta * delta * a.n * wb;
  return r;
}

// Finish a "corrected two-pass" over `count` values given a shift c (an
// approximate mean) and the sums s1 = sum (x - c), s2 = sum (x - c)^2.
// The correction s1^2 / n removes the first-order error of c, so c may be any
// value close to the data (e.g. a first-pass fp32 mean that is itself off by a
// few ulps of a large offset) and M2 stays accurate.
template <typename acc_t>
RIFORMER_HOST_DEVICE Moments<acc_t> moments_from_shifted_sums(acc_t count,
                                                              acc_t shift,
                                                              acc_t s1,
                                                              acc_t s2) {
  if (count == acc_t(0)) return moments_empty<acc_t>();
  Moments<acc_t> r;
  r.n = count;
  const acc_t d = s1 / count;
  r.mean = shift + d;
  const acc_t m2 = s2 - s1 * d;
  // Rounding can leave a tiny negative M2 for (near-)constant data.
  r.m2 = m2 > acc_t(0) ? m2 : acc_t(0);
  return r;
}

// Population variance from merged moments.
template <typename acc_t>
RIFORMER_HOST_DEVICE acc_t population_var(const Moments<acc_t>& m) {
  return m.n > acc_t(0) ? m.m2 / m.n : acc_t(0);
}

}  // namespace riformer
