// Hard-concrete gate math (DESIGN.md section 1), the same formulas as the Triton kernel
// dpkernels/backends/triton/gates.py::_hard_concrete, for host and device:
//
//   training: u = tl.rand(seed, counter) (bit for bit),  slope = (r - l) / beta,
//             s = sigmoid((log u - log(1 - u) + la) / beta) = 1 / (1 + q),
//             q = 2**((log2(1 - u) - log2(u) - la log2 e) / beta);
//             beta == 1 (the paper's): the cheaper equal form s = u / max(u + (1 - u) 2**(-la log2 e), 1e-30)
//   eval:     s = sigmoid(la) = 1 / (1 + 2**(-la log2 e)),  slope = r - l
//   sbar = s (r - l) + l,  z = clamp(sbar, 0, 1),  dz/dla = 1[0 < sbar < 1] slope s (1 - s)
//
// On the GPU 2**x, log2 and 1/x are the special-function unit's approximations (ex2, lg2,
// rcp.approx.ftz.f32: one MUFU instruction each; the PTX ISA bounds their errors by 2 ulp, 2**-22
// absolute on (0.5, 2) and relative elsewhere, 1 ulp), on the host (the CPU test hooks and the
// kernel emulator compile this same code with g++) exp2f, log2f and 1 / x. So z differs between
// the two, and from the float64 reference, by a few float32 ulps (tests/test_gates.py's rule);
// u is the same bits on both.
//
// Finite for u == 0 (log2 0 = -inf gives q = inf, s = 0; the beta == 1 form's floor keeps 0 / 0
// away, s = 0) and for any finite la, |la| up to 1e4 included: 2**x saturates to 0 or inf, and
// 1 / inf = 0, so s is exactly 0 or 1 at the extremes without NaN.
#pragma once

#include <math.h>

#include "philox.cuh"

namespace dpkernels {

struct GateParams {
  float l;        // stretch interval left end (< 0)
  float r;        // stretch interval right end (> 1)
  float beta;     // temperature (> 0)
  bool training;  // sample from (seed, counter) vs the deterministic eval gate
};

struct Gate {
  float z;   // the gate in [0, 1]
  float dz;  // dz / dlog_alpha
};

// Which formula a launch runs: a template parameter of the kernels, so each compiles only its own.
enum class GateMode : int {
  kEval,          // z_eval = clamp(sigmoid(la) (r - l) + l, 0, 1), no draw
  kTrain,         // sampled, any beta
  kTrainBetaOne,  // sampled, beta == 1: the cheaper equal form
};

inline GateMode gate_mode(const GateParams& p) {
  if (!p.training) return GateMode::kEval;
  return p.beta == 1.0f ? GateMode::kTrainBetaOne : GateMode::kTrain;
}

// The per-launch constants of the formulas, computed once (outside the kernels' loops).
struct GateConstants {
  float l;         // stretch interval left end
  float width;     // r - l
  float inv_beta;  // 1 / beta
  float slope;     // dz/dla = slope s (1 - s) inside the clamp: (r - l) / beta, or r - l for eval
};

DPK_HD GateConstants gate_constants(const GateParams& p) {
  const float width = p.r - p.l;
  return GateConstants{p.l, width, 1.0f / p.beta, p.training ? width / p.beta : width};
}

constexpr float kLog2e = 0x1.715476p+0f;  // log2(e), the float32 nearest
constexpr float kTinyDenominator = 1e-30f;  // keeps u / d at 0 for u = 0 when d underflows to 0 too

// 2**x, log2(x), 1 / x: one MUFU instruction each on the GPU (.ftz: subnormals flush to 0, which
// no formula here depends on), the C library on the host.
DPK_HD float approx_exp2(float x) {
#if defined(__CUDA_ARCH__)
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#else
  return exp2f(x);
#endif
}

DPK_HD float approx_log2(float x) {
#if defined(__CUDA_ARCH__)
  float y;
  asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#else
  return log2f(x);
#endif
}

DPK_HD float approx_reciprocal(float x) {
#if defined(__CUDA_ARCH__)
  float y;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#else
  return 1.0f / x;
#endif
}

// 1 / (1 + 2**(-x log2 e)): exactly 0 or 1 at the extremes, never NaN for finite x.
DPK_HD float approx_sigmoid(float x) { return approx_reciprocal(1.0f + approx_exp2(-x * kLog2e)); }

template <GateMode kMode>
DPK_HD Gate hard_concrete(float la, uint64_t seed, uint64_t counter, const GateConstants& c) {
  float s;
  if constexpr (kMode == GateMode::kEval) {
    s = approx_sigmoid(la);
  } else if constexpr (kMode == GateMode::kTrainBetaOne) {
    const float u = philox_uniform(seed, counter);
    // fmaf: one rounding, the same on host and device (nvcc would contract a * b + c anyway).
    const float d = fmaf(1.0f - u, approx_exp2(-la * kLog2e), u);
    s = u * approx_reciprocal(fmaxf(d, kTinyDenominator));
  } else {
    const float u = philox_uniform(seed, counter);
    const float log2_odds = fmaf(-la, kLog2e, approx_log2(1.0f - u) - approx_log2(u));
    s = approx_reciprocal(1.0f + approx_exp2(log2_odds * c.inv_beta));
  }
  const float sbar = fmaf(s, c.width, c.l);
  Gate g;
  g.z = fminf(fmaxf(sbar, 0.0f), 1.0f);
  g.dz = (sbar > 0.0f && sbar < 1.0f) ? c.slope * s * (1.0f - s) : 0.0f;
  return g;
}

// The gate of the formula p selects (a runtime choice: the CPU test hooks).
inline Gate hard_concrete(float la, uint64_t seed, uint64_t counter, const GateParams& p) {
  const GateConstants c = gate_constants(p);
  switch (gate_mode(p)) {
    case GateMode::kEval:
      return hard_concrete<GateMode::kEval>(la, seed, counter, c);
    case GateMode::kTrainBetaOne:
      return hard_concrete<GateMode::kTrainBetaOne>(la, seed, counter, c);
    case GateMode::kTrain:
      break;
  }
  return hard_concrete<GateMode::kTrain>(la, seed, counter, c);
}

// dE[L0]/dla = p (1 - p), p = sigmoid(la - l0_shift), l0_shift = beta log(-l / r).
DPK_HD float expected_l0_grad(float la, float l0_shift) {
  const float p = approx_sigmoid(la - l0_shift);
  return p * (1.0f - p);
}

}  // namespace dpkernels
