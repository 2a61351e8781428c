// CPU kernels of the fused block's MLP (docs/design.md section 3):
//   riformer::mlp_forward / mlp_forward_save_u   out = a x + b + l2 (W2 GELU(W1 (A x + B) + b1) + b2)
//   riformer::mlp_backward                       phase 1: dz, dW1, db1, dW2, db2 and per-(n,c) sums
//   riformer::input_grad                         phase 2: dx = P g + Q dz + R (x - m) + S
//
// Work unit: a TILE of L consecutive tokens of one sample (cache-sized; see
// the token budgets below). Per tile everything between the read of x and the
// write of out (z, the hidden u / GELU(u), W2 h) lives in per-thread buffers
// that stay in L2; only x (and g) are read and out (and dz) written.
//
// Layouts. NCHW: a sample is a row-major [C, T] matrix, so a tile is C rows of
// L contiguous tokens ("channel-major" tile, row stride T) and the GEMMs run
// as U[4C, L] = W1 Z[C, L], O[C, L] = W2 H[4C, L]. channels_last: a sample is
// [T, C], a tile one contiguous [L, C] block ("token-major") and the GEMMs
// run transposed, U[L, 4C] = Z W1^T. Both are native: no transposes.
//
// GEMMs: through blas.h on the tile buffers (fp32: oneDNN brgemm where it
// runs, else MKL sgemm; fp64 dgemm; bf16 x bf16 -> fp32 for bf16). Elementwise work is plain loops the compiler
// vectorises; the hot ones are cloned per ISA level (target_clones) so one
// portable binary runs AVX-512 / AVX2 code where the CPU has it.
//
// Determinism: tiles are fixed by the shape (never by the thread count), the
// backward's weight gradients accumulate per fixed GROUP of tiles in tile
// order and groups merge in group order, and per-(n, c) partial sums merge in
// tile order. No atomics: results are bitwise reproducible run to run and
// independent of the number of threads.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../common/block_math.h"
#include "blas.h"
#include "reductions.h"

namespace riformer {
namespace {

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define RIFORMER_ISA_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define RIFORMER_ISA_CLONES
#endif

// ---------------------------------------------------------------------------
// Storage types. S = the activation / weight dtype; acc_t<S> = the arithmetic
// and GEMM-output type (fp32 for fp32 and bf16, fp64 for fp64).
// ---------------------------------------------------------------------------
template <typename S>
using acc_t = std::conditional_t<std::is_same_v<S, double>, double, float>;

// fp32 / fp64 tiles compute in place where bf16 ones need a second buffer.
template <typename S>
constexpr bool kSameType = std::is_same_v<S, acc_t<S>>;

RIFORMER_INLINE float to_acc(float v) { return v; }
RIFORMER_INLINE double to_acc(double v) { return v; }
RIFORMER_INLINE float to_acc(c10::BFloat16 v) {
  const uint32_t bits = static_cast<uint32_t>(v.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

template <typename S>
RIFORMER_INLINE S from_acc(acc_t<S> v);
template <>
RIFORMER_INLINE float from_acc<float>(float v) { return v; }
template <>
RIFORMER_INLINE double from_acc<double>(double v) { return v; }
// Round to nearest even, NaN kept NaN; branch-free so loops vectorise
// (c10's converter branches on NaN).
template <>
RIFORMER_INLINE c10::BFloat16 from_acc<c10::BFloat16>(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof(u));
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  const uint16_t bits = (v != v) ? uint16_t(0x7FC0) : uint16_t(rounded);
  return c10::BFloat16(bits, c10::BFloat16::from_bits());
}

// Independent accumulator lanes for row sums (reductions.h).
using cpu::kLanes;
using cpu::sum_lanes;

// ---------------------------------------------------------------------------
// Tile sizes. Tokens per tile such that the tile's hidden activation
// (4C x L values in the accumulation type) is about this many elements;
// a multiple of 16 tokens; the tiles of a sample are then balanced.
// RIFORMER_CPU_FWD_HIDDEN / RIFORMER_CPU_BWD_HIDDEN override (for tuning).
// ---------------------------------------------------------------------------
constexpr int64_t kFwdHiddenElems = 64 * 1024;  // 256 KiB fp32 (L2-resident)
constexpr int64_t kBwdHiddenElems = 32 * 1024;  // backward holds 3 such buffers
// (RIFORMER_CPU_MIN_TOKENS / RIFORMER_CPU_SHORT_TOKENS override kMinTokens /
// kShortTileTokens; tests set them to 1 with tiny budgets to get many small
// tiles per sample on small shapes.)

int64_t env_int(const char* name, int64_t fallback) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return fallback;
  const long long parsed = std::atoll(v);
  return parsed > 0 ? parsed : fallback;
}

// A tile is either a span of one sample's tokens (long samples: `per_sample`
// tiles of up to `tokens` tokens each) or `samples` whole consecutive samples
// (short samples, e.g. 7x7: one tile of 49 tokens would make MKL's GEMMs run
// ~25% below their rate at >= 64 tokens). Either way a tile is a list of
// SEGMENTS (sample, first token, length, column in the tile buffers); per
// (n, c) quantities are per segment, GEMMs per tile.
struct Tiling {
  int64_t tokens;      // tokens per tile (the last tile of a sample may have fewer)
  int64_t per_sample;  // tiles per sample (1 when samples > 1)
  int64_t samples;     // whole samples per tile (1 when per_sample > 1)
  int64_t N, T;

