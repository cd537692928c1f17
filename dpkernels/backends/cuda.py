"""CUDA C++ backend: the compiled extension ``dpkernels._C`` (sources in csrc/).

The extension is optional. It is imported only when the cuda backend is asked for (never when
dpkernels is imported), and a missing or broken build raises an ImportError that says how to build
it; the dispatcher turns that into BackendUnavailable and dpkernels.info() reports it.

``gate_forward`` / ``gate_backward``, ``scatter_apply`` / ``scatter_restore`` and ``sddmm`` here
have the signatures and return values of :mod:`dpkernels.reference`; like the Triton launchers
they normalise the seed (any int in [-2**63, 2**64), read as unsigned 64 bits) and pass contiguous
inputs. The gate math is the Triton kernel's (csrc/gates.cuh); the draws are tl.rand's bit for bit
(csrc/philox.cuh). The scatter merges round exactly as the reference (csrc/scatter.cu), so apply,
restore and a task switch give the same bits on every backend; sddmm accumulates in fp32 (fp64 for
fp64 inputs) and returns that dtype, as the reference.
"""

from __future__ import annotations

import importlib
import sys

import torch

from ..reference import normalize_seed

# Backend primitives and the test hooks the tests rely on; a build lacking one is stale.
_OPS = ("gate_forward", "gate_backward", "scatter_apply", "scatter_restore", "sddmm", "philox4x32", "philox_uniform",
        "hard_concrete_cpu", "scatter_merge_cpu")
_ext = None


def extension():
    """dpkernels._C, imported once; ImportError with the build command when it is missing or stale."""
    global _ext
    if _ext is None:
        try:
            ext = importlib.import_module("dpkernels._C")
        except ImportError as exc:
            raise ImportError(
                "the CUDA extension dpkernels._C is not built (reinstall with a CUDA toolkit and a CUDA "
                "build of torch: DPKERNELS_BUILD_CUDA=1 pip install --no-build-isolation . , with -e when "
                f"running from the source tree): {exc}"
            ) from exc
        missing = [op for op in _OPS if not hasattr(ext, op)]
        if missing:
            raise ImportError(f"dpkernels._C lacks the ops {missing}; rebuild the package")
        _ext = ext
    return _ext


def load():
    """This module, once the extension has loaded (the dispatcher's entry point)."""
    extension()
    return sys.modules[__name__]


def _contiguous(t):
    return None if t is None else t.contiguous()


def gate_forward(log_alpha, seed, offset, training, l, r, beta, theta0=None, diff=None, out_dtype=None):
    """Gates z (fp32) when theta0 is None, else theta0 + z * diff rounded once to out_dtype."""
    return extension().gate_forward(
        log_alpha.contiguous(), normalize_seed(seed) if training else 0, int(offset), bool(training), float(l),
        float(r), float(beta), _contiguous(theta0), _contiguous(diff), out_dtype)


def gate_backward(g, diff, log_alpha, seed, offset, training, l, r, beta, l0_lambda=0.0,
                  grad_diff=None, grad_log_alpha=None):
    """(grad_diff, grad_log_alpha), written fresh or accumulated into the given buffers."""
    return extension().gate_backward(
        g.contiguous(), diff.contiguous(), log_alpha.contiguous(), normalize_seed(seed) if training else 0,
        int(offset), bool(training), float(l), float(r), float(beta), float(l0_lambda), grad_diff, grad_log_alpha)


def scatter_apply(targets, table, ids, index, values, starts, saved):
    """Merge a sparse diff into same-dtype tensors in one launch, saving the overwritten values; returns saved."""
    return extension().scatter_apply(list(targets), table, ids, index, values, list(starts), saved)


def scatter_restore(targets, table, ids, index, starts, saved):
    """Undo :func:`scatter_apply` (same layout): the saved values written back, bit for bit."""
    extension().scatter_restore(list(targets), table, ids, index, list(starts), saved)


def sddmm(grad_y, x, index, in_features):
    """(grad_y^T x) at flat indices: fp32, or fp64 for fp64 inputs. Mixed float dtypes are promoted first
    (exact: the reference forms every product in the accumulation dtype); int32 indices are made int64."""
    if grad_y.dtype != x.dtype and grad_y.is_floating_point() and x.is_floating_point():
        common = torch.promote_types(grad_y.dtype, x.dtype)
        grad_y, x = grad_y.to(common), x.to(common)
    if index.dtype == torch.int32:
        index = index.long()
    return extension().sddmm(grad_y, x, index.contiguous(), int(in_features))
