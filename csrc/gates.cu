// Gate kernels: one pass forward (gates, or the effective weight theta0 + z * diff), one pass
// backward (grad_diff, grad_log_alpha, the fused L0 gradient). Gates are recomputed from
// (seed, offset + i) in the backward, so nothing weight-sized is stored between the two.
//
// Elementwise and memory-bound. Each thread takes packs of kVec consecutive elements in a
// grid-stride loop with int64 indices; when every pointer is aligned to its pack size the packs
// are read and written as single vector accesses (16 bytes for the fp32 arrays), otherwise, and
// for the tail, element by element.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "gates.cuh"
#include "launchers.h"

namespace dpkernels {
namespace {

constexpr int kThreads = 256;
constexpr int kVec = 4;

// Conversions to and from the fp32 compute type; stores round to nearest even, like torch.
template <typename T>
struct Convert;
template <>
struct Convert<float> {
  static __device__ __forceinline__ float to_float(float x) { return x; }
  static __device__ __forceinline__ float from_float(float x) { return x; }
};
template <>
struct Convert<double> {
  static __device__ __forceinline__ float to_float(double x) { return static_cast<float>(x); }
  static __device__ __forceinline__ double from_float(float x) { return x; }
};
template <>
struct Convert<__half> {
  static __device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
  static __device__ __forceinline__ __half from_float(float x) { return __float2half_rn(x); }
};
template <>
struct Convert<__nv_bfloat16> {
  static __device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
};

template <typename T>
struct alignas(sizeof(T) * kVec) Pack {
  T v[kVec];
};

// Elements base .. base + kVec - 1 of p (those < n); one vector load when the pack is whole and
// aligned. Missing tail elements are left as they were (callers zero-initialise).
template <typename T>
__device__ __forceinline__ void load_pack(const T* __restrict__ p, int64_t base, int64_t n, bool vectorized,
                                          T (&x)[kVec]) {
  if (vectorized && base + kVec <= n) {
    const Pack<T> pack = *reinterpret_cast<const Pack<T>*>(p + base);
#pragma unroll
    for (int k = 0; k < kVec; ++k) x[k] = pack.v[k];
  } else {
#pragma unroll
    for (int k = 0; k < kVec; ++k)
      if (base + k < n) x[k] = p[base + k];
  }
}

template <typename T>
__device__ __forceinline__ void store_pack(T* __restrict__ p, int64_t base, int64_t n, bool vectorized,
                                           const T (&x)[kVec]) {
  if (vectorized && base + kVec <= n) {
    Pack<T> pack;
#pragma unroll
    for (int k = 0; k < kVec; ++k) pack.v[k] = x[k];
    *reinterpret_cast<Pack<T>*>(p + base) = pack;
  } else {
#pragma unroll
    for (int k = 0; k < kVec; ++k)
      if (base + k < n) p[base + k] = x[k];
  }
}

template <typename T>
__device__ __forceinline__ void zero_pack(T (&x)[kVec]) {
#pragma unroll
  for (int k = 0; k < kVec; ++k) x[k] = Convert<T>::from_float(0.0f);
}

__device__ __forceinline__ int64_t first_pack() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}

__device__ __forceinline__ int64_t pack_stride() { return static_cast<int64_t>(gridDim.x) * blockDim.x; }

template <typename TTheta, typename TOut, bool kApply>
__global__ void __launch_bounds__(kThreads)
    gate_forward_kernel(const float* __restrict__ la,       // log_alpha, n elements
                        const TTheta* __restrict__ theta0,  // frozen base (read only when kApply)
                        const float* __restrict__ diff,     // diff magnitudes w (read only when kApply)
                        TOut* __restrict__ out,             // z (fp32) or theta0 + z * w
                        int64_t n,                          // number of elements
                        uint64_t seed,                      // Philox key
                        uint64_t offset,                    // Philox counter of element 0
                        GateParams params,                  // l, r, beta, training
                        bool vectorized) {                  // every pointer aligned to its pack
  const int64_t packs = (n + kVec - 1) / kVec;
  for (int64_t j = first_pack(); j < packs; j += pack_stride()) {
    const int64_t base = j * kVec;
    float a[kVec], w[kVec];
    TTheta t[kVec];
    TOut o[kVec];
    zero_pack(a);
    load_pack(la, base, n, vectorized, a);
    if constexpr (kApply) {
      zero_pack(w);
      zero_pack(t);
      load_pack(diff, base, n, vectorized, w);
      load_pack(theta0, base, n, vectorized, t);
    }
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      const float z = hard_concrete(a[k], seed, offset + static_cast<uint64_t>(base + k), params).z;
      if constexpr (kApply) {
        o[k] = Convert<TOut>::from_float(fmaf(z, w[k], Convert<TTheta>::to_float(t[k])));
      } else {
        o[k] = z;
      }
    }
    store_pack(out, base, n, vectorized, o);
  }
}

