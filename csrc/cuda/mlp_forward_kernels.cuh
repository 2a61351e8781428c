// The fused MLP forward of the folded block, plain CUDA (no torch headers): compiled by nvcc and,
// as C++, against the SIMT emulator (csrc/emu/cuda_emu.h, entry csrc/emu/emulated_kernels.cpp).
//
//   out[n,c,t] = a x + b + l2 (sum_j W2[c,j] GELU(sum_k W1[j,k] z[n,k,t] + b1[j]) + b2[c]),
//   z[n,k,t]   = A[n,k] x[n,k,t] + B[n,k]       (riformer_kernels.fold's coefficients)
//
// Tiling (fp32 FFMA, or fp64 for the fp64 oracle path; fp16/bf16 inputs are converted on load
// and accumulate in fp32):
//   * a CTA of kThreads threads takes kTokens tokens of one sample (blockIdx.x = n * tiles +
//     tile) and kOutTile output channels (blockIdx.y: the large-C split, below);
//   * prologue: z = A x + B for all C input channels of its tokens into shared memory
//     (zs[C][kTokens]); tokens past T are written as 0 so the GEMMs read defined values, and
//     are never stored;
//   * for each chunk of kHidChunk hidden units, in order: GEMM1 u = W1 z (each thread a
//     kRows x kRT register tile, z read from shared as float4-sized rows, W1 from global/L1),
//     + b1, exact GELU (erff), into shared hs[kHidChunk][kTokens]; then GEMM2 accumulates
//     W2[:, chunk] h into the thread's kRows x kRT output accumulator (registers);
//   * epilogue: out = a x + b + l2 (acc + b2) for the CTA's valid (channel, token) pairs.
// Large C: the output accumulator stays kOutTile channels wide (16 registers a thread) whatever
// C is; grid.y = ceil(C / kOutTile) CTAs share a token tile and each recomputes the whole hidden
// activation (GEMM1 is done ceil(C/64) times). Every sum runs in a fixed order (k ascending,
// hidden chunks ascending, j ascending): results do not depend on scheduling, and no atomics
// are used. Shared memory is (C + kHidChunk) * kTokens * sizeof(acc_t) bytes (C = 320 fp32 is
// exactly 48 KiB; beyond it a GPU build must raise cudaFuncAttributeMaxDynamicSharedMemorySize).
// fp32 FFMA rather than tf32 mma: tf32 keeps 10 mantissa bits, ~1e-3 relative per product,
// which cannot meet the 1e-5 fp32 budget of the block; a tensor-core path is for fp16/bf16.
#pragma once

#include <math.h>
#include <stdint.h>

#if !defined(RIFORMER_EMULATE)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

#include "../common/block_math.h"
#include "ptx.cuh"

