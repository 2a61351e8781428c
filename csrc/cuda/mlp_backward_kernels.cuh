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
// therefore never forms dz: per token tile it runs four GEMM shapes (u, dh, E, F), not five.
// E, F, D are per sample; at the end of each sample a CTA folds them into sample-independent
// weight partials (A, A m + B, l2 applied) and reduces its share of the three per-(n,c) sums
// over its 64 hidden units, so splits may span samples and the scratch does not grow with N.
//
// Kernels, in launch order:
//   1. mlp_backward_partials_kernel, grid (splits, ceil(Hd/kHid), ceil(C/kCh)): a split is a
//      run of tiles of the flattened (sample, tile) order (plan_splits); the CTA (split, hidden
//      chunk, channel chunk) recomputes u and dh of its 64 hidden units for each tile (the u /
//      dh GEMMs read all C channels of z and dO from shared memory; with ceil(C/64) channel
//      chunks they are recomputed that many times, as the forward recomputes its hidden
//      activation per output slice), accumulates its 64 x 64 blocks of E and F in registers,
//      and at each sample's last tile in the split "flushes": E A + D (A m + B) and l2 F into
//      the split's dW1 / dW2 partials (a read-modify-write by the owning thread after the
//      first flush), D into db1's, and, through shared memory, its hidden chunk's share of
//      sum dz, sum dz x~ and sum_j W2 F (plus sum g, sum g x~ from the hidden-chunk-0 CTAs)
//      into the (split, sample) pair's slot. With recompute=False u is read from the saved u.
//   2. mlp_backward_weights_kernel, one thread per element of dW1, dW2, db1, db2: sums its
//      element over the splits in ascending order (with one split phase 1 wrote dW1, dW2, db1
//      in place and only db2 is left: weights_in_place).
//   3. mlp_backward_sums_kernel, one thread per (n, c): the five sums of sample n, its pairs
//      ascending, each pair's hidden chunks ascending.
//   4. (after riformer_kernels.fold.backward_coefficients, in torch ops)
//      mlp_backward_dx_kernel, grid (N * tiles, ceil(C/kCh)): recomputes u, dh, du per hidden
//      chunk and accumulates dz = W1^T du for its 64 channels in registers, then writes
//      dx = P g + Q dz + R (x - m) + S.
//
// Determinism: no atomics at all. Every partial element is written by one thread of one CTA
// (its read-modify-writes in tile order), every output element is produced by one thread that
// adds its terms in a fixed order (splits ascending, pairs ascending, hidden chunks and units
// ascending); the split plan (`plan_splits`) depends only on the shape and dtype, never on the
// SM count or the schedule, so two runs -- on any GPU, with any number of CTAs resident per SM
// -- give bitwise-equal gradients. This is the two-stage partials scheme (as
// TransformerEngine/Apex do for dgamma); a serial split-K turnstile would need no scratch but
// orders CTAs through a global semaphore.
//
// dz between the phases: recomputed in phase 2, never stored. Storing it would cost phase 1 a
// fifth GEMM (dz = W1^T du, which the sums above avoid) plus a write of |x| and a read of |x|;
// recomputing costs phase 2 three GEMM shapes per tile (u, dh, dz) and no traffic beyond x, g
// and dx. (The same choice as the triton small-C path.)
//
// Arithmetic: FFMA in the accumulation type: fp32 for fp32/fp16/bf16 inputs (half types widened
// on load, z and dO kept in fp32), fp64 for fp64 (the oracle path); and, at the end of this
// file, tensor-core (mma.sync) variants of kernels 1 and 4 for fp16/bf16.
// The mixed-precision mode (autocast: fp32 x, g and dx with fp16/bf16 weights, op_t below) runs
// the FFMA kernels with the weights widened on load, every activation in fp32: the reference
// under autocast rounds dO, du, dz and its weight gradients to the half dtype, these kernels
// round nothing but the weights it rounds too. (A tensor-core mixed backward would round dO,
// du, x~ and g for its mma operands; keeping the O(C) gradients within twice the reference's
// error then needs two-term operands, as the cpu and triton kernels use for dh and dz -- not
// built: it should be weighed on a GPU against this one first.)
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
// The split plan's two aims (see plan_splits): partials no larger than this fraction of |x|,
// and, where that cap leaves room, no more splits than give this many phase-1 CTAs (a GPU
// wants several CTAs per SM; 4 x 132, an H100's SM count, as a fixed constant, not a device
// query: the plan, hence every rounding, must not depend on the device).
constexpr int64_t kMinPartialCtas = 528;
constexpr int64_t kScratchPerInputNum = 1, kScratchPerInputDen = 2;   // 1/2

