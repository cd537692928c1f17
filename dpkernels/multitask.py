"""Mixed-task batches on one base model: every sample its own task's diff, in one forward, no merge.

``MultiTask(base, {"a": diff_a, "b": diff_b})(**inputs, tasks=["a", "b", "a"])`` runs the plain
base model once, sample b seeing ``theta0 + delta[tasks[b]]`` and its task's dense parameters (its
classifier head), with the base weights never written. For a Linear (W0, b0) and a row x of
sample b with task t::

    y = x (W0 + D_t)^T + b_t = [x W0^T + b0]  +  [x D_t^T + (b_t - b0)]
          base GEMM, every row of the batch     segmented sparse product, each row its task's CSR

The base GEMM runs as the module's own forward over the whole batch (one GEMM at the full batch's
efficiency, as a single-task model runs it); a forward hook adds each row's correction from the
T tasks' diffs held as one concatenated CSR over the weight's rows (``ops.segmented_spmm``:
Triton on CUDA, torch.sparse on a CPU). Cost per Linear: the base GEMM (M N K multiply-adds)
plus sum over tasks of nnz_t * rows_t, nnz_t the task's nonzeros in that weight and rows_t the
tokens of its samples: at 0.5% density about 0.5% of the GEMM's work, whatever the mix.
Embeddings: the base lookup plus each row's own task's row of the diff (``ops.segmented_gather``),
so the lookup of the merged table exactly. Small tensors (biases, LayerNorm and RMSNorm weights)
and dense task parameters: per task a dense copy of the merged value, stacked, gathered per
sample (biases as the correction above; norms recomputed with the sample's weights; a dense head
multiplies each sample by its task's weight, B copies of the head in memory).

Outputs equal each task's merged model (``SparseDiff.apply`` on a copy) within the compute
dtype's rounding: the products are summed in another order, and the merged model multiplies
round(W0 + D_t) in the base dtype where this multiplies W0 and adds the fp32 D_t (in bf16 the
closer of the two to the exact task model). Embeddings and norms match exactly up to the
reassociation of one multiply-add.

Supported holders of a task's parameters: nn.Linear, transformers' Conv1D (GPT-2), nn.Embedding,
nn.LayerNorm and RMSNorm-style modules (LLaMA, Qwen2, Mistral, T5: recognised by comparing the
module with the RMSNorm formula on a probe input when built), with batch-first inputs (a
position-id input of batch 1 is broadcast to the batch). Anything else a diff touches is refused
when the diff is added.
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .reference import _merge_dtype
from .sparse import SparseDiff, _few, _named_targets, _refuse_gated, _unwrap, applied, check_new_task

__all__ = ["MultiTask"]


def _conv1d_type():
    """transformers' Conv1D (GPT-2's Linear with a transposed (in, out) weight), if loaded."""
    module = sys.modules.get("transformers.pytorch_utils")
    return getattr(module, "Conv1D", None)


def _rms_formulas():
    """Candidate RMSNorm forwards fn(x, weight, eps): LLaMA's (normalise in fp32, back to the input
    dtype, then scale) and T5's (the variance in fp32, the scaling in the input's dtype)."""

    def llama(x, w, eps):
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        return w * h.to(x.dtype)

    def t5(x, w, eps):
        h = x * torch.rsqrt(x.to(torch.float32).pow(2).mean(-1, keepdim=True) + eps)
        if w.dtype in (torch.float16, torch.bfloat16):
            h = h.to(w.dtype)
        return w * h

    return llama, t5


def _rms_formula(module: nn.Module):
    """The RMSNorm formula that reproduces `module` bit for bit on a probe input, or None."""
    params = dict(module.named_parameters(recurse=False))
    eps = _eps(module)
    name = type(module).__name__
    if set(params) != {"weight"} or params["weight"].dim() != 1 or not isinstance(eps, float) or not (
            "RMSNorm" in name or "LayerNorm" in name):
        return None
    w = params["weight"]
    gen = torch.Generator().manual_seed(0)
    probe = torch.randn(2, 3, w.numel(), generator=gen).to(w.device, w.dtype)
    with torch.no_grad(), torch.autocast(w.device.type, enabled=False):
        try:
            expected = module(probe)
        except Exception:  # not a norm of its last dimension after all
            return None
        for fn in _rms_formulas():
            got = fn(probe, w, eps)
            if got.shape == expected.shape and got.dtype == expected.dtype and torch.equal(got, expected):
                return fn
    return None


class _State:
    """The per-call context the hooks read: each sample's task index (int64 (B,)), None between calls."""

    def __init__(self):
        self.sample_task: torch.Tensor | None = None


