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
// GEMMs: through blas.h on the tile buffers (fp32: oneDNN brgemm at the
// avx512 level, MKL sgemm below it; fp64 dgemm; bf16 x bf16 -> fp32 for
// bf16). Elementwise work is plain loops the compiler vectorises. The tile
// code (block_mlp_tiles.h) is compiled once per ISA level and each call runs
// the copy of the active level (isa.h), so one portable binary runs AVX-512 /
// AVX2 code where the CPU has it and the level can be capped for testing.
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
#include "isa.h"
#include "reductions.h"

namespace riformer {
namespace {


// ---------------------------------------------------------------------------
// Storage types. S = the activation / weight dtype; acc_t<S> = the arithmetic
// and GEMM-output type (fp32 for fp32 and bf16, fp64 for fp64). One mixed
// pair besides: fp32 activations with bf16 weights (mixed_precision below).
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

// v in type D: the same value where D is v's type, else rounded through the
// accumulation type (fp32 -> bf16 for the mixed instantiation's g tiles).
template <typename D, typename S>
RIFORMER_INLINE D convert_to(S v) {
  if constexpr (std::is_same_v<D, S>)
    return v;
  else
    return from_acc<D>(to_acc(v));
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
  // for_each_segment with the samples of a multi-sample tile in parallel when
  // `parallel` (a tile running on the calling thread: for_each_task with one
  // task). Only for bodies whose writes are disjoint per segment; the result
  // is the same either way.
  template <typename F>
  void for_each_segment_parallel(int64_t task, bool parallel, const F& f) const {
    if (!parallel || samples <= 1) {
      for_each_segment(task, f);
      return;
    }
    const int64_t n0 = task * samples, n1 = std::min(N, n0 + samples);
    at::parallel_for(n0, n1, 1, [&](int64_t b, int64_t e) {
      for (int64_t n = b; n < e; ++n) f(n, int64_t(0), int64_t(0), T, (n - n0) * T);
    });
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

// Whole batches of short samples up to this many tokens go into ONE tile whose
// GEMMs run multi-threaded inside MKL (for_each_task), where the GEMM library
// threads (MKL: fp32 sgemm, fp64, bf16; not oneDNN's single-threaded brgemm).
// There the hidden (4C x N*T) is beyond L2 anyway, and the alternative, two
// half-batch tiles on two threads, runs every weight-sized GEMM at half the
// token count (MKL ~78 vs ~91 GFLOP/s per core at 196 vs 392 tokens, C=512)
// and keeps two copies of the weight-gradient accumulators to merge.
constexpr int64_t kWholeBatchTokens = 512;

Tiling make_tiling(int64_t N, int64_t T, int64_t hidden, int64_t budget, int64_t min_tokens,
                   int64_t short_tokens, int64_t whole_batch_tokens) {
  const int64_t target = std::max<int64_t>(
      min_tokens, (budget / std::max<int64_t>(hidden, 1)) / 16 * 16);
  if (T < short_tokens) {
    if (N * T <= whole_batch_tokens) return Tiling{T, 1, N, N, T};
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

// The whole-batch token limit for dtype S: 0 (never one tile) where the GEMM
// route cannot thread. RIFORMER_CPU_WHOLE_BATCH_TOKENS overrides (0 disables).
template <typename S>
int64_t whole_batch_tokens() {
  if (std::is_same_v<S, float> && blas::brgemm_f32_usable()) return 0;
  const char* v = std::getenv("RIFORMER_CPU_WHOLE_BATCH_TOKENS");
  if (v != nullptr && *v != '\0') return std::max<long long>(0, std::atoll(v));
  return kWholeBatchTokens;
}

// f(begin, end) over [0, count): split over the threads when `parallel` (the
// elementwise passes of a tile that runs on the calling thread), else one
// call. Every use writes disjoint outputs per index, so the split changes no
// result.
template <typename F>
void rows_maybe_parallel(bool parallel, int64_t count, const F& f) {
  if (parallel && count > 1)
    at::parallel_for(0, count, 8, f);
  else
    f(int64_t(0), count);
}

// Runs body(begin, end) over the tasks [0, count): in parallel, one task at a
// time per thread with single-threaded GEMMs; or, for a single task, on the
// calling thread with the GEMMs multi-threaded by MKL (called outside any
// parallel region, which would make MKL run on one thread).
template <typename F>
void for_each_task(int64_t count, const F& body) {
  if (count == 1) {
    body(int64_t(0), int64_t(1));
    return;
  }
  at::parallel_for(0, count, 1, [&](int64_t begin, int64_t end) {
    blas::SingleThreadedBlas single_thread;
    body(begin, end);
  });
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

// A (Hd, C[, 1, 1]) weight as a contiguous matrix in the GEMM dtype `gt`.
at::Tensor weight(const at::Tensor& w, int64_t rows, int64_t cols, at::ScalarType gt,
                  const char* name, const char* op) {
  TORCH_CHECK(w.numel() == rows * cols && w.size(0) == rows, "riformer::", op, ": ", name,
              " must have shape (", rows, ", ", cols, ", 1, 1), got ", w.sizes());
  TORCH_CHECK(w.scalar_type() == gt, "riformer::", op, ": ", name, " has dtype ",
              w.scalar_type(), ", expected w1's ", gt);
  return w.contiguous().reshape({rows, cols});
}

// The GEMM-operand dtype of a call: the weights' (w1's). Either the input's
// own dtype, or bfloat16 with a float32 input: the mixed-precision mode that
// autocast runs (x, out, g, dz, dx in fp32, the GEMM operands z, h, dO, du
// and the weights in bf16, fp32 accumulation), so the residual stream keeps
// fp32 as the reference under autocast does.
at::ScalarType gemm_type(const at::Tensor& x, const at::Tensor& w1, const char* op) {
  const auto st = x.scalar_type(), gt = w1.scalar_type();
  TORCH_CHECK(gt == st || (st == at::kFloat && gt == at::kBFloat16), "riformer::", op,
              ": w1 has dtype ", gt, "; expected the input's ", st,
              " (or bfloat16 with a float32 input: mixed precision)");
  return gt;
}

bool mixed_precision(at::ScalarType st, at::ScalarType gt) { return st != gt; }

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
  at::Tensor w1t, w2t;  // [C, Hd] and [Hd, C] copies, made where a route needs them
  bool channels_last;
  at::ScalarType gemm;  // the GEMM operands' dtype (w1's): x's, or bf16 with fp32 x
  int64_t N, C, T, Hd;
};

// ---------------------------------------------------------------------------
// Backward phase 1
// ---------------------------------------------------------------------------

// Weight-gradient accumulators live per GROUP of consecutive tiles; the
// group count depends on the shape only, capped so their memory stays small.
constexpr int64_t kMaxGroups = 16;
constexpr int64_t kGroupBudgetBytes = 32ll << 20;


// ---------------------------------------------------------------------------
// The tile code (block_mlp_tiles.h), once per ISA level (isa.h)
// ---------------------------------------------------------------------------
#if RIFORMER_ISA_DISPATCH
#pragma GCC push_options
#pragma GCC target("arch=x86-64-v4")
namespace at_avx512 {
#include "block_mlp_tiles.h"
}  // namespace at_avx512
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("arch=x86-64-v3")
namespace at_avx2 {
#include "block_mlp_tiles.h"
}  // namespace at_avx2
#pragma GCC pop_options
#endif

namespace at_baseline {
#include "block_mlp_tiles.h"
}  // namespace at_baseline

// The level this call runs at (recorded for riformer_kernels.cpu_isa_info).
isa::Level run_level() {
  const isa::Level level = isa::active();
  isa::record_run(level);
  return level;
}

// Calls fn(args...) from the copy of the active level.
#if RIFORMER_ISA_DISPATCH
#define RIFORMER_ISA_CALL(fn, ...)                                 \
  do {                                                             \
    switch (run_level()) {                                         \
      case isa::kAvx512: at_avx512::fn(__VA_ARGS__); break;        \
      case isa::kAvx2: at_avx2::fn(__VA_ARGS__); break;            \
      default: at_baseline::fn(__VA_ARGS__); break;                \
    }                                                              \
  } while (0)
#else
#define RIFORMER_ISA_CALL(fn, ...)    \
  do {                                \
    run_level();                      \
    at_baseline::fn(__VA_ARGS__);     \
  } while (0)
#endif

ForwardArgs forward_args(const at::Tensor& x, const at::Tensor& A, const at::Tensor& B,
                         const at::Tensor& a, const at::Tensor& b, const at::Tensor& w1,
                         const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2,
                         const at::Tensor& l2, const char* op) {
  ForwardArgs f;
  f.channels_last = is_channels_last(x, op);
  check_block_dtype(x.scalar_type(), op);
  f.gemm = gemm_type(x, w1, op);
  check_blas(f.gemm);
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
  f.w1 = weight(w1, f.Hd, f.C, f.gemm, "w1", op);
  f.w2 = weight(w2, f.C, f.Hd, f.gemm, "w2", op);
  TORCH_CHECK(w2.size(0) == f.C, "riformer::", op, ": w2 must have ", f.C, " rows");
  f.b1 = vec(b1, f.Hd, acc, "b1", op);
  f.b2 = vec(b2, f.C, acc, "b2", op);
  return f;
}

// Transposed copies of the weights, for a GEMM route that takes no transposed
// operands (oneDNN brgemm). MKL reads the weights transposed in place instead
// (tile_gemm): at C=512 the two copies cost ~4% of a training step. `w2t_always`:
// the NCHW backward's weight2_grad_t reads W2^T elementwise, on any route.
void add_transposed_weights(ForwardArgs& f, bool w2t_always) {
  const bool copies = f.gemm == at::kFloat && blas::brgemm_f32_usable();
  if (copies) f.w1t = f.w1.t().contiguous();
  if (copies || w2t_always) f.w2t = f.w2.t().contiguous();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> mlp_forward_common(
    ForwardArgs& f, bool emit_moments, bool save_u) {
  if (f.channels_last) add_transposed_weights(f, false);
  const auto st = f.x.scalar_type();
  const auto acc = st == at::kDouble ? at::kDouble : at::kFloat;
  const auto fmt = format_of(f.channels_last);
  at::Tensor out = at::empty(f.x.sizes(), f.x.options().memory_format(fmt));
  at::Tensor mean = at::empty({emit_moments ? f.N : 0, f.C}, f.x.options().dtype(acc));
  at::Tensor var = at::empty({emit_moments ? f.N : 0, f.C}, f.x.options().dtype(acc));
  // u is a GEMM-side tensor: saved in the GEMM dtype (bf16 in the mixed mode).
  at::Tensor u = at::empty({save_u ? f.N : 0, f.Hd, f.x.size(2), f.x.size(3)},
                           f.x.options().dtype(f.gemm).memory_format(fmt));
  poison(out);
  poison(mean);
  poison(var);
  poison(u);
  if (f.N * f.C == 0) return {out, mean, var, u};
  if (mixed_precision(st, f.gemm)) {
    RIFORMER_ISA_CALL(mlp_forward_kernel_f32_bf16, f, out, emit_moments, mean, var,
                      save_u ? &u : nullptr);
    return {out, mean, var, u};
  }
  RIFORMER_DISPATCH_BLOCK_TYPES(st, "riformer_mlp_forward_cpu", [&] {
    RIFORMER_ISA_CALL(mlp_forward_kernel<scalar_t>, f, out, emit_moments, mean, var,
                      save_u ? &u : nullptr);
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

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
mlp_backward_cpu(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& mean,
                 const at::Tensor& A, const at::Tensor& B, const at::Tensor& w1,
                 const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2,
                 const at::Tensor& l2, const std::optional<at::Tensor>& u_saved) {
  const char* op = "mlp_backward";
  // a and b do not enter phase 1; A stands in for them in the shared checks.
  ForwardArgs f = forward_args(x, A, B, A, A, w1, b1, w2, b2, l2, op);
  add_transposed_weights(f, !f.channels_last && f.T >= kWeight2GemmBelowTokens);
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
    TORCH_CHECK(u_saved->scalar_type() == f.gemm, "riformer::mlp_backward: u_saved has dtype ",
                u_saved->scalar_type(), ", expected w1's ", f.gemm);
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
  if (mixed_precision(st, f.gemm)) {
    RIFORMER_ISA_CALL(mlp_backward_kernel_f32_bf16, f, grad_out, m, us, dz, dw1, db1, dw2, db2,
                      sums);
    return {dz, dw1, db1, dw2, db2, sums};
  }
  RIFORMER_DISPATCH_BLOCK_TYPES(st, "riformer_mlp_backward_cpu", [&] {
    RIFORMER_ISA_CALL(mlp_backward_kernel<scalar_t>, f, grad_out, m, us, dz, dw1, db1, dw2, db2,
                      sums);
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
  const int64_t N = x.size(0), C = x.size(1);
  const auto acc = st == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor m = coeff(mean, N, C, acc, "mean", op), p = coeff(P, N, C, acc, "P", op),
             q = coeff(Q, N, C, acc, "Q", op), r = coeff(R, N, C, acc, "R", op),
             s = coeff(S, N, C, acc, "S", op);
  at::Tensor dx = at::empty(x.sizes(), x.options().memory_format(format_of(cl)));
  poison(dx);
  if (dx.numel() == 0) return dx;
  RIFORMER_DISPATCH_BLOCK_TYPES(st, "riformer_input_grad_cpu", [&] {
    RIFORMER_ISA_CALL(input_grad_kernel<scalar_t>, grad_out, dz, x, m, p, q, r, s, cl, dx);
  });
  return dx;
}

}  // namespace

namespace isa {
const char* fp32_gemm_route() {
  return blas::brgemm_f32_usable() ? "onednn-brgemm" : "mkl-sgemm";
}
}  // namespace isa

TORCH_LIBRARY_IMPL(riformer, CPU, m) {
  m.impl("mlp_forward", &mlp_forward_cpu);
  m.impl("mlp_forward_save_u", &mlp_forward_save_u_cpu);
  m.impl("mlp_backward", &mlp_backward_cpu);
  m.impl("input_grad", &input_grad_cpu);
}

}  // namespace riformer
