"""Public ops: validation, backend dispatch (dpkernels.backends) and the autograd Functions.

Each op checks its inputs here once (metadata only, no host sync on the training path), asks the
dispatcher for a backend, and calls that backend's primitive. The math is DESIGN.md section 1.
``gate_apply``, ``diff_linear`` and ``fixed_mask_linear`` run as autograd Functions in eager mode
(the least overhead) and as torch.library custom ops (``dpkernels::gate_apply`` ...; with their
backward ops) under torch.compile; both call the same implementation functions.
"""

from __future__ import annotations

import contextlib
import math
import os

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from . import path_cost, reference
from .backends import preload as preload_backends  # noqa: F401  (nn.py builds through ops)
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


def _seed_tensor(seed: int) -> torch.Tensor:
    """The unsigned 64-bit seed as an int64 CPU scalar with the same bits (what the ops take)."""
    return torch.tensor(seed - (1 << 64) if seed >= (1 << 63) else seed, dtype=torch.int64)


def _seed_value(seed: torch.Tensor) -> int:
    value = int(seed.item())
    return value + (1 << 64) if value < 0 else value


def _seed_arg(seed, training: bool) -> torch.Tensor:
    """A public op's ``seed`` (an int in [-2**63, 2**64) or an int64 CPU scalar tensor) as the seed tensor.

    A tensor passes through untouched, so that torch.compile neither reads nor specialises on it.
    """
    if isinstance(seed, torch.Tensor):
        if seed.dtype != torch.int64 or seed.numel() != 1 or seed.device.type != "cpu":
            raise TypeError(f"a seed tensor must be one int64 on the CPU, got {seed.dtype} {tuple(seed.shape)} "
                            f"on {seed.device}")
        return seed.reshape(())
    if not training:
        return _seed_tensor(0)
    if seed is None:
        raise ValueError("training gates need a seed (or pass training=False for eval gates)")
    return _seed_tensor(reference.normalize_seed(seed))


def _empty(like: torch.Tensor) -> torch.Tensor:
    """The placeholder a custom op returns for an output it does not compute."""
    return like.new_empty(0)


def _fake_grads(inputs, needs, like) -> list[torch.Tensor]:
    """A backward op's fake outputs: each needed input's gradient, placeholders for the others."""
    return [torch.empty_like(t) if need and t is not None else _empty(like) for t, need in zip(inputs, needs,
                                                                                             strict=True)]


def _gate_apply_backward_impl(g, theta0, diff, log_alpha, seed, offset, training, l, r, beta, l0_lambda, needs):
    """(grad_theta0, grad_diff, grad_log_alpha), None where not needed."""
    grads = [g.to(theta0.dtype) if needs[0] else None, None, None]
    if needs[1] or needs[2]:
        backend = select("gate_apply", log_alpha.device, log_alpha.dtype)
        grad_diff, grad_la = backend.gate_backward(g, diff, log_alpha, _seed_value(seed), offset, training, l, r, beta,
                                                   l0_lambda)
        grads[1], grads[2] = (grad_diff if needs[1] else None), (grad_la if needs[2] else None)
    return grads


def _gate_apply_impl(theta0, diff, log_alpha, seed, offset, training, l, r, beta, out_dtype):
    backend = select("gate_apply", log_alpha.device, log_alpha.dtype)
    return backend.gate_forward(log_alpha, _seed_value(seed), offset, training, l, r, beta, theta0=theta0, diff=diff,
                                out_dtype=out_dtype)


class GateApplyFunction(torch.autograd.Function):
    """Forward: eff = theta0 + z * diff in out_dtype (one kernel pass, gates drawn in-kernel).

    Backward: with g = dLoss/deff, grad_diff = g z and grad_log_alpha = g diff dz/dlog_alpha
    + l0_lambda p (1 - p), one kernel pass that regenerates z from (seed, offset); only diff and
    log_alpha (the parameters themselves) are saved. grad_theta0 = g if theta0 requires grad.
    """

    @staticmethod
    def forward(ctx, theta0, diff, log_alpha, seed, offset, training, l, r, beta, l0_lambda, out_dtype):
        ctx.save_for_backward(theta0, diff, log_alpha, seed)
        ctx.args = (offset, training, l, r, beta, l0_lambda)
        return _gate_apply_impl(theta0, diff, log_alpha, seed, offset, training, l, r, beta, out_dtype)

    @staticmethod
    @once_differentiable  # the backward kernels have no derivative: a double backward must raise
    def backward(ctx, g):
        grads = _gate_apply_backward_impl(g, *ctx.saved_tensors, *ctx.args, ctx.needs_input_grad[:3])
        return (*grads,) + (None,) * 8


@torch.library.custom_op("dpkernels::gate_apply", mutates_args=())
def _gate_apply_op(theta0: torch.Tensor, diff: torch.Tensor, log_alpha: torch.Tensor, seed: torch.Tensor,
                   offset: int, training: bool, l: float, r: float, beta: float, l0_lambda: float,
                   out_dtype: torch.dtype) -> torch.Tensor:
    return _gate_apply_impl(theta0, diff, log_alpha, seed, offset, training, l, r, beta, out_dtype)


