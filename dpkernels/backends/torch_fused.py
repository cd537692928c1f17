"""The torch backend: ``dpkernels.reference``, with the gate passes of CPU tensors fused.

The eager reference spends a few hundred tensor operations per element on the emulated Philox
(each a full pass over memory), about 1.5 s per million gates on a 2-core CPU: a diff-pruned
22.7M-parameter model would pay tens of seconds per step. torch.compile (inductor's C++ backend)
fuses the whole pass (Philox, hard-concrete math, then the apply or the gradient routing) into
one vectorised loop, ~100x faster. Same formulas, same draws bit for bit (integer arithmetic);
log/exp/sigmoid come from vectorised libraries and may differ from the eager oracle in the last
ulp. Used for float32 CPU tensors with at least DPKERNELS_CPU_FUSE_MIN elements (0 turns it off).
The default, 2, fuses every tensor but the 0- and 1-element ones (sizes dynamo specialises, so
each would cost a compile of its own): one compiled graph serves all other sizes, and it wins
from the smallest on (2-core CPU, gate-apply pass: 0.09 vs 0.71 ms at 64 elements, 0.8 vs 14 ms
at 384x384; the README's MiniLM job, whose attention weights and biases a threshold of 2**18 left
eager, went from 1.95 to 1.62 s per L0 step). If compiling fails (no C++ compiler, say) it warns
once and stays eager.
"""

from __future__ import annotations

import os
import warnings

import torch

from .. import reference
from ..reference import gate_backward as _eager_backward
from ..reference import gate_forward as _eager_forward
from ..reference import scatter_apply, scatter_restore, sddmm  # noqa: F401  (the torch backend's other ops)

_ENV = "DPKERNELS_CPU_FUSE_MIN"
_DEFAULT_MIN = 2
_disabled_reason: str | None = None
fused_calls = 0  # how many passes ran fused (tests check that the fused path is taken)


def _fuse_min() -> int:
    return int(os.environ.get(_ENV, _DEFAULT_MIN))


def _use_fused(log_alpha: torch.Tensor) -> bool:
    threshold = _fuse_min()
    return (_disabled_reason is None and threshold > 0 and log_alpha.device.type == "cpu"
            and log_alpha.dtype == torch.float32 and log_alpha.numel() >= threshold)


def _gates(la, offset, k0, k1, l: float, r: float, beta: float, training: bool):
    """(z, dz/dlog_alpha) for flat fp32 log_alpha; offset, k0, k1 are int64 0-d tensors."""
    if training:
        counters = torch.arange(la.numel(), dtype=torch.int64, device=la.device) + offset
        zero = torch.zeros_like(counters)
        word = reference.philox_rounds(counters & 0xFFFFFFFF, counters >> 32, zero, zero, k0, k1)[0]
        return reference.hard_concrete(la, reference.word_to_uniform(word), l=l, r=r, beta=beta)
    return reference.eval_gates_and_grad(la, l=l, r=r)


def _forward(la, theta0, diff, offset, k0, k1, l: float, r: float, beta: float, training: bool,
             out_dtype: torch.dtype):
    z, _ = _gates(la, offset, k0, k1, l, r, beta, training)
    if theta0 is None:
        return z
    return (theta0.to(diff.dtype) + z * diff).to(out_dtype)


def _backward(g, diff, la, offset, k0, k1, l: float, r: float, beta: float, training: bool, l0_lambda: float,
              l0_shift: float):
    z, dz = _gates(la, offset, k0, k1, l, r, beta, training)
    g = g.to(diff.dtype)
    grad_la = g * diff * dz
    if l0_lambda:
        p = torch.sigmoid(la - l0_shift)
        grad_la = grad_la + l0_lambda * p * (1 - p)
    return g * z, grad_la


_compiled: dict[str, object] = {}


def _compiled_fn(name: str, fn):
    if name not in _compiled:
        _compiled[name] = torch.compile(fn, dynamic=True)
    return _compiled[name]


def _key_tensors(seed: int, offset: int):
    as_t = lambda v: torch.tensor(v, dtype=torch.int64)  # noqa: E731
    return as_t(offset), as_t(seed & 0xFFFFFFFF), as_t(seed >> 32)


def _run_fused(name, fn, *args):
    global _disabled_reason, fused_calls
    try:
        out = _compiled_fn(name, fn)(*args)
    except Exception as exc:  # a compile failure of any kind: stay correct, get slow
        _disabled_reason = f"{type(exc).__name__}: {exc}"
        warnings.warn(f"dpkernels: fusing the CPU gate passes with torch.compile failed, using the eager "
                      f"reference (slow on big models): {_disabled_reason}", RuntimeWarning, stacklevel=3)
        return None
    fused_calls += 1
    return out


def gate_forward(log_alpha, seed, offset, training, l, r, beta, theta0=None, diff=None, out_dtype=None):
    """reference.gate_forward, fused for large CPU tensors."""
    if _use_fused(log_alpha):
        shape = log_alpha.shape
        flat = (t.reshape(-1) if t is not None else None for t in (log_alpha, theta0, diff))
        out_dtype = out_dtype or (theta0.dtype if theta0 is not None else torch.float32)
        with torch.no_grad():
            out = _run_fused("forward", _forward, *flat, *_key_tensors(seed, offset), float(l), float(r),
                             float(beta), bool(training), out_dtype)
        if out is not None:
            return out.reshape(shape)
    return _eager_forward(log_alpha, seed, offset, training, l, r, beta, theta0=theta0, diff=diff,
                          out_dtype=out_dtype)


def gate_backward(g, diff, log_alpha, seed, offset, training, l, r, beta, l0_lambda=0.0, grad_diff=None,
                  grad_log_alpha=None):
    """reference.gate_backward, fused for large CPU tensors."""
    if _use_fused(log_alpha) and diff.dtype == torch.float32:
        shape = log_alpha.shape
        with torch.no_grad():
            out = _run_fused("backward", _backward, g.reshape(-1), diff.reshape(-1), log_alpha.reshape(-1),
                             *_key_tensors(seed, offset), float(l), float(r), float(beta), bool(training),
                             float(l0_lambda), reference.l0_shift(l, r, beta))
            if out is not None:
                gw, gla = (t.reshape(shape) for t in out)
                if grad_diff is not None:
                    gw = grad_diff.add_(gw)
                if grad_log_alpha is not None:
                    gla = grad_log_alpha.add_(gla)
                return gw, gla
    return _eager_backward(g, diff, log_alpha, seed, offset, training, l, r, beta, l0_lambda, grad_diff=grad_diff,
                           grad_log_alpha=grad_log_alpha)
