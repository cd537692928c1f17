"""Launch each Triton kernel on its tensors' GPU.

A Triton launch runs on the *current* CUDA device and its current stream, whatever device the
pointers it is given belong to (the CUDA extension sets a CUDAGuard for the same reason). A model
spread over GPUs (``device_map="auto"``, pipeline stages) would otherwise launch its cuda:1 layers
on cuda:0: an illegal address, or a race with cuda:1's stream. Every backend primitive is wrapped
by :func:`on_tensor_device`, which makes the first tensor argument's device current for the call.
"""

from __future__ import annotations

import functools

import torch


def _first_tensor(args) -> torch.Tensor | None:
    return next((a for a in args if isinstance(a, torch.Tensor)), None)


def on_tensor_device(launcher):
    """Run `launcher` with its first tensor argument's CUDA device current (no-op on CPU tensors
    and when that device is already current; the callers have checked that all tensors share it)."""

    @functools.wraps(launcher)
    def guarded(*args, **kwargs):
        first = _first_tensor(args)
        if first is None or not first.is_cuda or first.device.index == torch.cuda.current_device():
            return launcher(*args, **kwargs)
        with torch.cuda.device(first.device):
            return launcher(*args, **kwargs)

    return guarded