@_gate_apply_op.register_fake
def _(theta0, diff, log_alpha, seed, offset, training, l, r, beta, l0_lambda, out_dtype):
    return theta0.new_empty(theta0.shape, dtype=out_dtype)


@torch.library.custom_op("dpkernels::gate_apply_backward", mutates_args=())
def _gate_apply_backward_op(g: torch.Tensor, theta0: torch.Tensor, diff: torch.Tensor, log_alpha: torch.Tensor,
                            seed: torch.Tensor, offset: int, training: bool, l: float, r: float, beta: float,
                            l0_lambda: float, needs: list[bool]) -> list[torch.Tensor]:
    grads = _gate_apply_backward_impl(g, theta0, diff, log_alpha, seed, offset, training, l, r, beta, l0_lambda,
                                      needs)
    # grad_theta0 is g itself when the dtypes agree; a custom op's output must not alias its input.
    return [_empty(diff) if t is None else t.clone() if t is g else t for t in grads]


@_gate_apply_backward_op.register_fake
def _(g, theta0, diff, log_alpha, seed, offset, training, l, r, beta, l0_lambda, needs):
    return _fake_grads((theta0, diff, log_alpha), needs, diff)


def _gate_apply_setup_context(ctx, inputs, output):
    theta0, diff, log_alpha, seed, offset, training, l, r, beta, l0_lambda, _ = inputs
    ctx.save_for_backward(theta0, diff, log_alpha, seed)
    ctx.args = (offset, training, l, r, beta, l0_lambda)


def _gate_apply_op_backward(ctx, g):
    needs = list(ctx.needs_input_grad[:3])
    grads = torch.ops.dpkernels.gate_apply_backward(g, *ctx.saved_tensors, *ctx.args, needs)
    return (*[t if need else None for t, need in zip(grads, needs, strict=True)],) + (None,) * 8


_gate_apply_op.register_autograd(_gate_apply_op_backward, setup_context=_gate_apply_setup_context)


def gate_apply(theta0, diff, log_alpha, *, seed=None, offset=0, training=True, l=-1.5, r=1.5, beta=1.0,
               l0_lambda=0.0, out_dtype=None, check_finite_log_alpha=None) -> torch.Tensor:
    """theta0 + z * diff in out_dtype (default theta0's), z drawn from (seed, offset + i) when training.

    The sum is formed in fp32 (fp64 for fp64 diff on the torch backend) and rounded once to
    out_dtype, so a bf16 effective weight is the correctly rounded bf16 of the exact sum.
    ``l0_lambda`` adds l0_lambda * dE[L0]/dlog_alpha to log_alpha's gradient on every backward,
    as if ``l0_lambda * expected_l0(log_alpha)`` were added to the loss of this forward.
    ``seed``: an int or an int64 CPU scalar tensor (see :func:`diff_linear`). Under torch.compile
    the call is the custom op ``dpkernels::gate_apply``.
    """
    _check_gated(("theta0", "diff", "log_alpha"), theta0, diff, log_alpha)
    check_gate_config(l, r, beta)
    offset = _check_offset(offset, theta0.numel())
    seed = _seed_arg(seed, training)
    if check_finite_log_alpha or (check_finite_log_alpha is None and _finite_check_default()):
        check_finite("log_alpha", log_alpha)
    args = (theta0, diff, log_alpha, seed, offset, bool(training), float(l), float(r), float(beta), float(l0_lambda),
            out_dtype or theta0.dtype)
    if torch.compiler.is_compiling():
        return torch.ops.dpkernels.gate_apply(*args)
    return GateApplyFunction.apply(*args)


@torch.library.custom_op("dpkernels::philox_uniform", mutates_args=())
def _philox_uniform_op(seed: torch.Tensor, offset: int, numel: int, device: torch.device) -> torch.Tensor:
    """The draws (seed, offset + i), i < numel, on `device` (computed on the CPU: meant for a handful)."""
    return reference.uniform(_seed_value(seed), numel, offset).to(device)


@_philox_uniform_op.register_fake
def _(seed, offset, numel, device):
    return torch.empty(numel, dtype=torch.float32, device=device)


def group_gate(group_log_alpha, seed, offset: int, *, training=True, l=-1.5, r=1.5, beta=1.0) -> torch.Tensor:
    """A group gate z_g (structured diff pruning) from the draw (seed, offset), differentiable w.r.t.
    group_log_alpha: :func:`dpkernels.reference.group_gate`, with the draw taken through a custom op
    so that a seed tensor is never read inside a torch.compile graph."""
    if not training:
        return reference.eval_gates(group_log_alpha, l=l, r=r)
    u = torch.ops.dpkernels.philox_uniform(_seed_arg(seed, True), offset, group_log_alpha.numel(),
                                           group_log_alpha.device)
    return reference.hard_concrete(group_log_alpha, u.reshape(group_log_alpha.shape), l=l, r=r, beta=beta)[0]


# --------------------------------------------------------------------------------------------
# Diff linear
# --------------------------------------------------------------------------------------------


_PATH_ENV = "DPKERNELS_DIFF_LINEAR"
# DPKERNELS_DIFF_LINEAR -> (fused forward and dX, fused weight gradient); auto decides per call by
# dpkernels.path_cost's model of the sm_90 builds (path_cost.auto_paths).
_PATHS = {"fused": (True, True), "unfused": (False, False), "fused-forward": (True, False),
          "fused-wgrad": (False, True)}


