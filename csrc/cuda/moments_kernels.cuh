// The moments kernels (riformer::moments), plain CUDA: no torch headers, so the same source is
// compiled by nvcc (csrc/cuda/moments.cu holds the torch binding) and, as C++, against the SIMT
// emulator (csrc/emu/cuda_emu.h; csrc/emu/emulated_kernels.cpp is that build's entry point).
//
// Two stages, both with a fixed reduction order (deterministic):
//   1. partials: one block per (row group, H*W chunk) writes (count, mean, M2)
//      per (n, c, chunk). Splitting H*W over blocks is what lets small
//      batches fill the GPU (N=2, C=64, 56x56 gives 896 blocks for NCHW).
//   2. merge: one warp per (n, c) folds its chunks with Chan's formula:
//      lane l takes chunks l, l+32, ... in order, then a fixed shuffle tree.
// Every partial is taken of x - x[n, c, 0] (the row's first value; row_shift below) and the
// merge adds that shift back. Why: a chunk mean of fp32 data with a large common offset is
// rounded to the offset's ulp (1e4: ~5e-4), and Chan's between-chunk term delta^2 n_a n_b / n
// amplifies that error (measured under the emulator: 2.4e-5 relative variance error at offset
// 1e4 / std 1.5, against 8e-7 for the CPU kernel); shifted values are O(std) and their means
// keep full precision. Subtracting the shift is exact for values within a factor 2 of it.
#pragma once

#include <stdint.h>

#include "../common/block_math.h"

namespace riformer {
namespace moments_kernels {

constexpr int kItems = 4;       // values per thread per chunk (in registers)
constexpr int kWarp = 32;
constexpr int kMaxThreads = 256;
constexpr int kClRowLanes = 8;  // channels_last block: 32 channels x 8 rows

template <typename acc_t>
__device__ __forceinline__ Moments<acc_t> shfl_down(const Moments<acc_t>& m,
                                                    int offset) {
  Moments<acc_t> r;
  r.n = __shfl_down_sync(0xffffffffu, m.n, offset);
  r.mean = __shfl_down_sync(0xffffffffu, m.mean, offset);
  r.m2 = __shfl_down_sync(0xffffffffu, m.m2, offset);
  return r;
}

// Lane 0 ends with the merge of all 32 lanes, always in the same tree.
template <typename acc_t>
__device__ __forceinline__ Moments<acc_t> warp_merge(Moments<acc_t> m) {
#pragma unroll
  for (int off = kWarp / 2; off > 0; off /= 2)
    m = chan_merge<acc_t>(m, shfl_down<acc_t>(m, off));
  return m;
}

// Moments of up to kItems register values, `valid` of which are real.
// Pass 1 shifts by v[0] (exactly 0 for constant data), pass 2 is the
// corrected two-pass around the pass-1 mean, as on the CPU.
template <typename acc_t>
__device__ __forceinline__ Moments<acc_t> register_moments(const acc_t (&v)[kItems],
                                                           int valid) {
  if (valid <= 0) return moments_empty<acc_t>();
  acc_t s = 0;
#pragma unroll
  for (int i = 0; i < kItems; ++i)
    if (i < valid) s += v[i] - v[0];
  const acc_t cnt = acc_t(valid);
  const acc_t m = v[0] + s / cnt;
  acc_t s1 = 0, s2 = 0;
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    if (i < valid) {
      const acc_t d = v[i] - m;
      s1 += d;
      s2 += d * d;
    }
  }
  return moments_from_shifted_sums<acc_t>(cnt, m, s1, s2);
}

// The value every partial of row (n, c) is taken around: its first element.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t row_shift(const scalar_t* __restrict__ x, int64_t n,
                                           int64_t c, int64_t C, int64_t T,
                                           bool channels_last) {
  return static_cast<acc_t>(channels_last ? x[n * T * C + c] : x[(n * C + c) * T]);
}

// Stage 1, NCHW: block b handles chunk k of row (n, c); thread t reads
// positions t, t + blockDim, ... (coalesced).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kMaxThreads)
moments_partial_nchw(const scalar_t* __restrict__ x, int64_t T, int64_t K,
                     Moments<acc_t>* __restrict__ part) {
  __shared__ Moments<acc_t> warp_part[kMaxThreads / kWarp];
  const int64_t b = blockIdx.x;
  const int64_t row = b / K, k = b % K;
  const int threads = blockDim.x;
  const int64_t chunk = int64_t(threads) * kItems;
  const int64_t t0 = k * chunk;
  // A ternary, not min(): int64 min() is a CUDA overload the emulator need not provide.
  const int64_t len = chunk < T - t0 ? chunk : T - t0;
  const scalar_t* p = x + row * T + t0;
  const acc_t shift = static_cast<acc_t>(x[row * T]);

  acc_t v[kItems];
  int valid = 0;
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    const int64_t pos = threadIdx.x + int64_t(i) * threads;
    v[i] = pos < len ? static_cast<acc_t>(p[pos]) - shift : acc_t(0);
    valid += pos < len ? 1 : 0;
  }
  Moments<acc_t> m = warp_merge<acc_t>(register_moments<acc_t>(v, valid));
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  if (lane == 0) warp_part[warp] = m;
  __syncthreads();
  if (threadIdx.x == 0) {
    Moments<acc_t> acc = warp_part[0];
    for (int w = 1; w < threads / kWarp; ++w)
      acc = chan_merge<acc_t>(acc, warp_part[w]);
    part[b] = acc;
  }
}

