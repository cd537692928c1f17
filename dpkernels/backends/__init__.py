"""Backend registry and dispatch: the one place that decides which implementation runs an op.

Every backend module offers the same primitives (``gate_forward``, ``gate_backward``, and where
written ``sddmm``, ``scatter_apply``, ``scatter_restore``, ``segmented_spmm``, ``segmented_gather``; the
signatures of ``dpkernels.reference``):

    torch   dpkernels.reference   any device, any float dtype (the oracle and CPU fallback); large
                                  CPU tensors' gate passes fused by torch.compile, dense-enough CPU
                                  masks' sddmm by one GEMM, the segmented products of mixed-task
                                  batches by torch.sparse (torch_fused.py)
    triton  backends/triton       CUDA tensors, or CPU tensors under TRITON_INTERPRET=1; fp32 gates
    cuda    backends/cuda         the compiled extension dpkernels._C; CUDA tensors, fp32 gates

``DPKERNELS_BACKEND=auto|triton|cuda|torch`` (read at every call). ``auto`` takes the first of
triton, cuda, torch that can run the op on the tensors' device; an explicit choice that cannot
run raises :class:`BackendUnavailable`. Nothing here touches the GPU or imports triton at import
time; :func:`info` reports what is available and which backend each op last ran on.
"""

from __future__ import annotations

import importlib
import importlib.util
import os

import torch

BACKENDS = ("triton", "cuda", "torch")
_ENV = "DPKERNELS_BACKEND"
_AUTO_ORDER = {"cuda": ("triton", "cuda", "torch")}  # other devices: torch only
_loaded: dict[str, object] = {}
_load_errors: dict[str, str] = {}
_last_used: dict[str, str] = {}


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run here (not installed, not built, or wrong device/dtype)."""


def requested() -> str:
    name = os.environ.get(_ENV, "auto").strip().lower() or "auto"
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"{_ENV}={name!r} is not one of auto, {', '.join(BACKENDS)}")
    return name


def _import(name: str):
    if name == "torch":
        return importlib.import_module("dpkernels.backends.torch_fused")
    if name == "triton":
        if importlib.util.find_spec("triton") is None:
            raise ImportError("triton is not installed (pip install triton)")
        return importlib.import_module("dpkernels.backends.triton")
    return importlib.import_module("dpkernels.backends.cuda").load()


def load(name: str):
    """The backend module, imported once; raises BackendUnavailable with the import error (and
    ValueError for a name that is no backend)."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of {', '.join(BACKENDS)}")
    if name not in _loaded and name not in _load_errors:
        try:
            _loaded[name] = _import(name)
        except Exception as exc:  # any import failure makes the backend unavailable, with its reason
            _load_errors[name] = f"{type(exc).__name__}: {exc}"
    if name in _load_errors:
        raise BackendUnavailable(f"the {name} backend is unavailable: {_load_errors[name]}")
    return _loaded[name]


def preload() -> None:
    """Import every backend that can load here, once. The gated modules call it when built: the
    first call of a model under torch.compile would otherwise import its backend inside the trace,
    which dynamo refuses (a graph break; an error under fullgraph=True)."""
    for name in BACKENDS:
        try:
            load(name)
        except BackendUnavailable:
            pass


def unsupported_reason(name: str, device: torch.device, dtype: torch.dtype, *,
                       dtypes: tuple[torch.dtype, ...] | None = None) -> str | None:
    """Why backend `name` cannot run on tensors of this device and dtype, or None.

    ``dtypes``: the dtypes the op's kernels take (None: the gate ops' float32 diff and log_alpha;
    the scatter ops pass the base-weight dtypes they support).
    """
    if name == "torch":
        return None
    interpreted = name == "triton" and device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"
    if device.type != "cuda" and not interpreted:
        hint = " (or CPU tensors under TRITON_INTERPRET=1)" if name == "triton" else ""
        return f"it runs on CUDA tensors{hint}, got {device.type} tensors"
    if dtypes is None:
        if dtype != torch.float32:
            return f"it takes float32 diff and log_alpha, got {dtype}"
    elif dtype not in dtypes:
        return f"it takes {', '.join(str(d).removeprefix('torch.') for d in dtypes)} tensors, got {dtype}"
    return None


def select(op: str, device: torch.device, dtype: torch.dtype, *, dtypes: tuple[torch.dtype, ...] | None = None,
           primitive: str | None = None):
    """The backend module that runs `op` for tensors of this device and dtype.

    ``dtypes`` as in :func:`unsupported_reason`. ``primitive``: the function the caller will use;
    ``auto`` skips backends that lack it (a kernel not written yet for that backend) and an
    explicit choice that lacks it raises BackendUnavailable.
    """
    choice = requested()
    if choice != "auto":
        reason = unsupported_reason(choice, device, dtype, dtypes=dtypes)
        if reason:
            raise BackendUnavailable(f"{_ENV}={choice} cannot run {op}: {reason}")
        module = load(choice)
        if primitive is not None and not hasattr(module, primitive):
            raise BackendUnavailable(f"{_ENV}={choice} cannot run {op}: the {choice} backend has no {primitive}")
        _last_used[op] = choice
        return module
    for name in _AUTO_ORDER.get(device.type, ("torch",)):
        if unsupported_reason(name, device, dtype, dtypes=dtypes) is None:
            try:
                module = load(name)
            except BackendUnavailable:
                continue
            if primitive is not None and not hasattr(module, primitive):
                continue
            _last_used[op] = name
            return module
    raise BackendUnavailable(f"no backend can run {op} on {device}")  # unreachable: torch runs all


def info() -> dict:
    """Per backend whether it loads ("available", else the "reason") and the devices it runs on
    here ("runs_on": triton and cuda load without a GPU but run on none), the requested one, and
    the last backend used per op."""
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    report = {}
    for name in BACKENDS:
        try:
            load(name)
        except BackendUnavailable as exc:
            report[name] = {"available": False, "reason": str(exc), "runs_on": []}
            continue
        runs_on = [d.type for d in devices if unsupported_reason(name, d, torch.float32) is None]
        report[name] = {"available": True, "reason": None, "runs_on": runs_on}
    return {"requested": requested(), "backends": report, "last_used": dict(_last_used)}