def linear_path() -> str:
    """DPKERNELS_DIFF_LINEAR: auto (by shape), fused (gates inside the GEMMs), unfused (gate passes +
    cuBLAS), or one half fused: fused-forward (forward and dX), fused-wgrad (the weight gradient)."""
    choice = os.environ.get(_PATH_ENV, "auto").strip().lower() or "auto"
    if choice != "auto" and choice not in _PATHS:
        raise ValueError(f"{_PATH_ENV}={choice!r} is not one of auto, {', '.join(_PATHS)}")
    return choice


_FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # compute dtypes of the fused GEMMs


def _fused_diff_linear(backend, x2: torch.Tensor, weight: torch.Tensor, diff: torch.Tensor, log_alpha: torch.Tensor,
                       training: bool) -> tuple[bool, bool]:
    """(fused forward and dX, fused weight gradient) for this call (backends with fused kernels: triton).

    auto: the paths path_cost predicts faster for this shape, in this call's autograd context (the
    dX and weight-gradient GEMMs count only when backward will run them). A base weight that needs
    its own gradient has its dense dW formed by cuBLAS anyway: routing that is one pass, where the
    fused weight gradient would be a second GEMM."""
    choice = linear_path()
    has_fused = hasattr(backend, "gated_linear") and x2.dtype in _FUSED_DTYPES
    if choice == "auto":
        if not has_fused:
            return False, False
        grad = torch.is_grad_enabled()
        (n, k), m = weight.shape, x2.shape[0]
        forward, wgrad = path_cost.auto_paths(
            m, n, k, training=training, input_grad=grad and x2.requires_grad,
            gate_grad=grad and (diff.requires_grad or log_alpha.requires_grad), base_size=weight.element_size(),
            cdt_size=x2.element_size())
        return forward, wgrad and not weight.requires_grad
    if not has_fused and choice != "unfused":
        raise ValueError(f"{_PATH_ENV}={choice} needs the triton backend and fp32/fp16/bf16 activations (got the "
                         f"{backend.__name__.rsplit('.', 1)[-1]} backend and {x2.dtype})")
    return _PATHS[choice]


def _diff_linear_forward_impl(backend, x, weight, bias, diff, log_alpha, bias_diff, bias_log_alpha, seed, training,
                              l, r, beta, fused):
    """(y, W or an empty placeholder) for 2-D x in the compute dtype; W saved for backward when unfused.

    ``fused``: the fused forward (the Triton GEMM rebuilding W tile by tile) instead of one gate
    pass writing W and cuBLAS."""
    seed, cdt = _seed_value(seed), x.dtype
    b_eff = None
    if bias is not None:
        b_eff = bias.to(cdt) if bias_diff is None else backend.gate_forward(
            bias_log_alpha, seed, weight.numel(), training, l, r, beta, theta0=bias, diff=bias_diff, out_dtype=cdt)
    if fused:
        y = backend.gated_linear(x, weight.contiguous(), diff.contiguous(), log_alpha.contiguous(), b_eff, seed, 0,
                                 training, l, r, beta)
        return y, _empty(x)
    w_eff = backend.gate_forward(log_alpha, seed, 0, training, l, r, beta, theta0=weight, diff=diff, out_dtype=cdt)
    return F.linear(x, w_eff, b_eff), w_eff


_OVERLAP_ENV = "DPKERNELS_OVERLAP_WGRAD"
_wgrad_streams: dict[int, torch.cuda.Stream] = {}


def _wgrad_stream(device: torch.device) -> torch.cuda.Stream | None:
    """The side stream that a weight-gradient pass runs on, beside the dX GEMM, under
    DPKERNELS_OVERLAP_WGRAD=1 on a CUDA device (the L0 stage's unfused routing pass, the fixed-mask
    stage's sampled dY^T X); None otherwise (one stream, in order). The results are the same.

    Off by default, pending a GPU measurement (bench_diff_linear's triton-unfused-overlap and
    fixed-mask-overlap rows): both passes are memory-bound (the routing pass moves ~18 B per weight
    element) and the dX GEMM compute-bound, so at M = 8192 running them together may hide most of
    the pass, or the GEMM, which fills every SM, may leave it no room."""
    choice = os.environ.get(_OVERLAP_ENV, "0").strip() or "0"
    if choice not in ("0", "1"):
        raise ValueError(f"{_OVERLAP_ENV}={choice!r} must be 0 or 1")
    # Not while a CUDA graph is captured: the allocator would hold every block used across the two
    # streams until the capture ends (and the side stream would be created mid-capture).
    if choice == "0" or device.type != "cuda" or torch.cuda.is_current_stream_capturing():
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _wgrad_streams:
        # High priority: the pass's blocks are dispatched as soon as the GEMM frees an SM, and the
        # stream comes from a pool other than the low-priority one that NCCL and most code draw from.
        _wgrad_streams[index] = torch.cuda.Stream(device=index, priority=-1)
    return _wgrad_streams[index]


