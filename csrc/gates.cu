// Gate kernels: one pass forward (gates, or the effective weight theta0 + z * diff), one pass
// backward (grad_diff, grad_log_alpha, the fused L0 gradient). Gates are recomputed from
// (seed, offset + i) in the backward, so nothing weight-sized is stored between the two.
//
// Elementwise and memory-bound. The formula (eval, training, training with beta == 1), whether the
// forward applies the gate and whether the backward adds the L0 term or accumulates are template
// parameters, so each launch's loop holds only its own code. int64 grid-stride loops: when every
// pointer is aligned to its pack size, a hot loop over whole packs of kVec consecutive elements,
// each read and written as single vector accesses (16 bytes for the fp32 arrays), then the
// n % kVec left; otherwise every element in turn (packs.cuh for_each_element). Both paths run
// the same per-element code, so they give the same bits.
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "gates.cuh"
#include "launchers.h"
#include "packs.cuh"

namespace dpkernels {
namespace {

using namespace packs;

template <typename TTheta, typename TOut, bool kApply, GateMode kMode>
__global__ void __launch_bounds__(kThreads)
    gate_forward_kernel(const float* __restrict__ la,       // log_alpha, n elements
                        const TTheta* __restrict__ theta0,  // frozen base (read only when kApply)
                        const float* __restrict__ diff,     // diff magnitudes w (read only when kApply)
                        TOut* __restrict__ out,             // z (fp32) or theta0 + z * w
                        int64_t n,                          // number of elements
                        uint64_t seed,                      // Philox key
                        uint64_t offset,                    // Philox counter of element 0
                        GateParams params,                  // l, r, beta
                        bool vectorized) {                  // every pointer aligned to its pack
  const GateConstants c = gate_constants(params);
  // Element i's output: z, or theta0 + z * w in fp32 rounded once to TOut.
  const auto element = [&](float a, float w, TTheta t, int64_t i) -> TOut {
    const float z = hard_concrete<kMode>(a, seed, offset + static_cast<uint64_t>(i), c).z;
    if constexpr (kApply) {
      return Convert<TOut>::from_float(fmaf(z, w, Convert<TTheta>::to_float(t)));
    } else {
      return z;
    }
  };
  for_each_element(
      n, vectorized,
      [&](int64_t base) {
        const Pack<float> a = load_whole_pack(la + base);
        Pack<float> w{};
        Pack<TTheta> t{};
        if constexpr (kApply) {
          w = load_whole_pack(diff + base);
          t = load_whole_pack(theta0 + base);
        }
        Pack<TOut> o;
#pragma unroll
        for (int k = 0; k < kVec; ++k) o.v[k] = element(a.v[k], w.v[k], t.v[k], base + k);
        store_whole_pack(out + base, o);
      },
      [&](int64_t i) {
        if constexpr (kApply) {
          out[i] = element(la[i], diff[i], theta0[i], i);
        } else {
          out[i] = element(la[i], 0.0f, TTheta{}, i);
        }
      });
}

template <typename TG, GateMode kMode, bool kHasL0, bool kAccumulate>
__global__ void __launch_bounds__(kThreads)
    gate_backward_kernel(const TG* __restrict__ g,        // dLoss/dtheta, n elements
                         const float* __restrict__ diff,  // diff magnitudes w
                         const float* __restrict__ la,    // log_alpha
                         float* __restrict__ grad_diff,   // out, or accumulated into (kAccumulate)
                         float* __restrict__ grad_la,     // out, or accumulated into (kAccumulate)
                         int64_t n,                       // number of elements
                         uint64_t seed,                   // Philox key (as in the forward)
                         uint64_t offset,                 // Philox counter of element 0
                         GateParams params,               // l, r, beta
                         float l0_lambda,                 // weight of the fused E[L0] gradient (kHasL0)
                         float l0_shift,                  // beta log(-l / r)
                         bool vectorized) {               // every pointer aligned to its pack
  const GateConstants c = gate_constants(params);
  // Element i's gradients, written to (or, accumulating, added to) gw and gla.
  const auto element = [&](TG g_i, float w, float a, int64_t i, float& gw, float& gla) {
    const Gate gate = hard_concrete<kMode>(a, seed, offset + static_cast<uint64_t>(i), c);
    const float gk = Convert<TG>::to_float(g_i);
    const float dw = gk * gate.z;
    float dla = gk * w * gate.dz;
    if constexpr (kHasL0) dla += l0_lambda * expected_l0_grad(a, l0_shift);
    if constexpr (kAccumulate) {
      gw += dw;
      gla += dla;
    } else {
      gw = dw;
      gla = dla;
    }
  };
  for_each_element(
      n, vectorized,
      [&](int64_t base) {
        const Pack<TG> gv = load_whole_pack(g + base);
        const Pack<float> w = load_whole_pack(diff + base);
        const Pack<float> a = load_whole_pack(la + base);
        Pack<float> gw, gla;
        if constexpr (kAccumulate) {
          gw = load_whole_pack(grad_diff + base);
          gla = load_whole_pack(grad_la + base);
        }
#pragma unroll
        for (int k = 0; k < kVec; ++k) element(gv.v[k], w.v[k], a.v[k], base + k, gw.v[k], gla.v[k]);
        store_whole_pack(grad_diff + base, gw);
        store_whole_pack(grad_la + base, gla);
      },
      [&](int64_t i) {
        float gw = 0.0f, gla = 0.0f;
        if constexpr (kAccumulate) {
          gw = grad_diff[i];
          gla = grad_la[i];
        }
        element(g[i], diff[i], la[i], i, gw, gla);
        grad_diff[i] = gw;
        grad_la[i] = gla;
      });
}

__global__ void __launch_bounds__(kThreads)
    philox_uniform_kernel(const int64_t* __restrict__ offsets, float* __restrict__ out, int64_t n, uint64_t seed) {
  for (int64_t i = first_item(); i < n; i += item_stride()) {
    out[i] = philox_uniform(seed, static_cast<uint64_t>(offsets[i]));
  }
}

// f(std::integral_constant<GateMode, mode>{}) for the formula params select, its result returned.
template <typename F>
cudaError_t visit_gate_mode(const GateParams& params, F&& f) {
  switch (gate_mode(params)) {
    case GateMode::kEval:
      return f(std::integral_constant<GateMode, GateMode::kEval>{});
    case GateMode::kTrainBetaOne:
      return f(std::integral_constant<GateMode, GateMode::kTrainBetaOne>{});
    case GateMode::kTrain:
      break;
  }
  return f(std::integral_constant<GateMode, GateMode::kTrain>{});
}

// f(std::true_type{}) or f(std::false_type{}): a runtime flag as a template parameter.
template <typename F>
cudaError_t visit_bool(bool flag, F&& f) {
  return flag ? f(std::true_type{}) : f(std::false_type{});
}

template <typename TTheta, typename TOut, bool kApply, GateMode kMode>
cudaError_t forward_typed(const float* la, const void* theta0, const float* diff, void* out, int64_t n, uint64_t seed,
                          uint64_t offset, GateParams params, int max_blocks, cudaStream_t stream) {
  const auto* t = static_cast<const TTheta*>(theta0);
  auto* o = static_cast<TOut*>(out);
  const bool vec = pack_aligned<float>(la) && pack_aligned<float>(diff) && pack_aligned<TTheta>(t) &&
                   pack_aligned<TOut>(o);
  gate_forward_kernel<TTheta, TOut, kApply, kMode>
      <<<grid_for((n + kVec - 1) / kVec, max_blocks), kThreads, 0, stream>>>(la, t, diff, o, n, seed, offset,
                                                                              params, vec);
  return cudaGetLastError();
}

template <typename TG, GateMode kMode, bool kHasL0, bool kAccumulate>
cudaError_t backward_typed(const void* g, const float* diff, const float* la, float* grad_diff, float* grad_la,
                           int64_t n, uint64_t seed, uint64_t offset, GateParams params, float l0_lambda,
                           float l0_shift, int max_blocks, cudaStream_t stream) {
  const auto* gt = static_cast<const TG*>(g);
  const bool vec = pack_aligned<TG>(gt) && pack_aligned<float>(diff) && pack_aligned<float>(la) &&
                   pack_aligned<float>(grad_diff) && pack_aligned<float>(grad_la);
  gate_backward_kernel<TG, kMode, kHasL0, kAccumulate><<<grid_for((n + kVec - 1) / kVec, max_blocks), kThreads, 0,
                                                         stream>>>(gt, diff, la, grad_diff, grad_la, n, seed,
                                                                   offset, params, l0_lambda, l0_shift, vec);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_gate_forward(const float* la, ElemType theta_type, const void* theta0, const float* diff,
                                ElemType out_type, void* out, int64_t n, uint64_t seed, uint64_t offset,
                                GateParams params, int max_blocks, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  return visit_gate_mode(params, [&](auto mode) {
    if (theta0 == nullptr) {
      return forward_typed<float, float, false, decltype(mode)::value>(la, nullptr, nullptr, out, n, seed, offset,
                                                                      params, max_blocks, stream);
    }
    return visit_elem_type(theta_type, [&](auto theta_tag) {
      return visit_elem_type(out_type, [&](auto out_tag) {
        return forward_typed<decltype(theta_tag), decltype(out_tag), true, decltype(mode)::value>(
            la, theta0, diff, out, n, seed, offset, params, max_blocks, stream);
      });
    });
  });
}

cudaError_t launch_gate_backward(ElemType g_type, const void* g, const float* diff, const float* la,
                                 float* grad_diff, float* grad_la, int64_t n, uint64_t seed, uint64_t offset,
                                 GateParams params, bool has_l0, float l0_lambda, float l0_shift, bool accumulate,
                                 int max_blocks, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  return visit_gate_mode(params, [&](auto mode) {
    return visit_bool(has_l0, [&](auto has_l0_tag) {
      return visit_bool(accumulate, [&](auto accumulate_tag) {
        return visit_elem_type(g_type, [&](auto g_tag) {
          return backward_typed<decltype(g_tag), decltype(mode)::value, decltype(has_l0_tag)::value,
                                decltype(accumulate_tag)::value>(g, diff, la, grad_diff, grad_la, n, seed, offset,
                                                                 params, l0_lambda, l0_shift, max_blocks, stream);
        });
      });
    });
  });
}

cudaError_t launch_philox_uniform(const int64_t* offsets, float* out, int64_t n, uint64_t seed, int max_blocks,
                                  cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  philox_uniform_kernel<<<grid_for(n, max_blocks), kThreads, 0, stream>>>(offsets, out, n, seed);
  return cudaGetLastError();
}

}  // namespace dpkernels
