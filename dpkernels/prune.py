"""Model-level diff pruning: magnitude projection to a target sparsity (then fixed-mask finetuning).

Projection (Guo et al. 2021, section 3.3): after L0 training keep the k = round(sparsity * N)
entries with the largest |z_eval * w| over all gated tensors of the model (scope="global", the
paper's rule) or k_t = round(sparsity * N_t) per tensor (scope="tensor"); the rest become exactly
zero and every layer enters the fixed-mask stage (DiffLinear.to_fixed_mask).
"""

from __future__ import annotations

import torch
from torch import nn

from .nn import iter_gated
from .ops import eval_gates

_INF_BITS = 0x7F800000  # float32 +inf: every finite magnitude's bit pattern is below it


def _magnitude_bits(module, gt) -> torch.Tensor:
    """|z_eval * w| of one gated tensor as int32 bit patterns (monotone in the value for x >= 0)."""
    with torch.no_grad():
        mag = (eval_gates(gt.log_alpha, l=module.l, r=module.r) * gt.diff).abs().float().reshape(-1)
    if not bool(torch.isfinite(mag).all()):
        raise ValueError("the diff holds NaN or infinite values; cannot project")
    return mag.view(torch.int32)


def top_k_indices(bit_fns, sizes: list[int], k: int) -> list[torch.Tensor]:
    """Sorted flat indices of the k largest magnitudes across several tensors, exactly k in all.

    ``bit_fns`` recompute each tensor's magnitude bits (``sizes`` entries) on demand, so no
    concatenated copy of all magnitudes is ever held: a binary search over the 31 value bits
    finds the k-th largest value t (one pass over the tensors per bit), then everything above t
    is kept plus the first entries equal to t in (tensor order, flat index) order, so ties are
    broken deterministically.
    """
    total = sum(sizes)
    if not 0 <= k <= total:
        raise ValueError(f"cannot keep {k} of {total} entries")

    def count_at_least(bits_value: int) -> int:
        return int(sum((fn() >= bits_value).sum() for fn in bit_fns))

    # Invariant: count_at_least(lo) >= k > count_at_least(hi); k = 0 keeps nothing (lo = +inf).
    lo, hi = (0 if k else _INF_BITS), _INF_BITS
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if count_at_least(mid) >= k:
            lo = mid
        else:
            hi = mid
    ties_left = k - count_at_least(lo + 1)
    kept = []
    for fn in bit_fns:
        bits = fn()
        above = bits > lo
        tied = (bits == lo).nonzero().reshape(-1)[:ties_left]
        ties_left -= tied.numel()
        above[tied] = True
        kept.append(above.nonzero().reshape(-1))
    return kept


def project(model: nn.Module, sparsity: float, *, scope: str = "global") -> int:
    """Keep k = round(sparsity * N) diff entries (largest |z_eval * w|), enter fixed-mask finetuning.

    N counts every entry of every gated tensor. Returns the number of entries kept. Gated modules
    must be in the L0 stage; afterwards build a new optimizer over the trainable ``*_values``.
    """
    if not isinstance(sparsity, (int, float)) or isinstance(sparsity, bool) or not 0 <= sparsity <= 1:
        raise ValueError(f"sparsity must be a number in [0, 1], got {sparsity!r}")
    if scope not in ("global", "tensor"):
        raise ValueError(f"scope must be 'global' or 'tensor', got {scope!r}")
    gated = list(iter_gated(model))
    if not gated:
        raise ValueError("the model has no gated tensors (use DiffLinear / dpkernels.diff_prune first)")
    for name, _, gt in gated:
        if gt.fixed_mask:
            raise ValueError(f"{name} is already projected (fixed-mask stage)")
    fns = [lambda module=module, gt=gt: _magnitude_bits(module, gt) for _, module, gt in gated]
    sizes = [gt.theta0.numel() for _, _, gt in gated]
    if scope == "global":
        kept = top_k_indices(fns, sizes, round(sparsity * sum(sizes)))
    else:
        kept = [top_k_indices([fn], [n], round(sparsity * n))[0] for fn, n in zip(fns, sizes, strict=True)]
    per_module: dict[int, tuple[nn.Module, dict[str, torch.Tensor]]] = {}
    for (_, module, gt), index in zip(gated, kept, strict=True):
        per_module.setdefault(id(module), (module, {}))[1][gt.name] = index
    for module, indices in per_module.values():
        module.to_fixed_mask(indices["weight"], indices.get("bias"))
    return sum(index.numel() for index in kept)
