// The fused MLP backward of the folded block (docs/design.md section 3), plain CUDA (no torch
// headers): compiled by nvcc (csrc/cuda/mlp_backward.cu) and, as C++, against the SIMT emulator
// (csrc/emu/cuda_emu.h, entry csrc/emu/emulated_kernels.cpp).
//
// With z = A x + B, x~ = x - m (m: the channel mean), u = W1 z + b1, h = GELU(u), dO = l2 g,
// dh = W2^T dO, du = dh GELU'(u), dz = W1^T du, per sample n:
//
//   dW2 = sum_t dO h^T          = l2 (.) F,          F[c,j] = sum_t g[c,t] h[j,t]
//   dW1 = sum_t du z^T          = E A + D (A m + B), E[j,k] = sum_t du[j,t] x~[k,t],
//                                                    D[j]   = sum_t du[j,t]      (= db1's share)
//   sum_t dz[k,t]      = sum_j W1[j,k] D[j]
//   sum_t dz[k,t] x~   = sum_j W1[j,k] E[j,k]
//   sum_t g[c,t] o[c,t] = sum_j W2[c,j] F[c,j] + b2[c] sum_t g[c,t]
//
// (z = A x~ + (A m + B), so du z^T splits into the centred product E and the bias D.) Phase 1
// therefore never forms dz: per token tile it runs four GEMM shapes (u, dh, E, F), not five,
// and the five per-(n,c) sums and every weight gradient follow from per-sample E, F, D and the
// two g sums by O(N Hd C) reductions.
//
// Kernels, in launch order:
//   1. mlp_backward_partials_kernel, grid (splits, ceil(Hd/kHid), ceil(C/kCh)): a split is a
//      run of token tiles of ONE sample (never straddling samples, so its partials are
//      per-sample); the CTA (split, hidden chunk, channel chunk) recomputes u and dh of its 64
//      hidden units for each tile (the u / dh GEMMs read all C channels of z and dO from shared
//      memory; with ceil(C/64) channel chunks they are recomputed that many times, as the
//      forward recomputes its hidden activation per output slice), keeps its 64 x 64 blocks of E
//      and F in registers across the split's tiles, and writes them once into the split's slot
//      of the partials buffer; D (by the channel-chunk-0 CTAs) and sum g, sum g x~ (by the
//      hidden-chunk-0 CTAs) likewise. With recompute=False u is read from the saved u instead of
//      being recomputed.
//   2. mlp_backward_weights_kernel, one thread per element of dW1, dW2, db1, db2: sums its
//      element over the splits in ascending order.
//   3. mlp_backward_sums_kernel, one thread per (n, c): the five sums of sample n, splits
//      ascending, then hidden units ascending.
//   4. (after riformer_kernels.fold.backward_coefficients, in torch ops)
//      mlp_backward_dx_kernel, grid (N * tiles, ceil(C/kCh)): recomputes u, dh, du per hidden
//      chunk and accumulates dz = W1^T du for its 64 channels in registers, then writes
//      dx = P g + Q dz + R (x - m) + S.
//
// Determinism: no atomics at all. Every output element is produced by one thread that adds its
// terms in a fixed order (tiles ascending inside a split, splits ascending, hidden units
// ascending); the split plan (`plan_splits`) depends only on the shape and dtype, never on the SM count or
// the schedule, so two runs -- on any GPU, with any number of CTAs resident per SM -- give
// bitwise-equal gradients. This is the two-stage partials scheme (as TransformerEngine/Apex do
// for dgamma); a serial split-K turnstile would need no scratch but orders CTAs through a
// global semaphore.
//
// dz between the phases: recomputed in phase 2, never stored. Storing it would cost phase 1 a
// fifth GEMM (dz = W1^T du, which the sums above avoid) plus a write of |x| and a read of |x|;
// recomputing costs phase 2 three GEMM shapes per tile (u, dh, dz) and no traffic beyond x, g
// and dx. (The same choice as the triton small-C path.)
//
// Arithmetic: FFMA in the accumulation type: fp32 for fp32/fp16/bf16 inputs (half types widened
// on load, z and dO kept in fp32), fp64 for fp64 (the oracle path); and, at the end of this
// file, tensor-core (mma.sync) variants of kernels 1 and 4 for fp16/bf16.
// Layouts: NCHW or channels_last, the token index t = h * W + w one stride (NCHW: st = 1,
// sc = T; channels_last: st = C, sc = 1); g has x's strides; saved u is (N, Hd, T) with its own
// strides (the forward writes it hidden-contiguous per token).
#pragma once

#include <math.h>
#include <stdint.h>

#if !defined(RIFORMER_EMULATE)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

#include "mlp_forward_kernels.cuh"   // widen / load_as / store_rounded, RIFORMER_DYNAMIC_SMEM