  int64_t tasks() const {
    return samples > 1 ? (N + samples - 1) / samples : N * per_sample;
  }
  int64_t width() const { return samples > 1 ? samples * T : tokens; }  // buffer columns
  // Partials (moments, sums) are stored per (n, k), k < per_sample.
  template <typename F>
  void for_each_segment(int64_t task, F&& f) const {
    if (samples > 1) {
      const int64_t n0 = task * samples, n1 = std::min(N, n0 + samples);
      for (int64_t n = n0; n < n1; ++n) f(n, int64_t(0), int64_t(0), T, (n - n0) * T);
    } else {
      const int64_t n = task / per_sample, k = task % per_sample;
      const int64_t t0 = k * tokens;
      f(n, k, t0, std::min(tokens, T - t0), int64_t(0));
    }
  }
  int64_t task_tokens(int64_t task) const {
    int64_t total = 0;
    for_each_segment(task, [&](int64_t, int64_t, int64_t, int64_t len, int64_t) { total += len; });
    return total;
  }
  int64_t segment_tokens(int64_t k) const { return std::min(tokens, T - k * tokens); }
};

// MKL's tile GEMMs run at ~105-110 GFLOP/s per core (fp32, this CPU) from 64
// tokens up when the token count is a multiple of 16, but at ~60 with 25
// tokens: so tiles aim at the budget, never go below kMinTokens unless the
// sample is shorter, and round up to a multiple of 16.
constexpr int64_t kMinTokens = 64;

// Short samples (the 14x14 and 7x7 stages, where C is large) are grouped into
// tiles of about kShortTileTokens tokens: there the per-tile work that scales
// with the weights (streaming W1 and W2, the backward's dW accumulators and
// its per-sample G H^T) outweighs keeping the hidden tile in L2 (measured at
// C512@7x7, 1 thread: backward 58 -> 96 GFLOP/s going from 49 to 392-token
// tiles, forward 78 -> 103). At most half the batch per tile, so that two
// tiles can run in parallel.
constexpr int64_t kShortTileTokens = 384;
constexpr int64_t kWeight2GemmBelowTokens = 128;

Tiling make_tiling(int64_t N, int64_t T, int64_t hidden, int64_t budget, int64_t min_tokens,
                   int64_t short_tokens) {
  const int64_t target = std::max<int64_t>(
      min_tokens, (budget / std::max<int64_t>(hidden, 1)) / 16 * 16);
  if (T < short_tokens) {
    const int64_t cap = std::max<int64_t>(1, (N + 1) / 2);
    const int64_t samples = std::min(cap, std::max<int64_t>(1, (short_tokens + T / 2) / T));
    return Tiling{T, 1, samples, N, T};
  }
  if (T <= target + target / 2) return Tiling{T, 1, 1, N, T};
  const int64_t k = (T + target / 2) / target;  // nearest tile count
  int64_t tokens = (T + k - 1) / k;
  tokens = (tokens + 15) / 16 * 16;
  return Tiling{tokens, (T + tokens - 1) / tokens, 1, N, T};
}

// Per-thread scratch that persists across calls. Fresh std::vectors of a few
// MiB per call cost page faults and zeroing on every call (glibc returns such
// blocks to the kernel on free): ~10% of the backward at C512@7x7 (perf).
// Slots are per role; memory is kept until the thread exits. Contents are
// uninitialised: every kernel writes a buffer before reading it.
template <typename T>
T* thread_scratch(int slot, int64_t count) {
  constexpr int kSlots = 16;
  static thread_local std::vector<char> arenas[kSlots];
  TORCH_INTERNAL_ASSERT(slot >= 0 && slot < kSlots);
  std::vector<char>& arena = arenas[slot];
  const size_t bytes = static_cast<size_t>(std::max<int64_t>(count, 1)) * sizeof(T) + 64;
  if (arena.size() < bytes) {
    arena.clear();
    arena.shrink_to_fit();
    arena.resize(bytes);
  }
  const uintptr_t p = reinterpret_cast<uintptr_t>(arena.data());
  return reinterpret_cast<T*>((p + 63) & ~uintptr_t(63));  // 64-byte aligned
}

// When set (tests only), outputs are NaN-filled before the kernels write
// them, so an element a kernel forgets to write cannot pass a test by luck.
bool poison_outputs() {
  const char* v = std::getenv("RIFORMER_POISON_OUTPUTS");
  return v != nullptr && v[0] == '1';
}

void poison(at::Tensor& t) {
  if (t.numel() > 0 && poison_outputs()) t.fill_(std::numeric_limits<double>::quiet_NaN());
}

// ---------------------------------------------------------------------------
// Elementwise tile kernels. "rows": channel-major tile, the per-channel
// coefficient is per row; "cols": token-major tile, per column.
// ---------------------------------------------------------------------------

// z = A x + B for a channel-major tile: rows c, x row stride ldx.
template <typename S>
RIFORMER_ISA_CLONES void prologue_rows(const S* __restrict x, int64_t ldx,
                                       const acc_t<S>* __restrict A,
                                       const acc_t<S>* __restrict B, int64_t rows,
                                       int64_t L, S* __restrict z, int64_t ldz) {
  for (int64_t r = 0; r < rows; ++r) {
    const acc_t<S> ar = A[r], br = B[r];
    const S* __restrict xr = x + r * ldx;
    S* __restrict zr = z + r * ldz;
    for (int64_t j = 0; j < L; ++j) zr[j] = from_acc<S>(block_z(ar, br, to_acc(xr[j])));
  }
}

// z = A x + B for a token-major tile: L rows of C contiguous channels.
template <typename S>
RIFORMER_ISA_CLONES void prologue_cols(const S* __restrict x, const acc_t<S>* __restrict A,
                                       const acc_t<S>* __restrict B, int64_t L, int64_t C,
                                       S* __restrict z) {
  for (int64_t j = 0; j < L; ++j) {
    const S* __restrict xr = x + j * C;
    S* __restrict zr = z + j * C;
    for (int64_t c = 0; c < C; ++c) zr[c] = from_acc<S>(block_z(A[c], B[c], to_acc(xr[c])));
  }
}

// h = GELU(u + b1) over a channel-major hidden tile [Hd, L] (bias per row).
// u and h may be the same buffer (fp32): each element is read, then written.
// When u_out is set, u + b1 is also stored there (row stride ld_out).
template <typename S, bool kStoreU>
RIFORMER_ISA_CLONES void gelu_rows(acc_t<S>* __restrict u, const acc_t<S>* __restrict b1,
                                   int64_t rows, int64_t L, S* __restrict h,
                                   S* __restrict u_out, int64_t ld_out) {
  for (int64_t r = 0; r < rows; ++r) {
    const acc_t<S> br = b1[r];
    acc_t<S>* __restrict ur = u + r * L;
    // In place when S is the accumulation type (h is then ignored): one
    // pointer, so the compiler needs no runtime alias check.
    S* __restrict hr = kSameType<S> ? reinterpret_cast<S*>(ur) : h + r * L;
    if constexpr (kStoreU) {
      S* __restrict uo = u_out + r * ld_out;
      for (int64_t j = 0; j < L; ++j) {
        const acc_t<S> v = ur[j] + br;
        uo[j] = from_acc<S>(v);
        if constexpr (kSameType<S>) ur[j] = gelu(v); else hr[j] = from_acc<S>(gelu(v));
      }
    } else {
      for (int64_t j = 0; j < L; ++j) {
        if constexpr (kSameType<S>) ur[j] = gelu(ur[j] + br);
        else hr[j] = from_acc<S>(gelu(ur[j] + br));
      }
    }
  }
}

// Same over a token-major hidden tile [L, Hd] (bias per column); u_out rows
// are contiguous (channels_last u has row stride Hd).
template <typename S, bool kStoreU>
RIFORMER_ISA_CLONES void gelu_cols(acc_t<S>* __restrict u, const acc_t<S>* __restrict b1,
                                   int64_t L, int64_t Hd, S* __restrict h,
                                   S* __restrict u_out) {
  for (int64_t j = 0; j < L; ++j) {
    acc_t<S>* __restrict ur = u + j * Hd;
    S* __restrict hr = kSameType<S> ? reinterpret_cast<S*>(ur) : h + j * Hd;
    if constexpr (kStoreU) {
      S* __restrict uo = u_out + j * Hd;
      for (int64_t c = 0; c < Hd; ++c) {
        const acc_t<S> v = ur[c] + b1[c];
        uo[c] = from_acc<S>(v);
        if constexpr (kSameType<S>) ur[c] = gelu(v); else hr[c] = from_acc<S>(gelu(v));
      }
    } else {
      for (int64_t c = 0; c < Hd; ++c) {
        if constexpr (kSameType<S>) ur[c] = gelu(ur[c] + b1[c]);
        else hr[c] = from_acc<S>(gelu(ur[c] + b1[c]));
      }
    }
  }
}

// Epilogue of a channel-major tile: out = a x + b + l2 (acc + b2), rounded to
// S; `acc` is overwritten with the rounded values (the moments below are of
// exactly what was stored, i.e. what the next block will read).
template <typename S>
RIFORMER_ISA_CLONES void epilogue_rows(const S* __restrict x, int64_t ld, const acc_t<S>* a,
                                       const acc_t<S>* b, const acc_t<S>* l2,
                                       const acc_t<S>* b2, int64_t rows, int64_t L,
                                       acc_t<S>* __restrict acc, int64_t ldacc,
                                       S* __restrict out) {
  for (int64_t r = 0; r < rows; ++r) {
    const acc_t<S> ar = a[r], br = b[r], lr = l2[r], b2r = b2[r];
    const S* __restrict xr = x + r * ld;
    S* __restrict outr = out + r * ld;
    acc_t<S>* __restrict accr = acc + r * ldacc;
    for (int64_t j = 0; j < L; ++j) {
      const S v = from_acc<S>(block_out(ar, br, lr, b2r, to_acc(xr[j]), accr[j]));
      outr[j] = v;
      accr[j] = to_acc(v);
    }
  }
}

template <typename S>
RIFORMER_ISA_CLONES void epilogue_cols(const S* __restrict x, const acc_t<S>* __restrict a,
                                       const acc_t<S>* __restrict b,
                                       const acc_t<S>* __restrict l2,
                                       const acc_t<S>* __restrict b2, int64_t L, int64_t C,
                                       acc_t<S>* __restrict acc, S* __restrict out) {
  for (int64_t j = 0; j < L; ++j) {
    const S* __restrict xr = x + j * C;
    S* __restrict outr = out + j * C;
    acc_t<S>* __restrict accr = acc + j * C;
    for (int64_t c = 0; c < C; ++c) {
      const S v = from_acc<S>(block_out(a[c], b[c], l2[c], b2[c], to_acc(xr[c]), accr[c]));
      outr[c] = v;
      accr[c] = to_acc(v);
    }
  }
}

// Moments of each row of a [rows, L] buffer and of each column of a [L, C]
// one: the moments kernel's corrected two-pass scheme (reductions.h), so a
// large common offset does not cancel.
template <typename A>
RIFORMER_ISA_CLONES void row_moments(const A* __restrict v, int64_t ldv, int64_t rows,
                                     int64_t L, A* __restrict mean, A* __restrict m2) {
  for (int64_t r = 0; r < rows; ++r) {
    const Moments<A> mo = cpu::contiguous_moments<A>(v + r * ldv, L);
    mean[r] = mo.mean;
    m2[r] = mo.m2;
  }
}

// (`scratch`: 3 C values.)
template <typename A>
RIFORMER_ISA_CLONES void col_moments(const A* __restrict v, int64_t L, int64_t C,
                                     A* __restrict scratch, A* __restrict mean,
                                     A* __restrict m2) {
  cpu::column_moments<A>(v, L, C, scratch, [&](int64_t c, const Moments<A>& mo) {
    mean[c] = mo.mean;
    m2[c] = mo.m2;
  });
}

// Backward: from u (+ b1 when recomputed) to h = GELU(u) and d = GELU'(u).
// In place: `ud` holds u on entry and GELU'(u) on exit.
template <typename S>
RIFORMER_ISA_CLONES void gelu_grad_rows_inplace(acc_t<S>* ud, const acc_t<S>* __restrict b1,
                                                int64_t rows, int64_t L, S* __restrict h) {
  for (int64_t r = 0; r < rows; ++r) {
    const acc_t<S> br = b1[r];
    acc_t<S>* ur = ud + r * L;
    S* __restrict hr = h + r * L;
    for (int64_t j = 0; j < L; ++j) {
      acc_t<S> hv, dv;
      gelu_and_grad<acc_t<S>>(ur[j] + br, hv, dv);
      hr[j] = from_acc<S>(hv);
      ur[j] = dv;
    }
  }
}

template <typename S>
RIFORMER_ISA_CLONES void gelu_grad_cols_inplace(acc_t<S>* ud, const acc_t<S>* __restrict b1,
                                                int64_t L, int64_t Hd, S* __restrict h) {
  for (int64_t j = 0; j < L; ++j) {
    acc_t<S>* ur = ud + j * Hd;
    S* __restrict hr = h + j * Hd;
    for (int64_t c = 0; c < Hd; ++c) {
      acc_t<S> hv, dv;
      gelu_and_grad<acc_t<S>>(ur[c] + b1[c], hv, dv);
      hr[c] = from_acc<S>(hv);
      ur[c] = dv;
    }
  }
}

// From a saved u (bias included) with row stride ldu to h and d (dense [rows, L]).
template <typename S>
RIFORMER_ISA_CLONES void gelu_grad_from_saved(const S* __restrict u, int64_t ldu, int64_t rows,
                                              int64_t L, S* __restrict h,
                                              acc_t<S>* __restrict d, int64_t ldo) {
  for (int64_t r = 0; r < rows; ++r) {
    const S* __restrict ur = u + r * ldu;
    S* __restrict hr = h + r * ldo;
    acc_t<S>* __restrict dr = d + r * ldo;
    for (int64_t j = 0; j < L; ++j) {
      acc_t<S> hv, dv;
      gelu_and_grad<acc_t<S>>(to_acc(ur[j]), hv, dv);
      hr[j] = from_acc<S>(hv);
      dr[j] = dv;
    }
  }
}

// dO = l2 g for a channel-major tile (g row stride ldg) ...
template <typename S>
RIFORMER_ISA_CLONES void scale_rows(const S* __restrict g, int64_t ldg,
                                    const acc_t<S>* __restrict l2, int64_t rows, int64_t L,
                                    S* __restrict out, int64_t ldo) {
  for (int64_t r = 0; r < rows; ++r) {
    const acc_t<S> lr = l2[r];
    const S* __restrict gr = g + r * ldg;
    S* __restrict o = out + r * ldo;
    for (int64_t j = 0; j < L; ++j) o[j] = from_acc<S>(lr * to_acc(gr[j]));
  }
}

// ... and for a token-major one.
template <typename S>
RIFORMER_ISA_CLONES void scale_cols(const S* __restrict g, const acc_t<S>* __restrict l2,
                                    int64_t L, int64_t C, S* __restrict out) {
  for (int64_t j = 0; j < L; ++j)
    for (int64_t c = 0; c < C; ++c)
      out[j * C + c] = from_acc<S>(l2[c] * to_acc(g[j * C + c]));
}

// du = dh * GELU'(u) over a channel-major tile, db1 += row sums of du.
// du may alias dh (fp32: computed in place).
template <typename S>
RIFORMER_ISA_CLONES void hidden_grad_rows(acc_t<S>* __restrict dh, const acc_t<S>* __restrict d,
                                          int64_t rows, int64_t L, S* __restrict du,
                                          acc_t<S>* __restrict db1) {
  using A = acc_t<S>;
  for (int64_t r = 0; r < rows; ++r) {
    A* __restrict dhr = dh + r * L;
    const A* __restrict dr = d + r * L;
    S* __restrict dur = kSameType<S> ? reinterpret_cast<S*>(dhr) : du + r * L;
    A lane[kLanes] = {};
    int64_t i = 0;
    for (; i + kLanes <= L; i += kLanes)
      for (int64_t q = 0; q < kLanes; ++q) {
        const A v = dhr[i + q] * dr[i + q];
        if constexpr (kSameType<S>) dhr[i + q] = v; else dur[i + q] = from_acc<S>(v);
        lane[q] += v;
      }
    for (; i < L; ++i) {
      const A v = dhr[i] * dr[i];
      if constexpr (kSameType<S>) dhr[i] = v; else dur[i] = from_acc<S>(v);
      lane[i % kLanes] += v;
    }
    db1[r] += sum_lanes(lane);
  }
}

template <typename S>
RIFORMER_ISA_CLONES void hidden_grad_cols(acc_t<S>* __restrict dh, const acc_t<S>* __restrict d,
                                          int64_t L, int64_t Hd, S* __restrict du,
                                          acc_t<S>* __restrict db1) {
  using A = acc_t<S>;
  for (int64_t j = 0; j < L; ++j) {
    A* __restrict dhr = dh + j * Hd;
    const A* __restrict dr = d + j * Hd;
    S* __restrict dur = kSameType<S> ? reinterpret_cast<S*>(dhr) : du + j * Hd;
    for (int64_t c = 0; c < Hd; ++c) {
      const A v = dhr[c] * dr[c];
      if constexpr (kSameType<S>) dhr[c] = v; else dur[c] = from_acc<S>(v);
      db1[c] += v;
    }
  }
}

// Per-channel sums of a channel-major tile: sums[0..3][c] = sum_t g,
// g (x - m), dz, dz (x - m); also stores dz (acc buffer, dense) to its
// tensor (row stride ld).
template <typename S>
RIFORMER_ISA_CLONES void tile_sums_rows(const S* __restrict g, const S* __restrict x,
                                        const acc_t<S>* __restrict dzacc, int64_t ld,
                                        int64_t ldacc, const acc_t<S>* __restrict mean,
                                        int64_t rows, int64_t L, S* __restrict dz,
                                        acc_t<S>* __restrict sums) {
  using A = acc_t<S>;
  for (int64_t r = 0; r < rows; ++r) {
    const S* __restrict gr = g + r * ld;
    const S* __restrict xr = x + r * ld;
    const A* __restrict zr = dzacc + r * ldacc;
    S* __restrict dzr = dz + r * ld;
    const A m = mean[r];
    A sg[kLanes] = {}, sgx[kLanes] = {}, sd[kLanes] = {}, sdx[kLanes] = {};
    int64_t i = 0;
    for (; i + kLanes <= L; i += kLanes)
      for (int64_t q = 0; q < kLanes; ++q) {
        const A gv = to_acc(gr[i + q]);
        const A xc = to_acc(xr[i + q]) - m;
        const S dzs = from_acc<S>(zr[i + q]);
        const A dv = to_acc(dzs);
        dzr[i + q] = dzs;
        sg[q] += gv;
        sgx[q] += gv * xc;
        sd[q] += dv;
        sdx[q] += dv * xc;
      }
    for (; i < L; ++i) {
      const A gv = to_acc(gr[i]);
      const A xc = to_acc(xr[i]) - m;
      const S dzs = from_acc<S>(zr[i]);
      const A dv = to_acc(dzs);
      dzr[i] = dzs;
      const int64_t q = i % kLanes;
      sg[q] += gv;
      sgx[q] += gv * xc;
      sd[q] += dv;
      sdx[q] += dv * xc;
    }
    sums[0 * rows + r] = sum_lanes(sg);
    sums[1 * rows + r] = sum_lanes(sgx);
    sums[2 * rows + r] = sum_lanes(sd);
    sums[3 * rows + r] = sum_lanes(sdx);
  }
}

template <typename S>
RIFORMER_ISA_CLONES void tile_sums_cols(const S* __restrict g, const S* __restrict x,
                                        const acc_t<S>* __restrict dzacc,
                                        const acc_t<S>* __restrict mean, int64_t L, int64_t C,
                                        S* __restrict dz, acc_t<S>* __restrict sums) {
  using A = acc_t<S>;
  A* __restrict sg = sums;
  A* __restrict sgx = sums + C;
  A* __restrict sd = sums + 2 * C;
  A* __restrict sdx = sums + 3 * C;
  for (int64_t c = 0; c < 4 * C; ++c) sums[c] = 0;
  for (int64_t j = 0; j < L; ++j)
    for (int64_t c = 0; c < C; ++c) {
      const int64_t e = j * C + c;
      const A gv = to_acc(g[e]);
      const A xc = to_acc(x[e]) - mean[c];
      const S dzs = from_acc<S>(dzacc[e]);
      const A dv = to_acc(dzs);
      dz[e] = dzs;
      sg[c] += gv;
      sgx[c] += gv * xc;
      sd[c] += dv;
      sdx[c] += dv * xc;
    }
}

// From GH = G H^T of a tile ([C, Hd]): dW2 += l2 (.) GH (row-scaled) and
// sum_t g o = sum_h W2[c, h] GH[c, h] + b2_c sum_t g. Using G rather than
// dO = l2 G keeps sum g o exact where a drop-path factor zeroes l2.
template <typename S>
RIFORMER_ISA_CLONES void weight2_grad(const acc_t<S>* __restrict gh, const S* __restrict w2,
                                      const acc_t<S>* __restrict l2,
                                      const acc_t<S>* __restrict b2,
                                      const acc_t<S>* __restrict sg, int64_t C, int64_t Hd,
                                      acc_t<S>* __restrict dw2, acc_t<S>* __restrict sgo) {
  using A = acc_t<S>;
  for (int64_t c = 0; c < C; ++c) {
    const A* __restrict ghr = gh + c * Hd;
    const S* __restrict wr = w2 + c * Hd;
    A* __restrict dwr = dw2 + c * Hd;
    const A lc = l2[c];
    A lane[kLanes] = {};
    int64_t i = 0;
    for (; i + kLanes <= Hd; i += kLanes)
      for (int64_t q = 0; q < kLanes; ++q) {
        dwr[i + q] += lc * ghr[i + q];
        lane[q] += to_acc(wr[i + q]) * ghr[i + q];
      }
    for (; i < Hd; ++i) {
      dwr[i] += lc * ghr[i];
      lane[i % kLanes] += to_acc(wr[i]) * ghr[i];
    }
    sgo[c] = sum_lanes(lane) + b2[c] * sg[c];
  }
}

// dst[c, r] = src[r, c] for a [rows, cols] block (row strides lds, ldd): the
// GEMMs take no transposed operands, so the kernels transpose the small ones
// (z and g tiles, C x L values) rather than the 4C x L hidden tiles.
template <typename S>
void transpose_block(const S* __restrict src, int64_t lds, int64_t rows, int64_t cols,
                     S* __restrict dst, int64_t ldd) {
  constexpr int64_t kB = 16;
  for (int64_t r0 = 0; r0 < rows; r0 += kB)
    for (int64_t c0 = 0; c0 < cols; c0 += kB) {
      const int64_t r1 = std::min(rows, r0 + kB), c1 = std::min(cols, c0 + kB);
      for (int64_t c = c0; c < c1; ++c)
        for (int64_t r = r0; r < r1; ++r) dst[c * ldd + r] = src[r * lds + c];
    }
}

// sum_t g (o + b2) per channel of a channel-major segment (o = W2 h before
// its bias, row stride ldo; g row stride ldg) ...
template <typename S>
RIFORMER_ISA_CLONES void sum_g_o_rows(const S* __restrict g, int64_t ldg,
                                      const acc_t<S>* __restrict o, int64_t ldo,
                                      const acc_t<S>* __restrict b2, int64_t rows, int64_t L,
                                      acc_t<S>* __restrict sgo) {
  using A = acc_t<S>;
  for (int64_t r = 0; r < rows; ++r) {
    const S* __restrict gr = g + r * ldg;
    const A* __restrict orow = o + r * ldo;
    const A br = b2[r];
    A lane[kLanes] = {};
    int64_t i = 0;
    for (; i + kLanes <= L; i += kLanes)
      for (int64_t q = 0; q < kLanes; ++q) lane[q] += to_acc(gr[i + q]) * (orow[i + q] + br);
    for (; i < L; ++i) lane[i % kLanes] += to_acc(gr[i]) * (orow[i] + br);
    sgo[r] = sum_lanes(lane);
  }
}

// ... and of a token-major one ([L, C], both row stride C).
template <typename S>
RIFORMER_ISA_CLONES void sum_g_o_cols(const S* __restrict g, const acc_t<S>* __restrict o,
                                      const acc_t<S>* __restrict b2, int64_t L, int64_t C,
                                      acc_t<S>* __restrict sgo) {
  for (int64_t c = 0; c < C; ++c) sgo[c] = 0;
  for (int64_t j = 0; j < L; ++j)
    for (int64_t c = 0; c < C; ++c) sgo[c] += to_acc(g[j * C + c]) * (o[j * C + c] + b2[c]);
}

// weight2_grad for the transposed product GHT = (G H^T)^T, [Hd, C] (NCHW):
// dW2T[h, c] += l2_c GHT[h, c]; sgo[c] = sum_h W2T[h, c] GHT[h, c] + b2_c sg_c.
template <typename S>
RIFORMER_ISA_CLONES void weight2_grad_t(const acc_t<S>* __restrict ght,
                                        const S* __restrict w2t,
                                        const acc_t<S>* __restrict l2,
                                        const acc_t<S>* __restrict b2,
                                        const acc_t<S>* __restrict sg, int64_t C, int64_t Hd,
                                        acc_t<S>* __restrict dw2t, acc_t<S>* __restrict sgo) {
  for (int64_t c = 0; c < C; ++c) sgo[c] = 0;
  for (int64_t h = 0; h < Hd; ++h) {
    const acc_t<S>* __restrict gr = ght + h * C;
    const S* __restrict wr = w2t + h * C;
    acc_t<S>* __restrict dr = dw2t + h * C;
    for (int64_t c = 0; c < C; ++c) {
      dr[c] += l2[c] * gr[c];
      sgo[c] += to_acc(wr[c]) * gr[c];
    }
  }
  for (int64_t c = 0; c < C; ++c) sgo[c] += b2[c] * sg[c];
}

// Phase 2: dx = P g + Q dz + R (x - m) + S for `rows` channel rows of length
// L (one sample, NCHW) ...
template <typename S>
RIFORMER_ISA_CLONES void input_grad_rows(const S* __restrict g, const S* __restrict dz,
                                         const S* __restrict x, const acc_t<S>* __restrict m,
                                         const acc_t<S>* __restrict P,
                                         const acc_t<S>* __restrict Q,
                                         const acc_t<S>* __restrict R,
                                         const acc_t<S>* __restrict Sc, int64_t rows,
                                         int64_t L, S* __restrict dx) {
  for (int64_t r = 0; r < rows; ++r) {
    const acc_t<S> p = P[r], q = Q[r], rr = R[r], s = Sc[r], mr = m[r];
    const int64_t o = r * L;
    for (int64_t j = 0; j < L; ++j)
      dx[o + j] = from_acc<S>(block_input_grad(p, q, rr, s, to_acc(g[o + j]),
                                               to_acc(dz[o + j]), to_acc(x[o + j]) - mr));
  }
}

// ... and for L tokens of C channels (channels_last).
template <typename S>
RIFORMER_ISA_CLONES void input_grad_cols(const S* __restrict g, const S* __restrict dz,
                                         const S* __restrict x, const acc_t<S>* __restrict m,
                                         const acc_t<S>* __restrict P,
                                         const acc_t<S>* __restrict Q,
                                         const acc_t<S>* __restrict R,
                                         const acc_t<S>* __restrict Sc, int64_t L, int64_t C,
                                         S* __restrict dx) {
  for (int64_t j = 0; j < L; ++j)
    for (int64_t c = 0; c < C; ++c) {
      const int64_t e = j * C + c;
      dx[e] = from_acc<S>(block_input_grad(P[c], Q[c], R[c], Sc[c], to_acc(g[e]),
                                           to_acc(dz[e]), to_acc(x[e]) - m[c]));
    }
}

// ---------------------------------------------------------------------------
// Tile GEMMs, one definition for both layouts. A tile buffer of `rows`
// channels (C or Hd) and L tokens is [rows, L] channel-major (NCHW) or
// [L, rows] token-major (channels_last), and the two layouts run the same
// products, transposed: channel-major Y[M, L] = Wm[M, K] X[K, L], token-major
// Y[L, M] = X[L, K] Wm^T[K, M]. So each product of the kernels is written once,
// given Wm and its transposed copy WmT (the one token-major GEMMs read).
// ---------------------------------------------------------------------------
template <typename S, typename Acc>
void tile_gemm(bool cl, int64_t L, int64_t M, int64_t K, const S* Wm, const S* WmT,
               const S* X, Acc* Y) {
  if (!cl)
    blas::gemm_nn(M, L, K, Wm, K, X, L, Y, L, false);
  else
    blas::gemm_nn(L, M, K, X, K, WmT, M, Y, M, false);
}

// Weight-gradient accumulation over a tile's tokens, G += P Q^T, for a tile
// buffer P of M channels and the transposed copy QT of one of N channels
// (tile_transpose). G is kept in the orientation the layout's GEMM produces:
// [M, N] channel-major, [N, M] token-major.
template <typename S, typename Acc>
void tile_weight_grad(bool cl, int64_t L, int64_t M, int64_t N, const S* P, const S* QT,
                      Acc* G) {
  if (!cl)
    blas::gemm_nn(M, N, L, P, L, QT, N, G, N, true);
  else
    blas::gemm_nn(N, M, L, QT, L, P, M, G, M, true);
}

// The transposed copy of a tile buffer of `rows` channels ([L, rows] from
// [rows, L] channel-major; [rows, L] from [L, rows] token-major).
template <typename S>
void tile_transpose(bool cl, int64_t L, int64_t rows, const S* src, S* dst) {
  if (!cl)
    transpose_block<S>(src, L, rows, L, dst, rows);
  else
    transpose_block<S>(src, rows, L, rows, dst, L);
}

// ---------------------------------------------------------------------------
// Argument checks and preparation
// ---------------------------------------------------------------------------

// Whether x is read as channels_last; NCHW wins where both hold (C == 1 or
// H * W == 1, where the two orders are the same memory).
bool is_channels_last(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.dim() == 4, "riformer::", op, ": expected a 4-D (N, C, H, W) input, got ",
              x.sizes());
  TORCH_CHECK(x.device().is_cpu(), "riformer::", op, ": expected a CPU tensor, got ", x.device());
  if (x.is_contiguous()) return false;
  TORCH_CHECK(x.is_contiguous(at::MemoryFormat::ChannelsLast), "riformer::", op,
              ": x must be contiguous in NCHW or channels_last order (got strides ",
              x.strides(), ")");
  return true;
}

at::MemoryFormat format_of(bool channels_last) {
  return channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

void check_like(const at::Tensor& t, const at::Tensor& x, bool channels_last, const char* name,
                const char* op) {
  TORCH_CHECK(t.sizes() == x.sizes(), "riformer::", op, ": ", name, " has shape ", t.sizes(),
              ", expected ", x.sizes());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), "riformer::", op, ": ", name, " has dtype ",
              t.scalar_type(), ", expected ", x.scalar_type());
  TORCH_CHECK(t.is_contiguous(format_of(channels_last)), "riformer::", op, ": ", name,
              " must have x's memory format (",
              channels_last ? "channels_last" : "contiguous NCHW", ")");
}

