"""Grouped gating: one gate pass per model forward (and one routing pass per backward) for the
small gated tensors of a diff-pruned model, instead of one or two per tensor.

A diff-pruned transformer has hundreds of small gated tensors (biases, LayerNorm weights, position
embeddings; on a CPU also small Linear weights); drawn one by one, their gates cost hundreds of
ATen ops each on a CPU (the eager Philox) and two launches plus autograd nodes each on a GPU,
which dominated the L0 stage's step. :func:`install` (called by ``diff_prune``) gives the model a
forward pre-hook that, per group, concatenates the members' theta0 (cached), diff and log_alpha
into flat buffers and runs one ``grouped_gate_forward`` pass; each member's effective tensor
theta0 + z * diff is a view of its output, which the module then uses instead of its own pass.
The backward is one ``grouped_gate_backward`` pass, split back into every member's gradients.
Parameters stay per tensor (state_dict, optimizers, SparseDiff, checkpoints are unchanged).

Members: an L0-stage, unstructured tensor with at most :data:`GROUP_MAX_NUMEL` elements (a
DiffLinear's weight -- then also its bias -- or bias; a GatedParameter). A group: the members of
one (device, dtype, gate constants, fused l0_lambda, train/eval mode). The fixed-mask stage's tensors
of that size likewise, per (device, values dtype, base dtype): one indexed write forward, one
gather backward (a DiffLinear in half precision or under autocast keeps its own path and its
sampled weight gradient's fp32 accumulation). Per tensor still: the structured
variant, larger tensors, a model sharded by FSDP2 (its hooks swap
the parameters) and any DTensor, and backends without grouped kernels (the CUDA extension: an
explicit ``DPKERNELS_BACKEND=cuda``; ``auto`` takes Triton on GPUs).

Checkpointing: the seeds and effective tensors stay on their modules until the next model
forward, so a checkpointed block recomputing its forward during the backward reads the same
gates, grouped or per tensor (non-reentrant and reentrant alike; tests/test_grouped.py). Memory:
the flat diff/log_alpha copies (and on a CPU the kept z and dz) of the grouped tensors, i.e. a
few bytes per small gated element.

Draws: every tensor keeps the draw it has per tensor; only where its seed comes from changes. At
the start of each training forward the model draws one seed per gate owner (a DiffLinear or a
GatedParameter) from torch's default CPU generator, all in one ``torch.randint``, in module order
(``model.modules()``), grouped or not, eagerly and under torch.compile alike (where the traced
modules then run their per-tensor custom ops with those seeds: the same gates). The owner's
``last_seed`` / ``seed`` holds it, and its tensors' gates are ``sample_gates(log_alpha, seed,
offset=o)`` with o = 0 for a weight or a GatedParameter and o = weight.numel() for a DiffLinear's
bias, as before. A module called on its own, outside a forward of the model, draws its own seed
and applies its gates per tensor, as before.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from . import ops, reference
from .backends import BackendUnavailable, select

# owner -> {prefix: effective tensor} of the latest model forward. Kept beside the modules, not on
# them: those tensors are autograd outputs (non-leaf), which deepcopy refuses.
_EFFECTIVE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_NONE: dict = {}

GROUP_MAX_NUMEL = 1 << 16  # larger tensors keep their own pass (a GPU DiffLinear weight: its fused GEMM)


# Resolved once: these checks run for every member on every forward.
try:
    from torch.distributed.tensor import DTensor as _DTensor
except ImportError:  # torch built without distributed support
    _DTensor = None
try:
    from torch.distributed.fsdp import FSDPModule as _FSDPModule
except ImportError:  # no distributed support, or a torch before FSDP2's public API
    _FSDPModule = None


# Bumped by every module, parameter and buffer registration in the process (torch's global
# registration hooks): l0_penalty takes the groups' terms alone only while no registration
# happened since the model forward that made them and since the groups' owners were checked to be
# every gate of the model.
_STRUCTURE = [0]


def _structure_changed(*_args) -> None:
    _STRUCTURE[0] += 1


_REGISTRATION_HOOKS = [getattr(torch.nn.modules.module, f"register_module_{kind}_registration_hook", None)
                       for kind in ("module", "parameter", "buffer")]
_TRACKS_STRUCTURE = all(_REGISTRATION_HOOKS)
if _TRACKS_STRUCTURE:
    for _register in _REGISTRATION_HOOKS:
        _register(_structure_changed)


def is_dtensor(t: torch.Tensor) -> bool:
    """A sharded tensor (FSDP2's DTensor): not concatenated with others, not summed whole."""
    return _DTensor is not None and isinstance(t, _DTensor)


def _fsdp_sharded(model: nn.Module) -> bool:
    """FSDP2 swaps a sharded module's parameters in its own pre-forward hooks: such a model's gates
    run per tensor (its sharded DTensors cannot be concatenated anyway)."""
    return _FSDPModule is not None and isinstance(model, _FSDPModule)


def _in_backward() -> bool:
    """True while the autograd engine runs a backward (a checkpointed block recomputing its forward
    there must reuse the model forward's gates). torch.utils.checkpoint asks the same question."""
    task_id = getattr(torch._C, "_current_graph_task_id", None)
    return task_id is not None and task_id() != -1


class _Member:
    """One grouped tensor: its owner (seed holder), the owner's attribute prefix, theta0, and its
    Philox counter base in the owner's draws."""

    __slots__ = ("owner", "prefix", "theta0", "diff", "log_alpha", "counter0")

    def __init__(self, owner, prefix, theta0, diff, log_alpha, counter0):
        self.owner, self.prefix, self.theta0, self.diff, self.log_alpha = owner, prefix, theta0, diff, log_alpha
        self.counter0 = counter0


class _Layout:
    """A group's fixed part, rebuilt only when its members or their bases change: the members,
    theta0 concatenated, each element's owner (its position among the model's gate owners, whose
    seeds the forward draws) and Philox counter."""

    def __init__(self, members: list[_Member], position: dict[int, int]):
        self.members = members
        first = members[0]
        self.training = first.owner.training
        self.l, self.r, self.beta = first.owner.l, first.owner.r, first.owner.beta
        self.l0_lambda = first.owner.l0_lambda
        self.shift = reference.l0_shift(self.l, self.r, self.beta)
        self.sizes = [m.diff.numel() for m in members]
        self.shapes = [m.diff.shape for m in members]
        device = first.diff.device
        with torch.no_grad():
            self.theta0 = torch.cat([m.theta0.detach().reshape(-1) for m in members])
        self.owner_index = torch.cat([torch.full((n,), position[id(m.owner)], dtype=torch.int32)
                                      for m, n in zip(members, self.sizes, strict=True)]).to(device)
        self.counters = torch.cat([torch.arange(n, dtype=torch.int64) + m.counter0
                                   for m, n in zip(members, self.sizes, strict=True)]).to(device)


def _split(flat: torch.Tensor, layout) -> tuple[torch.Tensor, ...]:
    """The members' tensors (views) of a group's flat buffer."""
    return tuple(part.view(shape) for part, shape in zip(flat.split(layout.sizes), layout.shapes, strict=True))


def _flatten(grads, layout, like: torch.Tensor) -> torch.Tensor:
    """The members' gradients in one flat buffer, zeros for a member without one."""
    return torch.cat([g.reshape(-1) if g is not None else like.new_zeros(n)
                      for g, n in zip(grads, layout.sizes, strict=True)])


class _GroupedGateApply(torch.autograd.Function):
    """Every member's theta0 + z * diff from one pass; one routing pass backward.

    Its last output is the group's E[L0] = sum sigmoid(log_alpha - l0_shift), which
    ``dpkernels.l0_penalty`` takes for the group's tensors: its gradient joins the routing pass
    (one gradient per log_alpha, not one from the gates and one from the penalty).

    The intermediates are kept as ctx attributes, not saved tensors (which autograd frees after
    the first backward through the node): under reentrant checkpointing the recomputed block's
    backward runs this node for the members used inside the block, and the outer backward runs it
    again for the rest. The routing is linear in the gradients, so the calls add up; the fused L0
    gradient is added once per member (``l0_due``)."""

    @staticmethod
    def forward(ctx, layout: _Layout, backend, seeds, *params):
        n = len(layout.members)
        diff = torch.cat([p.reshape(-1) for p in params[:n]])
        log_alpha = torch.cat([p.reshape(-1) for p in params[n:]])
        if ops._finite_check_default():
            ops.check_finite("log_alpha", log_alpha)
        ctx.layout, ctx.backend, ctx.diff, ctx.log_alpha, ctx.seeds = layout, backend, diff, log_alpha, seeds
        ctx.gates = None
        ctx.l0_due = [bool(layout.l0_lambda)] * n
        if layout.training and log_alpha.device.type == "cpu" and hasattr(backend, "grouped_gate_forward_keep"):
            # CPU: draw once, keep z and dz/dlog_alpha for the backward (the draw is most of a pass)
            out, z, dz, penalty = backend.grouped_gate_forward_keep(
                log_alpha, seeds, layout.owner_index, layout.counters, layout.l, layout.r, layout.beta, layout.theta0,
                diff, layout.theta0.dtype)
            ctx.gates = (z, dz)
        else:
            out = backend.grouped_gate_forward(log_alpha, seeds, layout.owner_index, layout.counters,
                                               layout.training, layout.l, layout.r, layout.beta, layout.theta0, diff,
                                               layout.theta0.dtype)
            penalty = torch.sigmoid(log_alpha - layout.shift).sum()
        return (*_split(out, layout), penalty)

    @staticmethod
    @once_differentiable  # no second derivative: a gradient penalty raises instead of being wrong
    def backward(ctx, *grads):
        layout, diff, log_alpha = ctx.layout, ctx.diff, ctx.log_alpha
        *grads, grad_penalty = grads
        used = [g is not None for g in grads]
        # The penalty's gradient g p (1 - p): in the pass as a constant where reading it costs no
        # sync (a CPU tensor), else added below.
        penalty_in_pass = grad_penalty is not None and grad_penalty.device.type == "cpu"
        penalty_weight = float(grad_penalty) if penalty_in_pass else 0.0
        flat = _flatten(grads, layout, diff)
        # The fused L0 gradient in the pass when every member with a gradient still owes it (always,
        # but under reentrant checkpointing); else added below to those that do.
        owed = [u and due for u, due in zip(used, ctx.l0_due, strict=True)]
        in_pass = all(due for u, due in zip(used, ctx.l0_due, strict=True) if u)
        l0_lambda = (layout.l0_lambda if in_pass else 0.0) + penalty_weight
        if ctx.gates is not None:  # the gates kept by the forward
            grad_diff, grad_la = ctx.backend.gate_backward_kept(flat, diff, log_alpha, *ctx.gates, layout.l, layout.r,
                                                                layout.beta, l0_lambda)
        else:
            grad_diff, grad_la = ctx.backend.grouped_gate_backward(
                flat, diff, log_alpha, ctx.seeds, layout.owner_index, layout.counters, layout.training, layout.l,
                layout.r, layout.beta, l0_lambda)
        if grad_penalty is not None and not penalty_in_pass:
            grad_la = grad_la + grad_penalty * reference.expected_l0_grad(log_alpha, l=layout.l, r=layout.r,
                                                                          beta=layout.beta)
        pieces = [list(t.split(layout.sizes)) for t in (grad_diff, grad_la)]
        if not in_pass:
            for i in (i for i, o in enumerate(owed) if o):
                pieces[1][i] = pieces[1][i] + layout.l0_lambda * reference.expected_l0_grad(
                    log_alpha.split(layout.sizes)[i], l=layout.l, r=layout.r, beta=layout.beta)
        ctx.l0_due = [due and not u for u, due in zip(used, ctx.l0_due, strict=True)]
        # A member whose effective tensor took no part in the loss gets no gradient (as per tensor).
        with_la = [u or grad_penalty is not None for u in used]
        out = [[p.view(shape) if u else None for p, shape, u in zip(part, layout.shapes, mask, strict=True)]
               for part, mask in zip(pieces, (used, with_la), strict=True)]
        return (None, None, None, *out[0], *out[1])


class _MaskMember:
    """One grouped tensor of the fixed-mask stage: theta0, its trainable values and their sorted
    flat indices (``<prefix>diff_values`` / ``<prefix>diff_index`` of the owner)."""

    __slots__ = ("owner", "prefix", "theta0", "values", "index")

    def __init__(self, owner, prefix, theta0, values, index):
        self.owner, self.prefix, self.theta0, self.values, self.index = owner, prefix, theta0, values, index


class _MaskLayout:
    """A fixed-mask group's fixed part: theta0 concatenated, the members' indices shifted into it
    (still sorted and unique), theta0 there."""

    def __init__(self, members: list[_MaskMember]):
        self.members = members
        self.sizes = [m.theta0.numel() for m in members]
        self.shapes = [m.theta0.shape for m in members]
        self.value_sizes = [m.values.numel() for m in members]
        starts = [0]
        for n in self.sizes[:-1]:
            starts.append(starts[-1] + n)
        with torch.no_grad():
            self.theta0 = torch.cat([m.theta0.detach().reshape(-1) for m in members])
            self.index = torch.cat([m.index + start for m, start in zip(members, starts, strict=True)])
            self.theta0_at = self.theta0[self.index]


class _GroupedMaskApply(torch.autograd.Function):
    """Every member's theta0 + scatter(index, values) from one indexed write (the fixed-mask stage's
    reference.masked_weight: the masked entries formed in the values' precision, rounded once to
    theta0's dtype); backward one gather of the gradient at the masked entries."""

    @staticmethod
    def forward(ctx, layout: _MaskLayout, *values):
        flat = torch.cat([v.reshape(-1) for v in values])
        out = layout.theta0.clone()
        out[layout.index] = (layout.theta0_at.to(flat.dtype) + flat).to(out.dtype)
        ctx.layout, ctx.dtype = layout, flat.dtype
        return _split(out, layout)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads):
        layout = ctx.layout
        flat = _flatten(grads, layout, layout.theta0)
        pieces = flat[layout.index].to(ctx.dtype).split(layout.value_sizes)
        return (None, *(p if g is not None else None for p, g in zip(pieces, grads, strict=True)))