template <typename TG>
__global__ void __launch_bounds__(kThreads)
    gate_backward_kernel(const TG* __restrict__ g,        // dLoss/dtheta, n elements
                         const float* __restrict__ diff,  // diff magnitudes w
                         const float* __restrict__ la,    // log_alpha
                         float* __restrict__ grad_diff,   // out, or accumulated into
                         float* __restrict__ grad_la,     // out, or accumulated into
                         int64_t n,                       // number of elements
                         uint64_t seed,                   // Philox key (as in the forward)
                         uint64_t offset,                 // Philox counter of element 0
                         GateParams params,               // l, r, beta, training
                         bool has_l0,                     // add l0_lambda p (1 - p) to grad_la
                         float l0_lambda,                 // weight of the fused E[L0] gradient
                         float l0_shift,                  // beta log(-l / r)
                         bool accumulate,                 // add into grad_diff / grad_la
                         bool vectorized) {               // every pointer aligned to its pack
  const int64_t packs = (n + kVec - 1) / kVec;
  for (int64_t j = first_pack(); j < packs; j += pack_stride()) {
    const int64_t base = j * kVec;
    TG gv[kVec];
    float w[kVec], a[kVec], gw[kVec], gla[kVec];
    zero_pack(gv);
    zero_pack(w);
    zero_pack(a);
    load_pack(g, base, n, vectorized, gv);
    load_pack(diff, base, n, vectorized, w);
    load_pack(la, base, n, vectorized, a);
    if (accumulate) {
      zero_pack(gw);
      zero_pack(gla);
      load_pack(static_cast<const float*>(grad_diff), base, n, vectorized, gw);
      load_pack(static_cast<const float*>(grad_la), base, n, vectorized, gla);
    }
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      const Gate gate = hard_concrete(a[k], seed, offset + static_cast<uint64_t>(base + k), params);
      const float gk = Convert<TG>::to_float(gv[k]);
      float dw = gk * gate.z;
      float dla = gk * w[k] * gate.dz;
      if (has_l0) dla += l0_lambda * expected_l0_grad(a[k], l0_shift);
      gw[k] = accumulate ? gw[k] + dw : dw;
      gla[k] = accumulate ? gla[k] + dla : dla;
    }
    store_pack(grad_diff, base, n, vectorized, gw);
    store_pack(grad_la, base, n, vectorized, gla);
  }
}

__global__ void __launch_bounds__(kThreads)
    philox_uniform_kernel(const int64_t* __restrict__ offsets, float* __restrict__ out, int64_t n, uint64_t seed) {
  for (int64_t i = first_pack(); i < n; i += pack_stride()) {
    out[i] = philox_uniform(seed, static_cast<uint64_t>(offsets[i]));
  }
}

template <typename T>
bool pack_aligned(const void* p) {
  return p == nullptr || reinterpret_cast<uintptr_t>(p) % sizeof(Pack<T>) == 0;
}

// Enough blocks to cover the work once, capped at max_blocks (a few waves of the device); the
// grid-stride loops take the rest.
unsigned grid_for(int64_t items, int max_blocks) {
  const int64_t blocks = (items + kThreads - 1) / kThreads;
  return static_cast<unsigned>(blocks < max_blocks ? blocks : max_blocks);
}

template <typename TTheta, typename TOut>
cudaError_t forward_apply(const float* la, const void* theta0, const float* diff, void* out, int64_t n,
                          uint64_t seed, uint64_t offset, GateParams params, int max_blocks, cudaStream_t stream) {
  const auto* t = static_cast<const TTheta*>(theta0);
  auto* o = static_cast<TOut*>(out);
  const bool vec = pack_aligned<float>(la) && pack_aligned<float>(diff) && pack_aligned<TTheta>(t) &&
                   pack_aligned<TOut>(o);
  gate_forward_kernel<TTheta, TOut, true>
      <<<grid_for((n + kVec - 1) / kVec, max_blocks), kThreads, 0, stream>>>(la, t, diff, o, n, seed, offset,
                                                                              params, vec);
  return cudaGetLastError();
}

