"""One-launch sparse diff scatter over a whole model: apply (merge, saving the originals) and restore.

A model's diff touches hundreds of tensors; a per-tensor loop pays one launch each. Here every
entry j carries its tensor's position ``ids[j]`` in a table of base data pointers (int64), its
flat index inside that tensor and its fp32 value, so one launch covers every tensor of one dtype::

    p        = pointer(table[ids[j]]) + index[j]           (cast in-kernel from the int64 address)
    saved[j] = *p
    *p       = round_to_dtype(acc(*p) + acc(values[j]))     acc = fp64 for fp64 bases, else fp32

Restore writes ``saved[j]`` back, bit for bit. bf16 is rounded with integer ops (round to
nearest even on the fp32 bits), the same on the GPU and in the Triton interpreter, whose
fp32 -> bf16 cast truncates instead of rounding. Indices are unique per tensor and tensors disjoint,
so no two programs touch one address. O(nnz) and memory-bound: per entry 4 (id) + 4 or 8 (index)
+ 4 (value) bytes read, one gathered base read and write, one saved write.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .device_guard import on_tensor_device

_BLOCK = 1024
_NUM_WARPS = 4


@triton.jit
def _entry_address(TABLE_ptr, IDS_ptr, INDEX_ptr, offs, mask):
    """(int64 base address of each entry's tensor, int64 flat index inside it) for entries `offs`."""
    tid = tl.load(IDS_ptr + offs, mask=mask, other=0)
    base = tl.load(TABLE_ptr + tid, mask=mask, other=0)
    local = tl.load(INDEX_ptr + offs, mask=mask, other=0).to(tl.int64)
    return base, local


@triton.jit
def _bf16_bits_to_fp32(bits):
    """bf16 (as uint16 bits) -> fp32, exactly: the bits are fp32's upper half."""
    return (bits.to(tl.uint32) << 16).to(tl.float32, bitcast=True)


@triton.jit
def _fp32_to_bf16_bits(x):
    """fp32 -> bf16 bits (uint16), rounded to nearest even; NaN -> the canonical quiet NaN."""
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return tl.where(x != x, 0x7FC0, rounded).to(tl.uint16)


@triton.jit(do_not_specialize=["n"])
def _scatter_apply_kernel(
    TABLE_ptr,  # int64 [T]: data pointer of each target tensor (all of SAVED's dtype, contiguous)
    IDS_ptr,  # int32 [n]: table position of each entry's tensor
    INDEX_ptr,  # int32 or int64 [n]: flat element index inside that tensor
    VALUES_ptr,  # fp32 [n]: the diff's value per entry
    SAVED_ptr,  # out [n], the targets' dtype: the base value before the merge
    n,  # number of entries
    IS_BF16: tl.constexpr,  # bf16 targets: convert through the bits (exact, rounding to nearest even)
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    base, local = _entry_address(TABLE_ptr, IDS_ptr, INDEX_ptr, offs, mask)
    ptrs = base.to(tl.pointer_type(SAVED_ptr.dtype.element_ty)) + local
    old = tl.load(ptrs, mask=mask)
    tl.store(SAVED_ptr + offs, old, mask=mask)
    delta = tl.load(VALUES_ptr + offs, mask=mask, other=0.0)
    if IS_BF16:
        merged = _bf16_bits_to_fp32(old.to(tl.uint16, bitcast=True)) + delta
        new = _fp32_to_bf16_bits(merged).to(tl.bfloat16, bitcast=True)
    else:
        # Promotion forms the sum in fp32 (fp16, fp32 bases) or fp64 (fp64 bases), rounded once.
        new = (old + delta).to(SAVED_ptr.dtype.element_ty)
    tl.store(ptrs, new, mask=mask)


@triton.jit(do_not_specialize=["n"])
def _scatter_restore_kernel(
    TABLE_ptr,  # int64 [T]: data pointer of each target tensor (as in the apply)
    IDS_ptr,  # int32 [n]: table position of each entry's tensor
    INDEX_ptr,  # int32 or int64 [n]: flat element index inside that tensor
    SAVED_ptr,  # [n], the targets' dtype: the originals the apply saved
    n,  # number of entries
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    base, local = _entry_address(TABLE_ptr, IDS_ptr, INDEX_ptr, offs, mask)
    ptrs = base.to(tl.pointer_type(SAVED_ptr.dtype.element_ty)) + local
    tl.store(ptrs, tl.load(SAVED_ptr + offs, mask=mask), mask=mask)


@on_tensor_device
def scatter_apply(targets, table, ids, index, values, starts, saved):
    """Launcher (signature of dpkernels.reference.scatter_apply; reads `table`, not targets/starts)."""
    n = ids.numel()
    if n:
        _scatter_apply_kernel[(triton.cdiv(n, _BLOCK),)](table, ids, index, values, saved, n,
                                                          IS_BF16=saved.dtype == torch.bfloat16, BLOCK=_BLOCK,
                                                          num_warps=_NUM_WARPS)
    return saved


@on_tensor_device
def scatter_restore(targets, table, ids, index, starts, saved):
    """Launcher (signature of dpkernels.reference.scatter_restore; reads `table`, not targets/starts)."""
    n = ids.numel()
    if n:
        _scatter_restore_kernel[(triton.cdiv(n, _BLOCK),)](table, ids, index, saved, n, BLOCK=_BLOCK,
                                                            num_warps=_NUM_WARPS)