class GateGroups:
    """The groups of one diff-pruned model (kept on it as ``_dpkernels_gate_groups``)."""

    def __init__(self, owners: list[tuple[nn.Module, object]]):
        # (DiffLinear, None) or (GatedParameter, its ParametrizationList: theta0 is its ``original``)
        self.owners = owners
        self.enabled = True
        self.active = False  # inside the model's forward
        self._no_seeds = torch.zeros(1, dtype=torch.int64)  # (eval gates take no draw)
        self._penalties: list[tuple] = []  # per group of the latest forward: (members, versions, E[L0])
        self._layouts: dict[tuple, tuple[tuple, _Layout]] = {}  # group key -> (members' signature, layout)
        self._all_grouped = False  # the latest forward: every owner's every gated tensor an L0 member
        self._member_count = 0
        self._forward_structure = -1  # _STRUCTURE at the latest forward
        self._owners_checked = -1  # _STRUCTURE when the owners were last found to be the model's gates

    def _members(self) -> dict[tuple, list[_Member]]:
        groups: dict[tuple, list[_Member]] = {}
        all_grouped = True  # (every gated tensor of every owner a member)
        for owner, plist in self.owners:
            params = owner._parameters  # (read directly: nn.Module.__getattr__ costs ~1 us a call)
            if owner.structured or owner._buffers.get("diff_index") is not None or params.get("diff") is None:
                all_grouped = False
                continue
            if plist is None:  # a DiffLinear: its weight (then its bias too) or its bias alone
                weight, bias = params["weight"], params.get("bias")
                found = [("", weight, 0), ("bias_", bias, weight.numel())]
                found = [f for f in found if f[1] is not None and params.get(f[0] + "diff") is not None]
                small = [f for f in found if f[1].numel() <= GROUP_MAX_NUMEL]
                all_grouped &= len(small) == len(found)
                found = small
            else:
                found = [("", plist.original, 0)] if owner.numel <= GROUP_MAX_NUMEL else []
                all_grouped &= bool(found)
            for prefix, theta0, counter0 in found:
                diff, la = params[prefix + "diff"], params[prefix + "log_alpha"]
                if is_dtensor(diff) or is_dtensor(theta0):
                    all_grouped = False
                    continue
                key = (diff.device, diff.dtype, theta0.dtype, owner.l, owner.r, owner.beta, owner.l0_lambda,
                       owner.training)
                groups.setdefault(key, []).append(_Member(owner, prefix, theta0, diff, la, counter0))
        self._all_grouped = all_grouped
        return groups

    def _mask_members(self) -> dict[tuple, list[_MaskMember]]:
        groups: dict[tuple, list[_MaskMember]] = {}
        for owner, plist in self.owners:
            params, buffers = owner._parameters, owner._buffers
            if buffers.get("diff_index") is None:
                continue
            if plist is None:  # a DiffLinear
                found = [("", params["weight"]), ("bias_", params.get("bias"))]
            else:
                found = [("", plist.original)]
            for prefix, theta0 in found:
                values, index = params.get(prefix + "diff_values"), buffers.get(prefix + "diff_index")
                if theta0 is None or values is None or theta0.numel() > GROUP_MAX_NUMEL or is_dtensor(values) \
                        or is_dtensor(theta0):
                    continue
                key = ("fixed", values.device, values.dtype, theta0.dtype)
                groups.setdefault(key, []).append(_MaskMember(owner, prefix, theta0, values, index))
        return groups

    def _cached(self, key, signature: tuple, build):
        """The group's layout, rebuilt by ``build()`` only when its members' signature changed."""
        cached = self._layouts.get(key)
        if cached is None or cached[0] != signature:
            cached = self._layouts[key] = (signature, build())
        return cached[1]

    def _mask_layout(self, key, members: list[_MaskMember]) -> _MaskLayout:
        signature = tuple((id(m.owner), m.prefix, id(m.values), m.theta0.data_ptr(), m.theta0._version,
                           m.index.data_ptr(), m.index._version, m.index.numel()) for m in members)
        return self._cached(key, signature, lambda: _MaskLayout(members))

    def _layout(self, key, members: list[_Member]) -> _Layout:
        # Rebuilt when a member, a parameter object or a base's data (pointer or version) changed.
        signature = tuple((id(m.owner), m.prefix, id(m.diff), id(m.log_alpha), m.theta0.data_ptr(),
                           m.theta0._version, m.diff.data_ptr()) for m in members)
        position = lambda: {id(owner): i for i, (owner, _) in enumerate(self.owners)}  # noqa: E731
        return self._cached(key, signature, lambda: _Layout(members, position()))

    def begin(self, model: nn.Module) -> None:
        """At the model forward's start: one seed per gate owner, then every group's gates, one pass each."""
        compiling = torch.compiler.is_compiling()
        if not compiling:
            self.clear()
        if not self.enabled or _fsdp_sharded(model):
            return
        seeds = None
        if model.training:
            # Every owner's seed at once, grouped or not, also under torch.compile (whose traced
            # modules then run their per-tensor custom ops with these seeds: the same gates).
            seeds = torch.randint(0, (1 << 63) - 1, (len(self.owners),), dtype=torch.int64)
            for (owner, _), seed in zip(self.owners, seeds.unbind(), strict=True):
                _set(owner, "_seed", seed, compiling)
                if "seed" in owner.__dict__:  # a GatedParameter
                    _set(owner, "seed", seed, compiling)
                _set(owner, "_seed_given", True, compiling)
        self.active = True
        if compiling:
            return
        self._forward_structure = _STRUCTURE[0]
        groups, masks = self._members(), self._mask_members()
        self._member_count = sum(len(members) for members in groups.values())
        self._layouts = {key: cached for key, cached in self._layouts.items() if key in groups or key in masks}
        for key, members in masks.items():
            effective = _GroupedMaskApply.apply(self._mask_layout(key, members), *(m.values for m in members))
            for m, eff in zip(members, effective, strict=True):
                _EFFECTIVE.setdefault(m.owner, {})[m.prefix] = eff
        for key, members in groups.items():
            try:
                backend = select("grouped_gate_apply", key[0], key[1], primitive="grouped_gate_forward")
            except BackendUnavailable:
                continue  # (an explicit DPKERNELS_BACKEND without grouped kernels): per tensor
            layout = self._layout(key, members)
            if layout.training and seeds is None:
                continue  # (a module in training mode inside a model in eval mode): per tensor
            params = [m.diff for m in members] + [m.log_alpha for m in members]
            *effective, penalty = _GroupedGateApply.apply(layout, backend, seeds if layout.training else self._no_seeds,
                                                          *params)
            self._penalties.append((members, tuple(m.log_alpha._version for m in members), penalty))
            for m, eff in zip(members, effective, strict=True):
                _EFFECTIVE.setdefault(m.owner, {})[m.prefix] = eff

    def end(self) -> None:
        self.active = False  # the seeds and effective tensors stay for a checkpointed block's recompute

    def clear(self) -> None:
        self._penalties = []
        for owner, _ in self.owners:
            _EFFECTIVE.pop(owner, None)
            owner.__dict__["_seed_given"] = False

    def penalties(self) -> tuple[set[int], list[torch.Tensor]]:
        """(ids of the log_alphas covered, their groups' E[L0] terms) from the latest model forward,
        for the groups whose log_alphas are unchanged since (no optimizer step in between) and
        still their owners' (no projection in between), and whose term is differentiable when
        gradients are on."""
        covered, terms = set(), []
        for members, versions, penalty in self._penalties:
            if penalty.grad_fn is None and torch.is_grad_enabled():
                continue  # (a forward under no_grad: the term would be a constant)
            if all(m.log_alpha._version == v and m.owner._parameters.get(m.prefix + "log_alpha") is m.log_alpha
                   for m, v in zip(members, versions, strict=True)):
                covered.update(id(m.log_alpha) for m in members)
                terms.append(penalty)
        return covered, terms

    def total_penalty(self, model: nn.Module, gate_owners) -> torch.Tensor | None:
        """The model's whole sum of E[L0] from the latest forward's group terms, when they cover
        every gated tensor of the model (``gate_owners(model)``: the model's gate owners, asked
        only after a registration of a module, parameter or buffer); else None."""
        if not (_TRACKS_STRUCTURE and self._all_grouped and self._forward_structure == _STRUCTURE[0]):
            return None
        if self._owners_checked != _STRUCTURE[0]:
            if {id(owner) for owner in gate_owners(model)} != {id(owner) for owner, _ in self.owners}:
                return None
            self._owners_checked = _STRUCTURE[0]
        covered, terms = self.penalties()
        if not terms or len(covered) != self._member_count:
            return None
        return torch.stack([t.to(terms[0].device) for t in terms]).sum()

    def __getstate__(self):  # (pickle, deepcopy) without the caches: layouts and the latest penalties
        return {**self.__dict__, "_layouts": {}, "_penalties": []}


