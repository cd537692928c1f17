"""Checkpoint and resume for diff-pruning runs, exactly: same gates, same final diff.

A checkpoint holds the model's state (in whichever stage each gated tensor is: L0 gates or a
fixed mask), the optimizer's state, the step and torch's RNG states. The RNG states matter: gate
seeds are drawn from torch's default CPU generator, so restoring it replays the same gates.
"""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Callable, Mapping

import torch
from torch import nn

from .nn import DiffLinear, GatedParameter, iter_gated

FORMAT = "dpkernels.checkpoint"
VERSION = 1


def check_save_target(path: str) -> None:
    """Raise for a target that cannot be written, naming it (not the temporary file beside it)."""
    if os.path.isdir(path):
        raise IsADirectoryError(errno.EISDIR, "is a folder; give a file name", path)
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise FileNotFoundError(errno.ENOENT, f"the folder {directory} does not exist", path)


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Run ``write(tmp_path)`` on a temporary file beside ``path``, fsync it, then rename it over
    ``path``: an interrupted save leaves the previous file intact and no temporary behind."""
    path = os.fspath(path)
    check_save_target(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_checkpoint(path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, *, step: int = 0,
                    extra: dict | None = None) -> None:
    """Save model, optimizer, step, RNG states and each gated tensor's stage (atomically)."""
    state = {
        "format": FORMAT,
        "version": VERSION,
        "step": int(step),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "masks": {name: gt.index.cpu() for name, _, gt in iter_gated(model) if gt.fixed_mask},
        "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "extra": extra or {},
    }
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path, model: nn.Module, make_optimizer: Callable[[nn.Module], torch.optim.Optimizer] | None = None,
                    *, restore_rng: bool = True) -> tuple[torch.optim.Optimizer | None, dict]:
    """Restore a checkpoint into a freshly diff-pruned ``model`` (same architecture and options).

    Gated tensors that were in the fixed-mask stage enter it again (with the saved masks) before
    the state is loaded; then ``make_optimizer(model)``, if given, builds the optimizer, which gets
    its saved state. Returns (optimizer or None, {"step", "extra"}).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(errno.ENOENT, "no such checkpoint file", os.fspath(path))
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling/zip errors of every kind mean an unusable file
        raise ValueError(f"{path} is not a readable checkpoint: {str(exc) or type(exc).__name__}") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT or ckpt.get("version") != VERSION:
        raise ValueError(f"{path} is not a {FORMAT} version {VERSION} file")
    gated = {name: (module, gt) for name, module, gt in iter_gated(model)}
    unknown = set(ckpt["masks"]) - set(gated)
    if unknown:
        raise ValueError(f"the checkpoint has masks for tensors the model does not gate: {sorted(unknown)[:3]}")
    per_module: dict[int, tuple[nn.Module, dict]] = {}
    for name, index in ckpt["masks"].items():
        module, gt = gated[name]
        if not gt.fixed_mask:
            per_module.setdefault(id(module), (module, {}))[1][gt.name] = index.to(gt.theta0.device)
    for module, indices in per_module.values():
        module.set_masks(indices)
    model.load_state_dict(ckpt["model"])
    optimizer = None
    if make_optimizer is not None:
        optimizer = make_optimizer(model)
        if ckpt["optimizer"] is not None:
            optimizer.load_state_dict(ckpt["optimizer"])
    if restore_rng:
        torch.set_rng_state(ckpt["rng_cpu"])
        if ckpt["rng_cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(ckpt["rng_cuda"])
    return optimizer, {"step": ckpt["step"], "extra": ckpt["extra"]}


def enter_saved_masks(model: nn.Module, state: Mapping[str, torch.Tensor]) -> int:
    """Put the gated modules of a freshly diff-pruned ``model`` into the fixed-mask stage with the
    masks a state dict of that stage holds (its ``*diff_index`` entries), so that the state dict,
    and an optimizer state saved with it, then fit. Modules already in that stage, or with no
    saved mask, are left alone. Returns how many modules entered the stage."""
    entered = 0
    for path, module in model.named_modules():
        if not isinstance(module, (DiffLinear, GatedParameter)) or module.fixed_mask:
            continue
        prefix = f"{path}." if path else ""
        keys = {"weight": "diff_index", "bias": "bias_diff_index"} if isinstance(module, DiffLinear) else \
            {"weight": "diff_index"}
        indices = {name: state[prefix + key] for name, key in keys.items() if prefix + key in state}
        if indices:
            device = next(t for t in module.parameters()).device
            module.set_masks({name: index.to(device) for name, index in indices.items()})
            entered += 1
    return entered
