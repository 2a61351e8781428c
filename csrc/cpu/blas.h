// The GEMMs of the CPU block kernels, called directly on cache-resident tile
// buffers (going through at::mm would cost a dispatcher round trip and two
// tensor constructions per tile GEMM).
//
// fp32: oneDNN's brgemm micro-kernel through at::native::cpublas::brgemm
// (what torch's CPU flash attention uses) at the avx512 ISA level (isa.h);
// MKL's sgemm below it (on AVX2 brgemm runs but is slower: see
// brgemm_f32_usable). On an AVX-512 AMD EPYC MKL takes
// a non-AVX-512 path: measured single-core on the block's tile shapes,
// sgemm ~105 GFLOP/s, brgemm ~240-260. RIFORMER_CPU_GEMM=mkl|brgemm forces a route.
// fp64: MKL dgemm. bf16: MKL's bf16 x bf16 -> fp32 GEMM.
//
// The MKL symbols, which torch's x86 wheels export, are declared weak so the
// extension loads even against a torch built without MKL; the Python backend
// then reports itself unusable (auto falls back to the `reference` backend).
//
// All helpers take ROW-major operands: C[M, N] = alpha op(A)[M, K] op(B)[K, N]
// + beta C, where op(X) = X^T when the flag is set, and ld* are row strides.
// Column-major BLAS computes the transposed product, so operands swap.
#pragma once

#include <ATen/native/CPUBlas.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>

#include "isa.h"

extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n,
            const int* k, const float* alpha, const float* a, const int* lda,
            const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n,
            const int* k, const double* alpha, const double* a, const int* lda,
            const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc) __attribute__((weak));
// MKL: bf16 x bf16 -> fp32 (AVX512-BF16 / AMX where present). Enum values
// are CBLAS's: 102 = column major, 111 = no transpose, 112 = transpose.
void cblas_gemm_bf16bf16f32(int layout, int transa, int transb, int m, int n,
                            int k, float alpha, const uint16_t* a, int lda,
                            const uint16_t* b, int ldb, float beta, float* c,
                            int ldc) __attribute__((weak));
// Per-thread MKL thread count: the kernels parallelise over tiles, so each
// tile GEMM must run on the calling thread only.
int MKL_Set_Num_Threads_Local(int nt) __attribute__((weak));
}

namespace riformer {
namespace blas {

inline bool available_f32() { return sgemm_ != nullptr; }
inline bool available_f64() { return dgemm_ != nullptr; }
inline bool available_bf16() { return cblas_gemm_bf16bf16f32 != nullptr; }

// Keeps MKL single-threaded on this thread for the lifetime of the guard.
class SingleThreadedBlas {
 public:
  SingleThreadedBlas() {
    if (MKL_Set_Num_Threads_Local) previous_ = MKL_Set_Num_Threads_Local(1);
  }
  ~SingleThreadedBlas() {
    if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(previous_);
  }
  SingleThreadedBlas(const SingleThreadedBlas&) = delete;
  SingleThreadedBlas& operator=(const SingleThreadedBlas&) = delete;

