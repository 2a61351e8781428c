// ptx.cuh: the only inline PTX the CUDA kernels use, behind small typed wrappers.
//
// Real builds (nvcc, __CUDA_ARCH__ >= 800) issue the instruction with asm volatile. Under the CPU
// emulator (csrc/emu/cuda_emu.h defines RIFORMER_EMULATE) each wrapper has an emulated body with
// the PTX ISA's per-lane fragment layout and semantics, so a kernel that gets a layout wrong
// computes wrong numbers on the CPU too:
//   * mma and ldmatrix are warp collectives: every lane posts its fragment (or row address) to
//     the emulator's warp rendezvous and the last lane to arrive computes for the whole warp.
//   * ldmatrix reads its rows through the emulator's shared-memory checks (bounds, poison,
//     races), each row attributed to the lane that supplied its address.
//   * cp.async data lands only at the cp.async.wait_group that retires its group; until then the
//     destination is poisoned and reading it is an "uninitialized:" error.
//
// Fragment maps (PTX ISA, "Matrix fragments for mma.m16n8k16 / m16n8k8"), with
// g = lane / 4 (groupID) and t = lane % 4 (threadID_in_group):
//   m16n8k16 f16/bf16, A 16x16 row-major, 4 .b32 registers of two 16-bit values (low half first):
//       register i, half h  ->  A[g + 8*(i & 1)][2*t + h + 8*(i >> 1)]
//   m16n8k16 B 16x8 ("col"), 2 registers:  register i, half h  ->  B[2*t + h + 8*i][g]
//   m16n8k8 tf32, A 16x8, 4 registers:     register i          ->  A[g + 8*(i & 1)][t + 4*(i >> 1)]
//   m16n8k8 tf32, B 8x8, 2 registers:      register i          ->  B[t + 4*i][g]
//   C and D (f32, 16x8), 4 values:         element e           ->  C[g + 8*(e >> 1)][2*t + (e & 1)]
// ldmatrix.m8n8.b16 (.x1/.x2/.x4 = 1/2/4 matrices): lane 8*j + r supplies the address of row r
// of matrix j (16 contiguous bytes, 16-byte aligned; lanes beyond 8*count supply nothing).
// Lane l receives one register per matrix j: without .trans the two values M_j[l/4][2*(l%4) + h];
// with .trans M_j[2*(l%4) + h][l/4] (h = 0 in the low half).
//
// Arithmetic emulated for mma: inputs are decoded exactly (f16, bf16; tf32 operands keep only
// the top 19 bits of each register, sign + 8 exponent + 10 mantissa, the low 13 bits are ignored
// as the tensor cores do), every product is exact, and each D element is
// c + sum_k a*b accumulated in double in k order and rounded once to float. That is at least as
// accurate as the hardware, whose internal accumulation order and rounding are not specified;
// compare against a reference with a tolerance, or use inputs whose sums are exact.
#pragma once

#include <cstdint>

#if defined(RIFORMER_EMULATE)
#include <cstring>
#endif

