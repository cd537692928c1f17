"""Triton gate kernels: one pass forward (gates or effective weight), one pass backward.

Forward, per flat element i of a gated tensor (training; eval uses z_eval, no draw)::

    u = tl.rand(seed, offset + i)
    s = sigmoid((log u - log(1 - u) + log_alpha) / beta),  sbar = s (r - l) + l,  z = clamp(sbar, 0, 1)
    out = z                          (APPLY = False)
    out = theta0 + z * diff          (APPLY = True; fp32 sum, rounded once to out's dtype)

Backward, for g = dLoss/dtheta (any float dtype, read as fp32)::

    grad_diff      (+)= g * z
    grad_log_alpha (+)= g * diff * dz/dlog_alpha + l0_lambda * p (1 - p),
    dz/dlog_alpha  = 1[0 < sbar < 1] (r - l) s (1 - s) / beta,   p = sigmoid(log_alpha - l0_shift)

Gates are recomputed from (seed, offset) in the backward, so nothing weight-sized is stored.
Elementwise and memory-bound: one read of each input and one write of each output.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...reference import l0_shift as _l0_shift
from .device_guard import on_tensor_device

_BLOCK = 1024
_NUM_WARPS = 4


@triton.jit
def _hard_concrete(la, seed, offs, l, r, beta, TRAINING: tl.constexpr):
    """(z, dz/dlog_alpha) in fp32 for fp32 log_alpha `la` at Philox counters `offs` (int64)."""
    if TRAINING:
        u = tl.rand(seed, offs)
        s = tl.sigmoid((tl.log(u) - tl.log(1.0 - u) + la) / beta)
        slope = (r - l) / beta
    else:
        s = tl.sigmoid(la)
        slope = r - l
    sbar = s * (r - l) + l
    z = tl.minimum(tl.maximum(sbar, 0.0), 1.0)
    dz = tl.where((sbar > 0.0) & (sbar < 1.0), slope * s * (1.0 - s), 0.0)
    return z, dz


@triton.jit(do_not_specialize=["seed", "offset", "n"])
def _gate_forward_kernel(
    LA_ptr,  # log_alpha, fp32, n contiguous elements
    THETA0_ptr,  # frozen base, any float dtype (unused unless APPLY)
    DIFF_ptr,  # diff magnitudes w, fp32 (unused unless APPLY)
    OUT_ptr,  # output: z (fp32) or the effective weight (compute dtype)
    n,  # number of elements
    seed,  # Philox key, int64 two's complement of the unsigned seed
    offset,  # Philox counter of element 0
    l,  # stretch interval left end (< 0)
    r,  # stretch interval right end (> 1)
    beta,  # temperature
    TRAINING: tl.constexpr,  # sample (seed, offset + i) vs deterministic eval gates
    APPLY: tl.constexpr,  # write theta0 + z * diff instead of z
    BLOCK: tl.constexpr,
):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n
    la = tl.load(LA_ptr + idx, mask=mask, other=0.0)
    z, _ = _hard_concrete(la, seed, offset + idx, l, r, beta, TRAINING)
    if APPLY:
        theta0 = tl.load(THETA0_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(DIFF_ptr + idx, mask=mask, other=0.0)
        z = theta0 + z * w
    tl.store(OUT_ptr + idx, z.to(OUT_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["seed", "offset", "n"])
def _gate_backward_kernel(
    G_ptr,  # dLoss/dtheta, any float dtype, n contiguous elements
    DIFF_ptr,  # diff magnitudes w, fp32
    LA_ptr,  # log_alpha, fp32
    GRAD_DIFF_ptr,  # out (or accumulated into): grad of diff, fp32
    GRAD_LA_ptr,  # out (or accumulated into): grad of log_alpha, fp32
    n,  # number of elements
    seed,  # Philox key (as in the forward)
    offset,  # Philox counter of element 0
    l,
    r,
    beta,
    l0_lambda,  # weight of the fused E[L0] gradient
    l0_shift,  # beta * log(-l / r)
    TRAINING: tl.constexpr,
    ACCUMULATE: tl.constexpr,  # add into the output buffers instead of overwriting them
    HAS_L0: tl.constexpr,  # add l0_lambda * p (1 - p) to grad_log_alpha
    BLOCK: tl.constexpr,
):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n
    g = tl.load(G_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(DIFF_ptr + idx, mask=mask, other=0.0)
    la = tl.load(LA_ptr + idx, mask=mask, other=0.0)
    z, dz = _hard_concrete(la, seed, offset + idx, l, r, beta, TRAINING)
    grad_w = g * z
    grad_la = g * w * dz
    if HAS_L0:
        p = tl.sigmoid(la - l0_shift)
        grad_la += l0_lambda * p * (1.0 - p)
    if ACCUMULATE:
        grad_w += tl.load(GRAD_DIFF_ptr + idx, mask=mask, other=0.0)
        grad_la += tl.load(GRAD_LA_ptr + idx, mask=mask, other=0.0)
    tl.store(GRAD_DIFF_ptr + idx, grad_w, mask=mask)
    tl.store(GRAD_LA_ptr + idx, grad_la, mask=mask)


def _signed_seed(seed: int) -> int:
    """The unsigned 64-bit seed as the int64 with the same bits (Triton widens it back)."""
    return seed - (1 << 64) if seed >= (1 << 63) else seed


def _grid(n: int):
    return (triton.cdiv(n, _BLOCK),)


@on_tensor_device
def gate_forward(log_alpha, seed, offset, training, l, r, beta, theta0=None, diff=None, out_dtype=None):
    """Launcher: gates z (fp32) when theta0 is None, else theta0 + z * diff in out_dtype."""
    la = log_alpha.contiguous()
    apply = theta0 is not None
    if apply:
        theta0, diff = theta0.contiguous(), diff.contiguous()
        out = torch.empty(la.shape, dtype=out_dtype or theta0.dtype, device=la.device)
    else:
        theta0 = diff = la  # placeholders, never read
        out = torch.empty_like(la)
    n = la.numel()
    if n:
        _gate_forward_kernel[_grid(n)](
            la, theta0, diff, out, n, _signed_seed(seed if training else 0), offset if training else 0,
            float(l), float(r), float(beta),
            TRAINING=bool(training), APPLY=apply, BLOCK=_BLOCK, num_warps=_NUM_WARPS,
        )
    return out


@on_tensor_device
def gate_backward(g, diff, log_alpha, seed, offset, training, l, r, beta, l0_lambda=0.0,
                  grad_diff=None, grad_log_alpha=None):
    """Launcher: (grad_diff, grad_log_alpha), written fresh or accumulated into given buffers."""
    g, diff, la = g.contiguous(), diff.contiguous(), log_alpha.contiguous()
    accumulate = grad_diff is not None
    if accumulate != (grad_log_alpha is not None):
        raise ValueError("pass both grad_diff and grad_log_alpha to accumulate, or neither")
    if accumulate:
        for name, buf in (("grad_diff", grad_diff), ("grad_log_alpha", grad_log_alpha)):
            if buf.shape != la.shape or buf.dtype != torch.float32 or not buf.is_contiguous() \
                    or buf.device != la.device:
                raise ValueError(f"{name} must be a contiguous float32 tensor of shape "
                                 f"{tuple(la.shape)} on {la.device}")
    else:
        grad_diff, grad_log_alpha = torch.empty_like(diff), torch.empty_like(la)
    n = la.numel()
    if n:
        _gate_backward_kernel[_grid(n)](
            g, diff, la, grad_diff, grad_log_alpha, n, _signed_seed(seed if training else 0),
            offset if training else 0, float(l), float(r), float(beta), float(l0_lambda),
            _l0_shift(l, r, beta),
            TRAINING=bool(training), ACCUMULATE=accumulate, HAS_L0=bool(l0_lambda), BLOCK=_BLOCK,
            num_warps=_NUM_WARPS,
        )
    return grad_diff, grad_log_alpha
