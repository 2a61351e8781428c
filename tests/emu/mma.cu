// PTX wrapper emulation checks: mma (f16, bf16, tf32) against the PTX ISA fragment maps and a
// plain matrix product, ldmatrix (x1/x2/x4, .trans), tf32 / half / bf16 rounding, and the time
// of one 4-warp block of an ldmatrix + mma matmul. Prints one "<name> OK|FAIL ..." line each.
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "../../csrc/cuda/ptx.cuh"

using riformer::ptx::float_to_tf32;

// The maps as written in the PTX ISA (independent of ptx.cuh's emulation): g = lane/4, t = lane%4.
__device__ int a16_row(int lane, int i) { return lane / 4 + 8 * (i & 1); }
__device__ int a16_col(int lane, int i, int h) { return 2 * (lane % 4) + h + 8 * (i >> 1); }
__device__ int b16_row(int lane, int i, int h) { return 2 * (lane % 4) + h + 8 * i; }
__device__ int c_row(int lane, int e) { return lane / 4 + 8 * (e >> 1); }
__device__ int c_col(int lane, int e) { return 2 * (lane % 4) + (e & 1); }

template <bool BF16>
__device__ uint32_t pack2(float lo, float hi) {
  uint16_t a, b;
  if (BF16) { a = __bfloat16_as_ushort(__float2bfloat16(lo)); b = __bfloat16_as_ushort(__float2bfloat16(hi)); }
  else { a = __half_as_ushort(__float2half(lo)); b = __half_as_ushort(__float2half(hi)); }
  return uint32_t(a) | (uint32_t(b) << 16);
}

// A 16x16 row-major, B 16x8 row-major ([k][n]), C/D 16x8 row-major, one warp.
template <bool BF16>
__global__ void mma16_direct(const float* A, const float* B, const float* C, float* D) {
  int lane = threadIdx.x;
  uint32_t a[4], b[2];
  float c[4], d[4];
  for (int i = 0; i < 4; ++i)
    a[i] = pack2<BF16>(A[a16_row(lane, i) * 16 + a16_col(lane, i, 0)], A[a16_row(lane, i) * 16 + a16_col(lane, i, 1)]);
  for (int i = 0; i < 2; ++i)
    b[i] = pack2<BF16>(B[b16_row(lane, i, 0) * 8 + lane / 4], B[b16_row(lane, i, 1) * 8 + lane / 4]);
  for (int e = 0; e < 4; ++e) c[e] = C[c_row(lane, e) * 8 + c_col(lane, e)];
  if (BF16) riformer::ptx::mma_m16n8k16_bf16(d, a, b, c);
  else riformer::ptx::mma_m16n8k16_f16(d, a, b, c);
  for (int e = 0; e < 4; ++e) D[c_row(lane, e) * 8 + c_col(lane, e)] = d[e];
}

// A 16x8, B 8x8 ([k][n]), tf32.
__global__ void mma_tf32_direct(const float* A, const float* B, const float* C, float* D) {
  int lane = threadIdx.x, g = lane / 4, t = lane % 4;
  uint32_t a[4], b[2];
  float c[4], d[4];
  for (int i = 0; i < 4; ++i) a[i] = float_to_tf32(A[(g + 8 * (i & 1)) * 8 + t + 4 * (i >> 1)]);
  for (int i = 0; i < 2; ++i) b[i] = float_to_tf32(B[(t + 4 * i) * 8 + g]);
  for (int e = 0; e < 4; ++e) c[e] = C[c_row(lane, e) * 8 + c_col(lane, e)];
  riformer::ptx::mma_m16n8k8_tf32(d, a, b, c);
  for (int e = 0; e < 4; ++e) D[c_row(lane, e) * 8 + c_col(lane, e)] = d[e];
}

