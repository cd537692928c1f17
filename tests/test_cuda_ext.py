"""The CUDA extension dpkernels._C.

On the CPU (run by CI, skipped when the extension is not built): the kernels' own Philox, gate
math and scatter rounding (csrc/philox.cuh, csrc/gates.cuh, csrc/scatter.cuh, compiled for the
host) against the reference, and the input validation of the kernel entry points, which runs
before any GPU is touched. On a GPU (`cuda` marker): the kernels against Triton and the reference
(gates: float64 by the tolerance rule; scatter: bit for bit; sddmm: float64 by the rule), both
load paths, bad inputs. The backend-parametrized tests (test_gates, test_diff_linear,
test_scatter's 1000 switches, test_fixed_mask, ...) also run the cuda backend. The kernels
themselves also run on the CPU, under an emulation of the CUDA execution model with sanitizers:
test_cuda_kernels_emulated.py.
"""

import subprocess
import sys
import types

import pytest
import torch
from conftest import CUDA_EXT_MISSING, HAS_CUDA, assert_close_by_rule, same_bits
from test_gates import GATE_ATOL, GATE_CONFIGS, U_ZERO_OFFSETS, U_ZERO_SEED, _log_alpha, _near_boundary, _sbar64
from test_philox import _KAT, _offsets, _seeds, _triton_rand
from test_scatter import _layout

import dpkernels
from dpkernels import backends, sparse
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


def _merge_inputs(dtype, gen):
    """Bases and fp32 deltas that hit every rounding case of the merge: random magnitudes, exact
    ties of the target dtype (odd and even last bit), subnormals, overflow to inf, +-inf, zeros."""
    n = 4096
    span = 12 if dtype == torch.float16 else 20  # bases up to 2**span (fp16 overflows at 65504)
    old = (torch.randn(n, generator=gen, dtype=torch.float64)
           * torch.exp2(torch.randint(-span, span, (n,), generator=gen).double())).to(dtype)
    values = (torch.randn(n, generator=gen) * torch.exp2(torch.randint(-40, 4, (n,), generator=gen).float()))
    if dtype in (torch.bfloat16, torch.float16):
        # Half an ulp of the base exactly: the fp32 sum is a tie that round-to-nearest-even decides.
        ulp = (old.float().abs().view(torch.int32) & 0x7F800000).view(torch.float32) * torch.finfo(dtype).eps
        values[: n // 4] = (ulp / 2 * torch.where(torch.rand(n, generator=gen) < 0.5, 1.0, -1.0))[: n // 4]
    info = torch.finfo(dtype)
    old[-8:] = torch.tensor([info.max, -info.max, info.tiny, info.smallest_normal / 4, 0.0, -0.0, float("inf"),
                             float("-inf")], dtype=torch.float64).to(dtype)
    values[-8:] = torch.tensor([info.max, -info.max, -info.tiny / 2, info.smallest_normal / 8, -0.0, 0.0, 1.0,
                                -1.0]).clamp(-3e38, 3e38)
    return old, values


@needs_ext
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64], ids=str)
def test_host_scatter_merge_rounds_as_the_reference_bit_for_bit(ext, dtype):
    old, values = _merge_inputs(dtype, torch.Generator().manual_seed(3))
    acc = ref._merge_dtype(dtype)
    expected = (old.to(acc) + values.to(acc)).to(dtype)
    merged = ext.scatter_merge_cpu(old, values)
    assert merged.dtype == dtype
    assert same_bits(merged, expected)
    assert int((merged != old).sum()) > 100 and int((merged == old).sum()) > 0  # both outcomes happen


@needs_ext
def test_host_scatter_merge_nan_gives_the_canonical_bf16_nan(ext):
    old = torch.tensor([1.0, float("nan"), float("inf"), 3.0], dtype=torch.bfloat16)
    values = torch.tensor([float("nan"), 1.0, float("-inf"), -float("nan")])
    merged = ext.scatter_merge_cpu(old, values).view(torch.int16)
    assert torch.equal(merged, torch.full((4,), 0x7FC0, dtype=torch.int16))  # torch's CPU cast and the Triton kernel
    assert ext.scatter_merge_cpu(old.half(), values).isnan().all()  # fp16 NaN bits follow __float2half_rn


