"""The fused diff-linear path: Triton kernels vs float64, path choice, custom ops, torch.compile."""

import pytest
import torch
from conftest import HAS_CUDA, INTERPRETED, TRITON_DEVICES, assert_close_by_rule, far_from_clamp, max_err

import dpkernels
from dpkernels import ops
from dpkernels import reference as ref

L, R, BETA = -1.5, 1.5, 1.0
GATES = (L, R, BETA)
# (M tokens, K in, N out): odd sizes; CUDA adds real ones.
SHAPES = [(1, 1, 1), (9, 9, 9), (5, 341, 9), (17, 9, 70), (33, 64, 48)]
CUDA_SHAPES = [(512, 768, 3072), (8192, 1024, 4096), (4231, 4096, 341)]


def _shapes(device):
    return SHAPES + (CUDA_SHAPES if device == "cuda" else [])


def _inputs(m, k, n, device, cdt, base_dtype, seed=0, la_scale=2.0):
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device)

    return dict(
        x=randn(m, k).to(cdt), gy=randn(m, n).to(cdt), theta0=(randn(n, k) / k**0.5).to(base_dtype),
        diff=randn(n, k, scale=0.5), log_alpha=randn(n, k, scale=la_scale), bias=randn(n).to(cdt))


def _f64(t):
    return {k: v.double() for k, v in t.items()}


def _atol(oracle, dtype):
    return 16 * torch.finfo(dtype).eps * (oracle.abs().max().item() + 1) if oracle.numel() else 0.0


def _gemm_fp32_out(a, b):
    """a @ b with an fp32 result as torch computes it from operands in their dtype: on CUDA a bf16/fp16
    GEMM with an fp32 output, accumulated by the tensor cores as the kernel's is (not round-to-nearest
    fp32: Fasi et al. 2021 measured truncation on V100-A100, so an fp32 GEMM of the same values is
    the wrong yardstick at M = 8192); elsewhere in fp32."""
    if a.is_cuda and a.dtype != torch.float32:
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()