// D (16x8) = A (16xK, row-major) B (Kx8, [k][n]) in fp32 three ways, for the choice of the fp32
// MLP GEMMs: mode 0 one tf32 mma per k-step; mode 1 3xTF32 (a = hi + lo with hi = tf32(a),
// lo = tf32(a - hi): hi*hi + hi*lo + lo*hi, dropping lo*lo); mode 2 plain FFMA in k order.
__global__ void fp32_gemm(const float* A, const float* B, float* D, int K, int mode) {
  int lane = threadIdx.x, g = lane / 4, t = lane % 4;
  float d[4] = {0.f, 0.f, 0.f, 0.f};
  auto tf = [](float x) { uint32_t u = float_to_tf32(x); float f; std::memcpy(&f, &u, 4); return f; };
  if (mode == 2) {
    for (int e = 0; e < 4; ++e)
      for (int k = 0; k < K; ++k) d[e] += A[c_row(lane, e) * K + k] * B[k * 8 + c_col(lane, e)];
  } else {
    for (int k0 = 0; k0 < K; k0 += 8) {
      float av[4], bv[2];
      for (int i = 0; i < 4; ++i) av[i] = A[(g + 8 * (i & 1)) * K + k0 + t + 4 * (i >> 1)];
      for (int i = 0; i < 2; ++i) bv[i] = B[(k0 + t + 4 * i) * 8 + g];
      uint32_t ah[4], al[4], bh[2], bl[2];
      for (int i = 0; i < 4; ++i) { ah[i] = float_to_tf32(av[i]); al[i] = float_to_tf32(av[i] - tf(av[i])); }
      for (int i = 0; i < 2; ++i) { bh[i] = float_to_tf32(bv[i]); bl[i] = float_to_tf32(bv[i] - tf(bv[i])); }
      if (mode == 1) {   // small terms first, as CUTLASS's 3xTF32 does
        riformer::ptx::mma_m16n8k8_tf32(d, al, bh, d);
        riformer::ptx::mma_m16n8k8_tf32(d, ah, bl, d);
      }
      riformer::ptx::mma_m16n8k8_tf32(d, ah, bh, d);
    }
  }
  for (int e = 0; e < 4; ++e) D[c_row(lane, e) * 8 + c_col(lane, e)] = d[e];
}

// ldmatrix of four 8x8 b16 matrices stored row-major one after another in shared memory; every
// lane writes its registers out, for the host to check against the documented map.
template <int N, bool Trans>
__global__ void ldm(const uint16_t* M, uint32_t* out) {
  __shared__ __align__(16) uint16_t s[4 * 64];
  int lane = threadIdx.x;
  for (int i = lane; i < 4 * 64; i += 32) s[i] = M[i];
  __syncwarp();
  uint32_t r[N];
  const void* row = &s[(lane % (8 * N)) * 8];
  if (N == 1) { if (Trans) riformer::ptx::ldmatrix_x1_trans(*reinterpret_cast<uint32_t(*)[1]>(r), row); else riformer::ptx::ldmatrix_x1(*reinterpret_cast<uint32_t(*)[1]>(r), row); }
  if (N == 2) { if (Trans) riformer::ptx::ldmatrix_x2_trans(*reinterpret_cast<uint32_t(*)[2]>(r), row); else riformer::ptx::ldmatrix_x2(*reinterpret_cast<uint32_t(*)[2]>(r), row); }
  if (N == 4) { if (Trans) riformer::ptx::ldmatrix_x4_trans(*reinterpret_cast<uint32_t(*)[4]>(r), row); else riformer::ptx::ldmatrix_x4(*reinterpret_cast<uint32_t(*)[4]>(r), row); }
  for (int j = 0; j < N; ++j) out[lane * N + j] = r[j];
}

// One block of 4 warps computes a 64x8 tile of C = A(64xK) * B(Kx8), f16: the K loop stages
// 64x16 A and 16x8 B tiles in shared memory with cp.async, A fragments by ldmatrix.x4, B by
// ldmatrix.x2.trans. Each warp owns 16 rows.
__global__ void matmul_f16(const __half* A, const __half* B, float* C, int K) {
  __shared__ __align__(16) __half sa[64 * 16];
  __shared__ __align__(16) __half sb[16 * 8];
  int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  for (int k0 = 0; k0 < K; k0 += 16) {
    // 64x16 halves = 128 chunks of 16 bytes, one per thread; B 16x8 = 16 chunks.
    int r = tid / 2, cchunk = tid % 2;
    riformer::ptx::cp_async_16(&sa[r * 16 + cchunk * 8], &A[r * K + k0 + cchunk * 8]);
    if (tid < 16) riformer::ptx::cp_async_16(&sb[tid * 8], &B[(k0 + tid) * 8]);
    riformer::ptx::cp_async_commit();
    riformer::ptx::cp_async_wait<0>();
    __syncthreads();
    uint32_t a[4], b[2];
    riformer::ptx::ldmatrix_x4(a, &sa[(warp * 16 + lane % 16) * 16 + (lane / 16) * 8]);
    riformer::ptx::ldmatrix_x2_trans(b, &sb[(lane % 16) * 8]);
    riformer::ptx::mma_m16n8k16_f16(acc, a, b, acc);
    __syncthreads();
  }
  for (int e = 0; e < 4; ++e) C[(warp * 16 + c_row(lane, e)) * 8 + c_col(lane, e)] = acc[e];
}

