"""Sparse task diffs: extract from a model, a validated safetensors file, bit-exact apply/restore,
and a task switcher that keeps many diffs resident on the device.

A task model is ``theta_task = theta0 + delta`` with ``delta`` sparse. :class:`SparseDiff` holds,
per diff-pruned base tensor, the sorted flat indices of delta's nonzeros and their fp32 values,
plus the task's dense parameters (e.g. a classifier head) whole. Applying it writes::

    theta[i] = round_to_base_dtype(acc(theta0[i]) + acc(delta_i))     acc = fp64 for fp64 bases, else fp32

once, saving the overwritten ``theta0[i]``; restoring writes the saved bits back, so the base
returns bit for bit however many times tasks are switched (no ``w + d - d`` rounding drift).
The writes are one kernel launch per (device, base dtype) over every tensor of the model
(``dpkernels.backends``: Triton on CUDA, the torch reference elsewhere).

File format (safetensors; metadata ``format = "dpkernels.sparse_diff"``, ``format_version = "1"``).
Tensors, per gated base tensor ``<name>`` (a parameter name of the model)::

    <name>.indices       int32 (int64 when the tensor has >= 2**31 elements): sorted unique flat indices
    <name>.values        float32: delta at those indices
    <name>.base_index    int64: sorted flat positions of the base fingerprint samples
    <name>.base_values   float32: the base's values there

and ``<name>.dense`` (its own dtype) per dense task parameter. Metadata (str -> str, JSON where
structured): ``tensors`` (name, shape, dtype, nnz, gate per gated tensor, and ``aliases`` for a tied
tensor: its other names in the model it came from, written only then, so readers that predate it
refuse such a file instead of leaving an untied copy unchanged), ``dense`` (name, shape, dtype),
``gate_config`` (l, r, beta when all tensors share one, else null), ``nnz``, ``total`` (gated
elements), ``sparsity`` (nnz / total), ``values_dtype``, ``created_by``, optionally ``info`` (a JSON
object saying how the diff was made, e.g. the finetuning run's model, data and seed, so that
``dpkernels eval`` needs no flags; readers that predate it ignore it), optionally ``base_model``
({name_or_path, revision}: the transformers model the diff was made from) and ``id2label`` (the
task's labels, {"0": name, ...}), both read from the model's config by :meth:`SparseDiff.from_model`
and likewise ignored by older readers, and ``sha256`` over every tensor's name, dtype, shape and
bytes and the rest of the metadata, so any corrupt byte is caught at load.

Hugging Face layout (:meth:`SparseDiff.save_pretrained` / :meth:`SparseDiff.from_pretrained`): a
folder holding ``diff.safetensors`` (the file above) and ``diff_config.json``, a JSON object with
``format`` = "dpkernels.diff_config", ``format_version`` = 1, ``diff_sha256`` (the file's
checksum), ``created_by``, ``base_model``, ``base_fingerprint`` (:attr:`SparseDiff.base_fingerprint`),
``gate_config``, ``id2label``, ``nnz``, ``total``, ``sparsity``, ``tensors`` (how many gated
tensors), ``dense`` (the dense parameters' names) and ``info``. Every field restates the file
beside it, for readers (and the Hub) that look at JSON only; loading refuses a config that
disagrees with its file in any field.

The fingerprint: up to 16 base values per tensor at positions fixed by a hash rule. Against a
model whose tensor has the dtype the diff recorded they must match exactly (after rounding the
model's value to fp32); after a cast (fp32 -> bf16, say) within the coarser dtype's precision,
``|model - stored| <= eps * |stored| + eps * tiny`` with eps and tiny the larger of the two dtypes'
``finfo`` values (a rounding to bf16 moves a value by at most eps(bf16) / 2 relative). So a cast
base is accepted and a different model rejected; a base that differs from the original only below
the coarser dtype's precision cannot be told apart. Names and shapes must match exactly.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import secrets
import sys
import weakref
from collections.abc import Mapping
from dataclasses import dataclass

import safetensors
import safetensors.torch
import torch
from torch import nn

from . import ops
from .backends import select
from .nn import dense_task_parameters, iter_gated, require_gated
from .training import check_save_target

__all__ = ["CONFIG_FORMAT", "DIFF_CONFIG_NAME", "DIFF_WEIGHTS_NAME", "FORMAT", "FORMAT_VERSION", "DiffTensor",
           "SparseDiff", "TaskSwitcher", "applied", "merge_and_unload"]

FORMAT = "dpkernels.sparse_diff"
FORMAT_VERSION = 1
# save_pretrained's folder: the diff file and the JSON config that restates it.
DIFF_WEIGHTS_NAME = "diff.safetensors"
DIFF_CONFIG_NAME = "diff_config.json"
CONFIG_FORMAT = "dpkernels.diff_config"
CONFIG_FORMAT_VERSION = 1
_FINGERPRINT_SAMPLES = 16
_GOLDEN = 0x9E3779B97F4A7C15  # 2**64 / golden ratio: the fingerprint positions' hash multiplier
# Base dtypes a diff can be applied to (the scatter kernels' dtypes).
BASE_DTYPES = {str(d).removeprefix("torch."): d for d in (torch.float16, torch.bfloat16, torch.float32, torch.float64)}
_SUFFIXES = ("indices", "values", "base_index", "base_values")
_WRITE_CHUNK = 1 << 24


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _few(names, k: int = 3, quote: bool = True) -> str:
    names = list(names)
    shown = ", ".join(repr(n) if quote else n for n in names[:k])
    return shown + (f" and {len(names) - k} more" if len(names) > k else "")


def _sample_positions(numel: int, k: int = _FINGERPRINT_SAMPLES) -> torch.Tensor:
    """Fingerprint positions of a tensor of `numel` elements: all if few, else k hashed ones."""
    if numel <= k:
        return torch.arange(numel, dtype=torch.int64)
    picks = {((j + 1) * _GOLDEN % (1 << 64)) % numel for j in range(k)}
    return torch.tensor(sorted(picks), dtype=torch.int64)


def _index_dtype(numel: int) -> torch.dtype:
    """int32 holds every flat index of a tensor of up to 2**31 elements."""
    return torch.int32 if numel <= 1 << 31 else torch.int64


def _cast_tolerance(a: torch.dtype, b: torch.dtype) -> tuple[float, float]:
    """(relative, absolute) distance a value may move when cast between dtypes a and b: twice the
    coarser one's half-ulp, and its subnormal spacing (eps * tiny) for values near zero."""
    fa, fb = torch.finfo(a), torch.finfo(b)
    return max(fa.eps, fb.eps), max(fa.eps * fa.tiny, fb.eps * fb.tiny)


def _check_gate(gate) -> dict | None:
    if gate is None:
        return None
    if not isinstance(gate, Mapping) or set(gate) != {"l", "r", "beta"}:
        raise ValueError(f"a gate config is a mapping with keys l, r, beta, got {gate!r}")
    ops.check_gate_config(gate["l"], gate["r"], gate["beta"])
    return {k: float(gate[k]) for k in ("l", "r", "beta")}