// scalar_t: the activations' type (x, g, dx, the biases); op_t: the GEMMs' (the weights and the
// saved u), the same except in the mixed-precision mode (fp32 activations, fp16/bf16 weights;
// see MlpForwardArgs), which the FFMA kernels run: every activation stays fp32 and only the
// weights are in op_t, widened on load.
template <typename scalar_t, typename acc_t, typename op_t = scalar_t>
struct MlpBackwardArgs {
  const scalar_t* x;
  const scalar_t* g;      // dL/dout, x's strides
  const op_t* u;          // saved u (N, Hd, T), or nullptr: recompute it
  scalar_t* dx;           // phase 2 output, x's strides
  int64_t N, C, Hd, T;
  int64_t sn, sc, st;     // x, g, dx strides (elements)
  int64_t usn, usc, ust;  // saved u strides: sample, hidden unit, token
  int64_t tiles;          // token tiles per sample: ceil(T / kTokens)
  int64_t tiles_per_split;  // a split: this many consecutive tiles of the flattened (n, tile)
  int64_t splits;           // order; it may span samples
  int64_t hchunks;          // ceil(Hd / kHid): grid.y of phase 1
  int64_t weights_from;     // first element the weights kernel reduces (weights_in_place)
  const acc_t* A;         // (N, C) contiguous, statistics dtype
  const acc_t* B;
  const acc_t* mean;
  const acc_t* l2;
  const acc_t* P;         // phase 2 coefficients (N, C)
  const acc_t* Q;
  const acc_t* R;
  const acc_t* S;
  const op_t* w1;         // (Hd, C) row-major
  const scalar_t* b1;     // (Hd)
  const op_t* w2;         // (C, Hd) row-major
  const scalar_t* b2;     // (C)
  // Partials. Per split s: dw1p (Hd, C) = sum over the split's samples of E A + D (A m + B),
  // dw2p (C, Hd) = sum of l2 F, db1p (Hd) = sum of D. Per (split, sample) pair -- index
  // s + n, see pair_range -- sgp, sgxp (C): sum g, sum g x~; and per (pair, hidden chunk)
  // sdzp, sdzxp, sgop (C): that chunk's share of sum dz, sum dz x~, sum_j W2 F.
  acc_t* dw1p;
  acc_t* dw2p;
  acc_t* db1p;
  acc_t* sgp;
  acc_t* sgxp;
  acc_t* sdzp;
  acc_t* sdzxp;
  acc_t* sgop;
  // reduced outputs (accumulation dtype): dw1 (Hd, C), db1 (Hd), dw2 (C, Hd), db2 (C),
  // sums (5, N, C): sum g, sum g x~, sum dz, sum dz x~, sum g o
  acc_t* dw1;
  acc_t* db1;
  acc_t* dw2;
  acc_t* db2;
  acc_t* sums;
};

struct SplitPlan {
  int64_t tiles, tiles_per_split, splits;
};

// A function of the shape and dtypes only (never of the device), so the reduction order -- and
// with it every rounding -- is the same on every GPU. A split is a run of tiles_per_split tiles
// of the flattened (sample, tile) order and may span samples; its weight partials are
// 2 Hd C + Hd accumulation-type values, written once and read once by the weights kernel.
// Two rules for tiles_per_split:
//   bytes:    >= 2 Hd acc / (32 r scalar) keeps the partials under r = 1/2 of the x bytes the
//             split covers (C cancels);
//   parallel: total * CTAs-per-split / kMinPartialCtas tiles still leaves kMinPartialCtas CTAs.
// The larger wins. Where both can hold (a large batch) that is the parallel rule: just enough
// CTAs, and less scratch than the cap. Where they conflict (few samples: N = 1 at S12 stage 1
// would want 98 one-tile splits, 16 |x| of partials written and read again) the scratch cap
// wins: a small problem cannot fill the GPU anyway, and its time goes to traffic. (The triton
// backend's weight-gradient split rule makes the same choice.) tiles_per_split > 0 overrides
// (tests).
inline SplitPlan plan_splits(int64_t N, int64_t T, int64_t C, int64_t Hd, int64_t scalar_size,
                             int64_t acc_size, int64_t tiles_per_split = 0) {
  SplitPlan p;
  p.tiles = (T + kTokens - 1) / kTokens;
  const int64_t total = N * p.tiles;
  int64_t tps = tiles_per_split;
  if (tps <= 0) {
    const int64_t bytes_rule =
        (2 * Hd * acc_size * kScratchPerInputDen + kTokens * scalar_size * kScratchPerInputNum - 1) /
        (kTokens * scalar_size * kScratchPerInputNum);
    const int64_t ctas_per_split = ((Hd + kHid - 1) / kHid) * ((C + kCh - 1) / kCh);
    const int64_t parallel_rule = total * ctas_per_split / kMinPartialCtas;
    tps = bytes_rule > parallel_rule ? bytes_rule : parallel_rule;
  }
  if (tps < 1) tps = 1;
  if (tps > total) tps = total;
  p.tiles_per_split = tps;
  p.splits = (total + tps - 1) / tps;
  return p;
}

