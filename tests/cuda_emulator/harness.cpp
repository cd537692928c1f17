// Runs one launcher of csrc/launchers.h under the CPU emulation (emulator.h) on arrays from files:
//
//   harness DIR     DIR/job.txt: one line per item,
//                     op NAME                      the launcher (or a self-test of the emulator)
//                     scalar NAME VALUE            an integer or float argument
//                     array NAME BYTES MISALIGN    DIR/NAME.bin, placed MISALIGN bytes past a 64-byte
//                                                  boundary in an allocation that ends where it ends
//                                                  (see allocate)
//                     table NAME ARRAY...          an int64 array of the named arrays' addresses
//
// After the launch every array is written back to DIR/NAME.out and the launcher's cudaError_t is
// printed as `status N`. Arrays are allocated with exactly their size, so under AddressSanitizer a
// kernel touching one byte outside them aborts the process with a report.
#include <sanitizer/asan_interface.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <map>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "emulator.h"
#include "launchers.h"

namespace {

struct Array {
  void* block = nullptr;  // the allocation
  char* data = nullptr;   // block + misalign
  size_t bytes = 0;
};

struct Job {
  std::string op;
  std::map<std::string, std::string> scalars;
  std::map<std::string, Array> arrays;
  std::vector<std::string> order;  // arrays in file order (written back in it)

  std::string scalar(const std::string& name) const {
    const auto it = scalars.find(name);
    if (it == scalars.end()) throw std::runtime_error("missing scalar " + name);
    return it->second;
  }
  int64_t i64(const std::string& name) const { return std::stoll(scalar(name)); }
  uint64_t u64(const std::string& name) const { return std::stoull(scalar(name)); }
  float f32(const std::string& name) const { return std::strtof(scalar(name).c_str(), nullptr); }
  bool flag(const std::string& name) const { return i64(name) != 0; }
  dpkernels::ElemType type(const std::string& name) const { return static_cast<dpkernels::ElemType>(i64(name)); }

  // The array's data, or nullptr for an array the job does not have (an unused launcher argument).
  template <typename T = void>
  T* ptr(const std::string& name, bool optional = false) const {
    const auto it = arrays.find(name);
    if (it == arrays.end()) {
      if (optional) return nullptr;
      throw std::runtime_error("missing array " + name);
    }
    return reinterpret_cast<T*>(it->second.data);
  }
};

// The array ends where the allocation ends (a read or write past it is reported); the misalign
// bytes before it are poisoned in whole 8-byte granules (ASan's unit), so a read more than
// misalign % 8 bytes before the array is reported too.
Array allocate(size_t bytes, size_t misalign) {
  Array a;
  if (posix_memalign(&a.block, 64, misalign + bytes + (misalign + bytes == 0)) != 0) throw std::bad_alloc();
  a.data = static_cast<char*>(a.block) + misalign;
  a.bytes = bytes;
  ASAN_POISON_MEMORY_REGION(a.block, misalign / 8 * 8);
  return a;
}

void release(const Array& a) {
  ASAN_UNPOISON_MEMORY_REGION(a.block, a.data - static_cast<char*>(a.block));
  std::free(a.block);
}

Job read_job(const std::string& dir) {
  Job job;
  std::ifstream in(dir + "/job.txt");
  if (!in) throw std::runtime_error("cannot read " + dir + "/job.txt");
  std::string line;
  while (std::getline(in, line)) {
    std::istringstream words(line);
    std::string kind, name;
    words >> kind >> name;
    if (kind == "op") {
      job.op = name;
    } else if (kind == "scalar") {
      words >> job.scalars[name];
    } else if (kind == "array") {
      size_t bytes = 0, misalign = 0;
      words >> bytes >> misalign;
      Array a = allocate(bytes, misalign);
      std::ifstream bin(dir + "/" + name + ".bin", std::ios::binary);
      if (!bin.read(a.data, static_cast<std::streamsize>(bytes))) throw std::runtime_error("short file " + name);
      job.arrays[name] = a;
      job.order.push_back(name);
    } else if (kind == "table") {
      std::vector<int64_t> pointers;
      std::string target;
      while (words >> target) pointers.push_back(reinterpret_cast<intptr_t>(job.ptr(target)));
      Array a = allocate(pointers.size() * sizeof(int64_t), 0);
      std::memcpy(a.data, pointers.data(), a.bytes);
      job.arrays[name] = a;
      job.order.push_back(name);
    } else if (!kind.empty()) {
      throw std::runtime_error("unknown job line: " + line);
    }
  }
  return job;
}

dpkernels::GateParams gate_params(const Job& j) {
  return dpkernels::GateParams{j.f32("l"), j.f32("r"), j.f32("beta"), j.flag("training")};
}

// Self-tests of the emulation: each must be caught (a sanitizer report, an emulator abort, a status).
__global__ void write_one_past_the_end(float* p, int64_t n) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i <= n) p[i] = 1.0f;  // i == n: one element too far
}