namespace riformer {
namespace mlp_cuda {

constexpr int kTokens = 32;    // tokens per CTA
constexpr int kOutTile = 64;   // output channels per CTA (grid.y splits C into these)
constexpr int kHidChunk = 64;  // hidden units per chunk
constexpr int kThreads = 128;
constexpr int kRT = 4;         // tokens per thread (one 16-byte row of zs / hs in fp32)
constexpr int kRows = 4;       // hidden units (GEMM1) / output channels (GEMM2) per thread
constexpr int kTokenGroups = kTokens / kRT;     // 8
constexpr int kRowGroups = kThreads / kTokenGroups;  // 16
static_assert(kRowGroups * kRows == kHidChunk, "GEMM1 tile covers the hidden chunk");
static_assert(kRowGroups * kRows == kOutTile, "GEMM2 tile covers the output slice");

// Everything the kernel reads; one struct so host and device agree on one signature.
// Strides are in elements and shared by x and out (out is allocated in x's layout); the token
// index t = h * W + w must be one stride (NCHW: st = 1, sc = T; channels_last: st = C, sc = 1).
// Two element types: scalar_t, the activations' (x, out and the biases: the residual stream),
// and op_t, the GEMMs' (the weights, and what the GEMMs read or write besides them: h and the
// saved u). They are the same type except in the mixed-precision mode autocast runs, fp32
// activations with fp16/bf16 weights (riformer_kernels.pipeline.AutocastPlan), where z and h
// are rounded to op_t for the tensor-core GEMMs exactly as the reference under autocast
// rounds its convs' inputs, and everything else stays fp32.
template <typename scalar_t, typename acc_t, typename op_t = scalar_t>
struct MlpForwardArgs {
  const scalar_t* x;
  scalar_t* out;
  int64_t N, C, Hd, T;   // samples, channels, hidden units, tokens per sample
  int64_t sn, sc, st;
  int64_t tiles;         // token tiles per sample: ceil(T / kTokens)
  const acc_t* A;        // (N, C) contiguous, statistics dtype
  const acc_t* B;
  const acc_t* a;
  const acc_t* b;
  const acc_t* l2;
  const op_t* w1;        // (Hd, C) row-major
  const scalar_t* b1;    // (Hd)
  const op_t* w2;        // (C, Hd) row-major
  const scalar_t* b2;    // (C)
  op_t* h;               // (N, T, Hd) hidden activations: the two-GEMM path's scratch
  // Optional outputs (nullptr: not wanted; uniform over the launch, so the branches on them
  // are uniform too):
  op_t* u;               // (N, Hd, H, W): u = W1 z + b1 before GELU, for a backward that
                         // reads it instead of recomputing (recompute=False), at
                         // u[n * Hd * T + j * u_sj + t * u_st] (NCHW: u_sj = T, u_st = 1;
                         // channels_last: u_sj = 1, u_st = Hd)
  int64_t u_sj, u_st;
  Moments<acc_t>* part;  // (N, tiles, C): moments of the CTA's stored out values of channel c,
                         // taken around shift[n, c] (chained statistics, merged by
                         // moments_kernels::moments_merge)
  acc_t* shift;          // (N, C): a*x[n,c,0] + b + l2*b2, written by the tiles-0 CTAs
};

// Dynamic shared memory as a typed pointer. Under the emulator the declaration must be the
// emulator's macro: csrc/emu/gcc_wrap.py rewrites `extern __shared__` only in the compiled file,
// not in headers such as this one.
#if defined(RIFORMER_EMULATE)
#define RIFORMER_DYNAMIC_SMEM(T, name) RIFORMER_EMU_EXTERN_SHARED(T, name)
#else
#define RIFORMER_DYNAMIC_SMEM(T, name)                             \
  extern __shared__ __align__(16) unsigned char riformer_dyn_smem_[]; \
  T* const name = reinterpret_cast<T*>(riformer_dyn_smem_)
#endif

// Loads widen to the accumulation type, stores round once. Half types go through the named
// intrinsics, not casts: torch's CUDA builds define __CUDA_NO_HALF_CONVERSIONS__ and
// __CUDA_NO_BFLOAT16_CONVERSIONS__, which remove __half's implicit float conversions.
__device__ __forceinline__ float widen(float v) { return v; }
__device__ __forceinline__ double widen(double v) { return v; }
__device__ __forceinline__ float widen(__half v) { return __half2float(v); }
__device__ __forceinline__ float widen(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename acc_t, typename T>
__device__ __forceinline__ acc_t load_as(const T* p) {
  return static_cast<acc_t>(widen(*p));
}

__device__ __forceinline__ void store_rounded(float* p, float v) { *p = v; }
__device__ __forceinline__ void store_rounded(double* p, double v) { *p = v; }
// The half stores write the 16 bits as an unsigned short: under the emulator `*p =
// __float2half_rn(v)` is a call that writes its struct result straight into *p, which the
// shared-memory checks do not see (docs/emulator.md, Limits); an integer store is checked. On
// the device both are one 16-bit store.
__device__ __forceinline__ void store_rounded(__half* p, float v) {
  *reinterpret_cast<unsigned short*>(p) = __half_as_ushort(__float2half_rn(v));
}
__device__ __forceinline__ void store_rounded(__nv_bfloat16* p, float v) {
  *reinterpret_cast<unsigned short*>(p) = __bfloat16_as_ushort(__float2bfloat16_rn(v));
}

// Exact GELU, u Phi(u) with Phi from erf: erff on the device and in the emulator alike (the
// CPU kernels' vectorisable approximation in block_math.h is not used here).
__device__ __forceinline__ float gelu_exact(float u) {
  return 0.5f * u * (1.f + erff(u * 0.70710678118654752440f));
}
__device__ __forceinline__ double gelu_exact(double u) {
  return 0.5 * u * (1.0 + erf(u * 0.70710678118654752440));
}

// The value a store of v leaves in memory, back in the accumulation type: the output moments
// are those of the values the next block reads (rounded to the storage dtype).
__device__ __forceinline__ float stored_value(float v, const float*) { return v; }
__device__ __forceinline__ double stored_value(double v, const double*) { return v; }
__device__ __forceinline__ float stored_value(float v, const __half*) {
  return __half2float(__float2half_rn(v));
}
__device__ __forceinline__ float stored_value(float v, const __nv_bfloat16*) {
  return __bfloat162float(__float2bfloat16_rn(v));
}

// ---------------------------------------------------------------------------------------------
// Output moments from the epilogue (chained statistics, docs/design.md section 4)
//
// Every CTA reduces the stored values of each of its channels over its (at most kTokens) valid
// tokens into Moments (count, mean, M2) and writes them to part[(n, tile, c)]; the moments
// merge kernel (moments_kernels.cuh) folds the tiles of each (n, c) in a fixed order. The
// partials are taken around a per-(n, c) shift that every CTA of the sample computes
// identically without seeing the others' outputs, shift = a x[n,c,0] + b + l2 b2 (the output
// at token 0 with the MLP term left out): it removes the residual's and the biases' common
// offset, so tile means of large-offset data keep their precision, as the moments kernels'
// shift by the first element does. The tiles-0 CTAs write it for the merge.

template <typename acc_t, typename Args>
__device__ __forceinline__ acc_t out_shift(const Args& p, int64_t n, int64_t c) {
  const int64_t nc = n * p.C + c;
  return p.a[nc] * load_as<acc_t>(p.x + n * p.sn + c * p.sc) + p.b[nc] +
         p.l2[nc] * load_as<acc_t>(p.b2 + c);
}

// Sum over the `lanes` consecutive lanes (a power of two dividing 32) that share a channel: an
// xor butterfly, which leaves every lane of the group the same sum in the same order.
template <int lanes, typename acc_t>
__device__ __forceinline__ acc_t group_sum(acc_t v) {
#pragma unroll
  for (int off = 1; off < lanes; off *= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// The tile's moments of one channel from each lane's R values (valid(i): value i is a real
// token; a function, not a bool array, so that no predicate array stays live across the
// shuffles: ptxas spilled 16 live predicates of the mma epilogue to local memory):
// the sum around the shift gives the tile mean, then M2 around that mean (two passes in
// registers, as the moments kernels do). count: valid tokens of the tile (>= 1). Every lane of
// the group must call it (the shuffles are warp collectives), real channel or not.
template <int lanes, int R, typename acc_t, typename Valid>
__device__ __forceinline__ Moments<acc_t> tile_moments(const acc_t (&v)[R], const Valid& valid,
                                                       acc_t shift, acc_t count) {
  acc_t s1 = acc_t(0);
#pragma unroll
  for (int i = 0; i < R; ++i)
    if (valid(i)) s1 += v[i] - shift;
  s1 = group_sum<lanes>(s1);
  const acc_t d = s1 / count;
  acc_t s2 = acc_t(0);
#pragma unroll
  for (int i = 0; i < R; ++i)
    if (valid(i)) {
      const acc_t e = (v[i] - shift) - d;
      s2 += e * e;
    }
  s2 = group_sum<lanes>(s2);
  return Moments<acc_t>{count, d, s2};
}

// Field by field, so the store is three plain 4- or 8-byte stores on every compiler.
template <typename acc_t>
__device__ __forceinline__ void store_moments(Moments<acc_t>* dst, const Moments<acc_t>& m) {
  dst->n = m.n;
  dst->mean = m.mean;
  dst->m2 = m.m2;
}

// What one launch of an MLP kernel computes (a template argument: every branch on it is
// compiled away).
//   kFused:  the whole MLP of its token tile and output slice; hidden activations stay on chip.
//   kHidden: two-GEMM path, launch 1: GELU(W1 z + b1) of its token tile and hidden chunk
//            (blockIdx.y) into the global scratch h (N, T, Hd).
//   kOutput: two-GEMM path, launch 2: out = a x + b + l2 (W2 h + b2) of its tile and output
//            slice, reading h chunk by chunk; the same epilogue (and moments) as kFused.
enum MlpMode : int { kFused = 0, kHidden = 1, kOutput = 2 };

// Rows of hs (the hidden chunk in shared memory, [kHidChunk][kHS]) are padded by 4 elements:
// kOutput fills hs from global memory with consecutive lanes on consecutive hidden units, and
// an unpadded 32-element row would put all of them in one bank; kTokens + 4 keeps rows 16-byte
// aligned for the GEMM2 reads.
constexpr int kHS = kTokens + 4;

inline int64_t smem_bytes(int64_t C, int64_t acc_size, int mode = kFused) {
  const int64_t z = mode == kOutput ? 0 : C * kTokens;
  const int64_t h = mode == kHidden ? 0 : int64_t(kHidChunk) * kHS;
  return (z + h) * acc_size;
}

template <typename acc_t, typename Args, typename Store>
__device__ __forceinline__ void prologue_tile(const Args& p, int64_t n, int64_t t0,
                                              const Store& store) {
  const auto* xn = p.x + n * p.sn;
  const auto* An = p.A + n * p.C;
  const auto* Bn = p.B + n * p.C;
  const bool tokens_fastest = p.st == 1;
  for (int64_t i = threadIdx.x; i < p.C * kTokens; i += kThreads) {
    const int64_t k = tokens_fastest ? i / kTokens : i % p.C;
    const int j = int(tokens_fastest ? i % kTokens : i / p.C);
    const int64_t t = t0 + j;
    acc_t z = acc_t(0);
    if (t < p.T) z = An[k] * load_as<acc_t>(xn + k * p.sc + t * p.st) + Bn[k];
    store(k, j, z);
  }
}

// The FFMA kernels' epilogue: out = a x + b + l2 (acc + b2) for the thread's kRows x kRT
// (channel, token) pairs, and the tile's moments of the stored values when p.part is set.
template <typename scalar_t, typename acc_t, typename op_t>
__device__ __forceinline__ void epilogue_ffma(const MlpForwardArgs<scalar_t, acc_t, op_t>& p,
                                              int64_t n, int64_t t0, int64_t c0, int tg, int rg,
                                              const acc_t (&acc)[kRows][kRT]) {
  const scalar_t* xn = p.x + n * p.sn;
  scalar_t* on = p.out + n * p.sn;
  const int64_t tile = blockIdx.x % p.tiles;
  const acc_t count = acc_t(p.T - t0 < kTokens ? p.T - t0 : int64_t(kTokens));
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    // No early exit for channels past C: the moments' shuffles need every lane.
    const int64_t c = c0 + rg * kRows + r;
    const bool live = c < p.C;
    const int64_t nc = n * p.C + c;
    const acc_t a = live ? p.a[nc] : acc_t(0), b = live ? p.b[nc] : acc_t(0);
    const acc_t l2 = live ? p.l2[nc] : acc_t(0);
    const acc_t b2 = live ? load_as<acc_t>(p.b2 + c) : acc_t(0);
    auto valid = [&](int q) { return live && t0 + tg * kRT + q < p.T; };
    acc_t v[kRT];
#pragma unroll
    for (int q = 0; q < kRT; ++q) {
      v[q] = acc_t(0);
      if (valid(q)) {
        const int64_t t = t0 + tg * kRT + q;
        const acc_t xv = load_as<acc_t>(xn + c * p.sc + t * p.st);
        v[q] = stored_value(a * xv + b + l2 * (acc[r][q] + b2), on);
        store_rounded(on + c * p.sc + t * p.st, v[q]);
      }
    }
    if (p.part != nullptr) {
      const acc_t s = live ? out_shift<acc_t>(p, n, c) : acc_t(0);
      const Moments<acc_t> m = tile_moments<kTokenGroups>(v, valid, s, count);
      if (live && tg == 0) {
        store_moments(p.part + (n * p.tiles + tile) * p.C + c, m);
        if (tile == 0) p.shift[nc] = s;
      }
    }
  }
}

template <typename scalar_t, typename acc_t, int kMode = kFused, typename op_t = scalar_t>
__global__ void __launch_bounds__(kThreads)
mlp_forward_kernel(MlpForwardArgs<scalar_t, acc_t, op_t> p) {
  RIFORMER_DYNAMIC_SMEM(acc_t, smem);
  acc_t* const zs = smem;                                            // [C][kTokens]
  acc_t* const hs = smem + (kMode == kOutput ? 0 : p.C * kTokens);   // [kHidChunk][kHS]

  const int64_t n = blockIdx.x / p.tiles;
  const int64_t t0 = (blockIdx.x % p.tiles) * int64_t(kTokens);
  // kHidden: blockIdx.y is the hidden chunk; otherwise the output slice.
  const int64_t c0 = kMode == kHidden ? 0 : int64_t(blockIdx.y) * kOutTile;
  const int64_t h_begin = kMode == kHidden ? int64_t(blockIdx.y) * kHidChunk : 0;
  const int64_t h_end = kMode == kHidden ? h_begin + kHidChunk : p.Hd;
  const int tid = threadIdx.x;

  if constexpr (kMode != kOutput)
    prologue_tile<acc_t>(p, n, t0, [&](int64_t k, int j, acc_t z) { zs[k * kTokens + j] = z; });

  const int tg = tid % kTokenGroups;   // tokens tg*kRT .. +kRT-1
  const int rg = tid / kTokenGroups;   // rows rg*kRows .. +kRows-1
  acc_t acc[kRows][kRT];
#pragma unroll
  for (int r = 0; r < kRows; ++r)
#pragma unroll
    for (int q = 0; q < kRT; ++q) acc[r][q] = acc_t(0);

  for (int64_t h0 = h_begin; h0 < h_end && h0 < p.Hd; h0 += kHidChunk) {
    // First chunk: the prologue's zs is complete. Later chunks: every thread finished reading
    // the previous chunk's hs in GEMM2 before it is overwritten.
    __syncthreads();
    if constexpr (kMode == kOutput) {
      // The chunk of h from global memory; consecutive threads read consecutive hidden units
      // of a token (coalesced). Rows past Hd and tokens past T read as 0.
      for (int i = tid; i < kHidChunk * kTokens; i += kThreads) {
        const int jl = i % kHidChunk, tok = i / kHidChunk;
        const int64_t j = h0 + jl, t = t0 + tok;
        hs[jl * kHS + tok] =
            j < p.Hd && t < p.T ? load_as<acc_t>(p.h + (n * p.T + t) * p.Hd + j) : acc_t(0);
      }
    } else {
      acc_t u[kRows][kRT];
      const op_t* w1row[kRows];
      bool live[kRows];
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        const int64_t j = h0 + rg * kRows + r;
        live[r] = j < p.Hd;
        w1row[r] = p.w1 + (live[r] ? j : 0) * p.C;
#pragma unroll
        for (int q = 0; q < kRT; ++q) u[r][q] = acc_t(0);
      }
      for (int64_t k = 0; k < p.C; ++k) {
        acc_t zv[kRT];
#pragma unroll
        for (int q = 0; q < kRT; ++q) zv[q] = zs[k * kTokens + tg * kRT + q];
#pragma unroll
        for (int r = 0; r < kRows; ++r) {
          const acc_t w = load_as<acc_t>(w1row[r] + k);
#pragma unroll
          for (int q = 0; q < kRT; ++q) u[r][q] += w * zv[q];
        }
      }
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        const int64_t j = h0 + rg * kRows + r;
        // Rows past Hd are written as 0: GEMM2 never reads them (it stops at Hd), but a full
        // chunk is always defined.
        const acc_t bias = live[r] ? load_as<acc_t>(p.b1 + j) : acc_t(0);
#pragma unroll
        for (int q = 0; q < kRT; ++q) {
          const acc_t uv = u[r][q] + bias;
          const acc_t hv = live[r] ? gelu_exact(uv) : acc_t(0);
          const int64_t t = t0 + tg * kRT + q;
          const bool store = live[r] && t < p.T;
          if constexpr (kMode == kHidden) {
            if (store) store_rounded(p.h + (n * p.T + t) * p.Hd + j, hv);
          } else {
            hs[(rg * kRows + r) * kHS + tg * kRT + q] = hv;
          }
          // Saved u: written once, by the first output slice (kFused) or the chunk's CTA.
          if (p.u != nullptr && (kMode == kHidden || blockIdx.y == 0) && store)
            store_rounded(p.u + n * p.Hd * p.T + j * p.u_sj + t * p.u_st, uv);
        }
      }
    }
    if constexpr (kMode == kHidden) continue;   // no GEMM2 in this launch
    __syncthreads();  // hs complete before any thread reads other threads' rows

    const int64_t hn = p.Hd - h0 < kHidChunk ? p.Hd - h0 : int64_t(kHidChunk);
    const op_t* w2row[kRows];
    bool out_live[kRows];
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const int64_t c = c0 + rg * kRows + r;
      out_live[r] = c < p.C;
      w2row[r] = p.w2 + (out_live[r] ? c : 0) * p.Hd + h0;
    }
    for (int64_t j = 0; j < hn; ++j) {
      acc_t hv[kRT];
#pragma unroll
      for (int q = 0; q < kRT; ++q) hv[q] = hs[j * kHS + tg * kRT + q];
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        const acc_t w = out_live[r] ? load_as<acc_t>(w2row[r] + j) : acc_t(0);
#pragma unroll
        for (int q = 0; q < kRT; ++q) acc[r][q] += w * hv[q];
      }
    }
  }
  if constexpr (kMode != kHidden) epilogue_ffma(p, n, t0, c0, tg, rg, acc);
}