// Per-(n, c) coefficients as a contiguous (N, C) tensor in the accumulation dtype.
at::Tensor coeff(const at::Tensor& t, int64_t N, int64_t C, at::ScalarType acc, const char* name,
                 const char* op) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == N && t.size(1) == C, "riformer::", op, ": ", name,
              " must have shape (", N, ", ", C, "), got ", t.sizes());
  return t.to(acc).contiguous();
}

// A (Hd, C[, 1, 1]) weight as a contiguous matrix in x's dtype.
at::Tensor weight(const at::Tensor& w, int64_t rows, int64_t cols, at::ScalarType st,
                  const char* name, const char* op) {
  TORCH_CHECK(w.numel() == rows * cols && w.size(0) == rows, "riformer::", op, ": ", name,
              " must have shape (", rows, ", ", cols, ", 1, 1), got ", w.sizes());
  TORCH_CHECK(w.scalar_type() == st, "riformer::", op, ": ", name, " has dtype ",
              w.scalar_type(), ", expected the input's ", st);
  return w.contiguous().reshape({rows, cols});
}

at::Tensor vec(const at::Tensor& v, int64_t n, at::ScalarType acc, const char* name,
               const char* op) {
  TORCH_CHECK(v.dim() == 1 && v.size(0) == n, "riformer::", op, ": ", name, " must have shape (",
              n, "), got ", v.sizes());
  return v.to(acc).contiguous();
}

