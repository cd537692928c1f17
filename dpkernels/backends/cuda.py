"""CUDA C++ backend: the compiled extension ``dpkernels._C`` (sources in csrc/).

The extension is optional. Loading is attempted only when the cuda backend is asked for, and a
missing or broken build raises an error that says how to build it.
"""

from __future__ import annotations

import importlib

_OPS = ("gate_forward", "gate_backward")


def load():
    """Import dpkernels._C and check it offers every op this backend must provide."""
    try:
        ext = importlib.import_module("dpkernels._C")
    except ImportError as exc:
        raise ImportError(
            "the CUDA extension dpkernels._C is not built (reinstall with a CUDA toolkit and a CUDA "
            f"build of torch: DPKERNELS_BUILD_CUDA=1 pip install --no-build-isolation .): {exc}"
        ) from exc
    missing = [op for op in _OPS if not hasattr(ext, op)]
    if missing:
        raise ImportError(f"dpkernels._C lacks the ops {missing}; rebuild the package")
    return ext
