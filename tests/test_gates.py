"""Gate kernels (every backend) against the float64 reference: sampling, gate-apply, gate-backward."""

import math

import pytest
import torch
from conftest import assert_close_by_rule

import dpkernels
from dpkernels import reference as ref
from dpkernels.backends import select

SHAPES = [(1,), (9,), (341,), (33, 41), (4231,)]
GATE_CONFIGS = [dict(l=-1.5, r=1.5, beta=1.0), dict(l=-0.1, r=1.1, beta=2 / 3)]
# Gates lie in [0, 1]: a few float32 ulps of 1 absorb the last-bit differences of log/sigmoid.
GATE_ATOL = 8 * torch.finfo(torch.float32).eps
# Where the fp64 sbar lies this close to 0 or 1, float32 may fall on the other side of the clamp.
BOUNDARY = 1e-5


def _log_alpha(shape, device, gen):
    la = torch.randn(shape, generator=gen) * 3
    flat = la.view(-1)
    extremes = torch.tensor([1e4, -1e4, 80.0, -80.0, 0.0, 20.0, -20.0])
    flat[: min(flat.numel(), extremes.numel())] = extremes[: flat.numel()]
    return la.to(device)


def _sbar64(la, seed, offset, training, l, r, beta):
    la = la.double()
    if training:
        u = ref.uniform(seed, la.numel(), offset, la.device).reshape(la.shape).double()
        s = torch.sigmoid((torch.log(u) - torch.log(1 - u) + la) / beta)
    else:
        s = torch.sigmoid(la)
    return s * (r - l) + l


def _near_boundary(sbar):
    return (sbar.abs() < BOUNDARY) | ((sbar - 1).abs() < BOUNDARY)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("cfg", GATE_CONFIGS)
def test_sample_gates_match_reference(device_backend, shape, cfg):
    device, _ = device_backend
    gen = torch.Generator().manual_seed(hash(shape) % 1000)
    la = _log_alpha(shape, device, gen)
    seed, offset = 2**40 + 123, 2**32 - 17  # the stream crosses a high-word boundary
    z = dpkernels.sample_gates(la, seed, offset=offset, **cfg)
    assert z.dtype == torch.float32 and z.shape == la.shape and z.device == la.device
    oracle = ref.sample_gates(la.double(), seed, offset=offset, **cfg)
    same_dtype = ref.sample_gates(la, seed, offset=offset, **cfg)
    assert_close_by_rule(z, same_dtype, oracle, GATE_ATOL, "z")
    assert ((z >= 0) & (z <= 1)).all()
    # Exactly-zero and exactly-one gates agree wherever float32 cannot tip over the clamp.
    far = ~_near_boundary(_sbar64(la, seed, offset, True, **cfg))
    assert torch.equal((z == 0)[far], (oracle == 0)[far])
    assert torch.equal((z == 1)[far], (oracle == 1)[far])


def test_offset_selects_a_window_of_one_stream(device_backend):
    device, _ = device_backend
    la = torch.randn(3000, generator=torch.Generator().manual_seed(0)).to(device)
    whole = dpkernels.sample_gates(la, 77)
    window = dpkernels.sample_gates(la[1000:2000].contiguous(), 77, offset=1000)
    assert torch.equal(window, whole[1000:2000])


@pytest.mark.parametrize("cfg", GATE_CONFIGS)
def test_eval_gates_match_reference(device_backend, cfg):
    device, _ = device_backend
    la = _log_alpha((341,), device, torch.Generator().manual_seed(3))
    z = dpkernels.eval_gates(la, l=cfg["l"], r=cfg["r"])
    oracle = ref.eval_gates(la.double(), l=cfg["l"], r=cfg["r"])
    assert_close_by_rule(z, ref.eval_gates(la, l=cfg["l"], r=cfg["r"]), oracle, GATE_ATOL, "z_eval")
    assert torch.equal(z, dpkernels.eval_gates(la, l=cfg["l"], r=cfg["r"]))  # deterministic