void check_blas(at::ScalarType st) {
  const bool ok = st == at::kFloat    ? blas::available_f32()
                  : st == at::kDouble ? blas::available_f64()
                                      : blas::available_bf16();
  TORCH_CHECK(ok, "riformer cpu kernels: this torch build does not export MKL's GEMM for ", st);
}

#define RIFORMER_DISPATCH_BLOCK_TYPES(st, name, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, st, name, __VA_ARGS__)

void check_block_dtype(at::ScalarType st, const char* op) {
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kBFloat16, "riformer::", op,
              ": supports float32, bfloat16 and float64 inputs, got ", st);
}

// ---------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------
struct ForwardArgs {
  at::Tensor x, A, B, a, b, w1, b1, w2, b2, l2;
  at::Tensor w1t, w2t;  // [C, Hd] and [Hd, C] copies, made where a layout needs them
  bool channels_last;
  int64_t N, C, T, Hd;
};

template <typename S>
void mlp_forward_kernel(const ForwardArgs& f, at::Tensor& out, bool emit_moments,
                        at::Tensor& out_mean, at::Tensor& out_var, at::Tensor* u_out) {
  using Acc = acc_t<S>;
  const int64_t N = f.N, C = f.C, T = f.T, Hd = f.Hd;
  const bool cl = f.channels_last;
  const Tiling tiling =
      make_tiling(N, T, Hd, env_int("RIFORMER_CPU_FWD_HIDDEN", kFwdHiddenElems),
                  env_int("RIFORMER_CPU_MIN_TOKENS", kMinTokens),
                  env_int("RIFORMER_CPU_SHORT_TOKENS", kShortTileTokens));
  const int64_t K = tiling.per_sample, W = tiling.width();

  const S* X = f.x.const_data_ptr<S>();
  S* OUT = out.mutable_data_ptr<S>();
  S* UOUT = u_out ? u_out->mutable_data_ptr<S>() : nullptr;
  const Acc *cA = f.A.const_data_ptr<Acc>(), *cB = f.B.const_data_ptr<Acc>();
  const Acc *ca = f.a.const_data_ptr<Acc>(), *cb = f.b.const_data_ptr<Acc>();
  const Acc* cl2 = f.l2.const_data_ptr<Acc>();
  const S* W1 = f.w1.const_data_ptr<S>();
  const S* W2 = f.w2.const_data_ptr<S>();
  const S* W1T = cl ? f.w1t.const_data_ptr<S>() : nullptr;
  const S* W2T = cl ? f.w2t.const_data_ptr<S>() : nullptr;
  const Acc* B1 = f.b1.const_data_ptr<Acc>();
  const Acc* B2 = f.b2.const_data_ptr<Acc>();

  // Partial moments of out per (sample, tile of the sample, channel), merged
  // below in tile order.
  std::vector<Acc> pmean(emit_moments ? N * K * C : 0), pm2(emit_moments ? N * K * C : 0);

  at::parallel_for(0, tiling.tasks(), 1, [&](int64_t begin, int64_t end) {
    blas::SingleThreadedBlas single_thread;
    S* Z = thread_scratch<S>(0, C * W);
    Acc* U = thread_scratch<Acc>(1, Hd * W);
    S* Hh = kSameType<S> ? reinterpret_cast<S*>(U) : thread_scratch<S>(2, Hd * W);
    Acc* O = thread_scratch<Acc>(3, C * W);
    Acc* moment_scratch = thread_scratch<Acc>(4, 3 * C);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t L = tiling.task_tokens(task);
      // NCHW: buffers are [rows, L] (row stride L); channels_last: [L, cols].
      tiling.for_each_segment(task, [&](int64_t n, int64_t, int64_t t0, int64_t len, int64_t col) {
        if (!cl)
          prologue_rows<S>(X + n * C * T + t0, T, cA + n * C, cB + n * C, C, len, Z + col, L);
        else
          prologue_cols<S>(X + (n * T + t0) * C, cA + n * C, cB + n * C, len, C, Z + col * C);
      });
      tile_gemm<S>(cl, L, Hd, C, W1, W1T, Z, U);  // u = W1 z
      if (!cl) {
        if (UOUT) {
          tiling.for_each_segment(task, [&](int64_t n, int64_t, int64_t t0, int64_t len,
                                            int64_t col) {
            for (int64_t h = 0; h < Hd; ++h)
              for (int64_t j = 0; j < len; ++j)
                UOUT[(n * Hd + h) * T + t0 + j] = from_acc<S>(U[h * L + col + j] + B1[h]);
          });
        }
        gelu_rows<S, false>(U, B1, Hd, L, Hh, nullptr, 0);
      } else {
        // channels_last: a tile's tokens are consecutive rows of u as well.
        int64_t row0 = -1;
        tiling.for_each_segment(task, [&](int64_t n, int64_t, int64_t t0, int64_t, int64_t col) {
          if (col == 0) row0 = n * T + t0;
        });
        if (UOUT)
          gelu_cols<S, true>(U, B1, L, Hd, Hh, UOUT + row0 * Hd);
        else
          gelu_cols<S, false>(U, B1, L, Hd, Hh, nullptr);
      }
      tile_gemm<S>(cl, L, C, Hd, W2, W2T, Hh, O);  // o = W2 h
      tiling.for_each_segment(task, [&](int64_t n, int64_t k, int64_t t0, int64_t len,
                                        int64_t col) {
        const int64_t nc = n * C;
        Acc* pmn = emit_moments ? pmean.data() + (n * K + k) * C : nullptr;
        Acc* pm2n = emit_moments ? pm2.data() + (n * K + k) * C : nullptr;
        if (!cl) {
          const int64_t off = n * C * T + t0;
          epilogue_rows<S>(X + off, T, ca + nc, cb + nc, cl2 + nc, B2, C, len, O + col, L,
                           OUT + off);
          if (emit_moments) row_moments<Acc>(O + col, L, C, len, pmn, pm2n);
        } else {
          const int64_t off = (n * T + t0) * C;
          epilogue_cols<S>(X + off, ca + nc, cb + nc, cl2 + nc, B2, len, C, O + col * C,
                           OUT + off);
          if (emit_moments) col_moments<Acc>(O + col * C, len, C, moment_scratch, pmn, pm2n);
        }
      });
    }
  });

  if (!emit_moments) return;
  Acc* MEAN = out_mean.mutable_data_ptr<Acc>();
  Acc* VAR = out_var.mutable_data_ptr<Acc>();
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < C; ++c) {
      Moments<Acc> acc = moments_empty<Acc>();
      for (int64_t k = 0; k < K; ++k) {
        const int64_t i = (n * K + k) * C + c;
        acc = chan_merge<Acc>(acc, Moments<Acc>{Acc(tiling.segment_tokens(k)), pmean[i], pm2[i]});
      }
      MEAN[n * C + c] = acc.mean;
      VAR[n * C + c] = population_var<Acc>(acc);
    }
}

