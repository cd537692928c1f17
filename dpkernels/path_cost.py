"""Predicted times of the diff-linear paths: which one ``DPKERNELS_DIFF_LINEAR=auto`` takes.

A closed form of benchmarks/static.py's model of the sm_90 build (read its docstring), on an H200,
per launch::

    t = 2 us + max(DRAM bytes / bandwidth, L2 bytes / L2 bandwidth,
                   instructions / issue rate / SM balance, FLOPs / tensor rate / SM balance)

with each kernel's per-element figures taken from its sm_90 build; tests/test_path_cost.py checks
the constants against the compiled kernels and the predictions against benchmarks.static's. For
y = x W^T with W = theta0 + z diff (N x K) and M tokens the paths cost, per weight element (bf16):

    unfused  one gate pass writes W in the compute dtype (12 B), cuBLAS multiplies it in the forward
             and in dX (reading it, 2 B each); weight gradient: cuBLAS's dY^T X (writes 2 B), then
             one routing pass (18 B)
    fused    Triton GEMMs rebuild every weight tile where they load it (10 B read and ~70
             instructions, the gate's Philox) once per row block of the output, in the forward and
             again in dX; weight gradient: routed in the dY^T X GEMM's epilogue (16 B)

So the fused forward pays only while each weight element is rebuilt once (M up to the tallest
tile's rows), and only where dX is not needed: it saves 4 B per element in the forward (10 B for
12 + 2) and loses 8 in dX (10 B for 2). ops.diff_linear decides by these functions per call; the
fused GEMMs' launcher picks its split-K by them, and the fixed-mask stage's Triton sddmm its path
(``sddmm_gathers_pay``).
"""

from __future__ import annotations

import math

# H200, the one set of figures of the model (benchmarks.static.H200 is built from them and says
# where each comes from: a copy's measured bandwidth, a large bf16 GEMM's measured rate, ...).
SMS = 132
CLOCK_HZ = 1.98e9  # SM clock under load
ISSUE_RATE = SMS * 4 * 32 * CLOCK_HZ  # thread-instructions per second: 4 schedulers per SM
BANDWIDTH = 4.3e12  # DRAM bytes per second
L2_BANDWIDTH = 6.0e12  # L2 -> SM bytes per second (benchmarks.static derives this lower bound)
TENSOR_FLOPS = 788e12  # cuBLAS's bf16 rate
LAUNCH_S = 2e-6  # per kernel launch
# DESIGN.md, H100: a plain autotuned Triton GEMM took 1.25 ms where cuBLAS took 0.96 ms at
# 8192 x 4096 -> 11008: the fused (Triton) GEMMs' tensor work runs at this share of cuBLAS's rate.
TRITON_TENSOR_EFFICIENCY = 0.96 / 1.25

# The fused forward / dX GEMM (backends/triton/diff_linear.py, _gated_matmul_kernel): instructions
# of its loop body per rebuilt weight element (the MMA's and the activation loads' share included)
# for training gates (Philox draw) and eval gates; its tallest tile (output rows per rebuild of a
# weight tile) and the columns of its short-M tiles (which set the CTA count at one row block).
REBUILD_INSTRUCTIONS = {True: 70.0, False: 22.0}
FUSED_ROWS = 128
FUSED_COLS = 32
MAX_SLICES = 16  # split-K slices tried (one row block only: then no weight element is rebuilt twice)
SLICE_MIN_Q = 64  # reduction length per slice at least (the largest BLOCK_Q of the short-M tiles)
# A split must be predicted 5% faster than none: the model's ceil(CTAs / SMs) balance is coarse,
# and it prices the second launch at its 2 us only.
SPLIT_MIN_GAIN = 0.05

# The fused weight gradient, conservatively. The one GPU fact about such a kernel is DESIGN.md's: a
# naive Triton GEMM with the routing in its epilogue took 2.35 ms on an H100 at M = 8192,
# 11008x4096 (cuBLAS + the routing pass: 1.24 ms), where this model predicts 1.42 ms (H100) for
# today's kernel, and 0.336 ms at M = 512, 4096x4096 (predicted: 0.098 ms). The model was
# optimistic about a fused epilogue by 1.65x and 3.4x; the fused weight gradient is taken only where
# it is predicted faster by more than the smaller of the two. That is at no shape of DESIGN.md's
# (the best predicted gain is 1.45x, M = 512, 4096x4096: 66 vs 96 us on an H200), only where
# launches dominate (one launch instead of two). The kernel's sub-tiled epilogue removed the
# naive one's spills, the measured cause: a GPU measurement of it should replace this factor.
FUSED_WGRAD_SHORTFALL = 2.35 / 1.42