// ---------------------------------------------------------------------------------------------
// Tensor-core variant for fp16/bf16 (sm_80+): mma.sync m16n8k16 with fp32 accumulation, written
// the way flash attention chains S = Q K^T into P V: both GEMMs are computed transposed, tokens
// as the M dimension,
//     u^T[t, j] = sum_k z^T[t, k] W1^T[k, j]      h^T = GELU(u^T + b1)
//     o^T[t, c] = sum_j h^T[t, j] W2^T[j, c],
// so the accumulator fragment of GEMM1 (rows = tokens, columns = hidden units) is, after GELU
// and rounding to the input dtype, exactly the A fragment GEMM2 needs (rows = tokens, k = hidden
// units): the hidden activation never leaves registers, and the chunk loop has no barrier.
//   * a CTA of 4 warps takes kMmaTokens = 64 tokens of one sample and 64 output channels; warp w
//     owns tokens 16w .. 16w + 15 for every GEMM (no data shared between warps after the
//     prologue);
//   * A of GEMM1 (z^T) from shared memory stored token-major (zT[token][k], rows padded by
//     kZPad halves so the 8 rows one load touches fall in distinct banks), one 32-bit load per
//     register;
//   * B of both GEMMs (W1^T, W2^T) from global memory: a B register is two consecutive k of one
//     column, i.e. two consecutive elements of a row of the row-major W1 (Hd, C) / W2 (C, Hd),
//     one 32-bit load (the weights are small and stay in L1/L2);
//   * the same fixed summation order per element as the FFMA kernel (k-steps ascending, hidden
//     chunks ascending): deterministic.
// z and GELU(u) are rounded to the operand dtype op_t (the input's, or the weights' in the
// mixed-precision mode) before their mma (the reference rounds them too); u, GELU and the
// output accumulate and evaluate in fp32, x and out are read and written in scalar_t. Needs C % 16 == 0 and Hd % 16 == 0
// (whole k-steps; every RIFormer width is a multiple of 16); other shapes take the FFMA kernel.
// The two-GEMM path uses the same kernel: kHidden stores h^T from the accumulator registers to
// the (N, T, Hd) scratch, kOutput loads GEMM2's A fragments from it directly (no shared memory
// for h at all).
// ---------------------------------------------------------------------------------------------

