"""The torch backend: ``dpkernels.reference``, with the gate passes of CPU tensors fused (and, on
a CPU, the sampled weight gradient of a dense-enough mask computed by one GEMM: see sddmm; the
segmented products of mixed-task serving by torch.sparse instead of the reference's dense diffs).

The eager reference spends a few hundred tensor operations per element on the emulated Philox
(each a full pass over memory), about 1.5 s per million gates on a 2-core CPU: a diff-pruned
22.7M-parameter model would pay tens of seconds per step. torch.compile (inductor's C++ backend)
fuses the whole pass (Philox, hard-concrete math, then the apply or the gradient routing) into
one vectorised loop, ~100x faster. Same formulas, same draws bit for bit (integer arithmetic);
log/exp/sigmoid come from vectorised libraries and may differ from the eager oracle in the last
ulp. Used for float32 CPU tensors with at least DPKERNELS_CPU_FUSE_MIN elements (0 turns it off).
The default, 4096: one compiled graph per mode serves all sizes, and it wins from tens of elements
on (2-core CPU, gate-apply pass: 0.09 vs 0.71 ms at 64 elements, 0.1 vs 1.1 ms at 4096, 0.8 vs 14
ms at 384x384), but each mode costs a compile (seconds) once per process; below 4096 elements the
eager pass costs about a millisecond or less, so a model made only of such tensors (a toy, a test)
never pays one, while any real model (an embedding table alone) compiles anyway and then fuses all but
its biases and norms. (The threshold was 2**18, which left MiniLM's 384x384 attention weights and
position embeddings eager.) If compiling fails (no C++ compiler, say) it warns once and stays eager.

Also here: the grouped passes of dpkernels.grouped (which on a CPU keep z and dz from the forward,
so that the backward draws nothing), l0_penalty's E[L0] with its slope in one pass per large tensor,
and, inside every compiled pass, a Philox whose 32 x 32-bit products are single wrapping int64
multiplies (the reference's exact emulation splits them in 16-bit halves): the same bits, half the
instructions.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

import torch

from .. import reference
from ..reference import gate_backward as _eager_backward
from ..reference import gate_forward as _eager_forward
from ..reference import scatter_apply, scatter_restore  # noqa: F401  (the torch backend's other ops)

# CPU sddmm: from this mask density on, one GEMM and a gather beat gathering two M-long rows per
# entry (measured on a 2-core x86 CPU, M = 512 and 2048 tokens, MiniLM's layer shapes: the two
# break even between 0.2% and 0.8%, and the dense product is 5-30x faster from 2% on). A global
# projection leaves some layers far denser than the average 0.5%: in the README's main job the
# gathers took half of each fixed-mask step (0.8 of 1.7 s).
SDDMM_DENSE_MIN_DENSITY = 1 / 256

_ENV = "DPKERNELS_CPU_FUSE_MIN"
_DEFAULT_MIN = 1 << 12
_disabled_reason: str | None = None
fused_calls = 0  # how many passes ran fused (tests check that the fused path is taken)


def _fuse_min() -> int:
    raw = os.environ.get(_ENV, str(_DEFAULT_MIN))
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{_ENV} must be a whole number of elements (0 turns the fusion off), got {raw!r}") from None


def _use_fused(log_alpha: torch.Tensor) -> bool:
    threshold = _fuse_min()
    return (_disabled_reason is None and threshold > 0 and log_alpha.device.type == "cpu"
            and log_alpha.dtype == torch.float32 and log_alpha.numel() >= threshold)


_MASK32 = 0xFFFFFFFF


def _philox_word(counters, k0, k1):
    """reference.philox_rounds' first word for counters (lo, hi, 0, 0), in the compiled passes only.
    A 32 x 32-bit product is formed by one int64 multiply, which wraps modulo 2**64 and so keeps
    both 32-bit halves (the reference splits one factor in 16-bit halves to stay below 2**63 on
    every device): half the instructions of the emulation, the same bits (tests/test_torch_fused.py
    and test_grouped.py compare the draws with the reference's)."""
    c0, c1 = counters & _MASK32, (counters >> 32) & _MASK32
    c2 = c3 = torch.zeros_like(counters)
    for _ in range(10):
        b, a = c2 * 0xCD9E8D57, c0 * 0xD2511F53
        c0, c1, c2, c3 = ((b >> 32) & _MASK32) ^ c1 ^ k0, b & _MASK32, ((a >> 32) & _MASK32) ^ c3 ^ k1, a & _MASK32
        k0, k1 = (k0 + 0x9E3779B9) & _MASK32, (k1 + 0xBB67AE85) & _MASK32
    return c0


def _uniform(counters, k0, k1):
    return reference.word_to_uniform(_philox_word(counters, k0, k1))


def _grouped_draws(seeds, owner, counters):
    """reference.grouped_uniform, by _philox_word."""
    key = seeds[owner.to(torch.int64)]
    return _uniform(counters, key & _MASK32, (key >> 32) & _MASK32)


def _train_gates(la, offset, k0, k1, l: float, r: float, beta: float):
    """(z, dz/dlog_alpha) for flat fp32 log_alpha; offset, k0, k1 are int64 0-d tensors."""
    counters = torch.arange(la.numel(), dtype=torch.int64, device=la.device) + offset
    return reference.hard_concrete(la, _uniform(counters, k0, k1), l=l, r=r, beta=beta)


def _route(g, diff, la, z, dz, l0_lambda: float, l0_shift: float):
    g = g.to(diff.dtype)
    p = torch.sigmoid(la - l0_shift)
    # Unconditional (a zero lambda adds +0.0), so that lambda = 0 is no graph of its own.
    return g * z, g * diff * dz + l0_lambda * p * (1 - p)


# One top-level function per mode, each compiled on its own: dynamo keeps at most 8 graphs per code
# object (recompile_limit), past which calls silently run eager, and the modes times the input
# dtypes and grad/inference modes a training loop mixes would overflow one shared cache.
def _z_train(la, offset, k0, k1, l: float, r: float, beta: float):
    return _train_gates(la, offset, k0, k1, l, r, beta)[0]


def _z_eval(la, l: float, r: float):
    return reference.eval_gates_and_grad(la, l=l, r=r)[0]


def _apply_train(la, theta0, diff, offset, k0, k1, l: float, r: float, beta: float):
    return theta0.to(diff.dtype) + _train_gates(la, offset, k0, k1, l, r, beta)[0] * diff


def _apply_eval(la, theta0, diff, l: float, r: float):
    return theta0.to(diff.dtype) + reference.eval_gates_and_grad(la, l=l, r=r)[0] * diff


def _backward_train(g, diff, la, offset, k0, k1, l: float, r: float, beta: float, l0_lambda: float,
                    l0_shift: float):
    return _route(g, diff, la, *_train_gates(la, offset, k0, k1, l, r, beta), l0_lambda, l0_shift)


def _backward_eval(g, diff, la, l: float, r: float, l0_lambda: float, l0_shift: float):
    return _route(g, diff, la, *reference.eval_gates_and_grad(la, l=l, r=r), l0_lambda, l0_shift)


def _grouped_gates_train(la, seeds, owner, counters, l: float, r: float, beta: float):
    return reference.hard_concrete(la, _grouped_draws(seeds, owner, counters), l=l, r=r, beta=beta)


def _grouped_keep_train(la, theta0, diff, seeds, owner, counters, l: float, r: float, beta: float, l0_shift: float):
    z, dz = reference.hard_concrete(la, _grouped_draws(seeds, owner, counters), l=l, r=r, beta=beta)
    return theta0.to(diff.dtype) + z * diff, z, dz, torch.sigmoid(la - l0_shift).sum()


def _route_kept(g, diff, la, z, dz, l0_lambda: float, l0_shift: float):
    return _route(g, diff, la, z, dz, l0_lambda, l0_shift)


def _expected_l0_and_slope(la, l0_shift: float):
    p = torch.sigmoid(la - l0_shift)
    return p.sum(), p * (1 - p)


MODES = {("z", True): _z_train, ("z", False): _z_eval, ("apply", True): _apply_train, ("apply", False): _apply_eval,
         ("backward", True): _backward_train, ("backward", False): _backward_eval}  # (pass, training) -> function
# The grouped passes (dpkernels.grouped), training only (eval gates take the modes above), and
# E[L0] with its gradient's slope in one pass (dpkernels.l0_penalty's large tensors).
GROUPED_MODES = {("grouped_gates", True): _grouped_gates_train, ("grouped_keep", True): _grouped_keep_train,
                 ("route_kept", True): _route_kept, ("expected_l0", True): _expected_l0_and_slope}
_compiled: dict[tuple[str, bool], object] = {}


def _key_tensors(seed: int, offset: int):
    as_t = lambda v: torch.tensor(v, dtype=torch.int64)  # noqa: E731
    return as_t(offset), as_t(seed & 0xFFFFFFFF), as_t(seed >> 32)


def _import_cpp_extension_quietly() -> None:
    """Inductor's C++ backend imports torch.utils.cpp_extension, which logs "No CUDA runtime is found,
    using CUDA_HOME=..." on a CPU machine that has a CUDA toolkit: advice for building CUDA
    extensions, not about these passes, yet it printed on every CPU run of the pipeline."""
    if "torch.utils.cpp_extension" in sys.modules:
        return
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        import torch.utils.cpp_extension  # noqa: F401
    finally:
        logger.setLevel(level)


def _gate_args(training, seed, offset, l, r, beta) -> tuple:
    """The gate arguments of a MODES function: the Philox key tensors and beta when training."""
    return (*_key_tensors(seed, offset), float(l), float(r), float(beta)) if training else (float(l), float(r))


def _run_fused(kind: str, tensors, training, gates: tuple, extra=()):
    """MODES[kind, training] compiled, on flat detached tensors (so requires_grad is no guard),
    without autocast (elementwise fp32 math; the caller rounds to its dtype), then ``gates`` (see
    _gate_args) and ``extra``. None if compiling failed."""
    global _disabled_reason, fused_calls
    mode = (kind, bool(training))
    if mode not in _compiled:
        _import_cpp_extension_quietly()
        _compiled[mode] = torch.compile(MODES.get(mode) or GROUPED_MODES[mode], dynamic=True)
    flat = [t.detach().reshape(-1) for t in tensors]
    try:
        with torch.no_grad(), torch.autocast("cpu", enabled=False):
            out = _compiled[mode](*flat, *gates, *extra)
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
        if theta0 is None:
            out = _run_fused("z", [log_alpha], training, _gate_args(training, seed, offset, l, r, beta))
        else:
            gates = _gate_args(training, seed, offset, l, r, beta)
            out = _run_fused("apply", [log_alpha, theta0, diff], training, gates)
            if out is not None:
                out = out.to(out_dtype or theta0.dtype)  # the fp32 sum, rounded once
        if out is not None:
            return out.reshape(log_alpha.shape)
    return _eager_forward(log_alpha, seed, offset, training, l, r, beta, theta0=theta0, diff=diff,
                          out_dtype=out_dtype)


def gate_backward(g, diff, log_alpha, seed, offset, training, l, r, beta, l0_lambda=0.0, grad_diff=None,
                  grad_log_alpha=None):
    """reference.gate_backward, fused for large CPU tensors."""
    if _use_fused(log_alpha) and diff.dtype == torch.float32:
        out = _run_fused("backward", [g, diff, log_alpha], training, _gate_args(training, seed, offset, l, r, beta),
                         extra=(float(l0_lambda), reference.l0_shift(l, r, beta)))
        if out is not None:
            gw, gla = (t.reshape(log_alpha.shape) for t in out)
            with torch.no_grad():
                if grad_diff is not None:
                    gw = grad_diff.add_(gw)
                if grad_log_alpha is not None:
                    gla = grad_log_alpha.add_(gla)
            return gw, gla
    return _eager_backward(g, diff, log_alpha, seed, offset, training, l, r, beta, l0_lambda, grad_diff=grad_diff,
                           grad_log_alpha=grad_log_alpha)


def grouped_gate_forward_keep(log_alpha, seeds, owner, counters, l, r, beta, theta0, diff, out_dtype=None):
    """(theta0 + z * diff, z, dz/dlog_alpha, E[L0]) of a grouped training pass (draws as
    reference.grouped_uniform), fused for large CPU buffers. On a CPU the Philox emulation is most
    of a gate pass, so dpkernels.grouped keeps z and dz (the grouped tensors are small) and routes
    the backward with :func:`gate_backward_kept`, without a second draw."""
    shift = reference.l0_shift(l, r, beta)
    if _use_fused(log_alpha):
        out = _run_fused("grouped_keep", [log_alpha, theta0, diff], True,
                         (seeds, owner, counters, float(l), float(r), float(beta), shift))
        if out is not None:
            return out[0].to(out_dtype or theta0.dtype), *out[1:]
    with torch.no_grad():
        z, dz = reference._grouped_gates_and_grad(log_alpha, seeds, owner, counters, True, l, r, beta)
        return reference.apply_gates(z, theta0, diff, out_dtype), z, dz, reference.expected_l0(log_alpha, l=l, r=r,
                                                                                              beta=beta)


def gate_backward_kept(g, diff, log_alpha, z, dz, l, r, beta, l0_lambda=0.0):
    """reference.gate_backward's (grad_diff, grad_log_alpha) from gates kept by the forward."""
    if _use_fused(log_alpha) and diff.dtype == torch.float32:
        out = _run_fused("route_kept", [g, diff, log_alpha, z, dz], True, (),
                         extra=(float(l0_lambda), reference.l0_shift(l, r, beta)))
        if out is not None:
            return out
    with torch.no_grad():
        return reference.route_gradient(g, diff, log_alpha, z, dz, l, r, beta, l0_lambda)


def expected_l0_and_slope(log_alpha, l0_shift: float):
    """(E[L0] = sum p, dE[L0]/dlog_alpha = p (1 - p)), p = sigmoid(log_alpha - l0_shift), in one
    fused pass for a large CPU tensor (the reference's formulas); None where not fused."""
    if not _use_fused(log_alpha):
        return None
    out = _run_fused("expected_l0", [log_alpha], True, (float(l0_shift),))
    return None if out is None else (out[0], out[1].view(log_alpha.shape))


def grouped_gate_forward(log_alpha, seeds, owner, counters, training, l, r, beta, theta0, diff, out_dtype=None):
    """reference.grouped_gate_forward, fused for large CPU buffers (eval gates: gate_forward's)."""
    if not training:
        return gate_forward(log_alpha, 0, 0, False, l, r, beta, theta0=theta0, diff=diff, out_dtype=out_dtype)
    return grouped_gate_forward_keep(log_alpha, seeds, owner, counters, l, r, beta, theta0, diff, out_dtype)[0]


def grouped_gate_backward(g, diff, log_alpha, seeds, owner, counters, training, l, r, beta, l0_lambda=0.0):
    """reference.grouped_gate_backward, fused for large CPU buffers (eval gates: gate_backward's)."""
    if not training:
        return gate_backward(g, diff, log_alpha, 0, 0, False, l, r, beta, l0_lambda)
    gates = None
    if _use_fused(log_alpha) and diff.dtype == torch.float32:
        gates = _run_fused("grouped_gates", [log_alpha], True,
                           (seeds, owner, counters, float(l), float(r), float(beta)))
    if gates is None:
        return reference.grouped_gate_backward(g, diff, log_alpha, seeds, owner, counters, True, l, r, beta, l0_lambda)
    return gate_backward_kept(g, diff, log_alpha, *gates, l, r, beta, l0_lambda)


def sddmm(grad_y: torch.Tensor, x: torch.Tensor, index: torch.Tensor, in_features: int) -> torch.Tensor:
    """dY^T X at the mask's entries (reference.sddmm's contract, fp32 or fp64 accumulation): on a
    CPU, for a mask of at least SDDMM_DENSE_MIN_DENSITY, the whole product by one GEMM, then the
    entries; otherwise the reference's gathers."""
    if grad_y.device.type != "cpu" or index.numel() < SDDMM_DENSE_MIN_DENSITY * grad_y.shape[1] * in_features:
        return reference.sddmm(grad_y, x, index, in_features)
    acc = torch.float64 if torch.float64 in (grad_y.dtype, x.dtype) else torch.float32
    return (grad_y.to(acc).t() @ x.to(acc)).view(-1)[index]


def segmented_spmm(x, y, row_task, rowptr, col, val, bias=None):
    """reference.segmented_spmm's contract without dense diffs: the rows sorted by task (when several
    are present), per task one ``addmm(y, x, D_t^T)`` with D_t a sparse CSR tensor over that task's
    run of rows (MKL's sparse product on a CPU, torch.sparse on CUDA; no transposed copies), then
    the rows put back in place."""
    acc = reference._acc_dtype(x, y, val)
    n, k = y.shape[1], x.shape[1]
    counts = torch.bincount(row_task, minlength=rowptr.shape[0]).tolist()
    spans = rowptr[:, [0, -1]].tolist()
    single = sum(c > 0 for c in counts) <= 1
    order = None if single else torch.argsort(row_task, stable=True)
    xs, ys = (x, y) if single else (x[order], y[order])
    xs, out = xs.to(acc), ys.to(acc, copy=True)
    first = 0
    for t, rows in enumerate(counts):
        if not rows:
            continue
        part, lo, hi = out[first : first + rows], *spans[t]
        if hi > lo:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
                delta = torch.sparse_csr_tensor(rowptr[t] - lo, col[lo:hi].to(torch.int64), val[lo:hi].to(acc),
                                                (n, k), check_invariants=False)
                torch.addmm(part, xs[first : first + rows], delta.t(), out=part)
        if bias is not None:
            part += bias[t].to(acc)
        first += rows
    if not single:
        out = torch.empty_like(out).index_copy_(0, order, out)
    return out.to(y.dtype)


def segmented_gather(ids, y, row_task, rowptr, col, val):
    """reference.segmented_gather's contract without dense tables: every row's entries gathered from
    its task's CSR row ids[m] and added where they belong (one index_put over all rows)."""
    acc = reference._acc_dtype(y, val)
    out = y.to(acc, copy=True)
    row_task, ids = row_task.to(torch.int64), ids.to(torch.int64)
    start = rowptr[row_task, ids]
    counts = rowptr[row_task, ids + 1] - start
    total = int(counts.sum())
    if total:
        owner = torch.repeat_interleave(torch.arange(ids.numel(), device=ids.device), counts, output_size=total)
        first = torch.cumsum(counts, 0) - counts  # each row's first position among the gathered entries
        entry = start[owner] + torch.arange(total, device=ids.device) - first[owner]
        out.index_put_((owner, col[entry].to(torch.int64)), val[entry].to(acc), accumulate=True)
    return out.to(y.dtype)
