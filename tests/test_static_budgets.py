"""Speed budgets checked without a GPU, on the kernels' sm_90 builds (benchmarks/static.py).

Every Triton launcher is compiled for sm_90 as its runtime would compile it (the same
specialization, every autotuning config) and the CUDA extension's kernels are read from its sm_90
build; a small model predicts each launch's time from bytes, instructions and FLOPs. Each budget
below follows from that model and says why, so a change that makes a kernel issue-bound, spill, or
lose its vector loads fails CI. Predictions, not measurements: benchmarks/RESULTS.md has both.
"""

import importlib
import importlib.util
import json

import pytest
from conftest import run_sm90_compiles, sm90_tools_missing

pytestmark = pytest.mark.skipif(sm90_tools_missing() is not None, reason=f"{sm90_tools_missing()}")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("static") / "static.json"
    run_sm90_compiles(["-m", "benchmarks.static", "--json", str(out)])
    return json.loads(out.read_text())


def _rows(report, backend=None, op=None):
    rows = [r for r in report["rows"] if (backend is None or r["backend"] == backend)
            and (op is None or r["op"].startswith(op))]
    assert rows, f"no rows for backend={backend} op={op}"
    return rows


def _issue_bound_instructions(h200: dict, bytes_per_element: float, bandwidth: float) -> float:
    """Instructions per element at which the H200's issue rate (its SMs x 4 schedulers x 32 lanes x
    the clock) takes as long as moving the element's bytes at `bandwidth`."""
    return bytes_per_element * h200["sms"] * 4 * 32 * h200["clock_hz"] / bandwidth


def test_every_triton_variant_compiles_without_spills_but_fp32_ieee_dots(report):
    """Spills go to local memory (L1/L2 round trips per use). fp32 IEEE dots (allow_tf32 off) emulate
    fp32 MMA with three TF32 products and need more registers than the tiles leave: reported only."""
    spills = {r["name"]: r["stack"] for r in _rows(report, "triton") if r["stack"] and "ieee" not in r["op"]}
    assert not spills, f"register spills (stack bytes per thread): {spills}"
    ops = {r["op"].split(" (")[0] for r in _rows(report, "triton")}
    assert {"gate_forward train apply bf16", "gate_backward train bf16 g, L0", "gated_linear forward",
            "gated_linear dX", "gated_linear dW routed", "sddmm", "scatter_apply bf16",
            "scatter_restore bf16"} <= ops | {o.split(" [")[0] for o in ops}
    # Every autotuning config was compiled (not the one fixed tile of DPKERNELS_AUTOTUNE=0).
    diff_linear = importlib.import_module("dpkernels.backends.triton.diff_linear")
    for op, sizes in (("gated_linear forward (fused)", diff_linear._MATMUL_SIZES),
                      ("gated_linear dW routed (fused)", diff_linear._WGRAD_SIZES)):
        variants = {r["variant"] for r in _rows(report, "triton", op) if r["shape"] == "8192x4096->11008"}
        assert len(variants) == len(sizes), (op, variants)


# (op prefix, bytes per element moved, budget in instructions per element, why)
GATE_BUDGETS = [
    ("gate_forward train apply bf16", 12, 80,
     "the training forward's pass (issue #16: <= ~80): memory-bound at the datasheet's 4.8 TB/s below 84"),
    ("gate_backward train bf16 g, L0", 18, 110,
     "the routing pass: 18 B per element, memory-bound at 4.8 TB/s below 127; 110 leaves room for latency"),
    ("gate_forward eval apply bf16", 12, 40, "no draw: a sigmoid per element"),
    ("gate_backward eval bf16 g, L0", 18, 60, "no draw"),
    ("gate_forward train apply bf16, beta=2/3", 12, 84, "the general-beta form: two more MUFU, still memory-bound"),
    ("gate_forward train z (sample_gates)", 8, 61,
     "sample_gates (not the training path): 8 B per element, held to the measured copy rate, 4.3 TB/s (61.6)"),
]


@pytest.mark.parametrize("op,nbytes,budget,why", GATE_BUDGETS, ids=[b[0] for b in GATE_BUDGETS])
def test_triton_gate_passes_stay_memory_bound(report, op, nbytes, budget, why):
    h200 = report["gpus"]["H200"]  # every budget is memory-bound at least at the copy rate (4.3 TB/s)
    assert budget <= _issue_bound_instructions(h200, nbytes, h200["bandwidth"]), why
    for r in _rows(report, "triton", op):
        assert r["per_unit"] <= budget, f"{r['name']}: {r['per_unit']:.1f} SASS per element > {budget} ({why})"
        assert r["bound"] == "memory", r["name"]


def test_triton_gate_passes_load_16_bytes_per_access(report):
    """Aligned tensors (n a multiple of 16, as every weight here) are read and written with 128-bit
    accesses: a narrower access moves the same bytes with 2-8x the load instructions."""
    for r in _rows(report, "triton", "gate_"):
        assert r["global_access_bytes"] == [16], (r["name"], r["global_access_bytes"])


