// Helpers shared by the kernels (gates.cu, scatter.cu, sddmm.cu): dtype conversions to the fp32
// compute type, packs of kVec consecutive elements read and written as one vector access when
// aligned, int64 grid-stride indexing and the grid size. Included by .cu files only (nvcc).
//
// A pack is loaded as one access only when the caller says every pointer is aligned to its pack
// size (pack_aligned, checked on the host) and the pack lies wholly inside [0, n); otherwise, and
// for the tail, element by element. Tail elements past n are never touched.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace dpkernels {
namespace packs {

constexpr int kThreads = 256;  // threads per block
constexpr int kVec = 4;        // elements per pack (16 bytes of fp32)

// Conversions to and from the fp32 compute type; stores round to nearest even, like torch.
// (torch builds with __CUDA_NO_HALF_CONVERSIONS__, so the intrinsics are spelled out.)
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

// The pack at p as one vector access: p aligned to sizeof(Pack<T>), the pack wholly inside the array.
template <typename T>
__device__ __forceinline__ Pack<T> load_whole_pack(const T* __restrict__ p) {
  return *reinterpret_cast<const Pack<T>*>(p);
}

template <typename T>
__device__ __forceinline__ void store_whole_pack(T* __restrict__ p, const Pack<T>& x) {
  *reinterpret_cast<Pack<T>*>(p) = x;
}

// Elements base .. base + kVec - 1 of p (those < n); one vector load when the pack is whole and
// aligned. Missing tail elements are left as they were (callers initialise them).
template <typename T>
__device__ __forceinline__ void load_pack(const T* __restrict__ p, int64_t base, int64_t n, bool vectorized,
                                          T (&x)[kVec]) {
  if (vectorized && base + kVec <= n) {
    const Pack<T> pack = load_whole_pack(p + base);
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
    store_whole_pack(p + base, pack);
  } else {
#pragma unroll
    for (int k = 0; k < kVec; ++k)
      if (base + k < n) p[base + k] = x[k];
  }
}

template <typename T>
__device__ __forceinline__ void fill_pack(T (&x)[kVec], T value) {
#pragma unroll
  for (int k = 0; k < kVec; ++k) x[k] = value;
}

// This thread's first work item and the grid-stride step, in int64 (no 32-bit overflow).
__device__ __forceinline__ int64_t first_item() { return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; }

__device__ __forceinline__ int64_t item_stride() { return static_cast<int64_t>(gridDim.x) * blockDim.x; }

// The grid-stride loops of an elementwise kernel over n elements: on_pack(base) for each whole pack
// [base, base + kVec) when `vectorized` (every pointer pack-aligned), so the hot loop holds only the
// vector path; then on_element(i) for each element left, the last n % kVec (all n when not
// vectorized).
template <typename OnPack, typename OnElement>
__device__ __forceinline__ void for_each_element(int64_t n, bool vectorized, OnPack&& on_pack,
                                                 OnElement&& on_element) {
  const int64_t whole_packs = vectorized ? n / kVec : 0;
  for (int64_t j = first_item(); j < whole_packs; j += item_stride()) on_pack(j * kVec);
  for (int64_t i = whole_packs * kVec + first_item(); i < n; i += item_stride()) on_element(i);
}

// Whether p may be read and written in whole packs of T (nullptr: an unused argument, no constraint).
template <typename T>
inline bool pack_aligned(const void* p) {
  return p == nullptr || reinterpret_cast<uintptr_t>(p) % sizeof(Pack<T>) == 0;
}

// Enough blocks of `threads` to give each of `items` work items a thread, capped at max_blocks (a
// few waves of the device); the grid-stride loops take the rest.
inline unsigned grid_for(int64_t items, int max_blocks, int threads = kThreads) {
  const int64_t blocks = (items + threads - 1) / threads;
  return static_cast<unsigned>(blocks < max_blocks ? blocks : max_blocks);
}

}  // namespace packs
}  // namespace dpkernels