// Stage 1, channels_last: sample n is a [T, C] row-major matrix. Block
// (32 x 8) handles 32 channels of a chunk of rows; threadIdx.x walks channels
// (coalesced), threadIdx.y picks rows y, y+8, ... Partials are [N, K, C].
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kWarp * kClRowLanes)
moments_partial_cl(const scalar_t* __restrict__ x, int64_t T, int64_t C,
                   int64_t K, int64_t CG, Moments<acc_t>* __restrict__ part) {
  __shared__ Moments<acc_t> row_part[kClRowLanes][kWarp];
  constexpr int64_t rows_per_chunk = int64_t(kClRowLanes) * kItems;
  const int64_t b = blockIdx.x;
  const int64_t cg = b % CG;
  const int64_t k = (b / CG) % K;
  const int64_t n = b / (CG * K);
  const int64_t c = cg * kWarp + threadIdx.x;
  const int64_t t0 = k * rows_per_chunk;
  const acc_t shift = c < C ? static_cast<acc_t>(x[n * T * C + c]) : acc_t(0);

  acc_t v[kItems];
  int valid = 0;
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    const int64_t t = t0 + threadIdx.y + int64_t(i) * kClRowLanes;
    const bool ok = c < C && t < T;
    v[i] = ok ? static_cast<acc_t>(x[(n * T + t) * C + c]) - shift : acc_t(0);
    valid += ok ? 1 : 0;
  }
  row_part[threadIdx.y][threadIdx.x] = register_moments<acc_t>(v, valid);
  __syncthreads();
  if (threadIdx.y == 0 && c < C) {
    Moments<acc_t> acc = row_part[0][threadIdx.x];
#pragma unroll
    for (int y = 1; y < kClRowLanes; ++y)
      acc = chan_merge<acc_t>(acc, row_part[y][threadIdx.x]);
    part[(n * K + k) * C + c] = acc;
  }
}

// Stage 2: one warp per (n, c). Chunk k of row (n, c) is at
// part[base(n, c) + k * kstride]; NCHW: base = row*K, kstride = 1;
// channels_last: base = n*K*C + c, kstride = C. The partials are taken around a per-row
// shift, added back here: shifts[row] when given (the fused MLP's epilogue partials, which are
// laid out [N, K, C]: channels_last = true), else the row's first element of x (row_shift);
// x is read for that only.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kMaxThreads)
moments_merge(const scalar_t* __restrict__ x, int64_t T,
              const Moments<acc_t>* __restrict__ part, int64_t rows, int64_t C,
              int64_t K, bool channels_last, const acc_t* __restrict__ shifts,
              acc_t* __restrict__ mean, acc_t* __restrict__ var) {
  const int64_t row = int64_t(blockIdx.x) * (blockDim.x / kWarp) +
                      threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (row >= rows) return;  // whole warp exits together
  const int64_t n = row / C, c = row % C;
  const int64_t base = channels_last ? n * K * C + c : row * K;
  const int64_t kstride = channels_last ? C : 1;
  Moments<acc_t> acc = moments_empty<acc_t>();
  for (int64_t k = lane; k < K; k += kWarp)
    acc = chan_merge<acc_t>(acc, part[base + k * kstride]);
  acc = warp_merge<acc_t>(acc);
  if (lane == 0) {
    const acc_t shift = shifts != nullptr ? shifts[row]
                                          : row_shift<scalar_t, acc_t>(x, n, c, C, T,
                                                                       channels_last);
    mean[row] = shift + acc.mean;
    var[row] = population_var<acc_t>(acc);
  }
}

// How both stages are launched for an (N, C, T) input: shared by the CUDA binding and the
// emulated build, so the emulator runs exactly the split a GPU with `sms` SMs gets.
struct MomentsPlan {
  int64_t K = 0;            // H*W chunks per (n, c)
  int64_t blocks = 0;       // stage-1 blocks
  unsigned threads_x = 0;   // stage-1 block shape
  unsigned threads_y = 1;
  int64_t CG = 0;           // channels_last: 32-channel groups
  int64_t merge_blocks = 0; // stage 2, kMaxThreads threads each
};

inline MomentsPlan plan_moments(int64_t N, int64_t C, int64_t T, bool channels_last, int sms) {
  MomentsPlan p;
  const int64_t rows = N * C;
  if (!channels_last) {
    // Largest block (<= 256 threads) that still leaves >= 4 blocks per SM;
    // short rows get a block no wider than the row needs.
    const int64_t target = 4 * int64_t(sms > 0 ? sms : 1);
    int threads = kMaxThreads;
    while (threads > kWarp &&
           (rows * ((T + threads * kItems - 1) / (threads * kItems)) < target ||
            (threads / 2) * kItems >= T))
      threads /= 2;
    p.K = (T + int64_t(threads) * kItems - 1) / (int64_t(threads) * kItems);
    p.blocks = rows * p.K;
    p.threads_x = unsigned(threads);
  } else {
    const int64_t rows_per_chunk = int64_t(kClRowLanes) * kItems;
    p.K = (T + rows_per_chunk - 1) / rows_per_chunk;
    p.CG = (C + kWarp - 1) / kWarp;
    p.blocks = N * p.K * p.CG;
    p.threads_x = kWarp;
    p.threads_y = kClRowLanes;
  }
  const int64_t warps_per_block = kMaxThreads / kWarp;
  p.merge_blocks = (rows + warps_per_block - 1) / warps_per_block;
  return p;
}

}  // namespace moments_kernels
}  // namespace riformer
