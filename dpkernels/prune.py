"""Model-level diff pruning: gate a model, the L0 penalty, optimizer groups, projection.

``diff_prune(model)`` gates every pretrained parameter in place: each plain nn.Linear becomes a
DiffLinear; every other parameter (embeddings, LayerNorm, Linear subclasses whose weights other
code reads directly, Linears holding a tied tensor, ...) gets a GatedParameter parametrization, so
the model runs its own forward unchanged; a tied tensor is gated once, for all its names.
Parameters matching ``dense`` (the new task head) stay dense and trainable.

Projection (Guo et al. 2021, section 3.3): after L0 training keep the k = round(sparsity * N)
entries with the largest |z_eval * w| over all gated tensors of the model (scope="global", the
paper's rule) or k_t = round(sparsity * N_t) per tensor (scope="tensor"); the rest become exactly
zero and every layer enters the fixed-mask stage (DiffLinear.to_fixed_mask). Where fewer than k
entries are nonzero, the rest of the k are the closed entries of largest P(open) |w|.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Iterable

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from . import grouped
from .backends import load as load_backend
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
from .reference import l0_shift

_INF_BITS = 0x7F800000  # float32 +inf: every finite magnitude's bit pattern is below it


def _magnitude_bits(gt) -> torch.Tensor:
    """|z_eval * w| of one gated tensor as int32 bit patterns (monotone in the value for x >= 0)."""
    with torch.no_grad():
        mag = gt.eval_dense_delta().abs().float().reshape(-1)
    if not bool(torch.isfinite(mag).all()):
        raise ValueError("the diff holds NaN or infinite values; cannot project")
    return mag.view(torch.int32)


def _expected_magnitude_bits(gt) -> torch.Tensor:
    """P(z != 0) * |w| (times the group gate's P) of one gated tensor's entries whose z_eval * w is
    0, as int32 bit patterns; 0 at the entries z_eval * w keeps."""
    with torch.no_grad():
        shift = l0_shift(gt.l, gt.r, gt.beta)
        expected = torch.sigmoid(gt.log_alpha.float() - shift) * gt.diff.float().abs()
        if gt.group_log_alpha is not None:
            expected = expected * torch.sigmoid(gt.group_log_alpha.float() - shift)
        expected = expected.reshape(-1).masked_fill(_magnitude_bits(gt) > 0, 0.0)
    return expected.view(torch.int32)


def _select(gated, k: int) -> list[torch.Tensor]:
    """The projection's k entries over ``gated``: the largest |z_eval * w|; when fewer than k are
    nonzero (the gates closed more than N - k), all of those plus the closed entries of largest
    expected |z w| = P(open) |w|, rather than zeros picked in index order."""
    fns = [lambda gt=gt: _magnitude_bits(gt) for gt in gated]
    sizes = [gt.theta0.numel() for gt in gated]
    nonzero = sum(int((fn() > 0).sum()) for fn in fns)
    if nonzero >= k:
        return top_k_indices(fns, sizes, k)
    rest = top_k_indices([lambda gt=gt: _expected_magnitude_bits(gt) for gt in gated], sizes, k - nonzero)
    return [torch.cat([(fn() > 0).nonzero().reshape(-1), extra]).sort().values
            for fn, extra in zip(fns, rest, strict=True)]


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
    tensors = [gt for _, _, gt in gated]
    if scope == "global":
        kept = _select(tensors, round(sparsity * sum(gt.theta0.numel() for gt in tensors)))
    else:
        kept = [_select([gt], round(sparsity * gt.theta0.numel()))[0] for gt in tensors]
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
    grouped.install(model, _gate_owners(model))
    return model


def _gate_owners(model: nn.Module) -> list[tuple[nn.Module, object]]:
    """(DiffLinear, None) and (GatedParameter, its ParametrizationList) for every gate of the
    model, once each, in module order: what dpkernels.grouped groups."""
    owners, seen = [], set()
    for module in model.modules():
        if isinstance(module, DiffLinear):
            owners.append((module, None))
        for plist in getattr(module, "parametrizations", {}).values():
            for p in plist:
                if isinstance(p, GatedParameter) and id(p) not in seen:
                    seen.add(id(p))
                    owners.append((p, plist))
    return owners


def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    if not path:
        raise ValueError("diff_prune cannot replace the root module itself; wrap it in a container")
    parent_path, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, child, new)


def l0_penalty(model: nn.Module) -> torch.Tensor:
    """Sum of E[L0] over every gated tensor of the model (product form when structured), differentiable."""
    groups = getattr(model, "_dpkernels_gate_groups", None)
    if groups is not None:  # every tensor grouped (e.g. a deep narrow model on a CPU): no scan of the model
        total = groups.total_penalty(model, lambda m: [module for _, module, _ in iter_gated(m)])
        if total is not None:
            return total
    gated = [gt for _, _, gt in require_gated(model)]
    if any(grouped.is_dtensor(t) for gt in gated for t in gt.trainable()):
        raise ValueError("l0_penalty needs whole tensors but the gates are sharded (FSDP2); use the fused "
                         "L0 gradient instead: diff_prune(model, l0_lambda=...)")
    # The grouped tensors: their groups' terms from the model forward (dpkernels.grouped). The
    # others: one autograd node of multi-tensor ops per (device, dtype, gate constants) for the L0
    # stage's unstructured tensors, not a few ops and nodes per tensor; the rest per tensor.
    covered, terms = groups.penalties() if groups is not None else (set(), [])
    lists: dict[tuple, list[torch.Tensor]] = {}
    for gt in gated:
        if gt.log_alpha is not None and id(gt.log_alpha) in covered:
            continue
        if gt.fixed_mask or gt.group_log_alpha is not None:
            terms.append(gt.expected_l0())
        else:
            lists.setdefault((gt.log_alpha.device, gt.log_alpha.dtype, gt.l, gt.r, gt.beta), []).append(gt.log_alpha)
    for (_, _, l, r, beta), las in lists.items():
        terms.append(_ExpectedL0.apply(l0_shift(l, r, beta), *las))
    return torch.stack([t.to(terms[0].device) for t in terms]).sum()


class _ExpectedL0(torch.autograd.Function):
    """sum_t sum_i p_ti, p = sigmoid(log_alpha - shift), over a list of log_alphas, with no copy of
    the tensors: on a CPU one fused pass per tensor giving its sum and its slope p (1 - p) (the
    torch backend), else torch's multi-tensor (foreach) ops. The formulas of
    reference.expected_l0 and expected_l0_grad (the gradient g p (1 - p))."""

    @staticmethod
    def forward(ctx, shift: float, *log_alphas):
        with torch.no_grad():
            fused = [_fused_expected_l0(la, shift) for la in log_alphas]
            if all(f is not None for f in fused):
                ctx.slope = [slope for _, slope in fused]
                return torch.stack([total for total, _ in fused]).sum()
            p = torch._foreach_sigmoid(torch._foreach_add(list(log_alphas), -shift))
            ctx.slope = torch._foreach_mul(p, torch._foreach_add(torch._foreach_neg(p), 1.0))  # p (1 - p)
            return torch.stack(torch._foreach_norm(p, 1)).sum()  # (p >= 0: its L1 norm is its sum)

    @staticmethod
    @once_differentiable  # a gradient penalty through it raises instead of missing terms
    def backward(ctx, grad):
        return (None, *torch._foreach_mul(ctx.slope, grad))


def _fused_expected_l0(log_alpha: torch.Tensor, shift: float):
    return load_backend("torch").expected_l0_and_slope(log_alpha, shift) if log_alpha.device.type == "cpu" else None


def optimizer_groups(model: nn.Module, *, diff_lr: float = 1e-3, log_alpha_lr: float = 0.1,
                     dense_lr: float | None = None, weight_decay: float = 0.0) -> list[dict]:
    """Parameter groups for torch.optim (e.g. AdamW): "diff" (diff / fixed-mask values),
    "log_alpha" (elementwise and group gates, no weight decay) and "dense" (task head).

    Defaults follow the reference implementations of the paper's code: a separate optimizer
    state for log_alpha with learning rate 0.1 and w at 1e-3 (the paper's text gives only
    the penalty and the projection; it does not list these), and the gradient norms of w and
    log_alpha clipped separately (:func:`clip_grad_norms`). Empty groups are left out. A model
    without gated tensors is refused: its "dense" group would silently be full finetuning.
    Hundreds of small tensors: step them with :class:`dpkernels.AdamW` (what dpkernels' own loops
    do: torch's AdamW bit for bit, the grouped tensors stepped as one flat tensor per group).
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
    log_alpha apart, so the large log_alpha gradients do not swamp the diff's); returns the norms.
    torch's clip_grad_norm_ takes its multi-tensor path on CPU and CUDA tensors alike: one norm
    reduction and one scaling per group and device/dtype, whatever the number of tensors."""
    return {g.get("name", str(i)): float(torch.nn.utils.clip_grad_norm_(g["params"], max_norm))
            for i, g in enumerate(groups)}




class L0Target:
    """The L0 stage's penalty as a constraint: E[L0] / N driven to a target share, on any task.

    Why a fixed ``lambda * E[L0]`` in the loss does not carry from one dataset to another: the
    gates train with Adam, whose step on a log_alpha is ``lr * m / (sqrt(v) + eps)``: about +-lr
    whenever one sign dominates that gate's gradient, whatever the gradient's size. So (i) how far
    a gate can move in the stage is the sum of its learning rates, proportional to the stage's
    step count: at lr 0.1 with 10% warmup and linear decay, 75 steps (the embedded default's 2,400
    examples) move a gate at most ~3.75, just past alpha_init 3 (z_eval = 0 needs log_alpha <
    beta log(-l/r) = 0), and 55 steps (1,760 examples) at most 2.75: no gate can close, whatever
    lambda is; (ii) lambda acts only through its ratio to the task's gradient on each log_alpha
    and to Adam's eps (at 3e-7 on MiniLM the penalty's gradient per gate, lambda p (1 - p), is
    ~1e-8, eps's size), and both ratios move with the data, the model and the batch.

    The rule here works in Adam's own units, as AdamW decouples weight decay from the gradient:
    after each optimizer step every log_alpha is pushed down by ``lr * mu`` (lr: the log_alpha
    group's current rate), so a gate whose task gradient has no consistent sign (Adam's
    normalised step ~0) drifts shut at mu * lr a step, and one the task needs (a normalised step
    near +1) stays open while mu < 1: mu is a share of Adam's full step, one scale on every task
    and model. mu plays the Lagrange multiplier of the constraint S = E[L0] / N <= t(s) (as the
    multipliers of later L0 work do, e.g. Wang et al. 2020, Xia et al. 2022), set each step by a
    controller in logit space, where the constraint is linear in the push: the gates the task
    does not hold are one "sea" that moves together, and S ~ sigmoid(its log_alpha).

    * The target ``t(s)`` falls from the initial S_0 to ``target_fraction`` linearly in logit
      space over the first ``ramp`` of the stage's steps, then holds.
    * The push each step is the target's own logit step (feed-forward: what moves the sea with
      it) plus ``gain`` times the error ``logit(S) - logit(t)`` (feedback: the error shrinks by
      that share a step), as ``mu = push / lr`` clipped to [0, 2]. Gates the task holds open make S
      larger than the sea's share, so the sea is pushed deeper until E[L0] meets the target.

    With ``log_alpha_lr`` (a gate can travel from alpha_init to -4 in half of the stage, so the
    ramp needs mu ~ 0.66) the stage ends near its target whatever its length. The paper's lambda
    has no counterpart here: its 1.25e-7 on BERT-large's 335M entries weighs a dense diff at 42
    nats of loss, and what that closes depends on the task's gradients and the step count (our
    former default, 3e-7 on MiniLM, closed 63% of the gates in 75 steps and none in 55); the
    target is what this rule fixes instead (the pipeline's default: E[L0] = 4 k, the
    projection's k).

    Use: ``constraint.after_step(optimizer)`` after every ``optimizer.step()`` of the L0 stage
    (the optimizer holds the log_alpha params in a group named "log_alpha", as
    :func:`optimizer_groups` makes it); ``history`` records S, t and mu at each step.
    """

    def __init__(self, model: nn.Module, *, target_fraction: float, steps: int, ramp: float = 0.75,
                 gain: float = 0.2):
        if not 0 < target_fraction < 1:
            raise ValueError(f"target_fraction must be in (0, 1), got {target_fraction!r}")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be a whole number >= 1, got {steps!r}")
        if not 0 < ramp <= 1:
            raise ValueError(f"ramp must be in (0, 1], got {ramp!r}")
        if not 0 < gain <= 1:
            raise ValueError(f"gain must be in (0, 1], got {gain!r}")
        self.model = model
        self.total = sum(gt.theta0.numel() for _, _, gt in require_gated(model))
        self.target_fraction, self.steps, self.ramp, self.gain = float(target_fraction), steps, ramp, gain
        self.multiplier = 0.0
        self.step = 0
        self.start_fraction = self.fraction()
        self.history: list[dict[str, float]] = []

    def fraction(self) -> float:
        """S = E[L0] / N now."""
        with torch.no_grad():
            return float(l0_penalty(self.model)) / self.total

    def target(self, step: int) -> float:
        """t(step): the share of open gates the constraint allows after that many steps."""
        start = _clamp_share(self.start_fraction)
        done = min(1.0, step / (self.ramp * self.steps))
        return _sigmoid(_logit(start) + (_logit(self.target_fraction) - _logit(start)) * done)

    def after_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Set mu from the share of open gates after this step, then push every log_alpha down."""
        groups = [g for g in optimizer.param_groups if g.get("name") == "log_alpha"]
        if not groups:
            raise ValueError("the optimizer has no param group named 'log_alpha' (build it with optimizer_groups)")
        self.step += 1
        observed, target = self.fraction(), self.target(self.step)
        feed_forward = _logit(target) - _logit(self.target(self.step + 1))
        push = feed_forward + self.gain * (_logit(_clamp_share(observed)) - _logit(target))
        lr = groups[0]["lr"]
        self.multiplier = min(2.0, max(0.0, push / lr)) if lr > 0 else 0.0
        self.history.append({"step": self.step, "fraction": observed, "target": target,
                             "multiplier": self.multiplier})
        if self.multiplier > 0:
            with torch.no_grad():
                for group in groups:
                    torch._foreach_add_(list(group["params"]), -group["lr"] * self.multiplier)


def _clamp_share(p: float) -> float:
    return min(max(p, 1e-9), 1 - 1e-9)


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def log_alpha_lr(alpha_init: float, steps: int) -> float:
    """log_alpha's constant learning rate for an L0 stage of ``steps`` optimizer steps: Adam moves
    a gate by about lr a step, so this lets one go from alpha_init to -4 in half of the stage
    (:class:`L0Target` explains why the rate must scale with the stage)."""
    return 2.0 * (max(alpha_init, 0.0) + 4.0) / max(1, int(steps))
