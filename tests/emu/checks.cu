// Emulator check kernels: each bad kernel has a correct twin that differs only in the bug.
// Usage: checks <case> <seed>; prints "OK <result>" or "ERR <message>".
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>  // after the emulator header: its __noinline__ must not break shared_ptr
#include <random>
#include <string>
#include <vector>

#include "../../csrc/cuda/ptx.cuh"

// Block sum: per-warp xor-shuffle tree, partials through static shared memory, one warp finishes.
__global__ void block_sum(const float* in, float* out, int n) {
  __shared__ float partial[32];
  int t = threadIdx.x;
  float v = 0.f;
  for (int i = blockIdx.x * blockDim.x + t; i < n; i += gridDim.x * blockDim.x) v += in[i];
  for (int o = 16; o; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  if (t % 32 == 0) partial[t / 32] = v;
  __syncthreads();
  if (t < 32) {
    float w = t < int(blockDim.x / 32) ? partial[t] : 0.f;
    for (int o = 16; o; o >>= 1) w += __shfl_down_sync(0xffffffffu, w, o);
    if (t == 0) out[blockIdx.x] = w;
  }
}

// Two threads store to one shared word; the correct twin has a barrier between the store and
// the other thread's access.
__global__ void race(int* out, int with_barrier) {
  __shared__ int s[4];
  int t = threadIdx.x;
  if (t == 0) s[0] = 7;
  if (with_barrier) __syncthreads();
  if (t == 1) s[0] = 9;
  __syncthreads();
  if (t == 2) out[0] = s[0];
}

// Reads a neighbour's slot; the buggy twin leaves the last slot unwritten.
__global__ void uninit(const float* in, float* out, int writers) {
  __shared__ float s[64];
  int t = threadIdx.x;
  if (t < writers) s[t] = in[t];
  __syncthreads();
  out[t] = s[(t + 1) % 64];
}

// The classic divergent barrier.
__global__ void divergent_barrier(float* out, int all) {
  __shared__ float s[64];
  int t = threadIdx.x;
  s[t] = float(t);
  if (all || t < 16) __syncthreads();
  out[t] = float(t);
}

// Dynamic shared memory sized by the launch; the buggy launch gives one float too few.
__global__ void dyn_reverse(const float* in, float* out) {
  extern __shared__ float buf[];
  int t = threadIdx.x;
  buf[t] = in[t];
  __syncthreads();
  out[t] = buf[blockDim.x - 1 - t];
}

// Stage a tile with cp.async; the buggy twin forgets cp.async.wait_group before the barrier.
__global__ void cp_async_stage(const float* in, float* out, int wait) {
  __shared__ __align__(16) float tile[256];
  int t = threadIdx.x;
  riformer::ptx::cp_async_16(&tile[4 * t], &in[4 * t]);
  riformer::ptx::cp_async_commit();
  if (wait) riformer::ptx::cp_async_wait<0>();
  __syncthreads();
  out[t] = tile[(4 * t + 5) % 256];
}

// Two commit groups in flight; wait_group 1 retires only the older one, so stage 0 may be read
// and stage 1 (the buggy twin reads it) is still in flight.
__global__ void cp_async_two_stages(const float* in, float* out, int read_stage) {
  __shared__ __align__(16) float stage[2][128];
  int t = threadIdx.x;
  for (int s = 0; s < 2; ++s) {
    riformer::ptx::cp_async_16(&stage[s][4 * t], &in[s * 128 + 4 * t]);
    riformer::ptx::cp_async_commit();
  }
  riformer::ptx::cp_async_wait<1>();
  __syncthreads();
  out[t] = stage[read_stage][(4 * t + 7) % 128];
  riformer::ptx::cp_async_wait<0>();
}

// Warp-synchronous hand-off through shared memory; correct only with __syncwarp between.
__global__ void warp_handoff(float* out, int with_syncwarp) {
  __shared__ float s[32];
  int lane = threadIdx.x;
  s[lane] = 0.f;  // initialised first, so the missing __syncwarp shows as a race, in either order
  __syncthreads();
  s[lane] = float(lane) * 2.f;
  if (with_syncwarp) __syncwarp();
  out[lane] = s[31 - lane];
}

// __syncwarp orders lanes of one warp only: a hand-off between warps needs __syncthreads.
__global__ void cross_warp(float* out, int block_barrier) {
  __shared__ float s[64];
  int t = threadIdx.x;
  s[t] = 0.f;
  __syncthreads();
  s[t] = float(t) + 0.5f;
  if (block_barrier) __syncthreads();
  else __syncwarp();
  out[t] = s[63 - t];
}

// Lanes pass different masks to one shuffle.
__global__ void mask_mismatch(float* out, int same) {
  int lane = threadIdx.x;
  unsigned mask = (same || lane != 3) ? 0xffffffffu : 0x7fffffffu;
  out[lane] = __shfl_xor_sync(mask, float(lane), 1);
}

// Ticket order: which thread got to an atomic first (shows the scheduling order).
__global__ void tickets(int* order) {
  __shared__ int next;
  if (threadIdx.x == 0) next = 0;
  __syncthreads();
  order[atomicAdd(&next, 1)] = threadIdx.x;
}

// Two halves of the block wait at two different __syncthreads calls.
__global__ void split_barrier(float* out, int same) {
  int t = threadIdx.x;
  if (same || t < 32) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[t] = float(t);
}

// A lane leaves while the rest of its warp waits for it at a shuffle.
__global__ void lane_exit(float* out, int stay) {
  int lane = threadIdx.x;
  if (!stay && lane == 5) return;
  out[lane] = __shfl_down_sync(0xffffffffu, float(lane), 1);
}

// A counter bumped with atomics and read plainly by another thread: the read must wait for a
// barrier (atomics do not race with each other, but do with plain accesses).
__global__ void atomic_then_read(int* out, int with_barrier) {
  __shared__ int counter;
  int t = threadIdx.x;
  if (t == 0) counter = 0;
  __syncthreads();
  atomicAdd(&counter, t);
  if (with_barrier) __syncthreads();
  if (t == 40) out[0] = counter;
}

// Dynamic shared memory declared the way tiled kernels do (raw aligned bytes, reinterpreted),
// holding __half values; the buggy launch gives too few bytes for the second array.
__global__ void dyn_two_arrays(const float* in, float* out, int n) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __half* h = reinterpret_cast<__half*>(smem_raw);
  float* f = reinterpret_cast<float*>(smem_raw + n * sizeof(__half));
  int t = threadIdx.x;
  h[t] = __float2half(in[t]);
  f[t] = in[t] * 2.f;
  __syncthreads();
  out[t] = __half2float(h[n - 1 - t]) + f[n - 1 - t];
}

