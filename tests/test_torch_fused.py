"""The torch backend's fused CPU gate passes (torch.compile) against the eager reference."""

import pytest
import torch
from conftest import assert_close_by_rule

from dpkernels import reference as ref
from dpkernels.backends import torch_fused

EPS32 = torch.finfo(torch.float32).eps
ARGS = dict(l=-1.5, r=1.5, beta=1.0)


@pytest.fixture
def fuse_everything(monkeypatch):
    monkeypatch.setenv("DPKERNELS_CPU_FUSE_MIN", "1")
    monkeypatch.setattr(torch_fused, "_disabled_reason", None)
    before = torch_fused.fused_calls
    yield
    assert torch_fused.fused_calls > before, "the fused path did not run"


def _case(n=4231, seed=0):
    gen = torch.Generator().manual_seed(seed)
    la = torch.randn(n, generator=gen) * 3
    la[:4] = torch.tensor([1e4, -1e4, 0.0, 30.0])[:n]
    return la, torch.randn(n, generator=gen), torch.randn(n, generator=gen) * 0.1, torch.randn(n, generator=gen)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("n", [4231, 2, 17])
def test_fused_forward_matches_the_reference(fuse_everything, training, n):
    la, theta0, diff, _ = _case(n)
    seed, offset = 2**40 + 3, 2**32 - 100
    cfg = (seed, offset, training, ARGS["l"], ARGS["r"], ARGS["beta"])
    z = torch_fused.gate_forward(la, *cfg)
    assert_close_by_rule(z, ref.gate_forward(la, *cfg), ref.gate_forward(la.double(), *cfg), 8 * EPS32, "z")
    eff = torch_fused.gate_forward(la, *cfg, theta0=theta0, diff=diff, out_dtype=torch.float32)
    oracle = ref.gate_forward(la.double(), *cfg, theta0=theta0.double(), diff=diff.double(), out_dtype=torch.float64)
    same = ref.gate_forward(la, *cfg, theta0=theta0, diff=diff, out_dtype=torch.float32)
    assert_close_by_rule(eff, same, oracle, 8 * EPS32 * oracle.abs().max().item(), "effective weight")


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("n", [4231, 2, 17])
def test_fused_backward_matches_the_reference(fuse_everything, training, n):
    la, _, diff, g = _case(n, seed=1)
    cfg = (7, 11, training, ARGS["l"], ARGS["r"], ARGS["beta"], 0.25)
    gw, gla = torch_fused.gate_backward(g, diff, la, *cfg)
    ow, ola = ref.gate_backward(g.double(), diff.double(), la.double(), *cfg)
    tw, tla = ref.gate_backward(g, diff, la, *cfg)
    atol = 8 * EPS32 * ((g.abs() * diff.abs()).max().item() + 0.25)
    assert_close_by_rule(gw, tw, ow, atol, "grad_diff")
    # Entries whose fp64 sbar sits within 1e-5 of the clamp may flip in fp32; compare the rest.
    logit = la.double()
    if training:
        u = ref.uniform(7, la.numel(), 11).double()
        logit = (u.log() - (1 - u).log() + logit) / ARGS["beta"]
    sbar = torch.sigmoid(logit) * (ARGS["r"] - ARGS["l"]) + ARGS["l"]
    far = (sbar.abs() > 1e-5) & ((sbar - 1).abs() > 1e-5)
    assert_close_by_rule(gla[far], tla[far], ola[far], atol, "grad_log_alpha")
    buf_w, buf_la = torch.ones_like(gw), torch.ones_like(gla)
    torch_fused.gate_backward(g, diff, la, *cfg, grad_diff=buf_w, grad_log_alpha=buf_la)
    torch.testing.assert_close(buf_w, gw + 1)
    torch.testing.assert_close(buf_la, gla + 1)


def test_small_tensors_and_float64_stay_eager(monkeypatch):
    monkeypatch.setenv("DPKERNELS_CPU_FUSE_MIN", "1000")
    before = torch_fused.fused_calls
    la = torch.randn(999)
    assert torch.equal(torch_fused.gate_forward(la, 1, 0, True, -1.5, 1.5, 1.0), ref.gate_forward(la, 1, 0, True,
                                                                                                   -1.5, 1.5, 1.0))
    la64 = torch.randn(5000, dtype=torch.float64)
    assert torch.equal(torch_fused.gate_forward(la64, 1, 0, True, -1.5, 1.5, 1.0),
                       ref.gate_forward(la64, 1, 0, True, -1.5, 1.5, 1.0))
    assert torch_fused.fused_calls == before


def test_a_threshold_that_is_no_number_is_named(monkeypatch):
    monkeypatch.setenv("DPKERNELS_CPU_FUSE_MIN", "4k")
    with pytest.raises(ValueError, match="DPKERNELS_CPU_FUSE_MIN must be a whole number .* got '4k'"):
        torch_fused.gate_forward(torch.randn(9), 1, 0, True, -1.5, 1.5, 1.0)


