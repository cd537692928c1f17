"""Pure-PyTorch reference for diff pruning: the test oracle, the CPU backend, the baseline.

Everything here follows DESIGN.md section 1 literally and runs on any device and any floating
dtype (tests use float64). Nothing here imports a backend.

Randomness: ``philox_uniform(seed, offsets)`` reproduces Triton's ``tl.rand(seed, offsets)`` bit for
bit (Philox4x32 with 10 rounds, counter = (offset_lo, offset_hi, 0, 0), key = (seed_lo, seed_hi),
first 32-bit word mapped to [0, 1) exactly as ``triton.language.random.uint_to_uniform_float``
does). The 32-bit arithmetic is emulated in int64 tensors, so it works on every device.

Gates (hard concrete, Louizos et al. 2018, as used by Guo et al. 2021)::

    s    = sigmoid((log u - log(1 - u) + log_alpha) / beta)
    sbar = s * (r - l) + l
    z    = clamp(sbar, 0, 1)
    dz/dlog_alpha = 1[0 < sbar < 1] * (r - l) * s * (1 - s) / beta

u = 0 is possible (probability 2**-31 per draw); log(0) = -inf then gives s = 0 and z = 0, with
no NaN, as long as log_alpha is finite.

Precision of the backends against this: u is bit-identical everywhere; z is not. The GPU kernels
evaluate the same s through the special-function unit's approximations (ex2, lg2, rcp
``.approx.ftz.f32``, relative error ~2**-22 each; at beta = 1 the equal form
s = u / (u + (1 - u) e**(-log_alpha))), so their z differs from this module's float32 z by a few
float32 ulps. Tests hold every backend to ``err <= 2 err(this module in float32) + 8 eps`` against
the float64 oracle, and to the same exact zeros and ones wherever the float64 sbar lies more than
1e-5 from the clamp's ends (tests/test_gates.py): only gates that close to 0 or 1 may fall on the
other side of the clamp on one device and not on another.
"""

from __future__ import annotations

import math
import operator

import torch
import torch.nn.functional as F

__all__ = [
    "normalize_seed",
    "philox4x32",
    "philox_rounds",
    "word_to_uniform",
    "philox_randint",
    "philox_uniform",
    "uniform",
    "hard_concrete",
    "sample_gates",
    "eval_gates",
    "eval_gates_and_grad",
    "expected_l0",
    "expected_l0_grad",
    "gate_forward",
    "gate_backward",
    "apply_gates",
    "route_gradient",
    "grouped_uniform",
    "grouped_gate_forward",
    "grouped_gate_backward",
    "gated_linear",
    "gated_linear_grad_input",
    "gated_linear_grad_weight",
    "effective_weight",
    "diff_linear",
    "diff_linear_backward",
    "segmented_spmm",
    "segmented_gather",
]

# --------------------------------------------------------------------------------------------
# Philox4x32-10, bit-identical to triton.language.random
# --------------------------------------------------------------------------------------------

_PHILOX_ROUND_A = 0xD2511F53
_PHILOX_ROUND_B = 0xCD9E8D57
_PHILOX_KEY_A = 0x9E3779B9
_PHILOX_KEY_B = 0xBB67AE85
_PHILOX_ROUNDS = 10
_MASK32 = 0xFFFFFFFF
# Triton's uint_to_uniform_float scale: the largest float32 with (2**31 - 1) * scale < 1.
_UNIFORM_SCALE = 4.6566127342e-10
# Elements per chunk: bounds the int64 temporaries of the emulation (~10 live x 8 B x chunk).
_CHUNK = 1 << 22


def normalize_seed(seed) -> int:
    """The seed as an unsigned 64-bit integer. Accepts any int in [-2**63, 2**64).

    Negative seeds are read as two's complement, exactly as Triton widens a signed seed.
    """
    if isinstance(seed, bool) or seed is None:
        raise TypeError(f"seed must be an integer, got {seed!r}")
    if isinstance(seed, torch.Tensor):
        if seed.numel() != 1 or seed.dtype.is_floating_point or seed.dtype.is_complex:
            raise TypeError("a seed tensor must hold one integer")
        seed = int(seed.item())
    try:
        seed = operator.index(seed)
    except TypeError:
        raise TypeError(f"seed must be an integer, got {type(seed).__name__}") from None
    if not -(1 << 63) <= seed < (1 << 64):
        raise ValueError(f"seed must lie in [-2**63, 2**64), got {seed}")
    return seed & ((1 << 64) - 1)


