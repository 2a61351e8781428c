// CPU kernel for riformer::moments: per-(n, c) mean and population variance
// over H*W, for contiguous NCHW and channels_last input.
//
// Work is cut into fixed-size chunks that depend only on the shape (never on
// the thread count), each chunk produces (count, mean, M2) with a corrected
// two-pass over data that sits in L1, and the chunks of one (n, c) are merged
// with Chan's formula in chunk order. So the result is deterministic and
// independent of OMP_NUM_THREADS, and a single (n, c) with a huge H*W still
// spreads over all threads.
//
// Header choice: torch/library.h + narrow ATen headers instead of
// torch/extension.h (about 4 s instead of about 24 s per translation unit).

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../common/block_math.h"
#include "../common/moments_checks.h"
#include "reductions.h"

namespace riformer {
namespace {

// Elements per NCHW chunk (16 KiB of fp32: the second pass hits L1).
constexpr int64_t kRowChunk = 4096;
// Target elements per channels_last tile (rows * C).
constexpr int64_t kTileElems = 4096;

// Returns a pointer to `n` values of acc_t: the input itself when it already
// has the accumulation type, else an upcast copy in `buf`.
template <typename scalar_t, typename acc_t>
const acc_t* as_acc(const scalar_t* src, int64_t n, std::vector<acc_t>& buf) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return src;
  } else {
    if (static_cast<int64_t>(buf.size()) < n) buf.resize(n);
    for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<acc_t>(src[i]);
    return buf.data();
  }
}

template <typename scalar_t, typename acc_t>
void moments_cpu_impl(const at::Tensor& x, bool channels_last,
                      at::Tensor& mean, at::Tensor& var) {
  const int64_t N = x.size(0), C = x.size(1);
  const int64_t T = x.size(2) * x.size(3);
  const scalar_t* X = x.const_data_ptr<scalar_t>();
  acc_t* M = mean.mutable_data_ptr<acc_t>();
  acc_t* V = var.mutable_data_ptr<acc_t>();

  std::vector<Moments<acc_t>> part;
  int64_t K = 0;       // chunks per (n, c)
  int64_t kstride = 0; // distance between chunk k and k+1 of one (n, c)

  if (!channels_last) {
    // Row (n, c) is x[row*T : (row+1)*T]; chunk k covers kRowChunk of it.
    K = (T + kRowChunk - 1) / kRowChunk;
    kstride = 1;
    part.resize(N * C * K);
    const int64_t chunk_len = std::min(T, kRowChunk);
    const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 15) / chunk_len);
    at::parallel_for(0, N * C * K, grain, [&](int64_t b, int64_t e) {
      std::vector<acc_t> buf;
      for (int64_t task = b; task < e; ++task) {
        const int64_t row = task / K, k = task % K;
        const int64_t t0 = k * kRowChunk;
        const int64_t L = std::min(kRowChunk, T - t0);
        const acc_t* p = as_acc<scalar_t, acc_t>(X + row * T + t0, L, buf);
        part[task] = cpu::contiguous_moments<acc_t>(p, L);
      }
    });
  } else {
    // Sample n is a [T, C] row-major matrix; tile k covers R rows of it,
    // which is one contiguous span of R*C values.
    const int64_t R = std::min(T, std::max<int64_t>(8, kTileElems / C));
    K = (T + R - 1) / R;
    kstride = C;
    part.resize(N * K * C);
    const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 15) / (R * C));
    at::parallel_for(0, N * K, grain, [&](int64_t b, int64_t e) {
      std::vector<acc_t> buf;
      std::vector<acc_t> scratch(3 * C);
      for (int64_t task = b; task < e; ++task) {
        const int64_t n = task / K, k = task % K;
        const int64_t t0 = k * R;
        const int64_t rows = std::min(R, T - t0);
        const acc_t* p =
            as_acc<scalar_t, acc_t>(X + (n * T + t0) * C, rows * C, buf);
        Moments<acc_t>* out = part.data() + task * C;
        cpu::column_moments<acc_t>(p, rows, C, scratch.data(),
                                   [&](int64_t c, const Moments<acc_t>& mo) { out[c] = mo; });
      }
    });
  }

  // Merge the chunks of each (n, c) in chunk order: fixed, hence
  // deterministic. NCHW partials are [N*C, K]; channels_last ones [N, K, C].
  at::parallel_for(0, N * C, 64, [&](int64_t b, int64_t e) {
    for (int64_t row = b; row < e; ++row) {
      const int64_t n = row / C, c = row % C;
      const int64_t base = channels_last ? n * K * C + c : row * K;
      Moments<acc_t> acc = part[base];
      for (int64_t k = 1; k < K; ++k)
        acc = chan_merge<acc_t>(acc, part[base + k * kstride]);
      M[row] = acc.mean;
      V[row] = population_var<acc_t>(acc);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> moments_cpu(const at::Tensor& x_in) {
  MomentsProblem p = prepare_moments(x_in, c10::DeviceType::CPU);
  at::Tensor mean = p.mean, var = p.var;
  if (mean.numel() == 0) return {mean, var};
  const at::Tensor& x = p.x;
  const bool channels_last = p.channels_last;

  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "riformer_moments_cpu", [&] {
        using acc_t =
            std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
        moments_cpu_impl<scalar_t, acc_t>(x, channels_last, mean, var);
      });
  return {mean, var};
}

}  // namespace

TORCH_LIBRARY_IMPL(riformer, CPU, m) {
  m.impl("moments", &moments_cpu);
}

}  // namespace riformer
