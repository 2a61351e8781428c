// cuda_emu.h: a checking SIMT emulator for CUDA C++ kernels, run on the CPU.
//
// Build a kernel file against it with the flags in csrc/emu/FLAGS (see docs/emulator.md):
//     g++ $(cat csrc/emu/FLAGS) kernel.cu -o kernel_emu
// The translation unit is compiled with GCC's ThreadSanitizer instrumentation, which puts a call
// to __tsan_readN / __tsan_writeN in front of every load and store. This header defines those
// hooks itself (no libtsan is linked) and uses them to check shared-memory accesses: poisoned
// (never written) reads, races between barriers, and out-of-bounds dynamic shared accesses.
//
// Execution model: a grid runs block by block. Inside a block every CUDA thread is a fiber
// with its own stack; a fiber runs until it reaches a synchronisation point
// (__syncthreads, a warp collective, exit) and then hands control back to the scheduler, which
// picks the next runnable fiber at random (seeded per launch). Warp collectives complete when
// the last lane of the mask arrives; __syncthreads completes when every fiber of the block is
// blocked and all of them wait at the same __syncthreads.
//
// Sections:
//   1. CUDA keywords and built-in types
//   2. Errors, options
//   3. Runtime state (threads, blocks, shadow memory)
//   4. Kernel and symbol names (ELF symbol table of the running program)
//   5. Failure reporting
//   6. Shadow-memory checks (the access path behind the hooks)
//   7. Fibers and the block scheduler
//   8. Barriers and warp collectives
//   9. Device functions: sync, shuffles, votes, atomics, bit and math intrinsics
//  10. __half and __nv_bfloat16
//  11. cp.async support for csrc/cuda/ptx.cuh
//  12. The launcher
//  13. Instrumentation hooks (extern "C" __tsan_*)
//
// Every function here is marked RIFORMER_EMU_NOSAN: the emulator's own loads and stores must not
// go through the hooks (they would be checked as if a kernel thread made them, and would recurse).
#pragma once

#ifndef RIFORMER_EMULATE
#define RIFORMER_EMULATE 1
#endif

#include <cxxabi.h>
#include <elf.h>
#include <link.h>
#include <sys/mman.h>
#include <ucontext.h>

#include <algorithm>
#include <unordered_map>
#include <bit>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <exception>
#include <fstream>
#include <functional>
#include <iterator>
#include <limits>
#include <map>
// <memory> before the macros below: libstdc++'s shared_ptr uses __attribute__((__noinline__)),
// which the __noinline__ macro would break; included here, its guard keeps it from being re-read.
#include <memory>
#include <random>
#include <source_location>
#include <sstream>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#define RIFORMER_EMU_NOSAN __attribute__((no_sanitize("thread")))
#define RIFORMER_EMU_FN inline RIFORMER_EMU_NOSAN

// ============================================================================================
// 1. CUDA keywords and built-in types
// ============================================================================================

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __restrict__ __restrict
#define __align__(n) __attribute__((aligned(n)))
#define __launch_bounds__(...)
#define __constant__
// Static __shared__ variables become block-scope thread_local: static storage, so every fiber of
// the block (all on one OS thread) sees one copy, and all of them land in the program's TLS
// block, which the launcher finds (dl_iterate_phdr) and treats as static shared memory,
// re-poisoned at the start of every block. (A named section would be the obvious alternative,
// but GCC rejects one section for statics of inline functions and templates together with
// others: "section type conflict".) `extern __shared__ T name[];` (dynamic shared memory) is
// rewritten by csrc/emu/gcc_wrap.py into RIFORMER_EMU_EXTERN_SHARED below before the compiler
// sees it: no one macro can be valid both after `extern` and for a sized static array.
#define __shared__ thread_local __attribute__((aligned(16)))
#define RIFORMER_EMU_EXTERN_SHARED(T, name) \
  T* const name = reinterpret_cast<T*>(::riformer::emu::detail::dynamic_smem)

struct dim3 {
  unsigned int x = 1, y = 1, z = 1;
  constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint3 { unsigned int x, y, z; };

// Vector types: the alignment is what makes float4 loads 16-byte accesses, as on the device.
#define RIFORMER_EMU_VEC2(name, T, al) struct alignas(al) name { T x, y; };
#define RIFORMER_EMU_VEC4(name, T, al) struct alignas(al) name { T x, y, z, w; };
RIFORMER_EMU_VEC2(float2, float, 8)
RIFORMER_EMU_VEC4(float4, float, 16)
RIFORMER_EMU_VEC2(int2, int, 8)
RIFORMER_EMU_VEC4(int4, int, 16)
RIFORMER_EMU_VEC2(uint2, unsigned int, 8)
RIFORMER_EMU_VEC4(uint4, unsigned int, 16)
RIFORMER_EMU_VEC2(double2, double, 16)
RIFORMER_EMU_FN float2 make_float2(float x, float y) { return {x, y}; }
RIFORMER_EMU_FN float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
RIFORMER_EMU_FN int2 make_int2(int x, int y) { return {x, y}; }
RIFORMER_EMU_FN int4 make_int4(int x, int y, int z, int w) { return {x, y, z, w}; }
RIFORMER_EMU_FN uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }
RIFORMER_EMU_FN uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }

constexpr int warpSize = 32;

namespace riformer::emu {

// ============================================================================================
// 2. Errors, options
// ============================================================================================

// Every check failure: the message starts with "race:", "uninitialized:", "barrier:" or
// "bounds:" and names the kernel, the block, the thread and (for memory) the address.
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

namespace detail {
constexpr int kMaxThreads = 1024;
constexpr int kWarp = 32;
// The largest dynamic shared allocation a launch may ask for (sm_90 opt-in maximum, 227 KiB).
constexpr size_t kMaxDynamicSmem = 227 * 1024;
// Fiber stacks are mapped lazily (MAP_NORESERVE), so a generous size costs nothing until used.
constexpr size_t kStackBytes = 256 * 1024;
constexpr uint16_t kNoThread = 0xffff;
// Shadow init state: block serial of the last write, or kPending for bytes a cp.async has been
// issued to but not yet waited for (reading them is the missing-wait bug).
constexpr uint32_t kPending = 0xffffffffu;

alignas(128) inline unsigned char dynamic_smem[kMaxDynamicSmem];

// ============================================================================================
// 3. Runtime state
// ============================================================================================

// A fiber's saved context. On x86-64 a switch is a few instructions (callee-saved registers,
// MXCSR and the x87 control word pushed on the fiber's own stack, then a stack swap): the
// emulator switches fibers at every barrier and collective, and swapcontext's two signal-mask
// system calls per switch were most of its time. Elsewhere ucontext does the job.
#if defined(__x86_64__) && !defined(RIFORMER_EMU_UCONTEXT)
struct FiberCtx {
  void* sp = nullptr;
};
}  // namespace detail
}  // namespace riformer::emu
// riformer_emu_switch(void** save_sp, void* new_sp): save this context on the current stack,
// store the stack pointer in *save_sp, resume the context saved at new_sp. Weak, so every
// translation unit that includes the header can carry a copy.
asm(R"(
  .text
  .weak riformer_emu_switch
  .hidden riformer_emu_switch
  .type riformer_emu_switch, @function
riformer_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size riformer_emu_switch, .-riformer_emu_switch
)");
extern "C" void riformer_emu_switch(void** save_sp, void* new_sp);
namespace riformer::emu {
namespace detail {
RIFORMER_EMU_FN void switch_ctx(FiberCtx& save, FiberCtx& to) { riformer_emu_switch(&save.sp, to.sp); }
// Lay out a fresh stack as if `entry` had been switched away from just before its first
// instruction: the first switch to it pops zeroed registers and "returns" into entry with the
// stack aligned as after a call.
RIFORMER_EMU_FN void init_ctx(FiberCtx& c, void* stack, size_t bytes, void (*entry)()) {
  auto top = (reinterpret_cast<uintptr_t>(stack) + bytes) & ~uintptr_t(15);
  auto** sp = reinterpret_cast<void**>(top);
  *--sp = nullptr;                          // entry's own (never used) return address
  *--sp = reinterpret_cast<void*>(entry);   // popped by `ret`
  for (int i = 0; i < 6; ++i) *--sp = nullptr;  // rbp rbx r12 r13 r14 r15
  --sp;
  uint32_t mxcsr;
  uint16_t fpucw;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpucw));
  std::memcpy(sp, &mxcsr, 4);
  std::memcpy(reinterpret_cast<char*>(sp) + 4, &fpucw, 2);
  c.sp = sp;
}
#else
struct FiberCtx {
  ucontext_t uc{};
};
RIFORMER_EMU_FN void switch_ctx(FiberCtx& save, FiberCtx& to) { swapcontext(&save.uc, &to.uc); }
RIFORMER_EMU_FN void init_ctx(FiberCtx& c, void* stack, size_t bytes, void (*entry)()) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = stack;
  c.uc.uc_stack.ss_size = bytes;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, entry, 0);
}
#endif

enum class ThreadState : uint8_t { Runnable, Running, AtBarrier, AtWarp, Exited };

struct LaneIO {
  const void* in;
  void* out;
};
// A warp collective's work function: runs once, on the last lane to arrive, with every lane's
// input and output buffers (indexed by lane; lanes outside the mask are null).
using WarpFn = void (*)(const LaneIO* lanes, unsigned mask);

struct WarpPost {
  unsigned mask = 0;
  WarpFn fn = nullptr;
  const char* what = "";
  const void* in = nullptr;
  void* out = nullptr;
  std::source_location site{};
};

struct PendingCopy {
  unsigned char* dst;
  unsigned char data[16];
  int bytes;
};