namespace riformer {
namespace mlp_bwd_cuda {

using mlp_cuda::load_as;
using mlp_cuda::store_rounded;

constexpr int kTokens = 32;   // tokens per tile
constexpr int kHid = 64;      // hidden units per chunk
constexpr int kCh = 64;       // channels per chunk (E / F blocks, dz slice)
constexpr int kThreads = 256;
// Hidden-chunk GEMMs (u, dh: kHid x kTokens): each thread 2 hidden units x 4 tokens.
constexpr int kHT = 4;                             // tokens per thread
constexpr int kHTG = kTokens / kHT;                // 8 token groups
constexpr int kHR = kHid * kHTG / kThreads;        // 2 hidden units per thread
static_assert(kHR * (kThreads / kHTG) == kHid, "hidden GEMM tile covers the chunk");
// E / F blocks (kHid x kCh): each thread 4 x 4.
constexpr int kBR = 4;
constexpr int kBG = kCh / kBR;                     // 16 channel groups
static_assert((kHid / kBR) * kBG == kThreads, "E / F tile covers the 64 x 64 block");
// dz slice (kCh x kTokens): each thread 2 channels x 4 tokens.
constexpr int kDR = kCh * kHTG / kThreads;         // 2
static_assert(kDR * (kThreads / kHTG) == kCh, "dz tile covers the channel slice");
// The split plan's two aims (see plan_splits): at least this many phase-1 CTAs where the shape
// has the tiles for them (a GPU wants several CTAs per SM; 4 x 132, an H100's SM count, as a
// fixed constant, not a device query), and partials no larger than this fraction of |x|.
constexpr int64_t kMinPartialCtas = 528;
constexpr int64_t kScratchPerInputNum = 1, kScratchPerInputDen = 2;   // 1/2

template <typename scalar_t, typename acc_t>
struct MlpBackwardArgs {
  const scalar_t* x;
  const scalar_t* g;      // dL/dout, x's strides
  const scalar_t* u;      // saved u (N, Hd, T), or nullptr: recompute it
  scalar_t* dx;           // phase 2 output, x's strides
  int64_t N, C, Hd, T;
  int64_t sn, sc, st;     // x, g, dx strides (elements)
  int64_t usn, usc, ust;  // saved u strides: sample, hidden unit, token
  int64_t tiles;          // token tiles per sample: ceil(T / kTokens)
  int64_t tiles_per_split, splits_per_sample;
  const acc_t* A;         // (N, C) contiguous, statistics dtype
  const acc_t* B;
  const acc_t* mean;
  const acc_t* l2;
  const acc_t* P;         // phase 2 coefficients (N, C)
  const acc_t* Q;
  const acc_t* R;
  const acc_t* S;
  const scalar_t* w1;     // (Hd, C) row-major
  const scalar_t* b1;     // (Hd)
  const scalar_t* w2;     // (C, Hd) row-major
  const scalar_t* b2;     // (C)
  // partials, split s at offset s * (size of one): E (Hd, C), F (C, Hd), D (Hd), SG, SGx (C)
  acc_t* E;
  acc_t* F;
  acc_t* D;
  acc_t* SG;
  acc_t* SGx;
  // reduced outputs (accumulation dtype): dw1 (Hd, C), db1 (Hd), dw2 (C, Hd), db2 (C),
  // sums (5, N, C): sum g, sum g x~, sum dz, sum dz x~, sum g o
  acc_t* dw1;
  acc_t* db1;
  acc_t* dw2;
  acc_t* db2;
  acc_t* sums;
};

struct SplitPlan {
  int64_t tiles, tiles_per_split, splits_per_sample;
};

// A function of the shape and dtypes only (never of the device), so the reduction order -- and
// with it every rounding -- is the same on every GPU. A split's partials are 2 Hd C + Hd + 2 C
// accumulation-type values; tiles_per_split >= 2 Hd acc / (32 r scalar) keeps them under
// r = 1/2 of the x bytes the split covers (C cancels), unless that leaves fewer than
// kMinPartialCtas CTAs: then parallelism wins. Splits never cross a sample (the partials are
// per sample), so a sample of few tiles still costs one split: for C >= 320 at S12's late
// stages the partials exceed |x| (docs/kernels.md). tiles_per_split > 0 overrides (tests).
inline SplitPlan plan_splits(int64_t N, int64_t T, int64_t C, int64_t Hd, int64_t scalar_size,
                             int64_t acc_size, int64_t tiles_per_split = 0) {
  SplitPlan p;
  p.tiles = (T + kTokens - 1) / kTokens;
  int64_t tps = tiles_per_split;
  if (tps <= 0) {
    const int64_t bytes_rule =
        (2 * Hd * acc_size * kScratchPerInputDen + kTokens * scalar_size * kScratchPerInputNum - 1) /
        (kTokens * scalar_size * kScratchPerInputNum);
    const int64_t ctas_per_split = ((Hd + kHid - 1) / kHid) * ((C + kCh - 1) / kCh);
    const int64_t parallel_rule = N * p.tiles * ctas_per_split / kMinPartialCtas;
    tps = bytes_rule < parallel_rule ? bytes_rule : parallel_rule;
  }
  if (tps < 1) tps = 1;
  if (tps > p.tiles) tps = p.tiles;
  p.tiles_per_split = tps;
  p.splits_per_sample = (p.tiles + tps - 1) / tps;
  return p;
}

// Shared memory of phase 1: zs, dOs [C][kTokens] (all channels: the u / dh GEMMs reduce over
// C), xcs, gcs [kCh][kTokens] (the CTA's channel chunk), hs, dus [kHid][kTokens].
inline int64_t partials_smem_bytes(int64_t C, int64_t acc_size) {
  return (2 * C + 2 * kCh + 2 * kHid) * kTokens * acc_size;
}
// Shared memory of phase 2: zs, dOs [C][kTokens], dus [kHid][kTokens].
inline int64_t dx_smem_bytes(int64_t C, int64_t acc_size) {
  return (2 * C + kHid) * kTokens * acc_size;
}

__device__ __forceinline__ float normal_pdf(float u) {
  return 0.39894228040143267794f * expf(-0.5f * u * u);
}
__device__ __forceinline__ double normal_pdf(double u) {
  return 0.39894228040143267794 * exp(-0.5 * u * u);
}
__device__ __forceinline__ float normal_cdf(float u) {
  return 0.5f * (1.f + erff(u * 0.70710678118654752440f));
}
__device__ __forceinline__ double normal_cdf(double u) {
  return 0.5 * (1.0 + erf(u * 0.70710678118654752440));
}

// z = A x + B and dO = l2 g of all C channels of the tile's tokens into zs / dOs ([C][kTokens],
// 0 past T so the GEMMs read defined values). The walk follows x's unit stride (coalesced).
template <typename acc_t, typename scalar_t>
__device__ __forceinline__ void load_z_and_do(const MlpBackwardArgs<scalar_t, acc_t>& p, int64_t n,
                                              int64_t t0, acc_t* zs, acc_t* dOs) {
  const scalar_t* xn = p.x + n * p.sn;
  const scalar_t* gn = p.g + n * p.sn;
  const bool tokens_fastest = p.st == 1;
  for (int64_t i = threadIdx.x; i < p.C * kTokens; i += kThreads) {
    const int64_t k = tokens_fastest ? i / kTokens : i % p.C;
    const int j = int(tokens_fastest ? i % kTokens : i / p.C);
    const int64_t t = t0 + j;
    acc_t z = acc_t(0), d = acc_t(0);
    if (t < p.T) {
      const int64_t off = k * p.sc + t * p.st;
      z = p.A[n * p.C + k] * load_as<acc_t>(xn + off) + p.B[n * p.C + k];
      d = p.l2[n * p.C + k] * load_as<acc_t>(gn + off);
    }
    zs[k * kTokens + j] = z;
    dOs[k * kTokens + j] = d;
  }
}

// One hidden chunk (units h0 .. h0 + kHid - 1) of one tile: u (recomputed from zs, or read from
// the saved u), dh = W2^T dO from dOs, then du = dh GELU'(u) into dus and, when hs is given,
// h = GELU(u) into hs ([kHid][kTokens]). Units past Hd are written as 0 (never used); tokens
// past T get du = 0 because dO is 0 there. The caller syncs before and after.
template <typename acc_t, typename scalar_t>
__device__ __forceinline__ void hidden_chunk(const MlpBackwardArgs<scalar_t, acc_t>& p, int64_t n,
                                             int64_t t0, int64_t h0, const acc_t* zs,
                                             const acc_t* dOs, acc_t* hs, acc_t* dus) {
  const int tg = threadIdx.x % kHTG;   // tokens tg*kHT .. +kHT-1
  const int rg = threadIdx.x / kHTG;   // hidden units rg*kHR .. +kHR-1 of the chunk
  acc_t u[kHR][kHT], dh[kHR][kHT];
  bool live[kHR];
  int64_t jj[kHR];
#pragma unroll
  for (int r = 0; r < kHR; ++r) {
    jj[r] = h0 + rg * kHR + r;
    live[r] = jj[r] < p.Hd;
    if (!live[r]) jj[r] = 0;   // a valid row to read; its results are discarded
#pragma unroll
    for (int q = 0; q < kHT; ++q) u[r][q] = dh[r][q] = acc_t(0);
  }
  const bool recompute = p.u == nullptr;
  for (int64_t k = 0; k < p.C; ++k) {
    acc_t zv[kHT], dv[kHT];
#pragma unroll
    for (int q = 0; q < kHT; ++q) {
      zv[q] = zs[k * kTokens + tg * kHT + q];
      dv[q] = dOs[k * kTokens + tg * kHT + q];
    }
#pragma unroll
    for (int r = 0; r < kHR; ++r) {
      const acc_t w2 = load_as<acc_t>(p.w2 + k * p.Hd + jj[r]);   // W2[k, j]: column j of W2
      const acc_t w1 = recompute ? load_as<acc_t>(p.w1 + jj[r] * p.C + k) : acc_t(0);
#pragma unroll
      for (int q = 0; q < kHT; ++q) {
        dh[r][q] += w2 * dv[q];
        u[r][q] += w1 * zv[q];
      }
    }
  }
#pragma unroll
  for (int r = 0; r < kHR; ++r) {
    const int jl = rg * kHR + r;
    const acc_t bias = load_as<acc_t>(p.b1 + jj[r]);
#pragma unroll
    for (int q = 0; q < kHT; ++q) {
      const int64_t t = t0 + tg * kHT + q;
      acc_t uu;
      if (recompute) {
        uu = u[r][q] + bias;
      } else {
        // Past T the saved u has no token: any finite value will do (dO is 0 there).
        uu = t < p.T ? load_as<acc_t>(p.u + n * p.usn + jj[r] * p.usc + t * p.ust) : acc_t(0);
      }
      const acc_t cdf = normal_cdf(uu);
      dus[jl * kTokens + tg * kHT + q] = live[r] ? dh[r][q] * (cdf + uu * normal_pdf(uu)) : acc_t(0);
      if (hs != nullptr) hs[jl * kTokens + tg * kHT + q] = live[r] ? uu * cdf : acc_t(0);
    }
  }
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
mlp_backward_partials_kernel(MlpBackwardArgs<scalar_t, acc_t> p) {
  RIFORMER_DYNAMIC_SMEM(acc_t, smem);
  acc_t* const zs = smem;                          // [C][kTokens]
  acc_t* const dOs = zs + p.C * kTokens;           // [C][kTokens]
  acc_t* const xcs = dOs + p.C * kTokens;          // [kCh][kTokens]: x - m of the chunk
  acc_t* const gcs = xcs + kCh * kTokens;          // [kCh][kTokens]: g of the chunk
  acc_t* const hs = gcs + kCh * kTokens;           // [kHid][kTokens]
  acc_t* const dus = hs + kHid * kTokens;          // [kHid][kTokens]

  const int64_t split = blockIdx.x;
  const int64_t n = split / p.splits_per_sample;
  const int64_t tile0 = (split % p.splits_per_sample) * p.tiles_per_split;
  int64_t tile1 = tile0 + p.tiles_per_split;
  if (tile1 > p.tiles) tile1 = p.tiles;
  const int64_t h0 = int64_t(blockIdx.y) * kHid;
  const int64_t c0 = int64_t(blockIdx.z) * kCh;
  const int tid = threadIdx.x;
  const scalar_t* xn = p.x + n * p.sn;
  const scalar_t* gn = p.g + n * p.sn;

  // E / F block mapping: hidden units jg*4 .. +3 of the chunk, channels cg*4 .. +3 of the chunk.
  const int jg = tid / kBG, cg = tid % kBG;
  acc_t e[kBR][kBR], f[kBR][kBR];   // e[j][c] = E[h0+.., c0+..], f[c][j] = F[c0+.., h0+..]
  acc_t d[kBR], sg[kBR], sgx[kBR];
#pragma unroll
  for (int a = 0; a < kBR; ++a) {
    d[a] = sg[a] = sgx[a] = acc_t(0);
#pragma unroll
    for (int b = 0; b < kBR; ++b) e[a][b] = f[a][b] = acc_t(0);
  }

  for (int64_t tile = tile0; tile < tile1; ++tile) {
    const int64_t t0 = tile * kTokens;
    // The previous tile's shared tiles are fully read before they are overwritten.
    __syncthreads();
    load_z_and_do(p, n, t0, zs, dOs);
    // This chunk's centred x and g, channel-major; 0 outside (channel >= C or token >= T).
    const bool tokens_fastest = p.st == 1;
    for (int i = tid; i < kCh * kTokens; i += kThreads) {
      const int kl = tokens_fastest ? i / kTokens : i % kCh;
      const int j = tokens_fastest ? i % kTokens : i / kCh;
      const int64_t c = c0 + kl, t = t0 + j;
      acc_t xc = acc_t(0), gv = acc_t(0);
      if (c < p.C && t < p.T) {
        const int64_t off = c * p.sc + t * p.st;
        xc = load_as<acc_t>(xn + off) - p.mean[n * p.C + c];
        gv = load_as<acc_t>(gn + off);
      }
      xcs[kl * kTokens + j] = xc;
      gcs[kl * kTokens + j] = gv;
    }
    __syncthreads();  // zs, dOs complete: the hidden GEMMs reduce over every channel
    hidden_chunk(p, n, t0, h0, zs, dOs, hs, dus);
    __syncthreads();  // hs, dus, xcs, gcs complete

    for (int j = 0; j < kTokens; ++j) {
      acc_t dv[kBR], hv[kBR], xv[kBR], gv[kBR];
#pragma unroll
      for (int a = 0; a < kBR; ++a) {
        dv[a] = dus[(jg * kBR + a) * kTokens + j];
        hv[a] = hs[(jg * kBR + a) * kTokens + j];
        xv[a] = xcs[(cg * kBR + a) * kTokens + j];
        gv[a] = gcs[(cg * kBR + a) * kTokens + j];
      }
#pragma unroll
      for (int a = 0; a < kBR; ++a) {
#pragma unroll
        for (int b = 0; b < kBR; ++b) {
          e[a][b] += dv[a] * xv[b];
          f[b][a] += gv[b] * hv[a];
        }
        d[a] += dv[a];
        sg[a] += gv[a];
        sgx[a] += gv[a] * xv[a];
      }
    }
  }

  // One slot per split; every element of it is written by exactly one thread of one CTA.
  acc_t* E = p.E + split * p.Hd * p.C;
  acc_t* F = p.F + split * p.C * p.Hd;
#pragma unroll
  for (int a = 0; a < kBR; ++a) {
    const int64_t j = h0 + jg * kBR + a;
#pragma unroll
    for (int b = 0; b < kBR; ++b) {
      const int64_t c = c0 + cg * kBR + b;
      if (j < p.Hd && c < p.C) {
        E[j * p.C + c] = e[a][b];
        F[c * p.Hd + j] = f[b][a];
      }
    }
    // D depends on the hidden unit only, g's sums on the channel only: one CTA row writes each.
    if (blockIdx.z == 0 && cg == 0 && j < p.Hd) p.D[split * p.Hd + j] = d[a];
    const int64_t c = c0 + cg * kBR + a;
    if (blockIdx.y == 0 && jg == 0 && c < p.C) {
      p.SG[split * p.C + c] = sg[a];
      p.SGx[split * p.C + c] = sgx[a];
    }
  }
}

// Elements in order: dW1 (Hd * C), dW2 (C * Hd), db1 (Hd), db2 (C); one thread each, splits
// ascending (samples ascending, then the sample's splits). The loops walk samples and splits
// separately: no 64-bit division per term (which spilled at sm_90 in fp64).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
mlp_backward_weights_kernel(MlpBackwardArgs<scalar_t, acc_t> p) {
  const int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t HC = p.Hd * p.C;
  const int64_t sps = p.splits_per_sample;
  acc_t acc = acc_t(0);
  if (i < HC) {
    const int64_t j = i / p.C, k = i % p.C;
    for (int64_t n = 0; n < p.N; ++n) {
      const int64_t nk = n * p.C + k;
      // dW1 = E A + D (A m + B): A m + B is z at x = m
      const acc_t a = p.A[nk], zm = p.A[nk] * p.mean[nk] + p.B[nk];
      for (int64_t s = n * sps; s < (n + 1) * sps; ++s)
        acc += a * p.E[s * HC + i] + zm * p.D[s * p.Hd + j];
    }
    p.dw1[i] = acc;
  } else if (i < 2 * HC) {
    const int64_t q = i - HC, c = q / p.Hd;
    for (int64_t n = 0; n < p.N; ++n) {
      const acc_t l2 = p.l2[n * p.C + c];
      for (int64_t s = n * sps; s < (n + 1) * sps; ++s) acc += l2 * p.F[s * HC + q];
    }
    p.dw2[q] = acc;
  } else if (i < 2 * HC + p.Hd) {
    const int64_t j = i - 2 * HC;
    for (int64_t s = 0; s < p.N * sps; ++s) acc += p.D[s * p.Hd + j];
    p.db1[j] = acc;
  } else if (i < 2 * HC + p.Hd + p.C) {
    const int64_t c = i - 2 * HC - p.Hd;
    for (int64_t n = 0; n < p.N; ++n) {
      const acc_t l2 = p.l2[n * p.C + c];
      for (int64_t s = n * sps; s < (n + 1) * sps; ++s) acc += l2 * p.SG[s * p.C + c];
    }
    p.db2[c] = acc;
  }
}

// One thread per (n, c): the five sums of docs/design.md section 3 from sample n's partials.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
mlp_backward_sums_kernel(MlpBackwardArgs<scalar_t, acc_t> p) {
  const int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (i >= p.N * p.C) return;
  const int64_t n = i / p.C, c = i % p.C;
  const int64_t s0 = n * p.splits_per_sample, s1 = s0 + p.splits_per_sample;
  const int64_t HC = p.Hd * p.C;
  acc_t sg = acc_t(0), sgx = acc_t(0), sdz = acc_t(0), sdzx = acc_t(0), sgo = acc_t(0);
  for (int64_t s = s0; s < s1; ++s) {
    sg += p.SG[s * p.C + c];
    sgx += p.SGx[s * p.C + c];
  }
  for (int64_t j = 0; j < p.Hd; ++j) {
    acc_t dj = acc_t(0), ejc = acc_t(0), fcj = acc_t(0);
    for (int64_t s = s0; s < s1; ++s) {
      dj += p.D[s * p.Hd + j];
      ejc += p.E[s * HC + j * p.C + c];
      fcj += p.F[s * HC + c * p.Hd + j];
    }
    const acc_t w1 = load_as<acc_t>(p.w1 + j * p.C + c);
    sdz += w1 * dj;
    sdzx += w1 * ejc;
    sgo += load_as<acc_t>(p.w2 + c * p.Hd + j) * fcj;
  }
  const int64_t NC = p.N * p.C;
  p.sums[i] = sg;
  p.sums[NC + i] = sgx;
  p.sums[2 * NC + i] = sdz;
  p.sums[3 * NC + i] = sdzx;
  p.sums[4 * NC + i] = sgo + load_as<acc_t>(p.b2 + c) * sg;
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
mlp_backward_dx_kernel(MlpBackwardArgs<scalar_t, acc_t> p) {
  RIFORMER_DYNAMIC_SMEM(acc_t, smem);
  acc_t* const zs = smem;                  // [C][kTokens]
  acc_t* const dOs = zs + p.C * kTokens;   // [C][kTokens]
  acc_t* const dus = dOs + p.C * kTokens;  // [kHid][kTokens]

  const int64_t n = blockIdx.x / p.tiles;
  const int64_t t0 = (blockIdx.x % p.tiles) * int64_t(kTokens);
  const int64_t c0 = int64_t(blockIdx.y) * kCh;
  const int tid = threadIdx.x;
  const int tg = tid % kHTG, rg = tid / kHTG;   // tokens tg*4 .. +3, channels rg*2 .. +1

  load_z_and_do(p, n, t0, zs, dOs);
  acc_t dz[kDR][kHT];
  bool live[kDR];
  int64_t cc[kDR];
#pragma unroll
  for (int r = 0; r < kDR; ++r) {
    cc[r] = c0 + rg * kDR + r;
    live[r] = cc[r] < p.C;
    if (!live[r]) cc[r] = 0;
#pragma unroll
    for (int q = 0; q < kHT; ++q) dz[r][q] = acc_t(0);
  }
  for (int64_t h0 = 0; h0 < p.Hd; h0 += kHid) {
    __syncthreads();  // zs, dOs complete (first chunk) / the previous chunk's dus fully read
    hidden_chunk(p, n, t0, h0, zs, dOs, static_cast<acc_t*>(nullptr), dus);
    __syncthreads();  // dus complete
    const int64_t hn = p.Hd - h0 < kHid ? p.Hd - h0 : int64_t(kHid);
    for (int64_t jl = 0; jl < hn; ++jl) {
      acc_t dv[kHT];
#pragma unroll
      for (int q = 0; q < kHT; ++q) dv[q] = dus[jl * kTokens + tg * kHT + q];
#pragma unroll
      for (int r = 0; r < kDR; ++r) {
        const acc_t w = load_as<acc_t>(p.w1 + (h0 + jl) * p.C + cc[r]);
#pragma unroll
        for (int q = 0; q < kHT; ++q) dz[r][q] += w * dv[q];
      }
    }
  }

  const scalar_t* xn = p.x + n * p.sn;
  const scalar_t* gn = p.g + n * p.sn;
  scalar_t* dxn = p.dx + n * p.sn;
#pragma unroll
  for (int r = 0; r < kDR; ++r) {
    if (!live[r]) continue;
    const int64_t nc = n * p.C + cc[r];
    const acc_t P = p.P[nc], Q = p.Q[nc], R = p.R[nc], S = p.S[nc], m = p.mean[nc];
#pragma unroll
    for (int q = 0; q < kHT; ++q) {
      const int64_t t = t0 + tg * kHT + q;
      if (t >= p.T) continue;
      const int64_t off = cc[r] * p.sc + t * p.st;
      const acc_t v = P * load_as<acc_t>(gn + off) + Q * dz[r][q] +
                      R * (load_as<acc_t>(xn + off) - m) + S;
      store_rounded(dxn + off, v);
    }
  }
}


// ---------------------------------------------------------------------------------------------
// Tensor-core variants for fp16/bf16 (sm_80+): mma.sync m16n8k16, fp32 accumulation, the same
// grids, tiles, partials and fixed summation orders as the FFMA kernels above (so equally
// deterministic), for C and Hd multiples of 16 (whole k-steps); other shapes take FFMA.
// Every operand of an mma is rounded to the input dtype first, as the torch reference rounds
// its half tensors: z, dO = l2 g, h, du, x - m. Sums outside the GEMMs (D, sum g, sum g x~, the
// reductions, the dx epilogue) run in fp32 on the same rounded values where they pair with a
// GEMM (D with E, so dW1 = E A + D (A m + B) stays consistent).
//
// Operands (fragment maps in ptx.cuh):
//   u  = W1 z      A: W1 rows (k contiguous: one 32-bit load per register), B: zsT[token][k]
//   dh = W2^T dO   A: W2 columns (two 16-bit loads per register), B: dOsT[token][c]
//   E  = du x~^T   A: dus[j][token], B: xcs[c][token]          (k = tokens)
//   F  = g h^T     A: gcs[c][token], B: hs[j][token]           (k = tokens)
//   dz = W1^T du   A: W1 columns (two 16-bit loads), B: duT[token][j]   (phase 2)
// Shared rows are padded by kPad halves so the 8 rows a B load touches fall in distinct banks.
// Warps (8): in the hidden GEMMs warp w owns hidden m-tile w % 4 and token n-tiles
// 2 (w / 4) .. +1; in E / F it owns m-tile w % 4 and n-tiles 4 (w / 4) .. +3 of the 64 x 64
// block; in dz channel m-tile w % 4 and token n-tiles 2 (w / 4) .. +1.
// ---------------------------------------------------------------------------------------------

constexpr int kPad = 8;

inline bool mma_eligible(int64_t C, int64_t Hd) { return C % 16 == 0 && Hd % 16 == 0; }

inline int64_t partials_mma_smem_bytes(int64_t C) {
  return (2 * kTokens * (C + kPad) + 4 * 64 * (kTokens + kPad)) * 2;
}
inline int64_t dx_mma_smem_bytes(int64_t C) {
  return (2 * kTokens * (C + kPad) + kTokens * (kHid + kPad)) * 2;
}

// Register of A[row][col], A[row][col + 1] for A = M^T, M row-major with `ld` columns (so the
// two elements are a column of M, ld apart); 0 for rows past `rows`.
template <typename T>
__device__ __forceinline__ uint32_t load_transposed_pair(const T* m, int64_t row, int64_t rows,
                                                         int64_t ld, int64_t col) {
  if (row >= rows) return 0u;
  const uint32_t lo = *reinterpret_cast<const unsigned short*>(m + col * ld + row);
  const uint32_t hi = *reinterpret_cast<const unsigned short*>(m + (col + 1) * ld + row);
  return lo | (hi << 16);
}

// z and dO = l2 g of all C channels of the tile, rounded, token-major ([kTokens][C + kPad]).
template <typename scalar_t>
__device__ __forceinline__ void load_z_and_do_mma(const MlpBackwardArgs<scalar_t, float>& p,
                                                  int64_t n, int64_t t0, scalar_t* zsT,
                                                  scalar_t* dOsT) {
  const int64_t ZS = p.C + kPad;
  const scalar_t* xn = p.x + n * p.sn;
  const scalar_t* gn = p.g + n * p.sn;
  const bool tokens_fastest = p.st == 1;
  for (int64_t i = threadIdx.x; i < p.C * kTokens; i += kThreads) {
    const int64_t k = tokens_fastest ? i / kTokens : i % p.C;
    const int j = int(tokens_fastest ? i % kTokens : i / p.C);
    const int64_t t = t0 + j;
    float z = 0.f, d = 0.f;
    if (t < p.T) {
      const int64_t off = k * p.sc + t * p.st;
      z = p.A[n * p.C + k] * load_as<float>(xn + off) + p.B[n * p.C + k];
      d = p.l2[n * p.C + k] * load_as<float>(gn + off);
    }
    store_rounded(zsT + j * ZS + k, z);
    store_rounded(dOsT + j * ZS + k, d);
  }
}

// u and dh of hidden chunk h0 for this warp's 16 hidden units x 16 tokens, then
// store(jl, tok, h, du) for each of its elements (jl: unit within the chunk; h, du in fp32,
// du = 0 and h = 0 for units past Hd).
template <typename scalar_t, typename Store>
__device__ __forceinline__ void hidden_chunk_mma(const MlpBackwardArgs<scalar_t, float>& p,
                                                 int64_t n, int64_t t0, int64_t h0,
                                                 const scalar_t* zsT, const scalar_t* dOsT,
                                                 const Store& store) {
  const int64_t ZS = p.C + kPad;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int g = lane / 4, tq = lane % 4;
  const int mt = warp % 4, nt0 = 2 * (warp / 4);
  const int64_t j0 = h0 + 16 * mt + g;   // this lane's A rows: j0 and j0 + 8
  const bool recompute = p.u == nullptr;
  float u[2][4], dh[2][4];
#pragma unroll
  for (int a = 0; a < 2; ++a)
#pragma unroll
    for (int e = 0; e < 4; ++e) u[a][e] = dh[a][e] = 0.f;
  for (int64_t k0 = 0; k0 < p.C; k0 += 16) {
    uint32_t a2[4];
    a2[0] = load_transposed_pair(p.w2, j0, p.Hd, p.Hd, k0 + 2 * tq);
    a2[1] = load_transposed_pair(p.w2, j0 + 8, p.Hd, p.Hd, k0 + 2 * tq);
    a2[2] = load_transposed_pair(p.w2, j0, p.Hd, p.Hd, k0 + 2 * tq + 8);
    a2[3] = load_transposed_pair(p.w2, j0 + 8, p.Hd, p.Hd, k0 + 2 * tq + 8);
#pragma unroll
    for (int a = 0; a < 2; ++a) {
      const scalar_t* bp = dOsT + ((nt0 + a) * 8 + g) * ZS + k0 + 2 * tq;
      const uint32_t b[2] = {mlp_cuda::shared_pair(bp), mlp_cuda::shared_pair(bp + 8)};
      mlp_cuda::mma16816(dh[a], a2, b, p.w1);
    }
    if (recompute) {
      uint32_t a1[4];
      a1[0] = mlp_cuda::load_pair(p.w1, j0, p.Hd, p.C, k0 + 2 * tq);
      a1[1] = mlp_cuda::load_pair(p.w1, j0 + 8, p.Hd, p.C, k0 + 2 * tq);
      a1[2] = mlp_cuda::load_pair(p.w1, j0, p.Hd, p.C, k0 + 2 * tq + 8);
      a1[3] = mlp_cuda::load_pair(p.w1, j0 + 8, p.Hd, p.C, k0 + 2 * tq + 8);
#pragma unroll
      for (int a = 0; a < 2; ++a) {
        const scalar_t* bp = zsT + ((nt0 + a) * 8 + g) * ZS + k0 + 2 * tq;
        const uint32_t b[2] = {mlp_cuda::shared_pair(bp), mlp_cuda::shared_pair(bp + 8)};
        mlp_cuda::mma16816(u[a], a1, b, p.w1);
      }
    }
  }
#pragma unroll
  for (int a = 0; a < 2; ++a)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int jl = 16 * mt + g + 8 * (e >> 1);
      const int64_t j = h0 + jl;
      const int tok = (nt0 + a) * 8 + 2 * tq + (e & 1);
      const int64_t t = t0 + tok;
      float h = 0.f, du = 0.f;
      if (j < p.Hd) {
        float uu;
        if (recompute) uu = u[a][e] + load_as<float>(p.b1 + j);
        else uu = t < p.T ? load_as<float>(p.u + n * p.usn + j * p.usc + t * p.ust) : 0.f;
        const float cdf = normal_cdf(uu);
        h = uu * cdf;
        du = dh[a][e] * (cdf + uu * normal_pdf(uu));
      }
      store(jl, tok, h, du);
    }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
mlp_backward_partials_mma_kernel(MlpBackwardArgs<scalar_t, float> p) {
  static_assert(kThreads == 8 * 32 && kHid == 64 && kCh == 64 && kTokens == 32,
                "the warp tiling above assumes 8 warps, 64 x 64 blocks and 32-token tiles");
  RIFORMER_DYNAMIC_SMEM(scalar_t, smem);
  const int64_t ZS = p.C + kPad;
  constexpr int TS = kTokens + kPad;
  scalar_t* const zsT = smem;                    // [kTokens][ZS]
  scalar_t* const dOsT = zsT + kTokens * ZS;     // [kTokens][ZS]
  scalar_t* const hs = dOsT + kTokens * ZS;      // [kHid][TS]
  scalar_t* const dus = hs + kHid * TS;          // [kHid][TS]
  scalar_t* const xcs = dus + kHid * TS;         // [kCh][TS]
  scalar_t* const gcs = xcs + kCh * TS;          // [kCh][TS]

  const int64_t split = blockIdx.x;
  const int64_t n = split / p.splits_per_sample;
  const int64_t tile0 = (split % p.splits_per_sample) * p.tiles_per_split;
  int64_t tile1 = tile0 + p.tiles_per_split;
  if (tile1 > p.tiles) tile1 = p.tiles;
  const int64_t h0 = int64_t(blockIdx.y) * kHid;
  const int64_t c0 = int64_t(blockIdx.z) * kCh;
  const int tid = threadIdx.x;
  const int lane = tid % 32, warp = tid / 32, g = lane / 4, tq = lane % 4;
  const int mt = warp % 4, nb = 4 * (warp / 4);   // E / F: m-tile, first of 4 n-tiles
  const scalar_t* xn = p.x + n * p.sn;
  const scalar_t* gn = p.g + n * p.sn;

  float e[4][4], f[4][4];   // e: rows j = h0 + 16 mt.., cols c; f: rows c = c0 + 16 mt.., cols j
#pragma unroll
  for (int a = 0; a < 4; ++a)
#pragma unroll
    for (int b = 0; b < 4; ++b) e[a][b] = f[a][b] = 0.f;
  // D (threads 0..63: hidden unit tid of the chunk), sum g and sum g x~ (threads 64..127:
  // channel tid - 64 of the chunk), in fp32 from the rounded shared values.
  float red0 = 0.f, red1 = 0.f;

  for (int64_t tile = tile0; tile < tile1; ++tile) {
    const int64_t t0 = tile * kTokens;
    __syncthreads();  // the previous tile's shared tiles are fully read
    load_z_and_do_mma(p, n, t0, zsT, dOsT);
    const bool tokens_fastest = p.st == 1;
    for (int i = tid; i < kCh * kTokens; i += kThreads) {
      const int kl = tokens_fastest ? i / kTokens : i % kCh;
      const int j = tokens_fastest ? i % kTokens : i / kCh;
      const int64_t c = c0 + kl, t = t0 + j;
      float xc = 0.f, gv = 0.f;
      if (c < p.C && t < p.T) {
        const int64_t off = c * p.sc + t * p.st;
        xc = load_as<float>(xn + off) - p.mean[n * p.C + c];
        gv = load_as<float>(gn + off);
      }
      store_rounded(xcs + kl * TS + j, xc);
      store_rounded(gcs + kl * TS + j, gv);
    }
    __syncthreads();  // zsT, dOsT complete
    hidden_chunk_mma(p, n, t0, h0, zsT, dOsT, [&](int jl, int tok, float h, float du) {
      store_rounded(hs + jl * TS + tok, h);
      store_rounded(dus + jl * TS + tok, du);
    });
    __syncthreads();  // hs, dus, xcs, gcs complete

#pragma unroll
    for (int k0 = 0; k0 < kTokens; k0 += 16) {
      const int r0 = 16 * mt + g;
      uint32_t ad[4], ag[4];
      ad[0] = mlp_cuda::shared_pair(dus + r0 * TS + k0 + 2 * tq);
      ad[1] = mlp_cuda::shared_pair(dus + (r0 + 8) * TS + k0 + 2 * tq);
      ad[2] = mlp_cuda::shared_pair(dus + r0 * TS + k0 + 2 * tq + 8);
      ad[3] = mlp_cuda::shared_pair(dus + (r0 + 8) * TS + k0 + 2 * tq + 8);
      ag[0] = mlp_cuda::shared_pair(gcs + r0 * TS + k0 + 2 * tq);
      ag[1] = mlp_cuda::shared_pair(gcs + (r0 + 8) * TS + k0 + 2 * tq);
      ag[2] = mlp_cuda::shared_pair(gcs + r0 * TS + k0 + 2 * tq + 8);
      ag[3] = mlp_cuda::shared_pair(gcs + (r0 + 8) * TS + k0 + 2 * tq + 8);
#pragma unroll
      for (int b = 0; b < 4; ++b) {
        const int col = (nb + b) * 8 + g;
        const uint32_t bx[2] = {mlp_cuda::shared_pair(xcs + col * TS + k0 + 2 * tq),
                                mlp_cuda::shared_pair(xcs + col * TS + k0 + 2 * tq + 8)};
        mlp_cuda::mma16816(e[b], ad, bx, p.w1);
        const uint32_t bh[2] = {mlp_cuda::shared_pair(hs + col * TS + k0 + 2 * tq),
                                mlp_cuda::shared_pair(hs + col * TS + k0 + 2 * tq + 8)};
        mlp_cuda::mma16816(f[b], ag, bh, p.w1);
      }
    }
    if (tid < kHid) {
      for (int j = 0; j < kTokens; ++j) red0 += mlp_cuda::widen(dus[tid * TS + j]);
    } else if (tid < kHid + kCh) {
      const int kl = tid - kHid;
      for (int j = 0; j < kTokens; ++j) {
        const float gv = mlp_cuda::widen(gcs[kl * TS + j]);
        red0 += gv;
        red1 += gv * mlp_cuda::widen(xcs[kl * TS + j]);
      }
    }
  }

  float* E = p.E + split * p.Hd * p.C;
  float* F = p.F + split * p.C * p.Hd;
#pragma unroll
  for (int b = 0; b < 4; ++b)
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const int64_t row = 16 * mt + g + 8 * (q >> 1);
      const int64_t col = (nb + b) * 8 + 2 * tq + (q & 1);
      const int64_t j = h0 + row, c = c0 + col;          // E[j][c]
      if (j < p.Hd && c < p.C) E[j * p.C + c] = e[b][q];
      const int64_t cf = c0 + row, jf = h0 + col;        // F[c][j]
      if (cf < p.C && jf < p.Hd) F[cf * p.Hd + jf] = f[b][q];
    }
  if (tid < kHid) {
    const int64_t j = h0 + tid;
    if (blockIdx.z == 0 && j < p.Hd) p.D[split * p.Hd + j] = red0;
  } else if (tid < kHid + kCh) {
    const int64_t c = c0 + tid - kHid;
    if (blockIdx.y == 0 && c < p.C) {
      p.SG[split * p.C + c] = red0;
      p.SGx[split * p.C + c] = red1;
    }
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
mlp_backward_dx_mma_kernel(MlpBackwardArgs<scalar_t, float> p) {
  RIFORMER_DYNAMIC_SMEM(scalar_t, smem);
  const int64_t ZS = p.C + kPad;
  constexpr int HS = kHid + kPad;
  scalar_t* const zsT = smem;                  // [kTokens][ZS]
  scalar_t* const dOsT = zsT + kTokens * ZS;   // [kTokens][ZS]
  scalar_t* const duT = dOsT + kTokens * ZS;   // [kTokens][HS]

  const int64_t n = blockIdx.x / p.tiles;
  const int64_t t0 = (blockIdx.x % p.tiles) * int64_t(kTokens);
  const int64_t c0 = int64_t(blockIdx.y) * kCh;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4, tq = lane % 4;
  const int mt = warp % 4, nt0 = 2 * (warp / 4);
  const int64_t cr = c0 + 16 * mt + g;   // this lane's A rows (channels): cr and cr + 8

  load_z_and_do_mma(p, n, t0, zsT, dOsT);
  float dz[2][4];
#pragma unroll
  for (int a = 0; a < 2; ++a)
#pragma unroll
    for (int e = 0; e < 4; ++e) dz[a][e] = 0.f;
  for (int64_t h0 = 0; h0 < p.Hd; h0 += kHid) {
    __syncthreads();  // zsT, dOsT complete (first chunk) / the previous chunk's duT fully read
    hidden_chunk_mma(p, n, t0, h0, zsT, dOsT, [&](int jl, int tok, float, float du) {
      store_rounded(duT + tok * HS + jl, du);
    });
    __syncthreads();  // duT complete
    const int64_t hn = p.Hd - h0 < kHid ? p.Hd - h0 : int64_t(kHid);
    for (int64_t k0 = 0; k0 < hn; k0 += 16) {
      uint32_t a[4];
      a[0] = load_transposed_pair(p.w1, cr, p.C, p.C, h0 + k0 + 2 * tq);
      a[1] = load_transposed_pair(p.w1, cr + 8, p.C, p.C, h0 + k0 + 2 * tq);
      a[2] = load_transposed_pair(p.w1, cr, p.C, p.C, h0 + k0 + 2 * tq + 8);
      a[3] = load_transposed_pair(p.w1, cr + 8, p.C, p.C, h0 + k0 + 2 * tq + 8);
#pragma unroll
      for (int b = 0; b < 2; ++b) {
        const scalar_t* bp = duT + ((nt0 + b) * 8 + g) * HS + k0 + 2 * tq;
        const uint32_t bb[2] = {mlp_cuda::shared_pair(bp), mlp_cuda::shared_pair(bp + 8)};
        mlp_cuda::mma16816(dz[b], a, bb, p.w1);
      }
    }
  }

  const scalar_t* xn = p.x + n * p.sn;
  const scalar_t* gn = p.g + n * p.sn;
  scalar_t* dxn = p.dx + n * p.sn;
#pragma unroll
  for (int b = 0; b < 2; ++b)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int64_t c = cr + 8 * (e >> 1);
      const int64_t t = t0 + (nt0 + b) * 8 + 2 * tq + (e & 1);
      if (c >= p.C || t >= p.T) continue;
      const int64_t nc = n * p.C + c, off = c * p.sc + t * p.st;
      const float v = p.P[nc] * load_as<float>(gn + off) + p.Q[nc] * dz[b][e] +
                      p.R[nc] * (load_as<float>(xn + off) - p.mean[nc]) + p.S[nc];
      store_rounded(dxn + off, v);
    }
}

}  // namespace mlp_bwd_cuda
}  // namespace riformer
