// Per-element math shared by the CPU (g++) and CUDA (nvcc) kernels.
//
// Everything here is header-only, free of torch headers, and marked
// RIFORMER_HOST_DEVICE so one definition serves both compilers: the CPU and
// CUDA moments kernels must agree bit-for-bit on the *formula* (not on the
// summation order, which differs), so it lives in exactly one place.
#pragma once

#include <math.h>  // erf / exp for the double-precision (oracle) paths

#if defined(__CUDACC__)
#define RIFORMER_HOST_DEVICE __host__ __device__ __forceinline__
#elif defined(__GNUC__)
// Forced inline on the host too: the CPU kernels rely on these being inlined
// into their tile loops, which the compiler then vectorises (a call left in
// a loop stops vectorisation, and GCC's size heuristics do leave some).
#define RIFORMER_HOST_DEVICE inline __attribute__((always_inline))
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

// ---------------------------------------------------------------------------
// Exact (erf) GELU and its derivative.
//
// The CPU kernels evaluate these over whole hidden tiles in plain loops that
// the compiler vectorises, so the host versions are branch-free arithmetic
// (no libm calls, which would stop vectorisation): erf is a rational
// approximation, exp a range reduction plus a polynomial. Absolute errors:
// erf <= 4.5e-7 on all of R (the approximation used by Eigen and
// TensorFlow), exp <= 2 ulp, so GELU and GELU' carry <= ~3e-7 * (1 + |u|)
// absolute error: two orders below the 1e-5 fp32 budget of the block. The
// device versions use CUDA's erff / expf; double precision uses the libm /
// CUDA double functions (the fp64 path is a correctness oracle, not a fast
// path).
// ---------------------------------------------------------------------------

namespace riformer {

constexpr float kSqrtHalfF = 0.70710678118654752440f;
constexpr float kInvSqrt2PiF = 0.39894228040143267794f;
constexpr double kSqrtHalfD = 0.70710678118654752440;
constexpr double kInvSqrt2PiD = 0.39894228040143267794;

RIFORMER_HOST_DEVICE float erf_f32(float x) {
#if defined(__CUDA_ARCH__)
  return erff(x);
#else
  // erf(+-4) rounds to +-1 in fp32, so clamping loses nothing. Written as
  // compares, not std::min/max, so the loop vectorises without -ffast-math.
  x = x < 4.f ? x : 4.f;
  x = x > -4.f ? x : -4.f;
  const float x2 = x * x;
  float p = -2.72614225801306e-10f;  // odd numerator, x * P(x^2)
  p = p * x2 + 2.77068142495902e-08f;
  p = p * x2 + -2.10102402082508e-06f;
  p = p * x2 + -5.69250639462346e-05f;
  p = p * x2 + -7.34990630326855e-04f;
  p = p * x2 + -2.95459980854025e-03f;
  p = p * x2 + -1.60960333262415e-02f;
  p = p * x;
  float q = -1.45660718464996e-05f;  // even denominator Q(x^2)
  q = q * x2 + -2.13374055278905e-04f;
  q = q * x2 + -1.68282697438203e-03f;
  q = q * x2 + -7.37332916720468e-03f;
  q = q * x2 + -1.42647390514189e-02f;
  return p / q;
#endif
}

// exp(x) for x <= 0 (GELU' needs exp(-u^2 / 2) only). Below -87 the result
// is clamped to exp(-87) ~ 1.6e-38 instead of flushing through denormals;
// every caller multiplies it by a bounded factor, so this is invisible.
RIFORMER_HOST_DEVICE float exp_nonpositive_f32(float x) {
#if defined(__CUDA_ARCH__)
  return __expf(x > -87.f ? x : -87.f);
#else
  x = x > -87.f ? x : -87.f;
  // n = round(x / ln 2) by the 1.5 * 2^23 trick (no floor: vectorises on
  // every ISA), then exp(x) = 2^n * exp(r) with |r| <= ln(2) / 2.
  const float shifted = x * 1.44269504088896341f + 12582912.f;
  const float n = shifted - 12582912.f;
  float r = x - n * 0.693145751953125f;  // ln 2 split hi + lo: r is exact
  r = r - n * 1.428606765330187e-06f;
  float p = 1.f / 5040.f;  // Taylor to degree 7: error < r^8 / 40320 ~ 5e-9
  p = p * r + 1.f / 720.f;
  p = p * r + 1.f / 120.f;
  p = p * r + 1.f / 24.f;
  p = p * r + 1.f / 6.f;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const int bits = (static_cast<int>(n) + 127) << 23;
  float scale;
  __builtin_memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
#endif
}

// Standard normal CDF Phi(u) = (1 + erf(u / sqrt 2)) / 2.
RIFORMER_HOST_DEVICE float normal_cdf(float u) {
  return 0.5f * (1.f + erf_f32(u * kSqrtHalfF));
}
RIFORMER_HOST_DEVICE double normal_cdf(double u) {
  return 0.5 * (1.0 + erf(u * kSqrtHalfD));
}

// GELU(u) = u Phi(u), the exact (erf) form of nn.GELU().
RIFORMER_HOST_DEVICE float gelu(float u) { return u * normal_cdf(u); }
RIFORMER_HOST_DEVICE double gelu(double u) { return u * normal_cdf(u); }

// GELU'(u) = Phi(u) + u phi(u).
RIFORMER_HOST_DEVICE float gelu_grad(float u) {
  return normal_cdf(u) + u * kInvSqrt2PiF * exp_nonpositive_f32(-0.5f * u * u);
}
RIFORMER_HOST_DEVICE double gelu_grad(double u) {
  return normal_cdf(u) + u * kInvSqrt2PiD * exp(-0.5 * u * u);
}

// Both at once, sharing Phi(u): the backward needs h = GELU(u) for dW2 and
// GELU'(u) for du at every hidden element.
template <typename T>
RIFORMER_HOST_DEVICE void gelu_and_grad(T u, T& h, T& dh_du);

template <>
RIFORMER_HOST_DEVICE void gelu_and_grad<float>(float u, float& h, float& d) {
  const float cdf = normal_cdf(u);
  h = u * cdf;
  d = cdf + u * kInvSqrt2PiF * exp_nonpositive_f32(-0.5f * u * u);
}
template <>
RIFORMER_HOST_DEVICE void gelu_and_grad<double>(double u, double& h, double& d) {
  const double cdf = normal_cdf(u);
  h = u * cdf;
  d = cdf + u * kInvSqrt2PiD * exp(-0.5 * u * u);
}

// ---------------------------------------------------------------------------
// Per-element forms of the folded block (docs/design.md sections 2 and 3). The
// per-(n, c) coefficients come from riformer_kernels.fold; these are the only
// places a kernel combines them with activations.
// ---------------------------------------------------------------------------

// Prologue: the norm2 output z = A x + B.
template <typename T>
RIFORMER_HOST_DEVICE T block_z(T A, T B, T x) { return A * x + B; }

// Epilogue: out = a x + b + l2 (acc + b2), acc = (W2 h)_c before its bias.
template <typename T>
RIFORMER_HOST_DEVICE T block_out(T a, T b, T l2, T b2, T x, T acc) {
  return a * x + b + l2 * (acc + b2);
}

// Phase 2 of the backward: dx = P g + Q dz + R (x - m) + S.
template <typename T>
RIFORMER_HOST_DEVICE T block_input_grad(T P, T Q, T R, T S, T g, T dz, T x_centered) {
  return P * g + Q * dz + R * x_centered + S;
}

}  // namespace riformer
