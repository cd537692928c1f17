// Host launchers of the CUDA kernels in gates.cu. Plain pointers and an element-type tag, no torch
// types: gates.cu compiles without torch's headers (fast nvcc builds), and bindings.cpp, which
// validates every tensor, is the only file that sees at::Tensor.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "gates.cuh"

namespace dpkernels {

enum class ElemType : int { kFloat32, kFloat64, kFloat16, kBFloat16 };

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

}  // namespace dpkernels