def test_extreme_log_alpha_gives_finite_saturated_gates(device_backend):
    device, _ = device_backend
    la = torch.tensor([1e4] * 500 + [-1e4] * 500, device=device)
    z = dpkernels.sample_gates(la, 5)
    assert torch.equal(z[:500], torch.ones(500, device=device))
    assert torch.equal(z[500:], torch.zeros(500, device=device))
    assert torch.equal(dpkernels.eval_gates(la), z)
    g = torch.randn(1000, device=device)
    w = torch.randn(1000, device=device)
    backend_mod = select("test", la.device, la.dtype)
    gw, gla = backend_mod.gate_backward(g, w, la, 5, 0, True, -1.5, 1.5, 1.0, 0.5)
    assert torch.isfinite(gw).all() and torch.isfinite(gla).all()
    assert torch.equal(gw, g * z)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_log_alpha_raises(device_backend, bad):
    device, _ = device_backend
    la = torch.zeros(10, device=device)
    la[3] = bad
    with pytest.raises(ValueError, match="NaN or infinite"):
        dpkernels.sample_gates(la, 0)
    with pytest.raises(ValueError, match="NaN or infinite"):
        dpkernels.eval_gates(la)


@pytest.mark.parametrize("base_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("training", [True, False])
def test_gate_forward_effective_weight(device_backend, base_dtype, out_dtype, training):
    device, _ = device_backend
    _check_gate_forward(device, (37, 29), base_dtype, out_dtype, training)


def _check_gate_forward(device, shape, base_dtype, out_dtype, training, seed=11):
    """The effective weight theta0 + z * w of the selected backend vs float64, by DESIGN.md's rule."""
    gen = torch.Generator().manual_seed(seed)
    theta0 = torch.randn(shape, generator=gen).to(device=device, dtype=base_dtype)
    w = (torch.randn(shape, generator=gen) * 0.1).to(device)
    la = _log_alpha(shape, device, gen)
    args = (9, 2**31 - 100, training, -1.5, 1.5, 1.0)
    out = select("test", la.device, la.dtype).gate_forward(la, *args, theta0=theta0, diff=w, out_dtype=out_dtype)
    assert out.dtype == out_dtype and out.shape == shape
    oracle = ref.gate_forward(la.double(), *args, theta0=theta0.double(), diff=w.double(), out_dtype=torch.float64)
    same_dtype = ref.gate_forward(la, *args, theta0=theta0, diff=w, out_dtype=out_dtype)
    # One rounding to out_dtype at the magnitude of the weights bounds the unavoidable error.
    atol = torch.finfo(out_dtype).eps * oracle.abs().max().item()
    assert_close_by_rule(out, same_dtype, oracle, atol, "effective weight")


def _backward_case(device, g_dtype, n=4231, seed=1):
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(n, generator=gen).to(device=device, dtype=g_dtype)
    w = torch.randn(n, generator=gen).to(device)
    la = _log_alpha((n,), device, gen)
    return g, w, la


@pytest.mark.parametrize("g_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("l0_lambda", [0.0, 0.3])
@pytest.mark.parametrize("cfg", GATE_CONFIGS)
def test_gate_backward_matches_reference(device_backend, g_dtype, training, l0_lambda, cfg):
    device, _ = device_backend
    _check_gate_backward(*_backward_case(device, g_dtype), training, l0_lambda, cfg)


def _check_gate_backward(g, w, la, training, l0_lambda, cfg):
    """The gate gradients of the selected backend vs float64 (away from the clamp), by DESIGN.md's rule."""
    seed, offset = 2**63 + 5, 123
    args = (seed, offset, training, cfg["l"], cfg["r"], cfg["beta"], l0_lambda)
    gw, gla = select("test", la.device, la.dtype).gate_backward(g, w, la, *args)
    ow, ola = ref.gate_backward(g.double(), w.double(), la.double(), *args)
    tw, tla = ref.gate_backward(g.float(), w, la, *args)
    far = ~_near_boundary(_sbar64(la, seed, offset, training, cfg["l"], cfg["r"], cfg["beta"]))
    scale = (g.double().abs() * w.double().abs()).max().item() + l0_lambda
    atol = 8 * torch.finfo(torch.float32).eps * scale
    assert_close_by_rule(gw, tw, ow, atol, "grad_diff")
    assert_close_by_rule(gla[far], tla[far], ola[far], atol, "grad_log_alpha")


# One real layer (LLaMA-7B's MLP, 45M gates) on a GPU: every block of the grid, counters far into the
# stream; on the CPU a stand-in with a few blocks, so that the check itself runs in CI.
REAL_LAYER = {"cuda": (4096, 11008), "cpu": (61, 83)}


def test_gate_kernels_at_a_real_layer_shape(device_backend):
    """Gate-apply (bf16 base -> bf16 weight, as under autocast) and gate-backward (bf16 gradient)
    at a real layer shape, in training."""
    device, _ = device_backend
    shape = REAL_LAYER[device]
    _check_gate_forward(device, shape, torch.bfloat16, torch.bfloat16, True, seed=12)
    g, w, la = _backward_case(device, torch.bfloat16, n=shape[0] * shape[1], seed=13)
    _check_gate_backward(g.view(shape), w.view(shape), la.view(shape), True, 1e-3, GATE_CONFIGS[0])


def test_gate_backward_accumulates_into_given_buffers(device_backend):
    device, _ = device_backend
    g, w, la = _backward_case(device, torch.float32, n=341)
    args = (3, 0, True, -1.5, 1.5, 1.0, 0.2)
    mod = select("test", la.device, la.dtype)
    fresh_w, fresh_la = mod.gate_backward(g, w, la, *args)
    buf_w, buf_la = torch.randn(341, device=device), torch.randn(341, device=device)
    start_w, start_la = buf_w.clone(), buf_la.clone()
    out_w, out_la = mod.gate_backward(g, w, la, *args, grad_diff=buf_w, grad_log_alpha=buf_la)
    assert out_w.data_ptr() == buf_w.data_ptr() and out_la.data_ptr() == buf_la.data_ptr()
    torch.testing.assert_close(buf_w, start_w + fresh_w, rtol=0, atol=4 * torch.finfo(torch.float32).eps * 8)
    torch.testing.assert_close(buf_la, start_la + fresh_la, rtol=0, atol=4 * torch.finfo(torch.float32).eps * 8)


def test_expected_l0_and_its_gradient(device_backend):
    device, _ = device_backend
    la = _log_alpha((341,), device, torch.Generator().manual_seed(5)).double().requires_grad_()
    for cfg in GATE_CONFIGS:
        e = dpkernels.expected_l0(la, **cfg)
        # sum_i P(z_i != 0) with P(z = 0) from the closed form of DESIGN.md.
        p_zero = torch.sigmoid(cfg["beta"] * math.log(-cfg["l"] / cfg["r"]) - la)
        torch.testing.assert_close(e, (1 - p_zero).sum())
        (grad,) = torch.autograd.grad(e, la)
        torch.testing.assert_close(grad, ref.expected_l0_grad(la.detach(), **cfg))


# Philox counters at which tl.rand returns exactly 0 for seed 0 (found by exhaustive search over
# counters 0 .. 2**33; the first word there is 0). u = 0 makes log(u) = -inf inside the gate.
U_ZERO_SEED, U_ZERO_OFFSETS = 0, (5145262111, 7741293826)


def test_reference_confirms_the_u_zero_counters():
    u = ref.philox_uniform(U_ZERO_SEED, torch.tensor(U_ZERO_OFFSETS))
    assert torch.equal(u, torch.zeros(2))


@pytest.mark.parametrize("cfg", GATE_CONFIGS)
def test_u_zero_gives_a_finite_closed_gate(device_backend, cfg):
    device, _ = device_backend
    la = torch.tensor([1e4, 50.0, 0.0, -1e4], device=device)
    for hit in U_ZERO_OFFSETS:
        for i in range(la.numel()):  # put the u = 0 draw under each element in turn
            offset = hit - i
            z = dpkernels.sample_gates(la, U_ZERO_SEED, offset=offset, **cfg)
            assert torch.isfinite(z).all() and z[i] == 0
            g, w = torch.ones(4, device=device), torch.ones(4, device=device)
            mod = select("test", la.device, la.dtype)
            gw, gla = mod.gate_backward(g, w, la, U_ZERO_SEED, offset, True, cfg["l"], cfg["r"], cfg["beta"], 0.1)
            assert torch.isfinite(gw).all() and torch.isfinite(gla).all() and gw[i] == 0
            eff = mod.gate_forward(la, U_ZERO_SEED, offset, True, cfg["l"], cfg["r"], cfg["beta"],
                                   theta0=torch.full((4,), 2.0, device=device), diff=w, out_dtype=torch.bfloat16)
            assert eff[i] == 2.0