# --------------------------------------------------------------------------------------------
# The gate kernels' sm_90 SASS (CPU: read from the build): at the memory floor of an H200
# --------------------------------------------------------------------------------------------

# Hot loop (the grid-stride loop over whole aligned packs of 4) instructions per element, at most:
# a pass moving 12 B per element is memory-bound on an H200 below ~80 (DESIGN.md section 3), the
# backward's 18 B below ~125. Mangled-name fragments: GateMode 2 is kTrainBetaOne, 1 kTrain (any
# beta), 0 kEval; the backward's flags are kHasL0, kAccumulate.
_GATE_LOOP_BUDGETS = {
    "gate_forward_kernelI13__nv_bfloat16S2_Lb1ELNS_8GateModeE2EE": 80,  # train apply bf16, beta = 1
    "gate_forward_kernelI13__nv_bfloat16S2_Lb1ELNS_8GateModeE1EE": 80,  # train apply bf16, beta = 2/3
    "gate_forward_kernelI13__nv_bfloat16S2_Lb1ELNS_8GateModeE0EE": 20,  # eval apply bf16
    "gate_forward_kernelIffLb0ELNS_8GateModeE2EE": 80,  # sample_gates
    "gate_backward_kernelI13__nv_bfloat16LNS_8GateModeE2ELb1ELb0EE": 110,  # train, L0 term
    "gate_backward_kernelI13__nv_bfloat16LNS_8GateModeE1ELb1ELb1EE": 110,  # beta = 2/3, L0, accumulating
    "gate_backward_kernelI13__nv_bfloat16LNS_8GateModeE0ELb1ELb0EE": 40,  # eval, L0 term
}


@needs_ext
def test_gate_kernels_hot_loops_hold_only_vector_accesses_within_budget(ext):
    from benchmarks.sass import access_bytes, disassemble

    functions = disassemble(ext.__file__, arch="sm_90")
    if not functions:
        pytest.skip("the extension has no sm_90 build")
    for fragment, budget in _GATE_LOOP_BUDGETS.items():
        (fn,) = [f for name, f in functions.items() if fragment in name]
        body = fn.loop_body("LDG.E.128")
        assert body, f"{fragment}: no loop with 16-byte loads"
        assert len(body) / 4 <= budget, f"{fragment}: {len(body) / 4} instructions per element > {budget}"
        # Only pack-wide accesses (16 B of fp32, 8 B of bf16) in the hot loop: no scalar fallback in it.
        assert {access_bytes(op) for op in fn.memory_ops(body)} <= {8, 16}, fn.memory_ops(body)
        assert sum(i.base == "BRA" for i in body) == 1  # the back edge only: no branch inside


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


def _scatter_args(with_values=True, **over):
    # A valid layout but for the device: two targets, three entries (two in the first).
    args = dict(targets=[torch.zeros(5), torch.zeros(3)], table=torch.zeros(2, dtype=torch.int64),
                ids=torch.tensor([0, 0, 1], dtype=torch.int32), index=torch.tensor([1, 4, 2], dtype=torch.int32),
                values=torch.ones(3), starts=[0, 2, 3], saved=torch.empty(3))
    if not with_values:
        del args["values"]
    args.update(over)
    return args


def _apply(**over):
    return ("scatter_apply", _scatter_args(**over))


def _restore(**over):
    return ("scatter_restore", _scatter_args(with_values=False, **over))


def _sddmm(**over):
    args = dict(grad_y=torch.ones(5, 4), x=torch.ones(5, 3), index=torch.tensor([0, 5, 11]), in_features=3)
    args.update(over)
    return ("sddmm", args)