def _unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside torch.compile's and (Distributed)DataParallel's wrappers, however
    nested: diffs name parameters as the plain model does (no ``_orig_mod.`` or ``module.``)."""
    # torch.compile's wrapper class exists only once torch._dynamo is loaded: don't load it here.
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    data_parallel = (nn.DataParallel, nn.parallel.DistributedDataParallel)
    wrappers = data_parallel + ((eval_frame.OptimizedModule,) if eval_frame is not None else ())
    while isinstance(model, wrappers):
        model = model.module if isinstance(model, data_parallel) else model._orig_mod
    return model


# --------------------------------------------------------------------------------------------
# The diff
# --------------------------------------------------------------------------------------------


@dataclass(eq=False)
class DiffTensor:
    """One base tensor's part of a diff: delta[index] = values (elsewhere 0), and the fingerprint."""

    shape: tuple[int, ...]
    dtype: torch.dtype  # the base tensor's dtype when the diff was made
    index: torch.Tensor  # int64, sorted unique flat indices
    values: torch.Tensor  # float32, same length
    base_index: torch.Tensor  # int64, sorted unique fingerprint positions
    base_values: torch.Tensor  # float32, the base there
    gate: dict | None = None  # {"l", "r", "beta"} of the module it came from, if gated
    # The tensor's other names in the model it came from (a tied parameter: GPT-2's lm_head.weight
    # beside transformer.wte.weight). Applied to a model where such a name is a tensor of its own
    # (untied, e.g. tie_word_embeddings=False), the delta goes there too.
    aliases: tuple[str, ...] = ()

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nnz(self) -> int:
        return self.index.numel()

    def validate(self) -> None:
        """Raise ValueError unless every field is well formed (costs host syncs on GPU tensors)."""
        if not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in self.shape):
            raise ValueError(f"shape {self.shape} is not a tuple of non-negative ints")
        if self.dtype not in BASE_DTYPES.values():
            raise ValueError(f"base dtype {self.dtype} is not one of {', '.join(BASE_DTYPES)}")
        for what, t, dtype in (("indices", self.index, torch.int64), ("values", self.values, torch.float32),
                               ("base_index", self.base_index, torch.int64),
                               ("base_values", self.base_values, torch.float32)):
            if not isinstance(t, torch.Tensor) or t.dtype != dtype or t.dim() != 1:
                got = f"{t.dtype} with shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"{what} must be a 1-D {_dtype_name(dtype)} tensor, got {got}")
        if self.values.numel() != self.index.numel():
            raise ValueError(f"{self.values.numel()} values for {self.index.numel()} indices")
        if self.base_values.numel() != self.base_index.numel():
            raise ValueError(f"{self.base_values.numel()} base_values for {self.base_index.numel()} base_index")
        ops.check_mask_index("indices", self.index, self.numel)
        ops.check_mask_index("base_index", self.base_index, self.numel)
        if self.values.numel() and not bool(torch.isfinite(self.values).all()):
            raise ValueError("values contain NaN or infinite entries")
        self.gate = _check_gate(self.gate)
        aliases = tuple(self.aliases) if isinstance(self.aliases, (tuple, list)) else None
        if aliases is None or not all(isinstance(a, str) and a for a in aliases) or len(set(aliases)) != len(aliases):
            raise ValueError(f"aliases {self.aliases!r} must be a tuple of distinct non-empty names")
        self.aliases = aliases

    def to(self, device) -> DiffTensor:
        move = dict(device=device)
        return DiffTensor(self.shape, self.dtype, self.index.to(**move), self.values.to(**move),
                          self.base_index.to(**move), self.base_values.to(**move), self.gate, self.aliases)


