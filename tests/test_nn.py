"""DiffLinear as a drop-in nn.Linear: construction, checkpoints, train/eval, seeds, merging."""

import pytest
import torch
from torch import nn

import dpkernels
from dpkernels import DiffLinear


def _trained_like(layer: DiffLinear, seed=0):
    """Give the gates non-trivial values, as after some training."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (layer.diff, layer.bias_diff):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
        for p in (layer.log_alpha, layer.bias_log_alpha):
            p.copy_(torch.randn(p.shape, generator=gen) * 2)
    return layer


def test_from_linear_starts_as_the_pretrained_layer(device_backend, monkeypatch):
    device, backend = device_backend
    # The unfused path multiplies the same weight with the same GEMM as nn.Linear: bit for bit.
    monkeypatch.setenv("DPKERNELS_DIFF_LINEAR", "unfused")
    linear = nn.Linear(41, 9, device=device)
    layer = DiffLinear.from_linear(linear)
    assert layer.weight.data_ptr() == linear.weight.data_ptr()  # shared base, no copy
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    assert layer.diff.dtype == torch.float32 and layer.diff.requires_grad
    torch.testing.assert_close(layer.log_alpha, torch.full_like(layer.log_alpha, 5.0))
    x = torch.randn(3, 7, 41, device=device)
    for mode in (True, False):
        layer.train(mode)
        torch.testing.assert_close(layer(x), linear(x), rtol=0, atol=0)  # diff = 0: exactly the base
    if backend == "triton":  # the fused Triton GEMM: the same weight, another summation order
        monkeypatch.setenv("DPKERNELS_DIFF_LINEAR", "fused")
        torch.testing.assert_close(layer(x), linear(x))


def test_trainable_parameters_are_the_diff_and_gates():
    layer = DiffLinear(5, 3)
    trainable = {n for n, p in layer.named_parameters() if p.requires_grad}
    assert trainable == {"diff", "log_alpha", "bias_diff", "bias_log_alpha"}
    no_bias = DiffLinear(5, 3, bias=False)
    assert no_bias.bias is None and no_bias.bias_diff is None and no_bias.bias_log_alpha is None
    assert {n for n, _ in no_bias.named_parameters()} == {"weight", "diff", "log_alpha"}


def test_nn_linear_checkpoint_loads_strictly():
    linear = nn.Linear(6, 4)
    layer = DiffLinear(6, 4)
    log_alpha_before = layer.log_alpha.detach().clone()
    result = layer.load_state_dict(linear.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(layer.weight, linear.weight) and torch.equal(layer.bias, linear.bias)
    assert torch.equal(layer.log_alpha, log_alpha_before)
    # Inside a bigger model too (prefixes).
    model = nn.Sequential(nn.Linear(6, 4), nn.ReLU())
    gated = nn.Sequential(DiffLinear(6, 4), nn.ReLU())
    gated.load_state_dict(model.state_dict())
    assert torch.equal(gated[0].weight, model[0].weight)


def test_diff_linear_checkpoint_round_trips_and_partial_gates_are_missing():
    layer = _trained_like(DiffLinear(6, 4))
    other = DiffLinear(6, 4)
    other.load_state_dict(layer.state_dict())
    for name, value in layer.state_dict().items():
        assert torch.equal(other.state_dict()[name], value), name
    partial = {k: v for k, v in layer.state_dict().items() if k != "log_alpha"}
    with pytest.raises(RuntimeError, match="log_alpha"):
        other.load_state_dict(partial)
    with pytest.raises(RuntimeError, match="size mismatch"):
        DiffLinear(6, 5).load_state_dict(layer.state_dict())


def test_train_mode_draws_seeds_from_torch_and_replays(device_backend):
    device, _ = device_backend
    layer = _trained_like(DiffLinear(33, 17, device=device)).to(device)
    x = torch.randn(5, 33, device=device)
    torch.manual_seed(0)
    a = layer(x)
    seed_a = layer.last_seed
    torch.manual_seed(0)
    assert torch.equal(layer(x), a) and layer.last_seed == seed_a
    b = layer(x)
    assert layer.last_seed != seed_a and not torch.equal(a, b)
    # The seed replays the exact gates through the functional API.
    z = dpkernels.sample_gates(layer.log_alpha, seed_a)
    z_b = dpkernels.sample_gates(layer.bias_log_alpha, seed_a, offset=layer.weight.numel())
    expected = nn.functional.linear(x, layer.weight + z * layer.diff, layer.bias + z_b * layer.bias_diff)
    torch.testing.assert_close(a, expected)


def test_eval_mode_is_deterministic_and_matches_to_linear(device_backend):
    device, _ = device_backend
    layer = _trained_like(DiffLinear(33, 17, device=device)).to(device).eval()
    x = torch.randn(5, 33, device=device)
    y = layer(x)
    assert torch.equal(y, layer(x))
    merged = layer.to_linear()
    assert isinstance(merged, nn.Linear) and merged.weight.dtype == layer.weight.dtype
    torch.testing.assert_close(merged(x), y)


def test_backward_trains_only_the_gates(device_backend):
    device, _ = device_backend
    layer = _trained_like(DiffLinear(9, 341, l0_lambda=0.01, device=device)).to(device)
    layer(torch.randn(4, 9, device=device)).square().mean().backward()
    assert layer.weight.grad is None and layer.bias.grad is None
    for p in (layer.diff, layer.log_alpha, layer.bias_diff, layer.bias_log_alpha):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


def test_fused_l0_gradient_equals_adding_expected_l0_to_the_loss():
    lam = 0.05
    x = torch.randn(4, 9)
    fused = _trained_like(DiffLinear(9, 7, l0_lambda=lam))
    plain = DiffLinear(9, 7)
    plain.load_state_dict(fused.state_dict())
    torch.manual_seed(1)
    fused(x).sum().backward()
    torch.manual_seed(1)
    (plain(x).sum() + lam * plain.expected_l0()).backward()
    for name in ("diff", "log_alpha", "bias_diff", "bias_log_alpha"):
        torch.testing.assert_close(getattr(fused, name).grad, getattr(plain, name).grad)


def test_base_dtypes_and_float64():
    for dtype in (torch.bfloat16, torch.float16):
        layer = DiffLinear(8, 4, dtype=dtype)
        assert layer.weight.dtype == dtype and layer.diff.dtype == torch.float32
        assert layer(torch.randn(2, 8, dtype=dtype)).dtype == dtype
    layer64 = DiffLinear(8, 4, dtype=torch.float64)
    assert layer64.diff.dtype == torch.float64
    assert layer64(torch.randn(2, 8, dtype=torch.float64)).dtype == torch.float64


def test_repr_and_bad_configuration():
    assert "in_features=5, out_features=3, bias=True, l=-1.5, r=1.5, beta=1.0" in repr(DiffLinear(5, 3))
    with pytest.raises(ValueError, match="l must be < 0"):
        DiffLinear(5, 3, l=0.1)
    with pytest.raises(ValueError, match="r must be > 1"):
        DiffLinear(5, 3, r=0.9)
    with pytest.raises(ValueError, match="beta must be > 0"):
        DiffLinear(5, 3, beta=0)
    with pytest.raises(ValueError, match="alpha_init"):
        DiffLinear(5, 3, alpha_init=float("nan"))
    with pytest.raises(ValueError, match="l0_lambda"):
        DiffLinear(5, 3, l0_lambda=-1)
    with pytest.raises(TypeError, match="nn.Linear"):
        DiffLinear.from_linear(nn.Conv1d(3, 3, 1))
    with pytest.raises(TypeError, match="unknown gate options"):
        DiffLinear.from_linear(nn.Linear(3, 3), alpha=1.0)
    with pytest.raises(ValueError, match="last dimension must be in_features"):
        DiffLinear(5, 3)(torch.randn(2, 4))


@pytest.mark.parametrize("stage", ["l0", "fixed_mask", "gated_parameter"])
def test_a_second_derivative_raises_instead_of_being_wrong(stage):
    """The backward kernels have no derivative of their own: a gradient penalty (backward of a
    backward) must raise, not return a second derivative that silently misses their terms."""
    torch.manual_seed(0)
    if stage == "gated_parameter":
        model, x = dpkernels.diff_prune(nn.Sequential(nn.Embedding(10, 4), nn.LayerNorm(4))), torch.tensor([[1, 2]])
    else:
        model, x = DiffLinear.from_linear(nn.Linear(4, 3)), torch.randn(2, 4, requires_grad=True)
        if stage == "fixed_mask":
            dpkernels.project(model, 0.5)
    params = [p for p in model.parameters() if p.requires_grad]
    inputs = [x] if x.requires_grad else params
    grads = torch.autograd.grad(model(x).pow(2).sum(), inputs, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        sum(g.pow(2).sum() for g in grads).backward()


def test_half_precision_casts_leave_the_gates_in_float32():
    """model.half() / .to(torch.bfloat16) cast the frozen bases; the gates (documented float32,
    float64 beside a float64 base) keep their precision in both stages, and the model still trains."""
    model = dpkernels.diff_prune(nn.Sequential(nn.Linear(8, 4), nn.LayerNorm(4)))
    gates = [n for n, p in model.named_parameters() if p.requires_grad]
    for cast, base, gate in ((nn.Module.half, torch.float16, torch.float32),
                             (nn.Module.double, torch.float64, torch.float64),
                             (lambda m: m.to(torch.bfloat16), torch.bfloat16, torch.float32)):
        dtypes = {n: p.dtype for n, p in cast(model).named_parameters()}
        assert {dtypes[n] for n in gates} == {gate} and {d for n, d in dtypes.items() if n not in gates} == {base}
    model(torch.randn(2, 8, dtype=torch.bfloat16)).float().sum().backward()
    assert all(p.grad.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    dpkernels.project(model, 0.5)
    assert all(p.dtype == torch.float32 for p in model.half().parameters() if p.requires_grad)
