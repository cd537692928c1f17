// Sampled weight gradient for fixed-mask finetuning (dpkernels.reference.sddmm; the Triton kernel in
// backends/triton/sddmm.py): dY^T X computed only at the mask's entries,
//
//   out[j] = sum_m dY[m, row_j] X[m, col_j],    row_j = index[j] / K,  col_j = index[j] % K
//
// from dY^T (N, M) and X^T (K, M) with unit stride along M (the binding transposes when needed),
// so each entry is the dot product of two contiguous rows. One warp per entry (grid-stride over
// entries, int64): the lanes stride along M in 16-byte packs when both rows are 16-byte aligned
// (the pointers and the row strides), else element by element, accumulate in fp32 (fp64 for fp64
// inputs) with fma, and reduce with shuffles. Entries are any order; with the mask sorted,
// consecutive entries (the warps of one block) share their dY^T row, which then comes from L1.
// FLOPs 2 M nnz; traffic: nnz pairs of M-long rows, mostly cache hits for the dY^T side.
//
// Trusted: nothing about the index. An index outside [0, N K) reads nothing and gives NaN (the
// Python layer, ops.check_mask_index, raises for it before it gets here).
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "launchers.h"
#include "packs.cuh"

namespace dpkernels {
namespace {

using namespace packs;

constexpr int kWarpSize = 32;
constexpr int kWarpsPerBlock = kThreads / kWarpSize;

// Accumulation type: fp64 for fp64 inputs, else fp32 (as the reference).
template <typename T>
using Acc = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <typename T>
__device__ __forceinline__ Acc<T> to_acc(T x) {
  if constexpr (std::is_same_v<T, double>) {
    return x;
  } else {
    return Convert<T>::to_float(x);
  }
}

__device__ __forceinline__ float mul_add(float a, float b, float c) { return fmaf(a, b, c); }
__device__ __forceinline__ double mul_add(double a, double b, double c) { return fma(a, b, c); }

template <typename T>
struct alignas(16) Vec16 {
  static constexpr int kSize = 16 / sizeof(T);
  T v[kSize];
};

template <typename T>
__global__ void __launch_bounds__(kThreads)
    sddmm_kernel(const T* __restrict__ dyt,          // dY^T (n_rows, m), unit stride along m
                 int64_t ld_dyt,                     // row stride of dY^T (elements)
                 const T* __restrict__ xt,           // X^T (k, m), unit stride along m
                 int64_t ld_xt,                      // row stride of X^T (elements)
                 const int64_t* __restrict__ index,  // [nnz] flat indices row * k + col
                 Acc<T>* __restrict__ out,           // [nnz] out: the gradient per entry
                 int64_t nnz,                        // number of entries
                 int64_t m,                          // tokens (reduction length)
                 int64_t k,                          // in_features (columns of the weight)
                 int64_t nk,                         // n_rows * k: the valid index range
                 bool vectorized) {                  // both operands' rows 16-byte aligned
  constexpr int kPack = Vec16<T>::kSize;
  const int lane = static_cast<int>(threadIdx.x % kWarpSize);
  const int64_t first = first_item() / kWarpSize;  // warp-uniform: all lanes take the same entries
  const int64_t stride = item_stride() / kWarpSize;
  for (int64_t j = first; j < nnz; j += stride) {
    const int64_t flat = index[j];
    if (flat < 0 || flat >= nk) {
      if (lane == 0) out[j] = static_cast<Acc<T>>(NAN);
      continue;
    }
    const int64_t row = flat / k;
    const T* a = dyt + row * ld_dyt;
    const T* b = xt + (flat - row * k) * ld_xt;
    Acc<T> acc = 0;
    int64_t done = 0;
    if (vectorized) {
      const auto* av = reinterpret_cast<const Vec16<T>*>(a);
      const auto* bv = reinterpret_cast<const Vec16<T>*>(b);
      const int64_t num_packs = m / kPack;
      for (int64_t q = lane; q < num_packs; q += kWarpSize) {
        const Vec16<T> x = av[q], y = bv[q];
#pragma unroll
        for (int e = 0; e < kPack; ++e) acc = mul_add(to_acc(x.v[e]), to_acc(y.v[e]), acc);
      }
      done = num_packs * kPack;
    }
    for (int64_t q = done + lane; q < m; q += kWarpSize) acc = mul_add(to_acc(a[q]), to_acc(b[q]), acc);
#pragma unroll
    for (int offset = kWarpSize / 2; offset > 0; offset /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, offset);
    if (lane == 0) out[j] = acc;
  }
}

bool rows_aligned(const void* p, int64_t ld, size_t elem) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0 && (static_cast<uint64_t>(ld) * elem) % 16 == 0;
}

template <typename T>
cudaError_t sddmm_typed(const void* dyt, int64_t ld_dyt, const void* xt, int64_t ld_xt, const int64_t* index,
                        void* out, int64_t nnz, int64_t m, int64_t n_rows, int64_t k, int max_blocks,
                        cudaStream_t stream) {
  const bool vec = rows_aligned(dyt, ld_dyt, sizeof(T)) && rows_aligned(xt, ld_xt, sizeof(T));
  sddmm_kernel<T><<<grid_for(nnz, max_blocks, kWarpsPerBlock), kThreads, 0, stream>>>(
      static_cast<const T*>(dyt), ld_dyt, static_cast<const T*>(xt), ld_xt, index, static_cast<Acc<T>*>(out), nnz,
      m, k, n_rows * k, vec);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_sddmm(ElemType type, const void* dyt, int64_t ld_dyt, const void* xt, int64_t ld_xt,
                         const int64_t* index, void* out, int64_t nnz, int64_t m, int64_t n_rows, int64_t k,
                         int max_blocks, cudaStream_t stream) {
  if (nnz <= 0) return cudaSuccess;
  return visit_elem_type(type, [&](auto tag) {
    return sddmm_typed<decltype(tag)>(dyt, ld_dyt, xt, ld_xt, index, out, nnz, m, n_rows, k, max_blocks, stream);
  });
}

}  // namespace dpkernels