def _balance(ctas: int) -> float:
    """The busiest SM's share: CTAs spread over the SMs, ceil(CTAs / SMs) on the busiest."""
    return (ctas / SMS) / math.ceil(ctas / SMS) if ctas else 1.0


def _launch(*, dram: float, l2: float = 0.0, instructions: float = 0.0, flops: float = 0.0,
            ctas: int = SMS) -> float:
    """Seconds of one launch by the model."""
    balance = _balance(ctas)
    return LAUNCH_S + max(dram / BANDWIDTH, l2 / L2_BANDWIDTH, instructions / (ISSUE_RATE * balance),
                          flops / (TENSOR_FLOPS * balance))


def gemm_seconds(m: int, p: int, q: int, cdt_size: int = 2) -> float:
    """cuBLAS (M, Q) @ (Q, P) in the compute dtype: each operand read once, at its measured rate."""
    return _launch(dram=cdt_size * (m * q + q * p + m * p), flops=2.0 * m * p * q)


def gate_pass_seconds(elements: int, bytes_per_element: float) -> float:
    """An elementwise gate pass (gate_forward, gate_backward): memory-bound at its bytes."""
    return _launch(dram=elements * bytes_per_element)


def fused_matmul_seconds(m: int, p: int, q: int, *, training: bool, base_size: int = 2, cdt_size: int = 2,
                         slices: int = 1) -> float:
    """The fused GEMM (M, Q) @ W-as-(Q, P), W rebuilt from theta0 (base_size B), diff and
    log_alpha (fp32), with the reduction in ``slices`` split-K slices (then the fp32 slices are
    written and summed in order by a second launch)."""
    rebuilds = math.ceil(m / FUSED_ROWS)  # row blocks: each rebuilds every weight element
    weight = p * q * (base_size + 8)
    out = m * p * (cdt_size if slices == 1 else 4 * slices)
    # L2: the weight tiles re-read by the row blocks after the first (the activations' re-reads, at
    # most 2 M Q P / FUSED_COLS bytes, stay below the DRAM term where one row block is fused).
    t = _launch(dram=weight + cdt_size * m * q + out, l2=(rebuilds - 1) * weight,
                instructions=rebuilds * p * q * REBUILD_INSTRUCTIONS[bool(training)],
                flops=2.0 * m * p * q / TRITON_TENSOR_EFFICIENCY,
                ctas=rebuilds * math.ceil(p / FUSED_COLS) * slices)
    if slices > 1:
        t += _launch(dram=m * p * (4 * slices + cdt_size))
    return t


