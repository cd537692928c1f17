"""Triton backend. Importing this package imports triton; the dispatcher does so lazily."""

from .diff_linear import gated_linear, gated_linear_grad_input, gated_linear_grad_weight
from .gates import gate_backward, gate_forward, grouped_gate_backward, grouped_gate_forward
from .scatter import scatter_apply, scatter_restore
from .sddmm import sddmm
from .segmented import segmented_gather, segmented_spmm

__all__ = ["gate_forward", "gate_backward", "grouped_gate_forward", "grouped_gate_backward",
           "gated_linear", "gated_linear_grad_input", "gated_linear_grad_weight",
           "scatter_apply", "scatter_restore", "sddmm", "segmented_gather", "segmented_spmm"]