namespace riformer::ptx {

// cvt.rna.tf32.f32: round to nearest, ties away from zero, to 10 mantissa bits; the result is a
// float bit pattern with the low 13 bits clear. NaN stays NaN (0x7fffffff), infinities stay.
__device__ __forceinline__ uint32_t float_to_tf32(float x) {
#if defined(RIFORMER_EMULATE)
  uint32_t u;
  std::memcpy(&u, &x, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fffffffu;
  if ((u & 0x7fffffffu) == 0x7f800000u) return u;
  // Adding half an ulp to the magnitude rounds ties away from zero; a carry into the exponent
  // (up to infinity) is the correct result.
  return (u + 0x1000u) & 0xffffe000u;
#elif defined(__CUDA_ARCH__)
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
  return r;
#else
  return 0;
#endif
}

#if defined(RIFORMER_EMULATE)
namespace emu_impl {
using ::riformer::emu::detail::LaneIO;

enum class MmaKind { F16, BF16, TF32 };
struct MmaIn {
  uint32_t a[4];
  uint32_t b[2];
  float c[4];
};
struct MmaOut {
  float d[4];
};

RIFORMER_EMU_FN double lo16(uint32_t r, MmaKind k) {
  uint16_t h = uint16_t(r & 0xffffu);
  return k == MmaKind::F16 ? ::riformer::emu::detail::f16_bits_to_f32(h) : ::riformer::emu::detail::bf16_bits_to_f32(h);
}
RIFORMER_EMU_FN double hi16(uint32_t r, MmaKind k) {
  uint16_t h = uint16_t(r >> 16);
  return k == MmaKind::F16 ? ::riformer::emu::detail::f16_bits_to_f32(h) : ::riformer::emu::detail::bf16_bits_to_f32(h);
}
RIFORMER_EMU_FN double tf32_operand(uint32_t r) {
  uint32_t u = r & 0xffffe000u;  // the tensor core reads only the top 19 bits
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Gather the warp's fragments into whole matrices (the maps in the header comment), multiply,
// scatter D back.
template <MmaKind K>
RIFORMER_EMU_NOSAN void mma_fn(const LaneIO* io, unsigned) {
  constexpr int kK = K == MmaKind::TF32 ? 8 : 16;
  double A[16][16], B[16][8], C[16][8];
  for (int l = 0; l < 32; ++l) {
    const MmaIn& in = *static_cast<const MmaIn*>(io[l].in);
    int g = l / 4, t = l % 4;
    if constexpr (K == MmaKind::TF32) {
      for (int i = 0; i < 4; ++i) A[g + 8 * (i & 1)][t + 4 * (i >> 1)] = tf32_operand(in.a[i]);
      for (int i = 0; i < 2; ++i) B[t + 4 * i][g] = tf32_operand(in.b[i]);
    } else {
      for (int i = 0; i < 4; ++i) {
        A[g + 8 * (i & 1)][2 * t + 8 * (i >> 1)] = lo16(in.a[i], K);
        A[g + 8 * (i & 1)][2 * t + 1 + 8 * (i >> 1)] = hi16(in.a[i], K);
      }
      for (int i = 0; i < 2; ++i) {
        B[2 * t + 8 * i][g] = lo16(in.b[i], K);
        B[2 * t + 1 + 8 * i][g] = hi16(in.b[i], K);
      }
    }
    for (int e = 0; e < 4; ++e) C[g + 8 * (e >> 1)][2 * t + (e & 1)] = in.c[e];
  }
  for (int l = 0; l < 32; ++l) {
    MmaOut& out = *static_cast<MmaOut*>(io[l].out);
    int g = l / 4, t = l % 4;
    for (int e = 0; e < 4; ++e) {
      int row = g + 8 * (e >> 1), col = 2 * t + (e & 1);
      double s = 0;
      for (int k = 0; k < kK; ++k) s += A[row][k] * B[k][col];
      out.d[e] = float(s + C[row][col]);
    }
  }
}

template <MmaKind K>
RIFORMER_EMU_NOSAN void mma(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], const float (&c)[4],
                            const char* what, std::source_location site) {
  MmaIn in;
  std::memcpy(in.a, a, sizeof in.a);
  std::memcpy(in.b, b, sizeof in.b);
  std::memcpy(in.c, c, sizeof in.c);
  MmaOut out;
  if (::riformer::emu::detail::existing_lanes(::riformer::emu::detail::g.cur->warp) != 0xffffffffu)
    ::riformer::emu::detail::fail("barrier: " + ::riformer::emu::detail::where(::riformer::emu::detail::g.cur->tid) +
                                  ": " + what + " needs a full warp of 32 threads");
  ::riformer::emu::detail::warp_collective(0xffffffffu, mma_fn<K>, what, &in, &out, site);
  std::memcpy(d, out.d, sizeof out.d);
}

struct LdIn {
  uint32_t row[4];  // the 16 bytes of the row this lane addressed (if it addresses one)
};
template <int N>
struct LdOut {
  uint32_t r[N];
};

template <int N, bool Trans>
RIFORMER_EMU_NOSAN void ldmatrix_fn(const LaneIO* io, unsigned) {
  auto elem = [io](int j, int row, int col) RIFORMER_EMU_NOSAN -> uint32_t {
    const LdIn& in = *static_cast<const LdIn*>(io[8 * j + row].in);
    return (in.row[col / 2] >> (16 * (col % 2))) & 0xffffu;
  };
  for (int l = 0; l < 32; ++l) {
    auto& out = *static_cast<LdOut<N>*>(io[l].out);
    for (int j = 0; j < N; ++j) {
      if constexpr (Trans)
        out.r[j] = elem(j, 2 * (l % 4), l / 4) | (elem(j, 2 * (l % 4) + 1, l / 4) << 16);
      else
        out.r[j] = elem(j, l / 4, 2 * (l % 4)) | (elem(j, l / 4, 2 * (l % 4) + 1) << 16);
    }
  }
}

template <int N, bool Trans>
RIFORMER_EMU_NOSAN __attribute__((noinline)) void ldmatrix(uint32_t (&r)[N], const void* row_addr,
                                                           std::source_location site) {
  namespace d = ::riformer::emu::detail;
  static const char* const kNames[2][5] = {
      {"", "ldmatrix.x1", "ldmatrix.x2", "", "ldmatrix.x4"},
      {"", "ldmatrix.x1.trans", "ldmatrix.x2.trans", "", "ldmatrix.x4.trans"}};
  const char* what = kNames[Trans][N];
  d::Thread& t = *d::g.cur;
  if (d::existing_lanes(t.warp) != 0xffffffffu)
    d::fail("barrier: " + d::where(t.tid) + ": " + what + " needs a full warp of 32 threads");
  LdIn in{};
  if (t.lane < 8 * N) {
    auto a = reinterpret_cast<uintptr_t>(row_addr);
    if (!d::in_shared(row_addr))
      d::fail("bounds: " + d::where(t.tid) + ": " + what + " at " + d::site_name(site) + ": row address " +
              std::to_string(a) + " is not shared memory");
    if (a % 16)
      d::fail("bounds: " + d::where(t.tid) + ": " + what + " at " + d::site_name(site) + ": row " +
              d::describe_addr(a) + " is not 16-byte aligned");
    d::access(a, 16, d::kRead, __builtin_return_address(0));
    std::memcpy(in.row, row_addr, 16);
  }
  LdOut<N> out;
  d::warp_collective(0xffffffffu, ldmatrix_fn<N, Trans>, what, &in, &out, site);
  std::memcpy(r, out.r, sizeof out.r);
}
}  // namespace emu_impl
#define RIFORMER_PTX_SITE , std::source_location site = std::source_location::current()
#else
#define RIFORMER_PTX_SITE
#endif

// ---------------------------------------------------------------------------------------------
// mma.sync.aligned: D = A * B + C, f32 accumulate. Fragments as in the header comment.
// ---------------------------------------------------------------------------------------------

__device__ __forceinline__ void mma_m16n8k16_f16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                                                 const float (&c)[4] RIFORMER_PTX_SITE) {
#if defined(RIFORMER_EMULATE)
  emu_impl::mma<emu_impl::MmaKind::F16>(d, a, b, c, "mma.m16n8k16.f16", site);
#elif defined(__CUDA_ARCH__)
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%10,%11,%12,%13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
        "f"(c[3]));
#endif
}

