"""Sampled weight gradient for fixed-mask finetuning: dY^T X only at the mask's entries.

    out[j] = sum_m dY[m, row_j] * X[m, col_j],     row_j = index_j // K,  col_j = index_j % K

Each program takes BLOCK_J consecutive entries of the sorted mask (a fixed-size chunk: the same
work per program whatever the rows' fill) and steps through the tokens one 16-byte vector of X^T at
a time (BLOCK_M tokens). X is transposed once per call so that each entry's X^T row is contiguous
in M; dY is read where it lies: a warp's lanes hold consecutive entries, which sorted fall on a few
neighbouring rows, so each token's dY loads hit one or two sectors, which the program's warps
share through L1 (no transposed copy of dY, the larger operand). Each entry reads its own X^T row:
2 B per entry and token, the traffic that bounds the kernel. The tokens are taken in chunks of
CHUNK_BYTES of X^T, one launch each, in order: a chunk of X^T stays in L2 while every program
gathers from it (the whole of X^T, 67 MB at 8192 x 4096 in bf16, would not). Later chunks add to
the first's sums (a fixed order: the result is deterministic).

Where the mask is dense enough, one GEMM with an fp32 output and a gather cost less than the
gathers: ``gathers_cheaper`` decides by the cost model, per shape.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ... import path_cost
from .device_guard import on_tensor_device

_BLOCK_J = 256
_NUM_WARPS = 4
# Tokens per launch: X^T's chunk of this many bytes stays resident in L2 (50-60 MB on Hopper),
# beside the streamed rows of dY.
CHUNK_BYTES = 16 << 20


def gathers_cheaper(m: int, n: int, k: int, nnz: int) -> bool:
    """Whether the gathers beat one GEMM + gather here (dpkernels.path_cost.sddmm_gathers_pay)."""
    return path_cost.sddmm_gathers_pay(m, n, k, nnz)


@triton.jit(do_not_specialize=["nnz"])
def _sddmm_kernel(
    DY_ptr,  # dY (M, N), any float dtype, any strides
    XT_ptr,  # X^T (K, M), any float dtype, rows contiguous
    INDEX_ptr,  # int64 flat index row * K + col of each entry, sorted
    OUT_ptr,  # fp32 gradient per entry: written (first chunk) or accumulated into
    nnz,  # number of entries
    K,  # in_features: row = index // K, col = index % K
    m_start,  # first token of this launch's chunk
    m_end,  # one past its last token
    stride_dym, stride_dyn,  # strides of dY
    stride_xt,  # row stride of X^T
    ACCUMULATE: tl.constexpr,  # add to OUT (chunks after the first)
    BLOCK_J: tl.constexpr,  # entries per program
    BLOCK_M: tl.constexpr,  # tokens per step: one 16-byte vector of X^T per entry
):
    j = tl.program_id(0).to(tl.int64) * BLOCK_J + tl.arange(0, BLOCK_J)
    j_in = j < nnz
    index = tl.load(INDEX_ptr + j, mask=j_in, other=0)
    rows = index // K
    cols = index - rows * K
    # [BLOCK_J, BLOCK_M] tiles, BLOCK_M = one vector: each thread holds whole token runs of its entries
    # (one 16-byte load of its X^T row), and a warp's lanes are consecutive entries, so the dY loads
    # of one token fall on the few neighbouring rows of sorted entries: one or two sectors, shared
    # through L1 by the program's warps.
    dy_cols = DY_ptr + rows[:, None] * stride_dyn
    x_rows = XT_ptr + cols[:, None] * stride_xt
    acc = tl.zeros([BLOCK_J, BLOCK_M], dtype=tl.float32)  # reduced once, after the loop
    for m0 in range(m_start, m_end, BLOCK_M):
        m = m0 + tl.arange(0, BLOCK_M)
        inside = j_in[:, None] & (m < m_end)[None, :]
        dy = tl.load(dy_cols + m[None, :] * stride_dym, mask=inside, other=0.0).to(tl.float32)
        x = tl.load(x_rows + m[None, :], mask=inside, other=0.0).to(tl.float32)
        acc += dy * x
    total = tl.sum(acc, axis=1)
    if ACCUMULATE:
        total += tl.load(OUT_ptr + j, mask=j_in, other=0.0)
    tl.store(OUT_ptr + j, total, mask=j_in)


def tokens_per_step(itemsize: int) -> int:
    """BLOCK_M: the tokens of one 16-byte vector of X^T."""
    return 16 // itemsize


def tokens_per_launch(m: int, k: int, itemsize: int) -> int:
    """Tokens of one launch: a multiple of BLOCK_M whose X^T chunk fits CHUNK_BYTES (at least one step)."""
    block = tokens_per_step(itemsize)
    steps = max(1, CHUNK_BYTES // (k * itemsize * block))
    return min(m, steps * block)


_MM_FP32_OUT = [True]  # whether torch.mm takes out_dtype here (newer torch, CUDA); learnt on first use


def _dense(grad_y: torch.Tensor, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(dY^T X)[index] by one GEMM with an fp32 output: bf16/fp16 inputs multiply on tensor cores
    where torch.mm has out_dtype, else in fp32 (slower, the same accuracy)."""
    half = grad_y.is_cuda and grad_y.dtype in (torch.bfloat16, torch.float16) and grad_y.dtype == x.dtype
    full = None
    if half and _MM_FP32_OUT[0]:
        try:
            full = torch.mm(grad_y.t(), x, out_dtype=torch.float32)
        except (TypeError, RuntimeError, NotImplementedError):  # a torch without the overload
            _MM_FP32_OUT[0] = False
    if full is None:
        full = grad_y.float().t() @ x.float()
    return full.view(-1)[index]


@on_tensor_device
def sddmm(grad_y: torch.Tensor, x: torch.Tensor, index: torch.Tensor, in_features: int) -> torch.Tensor:
    """Launcher: grad_y (M, N), x (M, K), index sorted unique flat indices into (N, K) -> fp32 (nnz,)."""
    m, n_rows = grad_y.shape
    nnz = index.numel()
    out = torch.empty(nnz, dtype=torch.float32, device=index.device)
    if nnz == 0:
        return out
    if m == 0:
        return out.zero_()
    if not gathers_cheaper(m, n_rows, in_features, nnz):
        return _dense(grad_y, x, index)
    xt = x.t().contiguous()
    chunk = tokens_per_launch(m, in_features, xt.element_size())
    grid = (triton.cdiv(nnz, _BLOCK_J),)
    for m_start in range(0, m, chunk):
        _sddmm_kernel[grid](grad_y, xt, index, out, nnz, in_features, m_start, min(m, m_start + chunk),
                            grad_y.stride(0), grad_y.stride(1), xt.stride(0), ACCUMULATE=m_start > 0,
                            BLOCK_J=_BLOCK_J, BLOCK_M=tokens_per_step(xt.element_size()), num_warps=_NUM_WARPS)
    return out