@contextlib.contextmanager
def _beside(side: torch.cuda.Stream | None):
    """Run the block on `side` after the current stream's work so far (side None: just run it).

    The block's inputs come from the current stream and need no record_stream: the caller holds
    them until _join, after which the current stream's later work (a reuse of their memory) is
    ordered after side's."""
    if side is None:
        yield
        return
    side.wait_stream(torch.cuda.current_stream(side.device))
    with torch.cuda.stream(side):
        yield


def _join(side: torch.cuda.Stream | None, outputs) -> None:
    """The current stream waits for `side`; the outputs, allocated on side, are recorded as used by
    the current stream, so that side cannot reuse their memory while the current stream reads them."""
    if side is None:
        return
    main = torch.cuda.current_stream(side.device)
    main.wait_stream(side)
    for t in outputs:
        t.record_stream(main)


def _diff_linear_backward_impl(backend, grad_y, x, weight, bias, w_eff, diff, log_alpha, bias_diff, bias_log_alpha,
                               seed, training, l, r, beta, l0_lambda, fused, fused_wgrad, needs):
    """Gradients (x, weight, bias, diff, log_alpha, bias_diff, bias_log_alpha); None where not needed.

    ``fused``: the forward was fused (no W saved: dX by the fused GEMM); ``fused_wgrad``: route the
    weight gradient in the epilogue of the dY^T X GEMM instead of cuBLAS + one gate pass; under
    DPKERNELS_OVERLAP_WGRAD=1 that pass runs beside the dX GEMM (see _wgrad_stream)."""
    seed = _seed_value(seed)
    gates = (seed, 0, training, l, r, beta)
    gy = grad_y.to(x.dtype)
    grad = [None] * 7
    route = needs[3] or needs[4]
    side = None
    if needs[1] or (route and not fused_wgrad):
        # After cuBLAS's dW (writing 2 B per weight element in bf16) the routing pass is the one
        # weight-sized pass: it reads dW, diff and log_alpha and writes both fp32 grads (18 B), all
        # that routing must move. The bias's routing runs on gy.sum(0), N elements, not N K. Only a
        # base weight that needs its own gradient in a dtype other than the compute dtype adds a
        # pass, the cast below (2 B read, 4 B written); the routing pass writing it instead would
        # save its 2 B re-read and a launch (22 of 24 B) for a case diff pruning's frozen base does
        # not have: not merged. (When the dtypes match, the cast is no pass at all.)
        dense = gy.t() @ x  # dLoss/dW in the compute dtype, as nn.Linear's backward forms it
        if needs[1]:
            grad[1] = dense.to(weight.dtype)
        if route and not fused_wgrad:
            side = _wgrad_stream(dense.device)
            with _beside(side):  # dense lives until _join
                grad[3], grad[4] = backend.gate_backward(dense, diff, log_alpha, *gates, l0_lambda)
    if needs[0]:
        grad[0] = gy @ w_eff if not fused else backend.gated_linear_grad_input(
            gy, weight.contiguous(), diff.contiguous(), log_alpha.contiguous(), *gates)
    _join(side, grad[3:5])
    if route and fused_wgrad:
        grad[3], grad[4] = backend.gated_linear_grad_weight(gy, x, diff.contiguous(), log_alpha.contiguous(), *gates,
                                                            l0_lambda)
    if bias is not None and (needs[2] or needs[5] or needs[6]):
        gb = gy.sum(0)
        if needs[2]:
            grad[2] = gb.to(bias.dtype)
        if needs[5] or needs[6]:
            grad[5], grad[6] = backend.gate_backward(gb, bias_diff, bias_log_alpha, seed, weight.numel(), training,
                                                     l, r, beta, l0_lambda)
    return grad