struct Thread {
  FiberCtx ctx{};
  void* stack = nullptr;
  uint3 idx{0, 0, 0};
  int tid = 0, warp = 0, lane = 0;
  ThreadState state = ThreadState::Runnable;
  std::source_location barrier_site{};
  WarpPost post;
  // Vector clock over the lanes of this thread's warp: warp-level happens-before for race
  // checks (__syncwarp joins the clocks of the lanes in its mask). Component `lane` is this
  // thread's own clock; an access is stamped with it.
  uint32_t vc[kWarp] = {};
  std::vector<PendingCopy> cp_open;               // cp.async issued since the last commit
  std::deque<std::vector<PendingCopy>> cp_groups;  // committed, not yet waited for
};

// Per shared byte. Race records are valid only while `epoch` equals the current barrier epoch
// (every __syncthreads and every block start opens a new epoch), so a barrier "clears" the
// shadow in O(1).
struct Shadow {
  uint32_t init;    // block serial of the last write (or kPending); else never written this block
  uint32_t epoch;   // epoch of the records below
  uint32_t wclock;  // writer's own clock at the write
  uint32_t rhead;   // 1 + index of the newest reader in State::readers, 0 = none
  uint16_t wtid;    // last writer in this epoch, kNoThread = none
  uint8_t watomic;  // the last write was an atomic (atomics do not race with each other)
  uint8_t pad;
};

struct Reader {
  uint32_t clock;
  uint32_t next;  // 1 + index, 0 = end
  uint16_t tid;
};

// Global-memory bytes of one launch (count_global_bytes). Three models, from most to least
// traffic: `requests`, every byte every load/store asked for (what the load/store units see);
// `per_cta`, the distinct bytes of each CTA summed over CTAs (an L1-only model: re-reads inside
// a CTA hit, re-reads by other CTAs do not); `distinct`, the distinct bytes of the whole launch
// (the DRAM model of the Triton counter: every byte a launch needs crosses DRAM once, re-reads
// are L2 hits).
struct LaunchBytes {
  std::string kernel;
  uint64_t read_requests = 0, write_requests = 0;
  uint64_t read_per_cta = 0, write_per_cta = 0;
  uint64_t read_distinct = 0, write_distinct = 0;
};

struct State {
  // Address ranges the hooks check; spans are 0 outside a launch so the hooks do nothing.
  uintptr_t s_lo = 0, s_span = 0;  // static shared (the program's TLS block)
  uintptr_t d_lo = 0, d_span = 0;  // dynamic shared buffer (whole reservation)
  size_t dyn_bytes = 0;            // this launch's dynamic allocation
  std::vector<Shadow> s_shadow, d_shadow;
  std::vector<Reader> readers;
  uint32_t epoch = 1;
  uint32_t block_serial = 1;

  std::vector<Thread> threads;
  int nthreads = 0, nwarps = 0;
  std::vector<int> runnable;
  int exited = 0;
  std::vector<unsigned> warp_arrived;  // per warp: lanes waiting at a warp collective
  std::vector<unsigned> warp_exited;   // per warp: lanes that have left the kernel
  Thread* cur = nullptr;
  FiberCtx sched{};
  bool in_fiber = false;
  bool failed = false;
  std::string failure;

  uint3 block_idx{0, 0, 0};
  uint3 block_dim{1, 1, 1};
  uint3 grid_dim{1, 1, 1};
  std::string kernel_name;
  void (*thunk)(void*) = nullptr;
  void* thunk_arg = nullptr;

  uint64_t base_seed = 0x5eed;
  uint64_t launches = 0;
  std::mt19937_64 rng;
  bool launching = false;
  // Scheduling trace: the order in which fibers were resumed (for tests of the randomisation).
  std::vector<uint16_t> trace;
  bool keep_trace = false;

  // Global-memory traffic (count_global_bytes): byte ranges [lo, hi) touched by the current
  // block, folded into the launch's sets at the block's end.
  bool count_bytes = false, in_counter = false;
  std::vector<std::pair<uintptr_t, uintptr_t>> blk_rd, blk_wr, launch_rd, launch_wr;
  uint64_t req_rd = 0, req_wr = 0, cta_rd = 0, cta_wr = 0;
  std::vector<LaunchBytes> bytes_log;
};

inline State g;

}  // namespace detail

// Base seed for the scheduling order; launch k uses a seed mixed from (base, k). The
// environment variable RIFORMER_EMU_SEED sets the base at the first launch if present.
RIFORMER_EMU_FN void set_seed(uint64_t seed) {
  detail::g.base_seed = seed;
  detail::g.launches = 0;
}
// Record the fiber resume order of the next launches (read back with last_trace()).
RIFORMER_EMU_FN void keep_trace(bool on) { detail::g.keep_trace = on; }
RIFORMER_EMU_FN const std::vector<uint16_t>& last_trace() { return detail::g.trace; }
// Count the global-memory bytes of the next launches (a log entry per launch; switching on
// clears the log). Global means: not shared memory and not the running thread's own stack
// (locals, spilled registers, the kernel's by-value parameters); cp.async sources count as
// reads.
RIFORMER_EMU_FN void count_global_bytes(bool on) {
  detail::g.count_bytes = on;
  if (on) detail::g.bytes_log.clear();
}
RIFORMER_EMU_FN const std::vector<detail::LaunchBytes>& global_bytes_log() {
  return detail::g.bytes_log;
}