def split_slices(m: int, p: int, q: int, *, training: bool, base_size: int = 2, cdt_size: int = 2) -> int:
    """The split-K slices of the fused GEMM that the model predicts fastest (1: no split). Only at
    one row block (M <= FUSED_ROWS), where the output tiles alone may leave SMs idle: decoding-sized
    M at a narrow output (dX of a 768x3072 weight: 24 tiles of 32 columns for 132 SMs)."""
    if m > FUSED_ROWS:
        return 1

    def seconds(slices):
        return fused_matmul_seconds(m, p, q, training=training, base_size=base_size, cdt_size=cdt_size,
                                    slices=slices)

    best = min(range(1, min(MAX_SLICES, max(1, q // SLICE_MIN_Q)) + 1), key=seconds)
    return best if seconds(best) < (1 - SPLIT_MIN_GAIN) * seconds(1) else 1


def fused_forward_seconds(m: int, n: int, k: int, *, training: bool, input_grad: bool, base_size: int = 2,
                          cdt_size: int = 2) -> float:
    """The fused forward (y = x W^T) and, when x needs its gradient, the fused dX (dY W)."""
    passes = [(m, n, k)] + ([(m, k, n)] if input_grad else [])
    return sum(fused_matmul_seconds(*s, training=training, base_size=base_size, cdt_size=cdt_size,
                                    slices=split_slices(*s, training=training, base_size=base_size,
                                                        cdt_size=cdt_size)) for s in passes)


def unfused_forward_seconds(m: int, n: int, k: int, *, input_grad: bool, base_size: int = 2,
                            cdt_size: int = 2) -> float:
    """One gate pass writing W, cuBLAS's forward and, when x needs its gradient, cuBLAS's dX."""
    gemms = gemm_seconds(m, n, k, cdt_size) + (gemm_seconds(m, k, n, cdt_size) if input_grad else 0.0)
    return gate_pass_seconds(n * k, base_size + 8 + cdt_size) + gemms


def fused_forward_pays(m: int, n: int, k: int, *, training: bool, input_grad: bool, base_size: int = 2,
                       cdt_size: int = 2) -> bool:
    """Whether the fused forward (and dX) is predicted faster than the unfused ones."""
    return (fused_forward_seconds(m, n, k, training=training, input_grad=input_grad, base_size=base_size,
                                  cdt_size=cdt_size)
            < unfused_forward_seconds(m, n, k, input_grad=input_grad, base_size=base_size, cdt_size=cdt_size))


def fused_wgrad_seconds(m: int, n: int, k: int, cdt_size: int = 2) -> float:
    """dY^T X with the routing in its epilogue: reads diff and log_alpha, writes both grads (16 B)."""
    return _launch(dram=16 * n * k + cdt_size * m * (n + k), flops=2.0 * m * n * k / TRITON_TENSOR_EFFICIENCY)


def unfused_wgrad_seconds(m: int, n: int, k: int, cdt_size: int = 2) -> float:
    """cuBLAS's dY^T X in the compute dtype, then the routing pass (reads it, diff and log_alpha;
    writes both fp32 grads)."""
    return gemm_seconds(n, k, m, cdt_size) + gate_pass_seconds(n * k, cdt_size + 16)


def fused_wgrad_pays(m: int, n: int, k: int, cdt_size: int = 2) -> bool:
    """Whether the fused weight gradient is predicted faster by more than FUSED_WGRAD_SHORTFALL."""
    return FUSED_WGRAD_SHORTFALL * fused_wgrad_seconds(m, n, k, cdt_size) < unfused_wgrad_seconds(m, n, k, cdt_size)


def auto_paths(m: int, n: int, k: int, *, training: bool, input_grad: bool, gate_grad: bool, base_size: int = 2,
               cdt_size: int = 2) -> tuple[bool, bool]:
    """(fused forward and dX, fused weight gradient): DPKERNELS_DIFF_LINEAR=auto's choice for M
    tokens through an N x K weight. input_grad: x needs its gradient (dX runs); gate_grad: diff or
    log_alpha need theirs (the weight gradient runs)."""
    forward = fused_forward_pays(m, n, k, training=training, input_grad=input_grad, base_size=base_size,
                                 cdt_size=cdt_size)
    return forward, gate_grad and fused_wgrad_pays(m, n, k, cdt_size)


def sddmm_gathers_pay(m: int, n: int, k: int, nnz: int) -> bool:
    """Whether the Triton sddmm's gathers are predicted faster than one GEMM + gather, for the
    fixed-mask weight gradient (dY^T X)[index] of nnz entries at M x K -> N.

    Per token, the gathers move 2 B of X^T per entry from L2 (dY's rows, shared by sorted entries,
    add little), the transpose of X 2 x 2 B per element of X through DRAM, and dY is read once (2 B
    per element); the GEMM does 2 N K FLOPs. So the gathers win below a density of about
    (L2 / tensor rate) (1 - DRAM bytes / GEMM): ~0.7% at 4096 -> 11008, ~0.5% at 768 -> 3072.
    The same for fp32 inputs: twice the bytes, half the (TF32) rate."""
    gathers = 2.0 * nnz * m / L2_BANDWIDTH + 2.0 * m * (n + 2 * k) / BANDWIDTH
    return gathers < 2.0 * m * n * k / TENSOR_FLOPS