class DiffLinearFunction(torch.autograd.Function):
    """Eager autograd for 2-D x already in the compute dtype (see :func:`diff_linear`).

    Forward: y = x W^T + b_eff, W = theta0 + z diff rounded once to the compute dtype, either
    written by one gate pass and multiplied by cuBLAS (unfused; W is saved for dX) or rebuilt tile
    by tile inside a Triton GEMM (fused; nothing weight-sized is saved). Backward, g = dY^T X:
    dX = dY W (cuBLAS on the saved W, or the fused GEMM); grad_diff = g z, grad_log_alpha =
    g diff dz/dlog_alpha + l0_lambda p (1 - p), from the dense g and one gate pass (unfused) or in the
    epilogue of the g GEMM (fused); the bias likewise from the token sum of dY.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, diff, log_alpha, bias_diff, bias_log_alpha, seed, training, l, r, beta,
                l0_lambda, fused, fused_wgrad, backend):
        ctx.backend = backend
        y, w_eff = _diff_linear_forward_impl(backend, x, weight, bias, diff, log_alpha, bias_diff, bias_log_alpha,
                                             seed, training, l, r, beta, fused)
        ctx.save_for_backward(x, weight, bias, w_eff, diff, log_alpha, bias_diff, bias_log_alpha, seed)
        ctx.args = (training, l, r, beta, l0_lambda, fused, fused_wgrad)
        return y

    @staticmethod
    @once_differentiable  # the backward kernels have no derivative: a double backward must raise
    def backward(ctx, grad_y):
        saved = ctx.saved_tensors
        grads = _diff_linear_backward_impl(ctx.backend, grad_y, *saved, *ctx.args, ctx.needs_input_grad[:7])
        return (*grads,) + (None,) * 9


# torch.compile sees the same computation as two custom ops (opaque to tracing, so the backend
# dispatch and the kernel launches stay out of the graph) with an autograd formula.


@torch.library.custom_op("dpkernels::diff_linear", mutates_args=())
def _diff_linear_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, diff: torch.Tensor,
                    log_alpha: torch.Tensor, bias_diff: torch.Tensor | None, bias_log_alpha: torch.Tensor | None,
                    seed: torch.Tensor, training: bool, l: float, r: float, beta: float, l0_lambda: float,
                    fused: bool, fused_wgrad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    backend = select("diff_linear", diff.device, diff.dtype)
    return _diff_linear_forward_impl(backend, x, weight, bias, diff, log_alpha, bias_diff, bias_log_alpha, seed,
                                     training, l, r, beta, fused)


@_diff_linear_op.register_fake
def _(x, weight, bias, diff, log_alpha, bias_diff, bias_log_alpha, seed, training, l, r, beta, l0_lambda, fused,
      fused_wgrad):
    w_eff = x.new_empty(0) if fused else x.new_empty(weight.shape)
    return x.new_empty((x.shape[0], weight.shape[0])), w_eff


@torch.library.custom_op("dpkernels::diff_linear_backward", mutates_args=())
def _diff_linear_backward_op(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                             w_eff: torch.Tensor, diff: torch.Tensor, log_alpha: torch.Tensor,
                             bias_diff: torch.Tensor | None, bias_log_alpha: torch.Tensor | None, seed: torch.Tensor,
                             training: bool, l: float, r: float, beta: float, l0_lambda: float, fused: bool,
                             fused_wgrad: bool, needs: list[bool]) -> list[torch.Tensor]:
    backend = select("diff_linear", diff.device, diff.dtype)
    grads = _diff_linear_backward_impl(backend, grad_y, x, weight, bias, w_eff, diff, log_alpha, bias_diff,
                                       bias_log_alpha, seed, training, l, r, beta, l0_lambda, fused, fused_wgrad,
                                       needs)
    return [g if g is not None else _empty(diff) for g in grads]


@_diff_linear_backward_op.register_fake
def _(grad_y, x, weight, bias, w_eff, diff, log_alpha, bias_diff, bias_log_alpha, seed, training, l, r, beta,
      l0_lambda, fused, fused_wgrad, needs):
    return _fake_grads((x, weight, bias, diff, log_alpha, bias_diff, bias_log_alpha), needs, diff)


def _diff_linear_setup_context(ctx, inputs, output):
    x, weight, bias, diff, log_alpha, bias_diff, bias_log_alpha, seed, *args = inputs
    ctx.save_for_backward(x, weight, bias, output[1], diff, log_alpha, bias_diff, bias_log_alpha, seed)
    ctx.args = tuple(args)


def _diff_linear_op_backward(ctx, grad_y, _grad_w_eff):
    needs = list(ctx.needs_input_grad[:7])
    grads = torch.ops.dpkernels.diff_linear_backward(grad_y, *ctx.saved_tensors, *ctx.args, needs)
    return (*[g if need else None for g, need in zip(grads, needs, strict=True)],) + (None,) * 8


_diff_linear_op.register_autograd(_diff_linear_op_backward, setup_context=_diff_linear_setup_context)


def _check_diff_linear(x, weight, bias, diff, log_alpha, bias_diff, bias_log_alpha) -> None:
    _check_tensor("x", x)
    _check_tensor("weight", weight)
    _check_linear_shapes(x, weight)
    _check_gated(("weight", "diff", "log_alpha"), weight, diff, log_alpha)
    if bias is not None:
        _check_tensor("bias", bias)
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({weight.shape[0]},)")
    if (bias_diff is None) != (bias_log_alpha is None):
        raise ValueError("pass both bias_diff and bias_log_alpha, or neither")
    if bias_diff is not None:
        if bias is None:
            raise ValueError("bias_diff given for a layer without bias")
        _check_gated(("bias", "bias_diff", "bias_log_alpha"), bias, bias_diff, bias_log_alpha)
        if bias_diff.dtype != diff.dtype:
            raise TypeError(f"bias_diff ({bias_diff.dtype}) and diff ({diff.dtype}) must share a dtype")


def diff_linear(x, weight, bias, diff, log_alpha, bias_diff=None, bias_log_alpha=None, *, seed=None,
                training=True, l=-1.5, r=1.5, beta=1.0, l0_lambda=0.0, check_finite_log_alpha=None):
    """y = x (weight + z * diff)^T + (bias + z_b * bias_diff), like F.linear.

    Weight gates are sample_gates(log_alpha, seed); bias gates are sample_gates(bias_log_alpha,
    seed, offset=weight.numel()); eval gates when not training. ``seed``: an int in [0, 2**64) or
    an int64 scalar CPU tensor holding its bits (what DiffLinear passes, so that torch.compile
    does not specialise on it). ``bias_diff``/``bias_log_alpha`` None: the bias is used as is.
    ``l0_lambda`` adds l0_lambda * dE[L0]/dlog_alpha of both gate sets to the backward.

    Precision: the compute dtype is x's, or the autocast dtype. The effective weight
    theta0 + z * diff is formed in fp32 and rounded once to the compute dtype, on both paths: a
    bf16 layer multiplies the correctly rounded bf16 of the exact effective weight, the same
    matrix nn.Linear would multiply after a merge, and the GEMMs accumulate in fp32. diff and
    log_alpha and their gradients stay fp32; the weight gradient g = dY^T X is the compute dtype's
    GEMM output on the unfused path and the fp32 accumulator on the fused path.

    Paths (``DPKERNELS_DIFF_LINEAR`` = auto | fused | unfused | fused-forward | fused-wgrad): the
    unfused path writes the effective weight once and uses cuBLAS (saving that compute-dtype weight
    for dX, as nn.Linear saves its weight); the fused path (triton backend) draws the gates inside
    the GEMMs' tile loads and routes the weight gradient in the GEMM's epilogue, so nothing
    weight-sized is written or saved; the two halves can be chosen apart. auto takes, per call, the
    paths that :func:`dpkernels.path_cost.auto_paths` predicts faster: at DESIGN.md's layers the
    unfused path wherever dX is needed (the fused dX would rebuild W a second time); without dX
    (inference, a first layer) the fused forward up to M = 128 tokens (eval gates: 256).
    ``DPKERNELS_OVERLAP_WGRAD=1`` runs the unfused weight gradient's routing pass on a side stream,
    beside the dX GEMM (CUDA only; the same results). Under torch.compile the call is the custom op
    ``dpkernels::diff_linear`` (no graph break).
    """
    _check_diff_linear(x, weight, bias, diff, log_alpha, bias_diff, bias_log_alpha)
    check_gate_config(l, r, beta)
    seed_t = _seed_arg(seed, training)
    if check_finite_log_alpha or (check_finite_log_alpha is None and _finite_check_default()):
        check_finite("log_alpha", log_alpha)
        if bias_log_alpha is not None:
            check_finite("bias_log_alpha", bias_log_alpha)
    lead, k, n = x.shape[:-1], weight.shape[1], weight.shape[0]
    x2 = x.reshape(lead.numel(), k).to(_compute_dtype(x))  # not -1: k may be 0
    backend = select("diff_linear", diff.device, diff.dtype)
    fused = _fused_diff_linear(backend, x2, weight, diff, log_alpha, bool(training))
    args = (x2, weight, bias, diff, log_alpha, bias_diff, bias_log_alpha, seed_t, bool(training), float(l), float(r),
            float(beta), float(l0_lambda), *fused)
    if torch.compiler.is_compiling():
        y = torch.ops.dpkernels.diff_linear(*args)[0]
    else:
        y = DiffLinearFunction.apply(*args, backend)  # (the custom op, taking no module, selects its own)
    return y if x.dim() == 2 else y.reshape(*lead, n)


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


def _fixed_mask_forward_impl(x, weight, bias, values, index, bias_values, bias_index):
    """(y, W) for 2-D x in the compute dtype: W = theta0 + scatter(index, values) in that dtype."""
    cdt = x.dtype
    w_eff = reference.masked_weight(weight, index, values, cdt)
    b_eff = None
    if bias is not None:
        b_eff = bias.to(cdt) if bias_values is None else reference.masked_weight(bias, bias_index, bias_values, cdt)
    return F.linear(x, w_eff, b_eff), w_eff


def _fixed_mask_backward_impl(grad_y, x, w_eff, index, bias_index, values, needs):
    """(grad_x, grad_values, grad_bias_values), None where not needed; needs = those three flags.
    Under DPKERNELS_OVERLAP_WGRAD=1 the sampled weight gradient runs beside the dX GEMM."""
    gy = grad_y.to(w_eff.dtype)
    grads = [None, None, None]
    side = None
    if needs[1]:
        backend = select("sddmm", values.device, values.dtype, primitive="sddmm")
        side = _wgrad_stream(gy.device)
        with _beside(side):  # gy, x and index live until _join
            grads[1] = backend.sddmm(gy, x, index, w_eff.shape[1])
    if needs[0]:
        grads[0] = gy @ w_eff
    _join(side, grads[1:2])
    if needs[2]:
        grads[2] = gy.sum(0, dtype=torch.promote_types(gy.dtype, torch.float32))[bias_index]  # fp64 stays fp64
    return grads


class FixedMaskLinearFunction(torch.autograd.Function):
    """y = x W^T + b with W = theta0 + scatter(index, values) (likewise b), in the compute dtype.

    For 2-D x already in the compute dtype. Backward: grad_x = dY W (one GEMM, as nn.Linear);
    grad_values = (dY^T X)[index] computed only at the mask's entries (sddmm), never as a dense
    (N, K) product; grad_bias_values = (sum over tokens of dY)[bias_index]. Saved: x and the
    compute-dtype W (as nn.Linear saves x and W).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, values, index, bias_values, bias_index):
        y, w_eff = _fixed_mask_forward_impl(x, weight, bias, values, index, bias_values, bias_index)
        ctx.save_for_backward(x, w_eff, index, bias_index, values)
        return y

    @staticmethod
    @once_differentiable  # the backward kernels have no derivative: a double backward must raise
    def backward(ctx, grad_y):
        needs = ctx.needs_input_grad
        gx, gv, gbv = _fixed_mask_backward_impl(grad_y, *ctx.saved_tensors, (needs[0], needs[3], needs[5]))
        return gx, None, None, gv, None, gbv, None