_HUGE = torch.zeros(1, 1).expand(1, 2**40)  # a (1, 2**40) view of one element: shapes without memory

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
    (_apply(saved=torch.empty(3, dtype=torch.int32)), TypeError, "saved must be float32, float64, float16 or bf"),
    (_apply(table=torch.zeros(2, dtype=torch.int32)), TypeError, "table must be Long"),
    (_apply(ids=torch.tensor([0, 0, 1])), TypeError, "ids must be Int"),
    (_apply(index=torch.tensor([1.0, 4.0, 2.0])), TypeError, "index must be int32 or int64"),
    (_apply(values=torch.ones(3, dtype=torch.float64)), TypeError, "values must be Float"),
    (_apply(targets=[torch.zeros(5), torch.zeros(3, dtype=torch.float64)]), TypeError,
     r"targets\[1\] is Double, saved is Float"),
    (_apply(saved=torch.empty(3, 1)), ValueError, "saved must be 1-D"),
    (_apply(ids=torch.tensor([0, 0], dtype=torch.int32)), ValueError, r"ids has shape \[2\], saved has \[3\]"),
    (_apply(index=torch.tensor([1, 4, 2, 0])), ValueError, r"index has shape \[4\]"),
    (_apply(values=torch.ones(2)), ValueError, r"values has shape \[2\]"),
    (_apply(table=torch.zeros(3, dtype=torch.int64)), ValueError, "table has 3 pointers for 2 targets"),
    (_apply(starts=[]), ValueError, "starts must hold 1 to len"),
    (_apply(starts=[0, 1, 2, 3]), ValueError, "starts must hold 1 to len"),
    (_apply(starts=[0, 2]), ValueError, "starts must run from 0 to the 3 entries"),
    (_apply(starts=[1, 2, 3]), ValueError, "starts must run from 0"),
    (_apply(starts=[0, 4, 3], targets=[torch.zeros(5), torch.zeros(5)]), ValueError, "starts must be non-decreas"),
    (_apply(starts=[0, 0, 3], targets=[torch.zeros(5), torch.zeros(2)]), ValueError,
     r"targets\[1\] has 2 elements but 3 entries"),
    (_apply(saved=torch.empty(6)[::2]), ValueError, "saved must be contiguous"),
    (_apply(index=torch.tensor([1, 0, 4, 0, 2, 0])[::2]), ValueError, "index must be contiguous"),
    (_apply(values=torch.ones(6)[::2]), ValueError, "values must be contiguous"),
    (_apply(targets=[torch.zeros(5, 2).t(), torch.zeros(3)]), ValueError, r"targets\[0\] must be contiguous"),
    (_apply(), ValueError, "saved must be a CUDA tensor, got a cpu tensor"),
    (_apply(targets=[], table=torch.zeros(0, dtype=torch.int64), ids=torch.zeros(0, dtype=torch.int32),
            index=torch.zeros(0, dtype=torch.int32), values=torch.zeros(0), starts=[0], saved=torch.empty(0)),
     ValueError, "saved must be a CUDA tensor"),  # an empty diff is checked too
    (_restore(saved=torch.empty(3, dtype=torch.int64)), TypeError, "saved must be float32"),
    (_restore(ids=torch.tensor([0, 1], dtype=torch.int32)), ValueError, r"ids has shape \[2\]"),
    (_restore(starts=[0, 1, 3], targets=[torch.zeros(5), torch.zeros(1)]), ValueError,
     r"targets\[1\] has 1 elements but 2 entries"),
    (_restore(table=torch.zeros(2, 1, dtype=torch.int64)), ValueError, "table must be 1-D"),
    (_restore(), ValueError, "saved must be a CUDA tensor"),
    (_sddmm(grad_y=torch.ones(5, 4, dtype=torch.int64)), TypeError, "grad_y must be float32"),
    (_sddmm(x=torch.ones(5, 3, dtype=torch.float16)), TypeError, "x must have grad_y's dtype Float, got Half"),
    (_sddmm(index=torch.tensor([0, 5, 11], dtype=torch.int32)), TypeError, "index must be Long"),
    (_sddmm(grad_y=torch.ones(20)), ValueError, "grad_y must be 2-D"),
    (_sddmm(x=torch.ones(5, 3, 1)), ValueError, "x must be 2-D"),
    (_sddmm(index=torch.tensor([[0, 5, 11]])), ValueError, "index must be 1-D"),
    (_sddmm(x=torch.ones(4, 3)), ValueError, "x has 4 tokens, grad_y has 5"),
    (_sddmm(in_features=4), ValueError, "in_features is 4 but x has 3 columns"),
    (_sddmm(index=torch.tensor([0, 1, 5, 2, 11, 3])[::2]), ValueError, "index must be contiguous"),
    (_sddmm(grad_y=_HUGE, x=_HUGE, in_features=2**40, index=torch.tensor([0])), ValueError, "overflows int64"),
    (_sddmm(), ValueError, "grad_y must be a CUDA tensor, got a cpu tensor"),
    (_sddmm(index=torch.zeros(0, dtype=torch.int64)), ValueError, "grad_y must be a CUDA tensor"),
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
    with pytest.raises(TypeError, match="old must be float32"):
        ext.scatter_merge_cpu(torch.zeros(3, dtype=torch.int32), torch.zeros(3))
    with pytest.raises(TypeError, match="values must be Float"):
        ext.scatter_merge_cpu(torch.zeros(3), torch.zeros(3, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"values has shape \[2\], old has \[3\]"):
        ext.scatter_merge_cpu(torch.zeros(3), torch.zeros(2))


@needs_ext
def test_backend_wrapper_normalises_seeds_and_reaches_the_device_check(monkeypatch):
    # Seeds of the reference's whole range pass the wrapper; CPU tensors stop at the device check.
    for seed in (-1, 2**64 - 1):
        with pytest.raises(ValueError, match="must be a CUDA tensor"):
            cuda_backend.gate_forward(torch.zeros(4), seed, 0, True, L, R, BETA)
    with pytest.raises(ValueError, match="seed must lie in"):
        cuda_backend.gate_forward(torch.zeros(4), 2**64, 0, True, L, R, BETA)
    monkeypatch.setenv("DPKERNELS_BACKEND", "cuda")
    assert dpkernels.info()["backends"]["cuda"] == {"available": True, "reason": None,
                                                    "runs_on": ["cuda"] if torch.cuda.is_available() else []}


@needs_ext
def test_sparse_wrappers_reach_the_device_check():
    # Tuples for targets/starts, mixed float dtypes (promoted) and int32 indices (widened) pass the
    # wrappers' normalisation and every dtype/shape check; CPU tensors then stop at the device check.
    _, args = _apply()
    args = dict(args, targets=tuple(args["targets"]), starts=tuple(args["starts"]))
    with pytest.raises(ValueError, match="saved must be a CUDA tensor"):
        cuda_backend.scatter_apply(**args)
    del args["values"]
    with pytest.raises(ValueError, match="saved must be a CUDA tensor"):
        cuda_backend.scatter_restore(**args)
    with pytest.raises(ValueError, match="grad_y must be a CUDA tensor"):
        cuda_backend.sddmm(torch.ones(5, 4, dtype=torch.bfloat16), torch.ones(5, 3, dtype=torch.float16),
                           torch.tensor([0, 5], dtype=torch.int32), 3)


@needs_ext
@pytest.mark.parametrize("op,dtypes", [("scatter_apply", sparse._SCATTER_DTYPES),
                                       ("scatter_restore", sparse._SCATTER_DTYPES), ("sddmm", None)])
def test_the_cuda_backend_offers_the_sparse_primitives(monkeypatch, op, dtypes):
    # The dispatcher decides from the device type and dtype alone, so this runs without a GPU.
    monkeypatch.setenv("DPKERNELS_BACKEND", "cuda")
    for dtype in dtypes or (torch.float32,):
        module = backends.select(op, torch.device("cuda"), dtype, dtypes=dtypes, primitive=op)
        assert module is cuda_backend and callable(getattr(module, op))
    assert dpkernels.info()["last_used"][op] == "cuda"


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


# --------------------------------------------------------------------------------------------
# GPU: the sparse kernels against the reference (scatter bit for bit, sddmm by the rule)
# --------------------------------------------------------------------------------------------

_SCATTER_SIZES = [1, 9, 341, 4231, 2, 1030]


def _gpu_layout(dtype, index_dtype, seed=0, sizes=_SCATTER_SIZES):
    """test_scatter's random layout on the GPU, with an empty tensor first in the table (no entries)
    and one more after the last entry's tensor (past len(starts) - 1: none either)."""
    targets, _, ids, index, values, starts = _layout(sizes, 0.3, dtype, "cuda", torch.Generator().manual_seed(seed),
                                                     index_dtype)
    targets = [torch.empty(0, dtype=dtype, device="cuda"), *targets, torch.randn(7, device="cuda").to(dtype)]
    table = torch.tensor([t.data_ptr() for t in targets], dtype=torch.int64, device="cuda")
    return targets, table, ids + 1, index, values, [0, *starts]


class TestOnGPUSparse:  # "TestOnGPU" in the name: gpu_check.sh runs it under compute-sanitizer too
    pytestmark = needs_gpu

    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64], ids=str)
    @pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=str)
    def test_scatter_matches_the_reference_bit_for_bit(self, dtype, index_dtype):
        targets, table, ids, index, values, starts = _gpu_layout(dtype, index_dtype)
        originals = [t.clone() for t in targets]
        expected = [t.clone() for t in targets]
        expected_saved = torch.empty(ids.numel(), dtype=dtype, device="cuda")
        ref.scatter_apply(expected, None, ids, index, values, starts, expected_saved)
        saved = torch.full((ids.numel(),), float("nan"), dtype=dtype, device="cuda")  # poisoned: must be written
        assert cuda_backend.scatter_apply(targets, table, ids, index, values, starts, saved) is saved
        assert same_bits(saved, expected_saved)
        for t, e in zip(targets, expected, strict=True):
            assert same_bits(t, e)
        assert sum(int((t != o).sum()) for t, o in zip(targets, originals, strict=True)) > 0
        cuda_backend.scatter_restore(targets, table, ids, index, starts, saved)
        for t, o in zip(targets, originals, strict=True):
            assert same_bits(t, o)

    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64], ids=str)
    def test_scatter_vector_and_scalar_paths_agree(self, dtype):
        # Streams one element into a larger buffer: not pack-aligned, so the scalar path.
        targets, _, ids, index, values, starts = _gpu_layout(dtype, torch.int32, seed=4)
        results = []
        for shift in (0, 1):
            work = [t.clone() for t in targets]
            tab = torch.tensor([t.data_ptr() for t in work], dtype=torch.int64, device="cuda")
            streams = []
            for s in (ids, index, values, torch.empty(ids.numel(), dtype=dtype, device="cuda")):
                buf = torch.empty(s.numel() + shift, dtype=s.dtype, device="cuda")
                buf[shift:] = s
                streams.append(buf[shift:])
            i, x, v, saved = streams
            cuda_backend.scatter_apply(work, tab, i, x, v, starts, saved)
            results.append((work, saved.clone()))
            cuda_backend.scatter_restore(work, tab, i, x, starts, saved)
            for t, o in zip(work, targets, strict=True):
                assert same_bits(t, o)
        (a, sa), (b, sb) = results
        assert same_bits(sa, sb)
        for x, y in zip(a, b, strict=True):
            assert same_bits(x, y)

    def test_scatter_covers_more_entries_than_one_grid_pass(self):
        sms = torch.cuda.get_device_properties(0).multi_processor_count
        n = sms * 8 * 256 * 4 * 2 + 3  # beyond the capped grid: the grid-stride loop, and a partial pack
        base = torch.randn(n + 10, device="cuda").bfloat16()
        original = base.clone()
        index = torch.randperm(n + 10, device="cuda")[:n].sort().values
        values = torch.randn(n, device="cuda")
        ids = torch.zeros(n, dtype=torch.int32, device="cuda")
        table = torch.tensor([base.data_ptr()], dtype=torch.int64, device="cuda")
        saved = torch.empty(n, dtype=torch.bfloat16, device="cuda")
        expected = base.clone()
        ref.scatter_apply([expected], None, ids, index, values, [0, n], torch.empty_like(saved))
        cuda_backend.scatter_apply([base], table, ids, index, values, [0, n], saved)
        assert same_bits(base, expected)
        assert same_bits(saved, original[index])
        cuda_backend.scatter_restore([base], table, ids, index, [0, n], saved)
        assert same_bits(base, original)

    def test_scatter_skips_ids_outside_the_table_and_bad_input_raises(self, ext):
        targets, table, ids, index, values, starts = _gpu_layout(torch.float32, torch.int64, seed=2)
        before = [t.clone() for t in targets]
        bad_ids = ids.clone()
        bad_ids[0], bad_ids[-1] = len(targets), -1  # outside [0, len(table)): never dereferenced
        saved = torch.zeros(ids.numel(), device="cuda")
        ext.scatter_apply(targets, table, bad_ids, index, values, starts, saved)
        ext.scatter_restore(targets, table, bad_ids, index, starts, saved)
        torch.cuda.synchronize()
        for t, o in zip(targets, before, strict=True):
            assert same_bits(t, o)
        args = dict(targets=targets, table=table, ids=ids, index=index, values=values, starts=starts, saved=saved)
        for over, error, match in [
            (dict(ids=ids.cpu()), ValueError, "ids must be a CUDA tensor"),
            (dict(table=table.cpu()), ValueError, "table must be a CUDA tensor"),
            (dict(targets=[*targets[:-1], targets[-1].cpu()]), ValueError, r"targets\[7\] is on cpu"),
            (dict(saved=saved.double()), TypeError, r"targets\[0\] is Float, saved is Double"),
            (dict(values=values[:-1]), ValueError, "values has shape"),
            (dict(index=index.view(1, -1)), ValueError, "index must be 1-D"),
            (dict(saved=torch.zeros(2 * ids.numel(), device="cuda")[::2]), ValueError, "saved must be contiguous"),
        ]:
            with pytest.raises(error, match=match):
                ext.scatter_apply(**{**args, **over})
        if torch.cuda.device_count() > 1:
            with pytest.raises(ValueError, match="index is on cuda:1, saved on cuda:0"):
                ext.scatter_apply(**{**args, "index": index.to("cuda:1")})
        torch.cuda.synchronize()  # no sticky CUDA error was left behind

    @pytest.mark.parametrize("m,k,n", [(1, 1, 1), (9, 341, 9), (341, 9, 341), (0, 9, 9), (130, 64, 48), (4231, 24, 40),
                                       (256, 40, 24)])
    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
    def test_sddmm_matches_the_float64_reference(self, m, k, n, dtype):
        gen = torch.Generator().manual_seed(m + k + n)
        gy = torch.randn(m, n, generator=gen).to("cuda", dtype)
        x = torch.randn(m, k, generator=gen).to("cuda", dtype)
        index = torch.randperm(n * k, generator=gen)[: max(1, n * k // 5)].sort().values.cuda()
        oracle = ref.sddmm(gy.double(), x.double(), index, k)
        same = ref.sddmm(gy, x, index, k)
        scale = (gy.double().abs().t() @ x.double().abs()).max().item() if m else 0.0
        eps = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
        perm = torch.randperm(index.numel(), generator=gen).cuda()
        outs = {"row-major": cuda_backend.sddmm(gy, x, index, k),  # transposed copies (aligned when M is)
                # used in place: padded aligned rows (16-byte packs, then a tail when M is odd) ...
                "column-major": cuda_backend.sddmm(_column_major(gy), _column_major(x), index, k),
                # ... and rows one element off alignment (element by element)
                "unaligned": cuda_backend.sddmm(_column_major(gy, 1), _column_major(x, 1), index, k),
                "unsorted": cuda_backend.sddmm(gy, x, index[perm], k)[perm.argsort()]}
        for name, out in outs.items():
            assert out.dtype == same.dtype and out.shape == index.shape, name
            assert_close_by_rule(out, same, oracle, 4 * eps * scale, f"sddmm {dtype} {name}")

    def test_sddmm_grid_stride_empty_and_out_of_range(self, ext):
        sms = torch.cuda.get_device_properties(0).multi_processor_count
        n, k = 1000, sms * 8 * 8 // 1000 + 7  # more entries than the capped grid (sms * 8 blocks of 8 warps)
        gy, x = torch.randn(33, n, device="cuda"), torch.randn(33, k, device="cuda")
        index = torch.arange(n * k, device="cuda")
        assert_close_by_rule(ext.sddmm(gy, x, index, k), ref.sddmm(gy, x, index, k),
                             ref.sddmm(gy.double(), x.double(), index, k), 1e-5, "sddmm")
        assert ext.sddmm(gy, x, index[:0], k).shape == (0,)
        assert torch.equal(ext.sddmm(gy[:0], x[:0], index[:5], k), torch.zeros(5, device="cuda"))
        # An index outside [0, N K) (which ops.check_mask_index rejects first) reads nothing: NaN.
        out = ext.sddmm(gy, x, torch.tensor([-1, 3, n * k], device="cuda"), k)
        torch.cuda.synchronize()
        assert out[0].isnan() and out[2].isnan() and torch.isfinite(out[1])
        with pytest.raises(ValueError, match="index must be a CUDA tensor"):
            ext.sddmm(gy, x, index.cpu(), k)
        with pytest.raises(ValueError, match="x must be a CUDA tensor"):
            ext.sddmm(gy, x.cpu(), index, k)
        with pytest.raises(TypeError, match="x must have grad_y's dtype"):
            ext.sddmm(gy, x.half(), index, k)
        with pytest.raises(ValueError, match="index must be contiguous"):
            ext.sddmm(gy, x, index[::2], k)
        with pytest.raises(ValueError, match="x has 32 tokens"):
            ext.sddmm(gy, x[1:], index, k)

    def test_fixed_mask_linear_runs_its_weight_gradient_on_the_cuda_backend(self, monkeypatch):
        monkeypatch.setenv("DPKERNELS_BACKEND", "cuda")
        gen = torch.Generator().manual_seed(5)
        x = torch.randn(7, 13, generator=gen).cuda().requires_grad_()
        weight = torch.randn(11, 13, generator=gen).cuda()
        index = torch.randperm(11 * 13, generator=gen)[:20].sort().values.cuda()
        values = torch.randn(20, generator=gen).cuda().requires_grad_()
        dpkernels.fixed_mask_linear(x, weight, None, index, values).square().sum().backward()
        assert dpkernels.info()["last_used"]["sddmm"] == "cuda"
        expected = (2 * (x @ ref.masked_weight(weight, index, values.detach()).t())).t() @ x
        torch.testing.assert_close(values.grad, expected.reshape(-1)[index].detach())


def _column_major(t, shift=0):
    """t (M, C) stored column by column, each column in a row of a NaN-filled buffer padded to a
    multiple of 16 elements (16-byte aligned for every dtype), the whole `shift` elements in."""
    m, c = t.shape
    ld = (m + 16) // 16 * 16
    buf = torch.full((c * ld + shift,), float("nan"), dtype=t.dtype, device=t.device)
    view = buf[shift:].view(c, ld)[:, :m]
    view.copy_(t.t())
    return view.t()