namespace detail {

// ============================================================================================
// 4. Kernel and symbol names
// ============================================================================================

// Function symbols of the running executable, read once from its ELF .symtab, so messages can
// name the kernel (and the function an access came from) even for internal-linkage kernels.
struct Symbols {
  bool loaded = false;
  uintptr_t bias = 0;
  std::map<uintptr_t, std::pair<uintptr_t, std::string>> by_addr;  // start -> (size, mangled)
};
inline Symbols syms;

// The loaded object (program or shared library) whose PT_LOAD segments contain an address.
// Kernels built into a shared library (the emulated build of csrc/cuda that Python loads with
// ctypes) live in that library, not in the program, so both the symbol table and the static
// shared region must be looked up in the object holding the emulator itself.
struct ModuleQuery {
  uintptr_t addr = 0;
  bool found = false;
  uintptr_t bias = 0;
  std::string path;  // empty for the main program
  uintptr_t tls_lo = 0, tls_size = 0;
};

RIFORMER_EMU_FN int find_module_cb(dl_phdr_info* info, size_t, void* out) {
  auto* q = static_cast<ModuleQuery*>(out);
  bool hit = false;
  for (int k = 0; k < info->dlpi_phnum && !hit; ++k) {
    const auto& ph = info->dlpi_phdr[k];
    uintptr_t lo = info->dlpi_addr + ph.p_vaddr;
    hit = ph.p_type == PT_LOAD && q->addr >= lo && q->addr < lo + ph.p_memsz;
  }
  if (!hit) return 0;
  q->found = true;
  q->bias = info->dlpi_addr;
  q->path = info->dlpi_name ? info->dlpi_name : "";
  for (int k = 0; k < info->dlpi_phnum; ++k)
    if (info->dlpi_phdr[k].p_type == PT_TLS) {
      q->tls_lo = reinterpret_cast<uintptr_t>(info->dlpi_tls_data);
      q->tls_size = info->dlpi_phdr[k].p_memsz;
    }
  return 1;
}

RIFORMER_EMU_NOSAN inline ModuleQuery module_of(const void* addr) {
  ModuleQuery q;
  q.addr = reinterpret_cast<uintptr_t>(addr);
  dl_iterate_phdr(find_module_cb, &q);
  return q;
}

RIFORMER_EMU_NOSAN inline void load_symbols() {
  if (syms.loaded) return;
  syms.loaded = true;
  const ModuleQuery mod = module_of(reinterpret_cast<const void*>(&dynamic_smem));
  syms.bias = mod.bias;
  std::ifstream f(mod.path.empty() ? std::string("/proc/self/exe") : mod.path, std::ios::binary);
  std::vector<char> img((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  if (img.size() < sizeof(Elf64_Ehdr)) return;
  auto* eh = reinterpret_cast<const Elf64_Ehdr*>(img.data());
  if (std::memcmp(eh->e_ident, ELFMAG, SELFMAG) != 0 || eh->e_ident[EI_CLASS] != ELFCLASS64) return;
  if (eh->e_shoff + size_t(eh->e_shnum) * sizeof(Elf64_Shdr) > img.size()) return;
  auto* sh = reinterpret_cast<const Elf64_Shdr*>(img.data() + eh->e_shoff);
  for (int i = 0; i < eh->e_shnum; ++i) {
    if (sh[i].sh_type != SHT_SYMTAB || sh[i].sh_link >= eh->e_shnum) continue;
    const Elf64_Shdr& strs = sh[sh[i].sh_link];
    size_t n = sh[i].sh_size / sizeof(Elf64_Sym);
    auto* sym = reinterpret_cast<const Elf64_Sym*>(img.data() + sh[i].sh_offset);
    for (size_t k = 0; k < n; ++k) {
      if (ELF64_ST_TYPE(sym[k].st_info) != STT_FUNC || sym[k].st_value == 0) continue;
      const char* name = img.data() + strs.sh_offset + sym[k].st_name;
      syms.by_addr[sym[k].st_value + syms.bias] = {sym[k].st_size, name};
    }
  }
}

RIFORMER_EMU_NOSAN inline std::string demangle(const std::string& mangled) {
  int status = 0;
  char* d = abi::__cxa_demangle(mangled.c_str(), nullptr, nullptr, &status);
  std::string out = (status == 0 && d) ? d : mangled;
  std::free(d);
  return out;
}

// "name" of the function containing pc, or "name+0xoff" when with_offset.
RIFORMER_EMU_NOSAN inline std::string symbolize(const void* pc, bool with_offset) {
  load_symbols();
  auto a = reinterpret_cast<uintptr_t>(pc);
  auto it = syms.by_addr.upper_bound(a);
  if (it != syms.by_addr.begin()) {
    --it;
    if (a < it->first + std::max<uintptr_t>(it->second.first, 1)) {
      std::string s = demangle(it->second.second);
      if (with_offset) {
        char buf[32];
        std::snprintf(buf, sizeof buf, "+0x%zx", size_t(a - it->first));
        s += buf;
      }
      return s;
    }
  }
  char buf[32];
  std::snprintf(buf, sizeof buf, "%p", pc);
  return buf;
}

// ============================================================================================
// 5. Failure reporting
// ============================================================================================

RIFORMER_EMU_NOSAN inline std::string thread_name(int tid) {
  const uint3& b = g.block_dim;
  char buf[96];
  std::snprintf(buf, sizeof buf, "thread (%d,%d,%d) [tid %d, warp %d, lane %d]", int(tid % b.x),
                int((tid / b.x) % b.y), int(tid / (b.x * b.y)), tid, tid / kWarp, tid % kWarp);
  return buf;
}

RIFORMER_EMU_NOSAN inline std::string where(int tid) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "block (%u,%u,%u) ", g.block_idx.x, g.block_idx.y, g.block_idx.z);
  return "kernel " + g.kernel_name + ", " + buf + thread_name(tid);
}

RIFORMER_EMU_NOSAN inline std::string site_name(const std::source_location& s) {
  return std::string(s.file_name()) + ":" + std::to_string(s.line());
}

// Report a check failure. Inside a fiber the message is stored and control goes straight back
// to the scheduler (the fiber is abandoned, never unwound: exceptions cannot cross the
// fiber boundary); the launcher then throws Error.
[[noreturn]] RIFORMER_EMU_NOSAN inline void fail(const std::string& msg) {
  if (g.in_fiber && g.cur) {
    g.failed = true;
    g.failure = msg;
    g.in_fiber = false;
    switch_ctx(g.cur->ctx, g.sched);
    std::abort();  // never resumed
  }
  throw Error(msg);
}

// ============================================================================================
// 6. Shadow-memory checks
// ============================================================================================

enum AccessKind : int { kRead = 0, kWrite = 1, kAtomic = 2 };

// Whether an earlier access by thread u, stamped with u's clock c, happens before the current
// point of the running thread t: same thread (program order), or same warp and t has seen u's
// clock through a __syncwarp. Other warps are ordered only by __syncthreads (a new epoch).
RIFORMER_EMU_FN bool ordered(const Thread& t, int u, uint32_t c) {
  if (u == t.tid) return true;
  if (u / kWarp != t.warp) return false;
  return c <= t.vc[u % kWarp];
}

RIFORMER_EMU_NOSAN inline std::string describe_addr(uintptr_t a) {
  char buf[96];
  if (a - g.d_lo < g.d_span)
    std::snprintf(buf, sizeof buf, "shared address %p (dynamic shared + %zu)", (void*)a, size_t(a - g.d_lo));
  else
    std::snprintf(buf, sizeof buf, "shared address %p (static shared + %zu)", (void*)a, size_t(a - g.s_lo));
  return buf;
}

RIFORMER_EMU_NOSAN inline const char* kind_name(int kind) {
  return kind == kRead ? "read" : kind == kWrite ? "write" : "atomic";
}

[[noreturn]] RIFORMER_EMU_NOSAN inline void fail_access(const char* prefix, int kind, uintptr_t a,
                                                         size_t n, const void* pc,
                                                         const std::string& detail) {
  std::ostringstream os;
  os << prefix << " " << where(g.cur->tid) << ": " << kind_name(kind) << " of " << n << " bytes at "
     << describe_addr(a) << " in " << symbolize(pc, true) << ": " << detail;
  fail(os.str());
}

// The checked path behind every hook hit on shared memory (and behind ldmatrix / cp.async /
// atomics, which call it explicitly). Granularity is one byte, so neighbouring __half writes by
// different threads do not conflict.
RIFORMER_EMU_NOSAN __attribute__((noinline)) inline void access(uintptr_t a, size_t n, int kind,
                                                                const void* pc) {
  Thread& t = *g.cur;
  Shadow* sh;
  if (a - g.d_lo < g.d_span) {
    size_t off = a - g.d_lo;
    if (off + n > g.dyn_bytes) {
      char buf[128];
      std::snprintf(buf, sizeof buf, "outside the launch's %zu bytes of dynamic shared memory", g.dyn_bytes);
      fail_access("bounds:", kind, a, n, pc, buf);
    }
    sh = &g.d_shadow[off];
  } else {
    size_t off = a - g.s_lo;
    if (off + n > g.s_span) fail_access("bounds:", kind, a, n, pc, "runs past the end of static shared memory");
    sh = &g.s_shadow[off];
  }
  const uint32_t myclock = t.vc[t.lane];
  for (size_t i = 0; i < n; ++i) {
    Shadow& e = sh[i];
    if (kind != kWrite && e.init != g.block_serial) {
      fail_access("uninitialized:", kind, a, n, pc,
                  e.init == kPending
                      ? "byte " + std::to_string(i) + " is the destination of a cp.async that has not been waited for (cp.async.wait_group)"
                      : "byte " + std::to_string(i) + " was never written in this block (shared memory starts poisoned)");
    }
    if (e.epoch != g.epoch) {
      e.epoch = g.epoch;
      e.wtid = kNoThread;
      e.rhead = 0;
    }
    if (e.wtid != kNoThread && !(kind == kAtomic && e.watomic) && !ordered(t, e.wtid, e.wclock)) {
      fail_access("race:", kind, a, n, pc,
                  "conflicts with a " + std::string(e.watomic ? "atomic" : "write") + " by " + thread_name(e.wtid) +
                      " with no __syncthreads (or __syncwarp within one warp) in between");
    }
    if (kind == kRead) {
      if (e.rhead && g.readers[e.rhead - 1].tid == t.tid) {
        g.readers[e.rhead - 1].clock = myclock;
      } else {
        g.readers.push_back({myclock, e.rhead, uint16_t(t.tid)});
        e.rhead = uint32_t(g.readers.size());
      }
    } else {
      for (uint32_t r = e.rhead; r; r = g.readers[r - 1].next) {
        const Reader& rd = g.readers[r - 1];
        if (!ordered(t, rd.tid, rd.clock))
          fail_access("race:", kind, a, n, pc,
                      "conflicts with a read by " + thread_name(rd.tid) +
                          " with no __syncthreads (or __syncwarp within one warp) in between");
      }
      e.wtid = uint16_t(t.tid);
      e.wclock = myclock;
      e.watomic = kind == kAtomic;
      e.rhead = 0;
      e.init = g.block_serial;
    }
  }
}

RIFORMER_EMU_FN bool in_shared(const void* p) {
  auto a = reinterpret_cast<uintptr_t>(p);
  return a - g.s_lo < g.s_span || a - g.d_lo < g.d_span;
}

// Whether the instrumented code at pc is the emulator's or the standard library's rather than
// the kernel's. The emulator's own functions are not instrumented, but the std:: templates they
// use (vectors of the shadow and scheduler state) are compiled with the hooks like everything
// in the translation unit, and their accesses to the heap are not kernel traffic. Decided by
// the mangled name of the function containing pc, once per access site.
RIFORMER_EMU_NOSAN inline bool emulator_code(const void* pc) {
  static std::unordered_map<uintptr_t, bool> cache;
  const auto key = reinterpret_cast<uintptr_t>(pc);
  if (auto it = cache.find(key); it != cache.end()) return it->second;
  load_symbols();
  bool internal = false;
  auto it = syms.by_addr.upper_bound(key);
  if (it != syms.by_addr.begin()) {
    --it;
    if (key < it->first + std::max<uintptr_t>(it->second.first, 1)) {
      const std::string& m = it->second.second;
      for (const char* prefix : {"_ZNSt", "_ZNKSt", "_ZSt", "_ZZNSt", "_ZNSa", "_ZN9__gnu_cxx",
                                 "_ZNK9__gnu_cxx", "_Znw", "_Zdl", "_Zna", "_Zda"})
        internal |= m.rfind(prefix, 0) == 0;
      internal |= m.find("8riformer3emu") != std::string::npos;
    }
  }
  cache.emplace(key, internal);
  return internal;
}

// A global access of n bytes at a by the running thread (count_global_bytes is on). Adjacent
// accesses extend the last range, so a streaming loop costs one entry.
RIFORMER_EMU_NOSAN inline void count_global(uintptr_t a, size_t n, int kind, const void* pc) {
  const auto stack = reinterpret_cast<uintptr_t>(g.cur->stack);
  // The counter's own containers and the classification's map call the hooks again: a flag
  // keeps them out.
  if (a - stack < kStackBytes || g.in_counter) return;
  struct Reentry {
    RIFORMER_EMU_NOSAN Reentry() { g.in_counter = true; }
    RIFORMER_EMU_NOSAN ~Reentry() { g.in_counter = false; }
  } reentry;
  // threadIdx, blockIdx, blockDim and gridDim read the emulator's state (g and its threads):
  // on the device they are special registers.
  const auto state = reinterpret_cast<uintptr_t>(&g);
  const auto threads = reinterpret_cast<uintptr_t>(g.threads.data());
  if (a - state < sizeof(State) || a - threads < g.threads.size() * sizeof(Thread)) return;
  if (pc != nullptr && emulator_code(pc)) return;
  const bool rd = kind != kWrite, wr = kind != kRead;   // an atomic is both
  if (rd) {
    g.req_rd += n;
    if (!g.blk_rd.empty() && g.blk_rd.back().second == a) g.blk_rd.back().second += n;
    else g.blk_rd.emplace_back(a, a + n);
  }
  if (wr) {
    g.req_wr += n;
    if (!g.blk_wr.empty() && g.blk_wr.back().second == a) g.blk_wr.back().second += n;
    else g.blk_wr.emplace_back(a, a + n);
  }
}

// Sorts and merges byte ranges in place; returns the bytes they cover.
RIFORMER_EMU_NOSAN inline uint64_t merge_ranges(std::vector<std::pair<uintptr_t, uintptr_t>>& r) {
  std::sort(r.begin(), r.end());
  size_t k = 0;
  uint64_t bytes = 0;
  for (size_t i = 0; i < r.size(); ++i) {
    if (k > 0 && r[i].first <= r[k - 1].second) {
      r[k - 1].second = std::max(r[k - 1].second, r[i].second);
    } else {
      r[k++] = r[i];
    }
  }
  r.resize(k);
  for (const auto& e : r) bytes += e.second - e.first;
  return bytes;
}

// The hooks' fast path: two unsigned compares for every non-shared access (three when
// counting global bytes).
RIFORMER_EMU_FN void hook(const void* p, size_t n, int kind, const void* pc) {
  auto a = reinterpret_cast<uintptr_t>(p);
  if (__builtin_expect(a - g.s_lo < g.s_span || a - g.d_lo < g.d_span, 0)) {
    if (g.in_fiber) access(a, n, kind, pc);
  } else if (__builtin_expect(g.count_bytes, 0) && g.in_fiber) {
    count_global(a, n, kind, pc);
  }
}

// Mark bytes as the target of an in-flight cp.async: reads fail until the wait.
RIFORMER_EMU_NOSAN inline void mark_pending(uintptr_t a, size_t n) {
  Shadow* sh = (a - g.d_lo < g.d_span) ? &g.d_shadow[a - g.d_lo] : &g.s_shadow[a - g.s_lo];
  for (size_t i = 0; i < n; ++i) sh[i].init = kPending;
  std::memset(reinterpret_cast<void*>(a), 0xff, n);
}

// ============================================================================================
// 7. Fibers and the block scheduler
// ============================================================================================

RIFORMER_EMU_NOSAN inline void* alloc_stack() {
  void* p = mmap(nullptr, kStackBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) throw std::runtime_error("cuda_emu: cannot map a fiber stack");
  return p;
}

// Hand control back to the scheduler; returns when this fiber is resumed.
RIFORMER_EMU_NOSAN inline void yield_to_scheduler() {
  Thread* t = g.cur;
  g.in_fiber = false;
  switch_ctx(t->ctx, g.sched);
  // resumed: the scheduler set g.cur = t and g.in_fiber = true
}

RIFORMER_EMU_NOSAN inline void check_exit_against_waiters(Thread& t);

RIFORMER_EMU_NOSAN inline void fiber_entry() {
  try {
    g.thunk(g.thunk_arg);
  } catch (const std::exception& e) {
    fail(std::string("exception: ") + where(g.cur->tid) + " threw: " + e.what());
  } catch (...) {
    fail("exception: " + where(g.cur->tid) + " threw a non-std exception");
  }
  Thread& t = *g.cur;
  check_exit_against_waiters(t);
  t.state = ThreadState::Exited;
  ++g.exited;
  g.in_fiber = false;
  switch_ctx(t.ctx, g.sched);
  std::abort();  // an exited fiber is never resumed
}

RIFORMER_EMU_NOSAN inline void make_runnable(Thread& t) {
  t.state = ThreadState::Runnable;
  g.runnable.push_back(t.tid);
}

// ============================================================================================
// 8. Barriers and warp collectives
// ============================================================================================

RIFORMER_EMU_NOSAN inline unsigned existing_lanes(int warp) {
  int n = std::min(kWarp, g.nthreads - warp * kWarp);
  return n >= 32 ? 0xffffffffu : ((1u << n) - 1u);
}

RIFORMER_EMU_NOSAN inline std::string mask_hex(unsigned m) {
  char buf[16];
  std::snprintf(buf, sizeof buf, "0x%08x", m);
  return buf;
}

RIFORMER_EMU_NOSAN inline std::string describe_wait(const Thread& t) {
  switch (t.state) {
    case ThreadState::Exited: return "has exited";
    case ThreadState::AtBarrier: return "waits at __syncthreads at " + site_name(t.barrier_site);
    case ThreadState::AtWarp:
      return std::string("waits at ") + t.post.what + " (mask " + mask_hex(t.post.mask) + ") at " + site_name(t.post.site);
    default: return "is running";
  }
}

// A thread leaving the kernel while lanes of its warp wait for it at a collective can never
// complete that collective (CUDA: undefined behaviour; the emulator: an error).
RIFORMER_EMU_NOSAN inline void check_exit_against_waiters(Thread& t) {
  const int base = t.warp * kWarp;
  for (unsigned m = g.warp_arrived[t.warp]; m; m &= m - 1) {
    const Thread& o = g.threads[base + __builtin_ctz(m)];
    if (o.post.mask >> t.lane & 1u)
      fail("barrier: " + where(t.tid) + " exits while " + thread_name(o.tid) + " " + describe_wait(o) +
           " and needs it");
  }
  g.warp_exited[t.warp] |= 1u << t.lane;
}

RIFORMER_EMU_NOSAN inline void join_clocks(int warp, unsigned mask) {
  uint32_t j[kWarp] = {};
  for (int l = 0; l < kWarp; ++l)
    if (mask >> l & 1u)
      for (int k = 0; k < kWarp; ++k) j[k] = std::max(j[k], g.threads[warp * kWarp + l].vc[k]);
  for (int l = 0; l < kWarp; ++l)
    if (mask >> l & 1u) {
      Thread& t = g.threads[warp * kWarp + l];
      std::memcpy(t.vc, j, sizeof j);
      ++t.vc[l];
    }
}

// Arrive at a warp collective. `fn` (null for __syncwarp) runs once when every lane of the mask
// has arrived with the same mask and the same collective; then all of them continue.
RIFORMER_EMU_NOSAN __attribute__((noinline)) inline void warp_collective(unsigned mask, WarpFn fn, const char* what,
                                                                         const void* in, void* out,
                                                                         std::source_location site) {
  Thread& t = *g.cur;
  if (!(mask >> t.lane & 1u))
    fail("barrier: " + where(t.tid) + " calls " + what + " at " + site_name(site) + " with mask " + mask_hex(mask) +
         " that does not contain its own lane");
  // Lanes past the end of a partial last warp do not exist; they are not waited for.
  mask &= existing_lanes(t.warp);
  t.post = {mask, fn, what, in, out, site};
  t.state = ThreadState::AtWarp;
  const int base = t.warp * kWarp;
  const unsigned me = 1u << t.lane;
  unsigned& arrived = g.warp_arrived[t.warp];
  if (unsigned gone = mask & g.warp_exited[t.warp])
    fail("barrier: " + where(t.tid) + " waits at " + what + " (mask " + mask_hex(mask) + ") at " + site_name(site) +
         " but " + thread_name(base + __builtin_ctz(gone)) + " has exited");
  // O(1) per arrival: agree with one lane of the mask already waiting (all of them are checked
  // against each other when the collective completes).
  auto mismatch = [&](const Thread& o) RIFORMER_EMU_NOSAN {
    return o.post.mask != mask || o.post.fn != fn || std::strcmp(o.post.what, what) != 0;
  };
  auto report = [&](const Thread& o) RIFORMER_EMU_NOSAN {
    fail("barrier: " + where(t.tid) + " at " + what + " (mask " + mask_hex(mask) + ") at " + site_name(site) +
         " meets " + thread_name(o.tid) + " which " + describe_wait(o) +
         ": lanes of a warp passed different masks or reached different collectives");
  };
  if (unsigned waiting = arrived & mask) {
    const Thread& o = g.threads[base + __builtin_ctz(waiting)];
    if (mismatch(o)) report(o);
  }
  arrived |= me;
  if ((arrived & mask) == mask) {
    LaneIO io[kWarp] = {};
    for (unsigned m = mask; m; m &= m - 1) {
      const Thread& o = g.threads[base + __builtin_ctz(m)];
      if (mismatch(o)) report(o);
      io[o.lane] = {o.post.in, o.post.out};
    }
    arrived &= ~mask;
    if (fn) fn(io, mask);
    else join_clocks(t.warp, mask);
    for (unsigned m = mask & ~me; m; m &= m - 1) make_runnable(g.threads[base + __builtin_ctz(m)]);
    t.state = ThreadState::Running;
    return;
  }
  yield_to_scheduler();
}

RIFORMER_EMU_NOSAN __attribute__((noinline)) inline void syncthreads(std::source_location site) {
  Thread& t = *g.cur;
  t.state = ThreadState::AtBarrier;
  t.barrier_site = site;
  yield_to_scheduler();
}

// The threads of the current block: the first g.nthreads entries of g.threads. The vector keeps
// the fibers (and stacks) of an earlier, larger launch, which must be neither checked nor
// released by this launch's barriers.
struct BlockThreads {
  Thread* b;
  Thread* e;
  Thread* begin() const { return b; }
  Thread* end() const { return e; }
};
RIFORMER_EMU_NOSAN inline BlockThreads block_threads() {
  return {g.threads.data(), g.threads.data() + g.nthreads};
}

// Called by the scheduler when no fiber can run: either the block is done, or every live
// thread is blocked and the barrier (or a deadlock) must be resolved.
RIFORMER_EMU_NOSAN inline void resolve_quiescent() {
  const Thread* first_barrier = nullptr;
  for (const Thread& t : block_threads()) {
    if (t.state == ThreadState::AtWarp) {
      // Find a lane it waits for, to say why it can never complete.
      for (int l = 0; l < kWarp; ++l) {
        if (!(t.post.mask >> l & 1u)) continue;
        const Thread& o = g.threads[t.warp * kWarp + l];
        if (o.state != ThreadState::AtWarp)
          throw Error("barrier: deadlock: " + where(t.tid) + " " + describe_wait(t) + " but " + thread_name(o.tid) +
                      " " + describe_wait(o));
      }
      throw Error("barrier: deadlock: " + where(t.tid) + " " + describe_wait(t));
    }
    if (t.state == ThreadState::AtBarrier && !first_barrier) first_barrier = &t;
  }
  if (!first_barrier) return;
  for (const Thread& t : block_threads()) {
    if (t.state == ThreadState::Exited)
      throw Error("barrier: " + where(first_barrier->tid) + " " + describe_wait(*first_barrier) + " but " +
                  thread_name(t.tid) + " has exited (a __syncthreads not reached by every thread of the block)");
    if (t.state == ThreadState::AtBarrier &&
        (t.barrier_site.line() != first_barrier->barrier_site.line() ||
         (t.barrier_site.file_name() != first_barrier->barrier_site.file_name() &&
          std::strcmp(t.barrier_site.file_name(), first_barrier->barrier_site.file_name()) != 0)))
      throw Error("barrier: " + where(first_barrier->tid) + " " + describe_wait(*first_barrier) + " but " +
                  thread_name(t.tid) + " " + describe_wait(t) + " (threads wait at different barriers)");
  }
  // Release: a new epoch orders every access before the barrier against every access after it.
  ++g.epoch;
  g.readers.clear();
  for (Thread& t : block_threads()) make_runnable(t);
}

RIFORMER_EMU_NOSAN inline void run_block() {
  const int n = g.nthreads;
  ++g.block_serial;
  ++g.epoch;
  g.readers.clear();
  // Poison: 0xff bytes are NaN as float, double, __half and __nv_bfloat16.
  if (g.s_span) std::memset(reinterpret_cast<void*>(g.s_lo), 0xff, g.s_span);
  std::memset(dynamic_smem, 0xff, g.dyn_bytes);
  g.runnable.clear();
  g.exited = 0;
  g.warp_arrived.assign(size_t(g.nwarps), 0u);
  g.warp_exited.assign(size_t(g.nwarps), 0u);
  for (int i = 0; i < n; ++i) {
    Thread& t = g.threads[i];
    if (!t.stack) t.stack = alloc_stack();
    t.tid = i;
    t.warp = i / kWarp;
    t.lane = i % kWarp;
    t.idx = {unsigned(i % g.block_dim.x), unsigned((i / g.block_dim.x) % g.block_dim.y),
             unsigned(i / (g.block_dim.x * g.block_dim.y))};
    std::memset(t.vc, 0, sizeof t.vc);
    t.vc[t.lane] = 1;
    t.cp_open.clear();
    t.cp_groups.clear();
    init_ctx(t.ctx, t.stack, kStackBytes, fiber_entry);
    make_runnable(t);
  }
  for (;;) {
    while (!g.runnable.empty()) {
      size_t k = g.rng() % g.runnable.size();
      int tid = g.runnable[k];
      g.runnable[k] = g.runnable.back();
      g.runnable.pop_back();
      Thread& t = g.threads[tid];
      t.state = ThreadState::Running;
      g.cur = &t;
      if (g.keep_trace) g.trace.push_back(uint16_t(tid));
      g.in_fiber = true;
      switch_ctx(g.sched, t.ctx);
      g.in_fiber = false;
      if (g.failed) throw Error(g.failure);
    }
    if (g.exited == n) break;
    resolve_quiescent();
  }
  g.cur = nullptr;
}

}  // namespace detail
}  // namespace riformer::emu

