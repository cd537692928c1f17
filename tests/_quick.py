"""The quick GPU test run (``DPKERNELS_QUICK=1``, what ``gpu_check.sh quick`` runs): a few minutes.

The rule: of the cuda-marked tests, only the cases that ``PICKS`` names are kept (about 150 of
800; tests not marked cuda are untouched), so that every GPU kernel (``KERNELS``) runs at least
one small-shape case, with odd sizes and edge values, and one real-shape case, at a layer's size;
a pick names a test and the values of some of its parameters, and keeps every case that has those
values (on every backend or path, say): mostly bf16, the dtype the benchmarks run in, plus one
other. Nothing in a test changes: the full set runs in ``gpu_check.sh tests``. The
real-shape cases go first, so that on pytest-xdist the long ones start at once and a time limit
cuts small cases. A pick that matches no test of a collected file is an error (a renamed test
or parameter must not silently drop a kernel's coverage).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

KERNELS = {
    "triton-gates": "Triton gate sampling, gate-apply and gate-backward (backends/triton/gates.py)",
    "triton-fused-linear": "Triton fused diff linear: forward, dX and weight-gradient GEMMs",
    "triton-sddmm": "Triton sampled weight gradient of the fixed-mask stage",
    "triton-scatter": "Triton scatter apply / restore (task switching)",
    "triton-segmented": "Triton segmented sparse products of mixed-task serving (backends/triton/segmented.py)",
    "cuda-gates": "CUDA extension gate kernels and its Philox (csrc/gates.cu)",
    "cuda-scatter": "CUDA extension scatter apply / restore (csrc/scatter.cu)",
    "cuda-sddmm": "CUDA extension sddmm (csrc/sddmm.cu)",
    "philox": "the reference Philox stream == Triton's tl.rand, bit for bit",
}


@dataclass(frozen=True)
class Pick:
    test: str  # "test_file.py::test_name" or "test_file.py::Class::test_name"
    kernels: tuple[str, ...]
    real: bool = False  # whether the cases run at a real layer's size
    params: dict = field(default_factory=dict)  # parameter values a kept case has (others: any)

    def matches(self, item) -> bool:
        if _test_name(item) != self.test:
            return False
        callspec = getattr(item, "callspec", None)
        values = callspec.params if callspec is not None else {}
        return all(name in values and values[name] == value for name, value in self.params.items())


_GATES, _FUSED = ("triton-gates", "cuda-gates"), ("triton-fused-linear", "triton-gates", "cuda-gates")
_SDDMM, _SCATTER = ("triton-sddmm", "cuda-sddmm"), ("triton-scatter", "cuda-scatter")
_BF16 = torch.bfloat16

PICKS = [
    # Gate kernels (every backend on the GPU: torch, triton, cuda).
    Pick("test_gates.py::test_sample_gates_match_reference", _GATES, params=dict(shape=(33, 41))),
    Pick("test_gates.py::test_gate_forward_effective_weight", _GATES, params=dict(base_dtype=_BF16, out_dtype=_BF16)),
    Pick("test_gates.py::test_gate_backward_matches_reference", _GATES, params=dict(g_dtype=_BF16, l0_lambda=0.3)),
    Pick("test_gates.py::test_u_zero_gives_a_finite_closed_gate", _GATES),
    Pick("test_gates.py::test_extreme_log_alpha_gives_finite_saturated_gates", _GATES),
    Pick("test_gates.py::test_gate_kernels_at_a_real_layer_shape", _GATES, real=True),
    Pick("test_cuda_ext.py::TestOnGPU::test_gates_and_gradients_match_triton_and_the_reference", _GATES),
    Pick("test_cuda_ext.py::TestOnGPU::test_vector_and_scalar_load_paths_agree_bit_for_bit", ("cuda-gates",)),
    Pick("test_cuda_ext.py::TestOnGPU::test_bad_inputs_raise_and_leave_the_gpu_usable", ("cuda-gates",)),
    Pick("test_cuda_ext.py::TestOnGPU::test_empty_tensors", ("cuda-gates",)),
    Pick("test_cuda_ext.py::TestOnGPU::test_every_element_of_a_large_tensor_is_written", ("cuda-gates",), real=True),
    Pick("test_triton_guard_zones.py::test_gate_kernels_stay_inside_their_tensors", ("triton-gates",),
         params=dict(n=1031, training=True)),
    # Diff linear: every backend and path at odd sizes; the fused kernels also at real shapes
    # (test_fused_kernels_match_float64_reference adds them on CUDA), the autotuner's tiles.
    Pick("test_diff_linear.py::test_forward_and_every_gradient_match_float64_reference", _FUSED,
         params=dict(k=64, n=48, bias=True)),
    Pick("test_diff_linear.py::test_forward_and_every_gradient_match_float64_reference", _FUSED,
         params=dict(k=341, n=9, bias=False, training=True, l0_lambda=0.05)),
    Pick("test_diff_linear.py::test_autocast", _FUSED),
    Pick("test_fused_diff_linear.py::test_fused_kernels_match_float64_reference", ("triton-fused-linear",), real=True,
         params=dict(cdt=_BF16, base_dtype=_BF16, training=True)),
    Pick("test_fused_diff_linear.py::test_fused_kernels_match_float64_reference", ("triton-fused-linear",), real=True,
         params=dict(cdt=torch.float16, base_dtype=torch.float32, training=False)),
    Pick("test_fused_diff_linear.py::test_every_autotuning_config_matches_float64_reference",
         ("triton-fused-linear",), real=True),
    Pick("test_fused_diff_linear.py::test_fused_and_unfused_paths_agree_at_real_shapes_in_bf16",
         ("triton-fused-linear", "triton-gates"), real=True),
    Pick("test_fused_diff_linear.py::test_fused_kernels_take_strided_operands", ("triton-fused-linear",)),
    Pick("test_fused_diff_linear.py::test_fused_kernels_stay_finite_for_extreme_log_alpha_and_empty_shapes",
         ("triton-fused-linear",)),
    Pick("test_triton_guard_zones.py::test_fused_linear_kernels_stay_inside_their_tensors", ("triton-fused-linear",),
         params=dict(m=33, k=64, n=48)),
    # Fixed-mask stage: sddmm.
    Pick("test_fixed_mask.py::test_sddmm_matches_dense_product_at_the_mask", _SDDMM,
         params=dict(m=130, k=64, n=48, dtype=_BF16)),
    Pick("test_fixed_mask.py::test_sddmm_matches_dense_product_at_the_mask", _SDDMM,
         params=dict(m=9, k=341, n=9, dtype=torch.float32)),
    Pick("test_fixed_mask.py::test_fixed_mask_linear_matches_float64_reference", _SDDMM, params=dict(k=341, n=9)),
    Pick("test_fixed_mask.py::test_fixed_mask_linear_under_autocast", _SDDMM),
    Pick("test_fixed_mask.py::test_sddmm_at_a_real_layer_shape", _SDDMM, real=True),
    Pick("test_cuda_ext.py::TestOnGPUSparse::test_sddmm_matches_the_float64_reference", ("cuda-sddmm",),
         params=dict(m=130, k=64, n=48, dtype=_BF16)),
    Pick("test_cuda_ext.py::TestOnGPUSparse::test_sddmm_matches_the_float64_reference", ("cuda-sddmm",),
         params=dict(m=4231, k=24, n=40, dtype=torch.float32)),
    Pick("test_cuda_ext.py::TestOnGPUSparse::test_sddmm_grid_stride_empty_and_out_of_range", ("cuda-sddmm",)),
    Pick("test_cuda_ext.py::TestOnGPUSparse::test_fixed_mask_linear_runs_its_weight_gradient_on_the_cuda_backend",
         ("cuda-sddmm",)),
    Pick("test_triton_guard_zones.py::test_sddmm_kernel_stays_inside_its_tensors", ("triton-sddmm",),
         params=dict(m=130, k=24, n=16)),
    # Scatter (task switching).
    Pick("test_scatter.py::test_triton_scatter_matches_the_reference_bitwise", ("triton-scatter",),
         params=dict(dtype=_BF16, index_dtype=torch.int32)),
    Pick("test_scatter.py::test_triton_scatter_matches_the_reference_bitwise", ("triton-scatter",),
         params=dict(dtype=torch.float32, index_dtype=torch.int64)),
    Pick("test_scatter.py::test_1000_random_switches_leave_the_base_bitwise_identical", _SCATTER,
         params=dict(dtype=_BF16)),
    Pick("test_scatter.py::test_scatter_kernels_at_a_real_model_size", _SCATTER, real=True),
    Pick("test_cuda_ext.py::TestOnGPUSparse::test_scatter_matches_the_reference_bit_for_bit", ("cuda-scatter",),
         params=dict(dtype=_BF16, index_dtype=torch.int32)),
    Pick("test_cuda_ext.py::TestOnGPUSparse::test_scatter_matches_the_reference_bit_for_bit", ("cuda-scatter",),
         params=dict(dtype=torch.float32, index_dtype=torch.int64)),
    Pick("test_cuda_ext.py::TestOnGPUSparse::test_scatter_vector_and_scalar_paths_agree", ("cuda-scatter",),
         params=dict(dtype=_BF16)),
    Pick("test_cuda_ext.py::TestOnGPUSparse::test_scatter_skips_ids_outside_the_table_and_bad_input_raises",
         ("cuda-scatter",)),
    Pick("test_cuda_ext.py::TestOnGPUSparse::test_scatter_covers_more_entries_than_one_grid_pass", ("cuda-scatter",),
         real=True),
    Pick("test_triton_guard_zones.py::test_scatter_kernels_stay_inside_their_tensors", ("triton-scatter",),
         params=dict(dtype=_BF16)),
    # Mixed-task serving: the segmented Linear and embedding corrections.
    Pick("test_segmented.py::test_triton_spmm_matches_the_dense_oracle_at_odd_shapes", ("triton-segmented",),
         params=dict(device="cuda", dtype=_BF16)),
    Pick("test_segmented.py::test_triton_gather_is_the_merged_lookup_bit_for_bit", ("triton-segmented",),
         params=dict(device="cuda", dtype=_BF16)),
    Pick("test_segmented.py::test_triton_segmented_kernels_on_the_gpu_at_a_real_shape", ("triton-segmented",),
         real=True, params=dict(dtype=_BF16)),
    # Philox: every seed edge case (one compile each at most), and a real layer's counters.
    Pick("test_philox.py::test_reference_philox_matches_tl_rand_bit_for_bit", ("philox",)),
    Pick("test_philox.py::test_reference_philox_matches_tl_rand_over_a_real_layers_counters", ("philox",), real=True),
    Pick("test_cuda_ext.py::TestOnGPU::test_philox_is_tl_rand_bit_for_bit", ("philox", "cuda-gates")),
]


def _test_name(item) -> str:
    """'test_file.py::[Class::]test_name' of a collected item (its node id without folders and parameters)."""
    return item.nodeid.split("[", 1)[0].rsplit("/", 1)[-1]


def select(items: list) -> tuple[list, list]:
    """(kept, deselected): the items in the order to run them (real-shape picks first, then the
    rest in collection order); raises ValueError naming the picks that match no cuda-marked test
    of a collected file."""
    files = {_test_name(item).split("::", 1)[0] for item in items}
    matched, real, kept, deselected = set(), [], [], []
    for item in items:
        if item.get_closest_marker("cuda") is None:
            kept.append(item)
            continue
        picks = [i for i, pick in enumerate(PICKS) if pick.matches(item)]
        matched.update(picks)
        if not picks:
            deselected.append(item)
        elif any(PICKS[i].real for i in picks):
            real.append(item)
        else:
            kept.append(item)
    stale = [f"{pick.test} {pick.params or ''}".strip() for i, pick in enumerate(PICKS)
             if i not in matched and pick.test.split("::", 1)[0] in files]
    if stale:
        raise ValueError(f"DPKERNELS_QUICK=1: no cuda-marked test matches the pick(s) {'; '.join(stale)} "
                         "(tests/_quick.py)")
    return real + kept, deselected
