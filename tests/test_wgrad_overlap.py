"""DPKERNELS_OVERLAP_WGRAD=1: a weight-gradient pass on a side stream beside the dX GEMM.

The unfused L0 path's routing pass and the fixed-mask stage's sddmm. On CPU: the switch is
checked and changes nothing, and the stream protocol (fork after dLoss/dW or dY exists, the pass on
the side stream while dX runs on the current one, join, the outputs recorded for the current
stream) is checked with stand-in streams. On a GPU: bit-identical results with the real streams,
which are really used, and no side stream while a CUDA graph is captured.
"""

import contextlib

import pytest
import torch
from conftest import CUDA_EXT_MISSING, HAS_CUDA
from test_fused_diff_linear import _layer_args

import dpkernels
from dpkernels import ops
from dpkernels.backends import load

L, R, BETA = -1.5, 1.5, 1.0


def _l0_step_grads(device, backend, monkeypatch, overlap, m=6, k=9, n=7, steps=1):
    """Per step (y, dx, grad_diff, grad_log_alpha, grad_bias_diff, grad_bias_log_alpha) on the unfused
    path with DPKERNELS_OVERLAP_WGRAD=overlap; bf16 autocast on CUDA."""
    monkeypatch.setenv("DPKERNELS_BACKEND", backend)
    monkeypatch.setenv("DPKERNELS_DIFF_LINEAR", "unfused")
    monkeypatch.setenv("DPKERNELS_OVERLAP_WGRAD", overlap)
    x, weight, bias, *trainable = _layer_args(device, m=m, k=k, n=n)
    for t in (x, *trainable):
        t.requires_grad_()
    diff, log_alpha, bias_diff, bias_log_alpha = trainable
    outs = []
    for step in range(steps):
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            y = dpkernels.diff_linear(x, weight, bias, diff, log_alpha, bias_diff, bias_log_alpha, seed=step,
                                      l0_lambda=1e-3)
        outs.append((y, *torch.autograd.grad(y.float().square().sum(), [x, *trainable])))
    return outs