def test_gate_passes_keep_enough_bytes_in_flight(report):
    """Little's law: an H200 streams 4.8 TB/s only with ~4.8e12 B/s x ~0.8 us of DRAM latency in
    flight, ~29 KB per SM. Resident threads (by registers and shared memory) times the bytes each
    thread loads in its straight-line pass must leave twice that, or occupancy, not bandwidth,
    would bound these passes."""
    h200 = report["gpus"]["H200"]
    need = h200["peak_bandwidth"] * 0.8e-6 / h200["sms"]
    for r in _rows(report, "triton", "gate_"):
        per_thread = (r["bytes"] / r["ctas"]) / 128  # 4 warps per program
        in_flight = r["ctas_per_sm"] * 128 * per_thread
        assert in_flight >= 2 * need, (r["name"], in_flight, need)


def test_fused_gemms_rebuild_the_weight_at_bounded_cost(report):
    """The fused forward/dX GEMMs rebuild each weight tile (Philox + gate + the base and diff loads)
    per row block: at most 80 instructions per rebuilt element and K-step (the gate math's ~60 plus
    the MMA and operand staging), so the rebuild, not the GEMM, is what the crossover with the
    unfused path (ops.diff_linear) is about."""
    for r in _rows(report, "triton", "gated_linear forward") + _rows(report, "triton", "gated_linear dX"):
        if "ieee" in r["op"]:
            continue
        blocks = dict(part.split("=") for part in r["variant"].split(", ") if "=" in part)
        threads = 32 * int(r["variant"].rsplit("w", 1)[1])
        rebuilt = int(blocks["BLOCK_P"]) * int(blocks["BLOCK_Q"]) / threads
        assert r["per_unit"] / rebuilt <= 80, (r["name"], r["per_unit"] / rebuilt)


def test_fused_weight_gradient_is_tensor_bound_at_large_m(report):
    """At 8192 x 4096 -> 11008 the routed epilogue is ~1% of the GEMM's work: the best config must
    stay bound by the tensor cores (at Triton's measured 77% of cuBLAS's rate), not by issue."""
    rows = [r for r in _rows(report, "triton", "gated_linear dW routed (fused)") if r["shape"] == "8192x4096->11008"]
    best = min(rows, key=lambda r: r["h200_us"])
    assert best["bound"] == "tensor", best


def _case(report, op, shape, backend=("triton", "torch (model)")):
    (case,) = [c for c in report["cases"] if c["op"].startswith(op) and c["shape"].startswith(shape)
               and c["backend"] in backend]
    return case


def test_sddmm_beats_the_dense_gradient_gemm_at_the_design_shape(report):
    """The fixed-mask stage's point: its weight gradient at 0.5% costs less than the dense dY^T X.
    (Issue #16 asks 0.8x; the model gives ~0.8x with L2 at its lower bound of 6 TB/s: see RESULTS.md.)"""
    sddmm = _case(report, "sddmm", "8192x4096->11008")
    dense = _case(report, "dense dY^T X GEMM", "8192x4096->11008")
    assert sddmm["h200_us"] < 0.9 * dense["h200_us"], (sddmm, dense)
    assert sddmm["h100_us"] < 0.9 * dense["h100_us"], (sddmm, dense)


def test_sddmm_path_choice_follows_the_model(report):
    """The launcher's cost model (path_cost.sddmm_gathers_pay) uses benchmarks.static's H200 figures
    and picks the path the static predictions favour: the gathers at 0.5% of 4096 -> 11008 and
    4096 -> 4096, the dense GEMM at 768 -> 3072 (its DRAM traffic is most of the GEMM's time there)."""
    from dpkernels import path_cost

    h200 = report["gpus"]["H200"]
    assert (path_cost.L2_BANDWIDTH, path_cost.BANDWIDTH, path_cost.TENSOR_FLOPS) == (
        h200["l2_bandwidth"], h200["bandwidth"], h200["tensor_flops"])
    assert report["sddmm_choices"] == {"8192x768->3072": False, "8192x4096->11008": True, "512x4096->4096": True}
    for shape, picks_gathers in report["sddmm_choices"].items():
        gathers = _case(report, "sddmm", shape)["h200_us"]
        dense = _case(report, "dense dY^T X GEMM", shape)["h200_us"]
        # The closed form leaves out launch overheads and the per-program dY^T rows: it may only
        # disagree with the static prediction where the two paths are within 5%.
        assert picks_gathers == (gathers < dense) or abs(gathers - dense) <= 0.05 * dense, (shape, gathers, dense)


def test_task_switch_fits_its_target(report):
    """DESIGN.md: switching BERT-large's 393 tensors at 0.5% in <= 0.2 ms (apply + restore, one launch each)."""
    for backend in ("triton", "cuda"):
        if backend == "cuda" and importlib.util.find_spec("dpkernels._C") is None:
            continue
        total = sum(_case(report, op, "1680000", (backend,))["h100_us"] for op in ("scatter_apply", "scatter_restore"))
        assert total <= 200, (backend, total)


def test_cuda_gate_kernels_stay_memory_bound(report):
    """The CUDA extension's gate kernels (when it was built), read from its sm_90 build: spill-free and,
    over the hot loop of their launch as bindings.cpp makes it, memory-bound like the Triton ones
    (tests/test_cuda_ext.py holds their per-element budgets)."""
    if importlib.util.find_spec("dpkernels._C") is None:
        pytest.skip("the CUDA extension is not built")
    rows = _rows(report, "cuda", "gate_")
    assert len(rows) >= 6
    for r in rows:
        assert r["stack"] == 0 and r["bound"] == "memory", r
