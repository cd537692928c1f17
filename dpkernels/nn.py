"""Modules: DiffLinear (a drop-in nn.Linear) and GatedParameter (a gated diff for any parameter).

Both hold, per frozen base tensor with prefix p ("" for weight, "bias_" for bias):

    L0 stage          p+diff, p+log_alpha (dense, fp32), p+group_log_alpha ((1,), structured only)
    fixed-mask stage  p+diff_index (sorted unique flat indices, int64 buffer), p+diff_values (fp32)

Structured diff pruning (Guo et al. 2021, section 3.2) adds a group gate z_g per tensor: the
effective gate is z_i z_g and the penalty sum_g p_g sum_{i in g} p_i. The group gate's draw is
(seed, numel of all the module's gated tensors + group number), after the elementwise draws.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from . import grouped, ops, reference

_GATE_DEFAULTS = dict(l=-1.5, r=1.5, beta=1.0, alpha_init=5.0, l0_lambda=0.0, structured=False)


@dataclass
class GatedTensor:
    """One frozen base tensor of a module and its trainable diff, in either training stage.

    L0 stage: ``diff``, ``log_alpha`` (and ``group_log_alpha`` when structured); the eval-mode
    delta is ``z_eval_g * eval_gates(log_alpha) * diff``. Fixed-mask stage (after
    ``dpkernels.project``): ``index`` (sorted, unique flat indices into the base, int64) and
    ``values`` (the trainable delta there, fp32). ``name`` is the base's parameter name on its
    module ("weight", "bias").
    """

    name: str
    theta0: torch.Tensor
    diff: torch.Tensor | None = None
    log_alpha: torch.Tensor | None = None
    index: torch.Tensor | None = None
    values: torch.Tensor | None = None
    group_log_alpha: torch.Tensor | None = None
    l: float = -1.5
    r: float = 1.5
    beta: float = 1.0

    @property
    def fixed_mask(self) -> bool:
        return self.index is not None

    def trainable(self) -> list[torch.Tensor]:
        return [t for t in (self.diff, self.log_alpha, self.group_log_alpha, self.values) if t is not None]

    def eval_dense_delta(self) -> torch.Tensor:
        """z_eval_g * z_eval * diff (L0 stage), the base's shape, no grad."""
        with torch.no_grad():
            delta = ops.eval_gates(self.log_alpha, l=self.l, r=self.r) * self.diff
            if self.group_log_alpha is not None:
                delta = delta * ops.eval_gates(self.group_log_alpha, l=self.l, r=self.r)
            return delta

    def eval_delta(self, l: float | None = None, r: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(sorted flat indices, fp32 values) of the eval-mode delta's nonzero entries."""
        if l is not None and (l, r) != (self.l, self.r):
            raise ValueError(f"gate constants ({l}, {r}) differ from this tensor's ({self.l}, {self.r})")
        with torch.no_grad():
            if self.fixed_mask:
                keep = self.values != 0
                return self.index[keep], self.values[keep].float()
            delta = self.eval_dense_delta().reshape(-1)
            index = delta.nonzero().reshape(-1)
            return index, delta[index].float()

    def expected_l0(self) -> torch.Tensor:
        """sum_i p_i (times p_g when structured); the mask size in the fixed-mask stage."""
        if self.fixed_mask:
            return torch.tensor(float(self.index.numel()), device=self.index.device)
        total = ops.expected_l0(self.log_alpha, l=self.l, r=self.r, beta=self.beta)
        if self.group_log_alpha is not None:
            total = total * ops.expected_l0(self.group_log_alpha, l=self.l, r=self.r, beta=self.beta)
        return total


def check_gate_options(l, r, beta, alpha_init, l0_lambda, structured) -> None:
    """ValueError for gate options no gated module takes (diff_prune checks them before it changes
    anything in a model)."""
    ops.check_gate_config(l, r, beta)
    if not math.isfinite(alpha_init):
        raise ValueError(f"alpha_init must be finite, got {alpha_init}")
    if not (math.isfinite(l0_lambda) and l0_lambda >= 0):
        raise ValueError(f"l0_lambda must be finite and >= 0, got {l0_lambda}")
    if structured and l0_lambda:
        raise ValueError("the fused l0_lambda gradient covers unstructured gates only; with structured=True "
                         "add dpkernels.l0_penalty(model) to the loss instead")


class _GatedModule(nn.Module):
    """Shared machinery: gate configuration, parameter creation, seeds, stage change."""

    def _configure(self, l, r, beta, alpha_init, l0_lambda, structured) -> None:
        check_gate_options(l, r, beta, alpha_init, l0_lambda, structured)
        self.l, self.r, self.beta = float(l), float(r), float(beta)
        self.alpha_init, self.l0_lambda, self.structured = float(alpha_init), float(l0_lambda), bool(structured)
        self._seed: torch.Tensor | None = None
        self._group_of = None  # the model's grouped.GateGroups, when diff_prune grouped this module's gates
        self._seed_given = False  # _seed drawn by the model forward (grouped.seed_given)
        ops.preload_backends()  # before any torch.compile trace, which cannot import them

    _BASE_NAMES: tuple[str, ...] = ()  # the frozen base parameters held here (DiffLinear's weight, bias)

    def _apply(self, fn, recurse=True):
        """As nn.Module's (.to, .half, .cuda, ...), but a cast to float16/bfloat16 leaves the gates
        (diff, log_alpha, the fixed-mask values) in float32: half-precision gates would lose small
        updates, and the kernels take float32 ones (float64 beside a float64 base)."""
        super()._apply(fn, recurse)
        for name, p in self._parameters.items():
            if p is not None and name not in self._BASE_NAMES and p.dtype in (torch.float16, torch.bfloat16):
                p.data = p.data.float()
                if p.grad is not None:
                    p.grad = p.grad.float()
        return self

    def _make_gates(self, prefix: str, theta0: torch.Tensor | None) -> None:
        """(Re)create diff = 0, log_alpha = alpha_init (and the group gate) for one base tensor."""
        names = (prefix + "diff", prefix + "log_alpha", prefix + "group_log_alpha")
        if theta0 is None:
            for name in names:
                self.register_parameter(name, None)
        else:
            like = dict(dtype=torch.float64 if theta0.dtype == torch.float64 else torch.float32, device=theta0.device)
            setattr(self, names[0], nn.Parameter(torch.zeros(theta0.shape, **like)))
            setattr(self, names[1], nn.Parameter(torch.full(theta0.shape, self.alpha_init, **like)))
            group = nn.Parameter(torch.full((1,), self.alpha_init, **like)) if self.structured else None
            self.register_parameter(names[2], group)
        # Fixed-mask stage, set by to_fixed_mask.
        self.register_buffer(prefix + "diff_index", None)
        self.register_parameter(prefix + "diff_values", None)

    def _gated(self, name: str, prefix: str, theta0: torch.Tensor | None) -> GatedTensor | None:
        diff, index = getattr(self, prefix + "diff"), getattr(self, prefix + "diff_index")
        if theta0 is None or (diff is None and index is None):
            return None
        return GatedTensor(name, theta0, diff, getattr(self, prefix + "log_alpha"), index,
                           getattr(self, prefix + "diff_values"), getattr(self, prefix + "group_log_alpha"),
                           self.l, self.r, self.beta)

    def _next_seed(self) -> torch.Tensor | None:
        """A fresh seed per training forward from torch's default CPU generator: an int64 CPU scalar
        tensor (no device sync, and no graph break or recompilation under torch.compile)."""
        if not self.training:
            return None
        if not grouped.seed_given(self):  # (the model forward's seed, see dpkernels.grouped)
            self._seed = torch.randint(0, (1 << 63) - 1, (), dtype=torch.int64)
        return self._seed

    @property
    def last_seed(self) -> int | None:
        """The seed of the latest training forward, for replay with dpkernels.sample_gates."""
        return None if self._seed is None else int(self._seed)

    def _scaled_diff(self, gt: GatedTensor, seed: torch.Tensor | None, group: int, n_elements: int) -> torch.Tensor:
        """diff, times the group gate z_g when structured (draw (seed, n_elements + group))."""
        if gt.group_log_alpha is None:
            return gt.diff
        z_g = ops.group_gate(gt.group_log_alpha, seed, n_elements + group, training=self.training, l=self.l,
                             r=self.r, beta=self.beta)
        return gt.diff * z_g.to(gt.diff.dtype)

    @torch.no_grad()
    def _enter_fixed_stage(self, prefix: str, gt: GatedTensor, index) -> None:
        """Keep the eval-mode delta at ``index`` as trainable values; drop the gates."""
        index = torch.as_tensor([] if index is None else index, dtype=torch.int64, device=gt.diff.device)
        index = index.reshape(-1)
        ops.check_mask_index(prefix + "index", index, gt.diff.numel())
        values = gt.eval_dense_delta().reshape(-1)[index]
        for name in ("diff", "log_alpha", "group_log_alpha"):
            self.register_parameter(prefix + name, None)
        self.register_buffer(prefix + "diff_index", index)
        self.register_parameter(prefix + "diff_values", nn.Parameter(values))

    def expected_l0(self) -> torch.Tensor:
        """E[L0] of this module's gates, differentiable (the paper's product form when structured);
        in the fixed-mask stage the (constant) number of mask entries."""
        terms = [gt.expected_l0() for gt in self.gated_tensors()]
        return torch.stack(terms).sum() if terms else torch.zeros(())


class DiffLinear(_GatedModule):
    """y = x (weight + z * diff)^T + (bias + z_b * bias_diff); weight and bias frozen.

    Parameters (state_dict keys): ``weight`` and ``bias`` as in nn.Linear (frozen, requires_grad
    False) so a pretrained nn.Linear checkpoint loads into it, plus trainable ``diff``,
    ``log_alpha``, ``bias_diff``, ``bias_log_alpha`` (float32; float64 when the base is float64)
    and, when ``structured``, ``group_log_alpha``/``bias_group_log_alpha``. A state_dict holding
    none of the gate keys (an nn.Linear checkpoint) loads the base and leaves the gates as they
    are, even with strict=True.

    In training mode every forward draws a fresh seed from torch's default CPU generator (so
    ``torch.manual_seed`` makes runs reproducible; ``last_seed`` holds it for replay with
    ``dpkernels.sample_gates``); in eval mode the gates are the deterministic z_eval.
    ``l0_lambda > 0`` fuses l0_lambda * dE[L0]/dlog_alpha into every backward (then do not also
    add ``l0_lambda * layer.expected_l0()`` to the loss). It is added as is, so it equals that
    penalty term only when each backward carries the loss unscaled: under loss scaling (an fp16
    GradScaler multiplies the loss by S) or gradient accumulation over k backwards, scale it alike
    (l0_lambda * S / k) or add the penalty term instead. After ``dpkernels.project`` the layer
    trains ``diff_values`` at fixed indices (``fixed_mask``), with the weight gradient computed
    only there. Unlike nn.Linear, no second derivatives: a backward through the backward (e.g. a
    gradient penalty) raises.
    """

    _BASE_NAMES = ("weight", "bias")
    _GATE_NAMES = ("diff", "log_alpha", "group_log_alpha", "bias_diff", "bias_log_alpha", "bias_group_log_alpha")
    _FIXED_NAMES = ("diff_index", "diff_values", "bias_diff_index", "bias_diff_values")

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, l: float = -1.5,
                 r: float = 1.5, beta: float = 1.0, alpha_init: float = 5.0, l0_lambda: float = 0.0,
                 structured: bool = False, device=None, dtype=None):
        super().__init__()
        self._configure(l, r, beta, alpha_init, l0_lambda, structured)
        self.in_features, self.out_features = in_features, out_features
        factory = dict(device=device, dtype=dtype)
        self.weight = nn.Parameter(torch.empty((out_features, in_features), **factory), requires_grad=False)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **factory), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self._init_gates()
        self.reset_parameters()

    def _init_gates(self) -> None:
        self._make_gates("", self.weight)
        self._make_gates("bias_", self.bias)

    def reset_parameters(self) -> None:
        """nn.Linear's initialisation for the base; fresh gates (diff = 0, log_alpha = alpha_init)."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features) if self.in_features > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)
        self._init_gates()

    @classmethod
    def from_linear(cls, linear: nn.Linear, **gate_kwargs) -> DiffLinear:
        """Wrap a pretrained nn.Linear: its weight/bias become the frozen base (shared, not copied)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        unknown = set(gate_kwargs) - set(_GATE_DEFAULTS)
        if unknown:
            raise TypeError(f"unknown gate options {sorted(unknown)}; expected some of {sorted(_GATE_DEFAULTS)}")
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta",
                    dtype=linear.weight.dtype, **gate_kwargs)
        layer.weight = nn.Parameter(linear.weight.detach(), requires_grad=False)
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
        layer._init_gates()
        return layer.train(linear.training)

    def gated_tensors(self) -> list[GatedTensor]:
        """The gated base tensors (weight, and bias when it has gates) with their diff state."""
        found = (self._gated("weight", "", self.weight), self._gated("bias", "bias_", self.bias))
        return [gt for gt in found if gt is not None]

    @property
    def fixed_mask(self) -> bool:
        """True after projection: the delta lives at fixed indices and there are no gates."""
        return self.diff_index is not None

    def to_fixed_mask(self, index: torch.Tensor, bias_index: torch.Tensor | None = None) -> None:
        """Enter the fixed-mask stage: keep the eval-mode delta at ``index`` (sorted unique flat
        indices into weight; ``bias_index`` likewise, None keeps no bias entry) as the trainable
        ``diff_values``; drop the gates. Build the optimizer afterwards."""
        if self.fixed_mask:
            raise ValueError("this DiffLinear is already in the fixed-mask stage")
        gated = self.gated_tensors()
        if bias_index is not None and len(gated) < 2:
            raise ValueError("bias_index given for a layer without a gated bias")
        for gt, idx in zip(gated, (index, bias_index), strict=False):
            self._enter_fixed_stage("" if gt.name == "weight" else "bias_", gt, idx)
        self._checked_index = self._index_state()

    def set_masks(self, indices: dict[str, torch.Tensor]) -> None:
        """to_fixed_mask from {"weight": index, "bias": index} (what dpkernels.project passes)."""
        self.to_fixed_mask(indices["weight"], indices.get("bias"))

    def _index_state(self):
        return tuple((t.data_ptr(), t._version, t.numel()) for t in (self.diff_index, self.bias_diff_index)
                     if t is not None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fixed_mask:
            # The grouped effective weight where autograd's dW is as precise as the sampled
            # gradient's fp32 accumulation: fp32/fp64 compute, no autocast.
            weight = grouped.effective(self, "")
            if (weight is not None and x.dtype == weight.dtype and weight.dtype in (torch.float32, torch.float64)
                    and not torch.is_autocast_enabled(x.device.type)):
                bias = grouped.effective(self, "bias_")  # (formed by the model forward's grouped pass)
                return nn.functional.linear(x, weight, self.bias if bias is None else bias)
            # Indices are checked when they are set (to_fixed_mask) and again in eager mode whenever
            # they changed since (load_state_dict, say); a compiled graph cannot read data_ptr.
            if not torch.compiler.is_compiling() and getattr(self, "_checked_index", None) != self._index_state():
                ops.check_mask_index("diff_index", self.diff_index, self.weight.numel())
                if self.bias_diff_index is not None:
                    ops.check_mask_index("bias_diff_index", self.bias_diff_index, self.bias.numel())
                self._checked_index = self._index_state()
            return ops.fixed_mask_linear(x, self.weight, self.bias, self.diff_index, self.diff_values,
                                         self.bias_diff_index, self.bias_diff_values, validate=False)
        weight, bias = grouped.effective(self, ""), grouped.effective(self, "bias_")
        if weight is not None:  # the model forward's grouped pass formed both (see dpkernels.grouped)
            return nn.functional.linear(x, weight, self.bias if bias is None else bias)
        if bias is not None:  # the bias's gates grouped; the weight's drawn with the seed the group set
            return ops.diff_linear(x, self.weight, bias, self.diff, self.log_alpha, seed=self._seed,
                                   training=self.training, l=self.l, r=self.r, beta=self.beta,
                                   l0_lambda=self.l0_lambda)
        seed = self._next_seed()
        gated = self.gated_tensors()
        n_elements = sum(gt.theta0.numel() for gt in gated)
        diffs = [self._scaled_diff(gt, seed, g, n_elements) for g, gt in enumerate(gated)]
        bias_diff = diffs[1] if len(diffs) > 1 else None
        return ops.diff_linear(x, self.weight, self.bias, diffs[0], self.log_alpha, bias_diff, self.bias_log_alpha,
                               seed=seed, training=self.training, l=self.l, r=self.r, beta=self.beta,
                               l0_lambda=self.l0_lambda)

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        """An nn.Linear holding the eval-mode effective weights (base dtype), for merged inference."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device="meta", dtype=self.weight.dtype)
        merged = {gt.name: _merged(gt) for gt in self.gated_tensors()}
        linear.weight = nn.Parameter(merged["weight"])
        if self.bias is not None:
            linear.bias = nn.Parameter(merged.get("bias", self.bias.clone()))
        return linear

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        gate_keys = [prefix + n for n in self._GATE_NAMES + self._FIXED_NAMES if getattr(self, n) is not None]
        linear_checkpoint = not any(k in state_dict for k in gate_keys)
        first_new = len(missing_keys)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if linear_checkpoint:  # an nn.Linear checkpoint: the gates keep their values
            missing_keys[first_new:] = [k for k in missing_keys[first_new:] if k not in gate_keys]

    def extra_repr(self) -> str:
        text = (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, l={self.l}, r={self.r}, beta={self.beta}, "
                f"alpha_init={self.alpha_init}, l0_lambda={self.l0_lambda}, structured={self.structured}")
        if self.fixed_mask:
            text += f", fixed_mask=True, nnz={sum(gt.index.numel() for gt in self.gated_tensors())}"
        return text


def _merged(gt: GatedTensor) -> torch.Tensor:
    """theta0 + eval-mode delta, formed in the diff's precision and rounded once to the base dtype."""
    if gt.fixed_mask:
        return reference.masked_weight(gt.theta0, gt.index, gt.values)
    delta = gt.eval_dense_delta()
    return (gt.theta0.to(delta.dtype) + delta).to(gt.theta0.dtype)


class GatedParameter(_GatedModule):
    """A parametrization (torch.nn.utils.parametrize) that gates any parameter of any module.

    ``module.<name>`` becomes theta0 + z * diff (L0 stage) or theta0 + scatter(index, values)
    (fixed-mask stage), recomputed at each access; theta0 (the parametrization's ``original``)
    is frozen. The seed is drawn at the start of each forward of the owning module (a forward
    pre-hook installed by :func:`gate_parameter`), so every access inside one forward sees the
    same gates. A fused ``l0_lambda`` gradient is added once per access's backward.

    A tied parameter (one tensor several modules hold, e.g. GPT-2's embedding and LM head) is
    gated by one GatedParameter registered on every module holding it (``gate_parameter(...,
    gate=...)``), so every use reads the same theta0 + z * diff and the gradients of all uses add
    up in its one diff and log_alpha. Such a ``shared`` gate draws its seed once per forward of
    the diff-pruned model (:func:`share_gates_per_forward`), not per owning module, and adds a
    fused ``l0_lambda`` gradient once per such forward.
    """

    def __init__(self, theta0: torch.Tensor, *, l=-1.5, r=1.5, beta=1.0, alpha_init=5.0, l0_lambda=0.0,
                 structured=False):
        super().__init__()
        self._configure(l, r, beta, alpha_init, l0_lambda, structured)
        self.numel = theta0.numel()
        self._make_gates("", theta0)
        self.seed: torch.Tensor | None = None  # this forward's seed (an int64 CPU scalar), drawn by the pre-hook
        self.shared = False  # registered on several modules (a tied parameter): see share_gates_per_forward
        self.in_model_forward = False  # a shared gate inside the model's forward: one seed for every use
        self._l0_due = False  # a shared gate's fused L0 gradient not yet added in this model forward

    def gated_tensor(self, name: str, theta0: torch.Tensor) -> GatedTensor:
        return self._gated(name, "", theta0)

    @property
    def fixed_mask(self) -> bool:
        return self.diff_index is not None

    def draw_seed(self) -> None:
        self.seed = self._next_seed()

    def begin_model_forward(self) -> None:
        """A shared gate at the start of the diff-pruned model's forward: one seed for all its uses."""
        self.draw_seed()
        self.in_model_forward, self._l0_due = True, True

    def end_model_forward(self) -> None:
        self.in_model_forward = False

    def _fused_l0_lambda(self) -> float:
        """The l0_lambda this access adds to its backward: within one model forward a shared gate adds
        it on its first access only, so that its tensor's L0 gradient counts once, as in l0_penalty."""
        if not self.in_model_forward:
            return self.l0_lambda
        l0_lambda, self._l0_due = (self.l0_lambda if self._l0_due else 0.0), False
        return l0_lambda

    def set_masks(self, indices: dict[str, torch.Tensor]) -> None:
        """Enter the fixed-mask stage with the one index tensor given (see DiffLinear.to_fixed_mask)."""
        if self.fixed_mask:
            raise ValueError("this GatedParameter is already in the fixed-mask stage")
        (index,) = indices.values()
        # theta0 lives in the parametrization list, not here; the diff has its shape and device.
        self._enter_fixed_stage("", self._gated("", "", self.diff), index)

    def forward(self, theta0: torch.Tensor) -> torch.Tensor:
        effective = grouped.effective(self, "")
        if effective is not None:  # (formed by the model forward's grouped pass, either stage)
            return effective
        if self.fixed_mask:
            flat = theta0.reshape(-1).to(self.diff_values.dtype).index_add(0, self.diff_index, self.diff_values)
            return flat.to(theta0.dtype).view(theta0.shape)
        if self.training and self.seed is None:
            self.draw_seed()
        gt = self._gated("", "", theta0)
        diff = self._scaled_diff(gt, self.seed, 0, self.numel)
        return ops.gate_apply(theta0, diff, self.log_alpha, seed=self.seed, training=self.training, l=self.l,
                              r=self.r, beta=self.beta, l0_lambda=self._fused_l0_lambda())

    def extra_repr(self) -> str:
        return (f"numel={self.numel}, l={self.l}, r={self.r}, beta={self.beta}, structured={self.structured}"
                + (", shared=True" if self.shared else "")
                + (f", fixed_mask=True, nnz={self.diff_index.numel()}" if self.fixed_mask else ""))


def gate_parameter(module: nn.Module, name: str, *, gate: GatedParameter | None = None,
                   **gate_kwargs) -> GatedParameter:
    """Gate ``module.<name>`` (any parameter) with a GatedParameter parametrization.

    ``gate``: an existing GatedParameter of the same tensor, registered on another module that
    holds it too (a tied parameter), to share instead of a new one (then no gate options).
    """
    from torch.nn.utils import parametrize

    theta0 = getattr(module, name)
    if not isinstance(theta0, nn.Parameter):
        raise TypeError(f"{type(module).__name__}.{name} is not a parameter")
    if gate is None:
        gate = GatedParameter(theta0.detach(), **gate_kwargs)
    elif gate_kwargs:
        raise TypeError("gate_parameter takes gate options or an existing gate to share, not both")
    elif not isinstance(gate, GatedParameter) or gate.fixed_mask or gate.diff.shape != theta0.shape:
        raise ValueError(f"{type(module).__name__}.{name} {tuple(theta0.shape)} cannot share that gate: it must be "
                         "an L0-stage GatedParameter of the same tensor")
    theta0.requires_grad_(False)
    parametrize.register_parametrization(module, name, gate, unsafe=True)
    if not getattr(module, "_dpkernels_seed_hook", False):
        module.register_forward_pre_hook(_draw_gate_seeds)
        module._dpkernels_seed_hook = True
    return gate


def _draw_gate_seeds(module: nn.Module, _inputs) -> None:
    for plist in module.parametrizations.values():
        for p in plist:
            # A shared gate inside the model's forward already has that forward's seed, and so has
            # any gate of a diff-pruned model's forward (dpkernels.grouped); a module called on its
            # own draws a fresh one.
            if isinstance(p, GatedParameter) and p.training and not p.in_model_forward and not grouped.seed_given(p):
                p.draw_seed()


def share_gates_per_forward(model: nn.Module, gates: list[GatedParameter]) -> None:
    """Give each of ``gates`` (a tied parameter's gate, registered on several modules of ``model``)
    one seed per forward of ``model``, shared by every use of the tensor inside it: its modules'
    own pre-hooks would draw one per module, so GPT-2's LM head would read another mask than its
    embedding. Forward hooks of ``model`` (the list of gates is kept on it, so a deepcopy of the
    model refers to its own gates) mark the forward's start and end, also when it raises."""
    for gate in gates:
        gate.shared = True
    model._dpkernels_shared_gates = list(gates)
    model.register_forward_pre_hook(_begin_model_forward, prepend=True)
    model.register_forward_hook(_end_model_forward, always_call=True)


def _begin_model_forward(model: nn.Module, _inputs) -> None:
    for gate in model._dpkernels_shared_gates:
        gate.begin_model_forward()


def _end_model_forward(model: nn.Module, _inputs, _output) -> None:
    for gate in model._dpkernels_shared_gates:
        gate.end_model_forward()


def require_gated(model: nn.Module, why: str = "") -> list:
    """``list(iter_gated(model))``, or a ValueError when the model has no gated tensors (never
    diff-pruned); ``why`` says in the message what the caller would otherwise get wrong."""
    gated = list(iter_gated(model))
    if not gated:
        raise ValueError(f"the model has no gated tensors{why}: diff_prune it first")
    return gated


def iter_gated(model: nn.Module):
    """(full base-parameter name, module owning the gates, GatedTensor) for every gated tensor of the
    model, in module order. DiffLinear-like modules take part through ``gated_tensors()``;
    parametrized parameters through their GatedParameter (named after the parameter itself).

    A tied parameter's one GatedParameter, registered on every module holding the tensor, is
    yielded once, under the tensor's canonical name: its first name in ``named_parameters()``
    order, which is the name ``named_parameters()`` gives the tied tensor (transformers' ties keep
    the input embedding's: GPT-2's ``transformer.wte.weight``, T5's ``shared.weight``)."""
    seen: set[int] = set()
    for path, module in model.named_modules():
        prefix = f"{path}." if path else ""
        # Class and _modules lookups: nn.Module.__getattr__'s miss (an exception) per module is slow.
        if callable(getattr(type(module), "gated_tensors", None)):
            for gt in module.gated_tensors():
                yield prefix + gt.name, module, gt
        for pname, plist in (module._modules.get("parametrizations") or {}).items():
            for p in plist:
                if isinstance(p, GatedParameter) and id(p) not in seen:
                    seen.add(id(p))
                    yield prefix + pname, p, p.gated_tensor(pname, plist.original)


def gate_parameter_ids(model: nn.Module) -> set[int]:
    """ids of every trainable diff-pruning tensor (diff, log_alpha, group gate, fixed-mask values)."""
    return {id(t) for _, _, gt in iter_gated(model) for t in gt.trainable()}


def dense_task_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Trainable parameters that are not part of a gated diff (e.g. a new classifier head)."""
    gate_ids = gate_parameter_ids(model)
    return {name: p for name, p in model.named_parameters() if p.requires_grad and id(p) not in gate_ids}
