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

import os

import torch
import triton
import triton.language as tl

from ...reference import l0_shift as _l0_shift
from .device_guard import on_tensor_device

_BLOCK = 1024
_NUM_WARPS = 4

# The GPU build uses the special-function unit's approximations (one MUFU instruction each,
# relative error about 2**-22); the interpreter, which cannot run inline PTX, uses tl.log2, tl.exp2
# and an IEEE division for the same formulas. Either way z stays within a few float32 ulps of the
# float64 reference (tests/test_gates.py's rule); the draw u is bit-exact on both.
_FAST_MATH = tl.constexpr(os.environ.get("TRITON_INTERPRET") != "1")
_LOG2E = tl.constexpr(1.4426950408889634)
_TINY = tl.constexpr(1e-30)  # keeps u / d at 0 for u = 0 when d underflows to 0 too


@triton.jit
def _ptx1(x, INSTRUCTION: tl.constexpr):
    """One float32 special-function instruction (``ex2``, ``lg2`` or ``rcp`` ``.approx.ftz.f32``)."""
    return tl.inline_asm_elementwise(INSTRUCTION + ".approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32,
                                     is_pure=True, pack=1)


@triton.jit
def _exp2(x):
    if _FAST_MATH:
        return _ptx1(x, "ex2")
    else:
        return tl.exp2(x)


@triton.jit
def _log2(x):
    if _FAST_MATH:
        return _ptx1(x, "lg2")
    else:
        return tl.log2(x)


@triton.jit
def _reciprocal(x):
    if _FAST_MATH:
        return _ptx1(x, "rcp")
    else:
        return 1.0 / x


@triton.jit
def _sigmoid(x):
    """1 / (1 + 2**(-x log2 e)): exactly 0 or 1 at the extremes, never NaN for finite x."""
    return _reciprocal(1.0 + _exp2(-x * _LOG2E))


@triton.jit
def _mul_wide(a, B: tl.constexpr):
    """(hi, lo) 32-bit halves of the 64-bit product of uint32 `a` and the constant B (one IMAD.WIDE)."""
    p = a.to(tl.uint64) * B
    return (p >> 32).to(tl.uint32), p.to(tl.uint32)


@triton.jit
def _uniform(seed, offs):
    """``tl.rand(seed, offs)`` bit for bit: Philox4x32-10 at counter (offs_lo, offs_hi, 0, 0), key
    seed, first word mapped to [0, 1) as ``uint_to_uniform_float`` does. triton.language.random
    forms each 32x32-bit product's halves with two multiplies (umulhi and a low multiply); one
    wide multiply gives both, about a third fewer instructions. The first round, whose counter
    words c2 = c3 = 0, is folded; the last computes only the word returned."""
    ROUND_A: tl.constexpr = 0xD2511F53
    ROUND_B: tl.constexpr = 0xCD9E8D57
    KEY_A: tl.constexpr = 0x9E3779B9
    KEY_B: tl.constexpr = 0xBB67AE85
    seed = seed.to(tl.uint64)
    k0 = (seed & 0xFFFFFFFF).to(tl.uint32)
    k1 = (seed >> 32).to(tl.uint32)
    c0 = offs.to(tl.uint32)
    c1 = (offs >> 32).to(tl.uint32)
    # Round 1 with c2 = c3 = 0: c0' = c1 ^ k0, c1' = 0, (c2', c3') = (hi ^ k1, lo) of A * c0.
    hi, lo = _mul_wide(c0, ROUND_A)
    c0, c2, c3 = c1 ^ k0, hi ^ k1, lo
    k0 = tl.add(k0, KEY_A, sanitize_overflow=False)
    k1 = tl.add(k1, KEY_B, sanitize_overflow=False)
    # Round 2 with c1 = 0.
    hi_b, lo_b = _mul_wide(c2, ROUND_B)
    hi_a, lo_a = _mul_wide(c0, ROUND_A)
    c0, c1, c2, c3 = hi_b ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
    for _ in tl.static_range(7):  # rounds 3 to 9
        k0 = tl.add(k0, KEY_A, sanitize_overflow=False)
        k1 = tl.add(k1, KEY_B, sanitize_overflow=False)
        hi_b, lo_b = _mul_wide(c2, ROUND_B)
        hi_a, lo_a = _mul_wide(c0, ROUND_A)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
    k0 = tl.add(k0, KEY_A, sanitize_overflow=False)
    word = tl.umulhi(c2, ROUND_B) ^ c1 ^ k0  # round 10, first word only
    x = word.to(tl.int32, bitcast=True)
    x = tl.where(x < 0, ~x, x)
    return x * 4.6566127342e-10


