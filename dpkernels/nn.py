"""Modules: DiffLinear, a drop-in nn.Linear with a frozen base and a hard-concrete-gated diff."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from . import ops

_GATE_DEFAULTS = dict(l=-1.5, r=1.5, beta=1.0, alpha_init=5.0, l0_lambda=0.0)


@dataclass
class GatedTensor:
    """One frozen base tensor of a module and its trainable diff, in either training stage.

    L0 stage: ``diff`` and ``log_alpha`` (dense, the base's shape); the eval-mode delta is
    ``eval_gates(log_alpha) * diff``. Fixed-mask stage (after ``dpkernels.project``): ``index``
    (sorted, unique flat indices into the base, int64 buffer) and ``values`` (the trainable delta
    at those entries, fp32). ``name`` is the base's attribute name on its module ("weight", "bias").
    """

    name: str
    theta0: torch.Tensor
    diff: torch.Tensor | None = None
    log_alpha: torch.Tensor | None = None
    index: torch.Tensor | None = None
    values: torch.Tensor | None = None

    @property
    def fixed_mask(self) -> bool:
        return self.index is not None

    def eval_delta(self, l: float = -1.5, r: float = 1.5) -> tuple[torch.Tensor, torch.Tensor]:
        """(sorted flat indices, fp32 values) of the eval-mode delta's nonzero entries."""
        with torch.no_grad():
            if self.fixed_mask:
                keep = self.values != 0
                return self.index[keep], self.values[keep].float()
            delta = (ops.eval_gates(self.log_alpha, l=l, r=r) * self.diff).reshape(-1)
            index = delta.nonzero().reshape(-1)
            return index, delta[index].float()


class DiffLinear(nn.Module):
    """y = x (weight + z * diff)^T + (bias + z_b * bias_diff); weight and bias frozen.

    Parameters (state_dict keys): ``weight`` and ``bias`` as in nn.Linear (frozen, requires_grad
    False) so a pretrained nn.Linear checkpoint loads into it, plus trainable ``diff``,
    ``log_alpha``, ``bias_diff``, ``bias_log_alpha`` (float32; float64 when the base is float64).
    A state_dict holding none of the four gate keys (an nn.Linear checkpoint) loads the base
    and leaves the gates as they are, even with strict=True.

    In training mode every forward draws a fresh seed from torch's default CPU generator (so
    ``torch.manual_seed`` makes runs reproducible; ``last_seed`` holds it for replay with
    ``dpkernels.sample_gates``); in eval mode the gates are the deterministic z_eval.
    ``l0_lambda > 0`` fuses l0_lambda * dE[L0]/dlog_alpha into every backward (then do not also
    add ``l0_lambda * layer.expected_l0()`` to the loss).
    """

    _GATE_NAMES = ("diff", "log_alpha", "bias_diff", "bias_log_alpha")
    _FIXED_NAMES = ("diff_index", "diff_values", "bias_diff_index", "bias_diff_values")

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, l: float = -1.5,
                 r: float = 1.5, beta: float = 1.0, alpha_init: float = 5.0, l0_lambda: float = 0.0,
                 device=None, dtype=None):
        super().__init__()
        ops.check_gate_config(l, r, beta)
        if not math.isfinite(alpha_init):
            raise ValueError(f"alpha_init must be finite, got {alpha_init}")
        if not (math.isfinite(l0_lambda) and l0_lambda >= 0):
            raise ValueError(f"l0_lambda must be finite and >= 0, got {l0_lambda}")
        self.in_features, self.out_features = in_features, out_features
        self.l, self.r, self.beta = float(l), float(r), float(beta)
        self.alpha_init, self.l0_lambda = float(alpha_init), float(l0_lambda)
        self.last_seed: int | None = None
        factory = dict(device=device, dtype=dtype)
        self.weight = nn.Parameter(torch.empty((out_features, in_features), **factory), requires_grad=False)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **factory), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self._init_gates()
        # Fixed-mask stage (set by dpkernels.project): sorted flat indices and trainable values.
        for prefix in ("", "bias_"):
            self.register_buffer(prefix + "diff_index", None)
            self.register_parameter(prefix + "diff_values", None)
        self.reset_parameters()

    def _init_gates(self) -> None:
        """(Re)create diff = 0 and log_alpha = alpha_init beside the current base tensors."""
        dtype = torch.float64 if self.weight.dtype == torch.float64 else torch.float32
        for base, diff_name, la_name in (("weight", "diff", "log_alpha"), ("bias", "bias_diff", "bias_log_alpha")):
            theta0 = getattr(self, base)
            if theta0 is None:
                self.register_parameter(diff_name, None)
                self.register_parameter(la_name, None)
                continue
            like = dict(dtype=dtype, device=theta0.device)
            setattr(self, diff_name, nn.Parameter(torch.zeros(theta0.shape, **like)))
            setattr(self, la_name, nn.Parameter(torch.full(theta0.shape, self.alpha_init, **like)))

    def reset_parameters(self) -> None:
        """nn.Linear's initialisation for the base; diff = 0, log_alpha = alpha_init."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features) if self.in_features > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)
        with torch.no_grad():
            for name in self._GATE_NAMES:
                p = getattr(self, name)
                if p is not None:
                    p.fill_(self.alpha_init if name.endswith("log_alpha") else 0.0)

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

    @property
    def fixed_mask(self) -> bool:
        """True after projection: the delta lives at fixed indices and there are no gates."""
        return self.diff_index is not None

    @torch.no_grad()
    def to_fixed_mask(self, index: torch.Tensor, bias_index: torch.Tensor | None = None) -> None:
        """Enter the fixed-mask stage: keep the eval-mode delta z_eval * diff at ``index`` (sorted
        unique flat indices into weight; ``bias_index`` likewise, None keeps no bias entry) as the
        trainable ``diff_values``; drop ``diff``/``log_alpha``. Build the optimizer afterwards."""
        if self.fixed_mask:
            raise ValueError("this DiffLinear is already in the fixed-mask stage")
        gated = self.gated_tensors()
        if bias_index is not None and len(gated) < 2:
            raise ValueError("bias_index given for a layer without a gated bias")
        for gt, idx in zip(gated, (index, bias_index), strict=False):
            prefix = "" if gt.name == "weight" else "bias_"
            idx = torch.as_tensor([] if idx is None else idx, dtype=torch.int64, device=gt.theta0.device).reshape(-1)
            ops.check_mask_index(prefix + "index", idx, gt.theta0.numel())
            delta = (ops.eval_gates(gt.log_alpha, l=self.l, r=self.r) * gt.diff).reshape(-1)[idx]
            self.register_parameter(prefix + "diff", None)
            self.register_parameter(prefix + "log_alpha", None)
            self.register_buffer(prefix + "diff_index", idx)
            self.register_parameter(prefix + "diff_values", nn.Parameter(delta))
        self._checked_index = self._index_state()

    def _index_state(self):
        return tuple((t.data_ptr(), t._version, t.numel()) for t in (self.diff_index, self.bias_diff_index)
                     if t is not None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fixed_mask:
            if getattr(self, "_checked_index", None) != self._index_state():  # e.g. after load_state_dict
                ops.check_mask_index("diff_index", self.diff_index, self.weight.numel())
                if self.bias_diff_index is not None:
                    ops.check_mask_index("bias_diff_index", self.bias_diff_index, self.bias.numel())
                self._checked_index = self._index_state()
            return ops.fixed_mask_linear(x, self.weight, self.bias, self.diff_index, self.diff_values,
                                         self.bias_diff_index, self.bias_diff_values, validate=False)
        seed = None
        if self.training:
            seed = int(torch.randint(0, (1 << 63) - 1, ()).item())  # CPU generator: no device sync
            self.last_seed = seed
        return ops.diff_linear(x, self.weight, self.bias, self.diff, self.log_alpha, self.bias_diff,
                               self.bias_log_alpha, seed=seed, training=self.training, l=self.l, r=self.r,
                               beta=self.beta, l0_lambda=self.l0_lambda)

    def gated_tensors(self) -> list[GatedTensor]:
        """The gated base tensors (weight, and bias when it has gates) with their diff state."""
        out = []
        for base, prefix in (("weight", ""), ("bias", "bias_")):
            theta0 = getattr(self, base)
            diff, index = getattr(self, prefix + "diff"), getattr(self, prefix + "diff_index")
            if theta0 is None or (diff is None and index is None):
                continue
            out.append(GatedTensor(base, theta0, diff, getattr(self, prefix + "log_alpha"), index,
                                   getattr(self, prefix + "diff_values")))
        return out

    def expected_l0(self) -> torch.Tensor:
        """E[L0] of all this layer's gates (weight and bias), differentiable; in the fixed-mask
        stage the (constant) number of mask entries."""
        if self.fixed_mask:
            return torch.tensor(float(sum(gt.index.numel() for gt in self.gated_tensors())))
        cfg = dict(l=self.l, r=self.r, beta=self.beta)
        total = ops.expected_l0(self.log_alpha, **cfg)
        if self.bias_log_alpha is not None:
            total = total + ops.expected_l0(self.bias_log_alpha, **cfg)
        return total

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        """An nn.Linear holding the eval-mode effective weights (base dtype), for merged inference."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device="meta", dtype=self.weight.dtype)
        merged = {gt.name: self._merged(gt) for gt in self.gated_tensors()}
        linear.weight = nn.Parameter(merged["weight"])
        if self.bias is not None:
            linear.bias = nn.Parameter(merged.get("bias", self.bias.clone()))
        return linear

    def _merged(self, gt: GatedTensor) -> torch.Tensor:
        """theta0 + eval-mode delta, in the base dtype."""
        if gt.fixed_mask:
            return ops.reference.masked_weight(gt.theta0, gt.index, gt.values)
        return ops.gate_apply(gt.theta0, gt.diff, gt.log_alpha, training=False, l=self.l, r=self.r)

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
                f"alpha_init={self.alpha_init}, l0_lambda={self.l0_lambda}")
        if self.fixed_mask:
            text += f", fixed_mask=True, nnz={sum(gt.index.numel() for gt in self.gated_tensors())}"
        return text


def iter_gated(model: nn.Module):
    """(full base-parameter name, module, GatedTensor) for every gated tensor of the model, in
    module order; modules take part by having a ``gated_tensors()`` method."""
    for path, module in model.named_modules():
        if callable(getattr(module, "gated_tensors", None)):
            for gt in module.gated_tensors():
                yield (f"{path}.{gt.name}" if path else gt.name), module, gt


def dense_task_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Trainable parameters that are not part of a gated diff (e.g. a new classifier head)."""
    gate_ids = {id(t) for _, _, gt in iter_gated(model) for t in (gt.diff, gt.log_alpha, gt.values) if t is not None}
    return {name: p for name, p in model.named_parameters() if p.requires_grad and id(p) not in gate_ids}