constexpr int kMmaTokens = 64;   // tokens per CTA of the mma kernel (16 per warp)
constexpr int kZPad = 8;
// The epilogue's cross-warp moments: per warp and channel, one float (reused for both passes).
constexpr int kMomentScratch = 4 * kOutTile;

inline bool mma_eligible(int64_t C, int64_t Hd) { return C % 16 == 0 && Hd % 16 == 0; }

inline int64_t mma_smem_bytes(int64_t C, int64_t elem_size, int mode = kFused) {
  const int64_t z = mode == kOutput ? 0 : kMmaTokens * (C + kZPad) * elem_size;
  const int64_t moments = mode == kHidden ? 0 : kMomentScratch * int64_t(sizeof(float));
  return z + moments;
}

// The large-C rule: fused kernel (one launch, hidden activations on chip, GEMM1 recomputed by
// each of the k = ceil(C / 64) output slices) or the two-GEMM path (h written to and read back
// from global memory once). Per token the fused kernel does 8 C^2 (k - 1) extra flops, the
// two-GEMM path moves 8 C e extra bytes (e: bytes per element of h); the two-GEMM path wins
// when C (k - 1) > e F / B. With an H200's B = 4.8 TB/s and F = about 600 TFLOP/s for fp16/bf16
// mma.sync (some 60% of the dense tensor peak) or 67 TFLOP/s fp32 FFMA (34 fp64 at e = 8),
// e F / B is about 250 for half types and 56 for fp32/fp64. A model, not a measurement: no GPU
// has run these kernels yet; the thresholds are the place to change once one has.
constexpr int64_t kTwoGemmThresholdHalf = 250;
constexpr int64_t kTwoGemmThresholdFloat = 56;