__device__ __forceinline__ void mma_m16n8k16_bf16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                                                  const float (&c)[4] RIFORMER_PTX_SITE) {
#if defined(RIFORMER_EMULATE)
  emu_impl::mma<emu_impl::MmaKind::BF16>(d, a, b, c, "mma.m16n8k16.bf16", site);
#elif defined(__CUDA_ARCH__)
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%10,%11,%12,%13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
        "f"(c[3]));
#endif
}

// a and b hold tf32 bit patterns (float_to_tf32), or plain floats whose low 13 bits are ignored.
__device__ __forceinline__ void mma_m16n8k8_tf32(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                                                 const float (&c)[4] RIFORMER_PTX_SITE) {
#if defined(RIFORMER_EMULATE)
  emu_impl::mma<emu_impl::MmaKind::TF32>(d, a, b, c, "mma.m16n8k8.tf32", site);
#elif defined(__CUDA_ARCH__)
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%10,%11,%12,%13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
        "f"(c[3]));
#endif
}

// ---------------------------------------------------------------------------------------------
// ldmatrix.sync.aligned.m8n8.{x1,x2,x4}[.trans].shared.b16. row_addr: this lane's row (see the
// header comment); lanes that supply no row may pass anything.
// ---------------------------------------------------------------------------------------------

