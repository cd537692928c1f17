"""The CUDA kernels of csrc/, run on the CPU under an emulation of the CUDA execution model.

No GPU here has ever run csrc/gates.cu, scatter.cu or sddmm.cu. tests/cuda_emulator/ compiles them
with the host compiler, unchanged but for the launch syntax, under AddressSanitizer and
UndefinedBehaviorSanitizer, and runs every thread of each launch (the lanes of a warp in lockstep,
for the shuffles). So the kernels' own indexing, tails, grid-stride loops, vector/scalar load
paths, warp reduction and bounds checks are checked against the float64 reference here, and any
access outside an array or misaligned vector access fails the test (memcheck's job on the GPU).

Not covered (the GPU run owes these, tests/test_cuda_ext.py::TestOnGPU*): the bindings (CUDAGuard,
streams), the device-only code of csrc/ (the inline PTX: Philox's mul.wide.u32, and the
ex2/lg2/rcp.approx of the gate math, for which the host runs exp2f/log2f/1 / x), the GPU's
arithmetic (those approximations and nvcc's fma contraction: hence the reference's tolerance rule,
not bit equality, for gates and gradients), races between warps (they run one after another
here), the device's scheduling and memory model.
"""

import fcntl
import math
import os
import subprocess

import _cuda_emulator as emu
import pytest
import torch
from conftest import assert_close_by_rule, same_bits
from test_gates import GATE_ATOL, GATE_CONFIGS, U_ZERO_OFFSETS, _log_alpha, _near_boundary, _sbar64
from test_philox import _offsets
from test_scatter import _layout

from dpkernels import reference as ref

pytestmark = pytest.mark.skipif(emu.missing() is not None, reason=f"CUDA emulation: {emu.missing()}")

