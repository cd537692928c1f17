// The scatter merge's rounding, for host and device: round_to_dtype(acc(old) + acc(value)) with acc
// fp64 for fp64 bases, else fp32 (dpkernels.reference.scatter_apply). scatter.cu uses it in the
// kernel; bindings.cpp compiles it for the host as the CPU test hook scatter_merge_cpu, so CPU-only
// CI checks the rounding bit for bit.
//
// bf16 is handled as its uint16 bits with integer ops, as the Triton kernel does: bf16 -> fp32 is
// exact (the bits are fp32's upper half); fp32 -> bf16 rounds to nearest even on the fp32 bits,
// NaN -> the canonical quiet NaN 0x7FC0 (torch's CPU cast; the GPU's cvt would give 0x7FFF).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "philox.cuh"  // DPK_HD

namespace dpkernels {

using Bf16Bits = uint16_t;

DPK_HD float bf16_bits_to_float(Bf16Bits bits) {
  const uint32_t word = static_cast<uint32_t>(bits) << 16;
  float x;
  memcpy(&x, &word, sizeof(x));
  return x;
}

DPK_HD Bf16Bits float_to_bf16_bits(float x) {
  if (x != x) return 0x7FC0;
  uint32_t bits;
  memcpy(&bits, &x, sizeof(bits));
  return static_cast<Bf16Bits>((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);  // no overflow: not NaN
}

// The storage type the merge works on for a base of element type T: bf16 as its bits.
template <typename T>
using MergeStorage = std::conditional_t<std::is_same_v<T, __nv_bfloat16>, Bf16Bits, T>;

// Merge<S>::apply(old, value): the merged element of base storage type S.
template <typename S>
struct Merge;
template <>
struct Merge<float> {
  static DPK_HD float apply(float old, float value) { return old + value; }
};
template <>
struct Merge<double> {
  static DPK_HD double apply(double old, float value) { return old + static_cast<double>(value); }
};
template <>
struct Merge<__half> {
  static DPK_HD __half apply(__half old, float value) { return __float2half_rn(__half2float(old) + value); }
};
template <>
struct Merge<Bf16Bits> {
  static DPK_HD Bf16Bits apply(Bf16Bits old, float value) {
    return float_to_bf16_bits(bf16_bits_to_float(old) + value);
  }
};

}  // namespace dpkernels