// GCC atomic builtins on shared memory (instrumented as __tsan_atomic32_*), as cuda::atomic_ref
// style code would produce.
__global__ void builtin_atomics(int* out) {
  __shared__ int c;
  if (threadIdx.x == 0) c = 0;
  __syncthreads();
  __atomic_fetch_add(&c, int(threadIdx.x), __ATOMIC_RELAXED);
  __syncthreads();
  if (threadIdx.x == 0) *out = __atomic_load_n(&c, __ATOMIC_RELAXED);
}

static void fail_usage() {
  std::fprintf(stderr, "usage: checks <case> <seed>\n");
  std::exit(2);
}

int main(int argc, char** argv) {
  if (argc < 3) fail_usage();
  std::string c = argv[1];
  uint64_t seed = std::strtoull(argv[2], nullptr, 0);
  riformer::emu::set_seed(seed);
  std::mt19937 rng(uint32_t(seed) * 7919u + 1u);
  std::uniform_real_distribution<float> U(-1.f, 1.f);
  auto randv = [&](size_t n) {
    std::vector<float> v(n);
    for (auto& x : v) x = U(rng);
    return v;
  };
  try {
    std::string result;
    if (c == "sum") {
      int n = 3000, blocks = 3, threads = 128;
      auto in = randv(n);
      std::vector<float> out(blocks);
      riformer::emu::launch(block_sum, dim3(blocks), dim3(threads), 0, in.data(), out.data(), n);
      double ref = 0, got = 0;
      for (float x : in) ref += x;
      for (float x : out) got += x;
      char buf[128];
      std::snprintf(buf, sizeof buf, "%.9g %.9g", got, ref);
      result = buf;
    } else if (c == "shrink") {
      // A launch with fewer threads after one with more: the fibers kept from the larger launch
      // must take no part in the smaller one's barriers (they once did: "has exited").
      int n = 3000, blocks = 3;
      auto in = randv(n);
      double ref = 0;
      for (float x : in) ref += x;
      for (int threads : {256, 32, 96}) {
        std::vector<float> out(blocks);
        riformer::emu::launch(block_sum, dim3(blocks), dim3(threads), 0, in.data(), out.data(), n);
        double got = 0;
        for (float x : out) got += x;
        char buf[64];
        std::snprintf(buf, sizeof buf, "%s%.9g", result.empty() ? "" : " ", got - ref);
        result += buf;
      }
    } else if (c == "race_bad" || c == "race_good") {
      std::vector<int> out(1);
      riformer::emu::launch(race, dim3(1), dim3(64), 0, out.data(), int(c == "race_good"));
      result = std::to_string(out[0]);
    } else if (c == "uninit_bad" || c == "uninit_good") {
      auto in = randv(64);
      std::vector<float> out(64);
      riformer::emu::launch(uninit, dim3(2), dim3(64), 0, in.data(), out.data(), c == "uninit_good" ? 64 : 63);
      bool ok = true;
      for (int t = 0; t < 64; ++t) ok = ok && out[t] == in[(t + 1) % 64];
      result = ok ? "match" : "mismatch";
    } else if (c == "barrier_bad" || c == "barrier_good") {
      std::vector<float> out(64);
      riformer::emu::launch(divergent_barrier, dim3(1), dim3(64), 0, out.data(), int(c == "barrier_good"));
      result = std::to_string(out[0]);
    } else if (c == "bounds_bad" || c == "bounds_good") {
      int n = 96;
      auto in = randv(n);
      std::vector<float> out(n);
      size_t bytes = n * sizeof(float) - (c == "bounds_bad" ? sizeof(float) : 0);
      riformer::emu::launch(dyn_reverse, dim3(1), dim3(n), bytes, in.data(), out.data());
      bool ok = true;
      for (int t = 0; t < n; ++t) ok = ok && out[t] == in[n - 1 - t];
      result = ok ? "match" : "mismatch";
    } else if (c == "cp_async_bad" || c == "cp_async_good") {
      auto in = randv(256);
      std::vector<float> out(64);
      riformer::emu::launch(cp_async_stage, dim3(1), dim3(64), 0, in.data(), out.data(), int(c == "cp_async_good"));
      bool ok = true;
      for (int t = 0; t < 64; ++t) ok = ok && out[t] == in[(4 * t + 5) % 256];
      result = ok ? "match" : "mismatch";
    } else if (c == "cp_stage_bad" || c == "cp_stage_good") {
      auto in = randv(256);
      std::vector<float> out(32);
      int st = c == "cp_stage_bad" ? 1 : 0;
      riformer::emu::launch(cp_async_two_stages, dim3(1), dim3(32), 0, in.data(), out.data(), st);
      bool ok = true;
      for (int t = 0; t < 32; ++t) ok = ok && out[t] == in[st * 128 + (4 * t + 7) % 128];
      result = ok ? "match" : "mismatch";
    } else if (c == "warp_bad" || c == "warp_good") {
      std::vector<float> out(32);
      riformer::emu::launch(warp_handoff, dim3(1), dim3(32), 0, out.data(), int(c == "warp_good"));
      result = std::to_string(out[0]);
    } else if (c == "xwarp_bad" || c == "xwarp_good") {
      std::vector<float> out(64);
      riformer::emu::launch(cross_warp, dim3(1), dim3(64), 0, out.data(), int(c == "xwarp_good"));
      result = std::to_string(out[0]);
    } else if (c == "mask_bad" || c == "mask_good") {
      std::vector<float> out(32);
      riformer::emu::launch(mask_mismatch, dim3(1), dim3(32), 0, out.data(), int(c == "mask_good"));
      result = std::to_string(out[0]);
    } else if (c == "split_bad" || c == "split_good") {
      std::vector<float> out(64);
      riformer::emu::launch(split_barrier, dim3(1), dim3(64), 0, out.data(), int(c == "split_good"));
      result = std::to_string(out[63]);
    } else if (c == "exit_bad" || c == "exit_good") {
      std::vector<float> out(32);
      riformer::emu::launch(lane_exit, dim3(1), dim3(32), 0, out.data(), int(c == "exit_good"));
      result = std::to_string(out[4]);
    } else if (c == "atomic_bad" || c == "atomic_good") {
      std::vector<int> out(1);
      riformer::emu::launch(atomic_then_read, dim3(1), dim3(64), 0, out.data(), int(c == "atomic_good"));
      result = std::to_string(out[0]);
    } else if (c == "dyn2_bad" || c == "dyn2_good") {
      int n = 64;
      auto in = randv(n);
      std::vector<float> out(n);
      size_t bytes = n * (sizeof(__half) + sizeof(float)) - (c == "dyn2_bad" ? 2 : 0);
      riformer::emu::launch(dyn_two_arrays, dim3(2), dim3(n), bytes, in.data(), out.data(), n);
      bool ok = true;
      for (int t = 0; t < n; ++t) {
        float x = in[n - 1 - t];
        ok = ok && out[t] == __half2float(__float2half(x)) + 2.f * x;
      }
      result = ok ? "match" : "mismatch";
    } else if (c == "builtin_atomics") {
      auto out = std::make_shared<int>(-1);
      riformer::emu::launch(builtin_atomics, dim3(2), dim3(64), 0, out.get());
      result = std::to_string(*out);
    } else if (c == "tickets") {
      std::vector<int> order(96);
      riformer::emu::launch(tickets, dim3(1), dim3(96), 0, order.data());
      for (int x : order) result += std::to_string(x) + ",";
    } else {
      fail_usage();
    }
    std::printf("OK %s\n", result.c_str());
  } catch (const riformer::emu::Error& e) {
    std::printf("ERR %s\n", e.what());
  }
  return 0;
}