inline bool prefer_two_gemm(int64_t C, bool half) {
  const int64_t k = (C + kOutTile - 1) / kOutTile;
  return C * (k - 1) > (half ? kTwoGemmThresholdHalf : kTwoGemmThresholdFloat);
}

// How the MLP forward is launched, shared by the CUDA binding (mlp_forward.cu) and the emulated
// build, so the emulator runs exactly what a GPU gets.
struct MlpPlan {
  bool mma = false;          // the tensor-core kernels (else FFMA)
  bool two_gemm = false;     // kHidden then kOutput (else one kFused launch)
  int64_t tiles = 0;         // token tiles per sample (kTokens, or kMmaTokens for mma)
  unsigned grid_x = 0;       // N * tiles, every launch
  unsigned grid_y = 0;       // output slices (kFused, kOutput)
  unsigned grid_y_hidden = 0;  // hidden chunks (kHidden)
  int64_t smem = 0;          // dynamic shared memory bytes (kFused, kOutput)
  int64_t smem_hidden = 0;   // (kHidden)
  int64_t scratch = 0;       // elements of h (N * T * Hd, op_t) for the two-GEMM path
};

// elem_size: bytes of the GEMM operand type op_t (x's dtype, or the weights' half dtype in the
// mixed-precision mode); half: op_t is fp16/bf16. mma: -1 chooses (tensor cores wherever
// they can run), 0 forces FFMA, 1 forces mma (the caller checks mma_eligible first). two_gemm:
// -1 applies prefer_two_gemm, 0 forces the fused kernel, 1 the two-GEMM path.
inline MlpPlan plan_mlp(int64_t N, int64_t C, int64_t Hd, int64_t T, int elem_size, bool half,
                        int mma = -1, int two_gemm = -1) {
  MlpPlan pl;
  pl.mma = mma < 0 ? (half && mma_eligible(C, Hd)) : mma == 1;
  pl.two_gemm = two_gemm < 0 ? prefer_two_gemm(C, half) : two_gemm == 1;
  const int64_t tile = pl.mma ? kMmaTokens : kTokens;
  pl.tiles = (T + tile - 1) / tile;
  pl.grid_x = unsigned(N * pl.tiles);
  pl.grid_y = unsigned((C + kOutTile - 1) / kOutTile);
  pl.grid_y_hidden = unsigned((Hd + kHidChunk - 1) / kHidChunk);
  const int acc = elem_size == 8 ? 8 : 4;
  auto bytes = [&](int mode) {
    return pl.mma ? mma_smem_bytes(C, elem_size, mode) : smem_bytes(C, acc, mode);
  };
  pl.smem = bytes(pl.two_gemm ? kOutput : kFused);
  pl.smem_hidden = pl.two_gemm ? bytes(kHidden) : 0;
  pl.scratch = pl.two_gemm ? N * T * Hd : 0;
  return pl;
}