class SparseDiff:
    """A task's sparse diff against a base model, with its dense task parameters.

    ``tensors``: base parameter name -> :class:`DiffTensor`; ``dense``: parameter name -> the
    task's value of that parameter (copied whole on apply). Build with :meth:`from_model` (a
    diff-pruned model: the eval-mode deltas of every gated tensor) or :meth:`from_deltas` (given
    indices and values for named parameters of any model); persist with :meth:`save` /
    :meth:`load`; merge into a model with :meth:`apply` / :meth:`restore`, or keep several resident
    with :class:`TaskSwitcher`. Construction validates every field (ValueError naming the problem).
    A model wrapped by ``torch.compile`` or (Distributed)DataParallel stands for the plain model
    inside it: names are the plain model's (no ``_orig_mod.`` or ``module.`` prefix).

    Saved with the tensors (validated when set): ``info``, a JSON object saying how the diff was
    made; ``base_model``, {"name_or_path", "revision"} of the transformers model it was made from
    (a string sets name_or_path alone); ``id2label``, the task's labels ({int: str}).
    """

    def __init__(self, tensors: Mapping[str, DiffTensor], dense: Mapping[str, torch.Tensor] | None = None,
                 info: Mapping | None = None, *, base_model: str | Mapping | None = None,
                 id2label: Mapping | None = None):
        self.tensors = dict(tensors)
        self.dense = dict(dense or {})
        self.info = info
        self.base_model = base_model
        self.id2label = id2label
        for name, t in self.tensors.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"tensor names must be non-empty strings, got {name!r}")
            if not isinstance(t, DiffTensor):
                raise TypeError(f"tensors[{name!r}] must be a DiffTensor, got {type(t).__name__}")
            try:
                t.validate()
            except ValueError as exc:
                raise ValueError(f"tensor {name!r}: {exc}") from None
        for name, d in self.dense.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"dense names must be non-empty strings, got {name!r}")
            if not isinstance(d, torch.Tensor) or not d.dtype.is_floating_point:
                raise ValueError(f"dense parameter {name!r} must be a floating-point tensor")
        both = self.tensors.keys() & self.dense.keys()
        if both:
            raise ValueError(f"names {_few(sorted(both))} are both gated and dense")
        self._alias_of: dict[str, str] = {}  # alias -> the tensor's name in the diff
        for name, t in self.tensors.items():
            for alias in t.aliases:
                if alias in self.tensors or alias in self.dense or alias in self._alias_of:
                    raise ValueError(f"tensor {name!r}: alias {alias!r} names another entry of the diff")
                self._alias_of[alias] = name

    @property
    def info(self) -> dict | None:
        return self._info

    @info.setter
    def info(self, value) -> None:
        self._info = _check_info(value)

    @property
    def base_model(self) -> dict | None:
        return self._base_model

    @base_model.setter
    def base_model(self, value) -> None:
        self._base_model = _check_base_model(value)

    @property
    def id2label(self) -> dict[int, str] | None:
        return self._id2label

    @id2label.setter
    def id2label(self, value) -> None:
        self._id2label = _check_id2label(value)

    # ---- construction ------------------------------------------------------------------------

    @classmethod
    def from_model(cls, model: nn.Module, *, gate_config: Mapping | None = None, info: Mapping | None = None,
                   base_model: str | Mapping | None = None, id2label: Mapping | None = None) -> SparseDiff:
        """The eval-mode diff of a diff-pruned model: for every gated tensor (``iter_gated``) the
        nonzeros of ``z_eval * diff`` (L0 stage) or of the fixed-mask values, under the base
        parameter's plain name (``layer.weight``, also for parametrized parameters), and every
        dense task parameter (``dense_task_parameters``) whole. Each tensor's gate constants
        (l, r, beta) are recorded; ``gate_config`` ({l, r, beta}), if given, is the config every
        gated tensor must have (ValueError otherwise). If a diff is applied to the model
        (``apply`` or a TaskSwitcher), the fingerprint and dense parameters are read as they are
        without it. ``info`` (a JSON-serialisable dict) is saved with the diff: how it was made.
        ``base_model`` and ``id2label`` default to what a transformers model's config says
        (``_name_or_path`` and ``_commit_hash``, ``id2label``); pass them when the config does not
        know (a model built from a config has no name). A model without gated tensors raises
        ValueError (its "diff" would be a dense copy of every parameter).
        """
        model = _unwrap(model)
        expected = _check_gate(gate_config)
        deltas, bases, gates = {}, {}, {}
        for name, _, gt in require_gated(model):
            gate = _check_gate({"l": gt.l, "r": gt.r, "beta": gt.beta})
            if expected is not None and gate != expected:
                raise ValueError(f"gated tensor {name!r} has gate config {gate}, not the expected {expected}")
            deltas[name] = gt.eval_delta()
            bases[name], gates[name] = gt.theta0, gate
        dense = dense_task_parameters(model)
        diff = cls._build(model, bases, deltas, dense, gates, info)
        _record_config(diff, model, base_model, id2label)
        return diff

    @classmethod
    def from_deltas(cls, model: nn.Module, deltas: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
                    dense: Mapping[str, torch.Tensor] | None = None) -> SparseDiff:
        """A diff for named parameters of any model: ``deltas[name] = (flat indices, values)``
        (any order, no duplicates), ``dense[name]`` a whole new value of a parameter. The base
        model's name and labels are read from its config, as :meth:`from_model` does."""
        model = _unwrap(model)
        params = _named_targets(model)
        unknown = [n for n in (*deltas, *(dense or {})) if n not in params]
        if unknown:
            raise ValueError(f"the model has no parameters named {_few(unknown)}")
        bases = {n: params[n] for n in deltas}
        diff = cls._build(model, bases, dict(deltas), dict(dense or {}), dict.fromkeys(deltas))
        _record_config(diff, model, None, None)
        return diff

    @classmethod
    def _build(cls, model, bases, deltas, dense, gates, info=None) -> SparseDiff:
        record = _APPLIED.get(model)
        names_of = _names_by_tensor(model)
        tensors = {}
        for name, (index, values) in deltas.items():
            theta0 = bases[name]
            index = torch.as_tensor(index).detach().reshape(-1).to(torch.int64)
            values = torch.as_tensor(values).detach().reshape(-1).to(torch.float32, copy=True)
            if index.numel() != values.numel():
                raise ValueError(f"tensor {name!r}: {values.numel()} values for {index.numel()} indices")
            if index.numel() > 1 and bool((index[1:] < index[:-1]).any()):
                index, order = index.sort()
                values = values[order.to(values.device)]
            positions = _sample_positions(theta0.numel()).to(theta0.device)
            # (names the caller gives entries of their own stay entries: apply refuses them as shared memory)
            aliases = tuple(n for n in names_of.get(id(theta0), ()) if n not in deltas and n not in dense)
            tensors[name] = DiffTensor(tuple(theta0.shape), theta0.dtype, index.clone(), values, positions,
                                       _true_values(record, theta0, positions).to(torch.float32), gates[name],
                                       aliases)
        dense = {name: _true_tensor(record, p).clone() for name, p in dense.items()}
        return cls(tensors, dense, info)

    # ---- summary -----------------------------------------------------------------------------

    @property
    def nnz(self) -> int:
        """Nonzero entries over all gated tensors."""
        return sum(t.nnz for t in self.tensors.values())

    @property
    def total(self) -> int:
        """Elements of all gated base tensors."""
        return sum(t.numel for t in self.tensors.values())

    @property
    def sparsity(self) -> float:
        """nnz / total (the fraction of gated base elements the diff changes)."""
        return self.nnz / self.total if self.total else 0.0

    @property
    def num_bytes(self) -> int:
        """Bytes of tensor data as saved (indices, values, fingerprints, dense parameters); the
        file adds a JSON header."""
        gated = sum(t.nnz * (_index_dtype(t.numel).itemsize + 4) + t.base_index.numel() * 12
                    for t in self.tensors.values())
        return gated + sum(d.numel() * d.element_size() for d in self.dense.values())

    @property
    def dense_num_bytes(self) -> int:
        """Bytes of the gated base tensors stored dense in their dtypes plus the dense parameters:
        what a full task checkpoint of the same tensors costs."""
        gated = sum(t.numel * t.dtype.itemsize for t in self.tensors.values())
        return gated + sum(d.numel() * d.element_size() for d in self.dense.values())

    def __repr__(self) -> str:
        return (f"SparseDiff(tensors={len(self.tensors)}, nnz={self.nnz}, sparsity={self.sparsity:.4%}, "
                f"dense={len(self.dense)}, num_bytes={self.num_bytes})")

    def to(self, device) -> SparseDiff:
        """A copy with every tensor on `device` (already validated: no checks rerun)."""
        out = object.__new__(SparseDiff)
        out.tensors = {n: t.to(device) for n, t in self.tensors.items()}
        out.dense = {n: d.to(device) for n, d in self.dense.items()}
        out._info, out._base_model, out._id2label = self._info, self._base_model, self._id2label
        return out

    # ---- file --------------------------------------------------------------------------------

    def _file_tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, t in self.tensors.items():
            parts = (t.index.to(_index_dtype(t.numel)), t.values, t.base_index, t.base_values)
            for suffix, tensor in zip(_SUFFIXES, parts, strict=True):
                out[f"{name}.{suffix}"] = tensor
        for name, d in self.dense.items():
            out[f"{name}.dense"] = d
        return out

    def _metadata(self) -> dict[str, str]:
        from . import __version__

        gates = {json.dumps(t.gate, sort_keys=True) for t in self.tensors.values()}
        optional = {"info": self.info, "base_model": self.base_model, "id2label": self.id2label}
        optional = {k: json.dumps(v, sort_keys=True) for k, v in optional.items() if v is not None}
        return {
            "format": FORMAT,
            "format_version": str(FORMAT_VERSION),
            "created_by": f"dpkernels {__version__}",
            "tensors": json.dumps([{"name": n, "shape": list(t.shape), "dtype": _dtype_name(t.dtype), "nnz": t.nnz,
                                    "gate": t.gate, **({"aliases": list(t.aliases)} if t.aliases else {})}
                                   for n, t in self.tensors.items()]),
            "dense": json.dumps([{"name": n, "shape": list(d.shape), "dtype": _dtype_name(d.dtype)}
                                 for n, d in self.dense.items()]),
            "gate_config": gates.pop() if len(gates) == 1 else "null",
            "nnz": str(self.nnz),
            "total": str(self.total),
            "sparsity": repr(self.sparsity),
            "values_dtype": "float32",
            **optional,
        }

    @property
    def base_fingerprint(self) -> str:
        """SHA-256 (hex) of the base fingerprint: every gated tensor's name, shape, dtype and its
        sampled base positions and values. Diffs of the same gated tensors of one base (in one
        dtype) share it; the file's fingerprint itself is what :meth:`check_model` compares."""
        samples = {}
        for name, t in self.tensors.items():
            samples[f"{name}.base_index"], samples[f"{name}.base_values"] = t.base_index, t.base_values
        layout = [[n, list(t.shape), _dtype_name(t.dtype)] for n, t in sorted(self.tensors.items())]
        return _digest(samples, {"tensors": json.dumps(layout)})

    def _serialise(self) -> tuple[bytes, dict[str, str]]:
        """The safetensors bytes of the diff and their metadata (with its sha256)."""
        tensors = {k: t.detach().to("cpu").clone(memory_format=torch.contiguous_format)
                   for k, t in self._file_tensors().items()}
        if len(tensors) != 4 * len(self.tensors) + len(self.dense):
            raise ValueError("tensor names collide after adding the file suffixes")
        metadata = self._metadata()
        metadata["sha256"] = _digest(tensors, metadata)
        return safetensors.torch.save(tensors, metadata), metadata

    def save(self, path) -> int:
        """Write the diff to `path` (safetensors) atomically; returns the file size in bytes.

        The bytes go to a temporary file in the same directory, are flushed and fsynced, and then
        renamed over `path` (os.replace): an interrupted save leaves any existing file intact and
        removes its temporary file.
        """
        data, _ = self._serialise()
        _atomic_write(os.fspath(path), data)
        return len(data)

    @classmethod
    def load(cls, path, device=None) -> SparseDiff:
        """Read and validate a diff written by :meth:`save`; tensors go to `device` (default CPU).

        Raises ValueError naming the problem for anything but a well-formed file: not safetensors,
        truncated or corrupt (checksum), another format or version, missing or extra tensors,
        indices unsorted, duplicated, out of range or of the wrong dtype, values non-finite or of
        the wrong length, metadata inconsistent with the tensors.
        """
        diff, _ = _read(os.fspath(path))
        return diff if device is None else diff.to(device)

    def _pretrained_config(self, metadata: Mapping[str, str]) -> dict:
        """The diff_config.json object for this diff, saved with `metadata` (its file's)."""
        return {
            "format": CONFIG_FORMAT,
            "format_version": CONFIG_FORMAT_VERSION,
            "diff_sha256": metadata["sha256"],
            "created_by": metadata["created_by"],
            "base_model": self.base_model,
            "base_fingerprint": self.base_fingerprint,
            "gate_config": json.loads(metadata["gate_config"]),
            "id2label": None if self.id2label is None else {str(k): v for k, v in self.id2label.items()},
            "nnz": self.nnz,
            "total": self.total,
            "sparsity": self.sparsity,
            "tensors": len(self.tensors),
            "dense": list(self.dense),
            "info": self.info,
        }

    def save_pretrained(self, folder) -> None:
        """Write the diff to `folder` (created if missing) the Hugging Face way: ``diff.safetensors``
        (exactly :meth:`save`'s file) and ``diff_config.json`` (what the file holds, as JSON: the
        base model, fingerprint, gate config, labels, size, how it was made; see the module
        docstring). Each is written atomically, the file first: a save interrupted between the two
        leaves a config that :meth:`from_pretrained` refuses, never a silently mismatched pair."""
        folder = os.fspath(folder)
        os.makedirs(folder, exist_ok=True)
        data, metadata = self._serialise()
        config = self._pretrained_config(metadata)
        _atomic_write(os.path.join(folder, DIFF_WEIGHTS_NAME), data)
        _atomic_write(os.path.join(folder, DIFF_CONFIG_NAME),
                      (json.dumps(config, indent=2, allow_nan=False) + "\n").encode())

    @classmethod
    def from_pretrained(cls, folder, device=None) -> SparseDiff:
        """Read a folder written by :meth:`save_pretrained`: the diff file, validated as :meth:`load`
        does, and its JSON config, which must restate the file in every field (ValueError naming
        the config and the fields otherwise: a config beside another diff file, or edited).
        A missing folder or file is a FileNotFoundError naming it."""
        folder = os.fspath(folder)
        if not os.path.isdir(folder):
            if os.path.exists(folder):
                raise NotADirectoryError(errno.ENOTDIR, "not a folder written by save_pretrained (SparseDiff.load "
                                         "reads a single diff file)", folder)
            raise FileNotFoundError(errno.ENOENT, "no such folder", folder)
        diff_path, config_path = os.path.join(folder, DIFF_WEIGHTS_NAME), os.path.join(folder, DIFF_CONFIG_NAME)
        for path in (config_path, diff_path):
            if not os.path.isfile(path):
                raise FileNotFoundError(errno.ENOENT, "missing from the save_pretrained folder", path)
        config = _read_config(config_path)
        diff, metadata = _read(diff_path)
        expected = diff._pretrained_config(metadata)
        wrong = [k for k in sorted(expected.keys() | config.keys())
                 if _shown(config, k, None) != _shown(expected, k, None)]
        if wrong:
            shown = "; ".join(f"{k} is {_shown(config, k)} in the config, {_shown(expected, k)} in the file"
                              for k in wrong[:3])
            raise ValueError(f"{config_path} disagrees with {diff_path} in {_few(wrong)}: {shown}")
        return diff if device is None else diff.to(device)

    # ---- model -------------------------------------------------------------------------------

    def check_model(self, model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Raise ValueError unless the diff fits `model`: every name a parameter, shapes equal,
        gated bases contiguous, disjoint and of a supported dtype, and the base fingerprint matching
        (read as the base is without any diff applied to it), and the model not diff-pruned (a diff
        written under live gated diffs would add to them: twice the delta if it came from this
        model). Returns (gated, dense) parameters. A tied tensor's other names (``aliases``) that
        are tensors of their own in `model` (untied) are gated targets too, under those names, with
        the same delta and the same fingerprint check."""
        model = _unwrap(model)
        _refuse_gated(model)
        params = _named_targets(model)
        unknown = [n for n in (*self.tensors, *self.dense) if n not in params]
        if unknown:
            raise ValueError(f"the model has no parameters named {_few(unknown)} "
                             f"({len(unknown)} of the diff's {len(self.tensors) + len(self.dense)} names)")
        targets = self._targets(params)
        problems = []
        for name, t in targets.items():
            p = params[name]
            if tuple(p.shape) != t.shape:
                problems.append(f"{name!r} has shape {tuple(p.shape)} in the model, {t.shape} in the diff")
            elif p.dtype not in BASE_DTYPES.values():
                problems.append(f"{name!r} is {p.dtype}; diffs apply to {', '.join(BASE_DTYPES)} tensors")
            elif not p.is_contiguous():
                problems.append(f"{name!r} is not contiguous")
        for name, d in self.dense.items():
            p = params[name]
            if p.shape != d.shape:
                problems.append(f"dense {name!r} has shape {tuple(p.shape)} in the model, {tuple(d.shape)} in the diff")
            elif not p.dtype.is_floating_point:
                problems.append(f"dense {name!r} is {p.dtype} in the model, not floating point")
        if problems:
            more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
            raise ValueError("the diff does not fit the model: " + "; ".join(problems[:3]) + more)
        names = [*targets, *self.dense]
        _check_disjoint(names, [params[n] for n in names])
        self._check_fingerprint(model, params, targets)
        return {n: params[n] for n in targets}, {n: params[n] for n in self.dense}

    def _targets(self, params: Mapping[str, torch.Tensor]) -> dict[str, DiffTensor]:
        """The diff's tensors by the model's names: its own, and each alias that is not the same
        tensor as its name in this model (a tie the model does not have)."""
        untied = {a: n for a, n in self._alias_of.items() if a in params and params[a] is not params[n]}
        return {**self.tensors, **{a: self.tensors[n] for a, n in untied.items()}}

    def _for_targets(self, gated: Mapping[str, torch.Tensor]) -> SparseDiff:
        """This diff with a tensor entry per name of ``gated`` (check_model's: aliases included), for
        the appliers, which write every entry they are given."""
        bound = object.__new__(SparseDiff)
        bound.__dict__.update(self.__dict__)
        bound.tensors = {n: self.tensors[self._alias_of.get(n, n)] for n in gated}
        return bound

    def _check_fingerprint(self, model, params, targets) -> None:
        record = _APPLIED.get(model)
        counts: dict[torch.device, list[tuple[str, torch.Tensor]]] = {}
        for name, t in targets.items():
            if t.base_index.numel() == 0:
                continue
            p = params[name]
            current = _true_values(record, p, t.base_index.to(p.device))
            stored = t.base_values.to(p.device)
            if p.dtype == t.dtype:
                ok = current.to(torch.float32) == stored
            else:
                rel, abs_ = _cast_tolerance(p.dtype, t.dtype)
                stored = stored.double()
                ok = (current.double() - stored).abs() <= rel * stored.abs() + abs_
            counts.setdefault(p.device, []).append((name, (~ok).sum()))
        bad = []
        for entries in counts.values():
            for (name, _), n in zip(entries, torch.stack([c for _, c in entries]).tolist(), strict=True):
                if n:
                    untied = f", untied here from {self._alias_of[name]!r}" if name in self._alias_of else ""
                    bad.append(f"{name!r} ({n} of {targets[name].base_index.numel()} samples{untied})")
        if bad:
            raise ValueError(f"wrong base model: {len(bad)} tensor(s) differ from the base this diff was made for "
                             f"beyond a dtype cast's rounding: {_few(bad, quote=False)}")

    def apply(self, model: nn.Module) -> nn.Module:
        """Merge the diff into `model` in place: gated entries theta[i] = round(acc(theta[i]) + delta_i),
        dense parameters copied; the overwritten values are kept for :meth:`restore`. Everything is
        validated first (:meth:`check_model`, and no diff already applied); on error the model is
        untouched. One kernel launch per (device, base dtype) for the gated entries."""
        plain = _unwrap(model)
        record = _APPLIED.get(plain)
        if record is not None:
            who = "this diff" if record.owner is self else f"a {type(record.owner).__name__}"
            raise ValueError(f"the model already has a diff applied (by {who}); restore() it first")
        gated, dense = self.check_model(plain)
        table = _TargetTable()
        resident = _Resident(self._for_targets(gated), table, gated, dense)
        resident.apply()
        _APPLIED[plain] = _Applied(self, table, resident)
        return model

    def restore(self, model: nn.Module) -> nn.Module:
        """Undo :meth:`apply` on `model`: the saved base values written back bit for bit. Also on a
        model diff-pruned since (apply refuses one): that returns its frozen base to the true base."""
        plain = _unwrap(model)
        record = _APPLIED.get(plain)
        if record is None or record.owner is not self:
            now = "nothing" if record is None else f"another {type(record.owner).__name__}"
            raise ValueError(f"this diff is not applied to the model ({now} is); a diff restores only what it "
                             "applied itself (dpkernels.sparse.applied(model) returns what is applied)")
        record.table.check()
        record.resident.restore()
        del _APPLIED[plain]
        return model


# --------------------------------------------------------------------------------------------
# File helpers
# --------------------------------------------------------------------------------------------


def check_new_task(name, diff, tasks) -> None:
    """The argument checks of TaskSwitcher.add and MultiTask.add: a string name not in ``tasks``
    and a SparseDiff."""
    if not isinstance(name, str):
        raise TypeError(f"task names are strings, got {type(name).__name__}")
    if name in tasks:
        raise ValueError(f"task {name!r} was already added; remove() it first")
    if not isinstance(diff, SparseDiff):
        raise TypeError(f"add() takes a SparseDiff, got {type(diff).__name__}")


def _digest(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> str:
    """SHA-256 over the metadata (less sha256 itself) and every tensor's name, dtype, shape and bytes."""
    h = hashlib.sha256()
    h.update(json.dumps({k: v for k, v in metadata.items() if k != "sha256"}, sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name]
        h.update(json.dumps([name, _dtype_name(t.dtype), list(t.shape)]).encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def _header_metadata(data: bytes) -> dict | None:
    """The ``__metadata__`` of a safetensors buffer (whose header safetensors has already parsed)."""
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + n].decode("utf-8")).get("__metadata__")


def _read(path: str) -> tuple[SparseDiff, dict[str, str]]:
    """The validated diff in the file at `path` and the file's metadata (ValueError naming `path`)."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        raw = safetensors.torch.load(data)
        metadata = _header_metadata(data)
    except (safetensors.SafetensorError, ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not a readable safetensors file ({exc})") from None
    try:
        return _parse(raw, metadata), metadata
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None


def _shown(record: Mapping, key: str, limit: int | None = 80) -> str:
    """record[key] as canonical JSON (so 1, 1.0 and true differ), cut to `limit` characters, or "absent"."""
    text = json.dumps(record[key], sort_keys=True) if key in record else "absent"
    return text if limit is None or len(text) <= limit else text[: limit - 3] + "..."


def _read_config(path: str) -> dict:
    """A diff_config.json object, its format and version checked (ValueError naming `path`)."""
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not a JSON file ({exc})") from None
    if not isinstance(config, dict) or config.get("format") != CONFIG_FORMAT:
        got = config.get("format") if isinstance(config, dict) else type(config).__name__
        raise ValueError(f"{path}: not a dpkernels diff config (format {got!r}, expected {CONFIG_FORMAT!r})")
    version = config.get("format_version")
    if version != CONFIG_FORMAT_VERSION:
        newer = isinstance(version, int) and not isinstance(version, bool) and version > CONFIG_FORMAT_VERSION
        raise ValueError(f"{path}: format version {version!r} is {'newer than' if newer else 'not'} the supported "
                         f"{CONFIG_FORMAT_VERSION}" + ("; upgrade dpkernels" if newer else ""))
    return config


def _write_all(f, data: bytes) -> None:
    view = memoryview(data)
    for start in range(0, len(view), _WRITE_CHUNK):
        f.write(view[start : start + _WRITE_CHUNK])


def _open_temp(directory: str, name: str) -> tuple[str, int]:
    """A new file beside the target, created with mode 0o666 (the umask applies, as for open())."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        tmp = os.path.join(directory, f".{name}.{secrets.token_hex(8)}.tmp")
        with contextlib.suppress(FileExistsError):
            return tmp, os.open(tmp, flags, 0o666)


def _atomic_write(path: str, data: bytes) -> None:
    check_save_target(path)
    directory = os.path.dirname(os.path.abspath(path))
    tmp, fd = _open_temp(directory, os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            _write_all(f, data)
            f.flush()
            os.fsync(f.fileno())
        with contextlib.suppress(FileNotFoundError):  # an existing file keeps its permissions
            os.chmod(tmp, os.stat(path).st_mode & 0o7777)
        os.replace(tmp, path)
    except BaseException:  # KeyboardInterrupt included: never leave the temporary file behind
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    # Persist the rename itself; not every filesystem lets a directory be opened or fsynced.
    with contextlib.suppress(OSError):
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _check_info(info) -> dict | None:
    """`info` as JSON writes and reads it back (a dict; ValueError if json cannot write it)."""
    if info is None:
        return None
    if not isinstance(info, Mapping):
        raise ValueError(f"info must be a dict, got {type(info).__name__}")
    try:
        return json.loads(json.dumps(dict(info), allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"info must be JSON-serialisable ({exc})") from None


def _check_base_model(base_model) -> dict | None:
    """`base_model` as {"name_or_path": str, "revision": str | None} (a string or path: the name)."""
    if base_model is None:
        return None
    if isinstance(base_model, (str, os.PathLike)):
        base_model = {"name_or_path": os.fspath(base_model)}
    if not isinstance(base_model, Mapping) or not set(base_model) <= {"name_or_path", "revision"}:
        raise ValueError(f"base_model must be a name or path, or a dict with keys name_or_path and revision, got "
                         f"{base_model!r}")
    name, revision = base_model.get("name_or_path"), base_model.get("revision")
    if not isinstance(name, str) or not name:
        raise ValueError(f"base_model's name_or_path must be a non-empty string, got {name!r}")
    if revision is not None and (not isinstance(revision, str) or not revision):
        raise ValueError(f"base_model's revision must be a non-empty string or None, got {revision!r}")
    return {"name_or_path": name, "revision": revision}


def _check_id2label(id2label) -> dict[int, str] | None:
    """`id2label` as {int: str} in id order; keys may be ints or their decimal strings (as JSON has them)."""
    if id2label is None:
        return None
    if not isinstance(id2label, Mapping) or not id2label:
        raise ValueError(f"id2label must be a non-empty dict of label ids to names, got {id2label!r}")
    out = {}
    for key, name in id2label.items():
        if isinstance(key, str) and key.isdecimal():
            key = int(key)
        if isinstance(key, bool) or not isinstance(key, int) or key < 0 or not isinstance(name, str):
            raise ValueError(f"id2label maps non-negative int ids to str names, got {key!r}: {name!r}")
        if key in out:
            raise ValueError(f"id2label lists id {key} twice")
        out[key] = name
    return dict(sorted(out.items()))


def _record_config(diff: SparseDiff, model: nn.Module, base_model, id2label) -> None:
    """Set diff.base_model and diff.id2label: the given values, else what a transformers model's
    config says (``_name_or_path`` with ``_commit_hash``, and ``id2label``)."""
    config = getattr(model, "config", None)
    if base_model is None and isinstance(getattr(config, "_name_or_path", None), str) and config._name_or_path:
        base_model = {"name_or_path": config._name_or_path, "revision": getattr(config, "_commit_hash", None) or None}
    if id2label is None:
        id2label = getattr(config, "id2label", None) or None
    diff.base_model, diff.id2label = base_model, id2label


def _json_field(metadata: Mapping[str, str], key: str):
    if key not in metadata:
        raise ValueError(f"metadata has no {key!r}")
    try:
        return json.loads(metadata[key])
    except json.JSONDecodeError as exc:
        raise ValueError(f"metadata {key!r} is not JSON ({exc})") from None


def _int_field(metadata: Mapping[str, str], key: str) -> int:
    value = _json_field(metadata, key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"metadata {key!r} must be a non-negative integer, got {metadata[key]!r}")
    return value


def _record(entry, keys: tuple[str, ...], what: str) -> tuple:
    """Fields of one metadata record (a dict with exactly `keys`), name and shape checked."""
    if not isinstance(entry, dict) or set(entry) != set(keys):
        raise ValueError(f"metadata {what} record {entry!r} must have exactly the keys {', '.join(keys)}")
    name, shape = entry["name"], entry["shape"]
    if not isinstance(name, str) or not name:
        raise ValueError(f"metadata {what} record has a bad name {name!r}")
    if not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0
                                              for s in shape):
        raise ValueError(f"metadata {what} {name!r} has a bad shape {shape!r}")
    return tuple(entry[k] for k in keys)


def _parse(raw: dict[str, torch.Tensor], metadata: dict | None) -> SparseDiff:
    """Validate a loaded file's tensors and metadata and build the diff (ValueError otherwise)."""
    if not metadata or metadata.get("format") != FORMAT:
        got = (metadata or {}).get("format")
        raise ValueError(f"not a dpkernels sparse diff (format {got!r}, expected {FORMAT!r})")
    version = metadata.get("format_version")
    if version != str(FORMAT_VERSION):
        newer = version is not None and version.isdigit() and int(version) > FORMAT_VERSION
        raise ValueError(f"format version {version!r} is {'newer than' if newer else 'not'} the supported "
                         f"{FORMAT_VERSION}" + ("; upgrade dpkernels" if newer else ""))
    if "sha256" not in metadata:
        raise ValueError("metadata has no sha256 checksum")
    if _digest(raw, metadata) != metadata["sha256"]:
        raise ValueError("checksum mismatch: the file is corrupt or was modified after it was written")
    if metadata.get("values_dtype") != "float32":
        raise ValueError(f"values_dtype {metadata.get('values_dtype')!r} is not 'float32'")
    records = _json_field(metadata, "tensors")
    dense_records = _json_field(metadata, "dense")
    if not isinstance(records, list) or not isinstance(dense_records, list):
        raise ValueError("metadata 'tensors' and 'dense' must be JSON lists")
    # "aliases" is written only for a tied tensor, so files without ties read in older versions too.
    gated = [_record(e, ("name", "shape", "dtype", "nnz", "gate", *(("aliases",) if isinstance(e, dict) and
                                                                    "aliases" in e else ())), "tensors")
             for e in records]
    dense_info = [_record(e, ("name", "shape", "dtype"), "dense") for e in dense_records]
    names = [g[0] for g in gated] + [d[0] for d in dense_info]
    if len(set(names)) != len(names):
        raise ValueError("metadata lists a tensor name twice")
    expected = {f"{g[0]}.{s}" for g in gated for s in _SUFFIXES} | {f"{d[0]}.dense" for d in dense_info}
    missing, extra = sorted(expected - raw.keys()), sorted(raw.keys() - expected)
    if missing or extra:
        raise ValueError("tensors do not match the metadata:" + (f" missing {_few(missing)}" if missing else "")
                         + (f" extra {_few(extra)}" if extra else ""))
    tensors = {}
    for name, shape, dtype_name, nnz, gate, *aliases in gated:
        if aliases and not (isinstance(aliases[0], list) and aliases[0]):
            raise ValueError(f"tensor {name!r}: metadata aliases {aliases[0]!r} must be a non-empty list of names")
        aliases = aliases[0] if aliases else []
        if dtype_name not in BASE_DTYPES:
            raise ValueError(f"tensor {name!r}: base dtype {dtype_name!r} is not one of {', '.join(BASE_DTYPES)}")
        index = raw[f"{name}.indices"]
        allowed = (torch.int32, torch.int64) if _index_dtype(math.prod(shape)) == torch.int32 else (torch.int64,)
        if index.dtype not in allowed:
            raise ValueError(f"tensor {name!r}: indices are {index.dtype}, expected "
                             f"{' or '.join(_dtype_name(d) for d in allowed)}")
        if isinstance(nnz, bool) or not isinstance(nnz, int) or index.dim() != 1 or index.numel() != nnz:
            raise ValueError(f"tensor {name!r}: metadata says nnz={nnz!r}, the file holds indices of shape "
                             f"{tuple(index.shape)}")
        tensors[name] = DiffTensor(tuple(shape), BASE_DTYPES[dtype_name], index.to(torch.int64),
                                   raw[f"{name}.values"], raw[f"{name}.base_index"], raw[f"{name}.base_values"], gate,
                                   tuple(aliases))
    dense = {}
    for name, shape, dtype_name in dense_info:
        d = raw[f"{name}.dense"]
        if list(d.shape) != shape or _dtype_name(d.dtype) != dtype_name:
            raise ValueError(f"dense {name!r}: the file holds {_dtype_name(d.dtype)} {list(d.shape)}, the metadata "
                             f"says {dtype_name} {shape}")
        dense[name] = d
    optional = {}
    for key, check in (("info", _check_info), ("base_model", _check_base_model), ("id2label", _check_id2label)):
        if key in metadata:
            try:
                optional[key] = check(_json_field(metadata, key))
            except ValueError as exc:
                raise ValueError(f"metadata {key!r}: {exc}") from None
    diff = SparseDiff(tensors, dense, **optional)
    for key, actual in (("nnz", diff.nnz), ("total", diff.total)):
        if _int_field(metadata, key) != actual:
            raise ValueError(f"metadata {key}={metadata[key]} but the tensors give {actual}")
    if metadata.get("sparsity") != repr(diff.sparsity):
        raise ValueError(f"metadata sparsity={metadata.get('sparsity')!r} but the tensors give {diff.sparsity!r}")
    gate_configs = {json.dumps(t.gate, sort_keys=True) for t in diff.tensors.values()}
    shared = gate_configs.pop() if len(gate_configs) == 1 else "null"
    if json.dumps(_json_field(metadata, "gate_config"), sort_keys=True) != shared:
        raise ValueError(f"metadata gate_config={metadata['gate_config']} disagrees with the tensors' gates")
    return diff


# --------------------------------------------------------------------------------------------
# Applying diffs: the kernel-ready layout, the record of what is applied, the switcher
# --------------------------------------------------------------------------------------------

_SCATTER_DTYPES = tuple(BASE_DTYPES.values())


def _named_targets(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter by name (tied ones under each name), and a parametrized parameter's
    ``original`` (its base) also under the plain name ``module.<name>`` that iter_gated uses."""
    out = dict(model.named_parameters(remove_duplicate=False))
    for path, module in model.named_modules():
        for pname, plist in getattr(module, "parametrizations", {}).items():
            if hasattr(plist, "original"):  # weight_norm and the like keep original0, original1, ...
                out.setdefault(f"{path}.{pname}" if path else pname, plist.original)
    return out


def _names_by_tensor(model: nn.Module) -> dict[int, list[str]]:
    """id(tensor) -> its plain names in ``model`` (a tied tensor has several; a parametrization's
    internal ``parametrizations.<name>.original`` names are left out)."""
    out: dict[int, list[str]] = {}
    for name, t in _named_targets(model).items():
        if ".parametrizations." not in f".{name}":
            out.setdefault(id(t), []).append(name)
    return out


def _refuse_gated(model: nn.Module) -> None:
    gated = next(iter_gated(model), None)
    if gated is not None:
        raise ValueError(f"the model is diff-pruned (gated tensors such as {gated[0]!r}): apply diffs to the "
                         "plain base model, not on top of a live diff (a diff applied to the model it came "
                         "from would count twice)")


def _scatter_backend(device: torch.device, dtype: torch.dtype, op: str):
    return select(op, device, dtype, dtypes=_SCATTER_DTYPES, primitive=op)


def _check_disjoint(names: list[str], tensors: list[torch.Tensor]) -> None:
    """Tensors a diff writes must not share memory (tied weights): each address is written once,
    so that restore is exact and the one-launch kernel has no write races."""
    spans = sorted((t.device.type, t.device.index or 0, t.data_ptr(), t.data_ptr() + t.numel() * t.element_size(), n)
                   for n, t in zip(names, tensors, strict=True) if t.numel())
    for a, b in zip(spans, spans[1:], strict=False):
        if a[:2] == b[:2] and b[2] < a[3]:
            raise ValueError(f"parameters {a[4]!r} and {b[4]!r} share memory (tied weights); a diff may write each "
                             "tensor's memory once, so list only one of them")


class _TargetTable:
    """The model tensors that diffs write, and per (device, dtype) an int64 table of their data
    pointers for the one-launch kernels.

    Holds each Parameter (to detect reallocation) and a detached view of its data (what the
    kernels write; it keeps the storage alive, so a stale pointer never points at freed memory).
    """

    def __init__(self):
        self.params: list[torch.Tensor] = []
        self.names: list[str] = []  # the first name each parameter was added under (for messages)
        self.held: list[torch.Tensor] = []
        self.ptrs: list[int] = []
        self.slots: dict[int, tuple[tuple, int, int]] = {}  # id(param) -> (group key, position in group, index)
        self.members: dict[tuple, list[int]] = {}  # group key -> indices into params
        self.tables: dict[tuple, torch.Tensor] = {}  # group key -> int64 data pointers, on the group's device
        self.targets: dict[tuple, list[torch.Tensor]] = {}  # group key -> held views, in table order

    def slot(self, param: torch.Tensor, name: str) -> tuple[tuple, int, int]:
        """(group key, position in the group, index in params) of `param`, added if new."""
        if id(param) not in self.slots:
            key = (param.device, param.dtype)
            members = self.members.setdefault(key, [])
            self.slots[id(param)] = (key, len(members), len(self.params))
            members.append(len(self.params))
            self.params.append(param)
            self.names.append(name)
            self.held.append(param.detach())
            self.ptrs.append(param.data_ptr())
            self._build(key)
        return self.slots[id(param)]

    def _build(self, key) -> None:
        members = self.members[key]
        self.tables[key] = torch.tensor([self.ptrs[i] for i in members], dtype=torch.int64, device=key[0])
        self.targets[key] = [self.held[i] for i in members]

    def check(self) -> None:
        """Before any launch: every parameter must still live where the tables point. A parameter
        reallocated with the same device, dtype and shape (its values moved along) is followed;
        one moved to another device or dtype or reshaped leaves the held state invalid: raise."""
        now = [p.data_ptr() for p in self.params]
        if now == self.ptrs:
            return
        for i, p in enumerate(self.params):
            if now[i] == self.ptrs[i]:
                continue
            held = self.held[i]
            if (p.device, p.dtype, p.shape) != (held.device, held.dtype, held.shape) or not p.is_contiguous():
                raise RuntimeError(
                    f"parameter {self.names[i]!r} ({tuple(held.shape)}, {held.dtype}, {held.device}) was moved to "
                    f"({tuple(p.shape)}, {p.dtype}, {p.device}) while a diff or TaskSwitcher holds it; restore or "
                    "reset before moving the model, then build a new TaskSwitcher")
            self.held[i], self.ptrs[i] = p.detach(), now[i]
        for key in self.members:
            self._build(key)


@dataclass
class _Group:
    """One diff's entries for one (device, dtype) group of a _TargetTable, kernel-ready."""

    ids: torch.Tensor  # int32: position of each entry's tensor in the group's table
    index: torch.Tensor  # int32 (int64 when a tensor has >= 2**31 elements): flat index in that tensor
    values: torch.Tensor  # float32
    saved: torch.Tensor  # the group's dtype: originals written by apply, read by restore
    starts: list[int]  # entries of table position t: starts[t]:starts[t + 1]


class _Resident:
    """A diff laid out for a _TargetTable: per (device, dtype) group its entries (``groups``); per
    gated parameter (keyed by id, as names can alias) its entry range (``spans``: (key, lo, hi));
    per dense parameter (index in the table's params, the value in the parameter's dtype, a buffer
    for the saved original)."""

    def __init__(self, diff: SparseDiff, table: _TargetTable, gated: dict, dense: dict):
        self.table = table
        self.groups: dict[tuple, _Group] = {}
        self.spans: dict[int, tuple[tuple, int, int]] = {}
        self.dense: dict[int, tuple[int, torch.Tensor, torch.Tensor]] = {}
        self.id2label = diff.id2label  # for merge_and_unload by task name
        by_key: dict[tuple, list] = {}
        for name, t in diff.tensors.items():
            if t.nnz:
                key, pos, _ = table.slot(gated[name], name)
                by_key.setdefault(key, []).append((pos, id(gated[name]), t))
        for key, items in by_key.items():
            items.sort(key=lambda item: item[0])
            counts = [0] * (items[-1][0] + 1)
            lo = 0
            for pos, param_id, t in items:
                counts[pos] = t.nnz
                self.spans[param_id] = (key, lo, lo + t.nnz)
                lo += t.nnz
            starts = [0]
            for c in counts:
                starts.append(starts[-1] + c)
            device, dtype = key
            index_dtype = _index_dtype(max(t.numel for _, _, t in items))
            ids = torch.repeat_interleave(torch.arange(len(counts), dtype=torch.int32), torch.tensor(counts))
            index = torch.cat([t.index.to(device) for _, _, t in items]).to(index_dtype)
            values = torch.cat([t.values.to(device) for _, _, t in items])
            self.groups[key] = _Group(ids.to(device), index, values,
                                      torch.empty(lo, dtype=dtype, device=device), starts)
        for name, value in diff.dense.items():
            p = dense[name]
            self.dense[id(p)] = (table.slot(p, name)[2], value.to(p.device, p.dtype, copy=True), torch.empty_like(p))

    def _dense_targets(self) -> list[torch.Tensor]:
        return [self.table.held[i] for i, _, _ in self.dense.values()]

    def _backends(self, op: str) -> list:
        """(key, group, backend) for every group, all resolved before any launch: a dispatch error
        must not leave the model half written."""
        return [(key, g, _scatter_backend(*key, op)) for key, g in self.groups.items()]

    def apply(self) -> None:
        for key, g, backend in self._backends("scatter_apply"):
            backend.scatter_apply(self.table.targets[key], self.table.tables[key], g.ids, g.index, g.values,
                                  g.starts, g.saved)
        if self.dense:
            with torch.no_grad():
                targets = self._dense_targets()
                torch._foreach_copy_([s for _, _, s in self.dense.values()], targets)
                torch._foreach_copy_(targets, [v for _, v, _ in self.dense.values()])

    def restore(self) -> None:
        for key, g, backend in self._backends("scatter_restore"):
            backend.scatter_restore(self.table.targets[key], self.table.tables[key], g.ids, g.index, g.starts,
                                    g.saved)
        if self.dense:
            with torch.no_grad():
                torch._foreach_copy_(self._dense_targets(), [s for _, _, s in self.dense.values()])


@dataclass
class _Applied:
    """What is applied to a model now: by whom (a SparseDiff or TaskSwitcher), and its layout."""

    owner: object
    table: _TargetTable
    resident: _Resident


# model -> what is applied to it now. Weak keys: a model that is garbage collected drops its record.
_APPLIED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# model -> the TaskSwitchers built on it (weak both ways): merge_and_unload retires them all, or one
# idle at the time would later write its saved "base" values into the merged model.
_SWITCHERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def applied(model: nn.Module):
    """What is applied to `model` now: the SparseDiff (after its ``apply``) or the TaskSwitcher
    (while a task is active), or None."""
    record = _APPLIED.get(_unwrap(model))
    return None if record is None else record.owner


def _claim(model: nn.Module, owner) -> None:
    record = _APPLIED.get(model)
    if record is not None and record.owner is not owner:
        who = type(record.owner).__name__
        raise ValueError(f"the model already has a diff applied (by a {who}); restore() it or reset() the "
                         "TaskSwitcher first")


def _held_id(table: _TargetTable, param: torch.Tensor) -> int:
    """id of the parameter `table` holds for `param`: param itself, or the one over the same memory
    (diff_prune after an apply wraps each Linear's weight and bias in a new Parameter on its storage)."""
    if id(param) not in table.slots:
        same = (param.data_ptr(), param.shape, param.dtype, param.device)
        for p, held in zip(table.params, table.held, strict=True):
            if (held.data_ptr(), held.shape, held.dtype, held.device) == same:
                return id(p)
    return id(param)


def _true_values(record: _Applied | None, param: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """param's flat values at `positions` as they are without the applied diff (its saved originals)."""
    values = param.detach().reshape(-1)[positions]
    if record is None:
        return values
    held = _held_id(record.table, param)
    if held in record.resident.dense:
        return record.resident.dense[held][2].reshape(-1)[positions]
    span = record.resident.spans.get(held)
    if span is not None:
        key, lo, hi = span
        group = record.resident.groups[key]
        index, saved = group.index[lo:hi].to(torch.int64), group.saved[lo:hi]
        k = torch.searchsorted(index, positions).clamp(max=hi - lo - 1)
        values = torch.where(index[k] == positions, saved[k], values)
    return values


def _true_tensor(record: _Applied | None, param: torch.Tensor) -> torch.Tensor:
    """param as it is without the applied diff."""
    positions = torch.arange(param.numel(), device=param.device)
    return _true_values(record, param, positions).view(param.shape)


class TaskSwitcher:
    """Many task diffs resident on the model's device; ``switch(name)`` restores the active task's
    saved base values and applies `name`'s: two launches per (device, base dtype), O(nnz), and the
    base comes back bit for bit however many switches happen.

        switcher = TaskSwitcher(model).add("sst2", diff_a).add("mnli", diff_b)
        switcher.switch("sst2"); ...; switcher.switch("mnli"); ...; switcher.reset()
        with switcher.task("sst2"): ...     # then the task active before (or the base) again

    ``add`` validates the diff against the model (names, shapes, base fingerprint) and builds its
    kernel-ready layout once (pointer table, tensor ids, indices, values, a buffer for the saved
    originals). While the switcher holds the model, do not move, cast or modify its parameters in
    place: ``switch`` checks the data pointers (a reallocation on the same device and dtype is
    followed; a move to another device or dtype raises), but it cannot see parameters replaced by
    new objects (``load_state_dict(assign=True)``), values written in place or a ``diff_prune``
    (``add`` refuses a diff-pruned model, as :meth:`SparseDiff.apply` does). ``reset()`` first.
    A wrapped model (``torch.compile``, DistributedDataParallel, DataParallel) switches the plain
    model inside it, which the wrapper shares.

    A ``torch.compile``'d model follows the switches with one graph (its parameters are graph
    inputs, written in place here), but not under inductor's freezing
    (``torch._inductor.config.freezing``), which bakes the weights in as constants.
    """

    def __init__(self, model: nn.Module):
        if not isinstance(model, nn.Module):
            raise TypeError(f"TaskSwitcher takes an nn.Module, got {type(model).__name__}")
        model = _unwrap(model)  # the switched weights are the plain model's, shared by its wrappers
        # Weak: the record of what is applied (keyed weakly by the model) refers to this switcher,
        # so a strong reference here would keep a discarded model alive.
        self._model = weakref.ref(model)
        self._table = _TargetTable()
        self._tasks: dict[str, _Resident] = {}
        self._active: str | None = None
        self._unloaded = False  # merge_and_unload handed the model over: nothing may write to it again
        _SWITCHERS.setdefault(model, weakref.WeakSet()).add(self)

    def _check_owned(self) -> None:
        if self._unloaded:
            raise RuntimeError("this TaskSwitcher's model was merged and unloaded (dpkernels.merge_and_unload): it "
                               "is no longer the switcher's to write; build a new TaskSwitcher on a fresh base")

    @property
    def model(self) -> nn.Module:
        self._check_owned()
        model = self._model()
        if model is None:
            raise RuntimeError("the TaskSwitcher's model no longer exists")
        return model

    @property
    def active(self) -> str | None:
        """The task applied now, or None (the base)."""
        return self._active

    @property
    def tasks(self) -> list[str]:
        return list(self._tasks)

    def __contains__(self, name) -> bool:
        return name in self._tasks

    def __len__(self) -> int:
        return len(self._tasks)

    def __repr__(self) -> str:
        return f"TaskSwitcher(tasks={self.tasks}, active={self._active!r})"

    def add(self, name: str, diff: SparseDiff) -> TaskSwitcher:
        """Validate `diff` against the model and keep it resident under `name`; returns self."""
        check_new_task(name, diff, self._tasks)
        gated, dense = diff.check_model(self.model)
        self._tasks[name] = _Resident(diff._for_targets(gated), self._table, gated, dense)
        return self

    def _get(self, name: str) -> _Resident:
        self._check_owned()
        if name not in self._tasks:
            raise KeyError(f"no task {name!r}; added: {self.tasks}")
        return self._tasks[name]

    def switch(self, name: str) -> TaskSwitcher:
        """Make `name` the applied task (restore the active one first); returns self."""
        resident = self._get(name)
        if name == self._active:
            return self
        _claim(self.model, self)
        self._table.check()
        self._release()
        resident.apply()
        self._active = name
        _APPLIED[self.model] = _Applied(self, self._table, resident)
        return self

    def _release(self) -> None:
        if self._active is not None:
            self._tasks[self._active].restore()
            self._active = None
            _APPLIED.pop(self.model, None)

    def reset(self) -> TaskSwitcher:
        """Restore the base (no task applied); returns self."""
        self._check_owned()
        if self._active is not None:
            self._table.check()
            self._release()
        return self

    def remove(self, name: str) -> TaskSwitcher:
        """Drop task `name` (restoring the base first if it is active); returns self."""
        self._get(name)
        if name == self._active:
            self.reset()
        del self._tasks[name]
        return self

    @contextlib.contextmanager
    def task(self, name: str):
        """``with switcher.task(name):`` runs the block with task `name` applied, then makes the
        task that was active before (or the base) active again, bit for bit, also when the block
        raises. Nests. An unknown name raises KeyError (naming the added tasks) before anything
        changes; removing the previous task inside the block makes the exit raise KeyError."""
        self._get(name)
        previous = self._active
        self.switch(name)
        try:
            yield self
        finally:
            if previous is None:
                self.reset()
            else:
                self.switch(previous)

    def _unload(self) -> None:
        """Give the model up (merge_and_unload merged into it): every task's saved state freed, and
        the switcher refusing all further use, so that it never restores into the merged model."""
        self._tasks.clear()
        self._table = _TargetTable()
        self._active = None
        self._unloaded = True


def merge_and_unload(model_or_switcher: nn.Module | TaskSwitcher, diff: SparseDiff | str | None = None) -> nn.Module:
    """Merge a diff into a model for good and return the plain model: its parameters are exactly
    what ``diff.apply`` writes (base + diff, bit for bit), and no dpkernels state is left on it
    (nothing applied, nothing to restore), so transformers' own ``save_pretrained`` /
    ``from_pretrained`` round-trip it. Like peft's ``merge_and_unload`` it merges **in place** and
    returns the model itself (the plain one inside a torch.compile / DDP wrapper); copy the model
    first to keep the base.

    `model_or_switcher` is a model with `diff` (a SparseDiff; the model may already have this very
    diff applied, which is then kept), or a :class:`TaskSwitcher` with `diff` the name of one of
    its tasks, a SparseDiff, or None for the active task. Every TaskSwitcher on the model is then
    done: it no longer owns the model and refuses every later call (it can never restore into the
    merged model).
    When the diff records labels (``id2label``) and the model has a transformers config, the
    config takes them (``id2label`` and ``label2id``), so the saved model names its classes.
    A diff-pruned (gated) model is refused, as :meth:`SparseDiff.apply` refuses it (its own diff
    is ``SparseDiff.from_model(model)``, to merge into the plain base); so is a model another diff
    or switcher holds. Everything is checked before the model is written.
    """
    if isinstance(model_or_switcher, TaskSwitcher):
        switcher = model_or_switcher
        model = switcher.model
        _refuse_gated(model)
        diff = switcher.active if diff is None else diff
        if diff is None:
            raise ValueError(f"no task is active on the TaskSwitcher; name one of {switcher.tasks}")
        if isinstance(diff, str):
            labels = _check_labels(model, switcher._get(diff).id2label)
            switcher.switch(diff)  # validates before it writes
        elif isinstance(diff, SparseDiff):
            diff.check_model(model)
            labels = _check_labels(model, diff.id2label)
            switcher.reset()
            diff.apply(model)
        else:
            raise TypeError(f"merge_and_unload takes a task name or a SparseDiff with a TaskSwitcher, got "
                            f"{type(diff).__name__}")
    elif isinstance(model_or_switcher, nn.Module):
        if not isinstance(diff, SparseDiff):
            raise TypeError(f"merge_and_unload(model, diff) takes a SparseDiff, got {type(diff).__name__}"
                            + (" (a task name needs the TaskSwitcher)" if isinstance(diff, str) else ""))
        model = _unwrap(model_or_switcher)
        _refuse_gated(model)
        record = _APPLIED.get(model)
        if record is not None and record.owner is not diff:
            who = "a TaskSwitcher: pass the switcher" if isinstance(record.owner, TaskSwitcher) else \
                "another SparseDiff: restore() it first"
            raise ValueError(f"the model has a diff applied by {who}")
        labels = _check_labels(model, diff.id2label)
        if record is None:
            diff.apply(model)
    else:
        raise TypeError(f"merge_and_unload takes a model or a TaskSwitcher, got {type(model_or_switcher).__name__}")
    _APPLIED.pop(model, None)  # the merge is for good: nothing may restore it
    for switcher in list(_SWITCHERS.pop(model, ())):
        switcher._unload()
    if labels is not None:
        model.config.id2label = dict(labels)
        model.config.label2id = {name: i for i, name in labels.items()}
    return model


def _check_labels(model: nn.Module, id2label: dict[int, str] | None) -> dict[int, str] | None:
    """The diff's labels that merge_and_unload writes into the model's config (None: leave the
    config alone); ValueError when they count another number of classes than the config has."""
    config = getattr(model, "config", None)
    if id2label is None or not hasattr(config, "id2label"):
        return None
    if len(id2label) != len(config.id2label or {}):
        raise ValueError(f"the diff's labels {list(id2label.values())} are not as many as the model config's "
                         f"{len(config.id2label or {})}; set diff.id2label = None to keep the config's labels")
    return id2label
