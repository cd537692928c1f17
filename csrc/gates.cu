// Gate kernels: one pass forward (gates, or the effective weight theta0 + z * diff), one pass
// backward (grad_diff, grad_log_alpha, the fused L0 gradient). Gates are recomputed from
// (seed, offset + i) in the backward, so nothing weight-sized is stored between the two.
//
// Elementwise and memory-bound. Each thread takes packs of kVec consecutive elements in a
// grid-stride loop with int64 indices; when every pointer is aligned to its pack size the packs
// are read and written as single vector accesses (16 bytes for the fp32 arrays), otherwise, and
// for the tail, element by element (packs.cuh).
#include <cuda_runtime.h>

#include <cstdint>

#include "gates.cuh"
#include "launchers.h"
#include "packs.cuh"

namespace dpkernels {
namespace {

using namespace packs;

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
  const int64_t num_packs = (n + kVec - 1) / kVec;
  for (int64_t j = first_item(); j < num_packs; j += item_stride()) {
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
  const int64_t num_packs = (n + kVec - 1) / kVec;
  for (int64_t j = first_item(); j < num_packs; j += item_stride()) {
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
  for (int64_t i = first_item(); i < n; i += item_stride()) {
    out[i] = philox_uniform(seed, static_cast<uint64_t>(offsets[i]));
  }
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
  return visit_elem_type(theta_type, [&](auto theta_tag) {
    return visit_elem_type(out_type, [&](auto out_tag) {
      return forward_apply<decltype(theta_tag), decltype(out_tag)>(la, theta0, diff, out, n, seed, offset, params,
                                                                   max_blocks, stream);
    });
  });
}

cudaError_t launch_gate_backward(ElemType g_type, const void* g, const float* diff, const float* la,
                                 float* grad_diff, float* grad_la, int64_t n, uint64_t seed, uint64_t offset,
                                 GateParams params, bool has_l0, float l0_lambda, float l0_shift, bool accumulate,
                                 int max_blocks, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  return visit_elem_type(g_type, [&](auto g_tag) {
    return backward_typed<decltype(g_tag)>(g, diff, la, grad_diff, grad_la, n, seed, offset, params, has_l0,
                                           l0_lambda, l0_shift, accumulate, max_blocks, stream);
  });
}

cudaError_t launch_philox_uniform(const int64_t* offsets, float* out, int64_t n, uint64_t seed, int max_blocks,
                                  cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  philox_uniform_kernel<<<grid_for(n, max_blocks), kThreads, 0, stream>>>(offsets, out, n, seed);
  return cudaGetLastError();
}

}  // namespace dpkernels