// ============================================================================================
// 9. Device functions
// ============================================================================================

#define threadIdx (::riformer::emu::detail::g.cur->idx)
#define blockIdx (::riformer::emu::detail::g.block_idx)
#define blockDim (::riformer::emu::detail::g.block_dim)
#define gridDim (::riformer::emu::detail::g.grid_dim)

// noinline + an opaque context switch inside: the compiler must assume shared memory changed.
RIFORMER_EMU_NOSAN __attribute__((noinline)) inline void __syncthreads(
    std::source_location site = std::source_location::current()) {
  ::riformer::emu::detail::syncthreads(site);
}

RIFORMER_EMU_NOSAN __attribute__((noinline)) inline void __syncwarp(
    unsigned mask = 0xffffffffu, std::source_location site = std::source_location::current()) {
  ::riformer::emu::detail::warp_collective(mask, nullptr, "__syncwarp", nullptr, nullptr, site);
}

RIFORMER_EMU_FN void __threadfence() {}
RIFORMER_EMU_FN void __threadfence_block() {}

// Lanes of the warp that have not exited (the emulator runs a warp's lanes converged).
RIFORMER_EMU_FN unsigned __activemask() {
  using namespace ::riformer::emu::detail;
  return existing_lanes(g.cur->warp) & ~g.warp_exited[g.cur->warp];
}