@torch.library.custom_op("dpkernels::fixed_mask_linear", mutates_args=())
def _fixed_mask_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, values: torch.Tensor,
                   index: torch.Tensor, bias_values: torch.Tensor | None,
                   bias_index: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    return _fixed_mask_forward_impl(x, weight, bias, values, index, bias_values, bias_index)


@_fixed_mask_op.register_fake
def _(x, weight, bias, values, index, bias_values, bias_index):
    return x.new_empty((x.shape[0], weight.shape[0])), x.new_empty(weight.shape)


@torch.library.custom_op("dpkernels::fixed_mask_linear_backward", mutates_args=())
def _fixed_mask_backward_op(grad_y: torch.Tensor, x: torch.Tensor, w_eff: torch.Tensor, index: torch.Tensor,
                            bias_index: torch.Tensor | None, values: torch.Tensor, bias_values: torch.Tensor | None,
                            needs: list[bool]) -> list[torch.Tensor]:
    grads = _fixed_mask_backward_impl(grad_y, x, w_eff, index, bias_index, values, needs)
    return [_empty(values) if t is None else t for t in grads]


@_fixed_mask_backward_op.register_fake
def _(grad_y, x, w_eff, index, bias_index, values, bias_values, needs):
    return _fake_grads((x, values, bias_values), needs, values)


