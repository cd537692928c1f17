// A CPU emulation of the CUDA execution model, just enough to run csrc/*.cu on a machine without
// a GPU (tests/_cuda_emulator.py rewrites each `kernel<<<config>>>(args)` into
// `::cuda_emulator::launch(config, kernel, args)` and force-includes this header).
//
// What it models: a launch runs every thread of the grid with its own threadIdx/blockIdx/blockDim/
// gridDim; blocks and warps one after another, the lanes of a warp on a pool of 32 OS threads, so
// that warp shuffles exchange values in lockstep as on the GPU. Grid and block dimensions are
// checked against the driver's limits (an invalid launch sets cudaErrorInvalidConfiguration,
// returned by the next cudaGetLastError()). Device memory is host memory: built with
// -fsanitize=address,undefined, every access outside an allocation and every misaligned vector
// access is reported, which is what compute-sanitizer's memcheck would say on the GPU.
//
// What it does not model: shared memory (__shared__ does not compile, dynamic shared memory and
// __syncthreads abort), partial-mask or narrow shuffles (abort), atomics (do not compile), none of
// which our kernels use; __launch_bounds__ and register limits; scheduling (warps run one after
// another, so a race between threads of different warps or blocks stays invisible); the GPU's
// arithmetic: its special-function approximations (csrc/gates.cuh runs ex2/lg2/rcp.approx there,
// the host's exp2f, log2f and 1 / x here) and nvcc's contraction of a * b + c into one fma
// (-fmad=true; g++ here rounds twice), so results may differ from the GPU's in the last bits (the
// tests compare with the float64 reference by the tolerance rule; explicit fmaf calls are the same
// on both).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <thread>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif

namespace cuda_emulator {

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "cuda_emulator: %s\n", what);
  std::fflush(stderr);
  std::abort();
}

// Lockstep for the lanes of one warp: each shuffle is a barrier all lanes of the warp must reach.
// One Warp serves a whole launch: a pool of 32 lane threads runs the warps one after another, and
// next_warp() is the rendezvous between two of them.
class Warp {
 public:
  Warp(int pool, int first_lanes) : pool_(pool), lanes_(first_lanes) {}

  template <typename T>
  T shuffle_xor(unsigned mask, T value, int lane, int lane_mask, int width) {
    static_assert(sizeof(T) <= sizeof(uint64_t), "shuffle of a value wider than 8 bytes");
    if (mask != 0xffffffffu || lanes_ != 32) fail("only full-warp shuffles are emulated (mask 0xffffffff, 32 lanes)");
    if (width != 32) fail("only width-32 shuffles are emulated");
    std::memcpy(&slots_[lane], &value, sizeof(T));
    barrier();  // every lane has published its value
    T out;
    std::memcpy(&out, &slots_[lane ^ lane_mask], sizeof(T));
    barrier();  // every lane has read before any lane publishes again
    return out;
  }

  // A lane returned from the kernel: a lane still waiting in a shuffle would wait forever on the
  // GPU too (undefined behaviour there), so that is reported.
  void lane_exited() {
    std::lock_guard<std::mutex> lock(mutex_);
    ++exited_;
    if (arrived_ > 0) fail("divergent shuffle: a lane left the kernel while others wait in __shfl_xor_sync");
    cv_.notify_all();
  }

  // Every pool thread calls this after each warp (whether it had a lane in it or not); the last
  // arrival sets up the next warp, of next_lanes lanes, and releases the others.
  void next_warp(int next_lanes) {
    std::unique_lock<std::mutex> lock(mutex_);
    const uint64_t epoch = epoch_;
    if (++done_ == pool_) {
      done_ = arrived_ = exited_ = 0;
      lanes_ = next_lanes;
      ++epoch_;
      cv_.notify_all();
      return;
    }
    cv_.wait(lock, [&] { return epoch_ != epoch; });
  }

 private:
  void barrier() {
    std::unique_lock<std::mutex> lock(mutex_);
    if (exited_ > 0) fail("divergent shuffle: __shfl_xor_sync after a lane of the warp left the kernel");
    const uint64_t generation = generation_;
    if (++arrived_ == lanes_) {
      arrived_ = 0;
      ++generation_;
      cv_.notify_all();
      return;
    }
    cv_.wait(lock, [&] { return generation_ != generation || exited_ > 0; });
    if (generation_ == generation) {
      fail("divergent shuffle: a lane left the kernel while others wait in __shfl_xor_sync");
    }
  }

  const int pool_;
  int lanes_;  // lanes of the current warp
  uint64_t slots_[32] = {};
  std::mutex mutex_;
  std::condition_variable cv_;
  int arrived_ = 0;
  int exited_ = 0;
  int done_ = 0;
  uint64_t generation_ = 0;
  uint64_t epoch_ = 0;
};

