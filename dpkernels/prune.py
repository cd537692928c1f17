"""Model-level diff pruning: gate a model, the L0 penalty, optimizer groups, projection.

``diff_prune(model)`` gates every pretrained parameter in place: each plain nn.Linear becomes a
DiffLinear; every other parameter (embeddings, LayerNorm, Linear subclasses whose weights other
code reads directly, Linears holding a tied tensor, ...) gets a GatedParameter parametrization, so
the model runs its own forward unchanged; a tied tensor is gated once, for all its names.
Parameters matching ``dense`` (the new task head) stay dense and trainable.

Projection (Guo et al. 2021, section 3.3): after L0 training keep the k = round(sparsity * N)
entries with the largest |z_eval * w| over all gated tensors of the model (scope="global", the
paper's rule) or k_t = round(sparsity * N_t) per tensor (scope="tensor"); the rest become exactly
zero and every layer enters the fixed-mask stage (DiffLinear.to_fixed_mask).
"""

from __future__ import annotations

import numbers
import re
from collections.abc import Iterable

import torch
from torch import nn

from .nn import (
    DiffLinear,
    GatedParameter,
    check_gate_options,
    dense_task_parameters,
    gate_parameter,
    iter_gated,
    require_gated,
    share_gates_per_forward,
)

_INF_BITS = 0x7F800000  # float32 +inf: every finite magnitude's bit pattern is below it