def test_a_failing_compile_falls_back_to_the_reference_with_a_warning(monkeypatch):
    monkeypatch.setenv("DPKERNELS_CPU_FUSE_MIN", "1")
    monkeypatch.setattr(torch_fused, "_disabled_reason", None)
    monkeypatch.setattr(torch_fused, "_compiled", {})

    def broken(fn, **kwargs):
        def run(*args):
            raise RuntimeError("no C++ compiler")
        return run

    monkeypatch.setattr(torch, "compile", broken)
    la = torch.randn(300)
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler"):
        z = torch_fused.gate_forward(la, 3, 0, True, -1.5, 1.5, 1.0)
    assert torch.equal(z, ref.gate_forward(la, 3, 0, True, -1.5, 1.5, 1.0))
    assert torch_fused._disabled_reason is not None


def test_the_default_fuses_a_small_layers_training_step(monkeypatch):
    """At the default threshold (4096 elements) a 64x80 layer's weight takes the fused passes, its
    bias the eager ones, and a training step matches the eager reference's."""
    import dpkernels

    monkeypatch.setattr(torch_fused, "_disabled_reason", None)

    def step(fuse_min):
        if fuse_min is None:
            monkeypatch.delenv("DPKERNELS_CPU_FUSE_MIN")
        else:
            monkeypatch.setenv("DPKERNELS_CPU_FUSE_MIN", fuse_min)
        torch.manual_seed(0)
        layer = dpkernels.DiffLinear(64, 80, l0_lambda=1e-2, alpha_init=0.5)
        x = torch.randn(5, 64, requires_grad=True)
        y = layer(x)
        y.square().sum().backward()
        return [y, x.grad, layer.diff.grad, layer.log_alpha.grad, layer.bias_diff.grad, layer.bias_log_alpha.grad]

    before = torch_fused.fused_calls
    fused = step(None)
    assert torch_fused.fused_calls == before + 2  # the weight's forward and backward
    eager = step("0")
    assert torch_fused.fused_calls == before + 2
    for a, b in zip(fused, eager, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_a_training_loops_mixed_modes_stay_compiled(fuse_everything):
    """Train and eval passes, grad / no_grad / inference mode, autocast on and off, bf16/fp16/fp32
    bases, bf16/fp32 gradients, with and without L0: every combination runs compiled, none past
    dynamo's recompile limit (beyond which calls would silently run eager)."""
    import contextlib

    from torch._C._dynamo.eval_frame import _debug_get_cache_entry_list

    la, theta0, diff, g = _case(300)
    la.requires_grad_(True)
    contexts = (contextlib.nullcontext, torch.no_grad, torch.inference_mode)
    for training in (True, False):
        for context in contexts:
            for autocast in (False, True):
                with context(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                    torch_fused.gate_forward(la, 5, 0, training, **ARGS)
                    for base in (torch.float32, torch.bfloat16, torch.float16):
                        out = torch_fused.gate_forward(la, 5, 0, training, **ARGS, theta0=theta0.to(base), diff=diff,
                                                       out_dtype=base)
                        assert out.dtype == base
                    for grad in (g, g.bfloat16()):
                        for l0_lambda in (0.0, 0.5):
                            torch_fused.gate_backward(grad, diff, la, 5, 0, training, **ARGS, l0_lambda=l0_lambda)
    limit = torch._dynamo.config.recompile_limit
    for name, fn in torch_fused.MODES.items():
        entries = len(_debug_get_cache_entry_list(fn.__code__))
        assert 0 < entries < limit, f"{name}: {entries} compiled graphs (dynamo keeps {limit})"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_cpu_sddmm_takes_one_gemm_from_the_density_threshold_on(dtype):
    gen = torch.Generator().manual_seed(9)
    m, n, k = 70, 40, 32
    gy, x = torch.randn(m, n, generator=gen).to(dtype), torch.randn(m, k, generator=gen).to(dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    dense = (gy.to(acc).t() @ x.to(acc)).reshape(-1)
    threshold = int(torch_fused.SDDMM_DENSE_MIN_DENSITY * n * k)  # 5 entries of 1280
    for nnz, expected in ((threshold - 1, ref.sddmm), (threshold + 1, None), (n * k // 5, None)):
        index = torch.randperm(n * k, generator=gen)[:nnz].sort().values
        out = torch_fused.sddmm(gy, x, index, k)
        want = expected(gy, x, index, k) if expected else dense[index]
        assert out.dtype == acc and torch.equal(out, want)  # the reference's gathers, or the one GEMM
        oracle = ref.sddmm(gy.double(), x.double(), index, k)
        scale = (gy.double().abs().t() @ x.double().abs()).max().item()
        assert_close_by_rule(out, ref.sddmm(gy, x, index, k), oracle, 4 * torch.finfo(acc).eps * scale, "sddmm")