ForwardArgs forward_args(const at::Tensor& x, const at::Tensor& A, const at::Tensor& B,
                         const at::Tensor& a, const at::Tensor& b, const at::Tensor& w1,
                         const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2,
                         const at::Tensor& l2, const char* op) {
  ForwardArgs f;
  f.channels_last = is_channels_last(x, op);
  check_block_dtype(x.scalar_type(), op);
  check_blas(x.scalar_type());
  f.x = x;
  f.N = x.size(0);
  f.C = x.size(1);
  f.T = x.size(2) * x.size(3);
  TORCH_CHECK(f.T > 0, "riformer::", op, ": H*W must be positive, got ", x.sizes());
  f.Hd = w1.size(0);
  const auto st = x.scalar_type();
  const auto acc = st == at::kDouble ? at::kDouble : at::kFloat;
  f.A = coeff(A, f.N, f.C, acc, "A", op);
  f.B = coeff(B, f.N, f.C, acc, "B", op);
  f.a = coeff(a, f.N, f.C, acc, "a", op);
  f.b = coeff(b, f.N, f.C, acc, "b", op);
  f.l2 = coeff(l2, f.N, f.C, acc, "l2", op);
  f.w1 = weight(w1, f.Hd, f.C, st, "w1", op);
  f.w2 = weight(w2, f.C, f.Hd, st, "w2", op);
  TORCH_CHECK(w2.size(0) == f.C, "riformer::", op, ": w2 must have ", f.C, " rows");
  f.b1 = vec(b1, f.Hd, acc, "b1", op);
  f.b2 = vec(b2, f.C, acc, "b2", op);
  return f;
}

