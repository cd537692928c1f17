"""Public ops: validation, backend dispatch (dpkernels.backends) and the autograd Functions.

Each op checks its inputs here once (metadata only, no host sync on the training path), asks the
dispatcher for a backend, and calls that backend's primitive. The math is DESIGN.md section 1.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F

from . import reference
from .backends import select

_FINITE_ENV = "DPKERNELS_CHECK_FINITE"


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def check_gate_config(l: float, r: float, beta: float) -> None:
    """Hard concrete needs l < 0 < 1 < r (so that P(z = 0) and P(z = 1) are positive) and beta > 0."""
    for name, value in (("l", l), ("r", r), ("beta", beta)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"gate constant {name} must be a finite number, got {value!r}")
    if not l < 0:
        raise ValueError(f"gate constant l must be < 0, got {l}")
    if not r > 1:
        raise ValueError(f"gate constant r must be > 1, got {r}")
    if not beta > 0:
        raise ValueError(f"gate constant beta must be > 0, got {beta}")


def _check_tensor(name: str, t, *, floating: bool = True) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if floating and not t.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")


def check_finite(name: str, t: torch.Tensor) -> None:
    """Raise for NaN or +-inf entries (costs a host sync on GPU tensors)."""
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or infinite values; gates need finite log_alpha")


def _finite_check_default() -> bool:
    return os.environ.get(_FINITE_ENV, "0") == "1"


def _check_offset(offset, numel: int) -> int:
    if isinstance(offset, bool) or not isinstance(offset, int):
        raise TypeError(f"offset must be an int, got {type(offset).__name__}")
    if offset < 0 or offset + numel > (1 << 63):
        raise ValueError(f"offset must satisfy 0 <= offset and offset + numel <= 2**63, got {offset}")
    return offset


def _check_gated(names, theta0, diff, log_alpha) -> None:
    """theta0, diff, log_alpha: float tensors of one shape on one device; diff/log_alpha one dtype."""
    base, diff_name, la_name = names
    for name, t in zip(names, (theta0, diff, log_alpha), strict=True):
        _check_tensor(name, t)
    for name, t in ((diff_name, diff), (la_name, log_alpha)):
        if t.shape != theta0.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, {base} has {tuple(theta0.shape)}")
        if t.device != theta0.device:
            raise ValueError(f"{name} is on {t.device}, {base} on {theta0.device}")
    if diff.dtype != log_alpha.dtype:
        raise TypeError(f"{diff_name} ({diff.dtype}) and {la_name} ({log_alpha.dtype}) must share a dtype")


def _check_linear_shapes(x: torch.Tensor, weight: torch.Tensor) -> None:
    """x (..., in_features) and a 2-D weight (out_features, in_features) on one device."""
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
    if x.dim() == 0 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x has shape {tuple(x.shape)}; its last dimension must be in_features = {weight.shape[1]}")
    if x.device != weight.device:
        raise ValueError(f"x is on {x.device}, weight on {weight.device}")


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """x's dtype, or the autocast dtype when autocast is on for x's device (as F.linear would use)."""
    device_type = x.device.type
    if x.dtype in (torch.float32, torch.float16, torch.bfloat16) and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


# --------------------------------------------------------------------------------------------
# Gates
# --------------------------------------------------------------------------------------------


def sample_gates(log_alpha, seed, *, offset=0, l=-1.5, r=1.5, beta=1.0) -> torch.Tensor:
    """The training gates z for draws (seed, offset + i), exactly those every backend uses.

    Not differentiable (gradients flow through :func:`gate_apply` / :func:`diff_linear`).
    Raises ValueError for NaN or infinite log_alpha.
    """
    _check_tensor("log_alpha", log_alpha)
    check_gate_config(l, r, beta)
    seed = reference.normalize_seed(seed)
    offset = _check_offset(offset, log_alpha.numel())
    check_finite("log_alpha", log_alpha)
    backend = select("sample_gates", log_alpha.device, log_alpha.dtype)
    return backend.gate_forward(log_alpha.detach(), seed, offset, True, l, r, beta)


def eval_gates(log_alpha, *, l=-1.5, r=1.5) -> torch.Tensor:
    """Deterministic gates z_eval = clamp(sigmoid(log_alpha) (r - l) + l, 0, 1); not differentiable."""
    _check_tensor("log_alpha", log_alpha)
    check_gate_config(l, r, 1.0)
    check_finite("log_alpha", log_alpha)
    backend = select("eval_gates", log_alpha.device, log_alpha.dtype)
    return backend.gate_forward(log_alpha.detach(), 0, 0, False, l, r, 1.0)


def expected_l0(log_alpha, *, l=-1.5, r=1.5, beta=1.0) -> torch.Tensor:
    """E[L0] = sum_i sigmoid(log_alpha_i - beta log(-l / r)), differentiable (plain torch ops)."""
    _check_tensor("log_alpha", log_alpha)
    check_gate_config(l, r, beta)
    return reference.expected_l0(log_alpha, l=l, r=r, beta=beta)


# --------------------------------------------------------------------------------------------
# Gated tensor: theta0 + z * diff, differentiable w.r.t. diff and log_alpha (and theta0)
# --------------------------------------------------------------------------------------------


class GateApplyFunction(torch.autograd.Function):
    """Forward: eff = theta0 + z * diff in out_dtype (one kernel pass, gates drawn in-kernel).

    Backward: with g = dLoss/deff, grad_diff = g z and grad_log_alpha = g diff dz/dlog_alpha
    + l0_lambda p (1 - p), one kernel pass that regenerates z from (seed, offset); only diff and
    log_alpha (the parameters themselves) are saved. grad_theta0 = g if theta0 requires grad.
    """

    @staticmethod
    def forward(ctx, theta0, diff, log_alpha, seed, offset, training, l, r, beta, l0_lambda, out_dtype, backend):
        eff = backend.gate_forward(log_alpha, seed, offset, training, l, r, beta, theta0=theta0, diff=diff,
                                   out_dtype=out_dtype)
        ctx.save_for_backward(diff, log_alpha)
        ctx.gate_args = (seed, offset, training, l, r, beta, l0_lambda)
        ctx.backend = backend
        ctx.theta0_dtype = theta0.dtype
        return eff

    @staticmethod
    def backward(ctx, g):
        diff, log_alpha = ctx.saved_tensors
        needs_theta0, needs_diff, needs_la = ctx.needs_input_grad[:3]
        grad_theta0 = g.to(ctx.theta0_dtype) if needs_theta0 else None
        grad_diff = grad_la = None
        if needs_diff or needs_la:
            grad_diff, grad_la = ctx.backend.gate_backward(g, diff, log_alpha, *ctx.gate_args)
        return (grad_theta0, grad_diff if needs_diff else None, grad_la if needs_la else None) + (None,) * 9


def gate_apply(theta0, diff, log_alpha, *, seed=None, offset=0, training=True, l=-1.5, r=1.5, beta=1.0,
               l0_lambda=0.0, out_dtype=None, check_finite_log_alpha=None) -> torch.Tensor:
    """theta0 + z * diff in out_dtype (default theta0's), z drawn from (seed, offset + i) when training.

    The sum is formed in fp32 (fp64 for fp64 diff on the torch backend) and rounded once to
    out_dtype, so a bf16 effective weight is the correctly rounded bf16 of the exact sum.
    ``l0_lambda`` adds l0_lambda * dE[L0]/dlog_alpha to log_alpha's gradient on every backward,
    as if ``l0_lambda * expected_l0(log_alpha)`` were added to the loss of this forward.
    """
    _check_gated(("theta0", "diff", "log_alpha"), theta0, diff, log_alpha)
    check_gate_config(l, r, beta)
    offset = _check_offset(offset, theta0.numel())
    if training:
        if seed is None:
            raise ValueError("training gates need a seed (or pass training=False for eval gates)")
        seed = reference.normalize_seed(seed)
    else:
        seed = 0
    if check_finite_log_alpha or (check_finite_log_alpha is None and _finite_check_default()):
        check_finite("log_alpha", log_alpha)
    out_dtype = out_dtype or theta0.dtype
    backend = select("gate_apply", log_alpha.device, log_alpha.dtype)
    return GateApplyFunction.apply(theta0, diff, log_alpha, seed, offset, bool(training), float(l), float(r),
                                   float(beta), float(l0_lambda), out_dtype, backend)


# --------------------------------------------------------------------------------------------
# Diff linear
# --------------------------------------------------------------------------------------------


def diff_linear(x, weight, bias, diff, log_alpha, bias_diff=None, bias_log_alpha=None, *, seed=None,
                training=True, l=-1.5, r=1.5, beta=1.0, l0_lambda=0.0, check_finite_log_alpha=None):
    """y = x (weight + z * diff)^T + (bias + z_b * bias_diff), like F.linear.

    Weight gates are sample_gates(log_alpha, seed); bias gates are sample_gates(bias_log_alpha,
    seed, offset=weight.numel()); eval gates when not training. The effective weight is written
    once in the compute dtype (x's, or the autocast dtype) and multiplied with cuBLAS; the backward
    turns dLoss/dW (from autograd's matmul) into grad_diff and grad_log_alpha in one pass.
    ``bias_diff``/``bias_log_alpha`` None: the bias (if any) is used as is, ungated.
    """
    _check_tensor("x", x)
    _check_tensor("weight", weight)
    _check_linear_shapes(x, weight)
    if bias is not None:
        _check_tensor("bias", bias)
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({weight.shape[0]},)")
    if (bias_diff is None) != (bias_log_alpha is None):
        raise ValueError("pass both bias_diff and bias_log_alpha, or neither")
    if bias_diff is not None and bias is None:
        raise ValueError("bias_diff given for a layer without bias")
    cdt = _compute_dtype(x)
    gates = dict(seed=seed, training=training, l=l, r=r, beta=beta, l0_lambda=l0_lambda, out_dtype=cdt,
                 check_finite_log_alpha=check_finite_log_alpha)
    _check_gated(("weight", "diff", "log_alpha"), weight, diff, log_alpha)
    w_eff = gate_apply(weight, diff, log_alpha, **gates)
    b_eff = bias
    if bias_diff is not None:
        _check_gated(("bias", "bias_diff", "bias_log_alpha"), bias, bias_diff, bias_log_alpha)
        b_eff = gate_apply(bias, bias_diff, bias_log_alpha, offset=weight.numel(), **gates)
    elif bias is not None:
        b_eff = bias.to(cdt)
    return F.linear(x.to(cdt), w_eff, b_eff)


# --------------------------------------------------------------------------------------------
# Fixed-mask linear (after projection): delta only at sorted flat indices, no gates
# --------------------------------------------------------------------------------------------


def _check_mask(names, theta0, index, values) -> None:
    base, index_name, values_name = names
    _check_tensor(base, theta0)
    _check_tensor(values_name, values)
    _check_tensor(index_name, index, floating=False)
    if index.dtype != torch.int64 or index.dim() != 1:
        raise TypeError(f"{index_name} must be a 1-D int64 tensor, got {index.dtype} with shape {tuple(index.shape)}")
    if values.shape != index.shape:
        raise ValueError(f"{values_name} has shape {tuple(values.shape)}, {index_name} has {tuple(index.shape)}")
    for name, t in ((index_name, index), (values_name, values)):
        if t.device != theta0.device:
            raise ValueError(f"{name} is on {t.device}, {base} on {theta0.device}")


def check_mask_index(name: str, index: torch.Tensor, numel: int) -> None:
    """Mask indices must be strictly increasing (sorted, unique) and inside [0, numel): the kernels
    rely on both (costs a host sync on GPU tensors)."""
    if index.numel() == 0:
        return
    if bool((index[1:] <= index[:-1]).any()):
        raise ValueError(f"{name} must be sorted and free of duplicates")
    low, high = int(index[0]), int(index[-1])
    if low < 0 or high >= numel:
        raise ValueError(f"{name} holds indices outside [0, {numel}): {low if low < 0 else high}")


class FixedMaskLinearFunction(torch.autograd.Function):
    """y = x W^T + b with W = theta0 + scatter(index, values) (likewise b), in the compute dtype.

    Backward: grad_x = dY W (one GEMM, as nn.Linear); grad_values = (dY^T X)[index] computed only
    at the mask's entries (sddmm), never as a dense (N, K) product; grad_bias_values =
    (sum over tokens of dY)[bias_index]. Saved: x and the compute-dtype W (as nn.Linear saves x and W).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, values, index, bias_values, bias_index, cdt, backend):
        w_eff = reference.masked_weight(weight, index, values, cdt)
        b_eff = None
        if bias is not None:
            b_eff = bias.to(cdt) if bias_values is None else reference.masked_weight(bias, bias_index, bias_values, cdt)
        x_c = x.to(cdt)
        ctx.save_for_backward(x_c, w_eff, index, bias_index)
        ctx.backend, ctx.x_dtype = backend, x.dtype
        return torch.nn.functional.linear(x_c, w_eff, b_eff)

    @staticmethod
    def backward(ctx, grad_y):
        x_c, w_eff, index, bias_index = ctx.saved_tensors
        gy = grad_y.reshape(-1, grad_y.shape[-1]).to(w_eff.dtype)
        grad_x = grad_values = grad_bias_values = None
        if ctx.needs_input_grad[0]:
            grad_x = (gy @ w_eff).reshape(x_c.shape).to(ctx.x_dtype)
        if ctx.needs_input_grad[3]:
            grad_values = ctx.backend.sddmm(gy, x_c.reshape(-1, x_c.shape[-1]), index, w_eff.shape[1])
        if ctx.needs_input_grad[5]:
            grad_bias_values = gy.sum(0, dtype=torch.float32)[bias_index]
        return grad_x, None, None, grad_values, None, grad_bias_values, None, None, None


def fixed_mask_linear(x, weight, bias, index, values, bias_index=None, bias_values=None, *, validate=True):
    """Fixed-mask finetuning's linear: y = x (weight + m * w)^T + (bias + m_b * w_b).

    The mask m is given by sorted unique flat indices ``index`` (int64) and the trainable delta by
    ``values`` (fp32) at those entries; likewise ``bias_index``/``bias_values`` (None: bias ungated).
    The weight gradient is computed only at the mask's entries. ``validate`` checks the indices
    (sorted, unique, in range; a host sync): pass False only for indices already checked.
    """
    _check_tensor("x", x)
    _check_mask(("weight", "index", "values"), weight, index, values)
    _check_linear_shapes(x, weight)
    if (bias_index is None) != (bias_values is None):
        raise ValueError("pass both bias_index and bias_values, or neither")
    if bias_values is not None:
        if bias is None:
            raise ValueError("bias_values given for a layer without bias")
        _check_mask(("bias", "bias_index", "bias_values"), bias, bias_index, bias_values)
    if validate:
        check_mask_index("index", index, weight.numel())
        if bias_index is not None:
            check_mask_index("bias_index", bias_index, bias.numel())
    backend = select("sddmm", values.device, values.dtype, primitive="sddmm")
    return FixedMaskLinearFunction.apply(x, weight, bias, values, index, bias_values, bias_index, _compute_dtype(x),
                                         backend)