@triton.jit
def _hard_concrete(la, seed, offs, l, r, beta, TRAINING: tl.constexpr, BETA_ONE: tl.constexpr):
    """(z, dz/dlog_alpha) in fp32 for fp32 log_alpha `la` at Philox counters `offs` (int64).

    Training: s = sigmoid((log u - log(1 - u) + la) / beta) = 1 / (1 + q),
    q = 2**((log2(1 - u) - log2(u) - la log2 e) / beta); with BETA_ONE (beta = 1, the paper's) the
    cheaper equal form s = u / (u + (1 - u) e**(-la)), floored away from 0/0 at u = 0 (s = 0 there
    either way).
    """
    if TRAINING:
        u = _uniform(seed, offs)
        if BETA_ONE:
            d = u + (1.0 - u) * _exp2(-la * _LOG2E)
            s = u * _reciprocal(tl.maximum(d, _TINY))
        else:
            q = _exp2((_log2(1.0 - u) - _log2(u) - la * _LOG2E) / beta)
            s = _reciprocal(1.0 + q)
        slope = (r - l) / beta
    else:
        s = _sigmoid(la)
        slope = r - l
    sbar = s * (r - l) + l
    z = tl.minimum(tl.maximum(sbar, 0.0), 1.0)
    dz = tl.where((sbar > 0.0) & (sbar < 1.0), slope * s * (1.0 - s), 0.0)
    return z, dz


@triton.jit
def _l0_grad(la, l0_shift):
    """dE[L0]/dlog_alpha = p (1 - p), p = sigmoid(la - l0_shift)."""
    p = _sigmoid(la - l0_shift)
    return p * (1.0 - p)