RIFORMER_EMU_FN unsigned riformer_emu_laneid() { return unsigned(::riformer::emu::detail::g.cur->lane); }

namespace riformer::emu::detail {

// Shuffles follow PTX shfl.sync: c = clamp | (segmask << 8), as CUDA's __shfl_*_sync encode
// width; a source outside the lane's segment (or range) yields the lane's own value.
enum ShflMode : int { kIdx, kUp, kDown, kBfly };
struct ShflIn {
  uint64_t value;
  int b;
  int mode;
  int width;
  int lane;
};
struct ShflOut {
  uint64_t value;
};

RIFORMER_EMU_NOSAN inline void shfl_fn(const LaneIO* io, unsigned mask) {
  for (int l = 0; l < kWarp; ++l) {
    if (!(mask >> l & 1u)) continue;
    auto& in = *static_cast<const ShflIn*>(io[l].in);
    int w = in.width;
    unsigned seg = unsigned(32 - w) & 0x1f;  // high lane bits that name the segment
    unsigned clamp = in.mode == kUp ? 0u : 0x1fu;
    int min_lane = l & int(seg);
    int max_lane = min_lane | int(clamp & ~seg);
    int j;
    bool ok;
    switch (in.mode) {
      case kUp: j = l - in.b; ok = j >= max_lane; break;
      case kDown: j = l + in.b; ok = j <= max_lane; break;
      case kBfly: j = l ^ in.b; ok = j <= max_lane; break;
      default: j = min_lane | (in.b & int(~seg & 0x1f)); ok = j <= max_lane; break;
    }
    if (!ok) j = l;
    if (!(mask >> j & 1u))
      fail("uninitialized: " + where(g.threads[g.cur->warp * kWarp + l].tid) +
           " shuffles from lane " + std::to_string(j) + " which is not in the mask " + mask_hex(mask));
    static_cast<ShflOut*>(io[l].out)->value = static_cast<const ShflIn*>(io[j].in)->value;
  }
}

template <typename T>
RIFORMER_EMU_NOSAN inline T shfl(unsigned mask, T var, int b, int width, int mode, const char* what,
                                 std::source_location site) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "shuffle of a type wider than 8 bytes");
  if (width <= 0 || width > 32 || (width & (width - 1)))
    fail("barrier: " + where(g.cur->tid) + " " + what + " with width " + std::to_string(width) +
         " (must be a power of two <= 32)");
  ShflIn in{0, b, mode, width, g.cur->lane};
  std::memcpy(&in.value, &var, sizeof(T));
  ShflOut out{0};
  warp_collective(mask, shfl_fn, what, &in, &out, site);
  T r;
  std::memcpy(&r, &out.value, sizeof(T));
  return r;
}

struct VoteIn {
  int pred;
};
struct VoteOut {
  unsigned ballot;
};
RIFORMER_EMU_NOSAN inline void vote_fn(const LaneIO* io, unsigned mask) {
  unsigned b = 0;
  for (int l = 0; l < kWarp; ++l)
    if ((mask >> l & 1u) && static_cast<const VoteIn*>(io[l].in)->pred) b |= 1u << l;
  for (int l = 0; l < kWarp; ++l)
    if (mask >> l & 1u) static_cast<VoteOut*>(io[l].out)->ballot = b;
}
RIFORMER_EMU_NOSAN inline unsigned vote(unsigned mask, int pred, const char* what, std::source_location site) {
  VoteIn in{pred != 0};
  VoteOut out{0};
  warp_collective(mask, vote_fn, what, &in, &out, site);
  return out.ballot;
}

}  // namespace riformer::emu::detail

template <typename T>
RIFORMER_EMU_NOSAN inline T __shfl_sync(unsigned mask, T var, int src_lane, int width = 32,
                                        std::source_location site = std::source_location::current()) {
  return ::riformer::emu::detail::shfl(mask, var, src_lane, width, ::riformer::emu::detail::kIdx, "__shfl_sync", site);
}
template <typename T>
RIFORMER_EMU_NOSAN inline T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = 32,
                                           std::source_location site = std::source_location::current()) {
  return ::riformer::emu::detail::shfl(mask, var, int(delta), width, ::riformer::emu::detail::kUp, "__shfl_up_sync", site);
}
template <typename T>
RIFORMER_EMU_NOSAN inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = 32,
                                             std::source_location site = std::source_location::current()) {
  return ::riformer::emu::detail::shfl(mask, var, int(delta), width, ::riformer::emu::detail::kDown, "__shfl_down_sync",
                                       site);
}
template <typename T>
RIFORMER_EMU_NOSAN inline T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = 32,
                                            std::source_location site = std::source_location::current()) {
  return ::riformer::emu::detail::shfl(mask, var, lane_mask, width, ::riformer::emu::detail::kBfly, "__shfl_xor_sync",
                                       site);
}
RIFORMER_EMU_NOSAN inline unsigned __ballot_sync(unsigned mask, int pred,
                                                 std::source_location site = std::source_location::current()) {
  return ::riformer::emu::detail::vote(mask, pred, "__ballot_sync", site);
}
RIFORMER_EMU_NOSAN inline int __all_sync(unsigned mask, int pred,
                                         std::source_location site = std::source_location::current()) {
  unsigned m = mask & ::riformer::emu::detail::existing_lanes(::riformer::emu::detail::g.cur->warp);
  return ::riformer::emu::detail::vote(mask, pred, "__all_sync", site) == m;
}
RIFORMER_EMU_NOSAN inline int __any_sync(unsigned mask, int pred,
                                         std::source_location site = std::source_location::current()) {
  return ::riformer::emu::detail::vote(mask, pred, "__any_sync", site) != 0;
}

