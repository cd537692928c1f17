"""Fixed-mask finetuning: the sampled weight gradient (sddmm) and fixed_mask_linear vs float64."""

import importlib

import pytest
import torch
from conftest import TRITON_DEVICES, assert_close_by_rule
from torch import nn

import dpkernels
from dpkernels.backends import select

EPS32 = torch.finfo(torch.float32).eps


def _mask(n, k, density, gen, dense_row=False):
    index = torch.randperm(n * k, generator=gen)[: max(1, int(density * n * k))]
    if dense_row:  # one row with more entries than a kernel tile holds
        index = torch.cat([index, torch.arange(k) + (n // 2) * k])
    return index.unique().sort().values


@pytest.fixture
def triton_sddmm_module():
    return importlib.import_module("dpkernels.backends.triton.sddmm")


@pytest.mark.parametrize("m,k,n", [(1, 1, 1), (9, 341, 9), (341, 9, 341), (0, 9, 9), (130, 64, 48)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_sddmm_matches_dense_product_at_the_mask(device_backend, m, k, n, dtype, monkeypatch):
    device, backend = device_backend
    if backend == "triton":  # the kernel's gathers at this test's 20% density (test_triton_sddmm_paths: the GEMM)
        monkeypatch.setattr(importlib.import_module("dpkernels.backends.triton.sddmm"), "gathers_cheaper",
                            lambda *shape: True)
    _check_sddmm(device, m, k, n, dtype, 0.2)


def _check_sddmm(device, m, k, n, dtype, density):
    """The selected backend's sddmm vs the float64 dense product at a random mask with one dense row."""
    gen = torch.Generator().manual_seed(m + k + n)
    gy = torch.randn(m, n, generator=gen).to(device, dtype)
    x = torch.randn(m, k, generator=gen).to(device, dtype)
    index = _mask(n, k, density, gen, dense_row=n > 2).to(device)
    out = select("test", gy.device, torch.float32).sddmm(gy, x, index, k)
    assert out.dtype == torch.float32 and out.shape == index.shape
    oracle = (gy.double().t() @ x.double()).reshape(-1)[index]
    same_dtype = (gy.float().t() @ x.float()).reshape(-1)[index]
    scale = (gy.double().abs().t() @ x.double().abs()).max().item() if m else 0.0
    assert_close_by_rule(out, same_dtype, oracle, 4 * EPS32 * scale, "sddmm")


def test_sddmm_at_a_real_layer_shape(device_backend):
    """The fixed-mask stage's weight gradient at its benchmark shape (8192 tokens, 4096 -> 11008, the
    0.5% mask, bf16 under autocast) on a GPU; a stand-in with several row blocks on the CPU."""
    device, _ = device_backend
    m, k, n = (8192, 4096, 11008) if device == "cuda" else (130, 64, 48)
    _check_sddmm(device, m, k, n, torch.bfloat16, 0.005 if device == "cuda" else 0.2)


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("path", ["gathers", "gathers in token chunks", "dense GEMM"])
@pytest.mark.parametrize("m,k,n", [(300, 37, 29), (1, 64, 16)])
def test_triton_sddmm_paths(device, path, m, k, n, monkeypatch, triton_sddmm_module):
    """Every path of the Triton sddmm: one launch, several token chunks adding up in order, and the
    dense GEMM + gather where gathers_cheaper says no."""
    monkeypatch.setattr(triton_sddmm_module, "gathers_cheaper", lambda *shape: path != "dense GEMM")
    if path == "gathers in token chunks":
        monkeypatch.setattr(triton_sddmm_module, "CHUNK_BYTES", 1)  # BLOCK_M (8 in bf16) tokens a launch
        assert triton_sddmm_module.tokens_per_launch(m, k, 2) == min(m, 8)
    gen = torch.Generator().manual_seed(m * k + n)
    gy = torch.randn(m, n, generator=gen).to(device, torch.bfloat16)
    x = torch.randn(m, k, generator=gen).to(device, torch.bfloat16)
    index = _mask(n, k, 0.3, gen, dense_row=True).to(device)
    out = triton_sddmm_module.sddmm(gy, x, index, k)
    oracle = (gy.double().t() @ x.double()).reshape(-1)[index]
    same_dtype = (gy.float().t() @ x.float()).reshape(-1)[index]
    scale = (gy.double().abs().t() @ x.double().abs()).max().item()
    assert_close_by_rule(out, same_dtype, oracle, 4 * EPS32 * scale, "sddmm")


def test_sddmm_empty_mask(device_backend):
    device, _ = device_backend
    gy, x = torch.randn(5, 4, device=device), torch.randn(5, 3, device=device)
    out = select("test", gy.device, torch.float32).sddmm(gy, x, torch.empty(0, dtype=torch.int64, device=device), 3)
    assert out.shape == (0,)


def _fixed_params(lead, k, n, device, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    p = dict(x=torch.randn(*lead, k, generator=gen), weight=torch.randn(n, k, generator=gen) / k**0.5,
             bias=torch.randn(n, generator=gen), gy=torch.randn(*lead, n, generator=gen))
    p = {name: v.to(device, dtype) for name, v in p.items()}
    p["index"] = _mask(n, k, 0.1, gen, dense_row=True).to(device)
    p["values"] = torch.randn(p["index"].numel(), generator=gen).to(device, dtype)
    p["bias_index"] = torch.tensor([0, n - 1], device=device).unique()
    p["bias_values"] = torch.randn(p["bias_index"].numel(), generator=gen).to(device, dtype)
    return p


def _dense_oracle(p):
    """Autograd through the dense formulation W = theta0 + scatter(values): the oracle's gradients."""
    leaves = {k: p[k].detach().clone().requires_grad_(k in ("x", "values", "bias_values"))
              for k in ("x", "values", "bias_values")}
    w = p["weight"].reshape(-1).to(leaves["values"].dtype).index_add(0, p["index"], leaves["values"])
    b = p["bias"].to(leaves["values"].dtype).index_add(0, p["bias_index"], leaves["bias_values"])
    y = nn.functional.linear(leaves["x"], w.view(p["weight"].shape), b)
    (y * p["gy"]).sum().backward()
    return y, {k: v.grad for k, v in leaves.items()}


@pytest.mark.parametrize("lead,k,n", [((1,), 1, 1), ((9,), 341, 9), ((2, 3), 9, 341), ((0,), 9, 9)])
def test_fixed_mask_linear_matches_float64_reference(device_backend, lead, k, n):
    device, _ = device_backend
    p = _fixed_params(lead, k, n, device, seed=k + n)
    leaves = {k_: p[k_].detach().clone().requires_grad_() for k_ in ("x", "values", "bias_values")}
    y = dpkernels.fixed_mask_linear(leaves["x"], p["weight"], p["bias"], p["index"], leaves["values"],
                                    p["bias_index"], leaves["bias_values"])
    (y * p["gy"]).sum().backward()
    y64, g64 = _dense_oracle({k_: (v.double() if v.is_floating_point() else v) for k_, v in p.items()})
    y32, g32 = _dense_oracle(p)
    assert_close_by_rule(y, y32, y64, 8 * EPS32 * (y64.abs().max().item() + 1) if y64.numel() else 0, "y")
    for name in ("x", "values", "bias_values"):
        g = leaves[name].grad
        assert g.shape == leaves[name].shape, name  # the values' gradient is (nnz,), never dense
        atol = 8 * EPS32 * (g64[name].abs().max().item() + 1) if g64[name].numel() else 0
        assert_close_by_rule(g, g32[name], g64[name], atol, f"grad {name}")


def test_fixed_mask_linear_under_autocast(device_backend):
    device, _ = device_backend
    p = _fixed_params((33,), 64, 48, device)
    values = p["values"].clone().requires_grad_()
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        y = dpkernels.fixed_mask_linear(p["x"], p["weight"], p["bias"], p["index"], values)
    assert y.dtype == torch.bfloat16
    (y.float() * p["gy"]).sum().backward()
    p64 = {k: (v.double() if v.is_floating_point() else v) for k, v in p.items()}
    p64["bias_values"] = torch.zeros_like(p64["bias_values"])
    _, g64 = _dense_oracle(p64)
    rel = (values.grad.double() - g64["values"]).abs().max() / g64["values"].abs().max()
    assert rel < 4 * torch.finfo(torch.bfloat16).eps  # inputs rounded to bf16 once, fp32 accumulation


@pytest.mark.parametrize("bad,error,match", [
    (dict(index=torch.tensor([3, 1])), ValueError, "sorted and free of duplicates"),
    (dict(index=torch.tensor([1, 1])), ValueError, "sorted and free of duplicates"),
    (dict(index=torch.tensor([0, 99])), ValueError, r"outside \[0, 20\)"),
    (dict(index=torch.tensor([-1, 2])), ValueError, "outside"),
    (dict(index=torch.tensor([1, 2], dtype=torch.int32)), TypeError, "int64"),
    (dict(values=torch.zeros(3)), ValueError, "values has shape"),
    (dict(bias_index=torch.tensor([9])), ValueError, r"bias_index holds indices outside \[0, 4\)"),
])
def test_fixed_mask_linear_rejects_bad_masks(bad, error, match):
    args = dict(x=torch.randn(2, 5), weight=torch.randn(4, 5), bias=torch.randn(4), index=torch.tensor([1, 7]),
                values=torch.zeros(2), bias_index=torch.tensor([0]), bias_values=torch.zeros(1))
    args.update(bad)
    if "bias_index" in bad:
        args["bias_values"] = torch.zeros(args["bias_index"].numel())
    with pytest.raises(error, match=match):
        dpkernels.fixed_mask_linear(**args)


def _projected_layer(device):
    torch.manual_seed(0)
    layer = dpkernels.DiffLinear(41, 33, device=device)
    with torch.no_grad():
        layer.diff.normal_()
        layer.bias_diff.normal_()
        layer.log_alpha.normal_(0, 3)
    dpkernels.project(layer, 0.05)
    return layer


def test_fixed_stage_layer_trains_only_the_values(device_backend):
    device, _ = device_backend
    layer = _projected_layer(device)
    base = layer.weight.detach().clone()
    assert {n for n, p in layer.named_parameters() if p.requires_grad} == {"diff_values", "bias_diff_values"}
    assert "fixed_mask=True" in repr(layer)
    layer(torch.randn(4, 41, device=device)).square().sum().backward()
    assert layer.diff_values.grad.shape == layer.diff_index.shape
    assert torch.equal(layer.weight, base) and layer.weight.grad is None
    merged = layer.to_linear()
    x = torch.randn(3, 41, device=device)
    torch.testing.assert_close(merged(x), layer.eval()(x))


def test_fixed_stage_checks_indices_again_after_they_change():
    layer = _projected_layer("cpu")
    state = layer.state_dict()
    state["diff_index"] = state["diff_index"].flip(0).contiguous()
    layer.load_state_dict(state)
    with pytest.raises(ValueError, match="sorted and free of duplicates"):
        layer(torch.randn(2, 41))


def test_to_fixed_mask_errors():
    layer = _projected_layer("cpu")
    with pytest.raises(ValueError, match="already in the fixed-mask stage"):
        layer.to_fixed_mask(torch.tensor([0]))
    with pytest.raises(ValueError, match="without a gated bias"):
        dpkernels.DiffLinear(3, 2, bias=False).to_fixed_mask(torch.tensor([0]), torch.tensor([0]))
    with pytest.raises(ValueError, match="outside"):
        dpkernels.DiffLinear(3, 2).to_fixed_mask(torch.tensor([6]))