@triton.jit(do_not_specialize=["seed", "offset"])
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
    BETA_ONE: tl.constexpr,  # beta == 1: the cheaper form of the gate (see _hard_concrete)
    APPLY: tl.constexpr,  # write theta0 + z * diff instead of z
    BLOCK: tl.constexpr,
):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n
    la = tl.load(LA_ptr + idx, mask=mask, other=0.0)
    z, _ = _hard_concrete(la, seed, offset + idx, l, r, beta, TRAINING, BETA_ONE)
    if APPLY:
        theta0 = tl.load(THETA0_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(DIFF_ptr + idx, mask=mask, other=0.0)
        z = theta0 + z * w
    tl.store(OUT_ptr + idx, z.to(OUT_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["seed", "offset"])
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
    BETA_ONE: tl.constexpr,  # beta == 1 (see _hard_concrete)
    ACCUMULATE: tl.constexpr,  # add into the output buffers instead of overwriting them
    HAS_L0: tl.constexpr,  # add l0_lambda * p (1 - p) to grad_log_alpha
    BLOCK: tl.constexpr,
):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n
    g = tl.load(G_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(DIFF_ptr + idx, mask=mask, other=0.0)
    la = tl.load(LA_ptr + idx, mask=mask, other=0.0)
    z, dz = _hard_concrete(la, seed, offset + idx, l, r, beta, TRAINING, BETA_ONE)
    grad_w = g * z
    grad_la = g * w * dz
    if HAS_L0:
        grad_la += l0_lambda * _l0_grad(la, l0_shift)
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
            TRAINING=bool(training), BETA_ONE=float(beta) == 1.0, APPLY=apply, BLOCK=_BLOCK, num_warps=_NUM_WARPS,
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
            TRAINING=bool(training), BETA_ONE=float(beta) == 1.0, ACCUMULATE=accumulate, HAS_L0=bool(l0_lambda),
            BLOCK=_BLOCK, num_warps=_NUM_WARPS,
        )
    return grad_diff, grad_log_alpha


# Grouped passes: one launch over a flat buffer holding several gated tensors, element i drawn at
# (key SEEDS[OWNER[i]], counter COUNTERS[i]) -- the draw it has in its own tensor (see
# dpkernels.grouped). Training only; eval gates take no draw and use the kernels above.
@triton.jit
def _grouped_draw(SEEDS_ptr, OWNER_ptr, COUNTER_ptr, idx, mask):
    seed = tl.load(SEEDS_ptr + tl.load(OWNER_ptr + idx, mask=mask, other=0), mask=mask, other=0)
    return seed, tl.load(COUNTER_ptr + idx, mask=mask, other=0)


@triton.jit
def _grouped_gate_forward_kernel(LA_ptr, THETA0_ptr, DIFF_ptr, OUT_ptr, SEEDS_ptr, OWNER_ptr, COUNTER_ptr, n, l, r,
                                 beta, BETA_ONE: tl.constexpr, BLOCK: tl.constexpr):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n
    seed, counter = _grouped_draw(SEEDS_ptr, OWNER_ptr, COUNTER_ptr, idx, mask)
    la = tl.load(LA_ptr + idx, mask=mask, other=0.0)
    z, _ = _hard_concrete(la, seed, counter, l, r, beta, True, BETA_ONE)
    theta0 = tl.load(THETA0_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(DIFF_ptr + idx, mask=mask, other=0.0)
    tl.store(OUT_ptr + idx, (theta0 + z * w).to(OUT_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _grouped_gate_backward_kernel(G_ptr, DIFF_ptr, LA_ptr, GRAD_DIFF_ptr, GRAD_LA_ptr, SEEDS_ptr, OWNER_ptr,
                                  COUNTER_ptr, n, l, r, beta, l0_lambda, l0_shift, BETA_ONE: tl.constexpr,
                                  HAS_L0: tl.constexpr, BLOCK: tl.constexpr):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n
    seed, counter = _grouped_draw(SEEDS_ptr, OWNER_ptr, COUNTER_ptr, idx, mask)
    g = tl.load(G_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(DIFF_ptr + idx, mask=mask, other=0.0)
    la = tl.load(LA_ptr + idx, mask=mask, other=0.0)
    z, dz = _hard_concrete(la, seed, counter, l, r, beta, True, BETA_ONE)
    grad_la = g * w * dz
    if HAS_L0:
        grad_la += l0_lambda * _l0_grad(la, l0_shift)
    tl.store(GRAD_DIFF_ptr + idx, g * z, mask=mask)
    tl.store(GRAD_LA_ptr + idx, grad_la, mask=mask)


@on_tensor_device
def grouped_gate_forward(log_alpha, seeds, owner, counters, training, l, r, beta, theta0, diff, out_dtype=None):
    """Launcher: theta0 + z * diff over a flat buffer of several tensors (1-D, contiguous)."""
    if not training:
        return gate_forward(log_alpha, 0, 0, False, l, r, beta, theta0=theta0, diff=diff, out_dtype=out_dtype)
    out = torch.empty(log_alpha.shape, dtype=out_dtype or theta0.dtype, device=log_alpha.device)
    n = log_alpha.numel()
    if n:
        seeds = seeds.to(log_alpha.device, non_blocking=True)
        _grouped_gate_forward_kernel[_grid(n)](
            log_alpha, theta0, diff, out, seeds, owner, counters, n, float(l), float(r), float(beta),
            BETA_ONE=float(beta) == 1.0, BLOCK=_BLOCK, num_warps=_NUM_WARPS)
    return out


@on_tensor_device
def grouped_gate_backward(g, diff, log_alpha, seeds, owner, counters, training, l, r, beta, l0_lambda=0.0):
    """Launcher: fresh (grad_diff, grad_log_alpha) over a flat buffer of several tensors."""
    if not training:
        return gate_backward(g, diff, log_alpha, 0, 0, False, l, r, beta, l0_lambda)
    grad_diff, grad_log_alpha = torch.empty_like(diff), torch.empty_like(log_alpha)
    n = log_alpha.numel()
    if n:
        seeds = seeds.to(log_alpha.device, non_blocking=True)
        _grouped_gate_backward_kernel[_grid(n)](
            g, diff, log_alpha, grad_diff, grad_log_alpha, seeds, owner, counters, n, float(l), float(r), float(beta),
            float(l0_lambda), _l0_shift(l, r, beta), BETA_ONE=float(beta) == 1.0, HAS_L0=bool(l0_lambda),
            BLOCK=_BLOCK, num_warps=_NUM_WARPS)
    return grad_diff, grad_log_alpha