class _Slot:
    """One base parameter's per-task values, shared by every module holding it (a tied tensor).

    ``csr[layout]``: (rowptr (T, R + 1), col, val), the tasks' diffs as one CSR over the rows of the
    weight ("rows": a Linear's or an Embedding's (R, C) weight) or of its transpose ("cols": a
    Conv1D's (K, N) weight, rows = its N outputs). ``stack``: (T, *shape) merged values in the
    parameter's dtype (small tensors, and any tensor some task holds dense).
    """

    def __init__(self, name: str, param: torch.Tensor, touched: bool = True):
        self.name, self.param, self.touched = name, param, touched
        self.csr: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.stack: torch.Tensor | None = None


def _csr(entries: list[tuple[torch.Tensor, torch.Tensor]], rows: int, cols: int, transpose: bool, device):
    """The concatenated CSR of T tasks' (sorted flat index, value) pairs over an (R, C) tensor's rows
    (transpose: over its columns, for a (K, N) weight serving as N output rows)."""
    rowptrs, col_parts, val_parts, offset = [], [], [], 0
    n_rows, n_cols = (cols, rows) if transpose else (rows, cols)
    for index, values in entries:
        index = index.to(device, torch.int64)
        r, c = (index % cols, index // cols) if transpose else (index // cols, index % cols)
        values = values.to(device, torch.float32)
        if transpose:  # sort by (output row, input feature)
            order = torch.argsort(r * n_cols + c)
            r, c, values = r[order], c[order], values[order]
        counts = torch.bincount(r, minlength=n_rows)
        rowptr = torch.zeros(n_rows + 1, dtype=torch.int64, device=device)
        rowptr[1:] = torch.cumsum(counts, 0)
        rowptrs.append(rowptr + offset)
        col_parts.append(c.to(torch.int32))
        val_parts.append(values)
        offset += index.numel()
    return torch.stack(rowptrs), torch.cat(col_parts), torch.cat(val_parts)


class _Handler:
    """The forward hook of one supported module: adds each sample's task correction to its output."""

    def __init__(self, state: _State, module: nn.Module, path: str, kind: str, attrs: tuple[str, ...], rms=None):
        self.state, self.path, self.kind, self.attrs, self.rms = state, path, kind, attrs, rms
        self.slots: dict[str, _Slot] | None = None  # attr -> slot; None while no task touches the module
        self.bias_delta: torch.Tensor | None = None  # Linear: (T, N) merged bias - b0, in the accumulation dtype
        self.handle = module.register_forward_hook(self.hook, with_kwargs=True)

    # ---- per call -------------------------------------------------------------------------------

    def _batch_first(self, x: torch.Tensor, y: torch.Tensor, tasks: torch.Tensor):
        """x and the base output y with the batch first (a batch-1 input broadcast to the batch)."""
        batch = tasks.shape[0]
        if x.dim() == 0 or x.shape[0] != batch:
            if x.dim() > 0 and x.shape[0] == 1:
                return x.expand(batch, *x.shape[1:]), y.expand(batch, *y.shape[1:])
            raise ValueError(f"MultiTask: module {self.path!r} got an input of shape {tuple(x.shape)}, not batch-first "
                             f"for the {batch} samples of `tasks`; per-sample diffs need batch-first module inputs")
        return x, y

    def hook(self, module, args, kwargs, output):
        tasks = self.state.sample_task
        if tasks is None or self.slots is None:
            return None
        x, y = self._batch_first(args[0] if args else next(iter(kwargs.values())), output, tasks)
        batch = tasks.shape[0]
        if self.kind in ("linear", "conv1d"):
            return self._linear(x, y, tasks, batch)
        if self.kind == "embedding":
            return self._embedding(x, y, tasks, batch)
        return self._norm(module, x, y, tasks)

    def _linear(self, x, y, tasks, batch):
        k, n, rows = x.shape[-1], y.shape[-1], y.shape[:-1].numel()
        weight = self.slots["weight"]
        if weight.stack is not None:  # some task holds the weight dense: each sample its own weight
            w = weight.stack[tasks]  # (B, N, K), Conv1D (B, K, N)
            w = w.transpose(1, 2) if self.kind == "linear" else w
            x3 = x.reshape(batch, rows // batch, k)
            bias = self.slots.get("bias")
            if bias is None:
                out = torch.bmm(x3, w)
            else:
                out = torch.baddbmm(bias.stack[tasks].unsqueeze(1), x3, w)
            return out.to(y.dtype).reshape(y.shape)
        row_task = tasks[:, None].expand(batch, rows // batch).reshape(-1)
        rowptr, col, val = weight.csr["rows" if self.kind == "linear" else "cols"]
        out = ops.segmented_spmm(x.reshape(rows, k).to(y.dtype), y.reshape(rows, n), row_task, rowptr, col, val,
                                 self.bias_delta)
        return out.view(y.shape)

    def _embedding(self, ids, y, tasks, batch):
        weight = self.slots["weight"]
        rows = ids.numel()
        row_task = tasks[:, None].expand(batch, rows // batch).reshape(-1) if rows else tasks[:0]
        ids = ids.to(torch.int64)
        if weight.stack is not None:
            vocab = weight.param.shape[0]
            table = weight.stack.view(-1, weight.param.shape[1])
            return F.embedding(ids.reshape(-1) + row_task * vocab, table).view(y.shape).to(y.dtype)
        rowptr, col, val = weight.csr["rows"]
        out = ops.segmented_gather(ids.reshape(-1), y.reshape(rows, y.shape[-1]), row_task, rowptr, col, val)
        return out.view(y.shape)

    def _norm(self, module, x, y, tasks):
        def per_sample(slot: _Slot | None):
            if slot is None:
                return None
            value = slot.stack[tasks]  # (B, *shape): broadcast over the dims between the batch and the shape
            return value.view(value.shape[0], *([1] * (x.dim() - value.dim())), *value.shape[1:])

        weight, bias = per_sample(self.slots.get("weight")), per_sample(self.slots.get("bias"))
        if self.kind == "layernorm":
            out = F.layer_norm(x, module.normalized_shape, None, None, module.eps)
            if weight is not None:
                out = out * weight
            if bias is not None:
                out = out + bias
        else:
            out = self.rms(x, weight, _eps(module))
        return out.to(y.dtype)

    # ---- building -------------------------------------------------------------------------------

    def bind(self, slots: dict[str, _Slot] | None, module: nn.Module) -> None:
        """Point the hook at its parameters' per-task values (None: no task touches the module)."""
        self.slots = slots
        self.bias_delta = None
        if slots is None or self.kind not in ("linear", "conv1d"):
            return
        bias = slots.get("bias")
        if bias is not None and bias.touched and slots["weight"].stack is None:
            b0 = module.bias.detach()
            acc = _merge_dtype(b0.dtype)
            self.bias_delta = (bias.stack.to(acc) - b0.to(acc)).contiguous()


def _eps(module: nn.Module):
    """An RMSNorm's epsilon (LLaMA's and T5's name, or the common one)."""
    return getattr(module, "variance_epsilon", getattr(module, "eps", None))


def _module_kind(module: nn.Module):
    """(kind, parameter attributes, rms formula) of a module MultiTask serves, or None."""
    conv1d = _conv1d_type()
    if isinstance(module, nn.Linear):
        return "linear", ("weight", "bias"), None
    if conv1d is not None and isinstance(module, conv1d):
        return "conv1d", ("weight", "bias"), None
    if isinstance(module, nn.Embedding):
        return ("embedding", ("weight",), None) if module.max_norm is None else None
    if isinstance(module, nn.LayerNorm):
        return "layernorm", ("weight", "bias"), None
    rms = _rms_formula(module)
    return ("rmsnorm", ("weight",), rms) if rms is not None else None


class MultiTask(nn.Module):
    """Serve many tasks' sparse diffs from one plain base model, mixed in one batch.

        multi = dpkernels.MultiTask(base, {"sst2": diff_a, "mnli": diff_b})
        out = multi(input_ids=ids, attention_mask=mask, tasks=["sst2", "mnli", "sst2"])
        out = multi(input_ids=ids, tasks=torch.tensor([0, 1, 0]))    # indices in the tasks' order
        multi.add("qnli", diff_c); multi.remove("mnli")

    Calling it like the model, with ``tasks`` (one name per sample, or an integer tensor of
    indices into :attr:`tasks`), runs one forward of `base` in which sample b sees
    ``theta0 + delta[tasks[b]]`` and its task's dense parameters; the base weights are never
    written, and `base` called directly stays the base. The module docstring gives the math and
    the cost: the base GEMMs plus, per Linear, sum over tasks of nnz_t * rows_t multiply-adds.

    Each diff is validated against `base` when added (:meth:`SparseDiff.check_model`: names,
    shapes, dense head shapes, the base fingerprint), and every module it touches must be one
    MultiTask serves (the module docstring lists them). Forward hooks on the base's modules,
    installed once here, read the per-call sample -> task index (set for the call and cleared on
    exit, also on an exception); :meth:`add` and :meth:`remove` rebuild only the wrapper's
    per-task tensors, never the base's modules. :meth:`close` removes the hooks.

    Inference only: the forward runs without autograd. Works under ``torch.no_grad``,
    ``torch.inference_mode``, autocast and ``torch.compile`` (the corrections are the custom ops
    ``dpkernels::segmented_spmm`` and ``dpkernels::segmented_gather``; pass ``tasks`` as a tensor
    there, names being Python constants a graph specialises on). Do not modify, move or cast the
    base while a MultiTask holds it, nor apply a diff to it (TaskSwitcher): the per-task values are
    built from the base as it was when each task was added.
    """

    def __init__(self, model: nn.Module, diffs: Mapping[str, SparseDiff] | None = None):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"MultiTask takes an nn.Module, got {type(model).__name__}")
        if isinstance(model, MultiTask):
            raise TypeError("MultiTask wraps a plain base model, not another MultiTask")
        plain = _unwrap(model)
        _refuse_gated(plain)
        self.model = model
        self._plain = [plain]  # not a submodule twice
        self._state = _State()
        self._diffs: dict[str, SparseDiff] = {}
        self._handlers: dict[int, tuple[nn.Module, _Handler]] = {}
        self._holders: dict[int, list[tuple[str, nn.Module, str]]] = {}  # id(param) -> (module path, module, attr)
        for path, module in plain.named_modules(remove_duplicate=False):
            for attr, p in module.named_parameters(recurse=False):
                self._holders.setdefault(id(p), []).append((path, module, attr))
            if id(module) in self._handlers or not any(True for _ in module.parameters(recurse=False)):
                continue
            kind = _module_kind(module)
            if kind is not None:
                self._handlers[id(module)] = (module, _Handler(self._state, module, path, *kind))
        self._closed = False
        # The hooks do not refer to this wrapper: dropped without close(), it takes its hooks along.
        self._finalizer = weakref.finalize(self, _remove_hooks, [h.handle for _, h in self._handlers.values()])
        for name, diff in (diffs or {}).items():
            self.add(name, diff)

    # ---- tasks -------------------------------------------------------------------------------

    @property
    def tasks(self) -> list[str]:
        """The task names, in index order."""
        return list(self._diffs)

    def __len__(self) -> int:
        return len(self._diffs)

    def __contains__(self, name) -> bool:
        return name in self._diffs

    def extra_repr(self) -> str:
        return f"tasks={self.tasks}"

    def add(self, name: str, diff: SparseDiff) -> MultiTask:
        """Validate `diff` against the base and serve it as task `name` (the next index); returns self."""
        self._check_open()
        check_new_task(name, diff, self._diffs)
        self._check_plain()
        diff = diff._for_targets(diff.check_model(self._plain[0])[0])  # an untied alias is a target of its own
        self._check_servable(diff)
        self._diffs[name] = diff
        try:
            self._rebuild()
        except BaseException:
            del self._diffs[name]
            self._rebuild()
            raise
        return self

    def remove(self, name: str) -> MultiTask:
        """Stop serving task `name` (the later tasks' indices shift down by one); returns self."""
        self._check_open()
        if name not in self._diffs:
            raise KeyError(f"no task {name!r}; added: {self.tasks}")
        del self._diffs[name]
        self._rebuild()
        return self

    def close(self) -> None:
        """Remove the hooks from the base's modules (the MultiTask is then unusable)."""
        self._finalizer()
        self._handlers.clear()
        self._diffs.clear()
        self._closed = True

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this MultiTask was closed")

    def _check_plain(self) -> None:
        owner = applied(self._plain[0])
        if owner is not None:
            raise ValueError(f"the base has a diff applied (by a {type(owner).__name__}); MultiTask serves the plain "
                             "base: restore() or reset() it first")

    def _touched(self, diff: SparseDiff) -> list[str]:
        return [n for n, t in diff.tensors.items() if t.nnz] + list(diff.dense)

    def _check_servable(self, diff: SparseDiff) -> None:
        """Every parameter the diff changes must be held by modules MultiTask serves."""
        params = _named_targets(self._plain[0])
        for name in self._touched(diff):
            holders = self._holders.get(id(params[name]), [])
            if not holders:
                raise ValueError(f"MultiTask: parameter {name!r} is not held by any module of the base")
            for path, module, attr in holders:
                if id(module) in self._handlers and attr in self._handlers[id(module)][1].attrs:
                    continue
                # A module that only registers a tie for a child that uses it (BERT's MLM head's bias).
                if any(p is params[name] for m in module.children() for p in m.parameters()):
                    continue
                raise ValueError(f"MultiTask: parameter {name!r} is held by {path or 'the model'!r}, a "
                                 f"{type(module).__name__}; per-sample parameters are served for nn.Linear, Conv1D, "
                                 "nn.Embedding (without max_norm), nn.LayerNorm and RMSNorm modules")

    def _rebuild(self) -> None:
        """The per-task tensors of every touched parameter, from the diffs in task order."""
        params = _named_targets(self._plain[0])
        diffs = list(self._diffs.values())
        names = {n for d in diffs for n in self._touched(d)}
        slots: dict[int, _Slot] = {}
        for name in names:
            p = params[name]
            slot = slots.setdefault(id(p), _Slot(name, p))
            kinds = {self._handlers[id(m)][1].kind for _, m, _ in self._holders[id(p)] if id(m) in self._handlers}
            sparse = p.dim() == 2 and kinds <= {"linear", "conv1d", "embedding"}
            if sparse and not any(name in d.dense for d in diffs):
                entries = [(d.tensors[name].index, d.tensors[name].values) if name in d.tensors and
                           d.tensors[name].nnz else (torch.zeros(0, dtype=torch.int64), torch.zeros(0))
                           for d in diffs]
                rows, cols = p.shape
                layouts = {"cols" if kind == "conv1d" else "rows" for kind in kinds}
                slot.csr = {lay: _csr(entries, rows, cols, lay == "cols", p.device) for lay in layouts}
            else:
                slot.stack = torch.stack([_task_value(p, name, d) for d in diffs])
        for module, handler in self._handlers.values():
            held = {attr: getattr(module, attr, None) for attr in handler.attrs}
            mine = {attr: slots.get(id(p)) for attr, p in held.items() if isinstance(p, torch.Tensor)}
            if not any(s is not None for s in mine.values()):
                handler.bind(None, module)
                continue
            for attr, p in held.items():  # the module's untouched parameters: the base for every task
                if isinstance(p, torch.Tensor) and mine.get(attr) is None:
                    mine[attr] = _base_slot(p, attr, handler.kind, len(diffs))
            handler.bind(mine, module)

    # ---- calls -------------------------------------------------------------------------------

    def _task_index(self, tasks, batch: int, device: torch.device) -> torch.Tensor:
        count = len(self._diffs)
        if count == 0:
            raise ValueError("MultiTask has no tasks; add() one first")
        if isinstance(tasks, torch.Tensor):
            if tasks.dtype.is_floating_point or tasks.dtype.is_complex or tasks.dtype == torch.bool:
                raise TypeError(f"a tasks tensor holds integer task indices, got {tasks.dtype}")
            if tasks.dim() != 1:
                raise ValueError(f"tasks must be 1-D (one index per sample), got shape {tuple(tasks.shape)}")
            if tasks.shape[0] != batch:
                raise ValueError(f"tasks has {tasks.shape[0]} entries for a batch of {batch} samples")
            if torch.compiler.is_compiling():
                return torch.ops.dpkernels.check_task_index(tasks.to(device), count)
            return _check_task_index(tasks.to(device), count)
        if isinstance(tasks, (str, bytes)) or not isinstance(tasks, Sequence):
            raise TypeError(f"tasks is a sequence of task names (one per sample) or an integer tensor, got "
                            f"{type(tasks).__name__}")
        if len(tasks) != batch:
            raise ValueError(f"tasks has {len(tasks)} entries for a batch of {batch} samples")
        index = {name: i for i, name in enumerate(self._diffs)}
        unknown = [t for t in tasks if not isinstance(t, str) or t not in index]
        if unknown:
            raise ValueError(f"unknown task(s) {_few(dict.fromkeys(unknown))}; added: {self.tasks}")
        return torch.tensor([index[t] for t in tasks], dtype=torch.int64, device=device)

    def forward(self, *args, tasks, **kwargs):
        """The base model's forward on (*args, **kwargs), sample b with task ``tasks[b]``."""
        self._check_open()
        if self._state.sample_task is not None:
            raise RuntimeError("MultiTask calls do not nest")
        if not torch.compiler.is_compiling():
            self._check_plain()
        first = _first_input(args, kwargs)
        index = self._task_index(tasks, first.shape[0], first.device)
        with torch.no_grad():
            self._state.sample_task = index
            try:
                return self.model(*args, **kwargs)
            finally:
                self._state.sample_task = None


def _remove_hooks(handles) -> None:
    for handle in handles:
        handle.remove()


def _first_input(args, kwargs) -> torch.Tensor:
    """The tensor whose first dimension is the batch: input_ids / inputs_embeds, else the first tensor."""
    for key in ("input_ids", "inputs_embeds"):
        if isinstance(kwargs.get(key), torch.Tensor):
            return kwargs[key]
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value
    raise TypeError("MultiTask found no tensor input to read the batch size from")


def _task_value(p: torch.Tensor, name: str, diff: SparseDiff) -> torch.Tensor:
    """The task's value of parameter p: dense, or the merge round(acc(theta0) + acc(delta)), or the base."""
    if name in diff.dense:
        return diff.dense[name].to(p.device, p.dtype)
    value = p.detach().clone()
    t = diff.tensors.get(name)
    if t is not None and t.nnz:
        flat, index = value.view(-1), t.index.to(p.device)
        acc = _merge_dtype(p.dtype)
        flat[index] = (flat[index].to(acc) + t.values.to(p.device, acc)).to(p.dtype)
    return value


def _base_slot(p: torch.Tensor, attr: str, kind: str, count: int) -> _Slot:
    """A slot serving the base value of p to every task (a touched module's untouched parameter)."""
    slot = _Slot(attr, p, touched=False)
    if p.dim() == 2 and kind in ("linear", "conv1d", "embedding"):
        rows, cols = p.shape
        empty = [(torch.zeros(0, dtype=torch.int64), torch.zeros(0))] * count
        slot.csr = {"cols" if kind == "conv1d" else "rows": _csr(empty, rows, cols, kind == "conv1d", p.device)}
    else:
        slot.stack = p.detach().unsqueeze(0).expand(count, *p.shape)
    return slot


def _check_task_index(tasks: torch.Tensor, count: int) -> torch.Tensor:
    """tasks as int64, ValueError unless every index lies in [0, count) (a host sync on GPU tensors)."""
    tasks = tasks.to(torch.int64)
    if tasks.numel():
        low, high = (int(v) for v in torch.stack([tasks.min(), tasks.max()]).tolist())
        if low < 0 or high >= count:
            raise ValueError(f"task index {low if low < 0 else high} is out of range for {count} tasks")
    return tasks


@torch.library.custom_op("dpkernels::check_task_index", mutates_args=())
def _check_task_index_op(tasks: torch.Tensor, count: int) -> torch.Tensor:
    """_check_task_index inside a compiled graph (the check reads the values: opaque to the trace)."""
    return _check_task_index(tasks, count).clone()


@_check_task_index_op.register_fake
def _(tasks, count):
    return torch.empty(tasks.shape, dtype=torch.int64, device=tasks.device)

