// One-launch sparse diff scatter over a whole model (dpkernels.reference.scatter_apply /
// scatter_restore; the Triton kernels in backends/triton/scatter.py). Entry j belongs to the tensor
// whose data pointer is table[ids[j]] (all tensors of one dtype, contiguous); with
// p = pointer + index[j]:
//
//   apply:    saved[j] = *p;  *p = round_to_dtype(acc(*p) + acc(values[j]))   acc: fp64 for fp64, else fp32
//   restore:  *p = saved[j]                                                      (a bit copy: exact)
//
// Rounding is the reference's (scatter.cuh: Merge, also compiled for the host as a CPU test hook):
// fp32 and fp64 sums are IEEE round-to-nearest-even; fp16 via __float2half_rn; bf16 with integer
// ops on the fp32 bits (round to nearest even, NaN -> 0x7FC0), exactly as the Triton kernel and
// torch's CPU cast do. bf16 is handled as its uint16 bits, so restore only copies bits and needs
// one instantiation per element size.
//
// Memory-bound and O(nnz): each thread takes packs of kVec consecutive entries (int64 grid-stride
// loop); ids, index, values and saved are read/written as whole packs when aligned (packs.cuh), and
// the kVec gathered base accesses of a pack are independent, so they are in flight together.
//
// What the kernels trust (the binding cannot check device data without a host sync): that
// table[t] is the data pointer of the t-th target (sparse._TargetTable.check re-reads the pointers
// before every launch), that index[j] lies in [0, numel of its tensor) and is unique per tensor
// (SparseDiff validation: ops.check_mask_index), and that tensors do not overlap
// (sparse._check_disjoint). They do check ids[j] against the table's length: an entry whose id is
// outside [0, num_tables) is skipped by apply and restore alike (never a read of memory past the
// table, never a write through a pointer that was not in it).
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "launchers.h"
#include "packs.cuh"
#include "scatter.cuh"

namespace dpkernels {
namespace {

using namespace packs;

// The unsigned integer of T's size: restore copies bits (fp16 and bf16 share one instantiation).
template <typename T>
using BitsOf = std::conditional_t<sizeof(T) == 2, uint16_t, std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>>;

// Pointers of the entries base .. base + kVec - 1 (nullptr: past n, or an id outside the table).
template <typename S, typename I>
__device__ __forceinline__ void entry_pointers(const int64_t* __restrict__ table, int64_t num_tables,
                                               const int32_t* __restrict__ ids, const I* __restrict__ index,
                                               int64_t base, int64_t n, bool vectorized, S* (&p)[kVec]) {
  int32_t id[kVec];
  I local[kVec];
  fill_pack(id, int32_t{-1});  // tail entries stay -1: no pointer
  fill_pack(local, I{0});
  load_pack(ids, base, n, vectorized, id);
  load_pack(index, base, n, vectorized, local);
#pragma unroll
  for (int k = 0; k < kVec; ++k) {
    p[k] = (id[k] >= 0 && id[k] < num_tables)
               ? reinterpret_cast<S*>(static_cast<uintptr_t>(table[id[k]])) + static_cast<int64_t>(local[k])
               : nullptr;
  }
}

// Apply (kApply): saved[j] = *p, then *p = Merge<S>::apply(saved[j], values[j]). Restore: *p =
// saved[j], with S an unsigned integer of the element size (a bit copy; values unused).
template <typename S, typename I, bool kApply>
__global__ void __launch_bounds__(kThreads)
    scatter_kernel(const int64_t* __restrict__ table,  // data pointer of each target tensor (elements S)
                   int64_t num_tables,                 // entries of table
                   const int32_t* __restrict__ ids,    // [n] table position of each entry's tensor
                   const I* __restrict__ index,        // [n] flat element index inside that tensor
                   const float* __restrict__ values,   // [n] the diff's value per entry (apply only)
                   S* __restrict__ saved,              // [n] apply: out, the originals; restore: in
                   int64_t n,                          // number of entries
                   bool vectorized) {                  // ids, index, values, saved pack-aligned
  const int64_t num_packs = (n + kVec - 1) / kVec;
  for (int64_t j = first_item(); j < num_packs; j += item_stride()) {
    const int64_t base = j * kVec;
    S* p[kVec];
    entry_pointers(table, num_tables, ids, index, base, n, vectorized, p);
    S old[kVec];
    fill_pack(old, S{});
    if constexpr (kApply) {
      float v[kVec];
      fill_pack(v, 0.0f);
      load_pack(values, base, n, vectorized, v);
#pragma unroll
      for (int k = 0; k < kVec; ++k)
        if (p[k] != nullptr) old[k] = *p[k];  // the kVec gathers are independent: in flight together
      store_pack(saved, base, n, vectorized, old);
#pragma unroll
      for (int k = 0; k < kVec; ++k)
        if (p[k] != nullptr) *p[k] = Merge<S>::apply(old[k], v[k]);
    } else {
      load_pack(static_cast<const S*>(saved), base, n, vectorized, old);
#pragma unroll
      for (int k = 0; k < kVec; ++k)
        if (p[k] != nullptr) *p[k] = old[k];
    }
  }
}

template <typename S, bool kApply>
cudaError_t launch_typed(bool index64, const int64_t* table, int64_t num_tables, const int32_t* ids, const void* index,
                         const float* values, void* saved, int64_t n, int max_blocks, cudaStream_t stream) {
  const bool index_aligned = index64 ? pack_aligned<int64_t>(index) : pack_aligned<int32_t>(index);
  const bool vec = pack_aligned<int32_t>(ids) && index_aligned && pack_aligned<float>(values) && pack_aligned<S>(saved);
  const unsigned grid = grid_for((n + kVec - 1) / kVec, max_blocks);
  auto* s = static_cast<S*>(saved);
  if (index64) {
    scatter_kernel<S, int64_t, kApply><<<grid, kThreads, 0, stream>>>(
        table, num_tables, ids, static_cast<const int64_t*>(index), values, s, n, vec);
  } else {
    scatter_kernel<S, int32_t, kApply><<<grid, kThreads, 0, stream>>>(
        table, num_tables, ids, static_cast<const int32_t*>(index), values, s, n, vec);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_scatter_apply(ElemType type, const int64_t* table, int64_t num_tables, const int32_t* ids,
                                 const void* index, bool index64, const float* values, void* saved, int64_t n,
                                 int max_blocks, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  return visit_elem_type(type, [&](auto tag) {
    return launch_typed<MergeStorage<decltype(tag)>, true>(index64, table, num_tables, ids, index, values, saved, n,
                                                           max_blocks, stream);
  });
}

cudaError_t launch_scatter_restore(ElemType type, const int64_t* table, int64_t num_tables, const int32_t* ids,
                                   const void* index, bool index64, const void* saved, int64_t n, int max_blocks,
                                   cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  void* in = const_cast<void*>(saved);  // only read: the kernel's restore branch
  return visit_elem_type(type, [&](auto tag) {
    return launch_typed<BitsOf<decltype(tag)>, false>(index64, table, num_tables, ids, index, nullptr, in, n,
                                                      max_blocks, stream);
  });
}

}  // namespace dpkernels