 private:
  int previous_ = 0;
};

inline int as_blas_int(int64_t v) {
  TORCH_CHECK(v >= 0 && v <= std::numeric_limits<int>::max(),
              "riformer cpu kernels: GEMM dimension ", v, " exceeds 32-bit BLAS");
  return static_cast<int>(v);
}

// sgemm_ and dgemm_ share one Fortran signature, so the row-major -> column-
// major operand swap is written once, for both.
template <typename T>
using fortran_gemm_fn = void(const char*, const char*, const int*, const int*, const int*,
                             const T*, const T*, const int*, const T*, const int*, const T*, T*,
                             const int*);

template <typename T>
inline void fortran_gemm(fortran_gemm_fn<T>* fn, const char* fn_name, bool ta, bool tb,
                         int64_t M, int64_t N, int64_t K, T alpha, const T* A, int64_t lda,
                         const T* B, int64_t ldb, T beta, T* C, int64_t ldc) {
  TORCH_CHECK(fn != nullptr, "riformer cpu kernels need MKL's ", fn_name);
  const char opa = ta ? 'T' : 'N', opb = tb ? 'T' : 'N';
  const int m = as_blas_int(N), n = as_blas_int(M), k = as_blas_int(K);
  const int la = as_blas_int(lda), lb = as_blas_int(ldb), lc = as_blas_int(ldc);
  fn(&opb, &opa, &m, &n, &k, &alpha, B, &lb, A, &la, &beta, C, &lc);
}

inline void gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha,
                 const float* A, int64_t lda, const float* B, int64_t ldb,
                 float beta, float* C, int64_t ldc) {
  fortran_gemm<float>(sgemm_, "sgemm", ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

inline void gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, double alpha,
                 const double* A, int64_t lda, const double* B, int64_t ldb,
                 double beta, double* C, int64_t ldc) {
  fortran_gemm<double>(dgemm_, "dgemm", ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

// bf16 operands, fp32 accumulation and result.
inline void gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha,
                 const c10::BFloat16* A, int64_t lda, const c10::BFloat16* B,
                 int64_t ldb, float beta, float* C, int64_t ldc) {
  TORCH_CHECK(cblas_gemm_bf16bf16f32 != nullptr,
              "riformer cpu kernels need MKL's cblas_gemm_bf16bf16f32");
  cblas_gemm_bf16bf16f32(102, tb ? 112 : 111, ta ? 112 : 111, as_blas_int(N),
                         as_blas_int(M), as_blas_int(K), alpha,
                         reinterpret_cast<const uint16_t*>(B), as_blas_int(ldb),
                         reinterpret_cast<const uint16_t*>(A), as_blas_int(lda),
                         beta, C, as_blas_int(ldc));
}

// Whether to use oneDNN's fp32 brgemm: at the avx512 ISA level (isa.h) and
// where it runs (probed once with a 1x1x1 product). Not below avx512,
// although this torch's oneDNN runs it on AVX2 CPUs too: measured on an AVX2
// AMD EPYC (2 threads, fp32, batch 8, one block's forward), brgemm 22.7-24.7 ms
// vs MKL sgemm 16.4-17.0 at C=320 14x14, 16.9-17.4 vs 11.3-11.6 at C=512 7x7,
// and slower at C=64 56x56 too. MKL sgemm there runs at ~90 GFLOP/s per core
// on the kernels' tile shapes, about the FMA peak of that core, so neither a
// larger tile nor a hand-written AVX2 micro-kernel has anything to gain.
// RIFORMER_CPU_GEMM=mkl forces MKL, =brgemm forces brgemm wherever the probe
// runs (tests use it to cover the brgemm route on AVX2 CPUs); read per call.
inline bool brgemm_f32_runs() {
  static const bool runs = [] {
    try {
      float a = 2.f, b = 3.f, c = 0.f;
      at::native::cpublas::brgemm(1, 1, 1, 1, 1, 1, false, &a, &b, &c, false);
      return c == 6.f;
    } catch (...) {
      return false;
    }
  }();
  return runs;
}

inline bool brgemm_f32_usable() {
  const char* force = std::getenv("RIFORMER_CPU_GEMM");
  if (force != nullptr && std::strcmp(force, "mkl") == 0) return false;
  if (!brgemm_f32_runs()) return false;
  if (force != nullptr && std::strcmp(force, "brgemm") == 0) return true;
  return isa::active() >= isa::kAvx512;
}

// Row-major C[M, N] = A[M, K] B[K, N] (accumulate: C += A B), no transposes:
// the kernels keep transposed copies of the small operands instead, since
// brgemm takes none.
inline void gemm_nn(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
                    int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  if (brgemm_f32_usable()) {
    at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, accumulate, A, B, C, false);
  } else {
    gemm(false, false, M, N, K, 1.f, A, lda, B, ldb, accumulate ? 1.f : 0.f, C, ldc);
  }
}

inline void gemm_nn(int64_t M, int64_t N, int64_t K, const double* A, int64_t lda,
                    const double* B, int64_t ldb, double* C, int64_t ldc, bool accumulate) {
  gemm(false, false, M, N, K, 1.0, A, lda, B, ldb, accumulate ? 1.0 : 0.0, C, ldc);
}

inline void gemm_nn(int64_t M, int64_t N, int64_t K, const c10::BFloat16* A, int64_t lda,
                    const c10::BFloat16* B, int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  gemm(false, false, M, N, K, 1.f, A, lda, B, ldb, accumulate ? 1.f : 0.f, C, ldc);
}

}  // namespace blas
}  // namespace riformer