void add_transposed_weights(ForwardArgs& f) {
  f.w1t = f.w1.t().contiguous();
  f.w2t = f.w2.t().contiguous();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> mlp_forward_common(
    ForwardArgs& f, bool emit_moments, bool save_u) {
  if (f.channels_last) add_transposed_weights(f);
  const auto st = f.x.scalar_type();
  const auto acc = st == at::kDouble ? at::kDouble : at::kFloat;
  const auto fmt = format_of(f.channels_last);
  at::Tensor out = at::empty(f.x.sizes(), f.x.options().memory_format(fmt));
  at::Tensor mean = at::empty({emit_moments ? f.N : 0, f.C}, f.x.options().dtype(acc));
  at::Tensor var = at::empty({emit_moments ? f.N : 0, f.C}, f.x.options().dtype(acc));
  at::Tensor u = at::empty({save_u ? f.N : 0, f.Hd, f.x.size(2), f.x.size(3)},
                           f.x.options().memory_format(fmt));
  poison(out);
  poison(mean);
  poison(var);
  poison(u);
  if (f.N * f.C == 0) return {out, mean, var, u};
  RIFORMER_DISPATCH_BLOCK_TYPES(st, "riformer_mlp_forward_cpu", [&] {
    mlp_forward_kernel<scalar_t>(f, out, emit_moments, mean, var, save_u ? &u : nullptr);
  });
  return {out, mean, var, u};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> mlp_forward_cpu(
    const at::Tensor& x, const at::Tensor& A, const at::Tensor& B, const at::Tensor& a,
    const at::Tensor& b, const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
    const at::Tensor& b2, const at::Tensor& l2, bool emit_moments) {
  ForwardArgs f = forward_args(x, A, B, a, b, w1, b1, w2, b2, l2, "mlp_forward");
  auto [out, mean, var, u] = mlp_forward_common(f, emit_moments, false);
  return {out, mean, var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> mlp_forward_save_u_cpu(
    const at::Tensor& x, const at::Tensor& A, const at::Tensor& B, const at::Tensor& a,
    const at::Tensor& b, const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
    const at::Tensor& b2, const at::Tensor& l2, bool emit_moments) {
  ForwardArgs f = forward_args(x, A, B, a, b, w1, b1, w2, b2, l2, "mlp_forward_save_u");
  return mlp_forward_common(f, emit_moments, true);
}

// ---------------------------------------------------------------------------
// Backward phase 1
// ---------------------------------------------------------------------------

// Weight-gradient accumulators live per GROUP of consecutive tiles; the
// group count depends on the shape only, capped so their memory stays small.
constexpr int64_t kMaxGroups = 16;
constexpr int64_t kGroupBudgetBytes = 32ll << 20;

template <typename S>
void mlp_backward_kernel(const ForwardArgs& f, const at::Tensor& g, const at::Tensor& mean_t,
                         const at::Tensor* u_saved, at::Tensor& dz, at::Tensor& dw1,
                         at::Tensor& db1, at::Tensor& dw2, at::Tensor& db2, at::Tensor& sums) {
  using Acc = acc_t<S>;
  const int64_t N = f.N, C = f.C, T = f.T, Hd = f.Hd;
  const bool cl = f.channels_last;
  const Tiling tiling =
      make_tiling(N, T, Hd, env_int("RIFORMER_CPU_BWD_HIDDEN", kBwdHiddenElems),
                  env_int("RIFORMER_CPU_MIN_TOKENS", kMinTokens),
                  env_int("RIFORMER_CPU_SHORT_TOKENS", kShortTileTokens));
  const int64_t K = tiling.per_sample, W = tiling.width();
  const int64_t tasks = tiling.tasks();
  // dW2 and sum g o, two routes. Per segment GH = G H^T, from which both
  // follow with one C x 4C elementwise pass (5 GEMMs per tile in all with
  // recompute); or dW2 += dO H^T over the whole tile and o = W2 h by one more
  // GEMM, sum g o from o (6 GEMMs). The pass costs about a GEMM over ~100
  // tokens, so the GEMM route wins for samples shorter than that (measured,
  // 1 thread: C512@7x7 backward 33 -> 29 ms; C320@14x14 39 vs 43 ms the
  // other way).
  const bool weight2_by_gemm = T < kWeight2GemmBelowTokens;
  const int64_t group_bytes = (2 * Hd * C + Hd) * int64_t(sizeof(Acc));
  const int64_t groups = std::max<int64_t>(
      1, std::min({tasks, kMaxGroups, kGroupBudgetBytes / std::max<int64_t>(group_bytes, 1)}));

  const S* X = f.x.const_data_ptr<S>();
  const S* G = g.const_data_ptr<S>();
  const S* US = u_saved ? u_saved->const_data_ptr<S>() : nullptr;
  S* DZ = dz.mutable_data_ptr<S>();
  const Acc *cA = f.A.const_data_ptr<Acc>(), *cB = f.B.const_data_ptr<Acc>();
  const Acc* cl2 = f.l2.const_data_ptr<Acc>();
  const Acc* MEAN = mean_t.const_data_ptr<Acc>();
  const S* W1 = f.w1.const_data_ptr<S>();
  const S* W2 = f.w2.const_data_ptr<S>();
  const S* W1T = f.w1t.const_data_ptr<S>();
  const S* W2T = f.w2t.const_data_ptr<S>();
  const Acc* B1 = f.b1.const_data_ptr<Acc>();
  const Acc* B2 = f.b2.const_data_ptr<Acc>();

  // Group accumulators of the weight gradients, kept in the orientation the
  // layout's GEMMs produce: NCHW dW1 [Hd, C] and dW2^T [Hd, C]; channels_last
  // dW1^T [C, Hd] and dW2 [C, Hd]. The final merge writes dw1 [Hd, C], dw2 [C, Hd].
  // On the calling thread (slots 8..11 of its scratch; workers use 0..7).
  Acc* gw1 = thread_scratch<Acc>(8, groups * Hd * C);
  Acc* gw2 = thread_scratch<Acc>(9, groups * C * Hd);
  Acc* gb1 = thread_scratch<Acc>(10, groups * Hd);
  // Per (sample, tile of the sample): [SG, SGx, Sdz, Sdzx, SGo] x C.
  Acc* tsum = thread_scratch<Acc>(11, N * K * 5 * C);

  at::parallel_for(0, groups, 1, [&](int64_t gbegin, int64_t gend) {
    blas::SingleThreadedBlas single_thread;
    // Slots 0..7 serve the worker buffers; several roles share a slot where
    // one buffer holds [C, W] values and the other is carved after it.
    S* Z = thread_scratch<S>(0, 4 * C * W);
    S* ZT = Z + C * W;      // z transposed (the dW1 GEMM's operand)
    S* GT = ZT + C * W;     // a segment of g transposed (the G H^T GEMM's operand)
    S* DOT = GT + C * W;    // dO transposed (weight2_by_gemm)
    S* DO = thread_scratch<S>(1, C * W);
    Acc* U = thread_scratch<Acc>(2, Hd * W);  // u, then GELU'(u)
    Acc* DH = thread_scratch<Acc>(3, Hd * W);
    Acc* GH = thread_scratch<Acc>(4, C * Hd);
    Acc* DZT = thread_scratch<Acc>(5, 2 * C * W);
    Acc* O = DZT + C * W;   // W2 h without bias (weight2_by_gemm)
    S* Hh = thread_scratch<S>(6, Hd * W);
    S* DU = kSameType<S> ? reinterpret_cast<S*>(DH) : thread_scratch<S>(7, Hd * W);
    for (int64_t grp = gbegin; grp < gend; ++grp) {
      Acc* dW1 = gw1 + grp * Hd * C;
      Acc* dW2 = gw2 + grp * C * Hd;
      Acc* dB1 = gb1 + grp * Hd;
      std::fill(dW1, dW1 + Hd * C, Acc(0));
      std::fill(dW2, dW2 + C * Hd, Acc(0));
      std::fill(dB1, dB1 + Hd, Acc(0));
      const int64_t tbegin = grp * tasks / groups, tend = (grp + 1) * tasks / groups;
      for (int64_t task = tbegin; task < tend; ++task) {
        const int64_t L = tiling.task_tokens(task);
        // z = A x + B and dO = l2 g per segment; u (recomputed or read) per tile.
        tiling.for_each_segment(task, [&](int64_t n, int64_t, int64_t t0, int64_t len,
                                          int64_t col) {
          const int64_t nc = n * C;
          if (!cl) {
            const int64_t off = n * C * T + t0;
            prologue_rows<S>(X + off, T, cA + nc, cB + nc, C, len, Z + col, L);
            scale_rows<S>(G + off, T, cl2 + nc, C, len, DO + col, L);
            if (US) {
              gelu_grad_from_saved<S>(US + n * Hd * T + t0, T, Hd, len, Hh + col, U + col, L);
            }
          } else {
            const int64_t off = (n * T + t0) * C;
            prologue_cols<S>(X + off, cA + nc, cB + nc, len, C, Z + col * C);
            scale_cols<S>(G + off, cl2 + nc, len, C, DO + col * C);
            if (US) {
              gelu_grad_from_saved<S>(US + (n * T + t0) * Hd, Hd, len, Hd, Hh + col * Hd,
                                      U + col * Hd, Hd);
            }
          }
        });
        // The tile's GEMMs (tile_gemm: channel-major Y = Wm X, token-major its
        // transpose); dW1 and dW2 accumulate in the orientation the layout's GEMM
        // produces: NCHW dW1 [Hd, C] and dW2^T [Hd, C], channels_last dW1^T and dW2.
        tile_transpose<S>(cl, L, C, Z, ZT);
        if (!US) {
          tile_gemm<S>(cl, L, Hd, C, W1, W1T, Z, U);  // u = W1 z
          if (!cl)
            gelu_grad_rows_inplace<S>(U, B1, Hd, L, Hh);
          else
            gelu_grad_cols_inplace<S>(U, B1, L, Hd, Hh);
        }
        tile_gemm<S>(cl, L, Hd, C, W2T, W2, DO, DH);  // dh = W2^T dO
        if (!cl)
          hidden_grad_rows<S>(DH, U, Hd, L, DU, dB1);
        else
          hidden_grad_cols<S>(DH, U, L, Hd, DU, dB1);
        tile_weight_grad<S>(cl, L, Hd, C, DU, ZT, dW1);  // dW1 += dU z^T
        tile_gemm<S>(cl, L, C, Hd, W1T, W1, DU, DZT);    // dz = W1^T dU
        if (weight2_by_gemm) {
          tile_transpose<S>(cl, L, C, DO, DOT);
          tile_weight_grad<S>(cl, L, Hd, C, Hh, DOT, dW2);  // dW2^T += h dO^T
          tile_gemm<S>(cl, L, C, Hd, W2, W2T, Hh, O);       // o = W2 h
        }
        // Per segment: dz out, the per-(n, c) sums, and GH = G H^T (per sample,
        // since l2 and sum g o are per sample) -> dW2 and sum g o.
        tiling.for_each_segment(task, [&](int64_t n, int64_t k, int64_t t0, int64_t len,
                                          int64_t col) {
          const int64_t nc = n * C;
          Acc* ts = tsum + (n * K + k) * 5 * C;
          if (!cl) {
            const int64_t off = n * C * T + t0;
            tile_sums_rows<S>(G + off, X + off, DZT + col, T, L, MEAN + nc, C, len, DZ + off,
                              ts);
            if (weight2_by_gemm) {
              sum_g_o_rows<S>(G + off, T, O + col, L, B2, C, len, ts + 4 * C);
              return;
            }
            // GH^T[Hd, C] = H[Hd, len] G^T[len, C]
            transpose_block<S>(G + off, T, C, len, GT, C);
            blas::gemm_nn(Hd, C, len, Hh + col, L, GT, C, GH, C, false);
            weight2_grad_t<S>(GH, W2T, cl2 + nc, B2, ts, C, Hd, dW2, ts + 4 * C);
          } else {
            const int64_t off = (n * T + t0) * C;
            tile_sums_cols<S>(G + off, X + off, DZT + col * C, MEAN + nc, len, C, DZ + off, ts);
            if (weight2_by_gemm) {
              sum_g_o_cols<S>(G + off, O + col * C, B2, len, C, ts + 4 * C);
              return;
            }
            // GH[C, Hd] = G^T[C, len] H[len, Hd]
            transpose_block<S>(G + off, C, len, C, GT, len);
            blas::gemm_nn(C, Hd, len, GT, len, Hh + col * Hd, Hd, GH, Hd, false);
            weight2_grad<S>(GH, W2, cl2 + nc, B2, ts, C, Hd, dW2, ts + 4 * C);
          }
        });
      }
    }
  });

  // Fixed-order merges.
  Acc* DW1 = dw1.mutable_data_ptr<Acc>();
  Acc* DW2 = dw2.mutable_data_ptr<Acc>();
  Acc* DB1 = db1.mutable_data_ptr<Acc>();
  Acc* DB2 = db2.mutable_data_ptr<Acc>();
  Acc* SUMS = sums.mutable_data_ptr<Acc>();
  const int64_t wsize = Hd * C;
  // Sum the groups in group order (into group 0), then write dw1 [Hd, C] and
  // dw2 [C, Hd], transposing (blockwise) the accumulators that the layout's
  // GEMMs produced the other way round: NCHW dW2^T [Hd, C], channels_last
  // dW1^T [C, Hd].
  at::parallel_for(0, wsize, 16384, [&](int64_t b, int64_t e) {
    for (int64_t grp = 1; grp < groups; ++grp) {
      const Acc* g1 = gw1 + grp * wsize;
      const Acc* g2 = gw2 + grp * wsize;
      for (int64_t i = b; i < e; ++i) {
        gw1[i] += g1[i];
        gw2[i] += g2[i];
      }
    }
  });
  if (!cl) {
    std::copy(gw1, gw1 + wsize, DW1);
    transpose_block<Acc>(gw2, C, Hd, C, DW2, Hd);
  } else {
    transpose_block<Acc>(gw1, Hd, C, Hd, DW1, C);
    std::copy(gw2, gw2 + wsize, DW2);
  }
  for (int64_t h = 0; h < Hd; ++h) {
    Acc s = gb1[h];
    for (int64_t grp = 1; grp < groups; ++grp) s += gb1[grp * Hd + h];
    DB1[h] = s;
  }
  for (int64_t n = 0; n < N; ++n)
    for (int64_t q = 0; q < 5; ++q)
      for (int64_t c = 0; c < C; ++c) {
        Acc s = 0;
        for (int64_t k = 0; k < K; ++k) s += tsum[((n * K + k) * 5 + q) * C + c];
        SUMS[(q * N + n) * C + c] = s;
      }
  for (int64_t c = 0; c < C; ++c) {
    Acc s = 0;
    for (int64_t n = 0; n < N; ++n) s += cl2[n * C + c] * SUMS[n * C + c];
    DB2[c] = s;
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
mlp_backward_cpu(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& mean,
                 const at::Tensor& A, const at::Tensor& B, const at::Tensor& w1,
                 const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2,
                 const at::Tensor& l2, const std::optional<at::Tensor>& u_saved) {
  const char* op = "mlp_backward";
  // a and b do not enter phase 1; A stands in for them in the shared checks.
  ForwardArgs f = forward_args(x, A, B, A, A, w1, b1, w2, b2, l2, op);
  add_transposed_weights(f);
  check_like(grad_out, x, f.channels_last, "grad_out", op);
  const auto st = x.scalar_type();
  const auto acc = st == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor m = coeff(mean, f.N, f.C, acc, "mean", op);
  const at::Tensor* us = nullptr;
  if (u_saved.has_value() && u_saved->defined()) {
    TORCH_CHECK(u_saved->dim() == 4 && u_saved->size(0) == f.N && u_saved->size(1) == f.Hd &&
                    u_saved->size(2) == x.size(2) && u_saved->size(3) == x.size(3),
                "riformer::mlp_backward: u_saved must have shape (N, 4C, H, W) = (", f.N, ", ",
                f.Hd, ", ", x.size(2), ", ", x.size(3), "), got ", u_saved->sizes());
    TORCH_CHECK(u_saved->scalar_type() == st, "riformer::mlp_backward: u_saved has dtype ",
                u_saved->scalar_type(), ", expected ", st);
    TORCH_CHECK(u_saved->is_contiguous(format_of(f.channels_last)),
                "riformer::mlp_backward: u_saved must have x's memory format");
    us = &*u_saved;
  }
  const auto opts = x.options().dtype(acc);
  at::Tensor dz = at::empty(x.sizes(), x.options().memory_format(format_of(f.channels_last)));
  at::Tensor dw1 = at::empty({f.Hd, f.C}, opts);
  at::Tensor db1 = at::empty({f.Hd}, opts);
  at::Tensor dw2 = at::empty({f.C, f.Hd}, opts);
  at::Tensor db2 = at::empty({f.C}, opts);
  at::Tensor sums = at::empty({5, f.N, f.C}, opts);
  for (at::Tensor* t : {&dz, &dw1, &db1, &dw2, &db2, &sums}) poison(*t);
  if (f.N * f.C == 0) {
    for (at::Tensor* t : {&dw1, &db1, &dw2, &db2, &sums}) t->zero_();
    return {dz, dw1, db1, dw2, db2, sums};
  }
  RIFORMER_DISPATCH_BLOCK_TYPES(st, "riformer_mlp_backward_cpu", [&] {
    mlp_backward_kernel<scalar_t>(f, grad_out, m, us, dz, dw1, db1, dw2, db2, sums);
  });
  return {dz, dw1, db1, dw2, db2, sums};
}

// ---------------------------------------------------------------------------
// Backward phase 2
// ---------------------------------------------------------------------------
at::Tensor input_grad_cpu(const at::Tensor& grad_out, const at::Tensor& dz, const at::Tensor& x,
                          const at::Tensor& mean, const at::Tensor& P, const at::Tensor& Q,
                          const at::Tensor& R, const at::Tensor& S) {
  const char* op = "input_grad";
  const bool cl = is_channels_last(x, op);
  const auto st = x.scalar_type();
  check_block_dtype(st, op);
  check_like(grad_out, x, cl, "grad_out", op);
  check_like(dz, x, cl, "dz", op);
  const int64_t N = x.size(0), C = x.size(1), T = x.size(2) * x.size(3);
  const auto acc = st == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor m = coeff(mean, N, C, acc, "mean", op), p = coeff(P, N, C, acc, "P", op),
             q = coeff(Q, N, C, acc, "Q", op), r = coeff(R, N, C, acc, "R", op),
             s = coeff(S, N, C, acc, "S", op);
  at::Tensor dx = at::empty(x.sizes(), x.options().memory_format(format_of(cl)));
  poison(dx);
  if (dx.numel() == 0) return dx;
  RIFORMER_DISPATCH_BLOCK_TYPES(st, "riformer_input_grad_cpu", [&] {
    using Acc = acc_t<scalar_t>;
    const scalar_t *G = grad_out.const_data_ptr<scalar_t>(), *D = dz.const_data_ptr<scalar_t>(),
                   *X = x.const_data_ptr<scalar_t>();
    scalar_t* DX = dx.mutable_data_ptr<scalar_t>();
    const Acc *M = m.const_data_ptr<Acc>(), *PP = p.const_data_ptr<Acc>(),
              *QQ = q.const_data_ptr<Acc>(), *RR = r.const_data_ptr<Acc>(),
              *SS = s.const_data_ptr<Acc>();
    // Chunks of about 16K elements, fixed by the shape.
    if (!cl) {
      const int64_t rows_per = std::max<int64_t>(1, 16384 / T);
      const int64_t chunks = (N * C + rows_per - 1) / rows_per;
      at::parallel_for(0, chunks, 1, [&](int64_t b, int64_t e) {
        for (int64_t ch = b; ch < e; ++ch) {
          const int64_t r0 = ch * rows_per, r1 = std::min(N * C, r0 + rows_per);
          // rows r0..r1 may span samples: coefficients are indexed by row = n * C + c.
          const int64_t o = r0 * T;
          input_grad_rows<scalar_t>(G + o, D + o, X + o, M + r0, PP + r0, QQ + r0, RR + r0,
                                    SS + r0, r1 - r0, T, DX + o);
        }
      });
    } else {
      const int64_t tok_per = std::max<int64_t>(1, 16384 / C);
      const int64_t per_sample = (T + tok_per - 1) / tok_per;
      at::parallel_for(0, N * per_sample, 1, [&](int64_t b, int64_t e) {
        for (int64_t ch = b; ch < e; ++ch) {
          const int64_t n = ch / per_sample, t0 = (ch % per_sample) * tok_per;
          const int64_t L = std::min(tok_per, T - t0);
          const int64_t o = (n * T + t0) * C;
          input_grad_cols<scalar_t>(G + o, D + o, X + o, M + n * C, PP + n * C, QQ + n * C,
                                    RR + n * C, SS + n * C, L, C, DX + o);
        }
      });
    }
  });
  return dx;
}

}  // namespace

TORCH_LIBRARY_IMPL(riformer, CPU, m) {
  m.impl("mlp_forward", &mlp_forward_cpu);
  m.impl("mlp_forward_save_u", &mlp_forward_save_u_cpu);
  m.impl("mlp_backward", &mlp_backward_cpu);
  m.impl("input_grad", &input_grad_cpu);
}

}  // namespace riformer
