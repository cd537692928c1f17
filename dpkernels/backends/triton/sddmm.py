"""Sampled weight gradient for fixed-mask finetuning: dY^T X only at the mask's entries.

    out[j] = sum_m dY[m, row_j] * X[m, col_j],     row_j = index_j // K,  col_j = index_j % K

The mask is sorted, so its entries group by output row (CSR). One program per output row reads
that row of dY^T once per M-chunk and dots it with the gathered rows X^T[col_j] of the row's
entries. dY and X are transposed first so that every gathered row is contiguous in M (coalesced
loads); FLOPs are 2 M nnz, about 0.5% of the dense dY^T X at 0.5% density, and the traffic is one
pass over dY plus nnz gathered X^T rows (mostly L2 hits when columns repeat across rows).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .device_guard import on_tensor_device

_BLOCK_J = 32
_BLOCK_M = 128


@triton.jit
def _sddmm_row_kernel(
    DYT_ptr,  # dY^T, (N, M), any float dtype, rows contiguous
    XT_ptr,  # X^T, (K, M), any float dtype, rows contiguous
    COLS_ptr,  # column of each masked entry (int64), sorted by row
    ROW_PTR_ptr,  # CSR row pointers (int64), N + 1 entries
    OUT_ptr,  # out: fp32 gradient per masked entry
    M,  # tokens (reduction length)
    stride_dyt,  # row stride of dY^T
    stride_xt,  # row stride of X^T
    BLOCK_J: tl.constexpr,  # entries per inner tile
    BLOCK_M: tl.constexpr,  # tokens per inner tile
):
    row = tl.program_id(0).to(tl.int64)
    start = tl.load(ROW_PTR_ptr + row)
    end = tl.load(ROW_PTR_ptr + row + 1)
    for j0 in range(start, end, BLOCK_J):
        j = j0 + tl.arange(0, BLOCK_J)
        j_mask = j < end
        cols = tl.load(COLS_ptr + j, mask=j_mask, other=0)
        acc = tl.zeros([BLOCK_J], dtype=tl.float32)
        for m0 in range(0, M, BLOCK_M):
            m = m0 + tl.arange(0, BLOCK_M)
            m_mask = m < M
            dy = tl.load(DYT_ptr + row * stride_dyt + m, mask=m_mask, other=0.0).to(tl.float32)
            x = tl.load(XT_ptr + cols[:, None] * stride_xt + m[None, :], mask=j_mask[:, None] & m_mask[None, :],
                        other=0.0).to(tl.float32)
            acc += tl.sum(x * dy[None, :], axis=1)
        tl.store(OUT_ptr + j, acc, mask=j_mask)


@on_tensor_device
def sddmm(grad_y: torch.Tensor, x: torch.Tensor, index: torch.Tensor, in_features: int) -> torch.Tensor:
    """Launcher: grad_y (M, N), x (M, K), index sorted unique flat indices into (N, K) -> fp32 (nnz,)."""
    n_rows = grad_y.shape[1]
    out = torch.empty(index.numel(), dtype=torch.float32, device=index.device)
    if index.numel() == 0:
        return out
    if grad_y.shape[0] == 0:
        return out.zero_()
    rows = index // in_features
    cols = (index % in_features).contiguous()
    row_ptr = torch.searchsorted(rows, torch.arange(n_rows + 1, device=index.device, dtype=index.dtype))
    dyt, xt = grad_y.t().contiguous(), x.t().contiguous()
    _sddmm_row_kernel[(n_rows,)](dyt, xt, cols, row_ptr, out, grad_y.shape[0], dyt.stride(0), xt.stride(0),
                                 BLOCK_J=_BLOCK_J, BLOCK_M=_BLOCK_M)
    return out
