// Host launchers of the CUDA kernels in gates.cu, scatter.cu and sddmm.cu. Plain pointers and an
// element-type tag, no torch types: the .cu files compile without torch's headers (fast nvcc
// builds), and bindings.cpp, which validates every tensor, is the only file that sees at::Tensor.
// Every launcher returns cudaSuccess without launching for empty inputs, else cudaGetLastError().
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

#include "gates.cuh"

namespace dpkernels {

enum class ElemType : int { kFloat32, kFloat64, kFloat16, kBFloat16 };

// f(T{}) for the element type T that `type` names (float, double, __half, __nv_bfloat16), its
// result returned: the one dtype switch of every launcher (and of the CPU test hooks).
template <typename F>
cudaError_t visit_elem_type(ElemType type, F&& f) {
  switch (type) {
    case ElemType::kFloat32:
      return f(float{});
    case ElemType::kFloat64:
      return f(double{});
    case ElemType::kFloat16:
      return f(__half{});
    case ElemType::kBFloat16:
      return f(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

// Gates z (theta0 == nullptr: out is fp32) or theta0 + z * diff rounded once to out_type.
// la, diff: fp32; theta0: theta_type; n elements each, element i uses Philox counter offset + i.
cudaError_t launch_gate_forward(const float* la, ElemType theta_type, const void* theta0, const float* diff,
                                ElemType out_type, void* out, int64_t n, uint64_t seed, uint64_t offset,
                                GateParams params, int max_blocks, cudaStream_t stream);

// grad_diff (+)= g z, grad_la (+)= g diff dz + l0_lambda p (1 - p) (the L0 term when has_l0).
cudaError_t launch_gate_backward(ElemType g_type, const void* g, const float* diff, const float* la,
                                 float* grad_diff, float* grad_la, int64_t n, uint64_t seed, uint64_t offset,
                                 GateParams params, bool has_l0, float l0_lambda, float l0_shift,
                                 bool accumulate, int max_blocks, cudaStream_t stream);

// out[i] = tl.rand(seed, offsets[i]) (a test hook for bit-identity on the GPU).
cudaError_t launch_philox_uniform(const int64_t* offsets, float* out, int64_t n, uint64_t seed, int max_blocks,
                                  cudaStream_t stream);

// One launch over a whole model's entries (scatter.cu): for each j with p = (type*)table[ids[j]] +
// index[j], saved[j] = *p and *p = round_to_type(acc(*p) + acc(values[j])). index: int64 when
// index64, else int32; saved: type. Trusts table and index (see scatter.cu); skips ids outside
// [0, num_tables).
cudaError_t launch_scatter_apply(ElemType type, const int64_t* table, int64_t num_tables, const int32_t* ids,
                                 const void* index, bool index64, const float* values, void* saved, int64_t n,
                                 int max_blocks, cudaStream_t stream);

// The inverse of launch_scatter_apply with the same layout: *p = saved[j], bit for bit.
cudaError_t launch_scatter_restore(ElemType type, const int64_t* table, int64_t num_tables, const int32_t* ids,
                                   const void* index, bool index64, const void* saved, int64_t n, int max_blocks,
                                   cudaStream_t stream);

// out[j] = sum_m dyt[row_j, m] xt[col_j, m], row_j = index[j] / k, col_j = index[j] % k (sddmm.cu).
// dyt: (n_rows, m), xt: (k, m), both of `type` with unit stride along m and row strides ld_dyt,
// ld_xt (elements); out: fp64 for fp64 inputs, else fp32. n_rows * k must fit in int64; an index
// outside [0, n_rows * k) reads nothing and gives NaN.
cudaError_t launch_sddmm(ElemType type, const void* dyt, int64_t ld_dyt, const void* xt, int64_t ld_xt,
                         const int64_t* index, void* out, int64_t nnz, int64_t m, int64_t n_rows, int64_t k,
                         int max_blocks, cudaStream_t stream);

}  // namespace dpkernels
