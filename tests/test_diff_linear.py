"""diff_linear on every backend against float64 autograd through dpkernels.reference."""

import pytest
import torch
from conftest import _CASES, _case_marks, assert_close_by_rule, far_from_clamp

import dpkernels
from dpkernels import reference as ref

L, R, BETA = -1.5, 1.5, 1.0
EPS32 = torch.finfo(torch.float32).eps
# (leading dims of x, in_features, out_features): odd sizes 1, 9, 341 and a 3-D input.
SHAPES = [((1,), 1, 1), ((9,), 9, 9), ((5,), 341, 9), ((3,), 9, 341), ((2, 3), 341, 1), ((7,), 64, 48)]


def _params(lead, k, n, bias, device, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    t = {
        "x": torch.randn(*lead, k, generator=gen),
        "weight": torch.randn(n, k, generator=gen) / k**0.5,
        "diff": torch.randn(n, k, generator=gen) * 0.5,
        "log_alpha": torch.randn(n, k, generator=gen) * 2,
        "gy": torch.randn(*lead, n, generator=gen),
    }
    if bias:
        t.update(bias=torch.randn(n, generator=gen), bias_diff=torch.randn(n, generator=gen) * 0.5,
                 bias_log_alpha=torch.randn(n, generator=gen) * 2)
    return {name: v.to(device=device, dtype=dtype) for name, v in t.items()}


TRAINABLE = ("x", "diff", "log_alpha", "bias_diff", "bias_log_alpha")


# (device, backend, diff-linear path): the triton backend on each of its paths, the others once.
_PATH_CASES = [pytest.param((d, b, path), id=f"{d}-{b}-{path}", marks=_case_marks(d, b)) for d, b in _CASES
               for path in (("unfused", "fused", "fused-forward", "fused-wgrad") if b == "triton" else ("unfused",))]


@pytest.fixture(params=_PATH_CASES)
def device_backend(request, monkeypatch):
    """conftest's device_backend, with DPKERNELS_DIFF_LINEAR set too."""
    device, backend, path = request.param
    monkeypatch.setenv("DPKERNELS_BACKEND", backend)
    monkeypatch.setenv("DPKERNELS_DIFF_LINEAR", path)
    return device, backend


def _run(fn, p, *, seed, training, l0_lambda, trainable=TRAINABLE):
    """Forward, loss = <y, gy> + l0_lambda * E[L0] (when fn has no fused L0), and the gradients."""
    leaves = {k: v.detach().clone().requires_grad_(k in trainable) for k, v in p.items() if k != "gy"}
    args = [leaves["x"], leaves["weight"], leaves.get("bias"), leaves["diff"], leaves["log_alpha"],
            leaves.get("bias_diff"), leaves.get("bias_log_alpha")]
    if fn is ref.diff_linear:
        y = fn(*args, seed=seed, training=training, l=L, r=R, beta=BETA)
        loss = (y * p["gy"].to(y.dtype)).sum()
        for la in ("log_alpha", "bias_log_alpha"):
            if la in leaves:
                loss = loss + l0_lambda * ref.expected_l0(leaves[la], l=L, r=R, beta=BETA)
    else:
        y = fn(*args, seed=seed, training=training, l=L, r=R, beta=BETA, l0_lambda=l0_lambda)
        loss = (y * p["gy"].to(y.dtype)).sum()
    loss.backward()
    return y, {k: v.grad for k, v in leaves.items() if v.requires_grad}


def _far_from_clamp(p, seed, training):
    """far_from_clamp masks of the weight and bias gates (bias draws follow the weight's)."""
    offsets = {"log_alpha": 0, "bias_log_alpha": p["weight"].numel()}
    return {name: far_from_clamp(p[name], seed, offset, training, L, R, BETA) for name, offset in offsets.items()
            if name in p}


@pytest.mark.parametrize("lead,k,n", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("l0_lambda", [0.0, 0.05])
def test_forward_and_every_gradient_match_float64_reference(device_backend, lead, k, n, bias, training, l0_lambda):
    device, _ = device_backend
    p = _params(lead, k, n, bias, device, seed=k * 31 + n)
    seed = 2**33 + k
    y, grads = _run(dpkernels.diff_linear, p, seed=seed, training=training, l0_lambda=l0_lambda)
    p64 = {name: v.double() for name, v in p.items()}
    y64, grads64 = _run(ref.diff_linear, p64, seed=seed, training=training, l0_lambda=l0_lambda)
    y32, grads32 = _run(ref.diff_linear, p, seed=seed, training=training, l0_lambda=l0_lambda)
    assert set(grads) == set(grads64)
    atol = 16 * EPS32 * (y64.abs().max().item() + 1)
    assert_close_by_rule(y, y32, y64, atol, "y")
    far = _far_from_clamp(p, seed, training)
    for name, g64 in grads64.items():
        g, g32 = grads[name], grads32[name]
        if name in far:
            g, g32, g64 = g[far[name]], g32[far[name]], g64[far[name]]
        atol = 16 * EPS32 * (g64.abs().max().item() + 1) if g64.numel() else 0.0
        assert_close_by_rule(g, g32, g64, atol, f"grad {name}")


@pytest.mark.parametrize("bias", [True, False])
def test_explicit_reference_backward_equals_reference_autograd(bias):
    p = {k: v.double() for k, v in _params((4, 3), 37, 29, bias, "cpu").items()}
    seed, lam = 12345, 0.07
    for training in (True, False):
        _, auto = _run(ref.diff_linear, p, seed=seed, training=training, l0_lambda=lam)
        gx, gw, gla, gbw, gbla = ref.diff_linear_backward(
            p["gy"], p["x"], p["weight"], p["diff"], p["log_alpha"], p.get("bias_diff"), p.get("bias_log_alpha"),
            seed=seed, training=training, l=L, r=R, beta=BETA, l0_lambda=lam)
        far = _far_from_clamp(p, seed, training)
        torch.testing.assert_close(gx, auto["x"])
        torch.testing.assert_close(gw, auto["diff"])
        torch.testing.assert_close(gla[far["log_alpha"]], auto["log_alpha"][far["log_alpha"]])
        if bias:
            torch.testing.assert_close(gbw, auto["bias_diff"])
            torch.testing.assert_close(gbla[far["bias_log_alpha"]], auto["bias_log_alpha"][far["bias_log_alpha"]])


def test_frozen_base_gets_gradient_when_it_asks_for_one(device_backend):
    device, _ = device_backend
    p = _params((6,), 9, 341, True, device)
    trainable = TRAINABLE + ("weight", "bias")
    _, grads = _run(dpkernels.diff_linear, p, seed=3, training=True, l0_lambda=0.0, trainable=trainable)
    _, grads64 = _run(ref.diff_linear, {k: v.double() for k, v in p.items()}, seed=3, training=True,
                      l0_lambda=0.0, trainable=trainable)
    for name in ("weight", "bias"):
        torch.testing.assert_close(grads[name].double(), grads64[name], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("compute_dtype", [torch.bfloat16, torch.float16])
def test_low_precision_activations(device_backend, compute_dtype):
    device, _ = device_backend
    p = _params((33,), 64, 48, True, device)
    p["x"] = p["x"].to(compute_dtype)
    p["weight"] = p["weight"].to(compute_dtype)  # frozen base stored in the compute dtype
    p["bias"] = p["bias"].to(compute_dtype)
    y, grads = _run(dpkernels.diff_linear, p, seed=8, training=True, l0_lambda=0.0)
    assert y.dtype == compute_dtype
    assert grads["x"].dtype == compute_dtype and grads["diff"].dtype == torch.float32
    p64 = {k: v.double() for k, v in p.items()}
    y64, grads64 = _run(ref.diff_linear, p64, seed=8, training=True, l0_lambda=0.0)
    # torch in the same dtype: nn.Linear's computation on the correctly rounded effective weight.
    w_eff = ref.effective_weight(p64["weight"], p64["diff"], p64["log_alpha"], seed=8)
    b_eff = ref.effective_weight(p64["bias"], p64["bias_diff"], p64["bias_log_alpha"], seed=8,
                                 offset=p["weight"].numel())
    y_same = torch.nn.functional.linear(p["x"], w_eff.to(compute_dtype), b_eff.to(compute_dtype))
    eps = torch.finfo(compute_dtype).eps
    assert_close_by_rule(y, y_same, y64, eps * (y64.abs().max().item() + 1), "y")
    gw_rel = (grads["diff"].double() - grads64["diff"]).abs().max() / grads64["diff"].abs().max()
    assert gw_rel < 4 * eps  # dL/dW comes from one low-precision GEMM, as in nn.Linear


def test_autocast(device_backend):
    device, _ = device_backend
    dtype = torch.bfloat16
    p = _params((2, 5), 64, 48, True, device)
    leaves = {k: v.detach().clone().requires_grad_(k in TRAINABLE) for k, v in p.items() if k != "gy"}
    with torch.autocast(device_type=device, dtype=dtype):
        y = dpkernels.diff_linear(leaves["x"], leaves["weight"], leaves["bias"], leaves["diff"], leaves["log_alpha"],
                                  leaves["bias_diff"], leaves["bias_log_alpha"], seed=4)
        ref_linear = torch.nn.functional.linear(leaves["x"], leaves["weight"])
    assert y.dtype == ref_linear.dtype == dtype
    (y.float() * p["gy"]).sum().backward()
    assert leaves["x"].grad.dtype == torch.float32 and leaves["diff"].grad.dtype == torch.float32
    p64 = {k: v.double() for k, v in p.items()}
    y64, grads64 = _run(ref.diff_linear, p64, seed=4, training=True, l0_lambda=0.0)
    torch.testing.assert_close(y.double(), y64, rtol=2e-2, atol=2e-2)
    rel = (leaves["diff"].grad.double() - grads64["diff"]).abs().max() / grads64["diff"].abs().max()
    assert rel < 4 * torch.finfo(dtype).eps


def test_nn_linear_behaviour_for_odd_inputs(device_backend):
    device, _ = device_backend
    p = _params((4,), 9, 7, True, device)

    def args(x):
        return x, p["weight"], p["bias"], p["diff"], p["log_alpha"], p["bias_diff"], p["bias_log_alpha"]

    # zero-size batch
    x0 = torch.randn(0, 9, device=device, requires_grad=True)
    diff = p["diff"].clone().requires_grad_()
    y0 = dpkernels.diff_linear(x0, p["weight"], p["bias"], diff, p["log_alpha"], seed=1)
    assert y0.shape == (0, 7)
    y0.sum().backward()
    assert torch.equal(diff.grad, torch.zeros_like(diff))
    # no input features, as nn.Linear(0, n): the output is the bias (gated), in both stages
    layer = dpkernels.DiffLinear(0, 4, device=device)
    x = torch.randn(2, 3, 0, device=device, requires_grad=True)
    for stage in ("l0", "fixed_mask"):
        if stage == "fixed_mask":
            dpkernels.project(layer, 0.5)
        torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))
        layer(x).sum().backward()
        assert x.grad.shape == x.shape
    # non-contiguous input: the result of its contiguous copy (up to BLAS summation order)
    xt = torch.randn(9, 4, device=device).t()
    assert not xt.is_contiguous()
    torch.testing.assert_close(dpkernels.diff_linear(*args(xt), seed=5),
                               dpkernels.diff_linear(*args(xt.contiguous()), seed=5))
    # no_grad builds no graph
    with torch.no_grad():
        assert dpkernels.diff_linear(*args(p["x"]), seed=5).grad_fn is None


def test_gradients_accumulate_like_autograd(device_backend):
    device, _ = device_backend
    p = _params((6,), 9, 341, True, device)
    diff = p["diff"].clone().requires_grad_()
    la = p["log_alpha"].clone().requires_grad_()

    def step(seed):
        y = dpkernels.diff_linear(p["x"], p["weight"], p["bias"], diff, la, seed=seed, l0_lambda=0.1)
        (y * p["gy"]).sum().backward()

    step(1)
    first = diff.grad.clone(), la.grad.clone()
    diff.grad = la.grad = None
    step(2)
    second = diff.grad.clone(), la.grad.clone()
    diff.grad = la.grad = None
    step(1)
    step(2)
    torch.testing.assert_close(diff.grad, first[0] + second[0])
    torch.testing.assert_close(la.grad, first[1] + second[1])


def test_same_seed_same_output_other_seed_other_output(device_backend):
    device, _ = device_backend
    p = _params((8,), 64, 48, True, device)
    args = (p["x"], p["weight"], p["bias"], p["diff"], p["log_alpha"], p["bias_diff"], p["bias_log_alpha"])
    a = dpkernels.diff_linear(*args, seed=10)
    assert torch.equal(a, dpkernels.diff_linear(*args, seed=10))
    assert not torch.equal(a, dpkernels.diff_linear(*args, seed=11))
    e = dpkernels.diff_linear(*args, training=False)
    assert torch.equal(e, dpkernels.diff_linear(*args, training=False, seed=999))