__global__ void read_before_the_start(float* p, float* out, int back) {
  out[threadIdx.x] = p[static_cast<int>(threadIdx.x) - back];  // thread 0: 4 * back bytes before the array
}

__global__ void shuffle_after_lane_zero_left(float* p) {
  if (threadIdx.x % 32 == 0) return;
  p[threadIdx.x] = __shfl_xor_sync(0xffffffffu, p[threadIdx.x], 1);
}

__global__ void warp_sum(float* p) {  // every lane gets the sum of its warp's 32 values
  float v = p[threadIdx.x];
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  p[threadIdx.x] = v;
}

cudaError_t run(const Job& j) {
  using dpkernels::ElemType;
  const std::string& op = j.op;
  if (op == "gate_forward") {
    return dpkernels::launch_gate_forward(j.ptr<float>("la"), j.type("theta_type"), j.ptr("theta0", true),
                                          j.ptr<float>("diff", true), j.type("out_type"), j.ptr("out"), j.i64("n"),
                                          j.u64("seed"), j.u64("offset"), gate_params(j), int(j.i64("max_blocks")),
                                          nullptr);
  }
  if (op == "gate_backward") {
    return dpkernels::launch_gate_backward(j.type("g_type"), j.ptr("g"), j.ptr<float>("diff"), j.ptr<float>("la"),
                                           j.ptr<float>("grad_diff"), j.ptr<float>("grad_la"), j.i64("n"),
                                           j.u64("seed"), j.u64("offset"), gate_params(j), j.flag("has_l0"),
                                           j.f32("l0_lambda"), j.f32("l0_shift"), j.flag("accumulate"),
                                           int(j.i64("max_blocks")), nullptr);
  }
  if (op == "philox_uniform") {
    return dpkernels::launch_philox_uniform(j.ptr<int64_t>("offsets"), j.ptr<float>("out"), j.i64("n"), j.u64("seed"),
                                            int(j.i64("max_blocks")), nullptr);
  }
  if (op == "scatter_apply") {
    return dpkernels::launch_scatter_apply(j.type("type"), j.ptr<int64_t>("table"), j.i64("num_tables"),
                                           j.ptr<int32_t>("ids"), j.ptr("index"), j.flag("index64"),
                                           j.ptr<float>("values"), j.ptr("saved"), j.i64("n"),
                                           int(j.i64("max_blocks")), nullptr);
  }
  if (op == "scatter_restore") {
    return dpkernels::launch_scatter_restore(j.type("type"), j.ptr<int64_t>("table"), j.i64("num_tables"),
                                             j.ptr<int32_t>("ids"), j.ptr("index"), j.flag("index64"), j.ptr("saved"),
                                             j.i64("n"), int(j.i64("max_blocks")), nullptr);
  }
  if (op == "sddmm") {
    return dpkernels::launch_sddmm(j.type("type"), j.ptr("dyt"), j.i64("ld_dyt"), j.ptr("xt"), j.i64("ld_xt"),
                                   j.ptr<int64_t>("index"), j.ptr("out"), j.i64("nnz"), j.i64("m"), j.i64("n_rows"),
                                   j.i64("k"), int(j.i64("max_blocks")), nullptr);
  }
  if (op == "selftest_out_of_bounds") {
    const int64_t n = j.i64("n");
    write_one_past_the_end<<<(n + 1 + 31) / 32, 32>>>(j.ptr<float>("x"), n);
    return cudaGetLastError();
  }
  if (op == "selftest_read_before_start") {
    read_before_the_start<<<1, 8>>>(j.ptr<float>("x"), j.ptr<float>("out"), int(j.i64("back")));
    return cudaGetLastError();
  }
  if (op == "selftest_divergent_shuffle") {
    shuffle_after_lane_zero_left<<<1, 32>>>(j.ptr<float>("x"));
    return cudaGetLastError();
  }
  if (op == "selftest_warp_sum") {
    warp_sum<<<1, int(j.i64("threads"))>>>(j.ptr<float>("x"));
    return cudaGetLastError();
  }
  if (op == "selftest_empty_grid") {
    warp_sum<<<0, 32>>>(j.ptr<float>("x"));
    return cudaGetLastError();
  }
  throw std::runtime_error("unknown op " + op);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s JOB_DIR\n", argv[0]);
    return 2;
  }
  const std::string dir = argv[1];
  try {
    const Job job = read_job(dir);
    const cudaError_t status = run(job);
    for (const auto& name : job.order) {
      const Array& a = job.arrays.at(name);
      std::ofstream out(dir + "/" + name + ".out", std::ios::binary);
      out.write(a.data, static_cast<std::streamsize>(a.bytes));
    }
    std::printf("status %d\n", static_cast<int>(status));
    for (const auto& name : job.order) release(job.arrays.at(name));
  } catch (const std::exception& e) {
    std::fprintf(stderr, "harness: %s\n", e.what());
    return 2;
  }
  return 0;
}
