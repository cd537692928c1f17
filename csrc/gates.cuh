// Hard-concrete gate math (DESIGN.md section 1), the same formulas as the Triton kernel
// dpkernels/backends/triton/gates.py::_hard_concrete, for host and device:
//
//   training: u = tl.rand(seed, counter),  s = sigmoid((log u - log(1 - u) + la) / beta),
//             slope = (r - l) / beta
//   eval:     s = sigmoid(la),  slope = r - l
//   sbar = s (r - l) + l,  z = clamp(sbar, 0, 1),  dz/dla = 1[0 < sbar < 1] slope s (1 - s)
//
// Finite for u == 0 (log 0 = -inf gives s = 0, z = 0, dz = 0) and for any finite la, |la| up to
// 1e4 included: sigmoid is 1 / (1 + exp(-x)), which saturates to exactly 0 or 1 without NaN.
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

DPK_HD float sigmoidf(float x) { return 1.0f / (1.0f + expf(-x)); }

DPK_HD Gate hard_concrete(float la, uint64_t seed, uint64_t counter, const GateParams& p) {
  float s, slope;
  if (p.training) {
    const float u = philox_uniform(seed, counter);
    s = sigmoidf((logf(u) - logf(1.0f - u) + la) / p.beta);
    slope = (p.r - p.l) / p.beta;
  } else {
    s = sigmoidf(la);
    slope = p.r - p.l;
  }
  // fmaf: one rounding, the same on host and device (nvcc would contract a * b + c anyway).
  const float sbar = fmaf(s, p.r - p.l, p.l);
  Gate g;
  g.z = fminf(fmaxf(sbar, 0.0f), 1.0f);
  g.dz = (sbar > 0.0f && sbar < 1.0f) ? slope * s * (1.0f - s) : 0.0f;
  return g;
}

// dE[L0]/dla = p (1 - p), p = sigmoid(la - l0_shift), l0_shift = beta log(-l / r).
DPK_HD float expected_l0_grad(float la, float l0_shift) {
  const float p = sigmoidf(la - l0_shift);
  return p * (1.0f - p);
}

}  // namespace dpkernels