def _magnitude_bits(gt) -> torch.Tensor:
    """|z_eval * w| of one gated tensor as int32 bit patterns (monotone in the value for x >= 0)."""
    with torch.no_grad():
        mag = gt.eval_dense_delta().abs().float().reshape(-1)
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

    N counts every entry of every gated tensor (a tied tensor once). Returns the number of entries
    kept. Gated modules must be in the L0 stage; afterwards build a new optimizer over the
    trainable ``*_values``.
    """
    # Any real number (numpy scalars too); bools are refused, and NaN fails the range check.
    if not isinstance(sparsity, numbers.Real) or isinstance(sparsity, bool) or not 0 <= sparsity <= 1:
        raise ValueError(f"sparsity must be a number in [0, 1], got {sparsity!r}")
    sparsity = float(sparsity)
    if scope not in ("global", "tensor"):
        raise ValueError(f"scope must be 'global' or 'tensor', got {scope!r}")
    gated = require_gated(model)
    for name, _, gt in gated:
        if gt.fixed_mask:
            raise ValueError(f"{name} is already projected (fixed-mask stage)")
    fns = [lambda gt=gt: _magnitude_bits(gt) for _, _, gt in gated]
    sizes = [gt.theta0.numel() for _, _, gt in gated]
    if scope == "global":
        kept = top_k_indices(fns, sizes, round(sparsity * sum(sizes)))
    else:
        kept = [top_k_indices([fn], [n], round(sparsity * n))[0] for fn, n in zip(fns, sizes, strict=True)]
    per_module: dict[int, tuple[nn.Module, dict[str, torch.Tensor]]] = {}
    for (_, module, gt), index in zip(gated, kept, strict=True):
        per_module.setdefault(id(module), (module, {}))[1][gt.name] = index
    for module, indices in per_module.values():
        module.set_masks(indices)
    return sum(index.numel() for index in kept)


def _patterns(value) -> list[re.Pattern]:
    if value is None:
        return []
    return [re.compile(p) for p in ([value] if isinstance(value, str) else value)]


def diff_prune(model: nn.Module, *, l: float = -1.5, r: float = 1.5, beta: float = 1.0, alpha_init: float = 5.0,
               l0_lambda: float = 0.0, structured: bool = False, include=None, exclude=None,
               dense=("classifier", "score", "classification_head")) -> nn.Module:
    """Gate every pretrained parameter of ``model`` in place and return it.

    A parameter (by its full name, ``re.search``) is gated when it matches ``include`` (default:
    all) and neither ``exclude`` (those are frozen and left as they are) nor ``dense`` (new task
    parameters, by default the heads of transformers' sequence classifiers: BERT's and RoBERTa's
    ``classifier``, GPT-2's and LLaMA's ``score``, T5's ``classification_head``; they stay
    trainable and ungated). Gate options as in DiffLinear; ``structured`` adds one group gate per
    tensor (the paper's structured variant).

    A model that already has gated tensors is refused as a whole: gating it again would gate the
    gates' own tensors.

    A tied parameter (one tensor under several names: GPT-2's ``transformer.wte.weight`` and
    ``lm_head.weight``, T5's shared embedding, BERT's MLM decoder) is gated once: one diff and one
    log_alpha, shared by every module holding it, so the tie holds (every name reads the same
    theta0 + z * w, with one seed per forward of ``model``) and the gradients of all uses add up.
    ``l0_penalty``, ``project``, ``optimizer_groups`` and ``SparseDiff`` count it once, under its
    first name in ``named_parameters()`` order (see ``iter_gated``). Every name of a tied tensor
    must get the same role; patterns giving its names different roles raise ValueError.
    """
    gate_kwargs = dict(l=l, r=r, beta=beta, alpha_init=alpha_init, l0_lambda=l0_lambda, structured=structured)
    check_gate_options(**gate_kwargs)  # before the model is touched
    include, exclude, dense = _patterns(include), _patterns(exclude), _patterns(dense)

    def role(name: str) -> str:
        if any(p.search(name) for p in dense):
            return "dense"
        if any(p.search(name) for p in exclude) or (include and not any(p.search(name) for p in include)):
            return "frozen"
        return "gated"

    already = next(iter_gated(model), None)
    if already is not None:
        raise ValueError(f"the model is already diff-pruned (it has gated tensors, e.g. {already[0]}); "
                         "call diff_prune once, on the plain model")
    names_of: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(param), []).append(name)
    tied = {pid: names for pid, names in names_of.items() if len(names) > 1}
    for names in tied.values():
        roles = {n: role(n) for n in names}
        if len(set(roles.values())) > 1:
            raise ValueError(f"tied (shared) parameter {roles}: these names are one tensor, which needs one role; "
                             "make the include/exclude/dense patterns select all of them alike (or untie them)")

    shared_gates: dict[int, GatedParameter] = {}  # id(tied parameter) -> its one gate
    for path, module in list(model.named_modules()):
        prefix = f"{path}." if path else ""
        params = [(n, p) for n, p in module.named_parameters(recurse=False) if p is not None]
        roles = {n: role(prefix + n) for n, _ in params}
        # A Linear holding a tied tensor (GPT-2's lm_head reads the embedding's matrix) stays a
        # Linear: a DiffLinear owns its diff, so the tensor would get one diff per module and the
        # tie would break. Its tensors are parametrized instead, with the one GatedParameter that
        # every module holding the tensor shares.
        if (type(module) is nn.Linear and params and all(v == "gated" for v in roles.values())
                and not any(id(p) in tied for _, p in params)):
            _replace(model, path, DiffLinear.from_linear(module, **gate_kwargs))
            continue
        for n, p in params:
            if roles[n] == "gated":
                if id(p) in shared_gates:
                    gate_parameter(module, n, gate=shared_gates[id(p)])
                else:
                    gate = gate_parameter(module, n, **gate_kwargs)
                    if id(p) in tied:
                        shared_gates[id(p)] = gate
            elif roles[n] == "frozen":
                p.requires_grad_(False)
            else:
                p.requires_grad_(True)
    if shared_gates:
        share_gates_per_forward(model, list(shared_gates.values()))
    return model


def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    if not path:
        raise ValueError("diff_prune cannot replace the root module itself; wrap it in a container")
    parent_path, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, child, new)


def l0_penalty(model: nn.Module) -> torch.Tensor:
    """Sum of E[L0] over every gated tensor of the model (product form when structured), differentiable."""
    gated = [gt for _, _, gt in require_gated(model)]
    if any(_is_sharded(t) for gt in gated for t in gt.trainable()):
        raise ValueError("l0_penalty needs whole tensors but the gates are sharded (FSDP2); use the fused "
                         "L0 gradient instead: diff_prune(model, l0_lambda=...)")
    terms = [gt.expected_l0() for gt in gated]
    return torch.stack([t.to(terms[0].device) for t in terms]).sum()


def _is_sharded(t: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed support
        return False
    return isinstance(t, DTensor)


def optimizer_groups(model: nn.Module, *, diff_lr: float = 1e-3, log_alpha_lr: float = 0.1,
                     dense_lr: float | None = None, weight_decay: float = 0.0) -> list[dict]:
    """Parameter groups for torch.optim (e.g. AdamW): "diff" (diff / fixed-mask values),
    "log_alpha" (elementwise and group gates, no weight decay) and "dense" (task head).

    Defaults follow the reference implementations of the paper's code: a separate optimizer
    state for log_alpha with learning rate 0.1 and w at 1e-3 (the paper's text gives only
    the penalty and the projection; it does not list these), and the gradient norms of w and
    log_alpha clipped separately (:func:`clip_grad_norms`). Empty groups are left out. A model
    without gated tensors is refused: its "dense" group would silently be full finetuning.
    """
    gated = [gt for _, _, gt in require_gated(model, " (it would be plain full finetuning)")]
    diff, gates = [], []
    for gt in gated:
        diff += [t for t in (gt.diff, gt.values) if t is not None]
        gates += [t for t in (gt.log_alpha, gt.group_log_alpha) if t is not None]
    groups = [
        dict(name="diff", params=diff, lr=diff_lr, weight_decay=weight_decay),
        dict(name="log_alpha", params=gates, lr=log_alpha_lr, weight_decay=0.0),
        dict(name="dense", params=list(dense_task_parameters(model).values()),
             lr=diff_lr if dense_lr is None else dense_lr, weight_decay=weight_decay),
    ]
    return [g for g in groups if g["params"]]


def clip_grad_norms(groups: Iterable[dict], max_norm: float) -> dict[str, float]:
    """Clip each parameter group's gradient norm separately (the paper's code clips w and
    log_alpha apart, so the large log_alpha gradients do not swamp the diff's); returns the norms."""
    return {g.get("name", str(i)): float(torch.nn.utils.clip_grad_norm_(g["params"], max_norm))
            for i, g in enumerate(groups)}