# kThreads = 256 per block: one block over 4231 elements (1058 packs of 4) runs the grid-stride
# loop five times; three blocks, twice. The GPU caps the grid at a few waves of its SMs.
GRIDS = [1, 3]
L, R, BETA = -1.5, 1.5, 1.0


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    # One build per pytest run: pytest-xdist workers (GPU run) share their base temp's parent and
    # take turns, so the first builds (~30 s of g++) and the others find its executable.
    base = tmp_path_factory.getbasetemp()
    shared = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "cuda_emulator"
    shared.mkdir(exist_ok=True)
    with open(shared / "build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        exe = emu.build(shared)
    return emu.Harness(exe, tmp_path_factory.mktemp("cuda_emulator_jobs"))


def _hex(x: float) -> str:
    return float(x).hex()  # exact through strtof, as the binding's static_cast<float>(double)


def _gate_scalars(seed, offset, training, l, r, beta, max_blocks):
    return dict(seed=seed, offset=offset, training=training, l=_hex(l), r=_hex(r), beta=_hex(beta),
                max_blocks=max_blocks)


def _place(name, tensor, misaligned):
    """(tensor, its byte offset past a 64-byte boundary). misaligned False: 0, every pack aligned
    (the vector path); True: every array one element off (the scalar path); an array's name: that
    array alone two elements off, aligned for its elements but not for its 4-element packs whatever
    their size (16 or 32 bytes), which must send the whole launch down the scalar path."""
    if misaligned is True:
        return tensor, tensor.element_size()
    return tensor, 2 * tensor.element_size() if misaligned == name else 0


def gate_forward(h, la, seed, offset, training, l, r, beta, theta0=None, diff=None, out_dtype=None, *,
                 misaligned=False, max_blocks=3):
    """launch_gate_forward with the binding's arguments; returns z or the effective weight."""
    out_dtype = torch.float32 if theta0 is None else out_dtype
    arrays = dict(la=la) | ({} if theta0 is None else dict(theta0=theta0, diff=diff))
    arrays["out"] = torch.full(la.shape, float("nan"), dtype=out_dtype)  # poisoned: must be written
    arrays = {name: _place(name, t, misaligned) for name, t in arrays.items()}
    scalars = dict(theta_type=emu.ELEM_TYPE[theta0.dtype if theta0 is not None else torch.float32],
                   out_type=emu.ELEM_TYPE[out_dtype], n=la.numel(),
                   **_gate_scalars(seed, offset, training, l, r, beta, max_blocks))
    status, out = h.run("gate_forward", scalars, arrays)
    assert status == 0
    return out["out"]


def gate_backward(h, g, diff, la, seed, offset, training, l, r, beta, l0_lambda=0.0, grad_diff=None,
                  grad_log_alpha=None, *, misaligned=False, max_blocks=3):
    accumulate = grad_diff is not None
    if not accumulate:  # poisoned: the kernel must write every element
        grad_diff, grad_log_alpha = (torch.full(la.shape, float("nan")) for _ in range(2))
    arrays = {name: _place(name, t, misaligned) for name, t in
              dict(g=g, diff=diff, la=la, grad_diff=grad_diff, grad_la=grad_log_alpha).items()}
    scalars = dict(g_type=emu.ELEM_TYPE[g.dtype], n=la.numel(), has_l0=l0_lambda != 0.0, l0_lambda=_hex(l0_lambda),
                   l0_shift=_hex(beta * math.log(-l / r)), accumulate=accumulate,
                   **_gate_scalars(seed, offset, training, l, r, beta, max_blocks))
    status, out = h.run("gate_backward", scalars, arrays)
    assert status == 0
    return out["grad_diff"], out["grad_la"]


# --------------------------------------------------------------------------------------------
# The emulation itself: what it must catch
# --------------------------------------------------------------------------------------------


def test_an_access_past_an_array_is_reported_by_the_sanitizer(harness):
    with pytest.raises(emu.LaunchFailed, match="AddressSanitizer: heap-buffer-overflow"):
        harness.run("selftest_out_of_bounds", dict(n=37), dict(x=torch.zeros(37)))


def test_an_access_before_a_shifted_array_is_reported_by_the_sanitizer(harness):
    x = torch.arange(8.0)
    status, out = harness.run("selftest_read_before_start", dict(back=0), dict(x=(x, 16), out=torch.zeros(8)))
    assert status == 0 and torch.equal(out["out"], x)
    with pytest.raises(emu.LaunchFailed, match="AddressSanitizer: use-after-poison"):  # 16 bytes before x
        harness.run("selftest_read_before_start", dict(back=4), dict(x=(x, 16), out=torch.zeros(8)))


def test_shared_memory_does_not_compile(tmp_path):
    source = tmp_path / "shared.cpp"
    source.write_text("__global__ void k(float* p) { __shared__ float tile[32]; tile[0] = *p; *p = tile[0]; }\n")
    proc = subprocess.run(["g++", *emu.compile_flags(), "-fsyntax-only", str(source)], capture_output=True, text=True)
    assert proc.returncode != 0 and "__shared__ memory is not emulated" in proc.stderr


def test_a_divergent_shuffle_is_reported(harness):
    with pytest.raises(emu.LaunchFailed, match="divergent shuffle"):
        harness.run("selftest_divergent_shuffle", {}, dict(x=torch.zeros(32)))


def test_warps_shuffle_in_lockstep_and_bad_launches_fail(harness):
    x = torch.randn(96, generator=torch.Generator().manual_seed(0))
    status, out = harness.run("selftest_warp_sum", dict(threads=96), dict(x=x))
    assert status == 0
    expected = x.view(3, 32).sum(1, keepdim=True).expand(3, 32).reshape(-1)
    torch.testing.assert_close(out["x"], expected)
    assert harness.run("selftest_empty_grid", {}, dict(x=x))[0] == emu.CUDA_ERROR_INVALID_CONFIGURATION
    # A real launcher surfaces the launch error (max_blocks 0 gives a grid of 0 blocks).
    status, _ = harness.run("philox_uniform", dict(n=4, seed=1, max_blocks=0),
                            dict(offsets=torch.arange(4), out=torch.zeros(4)))
    assert status == emu.CUDA_ERROR_INVALID_CONFIGURATION


# --------------------------------------------------------------------------------------------
# gates.cu
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 2**32 + 17, 2**64 - 1])
def test_philox_kernel_is_the_reference_bit_for_bit(harness, seed):
    offsets = torch.cat([_offsets("cpu"), torch.tensor(U_ZERO_OFFSETS)])
    status, out = harness.run("philox_uniform", dict(n=offsets.numel(), seed=seed, max_blocks=2),
                              dict(offsets=offsets, out=torch.full((offsets.numel(),), float("nan"))))
    assert status == 0
    assert torch.equal(out["out"].view(torch.int32), ref.philox_uniform(seed, offsets).view(torch.int32))