def _fixed_mask_step_grads(device, backend, monkeypatch, overlap, m=6, k=9, n=7, steps=1):
    """Per step (y, dx, grad_values) of fixed_mask_linear with DPKERNELS_OVERLAP_WGRAD=overlap."""
    monkeypatch.setenv("DPKERNELS_BACKEND", backend)
    monkeypatch.setenv("DPKERNELS_OVERLAP_WGRAD", overlap)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(m, k, generator=gen).to(device).requires_grad_()
    weight = (torch.randn(n, k, generator=gen) / k**0.5).to(device)
    index = torch.randperm(n * k, generator=gen)[: max(1, n * k // 200)].sort().values.to(device)
    values = torch.randn(index.numel(), generator=gen).to(device).requires_grad_()
    outs = []
    for _ in range(steps):
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            y = dpkernels.fixed_mask_linear(x, weight, None, index, values)
        outs.append((y, *torch.autograd.grad(y.float().square().sum(), [x, values])))
    return outs


STEPS = {"l0": _l0_step_grads, "fixed-mask": _fixed_mask_step_grads}


@pytest.mark.parametrize("stage", STEPS)
def test_the_switch_is_checked_and_changes_nothing_off_cuda(stage, monkeypatch):
    with pytest.raises(ValueError, match="DPKERNELS_OVERLAP_WGRAD='yes' must be 0 or 1"):
        STEPS[stage]("cpu", "torch", monkeypatch, "yes")
    off, on = (STEPS[stage]("cpu", "torch", monkeypatch, flag)[0] for flag in "01")
    for a, b in zip(off, on, strict=True):
        assert torch.equal(a, b)


class _Log(list):
    on_current = None  # set by the fixture


@pytest.fixture
def stand_in_streams(monkeypatch):
    """torch.cuda's streams replaced by named stand-ins that log what happens on them: returns the
    log, to which `log(text)` adds `text on <current stream>`."""
    events, current = _Log(), []

    class Stream:
        def __init__(self, name):
            self.name, self.device = name, torch.device("cuda", 0)

        def wait_stream(self, other):
            events.append(f"{self.name} waits for {other.name}")

    @contextlib.contextmanager
    def on_stream(stream):
        current.append(stream)
        yield
        current.pop()

    def matmul(a, b):
        events.append(f"matmul {tuple(a.shape)} x {tuple(b.shape)} on {current[-1].name}")
        return torch.mm(a, b)

    main, side = Stream("main"), Stream("side")
    current.append(main)
    monkeypatch.setattr(ops, "_wgrad_stream", lambda device: side)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: current[-1])
    monkeypatch.setattr(torch.cuda, "stream", on_stream)
    monkeypatch.setattr(torch.Tensor, "record_stream",
                        lambda t, stream: events.append(f"{tuple(t.shape)} kept for {stream.name}"))
    monkeypatch.setattr(torch.Tensor, "__matmul__", matmul)
    events.on_current = lambda text: events.append(f"{text} on {current[-1].name}")
    return events


def _spy(monkeypatch, backend, name, events):
    original = getattr(backend, name)

    def logged(*args, **kwargs):
        events.on_current(name)
        return original(*args, **kwargs)

    monkeypatch.setattr(backend, name, logged)


def test_l0_routing_forks_and_joins_the_streams_in_order(stand_in_streams, monkeypatch):
    events, backend = stand_in_streams, load("torch")
    _spy(monkeypatch, backend, "gate_backward", events)
    m, k, n = 6, 9, 7
    args = (torch.randn(m, n), torch.randn(m, k), torch.randn(n, k), None, torch.randn(n, k), torch.randn(n, k),
            torch.randn(n, k), None, None, ops._seed_tensor(3), True, L, R, BETA, 1e-3, False, False)
    needs = [True, False, False, True, True, False, False]
    grads = ops._diff_linear_backward_impl(backend, *args, needs)
    assert events == [
        f"matmul {(n, m)} x {(m, k)} on main",  # dLoss/dW
        "side waits for main",
        "gate_backward on side",  # the routing pass
        f"matmul {(m, n)} x {(n, k)} on main",  # dX, while the routing pass runs
        "main waits for side",
        *[f"{(n, k)} kept for main"] * 2,  # grad_diff, grad_log_alpha
    ]
    monkeypatch.setattr(ops, "_wgrad_stream", lambda device: None)
    for a, b in zip(grads, ops._diff_linear_backward_impl(backend, *args, needs), strict=True):
        assert (a is None and b is None) or torch.equal(a, b)


def test_fixed_mask_sddmm_forks_and_joins_the_streams_in_order(stand_in_streams, monkeypatch):
    events, backend = stand_in_streams, load("torch")
    _spy(monkeypatch, backend, "sddmm", events)
    monkeypatch.setattr(ops, "select", lambda *args, **kwargs: backend)
    m, k, n, nnz = 6, 9, 7, 5
    gy, x, w_eff, index = torch.randn(m, n), torch.randn(m, k), torch.randn(n, k), torch.arange(nnz) * 3
    grads = ops._fixed_mask_backward_impl(gy, x, w_eff, index, None, torch.zeros(nnz), (True, True, False))
    assert events == [
        "side waits for main",
        "sddmm on side",
        f"matmul {(n, m)} x {(m, k)} on side",  # the CPU torch backend's one GEMM for a dense-enough mask
        f"matmul {(m, n)} x {(n, k)} on main",  # dX, while the sddmm runs
        "main waits for side",
        f"{(nnz,)} kept for main",  # grad_values
    ]
    torch.testing.assert_close(grads[1], (gy.t() @ x).reshape(-1)[index])


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("stage", STEPS)
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_the_side_stream_gives_the_same_results_bit_for_bit(stage, backend, monkeypatch):
    if backend == "cuda" and CUDA_EXT_MISSING is not None:
        pytest.skip(CUDA_EXT_MISSING)
    shape = dict(m=8192, k=1024, n=4096, steps=5)  # big enough for the two streams to run at once
    expected = STEPS[stage]("cuda", backend, monkeypatch, "0", **shape)
    user_stream = torch.cuda.Stream()
    ops._wgrad_streams.clear()
    for current in (torch.cuda.current_stream(), user_stream):  # also from a non-default stream
        with torch.cuda.stream(current):
            got = STEPS[stage]("cuda", backend, monkeypatch, "1", **shape)
        torch.cuda.synchronize()
        for step_got, step_expected in zip(got, expected, strict=True):
            for a, b in zip(step_got, step_expected, strict=True):
                assert torch.equal(a, b)
    assert list(ops._wgrad_streams) == [torch.cuda.current_device()]  # the side stream was used


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_no_side_stream_while_a_cuda_graph_is_captured(monkeypatch):
    monkeypatch.setenv("DPKERNELS_OVERLAP_WGRAD", "1")
    device = torch.device("cuda", torch.cuda.current_device())
    assert ops._wgrad_stream(device) is not None
    graph, capture_stream = torch.cuda.CUDAGraph(), torch.cuda.Stream()
    with torch.cuda.stream(capture_stream), torch.cuda.graph(graph, stream=capture_stream):
        inside = ops._wgrad_stream(device)
        torch.zeros(1, device=device).add_(1)  # a captured op, so the graph is not empty
    assert inside is None
