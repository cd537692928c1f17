"""Mixed-task serving: each row of a batch corrected by its own task's sparse diff, in one launch.

The diffs of T tasks for one (R, C) base tensor lie in one concatenated CSR (rows of the weight
diff; dpkernels.reference documents the layout): task t's entries of row r are
``rowptr[t, r]:rowptr[t, r + 1]``, with columns ``col`` and fp32 values ``val``.

segmented_spmm (a Linear's correction, added to the base GEMM's output y)::

    out[m, n] = round(acc(y[m, n]) + sum_{j in row n of task t(m)} val[j] * x[m, col[j]] + bias[t(m), n])

Each program owns a (BLOCK_M rows, BLOCK_N output features) tile: it reads every (row, feature)'s
entry range from its row's task, steps through the longest range of the tile and gathers x from
x^T (K, M), so that rows sharing a task (a sample's tokens are consecutive) read one entry's x
values from one contiguous run. Work: the nonzeros of each row's task per row (sum over tasks of
nnz_t * rows_t multiply-adds, padded to the tile's longest range); bytes: x^T once per feature
block, y read and out written once, the entries once per row block.

segmented_gather (an embedding's correction, added to the base lookup y = theta0[ids])::

    out[m, col[j]] = round(acc(y[m, col[j]]) + val[j])       j in row ids[m] of task t(m)

Each program owns BLOCK_M rows of out (a copy of y) and adds their entries in place; a row's
columns are unique, so no two lanes and no two programs touch one element.

acc is fp64 for fp64 operands, else fp32; bf16 outputs are rounded with integer ops (the
interpreter's fp32 -> bf16 cast truncates), as in scatter.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .device_guard import on_tensor_device
from .scatter import _bf16_bits_to_fp32, _fp32_to_bf16_bits

_BLOCK_M = 32
_BLOCK_N = 32
_GATHER_BLOCK_M = 128
_NUM_WARPS = 4


@triton.jit
def _load_acc(ptrs, mask, IS_BF16: tl.constexpr, ACC_FP64: tl.constexpr):
    """Values at ptrs (0 where masked) in the accumulation dtype; bf16 through its bits (exact)."""
    if IS_BF16:
        x = _bf16_bits_to_fp32(tl.load(ptrs, mask=mask, other=0.0).to(tl.uint16, bitcast=True))
    else:
        x = tl.load(ptrs, mask=mask, other=0.0)
    if ACC_FP64:
        x = x.to(tl.float64)
    else:
        x = x.to(tl.float32)
    return x


@triton.jit
def _store_rounded(ptrs, value, mask, OUT_BF16: tl.constexpr):
    """value rounded once to the output's dtype (bf16 to nearest even through the bits)."""
    if OUT_BF16:
        tl.store(ptrs, _fp32_to_bf16_bits(value.to(tl.float32)).to(tl.bfloat16, bitcast=True), mask=mask)
    else:
        tl.store(ptrs, value.to(ptrs.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["M", "N"])
def _segmented_spmm_kernel(
    XT_ptr,  # x^T (K, M), the compute dtype: row m's input features down column m
    Y_ptr,  # (M, N), the base output (x theta0^T + b0)
    OUT_ptr,  # (M, N), Y's dtype: out
    TASK_ptr,  # int64 (M,): each row's task, in [0, T)
    ROWPTR_ptr,  # int64 (T, N + 1): entries of task t's output feature n are ROWPTR[t, n]:ROWPTR[t, n + 1]
    COL_ptr,  # int32 (nnz,): each entry's input feature
    VAL_ptr,  # fp32 (nnz,): each entry's delta
    BIAS_ptr,  # (T, N): per-task bias delta (read only when HAS_BIAS)
    M,  # rows (tokens)
    N,  # output features
    stride_xk, stride_xm,  # strides of x^T
    stride_ym, stride_yn,  # strides of Y
    stride_om, stride_on,  # strides of OUT
    stride_rt,  # row stride of ROWPTR (N + 1 when contiguous)
    stride_bt,  # row stride of BIAS
    HAS_BIAS: tl.constexpr,
    X_BF16: tl.constexpr,  # x is bf16: loaded through its bits
    Y_BF16: tl.constexpr,  # Y and OUT are bf16
    ACC_FP64: tl.constexpr,  # accumulate in fp64 (fp64 operands)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    n = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_in, n_in = m < M, n < N
    tile = m_in[:, None] & n_in[None, :]
    task = tl.load(TASK_ptr + m, mask=m_in, other=0)
    ranges = ROWPTR_ptr + task[:, None] * stride_rt + n[None, :]
    start = tl.load(ranges, mask=tile, other=0)
    length = tl.load(ranges + 1, mask=tile, other=0) - start
    longest = tl.max(tl.max(length, axis=1), axis=0)
    if ACC_FP64:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float64)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    x_rows = XT_ptr + m[:, None] * stride_xm
    for j in range(0, longest):
        live = j < length
        entry = start + j
        k = tl.load(COL_ptr + entry, mask=live, other=0).to(tl.int64)
        v = tl.load(VAL_ptr + entry, mask=live, other=0.0).to(acc.dtype)
        acc += v * _load_acc(x_rows + k * stride_xk, live, X_BF16, ACC_FP64)
    acc += _load_acc(Y_ptr + m[:, None] * stride_ym + n[None, :] * stride_yn, tile, Y_BF16, ACC_FP64)
    if HAS_BIAS:
        acc += tl.load(BIAS_ptr + task[:, None] * stride_bt + n[None, :], mask=tile, other=0.0).to(acc.dtype)
    _store_rounded(OUT_ptr + m[:, None] * stride_om + n[None, :] * stride_on, acc, tile, Y_BF16)


@triton.jit(do_not_specialize=["M"])
def _segmented_gather_kernel(
    IDS_ptr,  # int64 (M,): each row's table row
    TASK_ptr,  # int64 (M,): each row's task, in [0, T)
    ROWPTR_ptr,  # int64 (T, R + 1): entries of task t's table row r are ROWPTR[t, r]:ROWPTR[t, r + 1]
    COL_ptr,  # int32 (nnz,): each entry's column
    VAL_ptr,  # fp32 (nnz,): each entry's delta
    OUT_ptr,  # (M, H): the base lookup on entry, corrected in place
    M,  # rows
    stride_om,  # row stride of OUT (columns contiguous)
    stride_rt,  # row stride of ROWPTR
    OUT_BF16: tl.constexpr,
    ACC_FP64: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_in = m < M
    task = tl.load(TASK_ptr + m, mask=m_in, other=0)
    row = tl.load(IDS_ptr + m, mask=m_in, other=0)
    ranges = ROWPTR_ptr + task * stride_rt + row
    start = tl.load(ranges, mask=m_in, other=0)
    length = tl.load(ranges + 1, mask=m_in, other=0) - start
    for j in range(0, tl.max(length, axis=0)):
        live = j < length
        entry = start + j
        ptrs = OUT_ptr + m * stride_om + tl.load(COL_ptr + entry, mask=live, other=0).to(tl.int64)
        v = tl.load(VAL_ptr + entry, mask=live, other=0.0)
        if ACC_FP64:
            v = v.to(tl.float64)
        _store_rounded(ptrs, _load_acc(ptrs, live, OUT_BF16, ACC_FP64) + v, live, OUT_BF16)


@on_tensor_device
def segmented_spmm(x, y, row_task, rowptr, col, val, bias=None):
    """Launcher (the contract of dpkernels.reference.segmented_spmm)."""
    m, n = y.shape
    out = torch.empty_like(y, memory_format=torch.contiguous_format)
    if m == 0 or n == 0:
        return out
    xt = x.t().contiguous()  # (K, M): a row's features down a column, rows sharing an entry side by side
    acc_fp64 = torch.float64 in (x.dtype, y.dtype)
    grid = (triton.cdiv(m, _BLOCK_M), triton.cdiv(n, _BLOCK_N))
    _segmented_spmm_kernel[grid](
        xt, y, out, row_task, rowptr, col, val, val if bias is None else bias, m, n,
        xt.stride(0), xt.stride(1), y.stride(0), y.stride(1), out.stride(0), out.stride(1), rowptr.stride(0),
        0 if bias is None else bias.stride(0),
        HAS_BIAS=bias is not None, X_BF16=x.dtype == torch.bfloat16, Y_BF16=y.dtype == torch.bfloat16,
        ACC_FP64=acc_fp64, BLOCK_M=_BLOCK_M, BLOCK_N=_BLOCK_N, num_warps=_NUM_WARPS)
    return out


@on_tensor_device
def segmented_gather(ids, y, row_task, rowptr, col, val):
    """Launcher (the contract of dpkernels.reference.segmented_gather)."""
    out = y.contiguous().clone()
    m = out.shape[0]
    if m == 0 or out.shape[1] == 0:
        return out
    _segmented_gather_kernel[(triton.cdiv(m, _GATHER_BLOCK_M),)](
        ids, row_task, rowptr, col, val, out, m, out.stride(0), rowptr.stride(0),
        OUT_BF16=out.dtype == torch.bfloat16, ACC_FP64=out.dtype == torch.float64, BLOCK_M=_GATHER_BLOCK_M,
        num_warps=_NUM_WARPS)
    return out
