"""dpkernels: fast diff pruning (Guo, Rush & Kim, ACL 2021) for PyTorch.

Public API (DESIGN.md section 5): sample_gates, eval_gates, expected_l0, diff_linear, DiffLinear,
info; AdamW (torch's, bit for bit, stepping many small tensors as one); SparseDiff, TaskSwitcher
and MultiTask (mixed-task batches) serve task diffs. Backends (torch reference, Triton, CUDA) are
chosen per call by DPKERNELS_BACKEND.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from .backends import BackendUnavailable
from .multitask import MultiTask
from .nn import DiffLinear, GatedParameter
from .ops import diff_linear, eval_gates, expected_l0, fixed_mask_linear, gate_apply, sample_gates
from .optim import AdamW
from .prune import L0Target, clip_grad_norms, diff_prune, l0_penalty, log_alpha_lr, optimizer_groups, project
from .sparse import SparseDiff, TaskSwitcher, merge_and_unload

try:
    __version__ = version("dpkernels")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0+unknown"

__all__ = [
    "AdamW",
    "BackendUnavailable",
    "L0Target",
    "DiffLinear",
    "GatedParameter",
    "MultiTask",
    "SparseDiff",
    "TaskSwitcher",
    "clip_grad_norms",
    "diff_prune",
    "diff_linear",
    "eval_gates",
    "expected_l0",
    "fixed_mask_linear",
    "gate_apply",
    "info",
    "l0_penalty",
    "log_alpha_lr",
    "merge_and_unload",
    "optimizer_groups",
    "project",
    "sample_gates",
]


def info() -> dict:
    """Versions, the CUDA device (queried now, not at import), backends available and chosen."""
    import torch

    from . import backends

    try:
        triton_version = version("triton")
    except PackageNotFoundError:
        triton_version = None
    cuda = torch.cuda.is_available()
    report = {
        "dpkernels": __version__,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda_device": torch.cuda.get_device_name() if cuda else None,
    }
    report.update(backends.info())
    return report
