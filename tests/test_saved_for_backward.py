"""What a DiffLinear keeps for its backward (issue 6's memory rule): the input, the seed and the
parameters themselves (no copies), plus at most one compute-dtype effective weight -- the unfused
and fixed-mask paths save it for dX as nn.Linear saves its weight; the fused path saves nothing
weight-sized. Never an fp32 weight-sized tensor of its own (z, dz/dlog_alpha, an fp32 W)."""

import pytest
import torch

import dpkernels

K, N = 40, 24  # weight 960 elements; x (2, 7, 40) has 560, so sizes tell the two apart


def _saved(layer: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The tensors autograd saved during one forward under bf16 autocast that are not parameters of
    `layer` (views of a parameter count as the parameter: they cost no memory)."""
    owned = {p.untyped_storage().data_ptr() for p in [*layer.parameters(), *layer.buffers()]}
    saved = []

    def pack(t):
        if t.untyped_storage().data_ptr() not in owned:
            saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16):
            y = layer(x)
    y.float().square().sum().backward()  # the saved tensors serve a working backward
    return saved


@pytest.mark.parametrize("path", ["unfused", "fused", "fixed-mask"])
def test_backward_keeps_no_fp32_weight_and_at_most_one_compute_dtype_weight(device_backend, monkeypatch, path):
    device, backend = device_backend
    if path == "fused" and backend != "triton":
        pytest.skip("the fused path is the triton backend's")
    monkeypatch.setenv("DPKERNELS_DIFF_LINEAR", "fused" if path == "fused" else "unfused")
    torch.manual_seed(0)
    layer = dpkernels.DiffLinear(K, N, l0_lambda=1e-3).to(device)
    if path == "fixed-mask":
        layer.to_fixed_mask(torch.randperm(K * N)[:50].sort().values.to(device))
    x = torch.randn(2, 7, K, device=device, requires_grad=True)
    saved = _saved(layer, x)
    weight_sized = [t for t in saved if t.numel() >= K * N]
    if path == "fused":
        assert weight_sized == []
    else:
        assert [(tuple(t.shape), t.dtype) for t in weight_sized] == [((N, K), torch.bfloat16)]
    assert any(t.numel() == x.numel() and t.dtype == torch.bfloat16 for t in saved)  # x, in the compute dtype
    assert x.grad is not None and all(p.grad is not None for p in layer.parameters() if p.requires_grad)