__device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4],
                                         const uint32_t (&b)[2], const __half*) {
  ptx::mma_m16n8k16_f16(d, a, b, d);
}
__device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4],
                                         const uint32_t (&b)[2], const __nv_bfloat16*) {
  ptx::mma_m16n8k16_bf16(d, a, b, d);
}

// Two consecutive 16-bit elements (col, col + 1) of row `row` of a row-major matrix with `ld`
// columns, as one register (the lower address in the low half); 0 for rows past `rows`.
// col is even and ld is even, so the load is 4-byte aligned.
template <typename T>
__device__ __forceinline__ uint32_t load_pair(const T* m, int64_t row, int64_t rows, int64_t ld,
                                              int64_t col) {
  return row < rows ? *reinterpret_cast<const uint32_t*>(m + row * ld + col) : 0u;
}

template <typename T>
__device__ __forceinline__ uint32_t shared_pair(const T* s) {
  return *reinterpret_cast<const uint32_t*>(s);
}

// Two floats rounded to T and packed as an mma operand register (lo in the low half).
__device__ __forceinline__ uint32_t pack_pair(float lo, float hi, const __half*) {
  return uint32_t(__half_as_ushort(__float2half_rn(lo))) |
         (uint32_t(__half_as_ushort(__float2half_rn(hi))) << 16);
}
__device__ __forceinline__ uint32_t pack_pair(float lo, float hi, const __nv_bfloat16*) {
  return uint32_t(__bfloat16_as_ushort(__float2bfloat16_rn(lo))) |
         (uint32_t(__bfloat16_as_ushort(__float2bfloat16_rn(hi))) << 16);
}