static int failures = 0;
static void report(const char* name, bool ok, const std::string& detail = "") {
  std::printf("%s %s %s\n", name, ok ? "OK" : "FAIL", detail.c_str());
  if (!ok) ++failures;
}

int main() {
  std::mt19937 rng(20261201);
  // Small integers: every product and sum is exact in f16, bf16, tf32 and float, so the
  // fragment-map checks compare bit for bit.
  std::uniform_int_distribution<int> small(-4, 4);
  std::uniform_real_distribution<float> U(-1.f, 1.f);
  auto ints = [&](size_t n) { std::vector<float> v(n); for (auto& x : v) x = float(small(rng)); return v; };

  for (int bf = 0; bf < 2; ++bf) {
    auto A = ints(256), B = ints(128), C = ints(128);
    std::vector<float> D(128, -1.f);
    if (bf) riformer::emu::launch(mma16_direct<true>, dim3(1), dim3(32), 0, A.data(), B.data(), C.data(), D.data());
    else riformer::emu::launch(mma16_direct<false>, dim3(1), dim3(32), 0, A.data(), B.data(), C.data(), D.data());
    int bad = 0;
    for (int i = 0; i < 16; ++i)
      for (int j = 0; j < 8; ++j) {
        float ref = C[i * 8 + j];
        for (int k = 0; k < 16; ++k) ref += A[i * 16 + k] * B[k * 8 + j];
        bad += D[i * 8 + j] != ref;
      }
    report(bf ? "mma_bf16_map" : "mma_f16_map", bad == 0, std::to_string(bad) + " wrong");
  }
  {
    auto A = ints(128), B = ints(64), C = ints(128);
    std::vector<float> D(128, -1.f);
    riformer::emu::launch(mma_tf32_direct, dim3(1), dim3(32), 0, A.data(), B.data(), C.data(), D.data());
    int bad = 0;
    for (int i = 0; i < 16; ++i)
      for (int j = 0; j < 8; ++j) {
        float ref = C[i * 8 + j];
        for (int k = 0; k < 8; ++k) ref += A[i * 8 + k] * B[k * 8 + j];
        bad += D[i * 8 + j] != ref;
      }
    report("mma_tf32_map", bad == 0, std::to_string(bad) + " wrong");
  }
  {
    // Random (non-integer) tf32 inputs: the emulation must equal the product of the
    // tf32-rounded operands (rounded once at the end), and differ from the fp32 product.
    std::vector<float> A(128), B(64), C(128), D(128);
    for (auto& x : A) x = U(rng);
    for (auto& x : B) x = U(rng);
    for (auto& x : C) x = U(rng);
    riformer::emu::launch(mma_tf32_direct, dim3(1), dim3(32), 0, A.data(), B.data(), C.data(), D.data());
    auto tf = [](float x) { uint32_t u = float_to_tf32(x); float f; std::memcpy(&f, &u, 4); return double(f); };
    double max_err = 0, max_vs_fp32 = 0;
    for (int i = 0; i < 16; ++i)
      for (int j = 0; j < 8; ++j) {
        double ref = C[i * 8 + j], ref32 = C[i * 8 + j];
        for (int k = 0; k < 8; ++k) { ref += tf(A[i * 8 + k]) * tf(B[k * 8 + j]); ref32 += double(A[i * 8 + k]) * B[k * 8 + j]; }
        max_err = std::max(max_err, double(std::fabs(float(ref) - D[i * 8 + j])));
        max_vs_fp32 = std::max(max_vs_fp32, std::fabs(ref32 - D[i * 8 + j]));
      }
    report("mma_tf32_random", max_err == 0 && max_vs_fp32 > 1e-6, "err " + std::to_string(max_err) + " vs_fp32 " + std::to_string(max_vs_fp32));
  }

  // ldmatrix: element values = their own index, so each register says where it came from.
  std::vector<uint16_t> M(256);
  for (int i = 0; i < 256; ++i) M[i] = uint16_t(1000 + i);
  auto ldm_check = [&](auto kernel, int N, bool trans, const char* name) {
    std::vector<uint32_t> out(32 * N, 0);
    riformer::emu::launch(kernel, dim3(1), dim3(32), 0, M.data(), out.data());
    int bad = 0;
    for (int l = 0; l < 32; ++l)
      for (int j = 0; j < N; ++j)
        for (int h = 0; h < 2; ++h) {
          int row = trans ? 2 * (l % 4) + h : l / 4, col = trans ? l / 4 : 2 * (l % 4) + h;
          uint16_t want = M[j * 64 + row * 8 + col];
          bad += uint16_t(out[l * N + j] >> (16 * h)) != want;
        }
    report(name, bad == 0, std::to_string(bad) + " wrong");
  };
  ldm_check(ldm<1, false>, 1, false, "ldmatrix_x1");
  ldm_check(ldm<2, false>, 2, false, "ldmatrix_x2");
  ldm_check(ldm<4, false>, 4, false, "ldmatrix_x4");
  ldm_check(ldm<1, true>, 1, true, "ldmatrix_x1_trans");
  ldm_check(ldm<2, true>, 2, true, "ldmatrix_x2_trans");
  ldm_check(ldm<4, true>, 4, true, "ldmatrix_x4_trans");

  {
    // Pipeline: cp.async + ldmatrix + mma, random f16 inputs, against a double product of the
    // rounded inputs. Timed: one 4-warp block.
    int K = 64;
    std::vector<__half> A(64 * K), B(K * 8);
    for (auto& x : A) x = __float2half(U(rng));
    for (auto& x : B) x = __float2half(U(rng));
    std::vector<float> C(64 * 8);
    // The first launch maps the fibers' stacks; time the second.
    riformer::emu::launch(matmul_f16, dim3(1), dim3(128), 0, A.data(), B.data(), C.data(), K);
    auto t0 = std::chrono::steady_clock::now();
    riformer::emu::launch(matmul_f16, dim3(1), dim3(128), 0, A.data(), B.data(), C.data(), K);
    double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    double max_err = 0;
    for (int i = 0; i < 64; ++i)
      for (int j = 0; j < 8; ++j) {
        double ref = 0;
        for (int k = 0; k < K; ++k) ref += double(__half2float(A[i * K + k])) * __half2float(B[k * 8 + j]);
        max_err = std::max(max_err, std::fabs(ref - C[i * 8 + j]));
      }
    report("matmul_f16_pipeline", max_err < 1e-5, "max_err " + std::to_string(max_err) + " block_ms " + std::to_string(secs * 1e3));
  }

  {
    // Rounding edge values (bit patterns in, bit patterns out).
    struct Case { uint32_t f; uint16_t h, b; };
    const Case cases[] = {
        {0x3f800000u, 0x3c00, 0x3f80},  // 1.0
        {0x3f801000u, 0x3c00, 0x3f80},  // 1 + 2^-11: half tie, even (down); bf16 below half
        {0x3f803000u, 0x3c02, 0x3f80},  // 1 + 3*2^-11: half tie, odd -> up
        {0x3f808000u, 0x3c04, 0x3f80},  // 1 + 2^-8: bf16 tie, even (down)
        {0x3f818000u, 0x3c0c, 0x3f82},  // 1 + 3*2^-8: bf16 tie, odd -> up
        {0x477fe000u, 0x7bff, 0x4780},  // 65504 = max half
        {0x477ff000u, 0x7c00, 0x4780},  // 65520: tie to even -> inf in half
        {0x477fefffu, 0x7bff, 0x4780},  // just below 65520
        {0x7f800000u, 0x7c00, 0x7f80},  // +inf
        {0xff800000u, 0xfc00, 0xff80},  // -inf
        {0x7fc00000u, 0x7fff, 0x7fff},  // NaN -> canonical
        {0x33800000u, 0x0001, 0x3380},  // 2^-24 = min half subnormal
        {0x33000000u, 0x0000, 0x3300},  // 2^-25: tie between 0 and 2^-24 -> 0 (even)
        {0x33400000u, 0x0001, 0x3340},  // 1.5 * 2^-25 -> 2^-24
        {0x33c00000u, 0x0002, 0x33c0},  // 1.5 * 2^-24: tie between 1 and 2 ulps -> 2 (even)
        {0x38000000u, 0x0200, 0x3800},  // 2^-15 subnormal half
        {0x387fc000u, 0x03ff, 0x3880},  // largest half subnormal (1023 * 2^-24); bf16 tie odd -> up
        {0x80000000u, 0x8000, 0x8000},  // -0
        {0x00000001u, 0x0000, 0x0000},  // min float subnormal: half 0; bf16 rounds to 0 (tie? no, below half)
        {0x00008000u, 0x0000, 0x0000},  // float subnormal, bf16 tie to even -> 0
        {0x00018000u, 0x0000, 0x0002},  // float subnormal, bf16 tie odd -> up
        {0x7f7fffffu, 0x7c00, 0x7f80},  // max float: half inf; bf16 rounds up to inf
    };
    int bad = 0;
    std::string detail;
    for (const Case& c : cases) {
      float f;
      std::memcpy(&f, &c.f, 4);
      uint16_t h = __half_as_ushort(__float2half(f)), b = __bfloat16_as_ushort(__float2bfloat16(f));
      if (h != c.h || b != c.b) {
        ++bad;
        char buf[96];
        std::snprintf(buf, sizeof buf, "[%08x: half %04x want %04x, bf16 %04x want %04x] ", c.f, h, c.h, b, c.b);
        detail += buf;
      }
    }
    // Round trip: every finite half converts to float and back unchanged; NaN stays NaN.
    for (uint32_t u = 0; u < 65536; ++u) {
      float f = __half2float(__ushort_as_half(uint16_t(u)));
      uint16_t back = __half_as_ushort(__float2half(f));
      bool nan = ((u >> 10) & 0x1f) == 0x1f && (u & 0x3ff);
      if (nan ? !std::isnan(f) : back != u) ++bad;
    }
    report("half_bf16_rounding", bad == 0, detail);
  }
  {
    // tf32 (cvt.rna): ties away from zero at bit 12.
    struct Case { uint32_t f, t; };
    const Case cases[] = {
        {0x3f800000u, 0x3f800000u}, {0x3f801000u, 0x3f802000u},  // tie -> away (up)
        {0xbf801000u, 0xbf802000u},                              // negative tie -> away
        {0x3f800fffu, 0x3f800000u}, {0x3f803000u, 0x3f804000u},  // tie with odd kept bit -> away
        {0x7f7ff000u, 0x7f800000u},                              // rounds to inf
        {0x7f800000u, 0x7f800000u}, {0x7fc00001u, 0x7fffffffu},
    };
    int bad = 0;
    for (const Case& c : cases) {
      float f;
      std::memcpy(&f, &c.f, 4);
      bad += float_to_tf32(f) != c.t;
    }
    report("tf32_rounding", bad == 0, std::to_string(bad) + " wrong");
  }
  {
    // fp32 GEMM accuracy (the MLP kernels' K: C = 64 .. 768 for GEMM1, 4C up to 3072 for GEMM2)
    // against float64, relative to the result's scale, on N(0,1)-like data: one line per K
    // with the three modes' errors, read by tests/test_cuda_emu.py.
    std::normal_distribution<float> N01(0.f, 1.f);
    for (int K : {64, 512, 3072}) {
      std::vector<float> A(16 * size_t(K)), B(size_t(K) * 8), D(128);
      for (auto& x : A) x = N01(rng);
      for (auto& x : B) x = N01(rng);
      double scale = 0, err[3] = {0, 0, 0};
      std::vector<double> ref(128, 0.0);
      for (int i = 0; i < 16; ++i)
        for (int j = 0; j < 8; ++j) {
          for (int k = 0; k < K; ++k) ref[i * 8 + j] += double(A[i * K + k]) * B[k * 8 + j];
          scale = std::max(scale, std::abs(ref[i * 8 + j]));
        }
      for (int mode = 0; mode < 3; ++mode) {
        riformer::emu::launch(fp32_gemm, dim3(1), dim3(32), 0, A.data(), B.data(), D.data(), K, mode);
        for (int i = 0; i < 128; ++i) err[mode] = std::max(err[mode], std::abs(D[i] - ref[i]) / scale);
      }
      char buf[160];
      std::snprintf(buf, sizeof buf, "tf32 %.3e 3xtf32 %.3e ffma %.3e", err[0], err[1], err[2]);
      report(("fp32_gemm_accuracy_k" + std::to_string(K)).c_str(), true, buf);
    }
  }
  return failures ? 1 : 0;
}