template <typename TTheta>
cudaError_t forward_apply_out(ElemType out_type, const float* la, const void* theta0, const float* diff, void* out,
                              int64_t n, uint64_t seed, uint64_t offset, GateParams params, int max_blocks,
                              cudaStream_t stream) {
  switch (out_type) {
    case ElemType::kFloat32:
      return forward_apply<TTheta, float>(la, theta0, diff, out, n, seed, offset, params, max_blocks, stream);
    case ElemType::kFloat64:
      return forward_apply<TTheta, double>(la, theta0, diff, out, n, seed, offset, params, max_blocks, stream);
    case ElemType::kFloat16:
      return forward_apply<TTheta, __half>(la, theta0, diff, out, n, seed, offset, params, max_blocks, stream);
    case ElemType::kBFloat16:
      return forward_apply<TTheta, __nv_bfloat16>(la, theta0, diff, out, n, seed, offset, params, max_blocks,
                                                  stream);
  }
  return cudaErrorInvalidValue;
}

template <typename TG>
cudaError_t backward_typed(const void* g, const float* diff, const float* la, float* grad_diff, float* grad_la,
                           int64_t n, uint64_t seed, uint64_t offset, GateParams params, bool has_l0,
                           float l0_lambda, float l0_shift, bool accumulate, int max_blocks, cudaStream_t stream) {
  const auto* gt = static_cast<const TG*>(g);
  const bool vec = pack_aligned<TG>(gt) && pack_aligned<float>(diff) && pack_aligned<float>(la) &&
                   pack_aligned<float>(grad_diff) && pack_aligned<float>(grad_la);
  gate_backward_kernel<TG><<<grid_for((n + kVec - 1) / kVec, max_blocks), kThreads, 0, stream>>>(
      gt, diff, la, grad_diff, grad_la, n, seed, offset, params, has_l0, l0_lambda, l0_shift, accumulate, vec);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_gate_forward(const float* la, ElemType theta_type, const void* theta0, const float* diff,
                                ElemType out_type, void* out, int64_t n, uint64_t seed, uint64_t offset,
                                GateParams params, int max_blocks, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  if (theta0 == nullptr) {
    auto* o = static_cast<float*>(out);
    const bool vec = pack_aligned<float>(la) && pack_aligned<float>(o);
    gate_forward_kernel<float, float, false><<<grid_for((n + kVec - 1) / kVec, max_blocks), kThreads, 0, stream>>>(
        la, nullptr, nullptr, o, n, seed, offset, params, vec);
    return cudaGetLastError();
  }
  switch (theta_type) {
    case ElemType::kFloat32:
      return forward_apply_out<float>(out_type, la, theta0, diff, out, n, seed, offset, params, max_blocks, stream);
    case ElemType::kFloat64:
      return forward_apply_out<double>(out_type, la, theta0, diff, out, n, seed, offset, params, max_blocks, stream);
    case ElemType::kFloat16:
      return forward_apply_out<__half>(out_type, la, theta0, diff, out, n, seed, offset, params, max_blocks, stream);
    case ElemType::kBFloat16:
      return forward_apply_out<__nv_bfloat16>(out_type, la, theta0, diff, out, n, seed, offset, params, max_blocks,
                                              stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_gate_backward(ElemType g_type, const void* g, const float* diff, const float* la,
                                 float* grad_diff, float* grad_la, int64_t n, uint64_t seed, uint64_t offset,
                                 GateParams params, bool has_l0, float l0_lambda, float l0_shift, bool accumulate,
                                 int max_blocks, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  switch (g_type) {
    case ElemType::kFloat32:
      return backward_typed<float>(g, diff, la, grad_diff, grad_la, n, seed, offset, params, has_l0, l0_lambda,
                                   l0_shift, accumulate, max_blocks, stream);
    case ElemType::kFloat64:
      return backward_typed<double>(g, diff, la, grad_diff, grad_la, n, seed, offset, params, has_l0, l0_lambda,
                                    l0_shift, accumulate, max_blocks, stream);
    case ElemType::kFloat16:
      return backward_typed<__half>(g, diff, la, grad_diff, grad_la, n, seed, offset, params, has_l0, l0_lambda,
                                    l0_shift, accumulate, max_blocks, stream);
    case ElemType::kBFloat16:
      return backward_typed<__nv_bfloat16>(g, diff, la, grad_diff, grad_la, n, seed, offset, params, has_l0,
                                           l0_lambda, l0_shift, accumulate, max_blocks, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_philox_uniform(const int64_t* offsets, float* out, int64_t n, uint64_t seed, int max_blocks,
                                  cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  philox_uniform_kernel<<<grid_for(n, max_blocks), kThreads, 0, stream>>>(offsets, out, n, seed);
  return cudaGetLastError();
}

}  // namespace dpkernels
