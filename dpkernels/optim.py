"""AdamW for diff-pruned models: torch's AdamW, bit for bit, in a few flat passes per step.

A diff-pruned model trains two tensors (diff, log_alpha) per gated tensor, most of them small:
torch's AdamW steps each with ~10 elementwise ops (on a CPU its foreach path is the same loop), so
on a deep model the optimizer's per-tensor dispatch and its ~20 memory passes cost as much as the
forward. The update is elementwise with scalars shared by a parameter group, so running it on a
concatenation of the tensors gives every element exactly the bits it gets tensor by tensor.

:class:`AdamW` finds, per parameter group, the runs of parameters whose gradients already lie
back to back in one buffer (the grouped routing pass of ``dpkernels.grouped`` hands out every
member's gradient as a view of one flat tensor) and steps each run as one tensor: its exp_avg and
exp_avg_sq live in one flat buffer (the per-parameter state holds views of it, so state_dict,
checkpoints and load_state_dict keep their format; a loaded state is copied into a new flat buffer
at the next step), its gradient is read in place, and the parameters take the update with one
multi-tensor add. Every other parameter (a run of one, a gradient of its own, an option the flat
path does not cover: amsgrad, maximize, capturable, differentiable, fused, a tensor lr, complex or
sparse tensors, a DTensor) is stepped by torch's own AdamW in the same call.

Bits: the flat path applies torch's single-tensor ops in torch's order (``lerp_``, ``mul_``,
``addcmul_``, ``sqrt``, division, ``add_`` and the ``addcdiv_`` split into its two roundings), and
ATen's elementwise CPU and CUDA kernels give an element the same result wherever it sits in a
tensor, so the result equals ``torch.optim.AdamW(..., foreach=False)`` bit for bit
(tests/test_optim.py; on a CPU also ``foreach=True``, which loops the same kernels).
"""

from __future__ import annotations

import torch
from torch.optim.optimizer import _get_scalar_dtype

from .grouped import is_dtensor

# Group options the flat path implements as torch does; any other value steps the group with torch.
_FLAT_OPTIONS = dict(amsgrad=False, maximize=False, capturable=False, differentiable=False)


def _flat_view(first: torch.Tensor, numel: int) -> torch.Tensor:
    """``numel`` elements of ``first``'s storage from ``first``'s start, as one 1-d tensor."""
    return torch.empty(0, dtype=first.dtype, device=first.device).set_(
        first.untyped_storage(), first.storage_offset(), (numel,))


def _flat_ready(p: torch.Tensor) -> bool:
    """Whether the flat path can step ``p`` (with its current gradient)."""
    g = p.grad
    return (g is not None and not g.is_sparse and p.is_floating_point() and g.dtype == p.dtype and p.is_contiguous()
            and g.is_contiguous() and not is_dtensor(p))