// Atomics. The emulator runs one fiber at a time and never switches inside an atomic, so the
// read-modify-write is atomic by construction; on shared memory it is checked like a write that
// does not race with other atomics (and reads the old value, so it must be initialised).
namespace riformer::emu::detail {
RIFORMER_EMU_FN void atomic_hook(const volatile void* p, size_t n, const void* pc) {
  if (g.in_fiber && in_shared(const_cast<const void*>(p)))
    access(reinterpret_cast<uintptr_t>(p), n, kAtomic, pc);
}
template <typename T, typename F>
RIFORMER_EMU_NOSAN inline T atomic_rmw(T* p, F f) {
  if (g.in_fiber && in_shared(p)) access(reinterpret_cast<uintptr_t>(p), sizeof(T), kAtomic, __builtin_return_address(0));
  T old = *p;
  *p = f(old);
  return old;
}
}  // namespace riformer::emu::detail

#define RIFORMER_EMU_ATOMIC(name, T, expr)                                                  \
  RIFORMER_EMU_FN T name(T* p, T v) {                                                       \
    return ::riformer::emu::detail::atomic_rmw(p, [v](T o) RIFORMER_EMU_NOSAN { return static_cast<T>(expr); }); \
  }
RIFORMER_EMU_ATOMIC(atomicAdd, int, o + v)
RIFORMER_EMU_ATOMIC(atomicAdd, unsigned int, o + v)
RIFORMER_EMU_ATOMIC(atomicAdd, unsigned long long, o + v)
RIFORMER_EMU_ATOMIC(atomicAdd, float, o + v)
RIFORMER_EMU_ATOMIC(atomicAdd, double, o + v)
RIFORMER_EMU_ATOMIC(atomicSub, int, o - v)
RIFORMER_EMU_ATOMIC(atomicSub, unsigned int, o - v)
RIFORMER_EMU_ATOMIC(atomicExch, int, v)
RIFORMER_EMU_ATOMIC(atomicExch, unsigned int, v)
RIFORMER_EMU_ATOMIC(atomicExch, unsigned long long, v)
RIFORMER_EMU_ATOMIC(atomicExch, float, v)
RIFORMER_EMU_ATOMIC(atomicMin, int, std::min(o, v))
RIFORMER_EMU_ATOMIC(atomicMin, unsigned int, std::min(o, v))
RIFORMER_EMU_ATOMIC(atomicMin, unsigned long long, std::min(o, v))
RIFORMER_EMU_ATOMIC(atomicMax, int, std::max(o, v))
RIFORMER_EMU_ATOMIC(atomicMax, unsigned int, std::max(o, v))
RIFORMER_EMU_ATOMIC(atomicMax, unsigned long long, std::max(o, v))
RIFORMER_EMU_ATOMIC(atomicAnd, int, o & v)
RIFORMER_EMU_ATOMIC(atomicAnd, unsigned int, o & v)
RIFORMER_EMU_ATOMIC(atomicAnd, unsigned long long, o & v)
RIFORMER_EMU_ATOMIC(atomicOr, int, o | v)
RIFORMER_EMU_ATOMIC(atomicOr, unsigned int, o | v)
RIFORMER_EMU_ATOMIC(atomicOr, unsigned long long, o | v)
RIFORMER_EMU_ATOMIC(atomicXor, int, o ^ v)
RIFORMER_EMU_ATOMIC(atomicXor, unsigned int, o ^ v)
RIFORMER_EMU_ATOMIC(atomicXor, unsigned long long, o ^ v)
RIFORMER_EMU_ATOMIC(atomicInc, unsigned int, (o >= v) ? 0u : o + 1u)
RIFORMER_EMU_ATOMIC(atomicDec, unsigned int, (o == 0u || o > v) ? v : o - 1u)
#undef RIFORMER_EMU_ATOMIC

#define RIFORMER_EMU_CAS(T)                                                                          \
  RIFORMER_EMU_FN T atomicCAS(T* p, T compare, T v) {                                                \
    return ::riformer::emu::detail::atomic_rmw(p, [compare, v](T o) RIFORMER_EMU_NOSAN { return o == compare ? v : o; }); \
  }
RIFORMER_EMU_CAS(int)
RIFORMER_EMU_CAS(unsigned int)
RIFORMER_EMU_CAS(unsigned long long)
#undef RIFORMER_EMU_CAS

// Bit and math intrinsics (exact host equivalents; fast-math ones computed at full precision).
RIFORMER_EMU_FN int __popc(unsigned x) { return __builtin_popcount(x); }
RIFORMER_EMU_FN int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
RIFORMER_EMU_FN int __clz(int x) { return x == 0 ? 32 : __builtin_clz(unsigned(x)); }
RIFORMER_EMU_FN int __ffs(int x) { return __builtin_ffs(x); }
RIFORMER_EMU_FN unsigned __brev(unsigned x) {
  unsigned r = 0;
  for (int i = 0; i < 32; ++i) r |= ((x >> i) & 1u) << (31 - i);
  return r;
}
RIFORMER_EMU_FN float __int_as_float(int x) { return std::bit_cast<float>(x); }
RIFORMER_EMU_FN int __float_as_int(float x) { return std::bit_cast<int>(x); }
RIFORMER_EMU_FN float __uint_as_float(unsigned x) { return std::bit_cast<float>(x); }
RIFORMER_EMU_FN unsigned __float_as_uint(float x) { return std::bit_cast<unsigned>(x); }
RIFORMER_EMU_FN float __fdividef(float a, float b) { return a / b; }
RIFORMER_EMU_FN float __expf(float x) { return std::exp(x); }
RIFORMER_EMU_FN float __logf(float x) { return std::log(x); }
RIFORMER_EMU_FN float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
RIFORMER_EMU_FN float __frcp_rn(float x) { return 1.0f / x; }
RIFORMER_EMU_FN float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
template <typename T>
RIFORMER_EMU_FN T __ldg(const T* p) { return *p; }

// ============================================================================================
// 10. __half and __nv_bfloat16
// ============================================================================================