#if defined(__CUDA_ARCH__) && !defined(RIFORMER_EMULATE)
__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
#endif

#if defined(RIFORMER_EMULATE)
#define RIFORMER_PTX_LDMATRIX(name, n, trans, opcode, outs, ...)                            \
  __device__ __forceinline__ void name(uint32_t (&r)[n], const void* row_addr RIFORMER_PTX_SITE) { \
    emu_impl::ldmatrix<n, trans>(r, row_addr, site);                                        \
  }
#elif defined(__CUDA_ARCH__)
#define RIFORMER_PTX_LDMATRIX(name, n, trans, opcode, outs, ...)                            \
  __device__ __forceinline__ void name(uint32_t (&r)[n], const void* row_addr) {            \
    asm volatile(opcode " " outs ", [%" #n "];\n" : __VA_ARGS__ : "r"(smem_u32(row_addr))); \
  }
#else
#define RIFORMER_PTX_LDMATRIX(name, n, trans, opcode, outs, ...) \
  __device__ __forceinline__ void name(uint32_t (&r)[n], const void* row_addr) {}
#endif

RIFORMER_PTX_LDMATRIX(ldmatrix_x1, 1, false, "ldmatrix.sync.aligned.m8n8.x1.shared.b16", "{%0}", "=r"(r[0]))
RIFORMER_PTX_LDMATRIX(ldmatrix_x2, 2, false, "ldmatrix.sync.aligned.m8n8.x2.shared.b16", "{%0,%1}", "=r"(r[0]),
                      "=r"(r[1]))
RIFORMER_PTX_LDMATRIX(ldmatrix_x4, 4, false, "ldmatrix.sync.aligned.m8n8.x4.shared.b16", "{%0,%1,%2,%3}",
                      "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]))
RIFORMER_PTX_LDMATRIX(ldmatrix_x1_trans, 1, true, "ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16", "{%0}",
                      "=r"(r[0]))
RIFORMER_PTX_LDMATRIX(ldmatrix_x2_trans, 2, true, "ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16", "{%0,%1}",
                      "=r"(r[0]), "=r"(r[1]))
RIFORMER_PTX_LDMATRIX(ldmatrix_x4_trans, 4, true, "ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16",
                      "{%0,%1,%2,%3}", "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]))
#undef RIFORMER_PTX_LDMATRIX

// ---------------------------------------------------------------------------------------------
// cp.async.cg.shared.global, 16 bytes; src_bytes < 16 zero-fills the rest (0 = all zeros, for
// out-of-range tiles). Data is guaranteed in shared memory only after the cp_async_wait that
// retires its commit group (and visible to other threads only after a following barrier).
// ---------------------------------------------------------------------------------------------

__device__ __forceinline__ void cp_async_16(void* smem_dst, const void* gmem_src, int src_bytes = 16) {
#if defined(RIFORMER_EMULATE)
  ::riformer::emu::detail::cp_async_issue(smem_dst, gmem_src, 16, src_bytes, __builtin_return_address(0));
#elif defined(__CUDA_ARCH__)
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(smem_dst)), "l"(gmem_src),
               "r"(src_bytes));
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#if defined(RIFORMER_EMULATE)
  ::riformer::emu::detail::cp_async_commit();
#elif defined(__CUDA_ARCH__)
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}

// Wait until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if defined(RIFORMER_EMULATE)
  ::riformer::emu::detail::cp_async_wait(N, __builtin_return_address(0));
#elif defined(__CUDA_ARCH__)
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}

// cp.async.wait_all: commit what is open, then wait for everything.
__device__ __forceinline__ void cp_async_wait_all() {
#if defined(RIFORMER_EMULATE)
  ::riformer::emu::detail::cp_async_commit();
  ::riformer::emu::detail::cp_async_wait(0, __builtin_return_address(0));
#elif defined(__CUDA_ARCH__)
  asm volatile("cp.async.wait_all;\n" ::);
#endif
}

#undef RIFORMER_PTX_SITE

}  // namespace riformer::ptx
