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
template <typename scalar_t, typename acc_t>
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
  const scalar_t* w1;    // (Hd, C) row-major
  const scalar_t* b1;    // (Hd)
  const scalar_t* w2;    // (C, Hd) row-major
  const scalar_t* b2;    // (C)
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

template <typename acc_t, typename T>
__device__ __forceinline__ acc_t load_as(const T* p) {
  return static_cast<acc_t>(*p);
}

// Exact GELU, u Phi(u) with Phi from erf: erff on the device and in the emulator alike (the
// CPU kernels' vectorisable approximation in block_math.h is not used here).
__device__ __forceinline__ float gelu_exact(float u) {
  return 0.5f * u * (1.f + erff(u * 0.70710678118654752440f));
}
__device__ __forceinline__ double gelu_exact(double u) {
  return 0.5 * u * (1.0 + erf(u * 0.70710678118654752440));
}

inline int64_t smem_bytes(int64_t C, int64_t acc_size) {
  return (C + kHidChunk) * kTokens * acc_size;
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
mlp_forward_kernel(MlpForwardArgs<scalar_t, acc_t> p) {
  RIFORMER_DYNAMIC_SMEM(acc_t, smem);
  acc_t* const zs = smem;                 // [C][kTokens]
  acc_t* const hs = smem + p.C * kTokens;  // [kHidChunk][kTokens]

  const int64_t n = blockIdx.x / p.tiles;
  const int64_t t0 = (blockIdx.x % p.tiles) * int64_t(kTokens);
  const int64_t c0 = int64_t(blockIdx.y) * kOutTile;
  const int tid = threadIdx.x;
  const scalar_t* xn = p.x + n * p.sn;
  const acc_t* An = p.A + n * p.C;
  const acc_t* Bn = p.B + n * p.C;

  // Prologue. The walk order follows the unit stride so global loads coalesce: tokens fastest
  // for NCHW, channels fastest for channels_last.
  const bool tokens_fastest = p.st == 1;
  for (int64_t i = tid; i < p.C * kTokens; i += kThreads) {
    const int64_t k = tokens_fastest ? i / kTokens : i % p.C;
    const int j = int(tokens_fastest ? i % kTokens : i / p.C);
    const int64_t t = t0 + j;
    acc_t z = acc_t(0);
    if (t < p.T) z = An[k] * load_as<acc_t>(xn + k * p.sc + t * p.st) + Bn[k];
    zs[k * kTokens + j] = z;
  }

  const int tg = tid % kTokenGroups;   // tokens tg*kRT .. +kRT-1
  const int rg = tid / kTokenGroups;   // rows rg*kRows .. +kRows-1
  acc_t acc[kRows][kRT];
#pragma unroll
  for (int r = 0; r < kRows; ++r)
#pragma unroll
    for (int q = 0; q < kRT; ++q) acc[r][q] = acc_t(0);

  for (int64_t h0 = 0; h0 < p.Hd; h0 += kHidChunk) {
    // First chunk: the prologue's zs is complete. Later chunks: every thread finished reading
    // the previous chunk's hs in GEMM2 before it is overwritten.
    __syncthreads();
    acc_t u[kRows][kRT];
    const scalar_t* w1row[kRows];
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
      for (int q = 0; q < kRT; ++q)
        hs[(rg * kRows + r) * kTokens + tg * kRT + q] =
            live[r] ? gelu_exact(u[r][q] + bias) : acc_t(0);
    }
    __syncthreads();  // hs complete before any thread reads other threads' rows

    const int64_t hn = p.Hd - h0 < kHidChunk ? p.Hd - h0 : int64_t(kHidChunk);
    const scalar_t* w2row[kRows];
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
      for (int q = 0; q < kRT; ++q) hv[q] = hs[j * kTokens + tg * kRT + q];
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        const acc_t w = out_live[r] ? load_as<acc_t>(w2row[r] + j) : acc_t(0);
#pragma unroll
        for (int q = 0; q < kRT; ++q) acc[r][q] += w * hv[q];
      }
    }
  }

  scalar_t* on = p.out + n * p.sn;
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const int64_t c = c0 + rg * kRows + r;
    if (c >= p.C) continue;
    const acc_t a = p.a[n * p.C + c], b = p.b[n * p.C + c], l2 = p.l2[n * p.C + c];
    const acc_t b2 = load_as<acc_t>(p.b2 + c);
#pragma unroll
    for (int q = 0; q < kRT; ++q) {
      const int64_t t = t0 + tg * kRT + q;
      if (t >= p.T) continue;
      const acc_t xv = load_as<acc_t>(xn + c * p.sc + t * p.st);
      on[c * p.sc + t * p.st] = static_cast<scalar_t>(a * xv + b + l2 * (acc[r][q] + b2));
    }
  }
}

}  // namespace mlp_cuda
}  // namespace riformer