namespace riformer::emu::detail {
// float -> binary16, round to nearest even. NaN becomes the canonical 0x7fff (sign dropped).
RIFORMER_EMU_FN uint16_t f32_to_f16_bits(float f) {
  uint32_t x = std::bit_cast<uint32_t>(f);
  uint32_t sign = (x >> 16) & 0x8000u;
  uint32_t ax = x & 0x7fffffffu;
  if (ax > 0x7f800000u) return 0x7fff;
  if (ax >= 0x477ff000u) return uint16_t(sign | 0x7c00u);  // >= 65520 rounds to infinity
  if (ax >= 0x38800000u) {                                   // normal half (>= 2^-14)
    uint32_t h = ((((ax >> 23) - 112u) << 10) | ((ax & 0x7fffffu) >> 13));
    uint32_t rem = ax & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;  // a carry into the exponent is right
    return uint16_t(sign | h);
  }
  if (ax <= 0x33000000u) return uint16_t(sign);  // <= 2^-25: the tie at 2^-25 goes to even (0)
  uint32_t e = ax >> 23;
  uint32_t m = (ax & 0x7fffffu) | 0x800000u;
  uint32_t shift = 126u - e;  // value / 2^-24 = m >> shift
  uint32_t h = m >> shift;
  uint32_t rem = m & ((1u << shift) - 1u);
  uint32_t half = 1u << (shift - 1u);
  if (rem > half || (rem == half && (h & 1u))) ++h;
  return uint16_t(sign | h);
}
RIFORMER_EMU_FN float f16_bits_to_f32(uint16_t h) {
  uint32_t sign = uint32_t(h & 0x8000u) << 16;
  uint32_t e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
  if (e == 0x1f) return std::bit_cast<float>(sign | 0x7f800000u | (m << 13));
  if (e == 0) {
    if (m == 0) return std::bit_cast<float>(sign);
    int ex = 1;
    while (!(m & 0x400u)) {
      m <<= 1;
      --ex;
    }
    return std::bit_cast<float>(sign | (uint32_t(ex + 112) << 23) | ((m & 0x3ffu) << 13));
  }
  return std::bit_cast<float>(sign | ((e + 112u) << 23) | (m << 13));
}
// float -> bfloat16, round to nearest even (bf16 keeps float's exponent range, so subnormals
// and overflow fall out of the same rounding). NaN becomes the canonical 0x7fff.
RIFORMER_EMU_FN uint16_t f32_to_bf16_bits(float f) {
  uint32_t x = std::bit_cast<uint32_t>(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return 0x7fff;
  return uint16_t((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}
RIFORMER_EMU_FN float bf16_bits_to_f32(uint16_t b) { return std::bit_cast<float>(uint32_t(b) << 16); }
}  // namespace riformer::emu::detail

// constexpr default constructor on purpose: a block-scope thread_local (__shared__) array of them
// is then constant-initialised, with no TLS guard variable (a guard would live in, and be read
// from, the poisoned static shared region).
// The conversion operator and the converting constructor are instrumented (not NOSAN): a kernel
// reading `float(p[i])` straight from memory, or constructing a value in place, then goes
// through the access hooks like any load or store -- checked in shared memory, counted in
// global memory. Only the bit conversions themselves are the emulator's (uninstrumented).
struct __half {
  uint16_t __x;
  constexpr __half() : __x(0) {}
  __half(float f) : __x(::riformer::emu::detail::f32_to_f16_bits(f)) {}
  operator float() const { return ::riformer::emu::detail::f16_bits_to_f32(__x); }
};
struct __nv_bfloat16 {
  uint16_t __x;
  constexpr __nv_bfloat16() : __x(0) {}
  __nv_bfloat16(float f) : __x(::riformer::emu::detail::f32_to_bf16_bits(f)) {}
  operator float() const { return ::riformer::emu::detail::bf16_bits_to_f32(__x); }
};
struct alignas(4) __half2 { __half x, y; };
struct alignas(4) __nv_bfloat162 { __nv_bfloat16 x, y; };

RIFORMER_EMU_FN __half __float2half(float f) { return __half(f); }
RIFORMER_EMU_FN __half __float2half_rn(float f) { return __half(f); }
RIFORMER_EMU_FN float __half2float(__half h) { return float(h); }
RIFORMER_EMU_FN unsigned short __half_as_ushort(__half h) { return h.__x; }
RIFORMER_EMU_FN __half __ushort_as_half(unsigned short u) { __half h; h.__x = u; return h; }
RIFORMER_EMU_FN __nv_bfloat16 __float2bfloat16(float f) { return __nv_bfloat16(f); }
RIFORMER_EMU_FN __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16(f); }
RIFORMER_EMU_FN float __bfloat162float(__nv_bfloat16 b) { return float(b); }
RIFORMER_EMU_FN unsigned short __bfloat16_as_ushort(__nv_bfloat16 b) { return b.__x; }
RIFORMER_EMU_FN __nv_bfloat16 __ushort_as_bfloat16(unsigned short u) { __nv_bfloat16 b; b.__x = u; return b; }
RIFORMER_EMU_FN __half2 __floats2half2_rn(float a, float b) { return {__half(a), __half(b)}; }
RIFORMER_EMU_FN __half2 __halves2half2(__half a, __half b) { return {a, b}; }
RIFORMER_EMU_FN float __low2float(__half2 h) { return float(h.x); }
RIFORMER_EMU_FN float __high2float(__half2 h) { return float(h.y); }
RIFORMER_EMU_FN __nv_bfloat162 __floats2bfloat162_rn(float a, float b) { return {__nv_bfloat16(a), __nv_bfloat16(b)}; }
RIFORMER_EMU_FN float __low2float(__nv_bfloat162 h) { return float(h.x); }
RIFORMER_EMU_FN float __high2float(__nv_bfloat162 h) { return float(h.y); }

// One operation, computed in float and rounded once: what the device's half/bf16 ALUs return.
#define RIFORMER_EMU_HALF_OPS(T)                                                             \
  RIFORMER_EMU_FN T operator+(T a, T b) { return T(float(a) + float(b)); }                   \
  RIFORMER_EMU_FN T operator-(T a, T b) { return T(float(a) - float(b)); }                   \
  RIFORMER_EMU_FN T operator*(T a, T b) { return T(float(a) * float(b)); }                   \
  RIFORMER_EMU_FN T operator/(T a, T b) { return T(float(a) / float(b)); }                   \
  RIFORMER_EMU_FN T operator-(T a) { T r; r.__x = uint16_t(a.__x ^ 0x8000u); return r; }     \
  RIFORMER_EMU_FN bool operator==(T a, T b) { return float(a) == float(b); }                 \
  RIFORMER_EMU_FN bool operator!=(T a, T b) { return float(a) != float(b); }                 \
  RIFORMER_EMU_FN bool operator<(T a, T b) { return float(a) < float(b); }                   \
  RIFORMER_EMU_FN bool operator>(T a, T b) { return float(a) > float(b); }                   \
  RIFORMER_EMU_FN bool operator<=(T a, T b) { return float(a) <= float(b); }                 \
  RIFORMER_EMU_FN bool operator>=(T a, T b) { return float(a) >= float(b); }
RIFORMER_EMU_HALF_OPS(__half)
RIFORMER_EMU_HALF_OPS(__nv_bfloat16)
#undef RIFORMER_EMU_HALF_OPS

namespace riformer::emu::detail {

// ============================================================================================
// 11. cp.async support (used by the emulated path of csrc/cuda/ptx.cuh)
// ============================================================================================

// Issue: the source is read now (a later change to it would be a race on the device too); the
// destination is checked like a write and then marked pending and poisoned, so reading it before
// the matching wait_group is an "uninitialized:" error even when it held older data.
RIFORMER_EMU_NOSAN inline void cp_async_issue(void* dst, const void* src, int bytes, int src_bytes, const void* pc) {
  Thread& t = *g.cur;
  auto a = reinterpret_cast<uintptr_t>(dst);
  if (!in_shared(dst))
    fail("bounds: " + where(t.tid) + ": cp.async destination " + std::to_string(a) + " is not shared memory");
  if (a % unsigned(bytes))
    fail("bounds: " + where(t.tid) + ": cp.async destination " + describe_addr(a) + " is not " + std::to_string(bytes) +
         "-byte aligned");
  access(a, size_t(bytes), kWrite, pc);
  PendingCopy c{static_cast<unsigned char*>(dst), {}, bytes};
  std::memset(c.data, 0, sizeof c.data);  // bytes past src_bytes are zero-filled, as in PTX
  if (src_bytes > 0) {
    std::memcpy(c.data, src, size_t(std::min(src_bytes, bytes)));
    if (g.count_bytes) count_global(reinterpret_cast<uintptr_t>(src), size_t(std::min(src_bytes, bytes)), kRead, nullptr);
  }
  t.cp_open.push_back(c);
  mark_pending(a, size_t(bytes));
}

RIFORMER_EMU_NOSAN inline void cp_async_commit() {
  Thread& t = *g.cur;
  t.cp_groups.push_back(std::move(t.cp_open));
  t.cp_open.clear();
}

// wait_group n: every committed group but the newest n lands now, written by this thread.
RIFORMER_EMU_NOSAN inline void cp_async_wait(int n, const void* pc) {
  Thread& t = *g.cur;
  while (int(t.cp_groups.size()) > n) {
    for (const PendingCopy& c : t.cp_groups.front()) {
      access(reinterpret_cast<uintptr_t>(c.dst), size_t(c.bytes), kWrite, pc);
      std::memcpy(c.dst, c.data, size_t(c.bytes));
    }
    t.cp_groups.pop_front();
  }
}

// ============================================================================================
// 12. The launcher
// ============================================================================================

// A thread_local of the object that holds the emulator. Touching it before the TLS block is looked
// up makes the dynamic linker allocate that block in this thread: a dlopen'ed library's TLS is
// allocated lazily, at its first access, and dlpi_tls_data is null until then.
inline thread_local unsigned char tls_anchor = 0;

// The static shared region: the TLS block of the object that holds the emulator (the program,
// or the shared library of an emulated build), which holds exactly the __shared__ variables
// (and tls_anchor, which no kernel touches).
RIFORMER_EMU_NOSAN inline std::pair<uintptr_t, uintptr_t> static_shared_range() {
  *static_cast<volatile unsigned char*>(&tls_anchor) = 0;
  const ModuleQuery mod = module_of(reinterpret_cast<const void*>(&dynamic_smem));
  return {mod.tls_lo, mod.tls_lo ? mod.tls_size : 0};
}

template <typename... P, typename Tuple, size_t... I>
RIFORMER_EMU_NOSAN inline void call_kernel(void (*k)(P...), Tuple& args, std::index_sequence<I...>) {
  k(static_cast<P>(std::get<I>(args))...);  // each thread gets its own copies, as parameters are
}

}  // namespace riformer::emu::detail

namespace riformer::emu {

// Run kernel<<<grid, block, dynamic_smem_bytes>>>(args...) to completion, block by block.
// Throws Error on the first failed check.
template <typename... P, typename... A>
RIFORMER_EMU_NOSAN void launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t dynamic_smem_bytes, A&&... args) {
  using namespace detail;
  static_assert(sizeof...(P) == sizeof...(A), "launch: argument count differs from the kernel's parameters");
  if (g.launching) throw std::logic_error("cuda_emu: launch from inside a kernel");
  size_t nthreads = size_t(block.x) * block.y * block.z;
  if (nthreads == 0 || nthreads > size_t(kMaxThreads))
    throw Error("bounds: launch with " + std::to_string(nthreads) + " threads per block (1..1024)");
  if (dynamic_smem_bytes > kMaxDynamicSmem)
    throw Error("bounds: launch asks for " + std::to_string(dynamic_smem_bytes) + " bytes of dynamic shared memory (max " +
                std::to_string(kMaxDynamicSmem) + ")");
  if (g.launches == 0)
    if (const char* s = std::getenv("RIFORMER_EMU_SEED")) g.base_seed = std::strtoull(s, nullptr, 0);
  std::seed_seq seq{uint32_t(g.base_seed), uint32_t(g.base_seed >> 32), uint32_t(g.launches), uint32_t(g.launches >> 32)};
  g.rng.seed(seq);
  ++g.launches;
  g.trace.clear();

  const std::pair<uintptr_t, uintptr_t> tls = static_shared_range();
  g.s_lo = tls.first;
  g.s_span = tls.first ? tls.second : 0;
  g.d_lo = reinterpret_cast<uintptr_t>(dynamic_smem);
  g.dyn_bytes = dynamic_smem_bytes;
  if (g.s_shadow.size() < g.s_span) g.s_shadow.resize(g.s_span);
  if (g.d_shadow.size() < kMaxDynamicSmem) g.d_shadow.resize(kMaxDynamicSmem);
  for (Shadow& e : g.s_shadow) e = Shadow{0, 0, 0, 0, kNoThread, 0, 0};
  for (size_t i = 0; i < dynamic_smem_bytes; ++i) g.d_shadow[i] = Shadow{0, 0, 0, 0, kNoThread, 0, 0};

  g.kernel_name = symbolize(reinterpret_cast<const void*>(kernel), false);
  g.grid_dim = {grid.x, grid.y, grid.z};
  g.block_dim = {block.x, block.y, block.z};
  g.nthreads = int(nthreads);
  g.nwarps = int((nthreads + kWarp - 1) / kWarp);
  if (g.threads.size() < nthreads) g.threads.resize(nthreads);

  auto tuple = std::make_tuple(std::forward<A>(args)...);
  struct Ctx {
    void (*k)(P...);
    decltype(tuple)* t;
  } ctx{kernel, &tuple};
  g.thunk = [](void* p) RIFORMER_EMU_NOSAN {
    auto* c = static_cast<Ctx*>(p);
    call_kernel(c->k, *c->t, std::index_sequence_for<P...>{});
  };
  g.thunk_arg = &ctx;

  struct Guard {
    RIFORMER_EMU_NOSAN ~Guard() {
      g.d_span = 0;
      g.s_span = 0;
      g.launching = false;
      g.in_fiber = false;
      g.failed = false;
      g.cur = nullptr;
    }
  } guard;
  g.launching = true;
  g.d_span = kMaxDynamicSmem;
  g.s_span = tls.first ? tls.second : 0;
  g.failed = false;
  g.blk_rd.clear();
  g.blk_wr.clear();
  g.launch_rd.clear();
  g.launch_wr.clear();
  g.req_rd = g.req_wr = g.cta_rd = g.cta_wr = 0;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        g.block_idx = {x, y, z};
        run_block();
        if (g.count_bytes) {
          g.cta_rd += merge_ranges(g.blk_rd);
          g.cta_wr += merge_ranges(g.blk_wr);
          g.launch_rd.insert(g.launch_rd.end(), g.blk_rd.begin(), g.blk_rd.end());
          g.launch_wr.insert(g.launch_wr.end(), g.blk_wr.begin(), g.blk_wr.end());
          g.blk_rd.clear();
          g.blk_wr.clear();
        }
      }
  if (g.count_bytes) {
    LaunchBytes lb;
    lb.kernel = g.kernel_name;
    lb.read_requests = g.req_rd;
    lb.write_requests = g.req_wr;
    lb.read_per_cta = g.cta_rd;
    lb.write_per_cta = g.cta_wr;
    lb.read_distinct = merge_ranges(g.launch_rd);
    lb.write_distinct = merge_ranges(g.launch_wr);
    g.bytes_log.push_back(std::move(lb));
  }
}

}  // namespace riformer::emu

