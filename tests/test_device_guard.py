"""Triton launches run on their tensors' GPU, not on the current one (a model spread over GPUs)."""

import contextlib
import copy

import pytest
import torch
from conftest import HAS_CUDA
from torch._subclasses import fake_tensor
from torch._subclasses.fake_tensor import FakeTensorMode

from dpkernels import TaskSwitcher
from dpkernels.nn import DiffLinear
from tests.test_sparse import Net, assert_same_bits, bits, random_diff


def test_a_launch_for_another_gpu_makes_that_gpu_current(monkeypatch):
    pytest.importorskip("triton")
    from dpkernels.backends.triton.device_guard import on_tensor_device

    entered, calls = [], []

    @contextlib.contextmanager
    def fake_device(device):
        entered.append(torch.device(device))
        yield

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", fake_device)
    # As on a one-GPU machine: there FakeTensorMode's init_gpu_context (torch 2.11) allocates on the
    # fake tensor's real GPU, and cuda:1 raises "invalid device ordinal". No GPU is touched here.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(fake_tensor, "init_gpu_context", lambda device: None)
    launcher = on_tensor_device(lambda *args, **kwargs: calls.append(len(entered)) or "launched")
    with FakeTensorMode():  # CUDA tensors' metadata, no GPU needed
        on1, on0 = torch.empty(4, device="cuda:1"), torch.empty(4, device="cuda:0")
    # The first tensor argument decides (scatter's launchers take a list of targets first, then the table).
    assert launcher([on0], on1, 3, flag=True) == "launched"
    assert entered == [torch.device("cuda:1")] and calls == [1]  # the launch ran inside the guard
    launcher(on0)
    launcher(torch.empty(4))
    assert entered == [torch.device("cuda:1")]  # already current, or a CPU tensor: no switch


def test_every_triton_primitive_is_guarded():
    pytest.importorskip("triton")
    from dpkernels.backends import triton as tk

    for name in tk.__all__:
        assert hasattr(getattr(tk, name), "__wrapped__"), f"{name} launches without on_tensor_device"


def _layer_run(layer: DiffLinear, x: torch.Tensor, device: str) -> list[torch.Tensor]:
    """Output and every gradient of one training step of a copy of `layer` on `device`, while
    cuda:0 is the current device."""
    layer = copy.deepcopy(layer).to(device)
    x = x.to(device).requires_grad_()
    torch.manual_seed(1)  # the same gate seed on both devices
    with torch.cuda.device(0):
        y = layer(x)
        y.square().sum().backward()
    return [t.cpu() for t in (y, x.grad, *(p.grad for p in layer.parameters() if p.grad is not None))]


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA or torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
@pytest.mark.parametrize("path", ["fused", "unfused", "fixed-mask"])
def test_a_layer_on_the_second_gpu_computes_what_it_does_on_the_first(monkeypatch, path):
    monkeypatch.setenv("DPKERNELS_BACKEND", "triton")
    monkeypatch.setenv("DPKERNELS_DIFF_LINEAR", "fused" if path == "fused" else "unfused")
    torch.manual_seed(0)
    layer = DiffLinear(96, 80, l0_lambda=1e-3)
    if path == "fixed-mask":
        layer.to_fixed_mask(torch.randperm(96 * 80)[:300].sort().values)
    x = torch.randn(2, 37, 96)
    on0, on1 = _layer_run(layer, x, "cuda:0"), _layer_run(layer, x, "cuda:1")
    assert len(on0) >= 3
    for a, b in zip(on0, on1, strict=True):
        assert torch.equal(a, b)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA or torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_a_task_switch_on_the_second_gpu_merges_what_it_does_on_the_first(monkeypatch):
    monkeypatch.setenv("DPKERNELS_BACKEND", "triton")
    merged = []
    for device in ("cuda:0", "cuda:1"):
        model = Net(torch.bfloat16, device)
        original = bits(model)
        with torch.cuda.device(0):
            switcher = TaskSwitcher(model).add("a", random_diff(model, seed=1)).switch("a")
            merged.append(bits(model))
            switcher.reset()
        assert_same_bits(bits(model), original)
    assert_same_bits(merged[0], merged[1])