def _fixed_mask_setup_context(ctx, inputs, output):
    x, weight, bias, values, index, bias_values, bias_index = inputs
    ctx.save_for_backward(x, output[1], index, bias_index, values, bias_values)


def _fixed_mask_op_backward(ctx, grad_y, _grad_w_eff):
    needs = [ctx.needs_input_grad[i] for i in (0, 3, 5)]
    gx, gv, gbv = torch.ops.dpkernels.fixed_mask_linear_backward(grad_y, *ctx.saved_tensors, needs)
    return (gx if needs[0] else None, None, None, gv if needs[1] else None, None, gbv if needs[2] else None, None)


_fixed_mask_op.register_autograd(_fixed_mask_op_backward, setup_context=_fixed_mask_setup_context)


def fixed_mask_linear(x, weight, bias, index, values, bias_index=None, bias_values=None, *, validate=True):
    """Fixed-mask finetuning's linear: y = x (weight + m * w)^T + (bias + m_b * w_b).

    The mask m is given by sorted unique flat indices ``index`` (int64) and the trainable delta by
    ``values`` (fp32) at those entries; likewise ``bias_index``/``bias_values`` (None: bias ungated).
    The weight gradient is computed only at the mask's entries (beside the dX GEMM, on a side
    stream, under ``DPKERNELS_OVERLAP_WGRAD=1``; the same results). ``validate`` checks the indices
    (sorted, unique, in range; a host sync): pass False only for indices already checked. Under
    torch.compile the call is the custom op ``dpkernels::fixed_mask_linear``.
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
    lead, n = x.shape[:-1], weight.shape[0]
    x2 = x.reshape(lead.numel(), x.shape[-1]).to(_compute_dtype(x))  # not -1: K may be 0
    args = (x2, weight, bias, values, index, bias_values, bias_index)
    if torch.compiler.is_compiling():
        y = torch.ops.dpkernels.fixed_mask_linear(*args)[0]
    else:
        y = FixedMaskLinearFunction.apply(*args)
    return y if x.dim() == 2 else y.reshape(*lead, n)


# --------------------------------------------------------------------------------------------
# Mixed-task serving: each row corrected by its own task's sparse diff (dpkernels.multitask)
# --------------------------------------------------------------------------------------------

_SEGMENTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_segments(row_task, rowptr, col, val, rows: int, device: torch.device) -> None:
    """The concatenated per-task CSR (reference.segmented_spmm's layout) and one task per row:
    dtypes, shapes and devices (the entry ranges themselves are trusted: MultiTask builds them)."""
    for name, t, dtype, dim in (("row_task", row_task, torch.int64, 1), ("rowptr", rowptr, torch.int64, 2),
                                ("col", col, torch.int32, 1), ("val", val, torch.float32, 1)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype != dtype or t.dim() != dim:
            raise TypeError(f"{name} must be a {dim}-D {str(dtype).removeprefix('torch.')} tensor, got {t.dtype} with "
                            f"shape {tuple(t.shape)}")
        if t.device != device:
            raise ValueError(f"{name} is on {t.device}, the activations on {device}")
    if row_task.shape[0] != rows:
        raise ValueError(f"row_task has {row_task.shape[0]} entries for {rows} rows")
    if col.shape != val.shape:
        raise ValueError(f"col has shape {tuple(col.shape)}, val {tuple(val.shape)}")
    if not rowptr.is_contiguous() or rowptr.shape[1] < 1:
        raise ValueError(f"rowptr must be a contiguous (tasks, rows + 1) tensor, got shape {tuple(rowptr.shape)}")


def _segmented_spmm_impl(x, y, row_task, rowptr, col, val, bias):
    backend = select("segmented_spmm", y.device, y.dtype, dtypes=_SEGMENTED_DTYPES, primitive="segmented_spmm")
    with torch.autocast(y.device.type, enabled=False):  # the backends keep their own precision (fp32 sums)
        return backend.segmented_spmm(x, y, row_task, rowptr, col, val, bias)


@torch.library.custom_op("dpkernels::segmented_spmm", mutates_args=())
def _segmented_spmm_op(x: torch.Tensor, y: torch.Tensor, row_task: torch.Tensor, rowptr: torch.Tensor,
                       col: torch.Tensor, val: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return _segmented_spmm_impl(x, y, row_task, rowptr, col, val, bias)


@_segmented_spmm_op.register_fake
def _(x, y, row_task, rowptr, col, val, bias):
    return torch.empty_like(y, memory_format=torch.contiguous_format)


def segmented_spmm(x, y, row_task, rowptr, col, val, bias=None) -> torch.Tensor:
    """y + x D_t^T (+ bias[t]) per row, t = row_task[m]: a Linear's output corrected row by row by its
    own task's sparse weight diff D_t (and bias delta), in one pass over every row and task.

    x (M, K) in the compute dtype, y (M, N) the base output x theta0^T + b0; rowptr (T, N + 1),
    col, val: the T tasks' diffs as one concatenated CSR over the N output features
    (:func:`dpkernels.reference.segmented_spmm`); bias (T, N) or None. Accumulated in fp32 (fp64 for
    fp64 operands) and rounded once to y's dtype. Inference only (no autograd). Cost: the base GEMM
    that made y plus the nonzeros of each row's task per row. Under torch.compile the call is the
    custom op ``dpkernels::segmented_spmm``.
    """
    for name, t in (("x", x), ("y", y)):
        _check_tensor(name, t)
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
    if x.shape[0] != y.shape[0] or x.device != y.device:
        raise ValueError(f"x {tuple(x.shape)} on {x.device} and y {tuple(y.shape)} on {y.device} must share rows and "
                         "device")
    _check_segments(row_task, rowptr, col, val, y.shape[0], y.device)
    if rowptr.shape[1] != y.shape[1] + 1:
        raise ValueError(f"rowptr has {rowptr.shape[1] - 1} rows per task, y {y.shape[1]} output features")
    if bias is not None:
        _check_tensor("bias", bias)
        if bias.shape != (rowptr.shape[0], y.shape[1]) or bias.device != y.device or bias.stride(1) != 1:
            raise ValueError(f"bias must be a row-contiguous ({rowptr.shape[0]}, {y.shape[1]}) tensor on {y.device}, "
                             f"got {tuple(bias.shape)} on {bias.device}")
    if torch.compiler.is_compiling():
        return torch.ops.dpkernels.segmented_spmm(x, y, row_task, rowptr, col, val, bias)
    return _segmented_spmm_impl(x, y, row_task, rowptr, col, val, bias)


def _segmented_gather_impl(ids, y, row_task, rowptr, col, val):
    backend = select("segmented_gather", y.device, y.dtype, dtypes=_SEGMENTED_DTYPES, primitive="segmented_gather")
    with torch.autocast(y.device.type, enabled=False):
        return backend.segmented_gather(ids, y, row_task, rowptr, col, val)


@torch.library.custom_op("dpkernels::segmented_gather", mutates_args=())
def _segmented_gather_op(ids: torch.Tensor, y: torch.Tensor, row_task: torch.Tensor, rowptr: torch.Tensor,
                         col: torch.Tensor, val: torch.Tensor) -> torch.Tensor:
    return _segmented_gather_impl(ids, y, row_task, rowptr, col, val)


@_segmented_gather_op.register_fake
def _(ids, y, row_task, rowptr, col, val):
    return torch.empty_like(y, memory_format=torch.contiguous_format)


def segmented_gather(ids, y, row_task, rowptr, col, val) -> torch.Tensor:
    """y + D_t[ids[m]] per row, t = row_task[m]: an embedding lookup y = theta0[ids] corrected row by
    row by its own task's sparse table diff D_t (rowptr (T, R + 1), col, val: the tasks' diffs as
    one CSR over the R table rows; :func:`dpkernels.reference.segmented_gather`). Each entry is
    formed once in fp32 (fp64 for fp64) and rounded to y's dtype: the lookup of the merged table.
    ids must lie in [0, R) (the base lookup that made y checked them). Inference only. Under
    torch.compile the call is the custom op ``dpkernels::segmented_gather``.
    """
    _check_tensor("y", y)
    _check_tensor("ids", ids, floating=False)
    if y.dim() != 2 or ids.dtype != torch.int64 or ids.shape != y.shape[:1] or ids.device != y.device:
        raise ValueError(f"ids must be the int64 (M,) rows of y (M, H) on its device, got ids {ids.dtype} "
                         f"{tuple(ids.shape)} on {ids.device}, y {tuple(y.shape)} on {y.device}")
    _check_segments(row_task, rowptr, col, val, y.shape[0], y.device)
    if torch.compiler.is_compiling():
        return torch.ops.dpkernels.segmented_gather(ids, y, row_task, rowptr, col, val)
    return _segmented_gather_impl(ids, y, row_task, rowptr, col, val)