// ============================================================================================
// 13. Instrumentation hooks
// ============================================================================================
// GCC's -fsanitize=thread emits these; weak so several emulated translation units can be linked
// into one program. The access hooks pass their return address so messages can name the
// function the access came from.

extern "C" {
#define RIFORMER_EMU_HOOK(name, n, kind)                                                          \
  __attribute__((weak, noinline)) RIFORMER_EMU_NOSAN void name(void* p) {                         \
    ::riformer::emu::detail::hook(p, n, kind, __builtin_return_address(0));                        \
  }
#define RIFORMER_EMU_HOOKS(n)                                                        \
  RIFORMER_EMU_HOOK(__tsan_read##n, n, 0)                                            \
  RIFORMER_EMU_HOOK(__tsan_write##n, n, 1)                                           \
  RIFORMER_EMU_HOOK(__tsan_unaligned_read##n, n, 0)                                  \
  RIFORMER_EMU_HOOK(__tsan_unaligned_write##n, n, 1)                                 \
  RIFORMER_EMU_HOOK(__tsan_volatile_read##n, n, 0)                                   \
  RIFORMER_EMU_HOOK(__tsan_volatile_write##n, n, 1)
RIFORMER_EMU_HOOK(__tsan_read1, 1, 0)
RIFORMER_EMU_HOOK(__tsan_write1, 1, 1)
RIFORMER_EMU_HOOK(__tsan_volatile_read1, 1, 0)
RIFORMER_EMU_HOOK(__tsan_volatile_write1, 1, 1)
RIFORMER_EMU_HOOKS(2)
RIFORMER_EMU_HOOKS(4)
RIFORMER_EMU_HOOKS(8)
RIFORMER_EMU_HOOKS(16)
#undef RIFORMER_EMU_HOOKS
#undef RIFORMER_EMU_HOOK
__attribute__((weak, noinline)) RIFORMER_EMU_NOSAN void __tsan_read_range(void* p, unsigned long n) {
  if (n) ::riformer::emu::detail::hook(p, n, 0, __builtin_return_address(0));
}
__attribute__((weak, noinline)) RIFORMER_EMU_NOSAN void __tsan_write_range(void* p, unsigned long n) {
  if (n) ::riformer::emu::detail::hook(p, n, 1, __builtin_return_address(0));
}
// __atomic builtins and std::atomic in instrumented code become __tsan_atomicN_* calls. On shared
// memory every one of them (loads included) is checked as an atomic access: no race with other
// atomics, a race with unordered plain accesses. (Counting an atomic load as an atomic write is
// an over-approximation: a plain read of the byte by another thread before a barrier is reported.)
#define RIFORMER_EMU_TSAN_ATOMICS(n, T)                                                                     \
  __attribute__((weak)) RIFORMER_EMU_NOSAN T __tsan_atomic##n##_load(const volatile T* a, int) {            \
    ::riformer::emu::detail::atomic_hook(a, sizeof(T), __builtin_return_address(0));                        \
    return __atomic_load_n(a, __ATOMIC_SEQ_CST);                                                            \
  }                                                                                                         \
  __attribute__((weak)) RIFORMER_EMU_NOSAN void __tsan_atomic##n##_store(volatile T* a, T v, int) {         \
    ::riformer::emu::detail::atomic_hook(a, sizeof(T), __builtin_return_address(0));                        \
    __atomic_store_n(a, v, __ATOMIC_SEQ_CST);                                                               \
  }                                                                                                         \
  RIFORMER_EMU_TSAN_RMW(n, T, exchange, __atomic_exchange_n)                                                \
  RIFORMER_EMU_TSAN_RMW(n, T, fetch_add, __atomic_fetch_add)                                                \
  RIFORMER_EMU_TSAN_RMW(n, T, fetch_sub, __atomic_fetch_sub)                                                \
  RIFORMER_EMU_TSAN_RMW(n, T, fetch_and, __atomic_fetch_and)                                                \
  RIFORMER_EMU_TSAN_RMW(n, T, fetch_or, __atomic_fetch_or)                                                  \
  RIFORMER_EMU_TSAN_RMW(n, T, fetch_xor, __atomic_fetch_xor)                                                \
  RIFORMER_EMU_TSAN_RMW(n, T, fetch_nand, __atomic_fetch_nand)                                              \
  __attribute__((weak)) RIFORMER_EMU_NOSAN int __tsan_atomic##n##_compare_exchange_strong(volatile T* a,    \
                                                                                      T* c, T v, int, int) { \
    ::riformer::emu::detail::atomic_hook(a, sizeof(T), __builtin_return_address(0));                        \
    return __atomic_compare_exchange_n(a, c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);                 \
  }                                                                                                         \
  __attribute__((weak)) RIFORMER_EMU_NOSAN int __tsan_atomic##n##_compare_exchange_weak(volatile T* a, T* c, \
                                                                                    T v, int, int) {        \
    ::riformer::emu::detail::atomic_hook(a, sizeof(T), __builtin_return_address(0));                        \
    return __atomic_compare_exchange_n(a, c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);                 \
  }                                                                                                         \
  __attribute__((weak)) RIFORMER_EMU_NOSAN T __tsan_atomic##n##_compare_exchange_val(volatile T* a, T c, T v, \
                                                                                     int, int) {            \
    ::riformer::emu::detail::atomic_hook(a, sizeof(T), __builtin_return_address(0));                        \
    __atomic_compare_exchange_n(a, &c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);                       \
    return c;                                                                                               \
  }
#define RIFORMER_EMU_TSAN_RMW(n, T, op, builtin)                                                     \
  __attribute__((weak)) RIFORMER_EMU_NOSAN T __tsan_atomic##n##_##op(volatile T* a, T v, int) {      \
    ::riformer::emu::detail::atomic_hook(a, sizeof(T), __builtin_return_address(0));                 \
    return builtin(a, v, __ATOMIC_SEQ_CST);                                                          \
  }
RIFORMER_EMU_TSAN_ATOMICS(8, uint8_t)
RIFORMER_EMU_TSAN_ATOMICS(16, uint16_t)
RIFORMER_EMU_TSAN_ATOMICS(32, uint32_t)
RIFORMER_EMU_TSAN_ATOMICS(64, uint64_t)
#undef RIFORMER_EMU_TSAN_RMW
#undef RIFORMER_EMU_TSAN_ATOMICS
__attribute__((weak)) RIFORMER_EMU_NOSAN void __tsan_atomic_thread_fence(int) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
__attribute__((weak)) RIFORMER_EMU_NOSAN void __tsan_atomic_signal_fence(int) {}
__attribute__((weak)) RIFORMER_EMU_NOSAN void __tsan_init() {}
__attribute__((weak)) RIFORMER_EMU_NOSAN void __tsan_func_entry(void*) {}
__attribute__((weak)) RIFORMER_EMU_NOSAN void __tsan_func_exit() {}
__attribute__((weak)) RIFORMER_EMU_NOSAN void __tsan_vptr_update(void*, void*) {}
__attribute__((weak)) RIFORMER_EMU_NOSAN void __tsan_vptr_read(void*) {}
}
