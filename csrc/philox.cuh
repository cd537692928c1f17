// Philox4x32-10 and Triton's uniform mapping, bit-identical to triton.language.random and to
// dpkernels.reference.philox_uniform. Host and device: the CPU test hooks in bindings.cpp compile
// this same code with the host compiler, so CPU-only CI checks the stream bit for bit.
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

DPK_HD uint32_t mulhi32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

// Ten rounds on counter (c0..c3) with key (k0, k1), as Random123 and Triton's philox_impl.
DPK_HD PhiloxWords philox4x32(PhiloxWords c, uint32_t k0, uint32_t k1) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < kPhiloxRounds; ++round) {
    const uint32_t a = c.c0, b = c.c2;
    c.c0 = mulhi32(kPhiloxRoundB, b) ^ c.c1 ^ k0;
    c.c2 = mulhi32(kPhiloxRoundA, a) ^ c.c3 ^ k1;
    c.c1 = kPhiloxRoundB * b;
    c.c3 = kPhiloxRoundA * a;
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  return c;
}

// tl.randint(seed, counter): counters (counter_lo, counter_hi, 0, 0), key (seed_lo, seed_hi).
DPK_HD uint32_t philox_first_word(uint64_t seed, uint64_t counter) {
  const PhiloxWords c{static_cast<uint32_t>(counter), static_cast<uint32_t>(counter >> 32), 0u, 0u};
  return philox4x32(c, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32)).c0;
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