struct ThreadContext {
  uint3 thread_idx{};
  uint3 block_idx{};
  dim3 block_dim{};
  dim3 grid_dim{};
  Warp* warp = nullptr;
  int lane = 0;
};

inline thread_local ThreadContext context;
inline cudaError_t last_error = cudaSuccess;  // launches come from one host thread

inline cudaError_t get_last_error() {
  const cudaError_t e = last_error;
  last_error = cudaSuccess;
  return e;
}

struct LaunchConfig {
  LaunchConfig(dim3 grid, dim3 block, size_t shared_bytes = 0, cudaStream_t stream = nullptr)
      : grid(grid), block(block), shared_bytes(shared_bytes) {
    (void)stream;  // one stream: launches run to completion in order
  }
  dim3 grid, block;
  size_t shared_bytes;
};

// The driver's limits (compute capability 8.x/9.x).
inline bool valid(const LaunchConfig& c) {
  const uint64_t threads = uint64_t{c.block.x} * c.block.y * c.block.z;
  return c.grid.x >= 1 && c.grid.y >= 1 && c.grid.z >= 1 && c.grid.x <= 0x7fffffffu && c.grid.y <= 65535 &&
         c.grid.z <= 65535 && threads >= 1 && threads <= 1024 && c.block.x <= 1024 && c.block.y <= 1024 &&
         c.block.z <= 64 && c.shared_bytes <= 48 * 1024;
}

// Runs kernel(args...) on every thread of the grid. The arguments are converted to the kernel's
// parameter types once, as the GPU receives a copy of them.
template <typename... Params, typename... Args>
void launch(const LaunchConfig& config, void (*kernel)(Params...), Args&&... args) {
  if (!valid(config)) {
    last_error = cudaErrorInvalidConfiguration;
    return;
  }
  if (config.shared_bytes != 0) fail("dynamic shared memory is not emulated");
  const std::tuple<std::decay_t<Params>...> params(std::forward<Args>(args)...);
  const dim3 g = config.grid, b = config.block;
  const int threads = static_cast<int>(b.x * b.y * b.z);
  const int pool_size = threads < 32 ? threads : 32;
  const int64_t blocks = int64_t{g.x} * g.y * g.z;
  const int warps_per_block = (threads + 31) / 32;
  const int64_t warps = blocks * warps_per_block;
  auto lanes_of = [&](int64_t w) {  // lanes of the w-th warp of the launch (the last of a block may be partial)
    const int first = static_cast<int>(w % warps_per_block) * 32;
    return threads - first < 32 ? threads - first : 32;
  };
  Warp warp(pool_size, lanes_of(0));
  std::vector<std::thread> pool;
  pool.reserve(pool_size);
  for (int lane = 0; lane < pool_size; ++lane) {
    pool.emplace_back([&, lane] {
      for (int64_t w = 0; w < warps; ++w) {  // the warps one after another, blocks in x, y, z order
        if (lane < lanes_of(w)) {
          const int64_t block = w / warps_per_block;
          const unsigned t = static_cast<unsigned>((w % warps_per_block) * 32 + lane);  // x fastest, as on the GPU
          context.thread_idx = uint3{t % b.x, (t / b.x) % b.y, t / (b.x * b.y)};
          context.block_idx = uint3{static_cast<unsigned>(block % g.x), static_cast<unsigned>(block / g.x % g.y),
                                    static_cast<unsigned>(block / (int64_t{g.x} * g.y))};
          context.block_dim = b;
          context.grid_dim = g;
          context.warp = &warp;
          context.lane = lane;
          std::apply(kernel, params);
          warp.lane_exited();
        }
        warp.next_warp(w + 1 < warps ? lanes_of(w + 1) : 0);
      }
    });
  }
  for (auto& th : pool) th.join();
}

template <typename T>
T shfl_xor_sync(unsigned mask, T value, int lane_mask, int width = 32) {
  return context.warp->shuffle_xor(mask, value, context.lane, lane_mask, width);
}

[[noreturn]] inline void syncthreads_unsupported() { fail("__syncthreads is not emulated"); }

}  // namespace cuda_emulator

// The kernels' view of the emulation (after the CUDA headers, whose declarations keep the real names).
#define threadIdx (::cuda_emulator::context.thread_idx)
#define blockIdx (::cuda_emulator::context.block_idx)
#define blockDim (::cuda_emulator::context.block_dim)
#define gridDim (::cuda_emulator::context.grid_dim)
#define __shfl_xor_sync ::cuda_emulator::shfl_xor_sync
#define __syncthreads() ::cuda_emulator::syncthreads_unsupported()
#undef __shared__
#define __shared__ _Pragma("GCC error \"__shared__ memory is not emulated\"")
#define cudaGetLastError ::cuda_emulator::get_last_error