def _mulhilo32(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32-bit words of a * b for a constant a < 2**32 and int64 b in [0, 2**32).

    Splitting b into 16-bit halves keeps every partial product below 2**49, inside int64.
    """
    t = a * (b & 0xFFFF)
    u = a * (b >> 16) + (t >> 16)
    return u >> 16, ((u & 0xFFFF) << 16) | (t & 0xFFFF)


def philox4x32(seed: int, c0, c1, c2, c3):
    """Philox4x32-10 on int64 tensors of 32-bit words; returns the four output words.

    Key = (seed_lo, seed_hi) of the unsigned 64-bit seed, rounds and constants as Random123
    and triton.language.random.philox_impl.
    """
    return philox_rounds(c0, c1, c2, c3, seed & _MASK32, seed >> 32)


def philox_rounds(c0, c1, c2, c3, k0, k1):
    """The 10 Philox rounds for key words k0, k1 (ints or int64 tensors holding 32-bit values)."""
    for _ in range(_PHILOX_ROUNDS):
        hi_b, lo_b = _mulhilo32(_PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mulhilo32(_PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _PHILOX_KEY_A) & _MASK32
        k1 = (k1 + _PHILOX_KEY_B) & _MASK32
    return c0, c1, c2, c3


def word_to_uniform(word: torch.Tensor) -> torch.Tensor:
    """Triton's uint_to_uniform_float for a 32-bit word held in int64: float32 in [0, 1)."""
    # int32 bit-cast, then x < 0 -> ~x (= 2**32 - 1 - word): a value in [0, 2**31 - 1].
    x = torch.where(word >= (1 << 31), _MASK32 - word, word)
    return x.to(torch.float32) * torch.tensor(_UNIFORM_SCALE, dtype=torch.float32, device=word.device)


def _philox_first_word(seed: int, offsets: torch.Tensor) -> torch.Tensor:
    """tl.randint's word (int64 in [0, 2**32)): counters (offset_lo, offset_hi, 0, 0)."""
    zero = torch.zeros_like(offsets)
    return philox4x32(seed, offsets & _MASK32, offsets >> 32, zero, zero)[0]


def _check_offsets(offsets: torch.Tensor) -> torch.Tensor:
    if not isinstance(offsets, torch.Tensor) or offsets.dtype not in (torch.int32, torch.int64):
        raise TypeError("offsets must be an int32 or int64 tensor")
    offsets = offsets.to(torch.int64)
    if offsets.numel() and bool((offsets < 0).any()):
        raise ValueError("Philox offsets must be non-negative")
    return offsets


def _map_words(seed, offsets: torch.Tensor, fn, dtype: torch.dtype) -> torch.Tensor:
    """fn(first Philox word) for every counter, chunk by chunk, in the offsets' shape."""
    seed = normalize_seed(seed)
    offsets = _check_offsets(offsets)
    flat = offsets.reshape(-1)
    out = torch.empty(flat.shape, dtype=dtype, device=flat.device)
    for start in range(0, flat.numel(), _CHUNK):
        out[start : start + _CHUNK] = fn(_philox_first_word(seed, flat[start : start + _CHUNK]))
    return out.reshape(offsets.shape)


def philox_randint(seed, offsets: torch.Tensor) -> torch.Tensor:
    """``tl.randint(seed, offsets)`` as int32 (the first Philox word, bit-cast)."""
    return _map_words(seed, offsets, lambda w: torch.where(w >= (1 << 31), w - (1 << 32), w), torch.int32)


def philox_uniform(seed, offsets: torch.Tensor) -> torch.Tensor:
    """``tl.rand(seed, offsets)``: float32 in [0, 1), bit-identical to Triton."""
    return _map_words(seed, offsets, word_to_uniform, torch.float32)


def group_gate(group_log_alpha: torch.Tensor, seed, offset: int, *, training=True, l=-1.5, r=1.5, beta=1.0):
    """A group gate z_g (structured diff pruning), differentiable w.r.t. its log_alpha.

    The draw (seed, offset) comes from the Philox emulation on the CPU (one element, no device
    work), the gate math runs where group_log_alpha lives.
    """
    if not training:
        return eval_gates(group_log_alpha, l=l, r=r)
    u = uniform(seed, group_log_alpha.numel(), offset).reshape(group_log_alpha.shape)
    return hard_concrete(group_log_alpha, u.to(group_log_alpha.device), l=l, r=r, beta=beta)[0]


def uniform(seed, numel: int, offset: int = 0, device=None) -> torch.Tensor:
    """The draws for flat element indices ``offset .. offset + numel - 1`` of one tensor."""
    offsets = torch.arange(numel, dtype=torch.int64, device=device) + int(offset)
    return philox_uniform(seed, offsets)


# --------------------------------------------------------------------------------------------
# Hard-concrete gates and the expected L0 norm
# --------------------------------------------------------------------------------------------


def hard_concrete(log_alpha: torch.Tensor, u: torch.Tensor, *, l: float, r: float, beta: float):
    """Training gates z and dz/dlog_alpha for given uniform draws u, in log_alpha's dtype.

    z is differentiable w.r.t. log_alpha through autograd (clamp/sigmoid); the returned
    derivative is the explicit formula with the strict indicator 1[0 < sbar < 1].
    """
    u = u.to(log_alpha.dtype)
    s = torch.sigmoid((torch.log(u) - torch.log(1 - u) + log_alpha) / beta)
    sbar = s * (r - l) + l
    z = sbar.clamp(0, 1)
    inside = (sbar > 0) & (sbar < 1)
    dz = torch.where(inside, (r - l) * s * (1 - s) / beta, torch.zeros_like(s))
    return z, dz.detach()


def sample_gates(log_alpha: torch.Tensor, seed, *, offset: int = 0, l=-1.5, r=1.5, beta=1.0):
    """Training gates for draws (seed, offset + i), i the flat index; differentiable."""
    u = uniform(seed, log_alpha.numel(), offset, log_alpha.device).reshape(log_alpha.shape)
    return hard_concrete(log_alpha, u, l=l, r=r, beta=beta)[0]


def eval_gates_and_grad(log_alpha: torch.Tensor, *, l=-1.5, r=1.5):
    """Deterministic gates z_eval = clamp(sigmoid(log_alpha) (r - l) + l, 0, 1) and dz/dlog_alpha."""
    s = torch.sigmoid(log_alpha)
    sbar = s * (r - l) + l
    inside = (sbar > 0) & (sbar < 1)
    dz = torch.where(inside, (r - l) * s * (1 - s), torch.zeros_like(s))
    return sbar.clamp(0, 1), dz.detach()


def eval_gates(log_alpha: torch.Tensor, *, l=-1.5, r=1.5) -> torch.Tensor:
    return eval_gates_and_grad(log_alpha, l=l, r=r)[0]


def l0_shift(l: float, r: float, beta: float) -> float:
    """beta * log(-l / r): P(gate != 0) = sigmoid(log_alpha - l0_shift)."""
    return beta * math.log(-l / r)


def expected_l0(log_alpha: torch.Tensor, *, l=-1.5, r=1.5, beta=1.0) -> torch.Tensor:
    """E[L0] = sum_i P(z_i != 0) = sum_i sigmoid(log_alpha_i - beta log(-l / r)); differentiable."""
    return torch.sigmoid(log_alpha - l0_shift(l, r, beta)).sum()


def expected_l0_grad(log_alpha: torch.Tensor, *, l=-1.5, r=1.5, beta=1.0) -> torch.Tensor:
    p = torch.sigmoid(log_alpha - l0_shift(l, r, beta))
    return p * (1 - p)


def _gates_and_grad(log_alpha, seed, offset, training, l, r, beta):
    if training:
        u = uniform(seed, log_alpha.numel(), offset, log_alpha.device).reshape(log_alpha.shape)
        return hard_concrete(log_alpha, u, l=l, r=r, beta=beta)
    return eval_gates_and_grad(log_alpha, l=l, r=r)


# --------------------------------------------------------------------------------------------
# Backend primitives (the torch backend): same signatures as the Triton and CUDA launchers
# --------------------------------------------------------------------------------------------


def apply_gates(z, theta0, diff, out_dtype=None):
    """theta0 + z * diff, formed in the diff's precision and rounded once to out_dtype (default
    theta0's): the effective weight of every gate pass."""
    return (theta0.to(diff.dtype) + z * diff).to(out_dtype or theta0.dtype)


def route_gradient(g, diff, log_alpha, z, dz, l, r, beta, l0_lambda=0.0):
    """(g * z, g * diff * dz + l0_lambda * p (1 - p)) for g = dLoss/dtheta: every gate backward's
    routing, from given gates z and dz/dlog_alpha."""
    g = g.to(diff.dtype)
    gla = g * diff * dz
    if l0_lambda:
        gla = gla + l0_lambda * expected_l0_grad(log_alpha, l=l, r=r, beta=beta)
    return g * z, gla


def gate_forward(log_alpha, seed, offset, training, l, r, beta, theta0=None, diff=None, out_dtype=None):
    """Gates z (theta0 is None) or the effective weight theta0 + z * diff in out_dtype.

    The sum is formed in the diff's precision and rounded once to out_dtype.
    """
    with torch.no_grad():
        z, _ = _gates_and_grad(log_alpha, seed, offset, training, l, r, beta)
        return z if theta0 is None else apply_gates(z, theta0, diff, out_dtype)


def gate_backward(g, diff, log_alpha, seed, offset, training, l, r, beta, l0_lambda=0.0,
                  grad_diff=None, grad_log_alpha=None):
    """Route g = dLoss/dtheta to the trainable tensors; accumulate into given buffers.

        grad_diff      = g * z
        grad_log_alpha = g * diff * dz/dlog_alpha + l0_lambda * p * (1 - p)
    """
    with torch.no_grad():
        z, dz = _gates_and_grad(log_alpha, seed, offset, training, l, r, beta)
        gw, gla = route_gradient(g, diff, log_alpha, z, dz, l, r, beta, l0_lambda)
        if grad_diff is not None:
            gw = grad_diff.add_(gw)
        if grad_log_alpha is not None:
            gla = grad_log_alpha.add_(gla)
        return gw, gla


def grouped_uniform(seeds: torch.Tensor, owner: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """The draws of a grouped gate pass over a flat buffer of several tensors: element i takes the
    Philox draw (key ``seeds[owner[i]]``, counter ``counters[i]``), the one ``uniform(seed, ...)``
    gives that element in its own tensor. ``seeds``: int64 (the unsigned seeds' bits); ``owner``:
    int32/int64 indices into it; ``counters``: int64, non-negative."""
    key = seeds.to(device=owner.device, dtype=torch.int64)[owner.to(torch.int64)]
    zero = torch.zeros_like(counters)
    word = philox_rounds(counters & _MASK32, (counters >> 32) & _MASK32, zero, zero, key & _MASK32,
                         (key >> 32) & _MASK32)[0]
    return word_to_uniform(word)


def _grouped_gates_and_grad(log_alpha, seeds, owner, counters, training, l, r, beta):
    if training:
        return hard_concrete(log_alpha, grouped_uniform(seeds, owner, counters), l=l, r=r, beta=beta)
    return eval_gates_and_grad(log_alpha, l=l, r=r)


def grouped_gate_forward(log_alpha, seeds, owner, counters, training, l, r, beta, theta0, diff, out_dtype=None):
    """:func:`gate_forward`'s effective weight for a flat buffer of several tensors, element i drawn
    as in :func:`grouped_uniform` (eval gates when not training: seeds, owner, counters unused)."""
    with torch.no_grad():
        z, _ = _grouped_gates_and_grad(log_alpha, seeds, owner, counters, training, l, r, beta)
        return apply_gates(z, theta0, diff, out_dtype)


def grouped_gate_backward(g, diff, log_alpha, seeds, owner, counters, training, l, r, beta, l0_lambda=0.0):
    """:func:`gate_backward` (fresh gradients) for a flat buffer drawn as in :func:`grouped_uniform`."""
    with torch.no_grad():
        z, dz = _grouped_gates_and_grad(log_alpha, seeds, owner, counters, training, l, r, beta)
        return route_gradient(g, diff, log_alpha, z, dz, l, r, beta, l0_lambda)


def gated_linear(x, theta0, diff, log_alpha, bias, seed, offset, training, l, r, beta):
    """Fused-path primitive: y = x W^T + bias, W = theta0 + z * diff rounded once to x's dtype."""
    w = gate_forward(log_alpha, seed, offset, training, l, r, beta, theta0=theta0, diff=diff, out_dtype=x.dtype)
    return F.linear(x, w, bias)


def gated_linear_grad_input(grad_y, theta0, diff, log_alpha, seed, offset, training, l, r, beta):
    """Fused-path primitive: dX = dY W with W as in :func:`gated_linear`."""
    w = gate_forward(log_alpha, seed, offset, training, l, r, beta, theta0=theta0, diff=diff,
                     out_dtype=grad_y.dtype)
    return grad_y @ w


def gated_linear_grad_weight(grad_y, x, diff, log_alpha, seed, offset, training, l, r, beta, l0_lambda=0.0):
    """Fused-path primitive: gate_backward of G = dY^T X, G formed in diff's precision."""
    g = grad_y.to(diff.dtype).t() @ x.to(diff.dtype)
    return gate_backward(g, diff, log_alpha, seed, offset, training, l, r, beta, l0_lambda)


# --------------------------------------------------------------------------------------------
# The diff linear layer, forward (differentiable) and explicit backward
# --------------------------------------------------------------------------------------------


def effective_weight(theta0, diff, log_alpha, *, seed=None, offset=0, training=True, l=-1.5, r=1.5,
                     beta=1.0):
    """theta0 + z * diff in diff's dtype; differentiable w.r.t. diff and log_alpha."""
    if training:
        z = sample_gates(log_alpha, seed, offset=offset, l=l, r=r, beta=beta)
    else:
        z = eval_gates(log_alpha, l=l, r=r)
    return theta0.to(diff.dtype) + z * diff


def diff_linear(x, weight, bias, diff, log_alpha, bias_diff=None, bias_log_alpha=None, *, seed=None,
                training=True, l=-1.5, r=1.5, beta=1.0):
    """y = x (weight + z * diff)^T + (bias + z_b * bias_diff), computed in diff's dtype.

    Weight gates use draws (seed, i); bias gates use (seed, weight.numel() + j).
    """
    gates = dict(seed=seed, training=training, l=l, r=r, beta=beta)
    w_eff = effective_weight(weight, diff, log_alpha, **gates)
    b_eff = None
    if bias is not None:
        b_eff = bias.to(diff.dtype)
        if bias_diff is not None:
            b_eff = effective_weight(bias, bias_diff, bias_log_alpha, offset=weight.numel(), **gates)
    return F.linear(x.to(diff.dtype), w_eff, b_eff)


def diff_linear_backward(grad_y, x, weight, diff, log_alpha, bias_diff=None, bias_log_alpha=None, *,
                         seed=None, training=True, l=-1.5, r=1.5, beta=1.0, l0_lambda=0.0):
    """Explicit gradients of diff_linear (plus l0_lambda * E[L0] of every gate) in diff's dtype.

        grad_x     = grad_y W_eff          G = grad_y^T x,  g_b = sum over tokens of grad_y
        grad_diff, grad_log_alpha = gate_backward(G), gate_backward(g_b) for the bias

    Returns (grad_x, grad_diff, grad_log_alpha, grad_bias_diff, grad_bias_log_alpha).
    """
    gates = dict(seed=seed, training=training, l=l, r=r, beta=beta)
    w_eff = effective_weight(weight, diff, log_alpha, **gates).detach()
    gy = grad_y.reshape(-1, grad_y.shape[-1]).to(diff.dtype)
    x2 = x.reshape(-1, x.shape[-1]).to(diff.dtype)
    grad_x = (gy @ w_eff).reshape(x.shape)
    route = dict(training=training, l=l, r=r, beta=beta, l0_lambda=l0_lambda)
    grad_diff, grad_la = gate_backward(gy.t() @ x2, diff, log_alpha, seed, 0, **route)
    grad_bd = grad_bla = None
    if bias_diff is not None:
        grad_bd, grad_bla = gate_backward(gy.sum(0), bias_diff, bias_log_alpha, seed, weight.numel(), **route)
    return grad_x, grad_diff, grad_la, grad_bd, grad_bla


# --------------------------------------------------------------------------------------------
# Fixed-mask stage: the delta lives only at sorted flat indices (after projection)
# --------------------------------------------------------------------------------------------


def masked_weight(theta0: torch.Tensor, index: torch.Tensor, values: torch.Tensor, out_dtype=None):
    """theta0 with theta0[index] + values at the masked entries, in out_dtype (default theta0's).

    The masked entries are formed in values' precision and rounded once to out_dtype.
    """
    out_dtype = out_dtype or theta0.dtype
    flat = theta0.reshape(-1)
    out = flat.to(out_dtype, copy=True)
    out[index] = (flat[index].to(values.dtype) + values).to(out_dtype)
    return out.reshape(theta0.shape)


def sddmm(grad_y: torch.Tensor, x: torch.Tensor, index: torch.Tensor, in_features: int,
          chunk: int = 1 << 16) -> torch.Tensor:
    """The weight gradient dY^T X sampled at flat indices (row = i // K, col = i % K).

        out[j] = sum_m grad_y[m, row_j] * x[m, col_j]        grad_y: (M, N), x: (M, K)

    Accumulates in fp32 (fp64 for fp64 inputs); chunked over entries to bound the M x chunk temporaries.
    """
    acc_dtype = torch.float64 if torch.float64 in (grad_y.dtype, x.dtype) else torch.float32
    out = torch.empty(index.numel(), dtype=acc_dtype, device=index.device)
    for start in range(0, index.numel(), chunk):
        idx = index[start : start + chunk]
        rows, cols = idx // in_features, idx % in_features
        out[start : start + chunk] = (grad_y[:, rows].to(acc_dtype) * x[:, cols].to(acc_dtype)).sum(0)
    return out


# --------------------------------------------------------------------------------------------
# Sparse diff scatter: merge a task's diff into the base tensors and restore them bit for bit
# --------------------------------------------------------------------------------------------


def _merge_dtype(dtype: torch.dtype) -> torch.dtype:
    """The precision the merge sum is formed in: float64 for float64 bases, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def scatter_apply(targets, table, ids, index, values, starts, saved):
    """Merge a sparse diff into same-dtype tensors, saving every value it overwrites.

    Entry j belongs to ``targets[ids[j]]``; entries are grouped by tensor, those of ``targets[t]``
    being ``starts[t]:starts[t + 1]`` (tensors past ``len(starts) - 1`` have none). With
    theta = targets[ids[j]] viewed flat and i = index[j]::

        saved[j] = theta[i]
        theta[i] = round_to_dtype(acc(theta[i]) + acc(values[j]))      acc = fp64 for fp64, else fp32

    so the merged value is the correctly rounded sum formed once, and writing ``saved`` back
    (:func:`scatter_restore`) returns the exact original bits. Targets are contiguous and disjoint,
    indices unique per tensor. ``table`` (the targets' data pointers) is what the one-launch
    kernels read; this per-tensor loop, the oracle and CPU path, ignores it and ``ids``.
    """
    with torch.no_grad():
        for t in range(len(starts) - 1):
            lo, hi = starts[t], starts[t + 1]
            if lo == hi:
                continue
            flat = targets[t].view(-1)
            idx = index[lo:hi].long()
            old = flat[idx]
            saved[lo:hi] = old
            acc = _merge_dtype(flat.dtype)
            flat[idx] = (old.to(acc) + values[lo:hi].to(acc)).to(flat.dtype)
    return saved


def scatter_restore(targets, table, ids, index, starts, saved):
    """Undo :func:`scatter_apply`: theta[index[j]] = saved[j] for every entry (same layout)."""
    with torch.no_grad():
        for t in range(len(starts) - 1):
            lo, hi = starts[t], starts[t + 1]
            if lo != hi:
                targets[t].view(-1)[index[lo:hi].long()] = saved[lo:hi]


# --------------------------------------------------------------------------------------------
# Mixed-task serving: every row of a batch corrected by its own task's sparse diff
# --------------------------------------------------------------------------------------------
#
# The layout (dpkernels.multitask builds it): T tasks' diffs of one (R, C) tensor, concatenated.
# Entries of task t in row r are rowptr[t, r]:rowptr[t, r + 1] (int64 (T, R + 1), absolute
# positions), each with its column col[j] (int32) and fp32 value val[j]: one CSR per task, rows of
# the weight diff (a Linear's output features, an embedding's vocabulary rows).


def _acc_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The accumulation dtype of the segmented ops: float64 when any operand is, else float32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _task_dense(rowptr: torch.Tensor, col: torch.Tensor, val: torch.Tensor, t: int, cols: int,
                dtype: torch.dtype) -> torch.Tensor:
    """Task t's diff as a dense (R, cols) matrix."""
    counts = rowptr[t, 1:] - rowptr[t, :-1]
    lo, hi = int(rowptr[t, 0]), int(rowptr[t, -1])
    rows = torch.repeat_interleave(torch.arange(counts.numel(), device=col.device), counts)
    dense = torch.zeros(counts.numel(), cols, dtype=dtype, device=col.device)
    dense[rows, col[lo:hi].long()] = val[lo:hi].to(dtype)
    return dense


def segmented_spmm(x, y, row_task, rowptr, col, val, bias=None):
    """y plus every row's own task's sparse product: with t = row_task[m] and D_t task t's diff as a
    dense (N, K) matrix (its CSR rows are the N output features)::

        out[m, n] = round(acc(y[m, n]) + sum_k D_t[n, k] * acc(x[m, k]) + bias[t, n])

    x (M, K) in the compute dtype, y (M, N) the base output (x theta0^T + b0), out in y's dtype,
    bias (T, N) or None; acc = float64 when any operand is, else float32, rounded once. Cost: the
    nonzeros of row m's task per row, sum over tasks of nnz_t * rows_t multiply-adds. This oracle
    forms each task's dense D_t (the backends never do).
    """
    acc = _acc_dtype(x, y, val)
    out = y.to(acc, copy=True)
    for t in range(rowptr.shape[0]):
        rows = row_task == t
        if not bool(rows.any()):
            continue
        out[rows] += x[rows].to(acc) @ _task_dense(rowptr, col, val, t, x.shape[1], acc).T
        if bias is not None:
            out[rows] += bias[t].to(acc)
    return out.to(y.dtype)


def segmented_gather(ids, y, row_task, rowptr, col, val):
    """An embedding lookup's per-row task diff: with t = row_task[m] and D_t task t's diff as a dense
    (R, H) table::

        out[m, h] = round(acc(y[m, h]) + D_t[ids[m], h])

    ids (M,) int64 rows, y (M, H) the base lookup theta0[ids], out in y's dtype; acc as in
    :func:`segmented_spmm`. Each out entry gets at most one delta, so out is exactly the lookup of
    the merged table round(acc(theta0) + acc(delta)). Cost: per row, its row's nonzeros.
    """
    acc = _acc_dtype(y, val)
    out = y.to(acc, copy=True)
    for t in range(rowptr.shape[0]):
        rows = row_task == t
        if bool(rows.any()):
            out[rows] += _task_dense(rowptr, col, val, t, y.shape[1], acc)[ids[rows]]
    return out.to(y.dtype)