// Sum over the 8 lanes of a warp that share tq = lane % 4 (the lanes holding one accumulator
// column's rows): an xor butterfly, the same sum in the same order on every lane.
__device__ __forceinline__ float column_sum(float v) {
#pragma unroll
  for (int off = 4; off < 32; off *= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

template <typename scalar_t, int kMode = kFused, typename op_t = scalar_t>
__global__ void __launch_bounds__(kThreads)
mlp_forward_mma_kernel(MlpForwardArgs<scalar_t, float, op_t> p) {
  static_assert(kThreads == 4 * 32 && kHidChunk == 64 && kOutTile == 64 && kMmaTokens == 64,
                "warp w owns tokens 16w..16w+15 of the tile and all 64 columns of each GEMM");
  RIFORMER_DYNAMIC_SMEM(op_t, smem);
  const int64_t ZS = p.C + kZPad;
  op_t* const zT = smem;   // [kMmaTokens][ZS] (not in kOutput)
  float* const wsum = reinterpret_cast<float*>(
      smem + (kMode == kOutput ? 0 : kMmaTokens * ZS));   // [4 warps][kOutTile]

  const int64_t n = blockIdx.x / p.tiles;
  const int64_t t0 = (blockIdx.x % p.tiles) * int64_t(kMmaTokens);
  // kHidden: blockIdx.y is the hidden chunk; otherwise the output slice.
  const int64_t c0 = kMode == kHidden ? 0 : int64_t(blockIdx.y) * kOutTile;
  const int64_t h_begin = kMode == kHidden ? int64_t(blockIdx.y) * kHidChunk : 0;
  const int64_t h_end = kMode == kHidden ? h_begin + kHidChunk : p.Hd;
  const int tid = threadIdx.x;
  const int warp = tid / 32, g = (tid % 32) / 4, tq = tid % 4;
  // This lane's accumulator rows (tokens): r0 = t0 + 16 warp + g and r0 + 8.
  const int64_t r0 = t0 + 16 * warp + g;

  if constexpr (kMode != kOutput) {
    // z^T for the tile's 64 tokens: the FFMA kernel's prologue walk (coalesced along x's unit
    // stride), run twice over 32-token halves.
    for (int half = 0; half < 2; ++half)
      prologue_tile<float>(p, n, t0 + half * kTokens, [&](int64_t k, int j, float z) {
        store_rounded(zT + (half * kTokens + j) * ZS + k, z);
      });
    __syncthreads();   // zT complete; the only barrier before the epilogue
  }

  float acc[8][4];   // o^T: 16 tokens x 64 output channels (8 n-tiles of 8)
#pragma unroll
  for (int nt = 0; nt < 8; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[nt][e] = 0.f;

  for (int64_t h0 = h_begin; h0 < h_end && h0 < p.Hd; h0 += kHidChunk) {
    const int64_t hn = p.Hd - h0 < kHidChunk ? p.Hd - h0 : int64_t(kHidChunk);
    // GEMM2's A fragments for this chunk: a[kk] covers hidden units h0 + 16 kk .. + 15.
    uint32_t a2[4][4];
    if constexpr (kMode == kOutput) {
      // Straight from the scratch h (N, T, Hd): a register is two consecutive hidden units of
      // one token; tokens past T and hidden units past Hd read as 0.
      const op_t* hn_base = p.h + n * p.T * p.Hd;
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) {
        const int64_t j = h0 + 16 * kk + 2 * tq;
        const bool in = 16 * kk < hn;
        a2[kk][0] = in ? load_pair(hn_base, r0, p.T, p.Hd, j) : 0u;
        a2[kk][1] = in ? load_pair(hn_base, r0 + 8, p.T, p.Hd, j) : 0u;
        a2[kk][2] = in ? load_pair(hn_base, r0, p.T, p.Hd, j + 8) : 0u;
        a2[kk][3] = in ? load_pair(hn_base, r0 + 8, p.T, p.Hd, j + 8) : 0u;
      }
    } else {
      float u[8][4];   // u^T: 16 tokens x 64 hidden units of the chunk
#pragma unroll
      for (int nt = 0; nt < 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) u[nt][e] = 0.f;
      const op_t* zr0 = zT + (16 * warp + g) * ZS;   // rows g and g + 8 of the warp
      const op_t* zr1 = zr0 + 8 * ZS;
      for (int64_t k0 = 0; k0 < p.C; k0 += 16) {
        const uint32_t a[4] = {shared_pair(zr0 + k0 + 2 * tq), shared_pair(zr1 + k0 + 2 * tq),
                               shared_pair(zr0 + k0 + 2 * tq + 8),
                               shared_pair(zr1 + k0 + 2 * tq + 8)};
#pragma unroll
        for (int nt = 0; nt < 8; ++nt) {
          const int64_t j = h0 + 8 * nt + g;   // the B column this lane loads
          const uint32_t b[2] = {load_pair(p.w1, j, p.Hd, p.C, k0 + 2 * tq),
                                 load_pair(p.w1, j, p.Hd, p.C, k0 + 2 * tq + 8)};
          mma16816(u[nt], a, b, p.w1);
        }
      }
      // + b1, GELU, round: element e of n-tile nt is token r0 + 8 (e >> 1), hidden unit
      // h0 + 8 nt + 2 tq + (e & 1). Units past Hd (a partial last chunk) become 0.
      float hv[8][4];
#pragma unroll
      for (int nt = 0; nt < 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int64_t j = h0 + 8 * nt + 2 * tq + (e & 1);
          const int64_t t = r0 + 8 * (e >> 1);
          const bool live = j < p.Hd;
          const float uv = live ? u[nt][e] + load_as<float>(p.b1 + j) : 0.f;
          hv[nt][e] = live ? gelu_exact(uv) : 0.f;
          const bool store = live && t < p.T;
          if constexpr (kMode == kHidden) {
            if (store) store_rounded(p.h + (n * p.T + t) * p.Hd + j, hv[nt][e]);
          }
          // Saved u: written once, by the first output slice (kFused) or the chunk's CTA.
          if (p.u != nullptr && (kMode == kHidden || blockIdx.y == 0) && store)
            store_rounded(p.u + n * p.Hd * p.T + j * p.u_sj + t * p.u_st, uv);
        }
      // The accumulator as GEMM2's A operand (flash attention's P V step): k-step kk takes
      // n-tiles 2 kk (k 0..7) and 2 kk + 1 (k 8..15); a register packs columns 2tq, 2tq + 1.
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) {
        a2[kk][0] = pack_pair(hv[2 * kk][0], hv[2 * kk][1], p.w1);
        a2[kk][1] = pack_pair(hv[2 * kk][2], hv[2 * kk][3], p.w1);
        a2[kk][2] = pack_pair(hv[2 * kk + 1][0], hv[2 * kk + 1][1], p.w1);
        a2[kk][3] = pack_pair(hv[2 * kk + 1][2], hv[2 * kk + 1][3], p.w1);
      }
    }
    if constexpr (kMode == kHidden) continue;   // no GEMM2 in this launch

#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      if (16 * kk >= hn) break;   // whole k-steps only (Hd % 16 == 0)
      const int64_t j = h0 + 16 * kk + 2 * tq;
#pragma unroll
      for (int nt = 0; nt < 8; ++nt) {
        const int64_t c = c0 + 8 * nt + g;   // the B column this lane loads
        const uint32_t b[2] = {load_pair(p.w2, c, p.C, p.Hd, j),
                               load_pair(p.w2, c, p.C, p.Hd, j + 8)};
        mma16816(acc[nt], a2[kk], b, p.w1);
      }
    }
  }
  if constexpr (kMode == kHidden) return;

  // Epilogue: element e of n-tile nt is token r0 + 8 (e >> 1), channel c0 + 8 nt + 2 tq + (e & 1).
  const scalar_t* xn = p.x + n * p.sn;
  scalar_t* on = p.out + n * p.sn;
  float v[8][4];
#pragma unroll
  for (int nt = 0; nt < 8; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int64_t c = c0 + 8 * nt + 2 * tq + (e & 1);
      const int64_t t = r0 + 8 * (e >> 1);
      v[nt][e] = 0.f;
      if (c < p.C && t < p.T) {
        const int64_t nc = n * p.C + c;
        const float xv = load_as<float>(xn + c * p.sc + t * p.st);
        v[nt][e] = stored_value(
            p.a[nc] * xv + p.b[nc] + p.l2[nc] * (acc[nt][e] + load_as<float>(p.b2 + c)), on);
        store_rounded(on + c * p.sc + t * p.st, v[nt][e]);
      }
    }
  if (p.part == nullptr) return;

  // The tile's moments of each channel over its (up to 64) tokens: a channel's values are
  // spread over the 8 lanes of a column (two rows each) and the 4 warps. Pass 1: sums around
  // the shift -> mean; pass 2: squared deviations from it; each reduced over the lanes by
  // column_sum and over the warps through shared memory in warp order (fixed, deterministic).
  const int64_t tile = blockIdx.x % p.tiles;
  const float count = float(p.T - t0 < kMmaTokens ? p.T - t0 : int64_t(kMmaTokens));
  auto valid = [&](int nt, int e) {
    return c0 + 8 * nt + 2 * tq + (e & 1) < p.C && r0 + 8 * (e >> 1) < p.T;
  };
  float shift[8][2], mean[8][2];
#pragma unroll
  for (int nt = 0; nt < 8; ++nt)
#pragma unroll
    for (int k = 0; k < 2; ++k) {
      const int64_t c = c0 + 8 * nt + 2 * tq + k;
      shift[nt][k] = c < p.C ? out_shift<float>(p, n, c) : 0.f;
    }
  for (int pass = 0; pass < 2; ++pass) {
#pragma unroll
    for (int nt = 0; nt < 8; ++nt)
#pragma unroll
      for (int k = 0; k < 2; ++k) {
        float s = 0.f;
#pragma unroll
        for (int row = 0; row < 2; ++row) {
          const int e = 2 * row + k;
          if (valid(nt, e)) {
            const float d = v[nt][e] - shift[nt][k] - (pass == 0 ? 0.f : mean[nt][k]);
            s += pass == 0 ? d : d * d;
          }
        }
        s = column_sum(s);
        if (g == 0) wsum[warp * kOutTile + 8 * nt + 2 * tq + k] = s;
      }
    __syncthreads();   // every warp's sums written
#pragma unroll
    for (int nt = 0; nt < 8; ++nt)
#pragma unroll
      for (int k = 0; k < 2; ++k) {
        const int cl = 8 * nt + 2 * tq + k;
        const float total = ((wsum[cl] + wsum[kOutTile + cl]) + wsum[2 * kOutTile + cl]) +
                            wsum[3 * kOutTile + cl];
        if (pass == 0) {
          mean[nt][k] = total / count;
        } else if (warp == 0 && g == 0 && c0 + cl < p.C) {
          const int64_t c = c0 + cl;
          store_moments(p.part + (n * p.tiles + tile) * p.C + c,
                        Moments<float>{count, mean[nt][k], total});
          if (tile == 0) p.shift[n * p.C + c] = shift[nt][k];
        }
      }
    __syncthreads();   // every warp read the sums before pass 2 overwrites them
  }
}

}  // namespace mlp_cuda
}  // namespace riformer