// The (split, sample) pairs of sample n: splits s0 .. s1 - 1 overlap it, and pair (s, n) is
// slot s + n (along the flattened tile order each step to a new pair moves s or n or both, so
// s + n is increasing: distinct slots, some unused, never read). pairs = splits + N slots.
__host__ __device__ inline void pair_range(int64_t n, int64_t tiles, int64_t tiles_per_split,
                                           int64_t* s0, int64_t* s1) {
  *s0 = n * tiles / tiles_per_split;
  *s1 = ((n + 1) * tiles - 1) / tiles_per_split + 1;
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

// z = A x + B and dO = l2 g of all C channels of the tile's tokens, handed to
// store(k, j, z, dO): channel k, token j of the tile, 0 past T so the GEMMs read defined values.
// The walk follows x's unit stride (coalesced). Both phase-1/phase-2 kernel families use it,
// each storing into its own shared layout.
template <typename acc_t, typename scalar_t, typename op_t, typename Store>
__device__ __forceinline__ void walk_z_and_do(const MlpBackwardArgs<scalar_t, acc_t, op_t>& p,
                                              int64_t n,
                                              int64_t t0, const Store& store) {
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
    store(k, j, z, d);
  }
}

// The FFMA kernels' layout: zs / dOs [C][kTokens] in the accumulation type.
template <typename acc_t, typename scalar_t, typename op_t>
__device__ __forceinline__ void load_z_and_do(const MlpBackwardArgs<scalar_t, acc_t, op_t>& p,
                                              int64_t n,
                                              int64_t t0, acc_t* zs, acc_t* dOs) {
  walk_z_and_do(p, n, t0, [&](int64_t k, int j, acc_t z, acc_t d) {
    zs[k * kTokens + j] = z;
    dOs[k * kTokens + j] = d;
  });
}