def _set(owner: nn.Module, name: str, value, compiling: bool) -> None:
    if compiling:
        setattr(owner, name, value)  # (traced by dynamo)
    else:
        owner.__dict__[name] = value  # plain attributes: skip nn.Module.__setattr__, ~1 us a call


def _current(owner) -> bool:
    """Whether the model forward in progress (or the one a checkpointed block is recomputing in the
    backward) gave ``owner`` its seed and gates."""
    groups = owner._group_of
    if groups is None:
        return False
    if groups.active:
        return True
    return not torch.compiler.is_compiling() and _in_backward()


def seed_given(owner) -> bool:
    """True when ``owner`` must use the seed the model forward gave it instead of drawing one."""
    return owner.__dict__.get("_seed_given", False) and _current(owner)


def effective_tensors(owner) -> dict[str, torch.Tensor]:
    """``owner``'s grouped effective tensors of the latest model forward, by attribute prefix ("" for
    the weight or a GatedParameter's tensor, "bias_"), whether or not still current."""
    return dict(_EFFECTIVE.get(owner, _NONE))


def effective(owner, prefix: str) -> torch.Tensor | None:
    """The grouped effective tensor of ``owner``'s ``prefix`` tensor for this forward, or None (then
    the module runs its own pass): inside the model forward, or a checkpointed block's recompute."""
    if torch.compiler.is_compiling():  # (before the lookup: a traced read of it would be guarded on)
        return None
    eff = _EFFECTIVE.get(owner, _NONE).get(prefix)
    return eff if eff is not None and _current(owner) else None


def install(model: nn.Module, owners: list[tuple[nn.Module, object]]) -> GateGroups:
    """Group the gates of ``owners`` (see GateGroups) for every forward of ``model``."""
    groups = GateGroups(owners)
    for owner, _ in owners:
        owner._group_of = groups
    model._dpkernels_gate_groups = groups
    model.register_forward_pre_hook(_begin)
    model.register_forward_hook(_end, always_call=True)
    return groups


def _begin(model: nn.Module, _inputs) -> None:
    model._dpkernels_gate_groups.begin(model)


def _end(model: nn.Module, _inputs, _output) -> None:
    model._dpkernels_gate_groups.end()