@pytest.mark.parametrize("n", [1, 9, 341, 4231])
@pytest.mark.parametrize("cfg", GATE_CONFIGS)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("max_blocks", GRIDS)
def test_gate_kernel_matches_the_reference_on_both_load_paths(harness, n, cfg, training, max_blocks):
    la = _log_alpha((n,), "cpu", torch.Generator().manual_seed(n))  # includes +-1e4, +-80
    args = (2**63 + 11, 2**32 - 1000, training, cfg["l"], cfg["r"], cfg["beta"])  # counters cross 2**32
    vector = gate_forward(harness, la, *args, max_blocks=max_blocks)
    scalar = gate_forward(harness, la, *args, misaligned=True, max_blocks=max_blocks)
    assert torch.equal(vector.view(torch.int32), scalar.view(torch.int32))
    z64 = ref.gate_forward(la.double(), *args)
    assert_close_by_rule(vector, ref.gate_forward(la, *args), z64, GATE_ATOL, "z")
    far = ~_near_boundary(_sbar64(la, *args))
    assert torch.equal((vector == 0)[far], (z64 == 0)[far]) and torch.equal((vector == 1)[far], (z64 == 1)[far])


@pytest.mark.parametrize("base_dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_effective_weight_kernel_rounds_once_to_the_output_dtype(harness, base_dtype, out_dtype):
    gen = torch.Generator().manual_seed(11)
    n = 1031  # a partial last pack
    theta0 = torch.randn(n, generator=gen).to(base_dtype)
    w = torch.randn(n, generator=gen) * 0.1
    la = _log_alpha((n,), "cpu", gen)
    args = (9, 2**31 - 100, True, -1.5, 1.5, 1.0)
    out = gate_forward(harness, la, *args, theta0=theta0, diff=w, out_dtype=out_dtype)
    scalar = gate_forward(harness, la, *args, theta0=theta0, diff=w, out_dtype=out_dtype, misaligned=True,
                          max_blocks=1)
    assert out.dtype == out_dtype and same_bits(out, scalar)
    oracle = ref.gate_forward(la.double(), *args, theta0=theta0.double(), diff=w.double(), out_dtype=torch.float64)
    same_dtype = ref.gate_forward(la, *args, theta0=theta0, diff=w, out_dtype=out_dtype)
    atol = torch.finfo(out_dtype).eps * oracle.abs().max().item()  # one rounding to out_dtype
    assert_close_by_rule(out, same_dtype, oracle, atol, "effective weight")


@pytest.mark.parametrize("g_dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("l0_lambda", [0.0, 0.3])
def test_gate_backward_kernel_matches_the_reference_and_accumulates(harness, g_dtype, training, l0_lambda):
    gen = torch.Generator().manual_seed(21)
    n, cfg = 2053, GATE_CONFIGS[1]
    g, w, la = torch.randn(n, generator=gen).to(g_dtype), torch.randn(n, generator=gen), _log_alpha((n,), "cpu", gen)
    args = (2**63 + 5, 123, training, cfg["l"], cfg["r"], cfg["beta"], l0_lambda)
    gw, gla = gate_backward(harness, g, w, la, *args)
    ow, ola = ref.gate_backward(g.double(), w.double(), la.double(), *args)
    tw, tla = ref.gate_backward(g.float(), w, la, *args)
    far = ~_near_boundary(_sbar64(la, *args[:-1]))
    atol = 8 * torch.finfo(torch.float32).eps * ((g.double().abs() * w.abs()).max().item() + l0_lambda)
    assert_close_by_rule(gw, tw, ow, atol, "grad_diff")
    assert_close_by_rule(gla[far], tla[far], ola[far], atol, "grad_log_alpha")
    # Accumulating into given buffers: start + the fresh gradients, each element added exactly once
    # (an element visited twice by the grid-stride loop would be added twice), on both load paths.
    # Within a few ulps, not bit for bit: nvcc contracts start + g z into one fma, g++ here does not.
    start_w, start_la = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
    for misaligned, max_blocks in ((True, 1), (False, 3)):
        acc_w, acc_la = gate_backward(harness, g, w, la, *args, start_w.clone(), start_la.clone(),
                                      misaligned=misaligned, max_blocks=max_blocks)
        torch.testing.assert_close(acc_w, start_w + gw, rtol=0, atol=atol + 4 * torch.finfo(torch.float32).eps * 8)
        torch.testing.assert_close(acc_la, start_la + gla, rtol=0, atol=atol + 4 * torch.finfo(torch.float32).eps * 8)


# --------------------------------------------------------------------------------------------
# scatter.cu
# --------------------------------------------------------------------------------------------


def scatter(h, op, targets, ids, index, saved, values=None, *, misaligned=False, max_blocks=3, num_tables=None):
    """launch_scatter_apply / _restore over targets (their addresses in a table); returns (targets, saved)."""
    arrays = {f"t{i}": t for i, t in enumerate(targets)}
    streams = dict(ids=ids, index=index, saved=saved) | ({} if values is None else dict(values=values))
    arrays.update({name: _place(name, t, misaligned) for name, t in streams.items()})
    scalars = dict(type=emu.ELEM_TYPE[saved.dtype], num_tables=len(targets) if num_tables is None else num_tables,
                   index64=index.dtype == torch.int64, n=ids.numel(), max_blocks=max_blocks)
    status, out = h.run(op, scalars, arrays, dict(table=[f"t{i}" for i in range(len(targets))]))
    assert status == 0
    return [out[f"t{i}"] for i in range(len(targets))], out["saved"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("misaligned", [False, True], ids=["vector", "scalar"])
def test_scatter_kernels_merge_as_the_reference_and_restore_bit_for_bit(harness, dtype, index_dtype, misaligned):
    targets, _, ids, index, values, starts = _layout([1, 9, 341, 4231, 2, 1030], 0.3, dtype, "cpu",
                                                     torch.Generator().manual_seed(7), index_dtype)
    # An empty tensor first in the table and one more after the last entry's tensor: no entries.
    targets = [torch.empty(0, dtype=dtype), *targets, torch.randn(7).to(dtype)]
    ids, starts = ids + 1, [0, *starts]
    expected = [t.clone() for t in targets]
    expected_saved = torch.empty(ids.numel(), dtype=dtype)
    ref.scatter_apply(expected, None, ids, index, values, starts, expected_saved)
    poisoned = torch.full((ids.numel(),), float("nan"), dtype=dtype)
    merged, saved = scatter(harness, "scatter_apply", targets, ids, index, poisoned, values, misaligned=misaligned,
                            max_blocks=1 if misaligned else 3)
    assert same_bits(saved, expected_saved)
    assert all(same_bits(m, e) for m, e in zip(merged, expected, strict=True))
    assert any(not same_bits(m, t) for m, t in zip(merged, targets, strict=True))
    restored, _ = scatter(harness, "scatter_restore", merged, ids, index, saved, misaligned=misaligned)
    assert all(same_bits(r, t) for r, t in zip(restored, targets, strict=True))


def test_scatter_kernels_skip_ids_outside_the_table(harness):
    targets, _, ids, index, values, _ = _layout([9, 341, 40], 0.3, torch.float32, "cpu",
                                                torch.Generator().manual_seed(2), torch.int64)
    bad = ids.clone()
    bad[0], bad[-1], bad[5] = len(targets), -1, 2**31 - 1  # never dereferenced: no table[id] read either
    poisoned = torch.full((ids.numel(),), float("nan"))
    merged, saved = scatter(harness, "scatter_apply", targets, bad, index, poisoned, values)
    good = (bad >= 0) & (bad < len(targets))
    assert (saved[~good] == 0).all()  # a skipped entry's slot gets 0 (its pack of saved is written whole)
    starts = torch.tensor([0, *torch.tensor([t.numel() for t in targets]).cumsum(0)[:-1].tolist()])
    assert same_bits(saved[good], torch.cat(targets)[starts[bad[good].long()] + index[good]])  # the originals
    expected = [t.clone() for t in targets]
    for j in good.nonzero().view(-1).tolist():
        expected[bad[j]][index[j]] += values[j]
    assert all(same_bits(m, e) for m, e in zip(merged, expected, strict=True))
    # A table shorter than the ids: the ids past it are outside too.
    merged, _ = scatter(harness, "scatter_apply", targets, ids, index, torch.zeros(ids.numel()), values,
                        num_tables=1)
    assert not same_bits(merged[0], targets[0])
    assert same_bits(merged[1], targets[1]) and same_bits(merged[2], targets[2])


# --------------------------------------------------------------------------------------------
# Any one misaligned array takes the whole launch down the scalar path (UBSan reports a vector
# access to it otherwise), with the same results
# --------------------------------------------------------------------------------------------


def _gate_forward_case(misaligned):
    gen = torch.Generator().manual_seed(5)
    la, w = _log_alpha((1031,), "cpu", gen), torch.randn(1031, generator=gen)
    theta0 = torch.randn(1031, generator=gen).double()  # 32-byte packs
    return lambda h: [gate_forward(h, la, 3, 7, True, L, R, BETA, theta0=theta0, diff=w, out_dtype=torch.bfloat16,
                                   misaligned=misaligned)]


def _gate_backward_case(misaligned):
    gen = torch.Generator().manual_seed(6)
    g, w = torch.randn(1031, generator=gen).half(), torch.randn(1031, generator=gen)
    la = _log_alpha((1031,), "cpu", gen)
    start = torch.randn(2, 1031, generator=gen)
    return lambda h: list(gate_backward(h, g, w, la, 3, 7, True, L, R, BETA, 0.1, start[0].clone(), start[1].clone(),
                                        misaligned=misaligned))


def _scatter_case(misaligned):
    targets, _, ids, index, values, _ = _layout([341, 1030], 0.3, torch.float64, "cpu",
                                                torch.Generator().manual_seed(8), torch.int64)  # 32-byte packs
    saved = torch.full((ids.numel(),), float("nan"), dtype=torch.float64)

    def run(h):
        merged, saved_after = scatter(h, "scatter_apply", targets, ids, index, saved, values, misaligned=misaligned)
        return [*merged, saved_after]
    return run


MISALIGN_CASES = {
    "gate_forward": (_gate_forward_case, ["la", "theta0", "diff", "out"]),
    "gate_backward": (_gate_backward_case, ["g", "diff", "la", "grad_diff", "grad_la"]),
    "scatter_apply": (_scatter_case, ["ids", "index", "values", "saved"]),
}


@pytest.mark.parametrize("case,array", [(c, a) for c, (_, arrays) in MISALIGN_CASES.items() for a in arrays])
def test_one_misaligned_array_takes_the_scalar_path_with_the_same_results(harness, case, array):
    make, _ = MISALIGN_CASES[case]
    vector, scalar = make(False)(harness), make(array)(harness)
    for a, b in zip(vector, scalar, strict=True):
        assert same_bits(a, b)


# --------------------------------------------------------------------------------------------
# sddmm.cu
# --------------------------------------------------------------------------------------------


def sddmm(h, grad_y, x, index, in_features, *, layout="padded", max_blocks=4):
    """launch_sddmm on dY^T and X^T stored with row stride ld: 'padded' (rows 16-byte aligned: the
    16-byte pack path, then an element tail), 'dense' (ld = M), 'shifted' (padded, both buffers one
    element off alignment: element by element) or 'shifted dyt' / 'shifted xt' (that one alone)."""
    m = grad_y.shape[0]
    ld = m if layout == "dense" else (m + 16) // 16 * 16

    def rows(t, name):  # t^T (C, M) stored in a (C, ld) buffer of NaN padding
        buf = torch.full((t.shape[1], ld), float("nan"), dtype=t.dtype)
        buf[:, :m] = t.t()
        return buf, t.element_size() if layout in ("shifted", f"shifted {name}") else 0

    acc = torch.float64 if grad_y.dtype == torch.float64 else torch.float32
    scalars = dict(type=emu.ELEM_TYPE[grad_y.dtype], ld_dyt=ld, ld_xt=ld, nnz=index.numel(), m=m,
                   n_rows=grad_y.shape[1], k=in_features, max_blocks=max_blocks)
    status, out = h.run("sddmm", scalars, dict(dyt=rows(grad_y, "dyt"), xt=rows(x, "xt"), index=index,
                                               out=torch.full((index.numel(),), float("nan"), dtype=acc)))
    assert status == 0
    return out["out"]


@pytest.mark.parametrize("m,k,n", [(1, 1, 1), (9, 41, 9), (37, 9, 41), (130, 24, 16), (0, 5, 6)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
def test_sddmm_kernel_matches_the_float64_reference(harness, m, k, n, dtype):
    gen = torch.Generator().manual_seed(m + k + n)
    gy, x = torch.randn(m, n, generator=gen).to(dtype), torch.randn(m, k, generator=gen).to(dtype)
    index = torch.randperm(n * k, generator=gen)[: max(1, n * k // 3)].sort().values
    oracle, same = ref.sddmm(gy.double(), x.double(), index, k), ref.sddmm(gy, x, index, k)
    scale = (gy.double().abs().t() @ x.double().abs()).max().item() if m else 0.0
    eps = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
    perm = torch.randperm(index.numel(), generator=gen)
    outs = {layout: sddmm(harness, gy, x, index, k, layout=layout)
            for layout in ("padded", "dense", "shifted", "shifted dyt", "shifted xt")}
    outs["unsorted, one block"] = sddmm(harness, gy, x, index[perm], k, max_blocks=1)[perm.argsort()]
    for name, out in outs.items():
        assert out.dtype == same.dtype
        assert_close_by_rule(out, same, oracle, 4 * eps * scale, f"sddmm {dtype} {name}")


def test_sddmm_kernel_gives_nan_for_an_index_out_of_range(harness):
    gen = torch.Generator().manual_seed(3)
    gy, x = torch.randn(33, 10, generator=gen), torch.randn(33, 7, generator=gen)
    out = sddmm(harness, gy, x, torch.tensor([-1, 3, 70, 69, -(2**62)]), 7)
    assert out[[0, 2, 4]].isnan().all()
    torch.testing.assert_close(out[[1, 3]], ref.sddmm(gy, x, torch.tensor([3, 69]), 7))
