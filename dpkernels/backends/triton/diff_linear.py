"""Fused Triton diff linear: gate sampling inside the GEMMs, no effective weight in memory.

The weight W (N, K) of a diff-pruned linear layer is never stored: a weight tile is rebuilt from
the frozen base, the diff and log_alpha where the GEMM loads it, with the gate drawn from
(seed, offset + e) for its flat index e = n * K + k (the draws of ``gate_forward``)::

    W[n, k] = round_cdt(theta0[n, k] + z[n, k] * diff[n, k])      (fp32 sum, one rounding)

The rounding to the compute dtype cdt (x's dtype) is the one the unfused path applies when it
writes W, so both paths multiply the same bf16/fp16/fp32 weight; only the summation order of
the GEMM differs.

Forward (``gated_linear``) and input gradient (``gated_linear_grad_input``), one kernel::

    y  = x  W^T + b        A = x  (M, K), B[q=k, p=n] = W[n, k]
    dX = dY W              A = dY (M, N), B[q=n, p=k] = W[n, k]

Weight gradient with the gate routing in the epilogue (``gated_linear_grad_weight``)::

    G = dY^T X  (fp32 accumulator, never written)
    grad_diff = G z,   grad_log_alpha = G diff dz/dlog_alpha + l0_lambda p (1 - p)

routed in 1, 2 or 4 column slices of the tile (EPILOGUE_SPLIT), which keeps the gate draw's
registers live for one slice at a time and so allows larger tiles without spills.

When each weight tile is re-read by many row blocks (large M) the rebuild's cost (Philox and
three loads per element per row block) exceeds one gate-apply pass plus cuBLAS; ops.diff_linear
picks the path per shape by dpkernels.path_cost's model.

Split-K (``gated_linear``, ``gated_linear_grad_input``): at one row block (M <= BLOCK_M) the CTAs
are the output's column tiles alone, too few for the SMs at a narrow output (dX of a 768x3072
weight: 24 tiles of 32 columns at M <= 128). Then the reduction runs in S slices of whole BLOCK_Q
steps (grid axis 1), each writing its fp32 partial product to a workspace (S, M, P); a second
launch sums the slices in slice order, adds the bias and rounds once, so the result is
reproducible (no atomics). No weight element is rebuilt twice. S comes from
``path_cost.split_slices`` (1 where the model predicts no gain).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ... import path_cost
from ...reference import l0_shift as _l0_shift
from .device_guard import on_tensor_device
from .gates import _hard_concrete, _l0_grad, _signed_seed

_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def launch_options(names: tuple[str, ...], size) -> dict:
    """The launch keywords of one (*values of names, warps, stages) tuple."""
    return dict(zip(names, size[:-2], strict=True), num_warps=size[-2], num_stages=size[-1])


def _configs(names: tuple[str, ...], sizes) -> list[triton.Config]:
    """Autotuning configs: each size's launch options, its block sizes as the config's keywords."""
    configs = []
    for size in sizes:
        options = launch_options(names, size)
        configs.append(triton.Config({name: options.pop(name) for name in names}, **options))
    return configs


# Forward / dX GEMM: (rows, cols, reduction, warps, stages), small row blocks for decoding-sized M;
# the last three are short-M tiles of 32 or 16 columns: one row block (M <= 64, M <= 128) with 128
# or 256 CTAs at 4096 output columns, where 64-column tiles left half the 132 SMs idle (path_cost's
# FUSED_ROWS and FUSED_COLS are the last one's; 128x32x32 with 4 warps reached 255 registers).
# Weight gradient: (rows, cols, tokens, epilogue slices, warps, stages). The gate draw (Philox,
# ~10 live registers per element) bounds the tile a thread may hold: in sm_90 builds
# (tests/test_static_budgets.py) larger tiles or fewer warps spill to local memory, e.g. 128x128x64
# with 8 warps (784 B of stack per thread in the forward GEMM, 1.5 KB in the weight gradient).
# The forward rebuilds at most 8 weight elements per thread (BLOCK_Q * BLOCK_P / threads): with 16,
# Triton 3.8 stays under 255 registers (194-248) but Triton 3.6, the GPU image's, spills 80 B in
# 16x32x64/4, 16x64x64/8 and 64x128x32/8 warps. Every size here compiles spill-free in both with
# bf16/fp16 or TF32 dots (checked in both, the short-M tiles and the split-K sum included); fp32
# IEEE dots (allow_tf32 off) spill 48-2360 B in the 64/128-row tiles.
# Routing the weight gradient in 4 column slices brings 128x64 and 64x128 tiles under 255
# registers with no spill; 128x128 still spills (200 B) and is left out.
_MATMUL_SIZES = [(16, 32, 32, 4, 3), (16, 64, 32, 8, 3), (64, 64, 32, 8, 3), (64, 128, 16, 8, 3),
                 (128, 64, 32, 8, 3), (64, 64, 16, 4, 3), (64, 32, 32, 4, 3), (64, 16, 64, 4, 3),
                 (128, 32, 64, 8, 3)]
_WGRAD_SIZES = [(64, 64, 64, 1, 8, 3), (64, 64, 64, 4, 8, 3), (128, 64, 64, 4, 8, 3), (64, 128, 64, 4, 8, 3),
                (32, 128, 64, 1, 8, 3)]
_INTERPRETER_SIZES = (16, 16, 16)  # the interpreter runs blocks in numpy: small blocks, no tuning
_INTERPRETER_SPLIT = 4  # the most involved epilogue (tests vary it)


@triton.jit
def _grouped_tile(pid, n_rows, n_cols, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, GROUP: tl.constexpr):
    """Tile (row, col) of program `pid`, GROUP row tiles at a time so that they share L2."""
    tiles_r = tl.cdiv(n_rows, BLOCK_R)
    tiles_c = tl.cdiv(n_cols, BLOCK_C)
    per_group = GROUP * tiles_c
    first_r = (pid // per_group) * GROUP
    group_r = tl.minimum(tiles_r - first_r, GROUP)
    return first_r + (pid % per_group) % group_r, (pid % per_group) // group_r


@triton.jit
def _load_tile(PTR, rows, cols, stride_r, stride_c, rows_in, cols_in):
    """The (rows, cols) tile of a strided 2-D tensor, zero outside the masks."""
    return tl.load(PTR + rows[:, None] * stride_r + cols[None, :] * stride_c, mask=rows_in[:, None] & cols_in[None, :],
                   other=0.0)


@triton.jit
def _dot_acc(acc, a, b, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    """acc + a @ b, accumulated in fp32; with fp32 operands under DOT_FP32 (the interpreter's bf16 dot is wrong)."""
    if DOT_FP32:
        acc += tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        acc += tl.dot(a, b, input_precision=PRECISION)
    return acc


@triton.jit(do_not_specialize=["seed", "offset", "M", "M_BUCKET", "stride_os"])
def _gated_matmul_kernel(
    A_ptr,  # activations (M, Q), compute dtype; any strides
    THETA0_ptr,  # frozen base W0, any float dtype, contiguous (N, K)
    DIFF_ptr,  # diff magnitudes, fp32, contiguous (N, K)
    LA_ptr,  # log_alpha, fp32, contiguous (N, K)
    BIAS_ptr,  # effective bias (P,), compute dtype (unused unless HAS_BIAS)
    OUT_ptr,  # output (M, P), compute dtype; split-K: the fp32 workspace (slices, M, P)
    M, P, Q,  # out = A @ B: (M, Q) @ (Q, P)
    M_BUCKET,  # next power of two of M: the autotuning key (unused in the body)
    stride_am, stride_aq,
    stride_bq, stride_bp,  # flat-index steps of the weight seen as B[q, p]: (1, K) forward, (K, 1) for dX
    stride_om, stride_op,
    stride_os,  # between split-K slices of OUT (grid axis 1: one slice of the reduction each)
    seed,  # Philox key, int64 two's complement of the unsigned seed
    offset,  # Philox counter of weight element 0
    l, r, beta,  # gate constants
    TRAINING: tl.constexpr,  # sampled gates vs eval gates
    BETA_ONE: tl.constexpr,  # beta == 1: the cheaper form of the gate (gates._hard_concrete)
    HAS_BIAS: tl.constexpr,
    DOT_FP32: tl.constexpr,  # multiply in fp32 (the interpreter's bf16 dot is wrong)
    PRECISION: tl.constexpr,  # tl.dot input precision for fp32 operands ("ieee" or "tf32")
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_p = _grouped_tile(tl.program_id(0), M, P, BLOCK_M, BLOCK_P, GROUP_M)
    rm = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rp = pid_p.to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    m_in, p_in = rm < M, rp < P
    # This program's slice of the reduction: whole BLOCK_Q steps, the last slice shorter (or empty).
    q_len = tl.cdiv(tl.cdiv(Q, BLOCK_Q), tl.num_programs(1)) * BLOCK_Q
    q_start = tl.program_id(1) * q_len
    q_end = tl.minimum(q_start + q_len, Q)
    acc = tl.zeros((BLOCK_M, BLOCK_P), dtype=tl.float32)
    for q0 in range(q_start, q_end, BLOCK_Q):
        rq = q0 + tl.arange(0, BLOCK_Q).to(tl.int64)
        q_in = rq < q_end
        a = _load_tile(A_ptr, rm, rq, stride_am, stride_aq, m_in, q_in)
        e = rq[:, None] * stride_bq + rp[None, :] * stride_bp
        b_in = q_in[:, None] & p_in[None, :]
        la = tl.load(LA_ptr + e, mask=b_in, other=0.0)
        z, _ = _hard_concrete(la, seed, offset + e, l, r, beta, TRAINING, BETA_ONE)
        w = tl.load(DIFF_ptr + e, mask=b_in, other=0.0)
        b = (tl.load(THETA0_ptr + e, mask=b_in, other=0.0).to(tl.float32) + z * w).to(A_ptr.dtype.element_ty)
        acc = _dot_acc(acc, a, b, DOT_FP32, PRECISION)
    if HAS_BIAS:
        acc += tl.load(BIAS_ptr + rp, mask=p_in, other=0.0).to(tl.float32)[None, :]
    out = OUT_ptr + tl.program_id(1).to(tl.int64) * stride_os
    tl.store(out + rm[:, None] * stride_om + rp[None, :] * stride_op, acc.to(OUT_ptr.dtype.element_ty),
             mask=m_in[:, None] & p_in[None, :])


@triton.jit
def _slice_sum_kernel(
    WS_ptr,  # split-K partial products, fp32, contiguous (SLICES, M, P)
    BIAS_ptr,  # effective bias (P,), compute dtype (unused unless HAS_BIAS)
    OUT_ptr,  # output, contiguous (M, P), compute dtype
    n_out,  # M * P
    P,
    SLICES: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """out = round(sum of the slices in slice order + bias): the fixed-order split-K reduction."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = i < n_out
    ws = WS_ptr + i
    acc = tl.load(ws, mask=inside, other=0.0)
    for _ in tl.static_range(1, SLICES):
        ws += n_out  # (a pointer step: no int32 product of slice and size)
        acc += tl.load(ws, mask=inside, other=0.0)
    if HAS_BIAS:
        acc += tl.load(BIAS_ptr + i % P, mask=inside, other=0.0).to(tl.float32)
    tl.store(OUT_ptr + i, acc.to(OUT_ptr.dtype.element_ty), mask=inside)


_SLICE_SUM_BLOCK = 1024
_SLICE_SUM_WARPS = 4


@triton.jit(do_not_specialize=["seed", "offset", "M", "M_BUCKET"])
def _gated_wgrad_kernel(
    GY_ptr,  # dLoss/dy (M, N), compute dtype; any strides
    X_ptr,  # input (M, K), compute dtype; any strides
    DIFF_ptr,  # diff, fp32, contiguous (N, K)
    LA_ptr,  # log_alpha, fp32, contiguous (N, K)
    GRAD_DIFF_ptr,  # out: grad of diff, fp32, contiguous (N, K)
    GRAD_LA_ptr,  # out: grad of log_alpha, fp32, contiguous (N, K)
    M, N, K,
    M_BUCKET,  # next power of two of M: the autotuning key (unused in the body)
    stride_gm, stride_gn,
    stride_xm, stride_xk,
    seed, offset, l, r, beta,  # the forward's gate draw
    l0_lambda,  # weight of the fused E[L0] gradient
    l0_shift,  # beta * log(-l / r)
    TRAINING: tl.constexpr,
    BETA_ONE: tl.constexpr,  # beta == 1 (gates._hard_concrete)
    HAS_L0: tl.constexpr,
    DOT_FP32: tl.constexpr,
    PRECISION: tl.constexpr,
    EPILOGUE_SPLIT: tl.constexpr,  # route the tile in 1, 2 or 4 column slices
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr, GROUP_N: tl.constexpr,
):
    pid_n, pid_k = _grouped_tile(tl.program_id(0), N, K, BLOCK_N, BLOCK_K, GROUP_N)
    rn = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = pid_k.to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    n_in, k_in = rn < N, rk < K
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        rm = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
        m_in = rm < M
        gy_t = _load_tile(GY_ptr, rn, rm, stride_gn, stride_gm, n_in, m_in)  # dY^T: (N, M)
        x = _load_tile(X_ptr, rm, rk, stride_xm, stride_xk, m_in, k_in)
        acc = _dot_acc(acc, gy_t, x, DOT_FP32, PRECISION)
    # Epilogue: the gate routing of gate_backward on the fp32 accumulator, in EPILOGUE_SPLIT column
    # slices so that the gate draw's registers are live for one slice at a time (no spills).
    col0 = pid_k.to(tl.int64) * BLOCK_K
    if EPILOGUE_SPLIT == 1:
        _route_store(acc, rn, col0 + tl.arange(0, BLOCK_K), N, K, DIFF_ptr, LA_ptr, GRAD_DIFF_ptr, GRAD_LA_ptr,
                     seed, offset, l, r, beta, l0_lambda, l0_shift, TRAINING, BETA_ONE, HAS_L0)
    else:
        left, right = _halves(acc, BLOCK_N, BLOCK_K)
        if EPILOGUE_SPLIT == 2:
            _route_store(left, rn, col0 + tl.arange(0, BLOCK_K // 2), N, K, DIFF_ptr, LA_ptr, GRAD_DIFF_ptr,
                         GRAD_LA_ptr, seed, offset, l, r, beta, l0_lambda, l0_shift, TRAINING, BETA_ONE, HAS_L0)
            _route_store(right, rn, col0 + BLOCK_K // 2 + tl.arange(0, BLOCK_K // 2), N, K, DIFF_ptr, LA_ptr,
                         GRAD_DIFF_ptr, GRAD_LA_ptr, seed, offset, l, r, beta, l0_lambda, l0_shift, TRAINING, BETA_ONE,
                         HAS_L0)
        else:
            q: tl.constexpr = BLOCK_K // 4
            q0, q1 = _halves(left, BLOCK_N, BLOCK_K // 2)
            q2, q3 = _halves(right, BLOCK_N, BLOCK_K // 2)
            _route_store(q0, rn, col0 + tl.arange(0, q), N, K, DIFF_ptr, LA_ptr, GRAD_DIFF_ptr, GRAD_LA_ptr, seed,
                         offset, l, r, beta, l0_lambda, l0_shift, TRAINING, BETA_ONE, HAS_L0)
            _route_store(q1, rn, col0 + q + tl.arange(0, q), N, K, DIFF_ptr, LA_ptr, GRAD_DIFF_ptr, GRAD_LA_ptr, seed,
                         offset, l, r, beta, l0_lambda, l0_shift, TRAINING, BETA_ONE, HAS_L0)
            _route_store(q2, rn, col0 + 2 * q + tl.arange(0, q), N, K, DIFF_ptr, LA_ptr, GRAD_DIFF_ptr, GRAD_LA_ptr,
                         seed, offset, l, r, beta, l0_lambda, l0_shift, TRAINING, BETA_ONE, HAS_L0)
            _route_store(q3, rn, col0 + 3 * q + tl.arange(0, q), N, K, DIFF_ptr, LA_ptr, GRAD_DIFF_ptr, GRAD_LA_ptr,
                         seed, offset, l, r, beta, l0_lambda, l0_shift, TRAINING, BETA_ONE, HAS_L0)


@triton.jit
def _halves(t, ROWS: tl.constexpr, COLS: tl.constexpr):
    """The left and right column halves of a (ROWS, COLS) tile."""
    return tl.split(tl.permute(tl.reshape(t, (ROWS, 2, COLS // 2)), (0, 2, 1)))


@triton.jit
def _route_store(g, rn, rk, N, K, DIFF_ptr, LA_ptr, GRAD_DIFF_ptr, GRAD_LA_ptr, seed, offset, l, r, beta, l0_lambda,
                 l0_shift, TRAINING: tl.constexpr, BETA_ONE: tl.constexpr, HAS_L0: tl.constexpr):
    """gate_backward's routing of the weight gradient tile g (rows rn, columns rk) into the grads."""
    e = rn[:, None] * K + rk[None, :]
    inside = (rn < N)[:, None] & (rk < K)[None, :]
    la = tl.load(LA_ptr + e, mask=inside, other=0.0)
    w = tl.load(DIFF_ptr + e, mask=inside, other=0.0)
    z, dz = _hard_concrete(la, seed, offset + e, l, r, beta, TRAINING, BETA_ONE)
    grad_la = g * w * dz
    if HAS_L0:
        grad_la += l0_lambda * _l0_grad(la, l0_shift)
    tl.store(GRAD_DIFF_ptr + e, g * z, mask=inside)
    tl.store(GRAD_LA_ptr + e, grad_la, mask=inside)


_MATMUL_NAMES = ("BLOCK_M", "BLOCK_P", "BLOCK_Q")
_WGRAD_NAMES = ("BLOCK_N", "BLOCK_K", "BLOCK_M", "EPILOGUE_SPLIT")


if _INTERPRETED:  # fixed small blocks (the interpreter ignores warps and stages)
    _matmul_tuned = _wgrad_tuned = None
    _MATMUL_BLOCKS = dict(zip(_MATMUL_NAMES, _INTERPRETER_SIZES, strict=True))
    _WGRAD_BLOCKS = dict(zip(_WGRAD_NAMES[:3], _INTERPRETER_SIZES, strict=True), EPILOGUE_SPLIT=_INTERPRETER_SPLIT)
else:  # autotuned per shape; M is keyed by its power-of-two bucket so that batches of one size share a choice
    _matmul_tuned = triton.autotune(_configs(_MATMUL_NAMES, _MATMUL_SIZES),
                                    key=["M_BUCKET", "P", "Q", "stride_bq"])(_gated_matmul_kernel)
    _wgrad_tuned = triton.autotune(_configs(_WGRAD_NAMES, _WGRAD_SIZES), key=["M_BUCKET", "N", "K"])(
        _gated_wgrad_kernel)
    # DPKERNELS_AUTOTUNE=0: one fixed config each. The GPU test run sets it: autotuning compiles
    # every config for every specialisation the tests hit (hundreds of compiles, minutes); the
    # tests run each config once instead (test_fused_diff_linear.py).
    _MATMUL_BLOCKS = launch_options(_MATMUL_NAMES, _MATMUL_SIZES[2])
    _WGRAD_BLOCKS = launch_options(_WGRAD_NAMES, _WGRAD_SIZES[1])


def _kernel(tuned, plain, blocks: dict):
    """(kernel, launch keywords): the autotuner unless interpreted or DPKERNELS_AUTOTUNE=0."""
    if tuned is not None and os.environ.get("DPKERNELS_AUTOTUNE", "1") != "0":
        return tuned, {}
    return plain, blocks


def _tf32_allowed() -> bool:
    """Whether torch lets fp32 matmuls use TF32, set through either of its APIs: reading the legacy
    ``allow_tf32`` raises once ``fp32_precision`` (torch >= 2.9, inherited from
    ``torch.backends.fp32_precision``) has been set, so that one is asked first."""
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", "none")
    if precision != "none":
        return precision == "tf32"
    return bool(matmul.allow_tf32)


def _precision(dtype: torch.dtype) -> tuple[bool, str]:
    """(DOT_FP32, PRECISION): fp32 operands use tf32 only where torch's matmul allows it (the
    precision is moot for bf16/fp16 operands: Triton's default stays)."""
    ieee = dtype == torch.float32 and not _tf32_allowed()
    return _INTERPRETED, "ieee" if ieee else "tf32"


def _bucket(m: int) -> int:
    return 1 << max(m - 1, 0).bit_length()


def _split_slices(m, p, q, training, theta0, a) -> int:
    """Split-K slices for this launch: the model's choice at M's bucket (the autotuning key), so that
    all calls sharing a tuned config share a split."""
    return path_cost.split_slices(_bucket(m), p, q, training=bool(training), base_size=theta0.element_size(),
                                  cdt_size=a.element_size())


def _gated_matmul(a, theta0, diff, log_alpha, bias, seed, offset, training, l, r, beta, *, transposed):
    m, q = a.shape
    n, k = theta0.shape
    p = n if not transposed else k
    out = torch.empty((m, p), dtype=a.dtype, device=a.device)
    if out.numel() == 0:
        return out
    if q == 0:
        return out.zero_() if bias is None else out.copy_(bias.expand_as(out))
    strides = (1, k) if not transposed else (k, 1)
    dot_fp32, precision = _precision(a.dtype)
    slices = _split_slices(m, p, q, training, theta0, a)
    # Split-K: the slices' fp32 partial products go to a workspace; the bias comes with their sum.
    target = out if slices == 1 else torch.empty((slices, m, p), dtype=torch.float32, device=a.device)
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(p, meta["BLOCK_P"]), slices)  # noqa: E731
    kernel, blocks = _kernel(_matmul_tuned, _gated_matmul_kernel, _MATMUL_BLOCKS)
    kernel[grid](
        a, theta0, diff, log_alpha, bias if bias is not None else out, target, m, p, q, _bucket(m),
        a.stride(0), a.stride(1), *strides, target.stride(-2), target.stride(-1),
        target.stride(0) if slices > 1 else 0,
        _signed_seed(seed if training else 0), offset if training else 0, float(l), float(r), float(beta),
        TRAINING=bool(training), BETA_ONE=float(beta) == 1.0, HAS_BIAS=bias is not None and slices == 1,
        DOT_FP32=dot_fp32, PRECISION=precision, GROUP_M=8, **blocks,
    )
    if slices > 1:
        _slice_sum_kernel[(triton.cdiv(m * p, _SLICE_SUM_BLOCK),)](
            target, bias if bias is not None else out, out, m * p, p, SLICES=slices, HAS_BIAS=bias is not None,
            BLOCK=_SLICE_SUM_BLOCK, num_warps=_SLICE_SUM_WARPS)
    return out


@on_tensor_device
def gated_linear(x, theta0, diff, log_alpha, bias, seed, offset, training, l, r, beta):
    """y = x W^T + bias with W = round_{x.dtype}(theta0 + z * diff) rebuilt tile by tile.

    x (M, K) in the compute dtype; theta0, diff, log_alpha contiguous (N, K); bias the effective
    bias (N,) in the compute dtype or None.
    """
    return _gated_matmul(x, theta0, diff, log_alpha, bias, seed, offset, training, l, r, beta, transposed=False)


@on_tensor_device
def gated_linear_grad_input(grad_y, theta0, diff, log_alpha, seed, offset, training, l, r, beta):
    """dX = dY W (M, K) with W rebuilt as in the forward; grad_y (M, N) in the compute dtype."""
    return _gated_matmul(grad_y, theta0, diff, log_alpha, None, seed, offset, training, l, r, beta, transposed=True)


@on_tensor_device
def gated_linear_grad_weight(grad_y, x, diff, log_alpha, seed, offset, training, l, r, beta, l0_lambda=0.0):
    """(grad_diff, grad_log_alpha) from G = dY^T X routed in the GEMM's epilogue; G stays in registers."""
    m, n = grad_y.shape
    k = x.shape[1]
    grad_diff, grad_log_alpha = torch.empty_like(diff), torch.empty_like(log_alpha)
    if grad_diff.numel() == 0:
        return grad_diff, grad_log_alpha
    dot_fp32, precision = _precision(x.dtype)
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]) * triton.cdiv(k, meta["BLOCK_K"]),)  # noqa: E731
    kernel, blocks = _kernel(_wgrad_tuned, _gated_wgrad_kernel, _WGRAD_BLOCKS)
    kernel[grid](
        grad_y, x, diff, log_alpha, grad_diff, grad_log_alpha, m, n, k, _bucket(m),
        grad_y.stride(0), grad_y.stride(1), x.stride(0), x.stride(1),
        _signed_seed(seed if training else 0), offset if training else 0, float(l), float(r), float(beta),
        float(l0_lambda), _l0_shift(l, r, beta),
        TRAINING=bool(training), BETA_ONE=float(beta) == 1.0, HAS_L0=bool(l0_lambda), DOT_FP32=dot_fp32,
        PRECISION=precision, GROUP_N=8,
        **blocks,
    )
    return grad_diff, grad_log_alpha
