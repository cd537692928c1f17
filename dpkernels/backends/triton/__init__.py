"""Triton backend. Importing this package imports triton; the dispatcher does so lazily."""

from .gates import gate_backward, gate_forward
from .scatter import scatter_apply, scatter_restore
from .sddmm import sddmm

__all__ = ["gate_forward", "gate_backward", "scatter_apply", "scatter_restore", "sddmm"]
