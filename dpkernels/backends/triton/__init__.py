"""Triton backend. Importing this package imports triton; the dispatcher does so lazily."""

from .gates import gate_backward, gate_forward
from .sddmm import sddmm

__all__ = ["gate_forward", "gate_backward", "sddmm"]