def _grad_runs(params: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """The runs (of two or more) of ``params`` whose contiguous gradients follow each other in one
    storage, in storage order."""
    by_storage: dict[tuple, list[torch.Tensor]] = {}
    for p in params:
        if _flat_ready(p):
            by_storage.setdefault((p.grad.untyped_storage().data_ptr(), p.dtype, p.device), []).append(p)
    runs = []
    for group in by_storage.values():
        group.sort(key=lambda p: p.grad.data_ptr())
        run = [group[0]]
        for p in group[1:]:
            prev = run[-1]
            if p.grad.data_ptr() == prev.grad.data_ptr() + prev.numel() * prev.element_size():
                run.append(p)
            else:
                runs.append(run)
                run = [p]
        runs.append(run)
    return [r for r in runs if len(r) > 1]


def _same_step_runs(params: list[torch.Tensor], state) -> list[list[torch.Tensor]]:
    """``params`` cut where the step count changes (a parameter that missed a gradient lags behind
    its neighbours from then on), the pieces of two or more."""
    runs, last = [], None
    for p in params:
        steps = float(state[p]["step"]) if len(state[p]) else 0.0
        if steps != last:
            runs.append([])
            last = steps
        runs[-1].append(p)
    return [r for r in runs if len(r) > 1]


class _Run:
    """Parameters stepped as one tensor: in gradient order, with flat exp_avg, exp_avg_sq and step
    counts (the per-parameter state holds views of them) and a flat update buffer with a view per
    parameter (made once: a view costs ~3 us, hundreds of them a step would undo the gain)."""

    __slots__ = ("group_params", "group_len", "params", "numel", "offsets", "exp_avg", "exp_avg_sq", "steps", "step",
                 "update", "update_views", "state_views")

    def __init__(self, group_params: list, params: list[torch.Tensor], state):
        self.group_params, self.group_len = group_params, len(group_params)
        self.params = params
        sizes = [p.numel() for p in params]
        self.numel = sum(sizes)
        self.offsets = [0]
        for n in sizes[:-1]:
            self.offsets.append(self.offsets[-1] + n * params[0].element_size())
        with torch.no_grad():
            for p in params:  # torch's lazy state (Adam._init_group) for a parameter never stepped
                if len(state[p]) == 0:
                    state[p]["step"] = torch.tensor(0.0, dtype=_get_scalar_dtype())
                    state[p]["exp_avg"] = torch.zeros_like(p)
                    state[p]["exp_avg_sq"] = torch.zeros_like(p)
            self.exp_avg = torch.cat([state[p]["exp_avg"].reshape(-1) for p in params])
            self.exp_avg_sq = torch.cat([state[p]["exp_avg_sq"].reshape(-1) for p in params])
            self.steps = torch.stack([state[p]["step"] for p in params])
        self.step = float(self.steps[0])
        self.update = torch.empty_like(self.exp_avg)
        self.update_views = [u.view(p.shape) for u, p in zip(self.update.split(sizes), params, strict=True)]
        for p, m, v, s in zip(params, self.exp_avg.split(sizes), self.exp_avg_sq.split(sizes), self.steps.unbind(),
                              strict=True):
            state[p]["exp_avg"], state[p]["exp_avg_sq"], state[p]["step"] = m.view(p.shape), v.view(p.shape), s
        self.state_views = [(state[p]["exp_avg"], state[p]["step"]) for p in params]

    def current(self, group_params: list, state) -> torch.Tensor | None:
        """The run's flat gradient when its parameter group's list is unchanged and its parameters
        still have gradients back to back and the flat state's views (a state loaded since replaced
        them), else None."""
        first = self.params[0].grad
        if group_params is not self.group_params or len(group_params) != self.group_len or first is None \
                or not first.is_contiguous():
            return None
        base = first.data_ptr()
        for p, offset, (m, s) in zip(self.params, self.offsets, self.state_views, strict=True):
            g, st = p.grad, state.get(p)
            if g is None or g.data_ptr() != base + offset or not g.is_contiguous() or st is None \
                    or st.get("exp_avg") is not m or st.get("step") is not s:
                return None
        return _flat_view(first, self.numel)


class AdamW(torch.optim.AdamW):
    """``torch.optim.AdamW`` with the same arguments and the same result bit for bit, stepping runs
    of parameters with flat gradients as one tensor (module docstring). ``foreach`` and ``fused``
    still choose torch's path for the other parameters (``fused=True``: torch's for every one)."""

    def __init__(self, params, *args, **kwargs):
        super().__init__(params, *args, **kwargs)
        self._runs: list[list[_Run]] = [[] for _ in self.param_groups]

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        all_params = [g["params"] for g in self.param_groups]
        while len(self._runs) < len(self.param_groups):  # (add_param_group since)
            self._runs.append([])
        try:
            for index, group in enumerate(self.param_groups):
                flat = self._flat_runs(index, group)
                if flat:
                    for run, grad in flat:
                        self._step_run(run, grad, group)
                    stepped = {id(p) for run, _ in flat for p in run.params}
                    group["params"] = [p for p in group["params"] if id(p) not in stepped]
            _torch_step(self)  # torch's own step for the rest
        finally:
            for group, params in zip(self.param_groups, all_params, strict=True):
                group["params"] = params
        return loss

    def _flat_runs(self, index: int, group: dict) -> list[tuple[_Run, torch.Tensor]]:
        """(run, its flat gradient) for the group's runs this step: the cached ones while current."""
        if group.get("fused") or any(group.get(k, v) != v for k, v in _FLAT_OPTIONS.items()) \
                or isinstance(group["lr"], torch.Tensor):
            self._runs[index] = []
            return []
        cached = [(run, run.current(group["params"], self.state)) for run in self._runs[index]]
        if cached and all(grad is not None for _, grad in cached):
            return cached
        runs = []
        for params in (r for run in _grad_runs(group["params"]) for r in _same_step_runs(run, self.state)):
            run = _Run(group["params"], params, self.state)
            runs.append((run, run.current(group["params"], self.state)))
        self._runs[index] = [run for run, _ in runs]
        return runs

    @staticmethod
    def _step_run(run: _Run, grad: torch.Tensor, group: dict) -> None:
        """torch's _single_tensor_adam (decoupled weight decay) on the run's flat tensors."""
        lr, (beta1, beta2), eps, weight_decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        run.steps.add_(1)
        run.step += 1
        if weight_decay != 0:
            torch._foreach_mul_(run.params, 1 - lr * weight_decay)
        run.exp_avg.lerp_(grad, 1 - beta1)
        run.exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        bias_correction1 = 1 - beta1 ** run.step
        bias_correction2 = 1 - beta2 ** run.step
        step_size = lr / bias_correction1
        denom = (run.exp_avg_sq.sqrt() / bias_correction2 ** 0.5).add_(eps)
        # param.addcdiv_(exp_avg, denom, value=-step_size) rounds -step_size * exp_avg, then the
        # quotient, then the sum: the same three roundings here, the sum per parameter.
        torch.mul(run.exp_avg, -step_size, out=run.update).div_(denom)
        torch._foreach_add_(run.params, run.update_views)


def _torch_step(optimizer) -> None:
    """torch's AdamW.step for ``optimizer``, without the step hooks around it (our step has them)."""
    impl = torch.optim.AdamW.step
    if getattr(impl, "hooked", False):
        impl = impl.__wrapped__
    impl(optimizer)