def _kernels():
    from dpkernels.backends import triton as tk

    return tk


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("cdt,base_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                            (torch.float16, torch.float32), (torch.bfloat16, torch.float16)])
@pytest.mark.parametrize("training", [True, False])
def test_fused_kernels_match_float64_reference(device, cdt, base_dtype, training):
    for m, k, n in _shapes(device):
        _check_fused_kernels(device, m, k, n, cdt, base_dtype, training)


def _check_fused_kernels(device, m, k, n, cdt, base_dtype, training, which=("y", "dX", "dW")):
    """The forward, dX and weight-gradient kernels at one shape vs float64, by DESIGN.md's rule."""
    tk = _kernels()
    t = _inputs(m, k, n, device, cdt, base_dtype, seed=m + k + n)
    seed, offset, lam = 2**63 + 5 * m, 3 * k, 0.03
    gates = (seed, offset, training, *GATES)
    t64 = _f64(t)
    if "y" in which:
        _check_gemm("y", tk.gated_linear(t["x"], t["theta0"], t["diff"], t["log_alpha"], t["bias"], *gates),
                    ref.gated_linear(t["x"], t["theta0"], t["diff"], t["log_alpha"], t["bias"], *gates),
                    ref.gated_linear(t64["x"], t64["theta0"], t64["diff"], t64["log_alpha"], t64["bias"], *gates), cdt)
    if "dX" in which:
        _check_gemm("dX", tk.gated_linear_grad_input(t["gy"], t["theta0"], t["diff"], t["log_alpha"], *gates),
                    ref.gated_linear_grad_input(t["gy"], t["theta0"], t["diff"], t["log_alpha"], *gates),
                    ref.gated_linear_grad_input(t64["gy"], t64["theta0"], t64["diff"], t64["log_alpha"], *gates), cdt)
    if "dW" in which:
        gd, gla = tk.gated_linear_grad_weight(t["gy"], t["x"], t["diff"], t["log_alpha"], *gates, lam)
        gd64, gla64 = ref.gated_linear_grad_weight(t64["gy"], t64["x"], t64["diff"], t64["log_alpha"], *gates, lam)
        # The epilogue routes the fp32 accumulator of a GEMM in cdt: compare with torch's own.
        gd32, gla32 = ref.gate_backward(_gemm_fp32_out(t["gy"].t(), t["x"]), t["diff"], t["log_alpha"], *gates, lam)
        assert gd.dtype == gla.dtype == torch.float32
        far = far_from_clamp(t64["log_alpha"], seed, offset, training)
        assert_close_by_rule(gd, gd32, gd64, _atol(gd64, torch.float32), f"grad_diff {m}x{k}->{n}")
        assert_close_by_rule(gla[far], gla32[far], gla64[far], _atol(gla64, torch.float32),
                             f"grad_log_alpha {m}x{k}->{n}")


def _check_gemm(name, kernel, same, oracle, cdt):
    assert kernel.dtype == cdt
    # torch in the same dtype: the correctly rounded effective weight, then torch's GEMM.
    assert_close_by_rule(kernel, same, oracle, _atol(oracle, cdt), f"{name} {tuple(oracle.shape)}")


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_every_autotuning_config_matches_float64_reference(device, monkeypatch):
    """Each tile the autotuner may pick, launched directly (the suite runs with DPKERNELS_AUTOTUNE=0;
    the interpreter ignores warps and stages), at a shape with partial tiles everywhere; then on a
    GPU the autotuner itself at a real shape."""
    from dpkernels.backends.triton import diff_linear as fused

    monkeypatch.setenv("DPKERNELS_AUTOTUNE", "0")
    for size in fused._MATMUL_SIZES:
        monkeypatch.setattr(fused, "_MATMUL_BLOCKS", fused.launch_options(fused._MATMUL_NAMES, size))
        _check_fused_kernels(device, 75, 200, 133, torch.bfloat16, torch.bfloat16, True, which=("y", "dX"))
    for size in fused._WGRAD_SIZES:
        monkeypatch.setattr(fused, "_WGRAD_BLOCKS", fused.launch_options(fused._WGRAD_NAMES, size))
        _check_fused_kernels(device, 75, 200, 133, torch.bfloat16, torch.bfloat16, True, which=("dW",))
    if device == "cuda":
        monkeypatch.setenv("DPKERNELS_AUTOTUNE", "1")
        _check_fused_kernels(device, 512, 768, 3072, torch.bfloat16, torch.bfloat16, True)


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_split_k_matches_float64_reference_and_repeats_bit_for_bit(device, monkeypatch):
    """Split-K: S fp32 slices of whole BLOCK_Q steps, summed in slice order (bias added) by a second
    launch. From 2 slices to more slices than reduction steps (the last ones empty: they write
    zeros), one and several row blocks, each compute dtype; the same call twice gives the same bits."""
    from dpkernels.backends.triton import diff_linear as fused

    for slices, (m, k, n), (cdt, base_dtype) in [  # 16x16x16 blocks interpreted: 7 and 3 reduction steps
            (2, (9, 100, 40), (torch.bfloat16, torch.bfloat16)), (3, (9, 100, 40), (torch.float16, torch.float32)),
            (16, (9, 100, 40), (torch.float32, torch.float32)), (3, (33, 45, 21), (torch.bfloat16, torch.bfloat16))]:
        monkeypatch.setattr(fused, "_split_slices", lambda *args, s=slices: s)
        _check_fused_kernels(device, m, k, n, cdt, base_dtype, True, which=("y", "dX"))
    monkeypatch.setattr(fused, "_split_slices", lambda *args: 4)
    t = _inputs(9, 100, 40, device, torch.bfloat16, torch.bfloat16)
    gates = (123, 4, True, *GATES)
    weight = (t["theta0"], t["diff"], t["log_alpha"])
    for bias in (None, t["bias"]):
        y = fused.gated_linear(t["x"], *weight, bias, *gates)
        assert torch.equal(y, fused.gated_linear(t["x"], *weight, bias, *gates))
        y64 = ref.gated_linear(*(v.double() for v in (t["x"], *weight)), None if bias is None else bias.double(),
                               *gates)
        assert_close_by_rule(y, ref.gated_linear(t["x"], *weight, bias, *gates), y64, _atol(y64, torch.bfloat16),
                             f"split y, bias={bias is not None}")


@pytest.mark.skipif(not INTERPRETED, reason="the interpreter's fixed blocks; on a GPU autotuning picks the slices")
@pytest.mark.parametrize("split", [1, 2, 4])
def test_weight_gradient_epilogue_slices_route_the_same_gradients(split, monkeypatch):
    import importlib

    module = importlib.import_module("dpkernels.backends.triton.diff_linear")
    monkeypatch.setitem(module._WGRAD_BLOCKS, "EPILOGUE_SPLIT", split)
    m, k, n = 21, 45, 19  # partial tiles in both directions, with 16x16 blocks
    t = _inputs(m, k, n, "cpu", torch.float32, torch.float32, seed=split)
    gates = (2**40 + split, 5, True, *GATES)
    gd, gla = module.gated_linear_grad_weight(t["gy"], t["x"], t["diff"], t["log_alpha"], *gates, 0.1)
    t64 = _f64(t)
    gd64, gla64 = ref.gated_linear_grad_weight(t64["gy"], t64["x"], t64["diff"], t64["log_alpha"], *gates, 0.1)
    far = far_from_clamp(t64["log_alpha"], gates[0], gates[1], True)
    torch.testing.assert_close(gd.double(), gd64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gla.double()[far], gla64[far], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_fused_kernels_take_strided_operands(device):
    tk = _kernels()
    m, k, n = 13, 40, 24
    t = _inputs(m, k, n, device, torch.float32, torch.float32)
    gates = (77, 0, True, *GATES)
    x_t = t["x"].t().contiguous().t()  # column-major (M, K)
    gy_strided = torch.randn(m, 2 * n, device=device)[:, ::2]
    assert not x_t.is_contiguous() and not gy_strided.is_contiguous()
    torch.testing.assert_close(tk.gated_linear(x_t, t["theta0"], t["diff"], t["log_alpha"], None, *gates),
                               tk.gated_linear(t["x"], t["theta0"], t["diff"], t["log_alpha"], None, *gates))
    torch.testing.assert_close(tk.gated_linear_grad_input(gy_strided, t["theta0"], t["diff"], t["log_alpha"], *gates),
                               tk.gated_linear_grad_input(gy_strided.contiguous(), t["theta0"], t["diff"],
                                                          t["log_alpha"], *gates))
    for a, b in zip(tk.gated_linear_grad_weight(gy_strided, x_t, t["diff"], t["log_alpha"], *gates),
                    tk.gated_linear_grad_weight(gy_strided.contiguous(), t["x"], t["diff"], t["log_alpha"], *gates),
                    strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_fused_kernels_stay_finite_for_extreme_log_alpha_and_empty_shapes(device):
    tk = _kernels()
    m, k, n = 7, 33, 18
    t = _inputs(m, k, n, device, torch.float32, torch.float32)
    t["log_alpha"] = torch.tensor([-1e4, 1e4, 0.0], device=device).repeat(n * k)[: n * k].reshape(n, k)
    gates = (0, 0, True, *GATES)
    y = tk.gated_linear(t["x"], t["theta0"], t["diff"], t["log_alpha"], t["bias"], *gates)
    gd, gla = tk.gated_linear_grad_weight(t["gy"], t["x"], t["diff"], t["log_alpha"], *gates, 0.1)
    assert torch.isfinite(y).all() and torch.isfinite(gd).all() and torch.isfinite(gla).all()
    y64 = ref.gated_linear(*(v.double() for v in (t["x"], t["theta0"], t["diff"], t["log_alpha"], t["bias"])), *gates)
    assert max_err(y, y64) < 1e-4
    # Zero tokens: empty output, zero weight gradient plus the L0 term alone.
    x0, gy0 = t["x"][:0], t["gy"][:0]
    assert tk.gated_linear(x0, t["theta0"], t["diff"], t["log_alpha"], None, *gates).shape == (0, n)
    gd0, gla0 = tk.gated_linear_grad_weight(gy0, x0, t["diff"], t["log_alpha"], *gates, 0.1)
    assert torch.equal(gd0, torch.zeros_like(gd0))
    torch.testing.assert_close(gla0, 0.1 * ref.expected_l0_grad(t["log_alpha"], l=L, r=R, beta=BETA))
    # Zero input features: y = bias.
    torch.testing.assert_close(
        tk.gated_linear(t["x"][:, :0], t["theta0"][:, :0], t["diff"][:, :0], t["log_alpha"][:, :0], t["bias"],
                        *gates), t["bias"].expand(m, n))


# --------------------------------------------------------------------------------------------
# Path choice and the op-level contract
# --------------------------------------------------------------------------------------------


def _layer_args(device, m=6, k=9, n=7, seed=0):
    t = _inputs(m, k, n, device, torch.float32, torch.float32, seed=seed)
    return (t["x"], t["theta0"], t["bias"], t["diff"], t["log_alpha"], t["diff"][:, 0].clone(),
            t["log_alpha"][:, 0].clone())


def _spy(monkeypatch):
    from dpkernels.backends import load

    module, calls = load("triton"), []
    original = module.gated_linear

    def counting(*args, **kwargs):
        calls.append(args[0].shape[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(module, "gated_linear", counting)
    return calls


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_auto_takes_the_paths_the_cost_model_predicts_faster(device, monkeypatch):
    """auto asks path_cost.auto_paths with this call's shape and what its backward will run: dX only
    when x needs a gradient, the weight gradient only when diff or log_alpha do, and never fused when
    the base weight needs its own gradient (its dense dW exists anyway: one routing pass, not a second
    GEMM). The forced paths bypass the model."""
    from dpkernels import path_cost

    monkeypatch.setenv("DPKERNELS_BACKEND", "triton")
    calls, asked = _spy(monkeypatch), []
    verdict = {"forward": True, "wgrad": True}

    def model(m, n, k, **context):
        asked.append((m, n, k, context))
        return verdict["forward"], verdict["wgrad"]

    monkeypatch.setattr(path_cost, "auto_paths", model)
    x, w, b, d, la, bd, bla = _layer_args(device, m=5)
    dpkernels.diff_linear(x, w, b, d, la, bd, bla, seed=1)
    verdict["forward"] = False
    dpkernels.diff_linear(x.requires_grad_(), w, b, d.requires_grad_(), la, bd, bla, seed=1, training=False)
    with torch.no_grad():
        dpkernels.diff_linear(x, w, b, d, la, bd, bla, seed=1)
    assert calls == [5]  # the fused forward only where the model said so
    context = dict(base_size=4, cdt_size=4)
    assert asked == [(5, 7, 9, dict(training=True, input_grad=False, gate_grad=False, **context)),
                     (5, 7, 9, dict(training=False, input_grad=True, gate_grad=True, **context)),
                     (5, 7, 9, dict(training=True, input_grad=False, gate_grad=False, **context))]
    backend = ops.select("diff_linear", d.device, d.dtype)
    assert ops._fused_diff_linear(backend, x, w, d, la, True) == (False, True)
    assert ops._fused_diff_linear(backend, x, w.clone().requires_grad_(), d, la, True) == (False, False)
    asked.clear()
    monkeypatch.setenv("DPKERNELS_DIFF_LINEAR", "fused")
    dpkernels.diff_linear(*_layer_args(device, m=600), seed=1)
    monkeypatch.setenv("DPKERNELS_DIFF_LINEAR", "unfused")
    dpkernels.diff_linear(*_layer_args(device, m=1), seed=1)
    assert calls == [5, 600] and not asked


def test_auto_keeps_the_backends_without_fused_kernels_unfused(monkeypatch):
    monkeypatch.setenv("DPKERNELS_BACKEND", "torch")
    x, w, b, d, la, bd, bla = _layer_args("cpu")
    backend = ops.select("diff_linear", d.device, d.dtype)
    assert ops._fused_diff_linear(backend, x, w, d, la, True) == (False, False)


def test_path_choice_errors(monkeypatch):
    args = _layer_args("cpu")
    monkeypatch.setenv("DPKERNELS_DIFF_LINEAR", "fastest")
    with pytest.raises(ValueError, match="DPKERNELS_DIFF_LINEAR='fastest'"):
        dpkernels.diff_linear(*args, seed=1)
    monkeypatch.setenv("DPKERNELS_DIFF_LINEAR", "fused")
    monkeypatch.setenv("DPKERNELS_BACKEND", "torch")
    for path in ("fused", "fused-forward", "fused-wgrad"):
        monkeypatch.setenv("DPKERNELS_DIFF_LINEAR", path)
        with pytest.raises(ValueError, match=f"DPKERNELS_DIFF_LINEAR={path} needs the triton backend"):
            dpkernels.diff_linear(*args, seed=1)


def test_fp32_dot_precision_follows_both_tf32_apis():
    """allow_tf32 (legacy) and fp32_precision (torch >= 2.9) both pick the fp32 dot; after the new
    API is used, reading the legacy flag raises in torch, which the fused path must not."""
    pytest.importorskip("triton")
    from dpkernels.backends.triton import diff_linear as fused

    matmul = torch.backends.cuda.matmul
    if not hasattr(matmul, "fp32_precision"):
        pytest.skip("this torch has only allow_tf32")
    saved = matmul.fp32_precision, torch.backends.fp32_precision
    try:
        matmul.allow_tf32 = True
        assert fused._precision(torch.float32)[1] == "tf32"
        matmul.allow_tf32 = False
        assert fused._precision(torch.float32)[1] == "ieee"
        matmul.fp32_precision = "tf32"
        assert fused._precision(torch.float32)[1] == "tf32"
        matmul.fp32_precision = "ieee"
        assert fused._precision(torch.float32)[1] == "ieee"
        matmul.fp32_precision, torch.backends.fp32_precision = "none", "tf32"  # inherited from the global one
        assert fused._precision(torch.float32)[1] == "tf32"
        assert fused._precision(torch.bfloat16)[1] == "tf32"  # moot for bf16 operands: Triton's default
    finally:
        torch.backends.fp32_precision = saved[1]
        matmul.fp32_precision = saved[0]


def test_seed_tensor_is_the_int_seed_and_bad_seed_tensors_raise():
    args = _layer_args("cpu")
    for seed in (0, 12345, 2**63 + 9, 2**64 - 1):
        torch.testing.assert_close(dpkernels.diff_linear(*args, seed=ops._seed_tensor(seed)),
                                   dpkernels.diff_linear(*args, seed=seed), rtol=0, atol=0)
    for bad in (torch.tensor(1.0), torch.tensor([1, 2]), torch.tensor(3, dtype=torch.int32)):
        with pytest.raises(TypeError, match="seed tensor"):
            dpkernels.diff_linear(*args, seed=bad)


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("path", ["fused", "unfused", "fused-forward", "fused-wgrad"])
def test_nothing_fp32_weight_sized_is_saved_for_backward(device, path, monkeypatch):
    monkeypatch.setenv("DPKERNELS_BACKEND", "triton")
    monkeypatch.setenv("DPKERNELS_DIFF_LINEAR", path)
    x, w, b, d, la, bd, bla = _layer_args(device, m=8, k=40, n=24)
    x, w, b = x.bfloat16().requires_grad_(), w.bfloat16(), b.bfloat16()
    d.requires_grad_(), la.requires_grad_()
    y = dpkernels.diff_linear(x, w, b, d, la, seed=3)
    parameters = {t.data_ptr() for t in (w, b, d, la)}
    weight_sized = [t for t in y.grad_fn.saved_tensors
                    if t is not None and t.numel() == w.numel() and t.data_ptr() not in parameters]
    # Unfused forward: one bf16 copy of the effective weight (as nn.Linear saves its weight); fused: none.
    assert [t.dtype for t in weight_sized] == ([] if path in ("fused", "fused-forward") else [torch.bfloat16])


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("path,backend", [("fused", "triton"), ("unfused", "triton"), ("fused-forward", "triton"),
                                          ("fused-wgrad", "triton"), ("unfused", "torch")])
@pytest.mark.parametrize("training", [True, False])
def test_custom_ops_pass_opcheck(device, path, backend, training, monkeypatch):
    monkeypatch.setenv("DPKERNELS_BACKEND", backend)
    x, w, b, d, la, bd, bla = _layer_args(device)
    for t in (x, d, la, bd, bla):
        t.requires_grad_()
    seed = ops._seed_tensor(2**63 + 11)
    base = (w.clone().requires_grad_(), b.clone().requires_grad_())  # a frozen base that asks for gradients
    for weight, bias, bias_diff, bias_la in ((w, b, bd, bla), (w, b, None, None), (w, None, None, None),
                                             (*base, bd, bla)):
        args = (x, weight, bias, d, la, bias_diff, bias_la, seed, training, *GATES, 0.02, *ops._PATHS[path])
        torch.library.opcheck(torch.ops.dpkernels.diff_linear.default, args)


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("path", ["fused", "unfused"])
def test_torch_compile_fullgraph_matches_eager(device, path, monkeypatch):
    import torch._inductor.config as inductor_config

    if device == "cpu":  # the Triton kernels run in the interpreter inside the opaque custom op
        monkeypatch.setenv("DPKERNELS_BACKEND", "triton")
    monkeypatch.setenv("DPKERNELS_DIFF_LINEAR", path)
    torch.manual_seed(0)
    model = torch.nn.Sequential(dpkernels.DiffLinear(9, 16, l0_lambda=0.01), torch.nn.GELU(),
                                dpkernels.DiffLinear(16, 5, bias=False)).to(device)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "diff" in name:
                p.normal_(0, 0.5)
            elif "log_alpha" in name:
                p.normal_(0, 2)
    x = torch.randn(2, 3, 9, device=device)
    trainable = [p for p in model.parameters() if p.requires_grad]

    def step(fn):
        torch.manual_seed(7)
        y = fn(x)
        grads = torch.autograd.grad((y * y).sum(), trainable)
        return y.detach(), grads, (model[0].last_seed, model[2].last_seed)

    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    y_e, g_e, seeds_e = step(model)
    with inductor_config.patch(fallback_random=True):  # torch.randint as in eager: the same seeds
        y_c, g_c, seeds_c = step(compiled)
        assert seeds_c == seeds_e
        torch.testing.assert_close(y_c, y_e)
        for a, b in zip(g_c, g_e, strict=True):
            torch.testing.assert_close(a, b)
        model.eval()
        torch.testing.assert_close(compiled(x), model(x))


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_fused_and_unfused_paths_agree_at_real_shapes_in_bf16(monkeypatch):
    monkeypatch.setenv("DPKERNELS_BACKEND", "triton")
    layer = dpkernels.DiffLinear(1024, 4096, l0_lambda=1e-3, device="cuda")
    with torch.no_grad():
        layer.diff.normal_(0, 0.01)
        layer.log_alpha.normal_(0, 2)
    x = torch.randn(4, 128, 1024, device="cuda", requires_grad=True)
    results = {}
    for path in ("fused", "unfused"):
        monkeypatch.setenv("DPKERNELS_DIFF_LINEAR", path)
        torch.manual_seed(3)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = layer(x)
        grads = torch.autograd.grad(y.float().square().sum(), [x, layer.diff, layer.log_alpha, layer.bias_diff])
        results[path] = (y.float(), *[g.float() for g in grads])
    for a, b in zip(results["fused"], results["unfused"], strict=True):
        assert (a - b).abs().max() <= 2e-2 * b.abs().max()
