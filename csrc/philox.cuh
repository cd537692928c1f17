// Philox4x32-10 and Triton's uniform mapping, bit-identical to triton.language.random and to
// dpkernels.reference.philox_uniform. Host and device: the CPU test hooks in bindings.cpp compile
// this same code with the host compiler, so CPU-only CI checks the stream bit for bit (all of it
// but mul_wide's one PTX instruction, which the GPU tests check against tl.rand).
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define DPK_HD __host__ __device__ __forceinline__
#else
#define DPK_HD inline
#endif

namespace dpkernels {

constexpr uint32_t kPhiloxRoundA = 0xD2511F53u;
constexpr uint32_t kPhiloxRoundB = 0xCD9E8D57u;
constexpr uint32_t kPhiloxKeyA = 0x9E3779B9u;
constexpr uint32_t kPhiloxKeyB = 0xBB67AE85u;
constexpr int kPhiloxRounds = 10;
// Triton's uint_to_uniform_float scale, the float32 nearest 4.6566127342e-10 (written in hex so
// no compiler can round the decimal differently): (2**31 - 1) * scale < 1.
constexpr float kUniformScale = 0x1.fffffep-32f;

struct PhiloxWords {
  uint32_t c0, c1, c2, c3;
};

// Both 32-bit halves of the 64-bit product of a and b. On the GPU one IMAD.WIDE.U32 (where
// __umulhi and a low multiply take two); written in PTX because nvcc's optimizer otherwise
// rewrites the product and the xors around it as 64-bit operations, which cost more.
struct WideProduct {
  uint32_t hi, lo;
};

DPK_HD WideProduct mul_wide(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  WideProduct p;
  asm("{\n\t.reg .u64 t;\n\tmul.wide.u32 t, %2, %3;\n\tmov.b64 {%1, %0}, t;\n\t}"  // {lo, hi} = t
      : "=r"(p.hi), "=r"(p.lo)
      : "r"(a), "r"(b));
  return p;
#else
  const uint64_t p = static_cast<uint64_t>(a) * b;
  return WideProduct{static_cast<uint32_t>(p >> 32), static_cast<uint32_t>(p)};
#endif
}

// One round on counter c with round key (k0, k1), as Random123 and Triton's philox_impl.
DPK_HD PhiloxWords philox_round(const PhiloxWords& c, uint32_t k0, uint32_t k1) {
  const WideProduct pb = mul_wide(kPhiloxRoundB, c.c2);
  const WideProduct pa = mul_wide(kPhiloxRoundA, c.c0);
  return PhiloxWords{pb.hi ^ c.c1 ^ k0, pb.lo, pa.hi ^ c.c3 ^ k1, pa.lo};
}

// Ten rounds on counter (c0..c3) with key (k0, k1).
DPK_HD PhiloxWords philox4x32(PhiloxWords c, uint32_t k0, uint32_t k1) {
  for (int round = 0; round < kPhiloxRounds; ++round) {
    c = philox_round(c, k0, k1);
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  return c;
}

// tl.randint(seed, counter): the first word of philox4x32 at counters (counter_lo, counter_hi, 0, 0),
// key (seed_lo, seed_hi), without the work whose result is known or unused: the first round's
// products by c2 = c3 = 0, and of the last round all but the word returned.
DPK_HD uint32_t philox_first_word(uint64_t seed, uint64_t counter) {
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  const WideProduct first = mul_wide(kPhiloxRoundA, static_cast<uint32_t>(counter));
  PhiloxWords c{static_cast<uint32_t>(counter >> 32) ^ k0, 0u, first.hi ^ k1, first.lo};
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 1; round < kPhiloxRounds - 1; ++round) {
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
    c = philox_round(c, k0, k1);
  }
  k0 += kPhiloxKeyA;
  return mul_wide(kPhiloxRoundB, c.c2).hi ^ c.c1 ^ k0;
}

// tl.rand's mapping: bit-cast to int32, fold negatives with ~x (x in [0, 2**31 - 1]), scale.
// int -> float rounds to nearest on host and device alike, and one multiply cannot be contracted.
DPK_HD float uint_to_uniform(uint32_t word) {
  int32_t x = static_cast<int32_t>(word);
  if (x < 0) x = ~x;
  return static_cast<float>(x) * kUniformScale;
}

// u in [0, 1) for (seed, counter): exactly tl.rand(seed, counter). u == 0 is possible.
DPK_HD float philox_uniform(uint64_t seed, uint64_t counter) {
  return uint_to_uniform(philox_first_word(seed, counter));
}

}  // namespace dpkernels