// One hidden chunk (units h0 .. h0 + kHid - 1) of one tile: u (recomputed from zs, or read from
// the saved u), dh = W2^T dO from dOs, then du = dh GELU'(u) into dus and, when hs is given,
// h = GELU(u) into hs ([kHid][kTokens]). Units past Hd are written as 0 (never used); tokens
// past T get du = 0 because dO is 0 there. The caller syncs before and after.
template <typename acc_t, typename scalar_t, typename op_t>
__device__ __forceinline__ void hidden_chunk(const MlpBackwardArgs<scalar_t, acc_t, op_t>& p,
                                             int64_t n,
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

// The CTA's hidden chunk's share of the per-(n, c) sums for channel c0 + tid (threads
// tid < kCh), from the chunk's flushed blocks in shared memory (we[j][c] = W1 E, wf[c][j] =
// W2 F, ds[j] = D), summed over j in order, into the (pair, chunk) slot: both phase-1 kernels.
template <typename Args, typename acc_t>
__device__ __forceinline__ void store_chunk_sums(const Args& p, int tid, int64_t c0, int64_t h0,
                                                 int64_t pair, const acc_t* ds, const acc_t* we,
                                                 const acc_t* wf) {
  if (tid >= kCh || c0 + tid >= p.C) return;
  const int64_t c = c0 + tid;
  const int64_t hn = p.Hd - h0 < kHid ? p.Hd - h0 : int64_t(kHid);
  acc_t sdz = acc_t(0), sdzx = acc_t(0), sgo = acc_t(0);
  for (int64_t j = 0; j < hn; ++j) {
    sdz += load_as<acc_t>(p.w1 + (h0 + j) * p.C + c) * ds[j];
    sdzx += we[j * kCh + tid];
    sgo += wf[tid * kHid + j];
  }
  const int64_t slot = (pair * p.hchunks + blockIdx.y) * p.C + c;
  p.sdzp[slot] = sdz;
  p.sdzxp[slot] = sdzx;
  p.sgop[slot] = sgo;
}

template <typename scalar_t, typename acc_t, typename op_t = scalar_t>
__global__ void __launch_bounds__(kThreads)
mlp_backward_partials_kernel(MlpBackwardArgs<scalar_t, acc_t, op_t> p) {
  RIFORMER_DYNAMIC_SMEM(acc_t, smem);
  acc_t* const zs = smem;                          // [C][kTokens]
  acc_t* const dOs = zs + p.C * kTokens;           // [C][kTokens]
  acc_t* const xcs = dOs + p.C * kTokens;          // [kCh][kTokens]: x - m of the chunk
  acc_t* const gcs = xcs + kCh * kTokens;          // [kCh][kTokens]: g of the chunk
  acc_t* const hs = gcs + kCh * kTokens;           // [kHid][kTokens]
  acc_t* const dus = hs + kHid * kTokens;          // [kHid][kTokens]
  // At a sample's end (flush) the tile arrays are free again and hold the W-weighted blocks
  // the per-(n, c) sums reduce over: we[j][c] = W1[j,c] E[j,c] over xcs + gcs, wf[c][j] =
  // W2[c,j] F[c,j] over hs + dus (kHid * kCh elements each), ds[j] = D[j] over zs.
  acc_t* const we = xcs;
  acc_t* const wf = hs;
  acc_t* const ds = zs;
  static_assert(2 * kCh * kTokens == kHid * kCh && 2 * kHid * kTokens == kCh * kHid,
                "the flush blocks fit the tile arrays they reuse");

  const int64_t split = blockIdx.x;
  const int64_t gt0 = split * p.tiles_per_split;
  int64_t gt1 = gt0 + p.tiles_per_split;
  if (gt1 > p.N * p.tiles) gt1 = p.N * p.tiles;
  const int64_t h0 = int64_t(blockIdx.y) * kHid;
  const int64_t c0 = int64_t(blockIdx.z) * kCh;
  const int tid = threadIdx.x;

  // E / F block mapping: hidden units jg*4 .. +3 of the chunk, channels cg*4 .. +3 of the chunk.
  const int jg = tid / kBG, cg = tid % kBG;
  acc_t e[kBR][kBR], f[kBR][kBR];   // e[j][c] = E[h0+.., c0+..], f[c][j] = F[c0+.., h0+..]
  acc_t d[kBR], sg[kBR], sgx[kBR];  // of the current sample
#pragma unroll
  for (int a = 0; a < kBR; ++a) {
    d[a] = sg[a] = sgx[a] = acc_t(0);
#pragma unroll
    for (int b = 0; b < kBR; ++b) e[a][b] = f[a][b] = acc_t(0);
  }
  bool first_flush = true;

  for (int64_t gt = gt0; gt < gt1; ++gt) {
    const int64_t n = gt / p.tiles;
    const int64_t t0 = (gt % p.tiles) * kTokens;
    const scalar_t* xn = p.x + n * p.sn;
    const scalar_t* gn = p.g + n * p.sn;
    // The previous tile's (or flush's) shared arrays are fully read before they are overwritten.
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

    if (gt + 1 < gt1 && (gt + 1) % p.tiles != 0) continue;
    // Flush: the sample's E, F, D fold into the split's weight partials (each element owned by
    // one thread: a read-modify-write after the first flush, in tile order), and its per-(n, c)
    // shares go to the (split, sample) pair's slot.
    const int64_t pair = split + n;
    __syncthreads();  // every thread is done with this tile's shared arrays
#pragma unroll
    for (int a = 0; a < kBR; ++a) {
      const int64_t j = h0 + jg * kBR + a;
#pragma unroll
      for (int b = 0; b < kBR; ++b) {
        const int64_t c = c0 + cg * kBR + b;
        const bool valid = j < p.Hd && c < p.C;
        acc_t w1e = acc_t(0), w2f = acc_t(0);
        if (valid) {
          const int64_t nc = n * p.C + c;
          // dW1 = E A + D (A m + B): A m + B is z at x = m
          const acc_t v1 = p.A[nc] * e[a][b] + (p.A[nc] * p.mean[nc] + p.B[nc]) * d[a];
          const acc_t v2 = p.l2[nc] * f[b][a];
          acc_t* q1 = p.dw1p + (split * p.Hd + j) * p.C + c;
          acc_t* q2 = p.dw2p + (split * p.C + c) * p.Hd + j;
          *q1 = first_flush ? v1 : *q1 + v1;
          *q2 = first_flush ? v2 : *q2 + v2;
          w1e = load_as<acc_t>(p.w1 + j * p.C + c) * e[a][b];
          w2f = load_as<acc_t>(p.w2 + c * p.Hd + j) * f[b][a];
        }
        we[(jg * kBR + a) * kCh + cg * kBR + b] = w1e;
        wf[(cg * kBR + b) * kHid + jg * kBR + a] = w2f;
      }
      if (cg == 0) {
        ds[jg * kBR + a] = j < p.Hd ? d[a] : acc_t(0);
        if (blockIdx.z == 0 && j < p.Hd) {
          acc_t* q = p.db1p + split * p.Hd + j;
          *q = first_flush ? d[a] : *q + d[a];
        }
      }
      const int64_t c = c0 + cg * kBR + a;
      if (blockIdx.y == 0 && jg == 0 && c < p.C) {
        p.sgp[pair * p.C + c] = sg[a];
        p.sgxp[pair * p.C + c] = sgx[a];
      }
    }
    __syncthreads();  // we, wf, ds complete
    store_chunk_sums(p, tid, c0, h0, pair, ds, we, wf);
    first_flush = false;
#pragma unroll
    for (int a = 0; a < kBR; ++a) {
      d[a] = sg[a] = sgx[a] = acc_t(0);
#pragma unroll
      for (int b = 0; b < kBR; ++b) e[a][b] = f[a][b] = acc_t(0);
    }
  }
}

// With one split the split's partials are the weight gradients: phase 1 writes dW1, dW2 and
// db1 in place (the partial pointers alias the outputs) and the weights kernel reduces db2
// only. Without this, a single-split plan -- every late-stage shape: at C = 512, 7 x 7 the
// weight gradients are 3.3 |x| at N = 64 and 84 |x| at N = 1 -- would write them as partials,
// read them back and write them again. Both launchers (the emulated entry and the torch
// binding) call it after filling the pointers and before launching.
template <typename scalar_t, typename acc_t, typename op_t>
inline void weights_in_place(MlpBackwardArgs<scalar_t, acc_t, op_t>* p) {
  p->weights_from = 0;
  if (p->splits != 1) return;
  p->dw1p = p->dw1;
  p->dw2p = p->dw2;
  p->db1p = p->db1;
  p->weights_from = 2 * p->Hd * p->C + p->Hd;
}

// Phase 1's buffers, as both launchers hand them over: part = dw1p, dw2p, db1p, sgp, sgxp,
// sdzp, sdzxp, sgop (the scratch, MlpBackwardArgs' order; the first three unused with one
// split), out = dw1, db1, dw2, db2, sums. Then weights_in_place.
template <typename scalar_t, typename acc_t, typename op_t>
inline void set_phase1_buffers(MlpBackwardArgs<scalar_t, acc_t, op_t>* p, acc_t* const* part,
                               acc_t* const* out) {
  p->dw1p = part[0];
  p->dw2p = part[1];
  p->db1p = part[2];
  p->sgp = part[3];
  p->sgxp = part[4];
  p->sdzp = part[5];
  p->sdzxp = part[6];
  p->sgop = part[7];
  p->dw1 = out[0];
  p->db1 = out[1];
  p->dw2 = out[2];
  p->db2 = out[3];
  p->sums = out[4];
  weights_in_place(p);
}

// Threads of the weights kernel: one per element it reduces.
template <typename scalar_t, typename acc_t, typename op_t>
inline int64_t weights_elements(const MlpBackwardArgs<scalar_t, acc_t, op_t>& p) {
  return 2 * p.Hd * p.C + p.Hd + p.C - p.weights_from;
}

// Elements in order: dW1 (Hd * C), dW2 (C * Hd), db1 (Hd), db2 (C), from p.weights_from on;
// one thread each, splits ascending (db2: samples ascending, then the sample's pairs).
template <typename scalar_t, typename acc_t, typename op_t = scalar_t>
__global__ void __launch_bounds__(kThreads)
mlp_backward_weights_kernel(MlpBackwardArgs<scalar_t, acc_t, op_t> p) {
  const int64_t i = p.weights_from + int64_t(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t HC = p.Hd * p.C;
  acc_t acc = acc_t(0);
  if (i < HC) {
    for (int64_t s = 0; s < p.splits; ++s) acc += p.dw1p[s * HC + i];
    p.dw1[i] = acc;
  } else if (i < 2 * HC) {
    const int64_t q = i - HC;
    for (int64_t s = 0; s < p.splits; ++s) acc += p.dw2p[s * HC + q];
    p.dw2[q] = acc;
  } else if (i < 2 * HC + p.Hd) {
    const int64_t j = i - 2 * HC;
    for (int64_t s = 0; s < p.splits; ++s) acc += p.db1p[s * p.Hd + j];
    p.db1[j] = acc;
  } else if (i < 2 * HC + p.Hd + p.C) {
    const int64_t c = i - 2 * HC - p.Hd;
    for (int64_t n = 0; n < p.N; ++n) {
      int64_t s0, s1;
      pair_range(n, p.tiles, p.tiles_per_split, &s0, &s1);
      acc_t sg = acc_t(0);
      for (int64_t s = s0; s < s1; ++s) sg += p.sgp[(s + n) * p.C + c];
      acc += p.l2[n * p.C + c] * sg;
    }
    p.db2[c] = acc;
  }
}

// One thread per (n, c): the five sums of docs/design.md section 3 from sample n's pairs
// (ascending), each pair's hidden chunks ascending.
template <typename scalar_t, typename acc_t, typename op_t = scalar_t>
__global__ void __launch_bounds__(kThreads)
mlp_backward_sums_kernel(MlpBackwardArgs<scalar_t, acc_t, op_t> p) {
  const int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (i >= p.N * p.C) return;
  const int64_t n = i / p.C, c = i % p.C;
  int64_t s0, s1;
  pair_range(n, p.tiles, p.tiles_per_split, &s0, &s1);
  acc_t sg = acc_t(0), sgx = acc_t(0), sdz = acc_t(0), sdzx = acc_t(0), sgo = acc_t(0);
  for (int64_t s = s0; s < s1; ++s) {
    const int64_t pair = s + n;
    sg += p.sgp[pair * p.C + c];
    sgx += p.sgxp[pair * p.C + c];
    for (int64_t hc = 0; hc < p.hchunks; ++hc) {
      const int64_t slot = (pair * p.hchunks + hc) * p.C + c;
      sdz += p.sdzp[slot];
      sdzx += p.sdzxp[slot];
      sgo += p.sgop[slot];
    }
  }
  const int64_t NC = p.N * p.C;
  p.sums[i] = sg;
  p.sums[NC + i] = sgx;
  p.sums[2 * NC + i] = sdz;
  p.sums[3 * NC + i] = sdzx;
  p.sums[4 * NC + i] = sgo + load_as<acc_t>(p.b2 + c) * sg;
}

template <typename scalar_t, typename acc_t, typename op_t = scalar_t>
__global__ void __launch_bounds__(kThreads)
mlp_backward_dx_kernel(MlpBackwardArgs<scalar_t, acc_t, op_t> p) {
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

// Half elements of the phase-1 mma kernel's tiles, rounded up to a multiple of 8 (16 bytes) so
// the fp32 flush blocks after them are aligned.
__host__ __device__ inline int64_t mma_half_elems(int64_t C) {
  return (2 * kTokens * (C + kPad) + 4 * 64 * (kTokens + kPad) + 7) / 8 * 8;
}
inline int64_t partials_mma_smem_bytes(int64_t C) {
  return mma_half_elems(C) * 2 + (2 * kHid * kCh + kHid) * 4;
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
  walk_z_and_do(p, n, t0, [&](int64_t k, int j, float z, float d) {
    store_rounded(zsT + j * ZS + k, z);
    store_rounded(dOsT + j * ZS + k, d);
  });
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

// minBlocksPerSM = 1 explicitly: with the bare bound ptxas (CUDA 13.0, sm_80) capped this kernel
// at 128 registers and spilled 32 bytes once the per-sample flush was added.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads, 1)
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
  // fp32 flush blocks after the half arrays (see partials_mma_smem_bytes): we[j][c] =
  // W1[j,c] E[j,c], wf[c][j] = W2[c,j] F[c,j], ds[j] = D[j].
  float* const we = reinterpret_cast<float*>(smem + mma_half_elems(p.C));
  float* const wf = we + kHid * kCh;
  float* const ds = wf + kCh * kHid;

  const int64_t split = blockIdx.x;
  const int64_t gt0 = split * p.tiles_per_split;
  int64_t gt1 = gt0 + p.tiles_per_split;
  if (gt1 > p.N * p.tiles) gt1 = p.N * p.tiles;
  const int64_t h0 = int64_t(blockIdx.y) * kHid;
  const int64_t c0 = int64_t(blockIdx.z) * kCh;
  const int tid = threadIdx.x;
  const int lane = tid % 32, warp = tid / 32, g = lane / 4, tq = lane % 4;
  const int mt = warp % 4, nb = 4 * (warp / 4);   // E / F: m-tile, first of 4 n-tiles

  float e[4][4], f[4][4];   // e: rows j = h0 + 16 mt.., cols c; f: rows c = c0 + 16 mt.., cols j
#pragma unroll
  for (int a = 0; a < 4; ++a)
#pragma unroll
    for (int b = 0; b < 4; ++b) e[a][b] = f[a][b] = 0.f;
  // Of the current sample: D (threads 0..63: hidden unit tid of the chunk), sum g and sum g x~
  // (threads 64..127: channel tid - 64 of the chunk), in fp32 from the rounded shared values.
  float red0 = 0.f, red1 = 0.f;
  bool first_flush = true;

  for (int64_t gt = gt0; gt < gt1; ++gt) {
    const int64_t n = gt / p.tiles;
    const int64_t t0 = (gt % p.tiles) * kTokens;
    const scalar_t* xn = p.x + n * p.sn;
    const scalar_t* gn = p.g + n * p.sn;
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

    if (gt + 1 < gt1 && (gt + 1) % p.tiles != 0) continue;
    // Flush (as in the FFMA kernel): D first, since the dW1 fold needs D of every row.
    const int64_t pair = split + n;
    if (tid < kHid) {
      const int64_t j = h0 + tid;
      ds[tid] = j < p.Hd ? red0 : 0.f;
      if (blockIdx.z == 0 && j < p.Hd) {
        float* q = p.db1p + split * p.Hd + j;
        *q = first_flush ? red0 : *q + red0;
      }
    } else if (tid < kHid + kCh) {
      const int64_t c = c0 + tid - kHid;
      if (blockIdx.y == 0 && c < p.C) {
        p.sgp[pair * p.C + c] = red0;
        p.sgxp[pair * p.C + c] = red1;
      }
    }
    __syncthreads();  // ds complete
#pragma unroll
    for (int b = 0; b < 4; ++b)
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const int row = 16 * mt + g + 8 * (q >> 1);
        const int col = (nb + b) * 8 + 2 * tq + (q & 1);
        const int64_t j = h0 + row, c = c0 + col;          // E[j][c]
        float w1e = 0.f;
        if (j < p.Hd && c < p.C) {
          const int64_t nc = n * p.C + c;
          const float v = p.A[nc] * e[b][q] + (p.A[nc] * p.mean[nc] + p.B[nc]) * ds[row];
          float* q1 = p.dw1p + (split * p.Hd + j) * p.C + c;
          *q1 = first_flush ? v : *q1 + v;
          w1e = load_as<float>(p.w1 + j * p.C + c) * e[b][q];
        }
        we[row * kCh + col] = w1e;
        const int64_t cf = c0 + row, jf = h0 + col;        // F[c][j]
        float w2f = 0.f;
        if (cf < p.C && jf < p.Hd) {
          const float v = p.l2[n * p.C + cf] * f[b][q];
          float* q2 = p.dw2p + (split * p.C + cf) * p.Hd + jf;
          *q2 = first_flush ? v : *q2 + v;
          w2f = load_as<float>(p.w2 + cf * p.Hd + jf) * f[b][q];
        }
        wf[row * kHid + col] = w2f;
      }
    __syncthreads();  // we, wf complete
    store_chunk_sums(p, tid, c0, h0, pair, ds, we, wf);
    first_flush = false;
    red0 = red1 = 0.f;
#pragma unroll
    for (int a = 0; a < 4; ++a)
#pragma unroll
      for (int b = 0; b < 4; ++b) e[a][b] = f[a][b] = 0.f;
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
