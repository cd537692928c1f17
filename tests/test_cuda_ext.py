"""The CUDA extension dpkernels._C.

On the CPU (run by CI, skipped when the extension is not built): the kernels' own Philox and gate
math (csrc/philox.cuh, csrc/gates.cuh, compiled for the host) against the reference, and the input
validation of the kernel entry points, which runs before any GPU is touched. On a GPU (`cuda`
marker): the kernels against Triton and the float64 reference, both load paths, bad inputs.
The backend-parametrized tests (test_gates, test_diff_linear, ...) also run the cuda backend.
"""

import subprocess
import sys
import types

import pytest
import torch
from conftest import CUDA_EXT_MISSING, HAS_CUDA, assert_close_by_rule
from test_gates import GATE_ATOL, GATE_CONFIGS, U_ZERO_OFFSETS, U_ZERO_SEED, _log_alpha, _near_boundary, _sbar64
from test_philox import _KAT, _offsets, _seeds, _triton_rand

import dpkernels
from dpkernels import backends
from dpkernels import reference as ref
from dpkernels.backends import cuda as cuda_backend

needs_ext = pytest.mark.skipif(CUDA_EXT_MISSING is not None, reason=f"{CUDA_EXT_MISSING}")
needs_gpu = [pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU"), needs_ext]
L, R, BETA = -1.5, 1.5, 1.0


@pytest.fixture
def ext():
    return cuda_backend.extension()


def _oracle_gates(la, seed, offset, training, l, r, beta):
    """(z, dz) of the reference in la's dtype (float64 for the oracle, float32 for 'torch same dtype')."""
    if training:
        u = ref.uniform(seed, la.numel(), offset, la.device).reshape(la.shape)
        return ref.hard_concrete(la, u, l=l, r=r, beta=beta)
    return ref.eval_gates_and_grad(la, l=l, r=r)


# --------------------------------------------------------------------------------------------
# Host build of the kernels' Philox and gate math (CPU)
# --------------------------------------------------------------------------------------------


@needs_ext
@pytest.mark.parametrize("counter,key,expected", _KAT)
def test_host_philox_known_answers(ext, counter, key, expected):
    assert ext.philox4x32(*counter, *key) == expected


@needs_ext
@pytest.mark.parametrize("seed", _seeds())
def test_host_philox_matches_reference_bit_for_bit(ext, seed):
    # Offsets near 2**31, 2**32 - 1, beyond 2**32 and up to 2**63 - 1, and the u = 0 counters.
    offsets = torch.cat([_offsets("cpu"), torch.tensor(U_ZERO_OFFSETS)])
    u = ext.philox_uniform(seed, offsets)
    assert u.dtype == torch.float32 and u.shape == offsets.shape
    assert torch.equal(u.view(torch.int32), ref.philox_uniform(seed, offsets).view(torch.int32))


@needs_ext
@pytest.mark.parametrize("shape", [(1,), (9,), (341,), (33, 41), (4231,)])
@pytest.mark.parametrize("cfg", GATE_CONFIGS)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("seed,offset", [(2**40 + 123, 2**32 - 17), (2**63 + 5, 2**31 - 3)])
def test_host_gate_math_matches_reference(ext, shape, cfg, training, seed, offset):
    la = _log_alpha(shape, "cpu", torch.Generator().manual_seed(sum(shape)))  # includes +-1e4, +-80
    z, dz = ext.hard_concrete_cpu(la, seed, offset, training, cfg["l"], cfg["r"], cfg["beta"])
    z64, dz64 = _oracle_gates(la.double(), seed, offset, training, **cfg)
    z32, dz32 = _oracle_gates(la, seed, offset, training, **cfg)
    assert_close_by_rule(z, z32, z64, GATE_ATOL, "z")
    far = ~_near_boundary(_sbar64(la, seed, offset, training, **cfg))
    assert torch.equal((z == 0)[far], (z64 == 0)[far]) and torch.equal((z == 1)[far], (z64 == 1)[far])
    slope = (cfg["r"] - cfg["l"]) / (cfg["beta"] if training else 1.0)
    assert_close_by_rule(dz[far], dz32[far], dz64[far], GATE_ATOL * slope, "dz/dlog_alpha")


@needs_ext
@pytest.mark.parametrize("cfg", GATE_CONFIGS)
def test_host_gate_math_at_u_zero_and_extreme_log_alpha(ext, cfg):
    la = torch.tensor([1e4, 50.0, 0.0, -1e4])
    for hit in U_ZERO_OFFSETS:
        for i in range(la.numel()):  # the u = 0 draw under each element in turn
            z, dz = ext.hard_concrete_cpu(la, U_ZERO_SEED, hit - i, True, cfg["l"], cfg["r"], cfg["beta"])
            assert torch.isfinite(z).all() and torch.isfinite(dz).all()
            assert z[i] == 0 and dz[i] == 0
    for training in (True, False):
        z, dz = ext.hard_concrete_cpu(torch.tensor([1e4, -1e4] * 50), 5, 0, training, cfg["l"], cfg["r"], cfg["beta"])
        assert torch.equal(z, torch.tensor([1.0, 0.0] * 50)) and torch.equal(dz, torch.zeros(100))


# --------------------------------------------------------------------------------------------
# Validation of the kernel entry points (CPU: every check before the device check)
# --------------------------------------------------------------------------------------------

_F32 = dict(dtype=torch.float32)


def _fwd(**over):
    args = dict(log_alpha=torch.zeros(6), seed=1, offset=0, training=True, l=L, r=R, beta=BETA)
    args.update(over)
    return ("gate_forward", args)


def _bwd(**over):
    args = dict(g=torch.ones(6), diff=torch.zeros(6), log_alpha=torch.zeros(6), seed=1, offset=0, training=True,
                l=L, r=R, beta=BETA)
    args.update(over)
    return ("gate_backward", args)


BAD_CALLS = [
    (_fwd(log_alpha=torch.zeros(6, dtype=torch.float64)), TypeError, "log_alpha must be Float"),
    (_fwd(log_alpha=torch.zeros(6, 2).t()), ValueError, "log_alpha must be contiguous"),
    (_fwd(theta0=torch.zeros(6)), ValueError, "both theta0 and diff"),
    (_fwd(theta0=torch.zeros(6, dtype=torch.int32), diff=torch.zeros(6)), TypeError, "theta0 must be float32"),
    (_fwd(theta0=torch.zeros(6), diff=torch.zeros(6, dtype=torch.float16)), TypeError, "diff must be Float"),
    (_fwd(theta0=torch.zeros(6), diff=torch.zeros(6), out_dtype=torch.int64), TypeError, "out_dtype must be"),
    (_fwd(theta0=torch.zeros(7), diff=torch.zeros(6)), ValueError, r"theta0 has shape \[7\]"),
    (_fwd(theta0=torch.zeros(6), diff=torch.zeros(2, 3)), ValueError, r"diff has shape \[2, 3\]"),
    (_fwd(theta0=torch.zeros(12)[::2], diff=torch.zeros(6)), ValueError, "theta0 must be contiguous"),
    (_fwd(offset=-1), ValueError, "offset must satisfy"),
    (_fwd(offset=2**63 - 3), ValueError, "offset must satisfy"),
    (_fwd(l=0.5), ValueError, "gate constants"),
    (_fwd(beta=float("nan")), ValueError, "gate constants"),
    (_fwd(seed=-1), TypeError, "incompatible function arguments"),  # the Python wrapper normalises seeds
    (_fwd(), ValueError, "log_alpha must be a CUDA tensor, got a cpu tensor"),
    (_fwd(theta0=torch.zeros(6, dtype=torch.bfloat16), diff=torch.zeros(6)), ValueError, "must be a CUDA tensor"),
    (_bwd(grad_diff=torch.zeros(6)), ValueError, "both grad_diff and grad_log_alpha"),
    (_bwd(g=torch.ones(6, dtype=torch.int64)), TypeError, "g must be float32"),
    (_bwd(diff=torch.zeros(6, dtype=torch.bfloat16)), TypeError, "diff must be Float"),
    (_bwd(grad_diff=torch.zeros(6), grad_log_alpha=torch.zeros(6, dtype=torch.float64)), TypeError,
     "grad_log_alpha must be Float"),
    (_bwd(g=torch.ones(5)), ValueError, r"g has shape \[5\]"),
    (_bwd(grad_diff=torch.zeros(3, 2), grad_log_alpha=torch.zeros(6)), ValueError, "grad_diff has shape"),
    (_bwd(g=torch.ones(12)[::2]), ValueError, "g must be contiguous"),
    (_bwd(grad_diff=torch.zeros(6), grad_log_alpha=torch.zeros(12)[::2]), ValueError,
     "grad_log_alpha must be contiguous"),
    (_bwd(l0_lambda=float("inf")), ValueError, "l0_lambda must be finite"),
    (_bwd(r=1.0), ValueError, "gate constants"),
    (_bwd(offset=-5), ValueError, "offset must satisfy"),
    (_bwd(), ValueError, "log_alpha must be a CUDA tensor"),
    (_bwd(grad_diff=torch.zeros(6), grad_log_alpha=torch.zeros(6)), ValueError, "must be a CUDA tensor"),
]


@needs_ext
@pytest.mark.parametrize("call,error,match", BAD_CALLS)
def test_kernel_entry_points_reject_bad_input(ext, call, error, match):
    name, kwargs = call
    with pytest.raises(error, match=match):
        getattr(ext, name)(**kwargs)


@needs_ext
def test_test_hooks_reject_bad_input(ext):
    with pytest.raises(TypeError, match="offsets must be Long"):
        ext.philox_uniform(0, torch.arange(3, dtype=torch.int32))
    with pytest.raises(ValueError, match="non-negative"):
        ext.philox_uniform(0, torch.tensor([3, -1]))
    with pytest.raises(TypeError, match="log_alpha must be Float"):
        ext.hard_concrete_cpu(torch.zeros(3, dtype=torch.float64), 0, 0, True, L, R, BETA)
    with pytest.raises(ValueError, match="offset must satisfy"):
        ext.hard_concrete_cpu(torch.zeros(3), 0, -1, True, L, R, BETA)


@needs_ext
def test_backend_wrapper_normalises_seeds_and_reaches_the_device_check(monkeypatch):
    # Seeds of the reference's whole range pass the wrapper; CPU tensors stop at the device check.
    for seed in (-1, 2**64 - 1):
        with pytest.raises(ValueError, match="must be a CUDA tensor"):
            cuda_backend.gate_forward(torch.zeros(4), seed, 0, True, L, R, BETA)
    with pytest.raises(ValueError, match="seed must lie in"):
        cuda_backend.gate_forward(torch.zeros(4), 2**64, 0, True, L, R, BETA)
    monkeypatch.setenv("DPKERNELS_BACKEND", "cuda")
    assert dpkernels.info()["backends"]["cuda"] == {"available": True, "reason": None}


# --------------------------------------------------------------------------------------------
# Loading: lazily, and a missing or stale build is reported, not raised, until asked for
# --------------------------------------------------------------------------------------------


def test_importing_dpkernels_does_not_load_the_extension():
    code = "import sys, dpkernels; assert 'dpkernels._C' not in sys.modules, 'loaded at import'"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("module,match", [(None, "not built"), (types.ModuleType("dpkernels._C"), "lacks the ops")])
def test_missing_or_stale_extension_is_reported_and_raises_only_when_asked_for(monkeypatch, module, match):
    monkeypatch.setitem(sys.modules, "dpkernels._C", module)  # None: importing it raises ImportError
    monkeypatch.setattr(cuda_backend, "_ext", None)
    monkeypatch.setattr(backends, "_loaded", {})
    monkeypatch.setattr(backends, "_load_errors", {})
    report = dpkernels.info()["backends"]["cuda"]
    assert report["available"] is False and match in report["reason"]
    with pytest.raises(dpkernels.BackendUnavailable, match=match):
        backends.load("cuda")
    # auto never picks it and still runs (CPU tensors: the reference)
    assert dpkernels.sample_gates(torch.zeros(3), 1).shape == (3,)


# --------------------------------------------------------------------------------------------
# GPU: the kernels against tl.rand, Triton and the float64 reference
# --------------------------------------------------------------------------------------------


class TestOnGPU:
    pytestmark = needs_gpu

    @pytest.mark.parametrize("seed", _seeds())
    def test_philox_is_tl_rand_bit_for_bit(self, ext, seed):
        offsets = torch.cat([_offsets("cpu"), torch.tensor(U_ZERO_OFFSETS)]).cuda()
        u = ext.philox_uniform(seed, offsets).view(torch.int32)
        assert torch.equal(u, ref.philox_uniform(seed, offsets).view(torch.int32))
        assert torch.equal(u, _triton_rand(seed, offsets)[0].view(torch.int32))

    @pytest.mark.parametrize("cfg", GATE_CONFIGS)
    @pytest.mark.parametrize("training", [True, False])
    def test_gates_and_gradients_match_triton_and_the_reference(self, cfg, training):
        gen = torch.Generator().manual_seed(21)
        la = _log_alpha((4231,), "cuda", gen)
        g, w = torch.randn(4231, generator=gen).cuda(), torch.randn(4231, generator=gen).cuda()
        args = (2**63 + 11, 2**32 - 1000, training, cfg["l"], cfg["r"], cfg["beta"])
        far = ~_near_boundary(_sbar64(la, *args))
        z64, z32 = ref.gate_forward(la.double(), *args), ref.gate_forward(la, *args)
        (ow, ola), (tw, tla) = (ref.gate_backward(g.double(), w.double(), la.double(), *args, 0.3),
                                ref.gate_backward(g, w, la, *args, 0.3))
        atol = 8 * torch.finfo(torch.float32).eps * ((g * w).abs().max().item() + 0.3)
        zs = {}
        for name, mod in (("cuda", cuda_backend), ("triton", backends.load("triton"))):
            zs[name] = mod.gate_forward(la, *args)
            assert_close_by_rule(zs[name], z32, z64, GATE_ATOL, f"{name} z")
            gw, gla = mod.gate_backward(g, w, la, *args, 0.3)
            assert_close_by_rule(gw, tw, ow, atol, f"{name} grad_diff")
            assert_close_by_rule(gla[far], tla[far], ola[far], atol, f"{name} grad_log_alpha")
        for edge in (0.0, 1.0):  # the same gates are closed / fully open on both backends
            assert torch.equal((zs["cuda"] == edge)[far], (zs["triton"] == edge)[far])

    def test_vector_and_scalar_load_paths_agree_bit_for_bit(self, ext):
        n = 4 * 1000 + 3  # a partial last pack
        gen = torch.Generator().manual_seed(8)
        big = {"la": _log_alpha((n + 1,), "cpu", gen), "w": torch.randn(n + 1, generator=gen),
               "theta0": torch.randn(n + 1, generator=gen).bfloat16(), "g": torch.randn(n + 1, generator=gen).half()}
        big = {k: v.cuda() for k, v in big.items()}
        # Views one element in: not 16-byte aligned, so the scalar path; fresh copies: the vector path.
        scalar = {k: v[1:] for k, v in big.items()}
        vector = {k: v[1:].clone() for k, v in big.items()}
        args = (12345, 2**32 - 2000, True, L, R, BETA)
        outs = []
        for t in (scalar, vector):
            gd_buf, gla_buf = torch.ones(n + 1, device="cuda")[1:], torch.ones(n + 1, device="cuda")[1:]
            if t is vector:
                gd_buf, gla_buf = gd_buf.clone(), gla_buf.clone()
            outs.append([
                ext.gate_forward(t["la"], *args),
                ext.gate_forward(t["la"], *args, theta0=t["theta0"], diff=t["w"], out_dtype=torch.float32),
                ext.gate_forward(t["la"], *args, theta0=t["theta0"], diff=t["w"], out_dtype=torch.bfloat16),
                *ext.gate_backward(t["g"], t["w"], t["la"], *args, 0.1),
                *ext.gate_backward(t["g"], t["w"], t["la"], *args, 0.1, gd_buf, gla_buf),
            ])
        for a, b in zip(*outs, strict=True):
            assert torch.equal(a, b)
        z64 = ref.gate_forward(vector["la"].double(), *args)
        assert_close_by_rule(outs[0][0], ref.gate_forward(vector["la"], *args), z64, GATE_ATOL, "z")

    def test_every_element_of_a_large_tensor_is_written(self):
        sms = torch.cuda.get_device_properties(0).multi_processor_count
        n = sms * 8 * 256 * 4 * 2 + 4231  # beyond one pass of the capped grid: the grid-stride loop
        la = torch.randn(n, device="cuda") * 3
        args = (77, 2**32 - n // 2, True, L, R, BETA)  # counters cross the high-word boundary
        z = cuda_backend.gate_forward(la, *args)
        assert_close_by_rule(z, ref.gate_forward(la, *args), ref.gate_forward(la.double(), *args), GATE_ATOL, "z")

    def test_bad_inputs_raise_and_leave_the_gpu_usable(self, ext):
        la = torch.zeros(6, device="cuda")
        args = (1, 0, True, L, R, BETA)
        with pytest.raises(ValueError, match="theta0 must be a CUDA tensor"):
            ext.gate_forward(la, *args, theta0=torch.zeros(6), diff=torch.zeros(6, device="cuda"))
        with pytest.raises(ValueError, match="g must be a CUDA tensor"):
            ext.gate_backward(torch.ones(6), torch.zeros(6, device="cuda"), la, *args)
        with pytest.raises(TypeError, match="log_alpha must be Float"):
            ext.gate_forward(la.double(), *args)
        with pytest.raises(ValueError, match="log_alpha must be contiguous"):
            ext.gate_forward(torch.zeros(6, 2, device="cuda").t(), *args)
        with pytest.raises(ValueError, match="g has shape"):
            ext.gate_backward(torch.ones(5, device="cuda"), torch.zeros(6, device="cuda"), la, *args)
        with pytest.raises(ValueError, match="non-negative"):
            ext.philox_uniform(0, torch.tensor([4, -1], device="cuda"))
        if torch.cuda.device_count() > 1:
            with pytest.raises(ValueError, match="diff is on cuda:1, log_alpha on cuda:0"):
                ext.gate_forward(la, *args, theta0=torch.zeros(6, device="cuda"), diff=torch.zeros(6, device="cuda:1"))
        # The wrapper (the backend the dispatcher calls) makes strided inputs contiguous, as Triton's does.
        strided = torch.randn(6, 2, device="cuda").t()
        assert torch.equal(cuda_backend.gate_forward(strided, *args), ext.gate_forward(strided.contiguous(), *args))
        z = ext.gate_forward(la, *args)
        torch.cuda.synchronize()  # no sticky CUDA error was left behind
        assert z.shape == (6,) and ((z >= 0) & (z <= 1)).all()

    def test_empty_tensors(self, ext):
        empty = torch.zeros(0, 3, device="cuda")
        args = (1, 0, True, L, R, BETA)
        assert ext.gate_forward(empty, *args).shape == (0, 3)
        assert ext.gate_forward(empty, *args, theta0=empty.half(), diff=empty).dtype == torch.float16
        gw, gla = ext.gate_backward(empty, empty, empty, *args, 0.5)
        assert gw.shape == gla.shape == (0, 3)
