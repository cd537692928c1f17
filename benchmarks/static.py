"""Static performance model of every GPU kernel, from its sm_90 build: speed checked without a GPU.

    python -m benchmarks.static [--summary] [--json FILE] [--workers N]

Each Triton launcher runs on meta tensors at DESIGN.md's shapes while Triton compiles for sm_90
exactly as its runtime would (``benchmarks.sass.compile_launches``: the same specialization and
every autotuning config); the CUDA extension's kernels come from its sm_90 build (dpkernels/_C).
From each binary: registers, spills (stack bytes), shared memory, CTAs per SM, the widths of its
global accesses and its SASS instruction counts. A small model turns them into a predicted time on
an H200 (and an H100, for DESIGN.md's H100 targets):

    t = max(bytes / bandwidth,                           DRAM traffic the op needs, read and written once
            L2 bytes / L2 bandwidth,                     re-reads served on chip (gathers)
            instructions / issue rate / SM balance,      4 warp schedulers per SM, 1 instruction a cycle
            MUFU instructions / MUFU rate / SM balance,  16 special-function lanes per SM
            FLOPs / tensor rate / SM balance)            + 2 us per launch

``SM balance`` is the busiest SM's share: CTAs spread over 132 SMs, a kernel takes as long as the SM
with ceil(CTAs / 132) of them. Latency and occupancy effects beyond that are not modelled: a
prediction is a floor that a good kernel approaches, and the budgets in tests/test_static_budgets.py
hold each kernel to the resource that ought to bound it. Every figure printed here is a
**prediction**, not a measurement; benchmarks/RESULTS.md puts measurements beside them once a GPU
run has been made.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import json
import math
import os
import sys
from dataclasses import asdict, dataclass

if os.environ.get("TRITON_INTERPRET") == "1":  # before triton's import: the real compiler, not numpy
    sys.exit("benchmarks.static compiles the real kernels: run it without TRITON_INTERPRET=1")

import torch  # noqa: E402

from benchmarks.sass import Function, access_bytes, compile_launches, disassemble  # noqa: E402
from dpkernels import path_cost  # noqa: E402


@dataclass(frozen=True)
class Gpu:
    name: str
    sms: int
    clock_hz: float  # sustained SM clock under load
    bandwidth: float  # DRAM bytes/s the model uses (a copy's measured rate where known)
    peak_bandwidth: float  # the datasheet's
    tensor_flops: float  # dense bf16 FLOP/s reached by a large GEMM
    l2_bandwidth: float  # L2 -> SM bytes/s (a lower bound, derived below; not measured)

    @property
    def issue_rate(self) -> float:
        """Thread-instructions per second: 4 schedulers per SM, one warp instruction each per cycle."""
        return self.sms * 4 * 32 * self.clock_hz

    @property
    def mufu_rate(self) -> float:
        """Special-function (MUFU: ex2, lg2, rcp) thread-operations per second: 16 lanes per SM."""
        return self.sms * 16 * self.clock_hz


# H200: the device tool's KINDS.md (a copy moved 4.3 TB/s counting reads and writes; an 8192^3 bf16
# GEMM ran at 788 TFLOP/s; SM clock 1980 MHz under load). H100: DESIGN.md (a gate pass ran at
# 2.9 TB/s; nn.Linear's three GEMMs at 8192 x 4096 -> 11008 took 3.28 ms, i.e. 676 TFLOP/s).
# L2 -> SM bandwidth, the least certain figure: a lower bound from DESIGN.md's cuBLAS measurement,
# the dY^T X GEMM at that shape in 0.96 ms on an H100. Its largest tile, 128 x 256, reads at least
# 2 M N K (1/128 + 1/256) bytes through L2, 5.8 GB with one operand multicast to 2-CTA clusters:
# >= 6.0 TB/s. (A published microbenchmark of the 114-SM PCIe H100 read ~5.5 TB/s.)
# The H200's figures are dpkernels.path_cost's (the package's closed form of this model decides
# by them), held here in one place.
H200 = Gpu("H200", path_cost.SMS, path_cost.CLOCK_HZ, path_cost.BANDWIDTH, 4.8e12, path_cost.TENSOR_FLOPS,
           path_cost.L2_BANDWIDTH)
H100 = Gpu("H100", 132, 1.755e9, 2.9e12, 3.35e12, 676e12, path_cost.L2_BANDWIDTH)
LAUNCH_S = path_cost.LAUNCH_S  # per kernel launch, back to back on one stream (a lead)
REGISTERS_PER_SM, THREADS_PER_SM, CTAS_PER_SM, SHARED_PER_SM = 65536, 2048, 32, 228 * 1024


@dataclass
class Work:
    """What one launch must do, from its shapes (not from its code)."""

    bytes: float  # DRAM bytes read and written, each once
    flops: float = 0.0  # tensor-core FLOPs
    l2_bytes: float = 0.0  # on-chip re-reads beyond `bytes` (gathered rows)
    trips: int = 1  # iterations of the kernel's main loop per CTA (1: straight-line code)
    elements: int = 0  # output elements, for per-element figures (elementwise kernels)
    loop_marker: str | None = None  # an opcode prefix that identifies the main loop (see Function.loop_body)
    # True: of the kernel's loops only the main one runs (a grid-stride kernel's scalar tail loop runs
    # zero times on aligned tensors whose size is a multiple of the pack), so the other loops'
    # instructions are not counted and the access widths are the main loop's.
    main_loop_only: bool = False


@dataclass
class Row:
    op: str  # what the launch computes, e.g. "gate_forward train apply"
    backend: str  # triton | cuda
    variant: str  # tile / config / specialization
    shape: str
    registers: int
    stack: int
    shared: int
    ctas: int
    ctas_per_sm: int
    global_access_bytes: list[int]  # distinct widths (bytes per thread) of global loads/stores
    instructions: float  # dynamic instructions per thread
    per_unit: float  # instructions per element (elementwise) or per loop iteration (GEMM K-step)
    per_mflop: float  # instructions per MFLOP of tensor work (GEMMs), else 0
    mufu_per_unit: float
    bytes: float
    flops: float
    elements: int  # of an elementwise kernel's output (0 for the others)
    h200_us: float
    h100_us: float
    bound: str  # which resource sets the H200 time

    @property
    def name(self) -> str:
        return f"{self.backend} {self.op} [{self.variant}] {self.shape}"


def ctas_per_sm(fn: Function, threads: int) -> int:
    """Resident CTAs per SM by registers (allocated per warp in units of 256), threads and shared memory."""
    warp_registers = math.ceil(max(fn.registers, 1) * 32 / 256) * 256
    by_registers = REGISTERS_PER_SM // (warp_registers * (threads // 32))
    by_shared = SHARED_PER_SM // fn.shared if fn.shared else CTAS_PER_SM
    return max(0, min(CTAS_PER_SM, THREADS_PER_SM // threads, by_registers, by_shared))


def predict(gpu: Gpu, *, instructions_total: float, mufu_total: float, work: Work, ctas: int) -> tuple[float, str]:
    """(seconds, bounding resource) for one launch on `gpu`."""
    balance = (ctas / gpu.sms) / math.ceil(ctas / gpu.sms) if ctas else 1.0
    times = {
        "memory": work.bytes / gpu.bandwidth,
        "L2": work.l2_bytes / gpu.l2_bandwidth,
        "issue": instructions_total / (gpu.issue_rate * balance),
        "MUFU": mufu_total / (gpu.mufu_rate * balance),
        "tensor": work.flops / (gpu.tensor_flops * balance),
    }
    bound = max(times, key=times.get)
    return times[bound] + LAUNCH_S, bound


def analyse(op, backend, variant, shape, fn: Function, *, threads, ctas, work: Work, per_thread_units) -> Row:
    """A Row from a kernel's SASS and its work. per_thread_units: elements each thread handles per
    pass of the straight-line code or of one loop iteration (for per-element figures), or 0."""
    body = fn.loop_body(work.loop_marker) if work.trips > 1 or work.loop_marker else []
    body_count = fn.count(body)
    idle = fn.other_loops(work.loop_marker) if work.main_loop_only else []
    dynamic = fn.count() - fn.count(idle) + body_count * (work.trips - 1)
    mufu_static = sum(n for op_, n in fn.histogram().items() if op_.startswith("MUFU"))
    mufu_static -= sum(n for op_, n in fn.histogram(idle).items() if op_.startswith("MUFU"))
    mufu_body = sum(n for op_, n in fn.histogram(body).items() if op_.startswith("MUFU"))
    mufu = mufu_static + mufu_body * (work.trips - 1)
    unit_instructions = body_count if body else fn.count()
    unit_mufu = mufu_body if body else mufu_static
    per_unit = unit_instructions / per_thread_units if per_thread_units else unit_instructions
    mufu_per_unit = unit_mufu / per_thread_units if per_thread_units else unit_mufu
    per_mflop = 0.0
    if work.flops:
        per_mflop = dynamic * threads * ctas / (work.flops / 1e6)
    times = {}
    for gpu in (H200, H100):
        times[gpu.name] = predict(gpu, instructions_total=dynamic * threads * ctas, mufu_total=mufu * threads * ctas,
                                  work=work, ctas=ctas)
    widths = sorted({access_bytes(o) for o in fn.memory_ops(body if work.main_loop_only else None)})
    return Row(op, backend, variant, shape, fn.registers, fn.stack, fn.shared, ctas, ctas_per_sm(fn, threads), widths,
               dynamic, per_unit, per_mflop, mufu_per_unit, work.bytes, work.flops, work.elements,
               times["H200"][0] * 1e6, times["H100"][0] * 1e6, times["H200"][1])


# ----------------------------------------------------------------------------------------------
# The workloads: DESIGN.md's shapes, bf16 activations.

LINEAR_SHAPES = [(8192, 768, 3072), (8192, 4096, 11008), (512, 4096, 4096), (64, 4096, 4096), (16, 4096, 4096),
                 (1, 4096, 4096)]  # M x K -> N
GATE_SHAPES = [(4096, 11008), (768, 3072)]  # weight (N, K) of the gate passes
MASK_DENSITY = 0.005  # the paper's 0.5%
SWITCH_ENTRIES = 1_680_000  # BERT-large's 335M parameters at 0.5%, its 393 tensors in one launch
BF16 = torch.bfloat16


def _meta(*shape, dtype=torch.float32):
    return torch.empty(*shape, dtype=dtype, device="meta")


@dataclass
class Case:
    """One call of a launcher (or one modelled torch step): its launches' rows and their sum."""

    op: str
    shape: str
    rows: list[Row]

    def us(self, gpu: Gpu) -> float:
        return sum(r.h200_us if gpu is H200 else r.h100_us for r in self.rows)


def _variant(launch) -> str:
    c = launch.constants
    parts = [f"{k}={v}" for k, v in c.items() if k.startswith("BLOCK") or k == "EPILOGUE_SPLIT"]
    return ", ".join(parts + [f"w{launch.num_warps}"])


def run_launcher(op: str, shape: str, call, work_of, units_of=lambda launch: 0, *, per_config=False) -> list[Case]:
    """Compile the launches of `call()` and model each: one Case per call, or one per autotuning
    config (per_config: the configs of one autotuned launch, each its own Case)."""
    with compile_launches() as launches:
        call()
    rows = [analyse(op, "triton", _variant(launch), shape, launch.function(), threads=launch.threads,
                    ctas=launch.ctas, work=work_of(launch), per_thread_units=units_of(launch)) for launch in launches]
    if not per_config:
        return [Case(op, shape, rows)]
    # The autotuned kernel's configs, each with the launches that follow it (split-K's slice sum).
    tuned = launches[0].kernel
    extra = [r for launch, r in zip(launches, rows, strict=True) if launch.kernel != tuned]
    return [Case(op, shape, [r] + extra) for launch, r in zip(launches, rows, strict=True) if launch.kernel == tuned]


def modelled(op: str, shape: str, *, bytes=0.0, flops=0.0) -> Case:
    """A torch step (cuBLAS GEMM, a copy) that has no kernel of ours: bytes at the DRAM rate and
    FLOPs at the tensor rate, one launch."""
    row = Row(op, "torch (model)", "", shape, 0, 0, 0, 0, 0, [], 0, 0, 0, 0, bytes, flops, 0,
              *(1e6 * (max(bytes / g.bandwidth, flops / g.tensor_flops) + LAUNCH_S) for g in (H200, H100)),
              "tensor" if flops else "memory")
    return Case(op, shape, [row])


def _elementwise(launch) -> int:
    return launch.constants["BLOCK"] // launch.threads


def _gate_case(op: str, n_out: int, k_in: int, *, backward: bool, training=True, apply=True,
               gate=(-1.5, 1.5, 1.0)) -> Case:
    """One Triton gate pass over an (n_out, k_in) weight: bf16 base and output, fp32 diff and log_alpha."""
    gates = importlib.import_module("dpkernels.backends.triton.gates")
    n = n_out * k_in
    if backward:  # g (bf16), diff, log_alpha in; grad_diff, grad_log_alpha out; with the L0 term
        nbytes = 2 + 4 + 4 + 4 + 4

        def call():
            gates.gate_backward(_meta(n, dtype=BF16), _meta(n), _meta(n), 5, 0, training, *gate, 1e-3)
    else:  # log_alpha (+ diff, base) in; the effective weight (bf16) or z (fp32) out
        nbytes = 4 + 4 + 2 + 2 if apply else 4 + 4
        theta0 = dict(theta0=_meta(n, dtype=BF16), diff=_meta(n), out_dtype=BF16) if apply else {}

        def call():
            gates.gate_forward(_meta(n), 5, 0, training, *gate, **theta0)
    (case,) = run_launcher(op, f"{n_out}x{k_in}", call, lambda _: Work(bytes=n * nbytes, elements=n), _elementwise)
    return case


def gate_cases() -> list[Case]:
    cases = []
    for n_out, k_in in GATE_SHAPES:
        for training in (True, False):
            mode = "train" if training else "eval"
            cases.append(_gate_case(f"gate_forward {mode} apply bf16", n_out, k_in, backward=False,
                                    training=training))
            cases.append(_gate_case(f"gate_backward {mode} bf16 g, L0", n_out, k_in, backward=True,
                                    training=training))
        cases.append(_gate_case("gate_forward train z (sample_gates)", n_out, k_in, backward=False, apply=False))
        cases.append(_gate_case("gate_forward train apply bf16, beta=2/3", n_out, k_in, backward=False,
                                gate=(-0.1, 1.1, 2 / 3)))
    return cases


# DESIGN.md, H100: a plain autotuned Triton GEMM took 1.25 ms where cuBLAS took 0.96 ms at
# 8192 x 4096 -> 11008: Triton's tl.dot kernels reach 77% of the tensor rate the model assumes.
TRITON_TENSOR_EFFICIENCY = path_cost.TRITON_TENSOR_EFFICIENCY


@contextlib.contextmanager
def _fp32_matmul_precision(precision: str):
    """torch's fp32 matmul precision ("tf32" or "ieee"), which the fused kernels follow, for the block."""
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    matmul.fp32_precision = precision
    try:
        yield
    finally:
        matmul.fp32_precision = before


def fused_matmul_work(m: int, p: int, q: int, *, size: int = 2, flops: float):
    """Work of each launch of the fused forward / dX GEMM (M, Q) @ W-as-(Q, P), activations and base
    in `size` bytes, for run_launcher: the weight (base, fp32 diff and log_alpha) read from DRAM
    once and re-read from L2 by every row block after the first, the activations once, the output
    written (split-K: each slice's fp32 partial products, then summed in order by _slice_sum_kernel)."""
    weight = p * q * (size + 4 + 4)

    def work(launch):
        if launch.kernel == "_slice_sum_kernel":
            return Work(bytes=m * p * (4 * launch.constants["SLICES"] + size), elements=m * p)
        c, slices = launch.constants, launch.grid[1]  # split-K: each slice runs 1/slices of the reduction
        rebuilds = math.ceil(m / c["BLOCK_M"])
        return Work(bytes=weight + size * m * q + m * p * (size if slices == 1 else 4 * slices),
                    l2_bytes=(rebuilds - 1) * weight, flops=flops,
                    trips=math.ceil(math.ceil(q / c["BLOCK_Q"]) / slices))
    return work


def fused_cases(m: int, k: int, n: int, dtype=BF16) -> dict[str, list[Case]]:
    """Each fused GEMM's every autotuning config at M x K -> N (one Case per config), activations
    and base in `dtype` (fp32: TF32 dots, as torch's default fp32_precision="tf32" would take)."""
    diff_linear = importlib.import_module("dpkernels.backends.triton.diff_linear")
    shape = f"{m}x{k}->{n}" + ("" if dtype == BF16 else f" {str(dtype).split('.')[-1]}")
    size = torch.finfo(dtype).bits // 8
    flops = 2.0 * m * n * k / TRITON_TENSOR_EFFICIENCY  # tensor work at the rate Triton reaches
    if dtype == torch.float32:
        flops *= 2  # TF32 runs at half the bf16 rate

    return {
        "forward": run_launcher("gated_linear forward (fused)", shape, lambda: diff_linear.gated_linear(
            _meta(m, k, dtype=dtype), _meta(n, k, dtype=dtype), _meta(n, k), _meta(n, k), _meta(n, dtype=dtype), 5, 0,
            True, -1.5, 1.5, 1.0), fused_matmul_work(m, n, k, size=size, flops=flops), per_config=True),
        "dX": run_launcher("gated_linear dX (fused)", shape, lambda: diff_linear.gated_linear_grad_input(
            _meta(m, n, dtype=dtype), _meta(n, k, dtype=dtype), _meta(n, k), _meta(n, k), 5, 0, True, -1.5, 1.5, 1.0),
                           fused_matmul_work(m, k, n, size=size, flops=flops), per_config=True),
        "dW": run_launcher("gated_linear dW routed (fused)", shape, lambda: diff_linear.gated_linear_grad_weight(
            _meta(m, n, dtype=dtype), _meta(m, k, dtype=dtype), _meta(n, k), _meta(n, k), 5, 0, True, -1.5, 1.5, 1.0,
            1e-3), lambda launch: Work(bytes=n * k * 16 + size * m * (n + k), flops=flops,
                                       trips=math.ceil(m / launch.constants["BLOCK_M"])), per_config=True),
    }


def sddmm_case(m: int, k: int, n: int, density: float = MASK_DENSITY) -> Case:
    """The Triton sddmm's launches at M x K -> N, plus the transpose of X it makes (a torch copy).

    Per launch of T tokens: the chunks of dY and X^T come from DRAM once; from L2, each entry's
    X^T row (2 B a token) and, per program and token, the 32-byte sectors of dY that its entries'
    rows span (sorted entries: about BLOCK_J / (density K) neighbouring rows; the program's warps
    share them through L1)."""
    module = importlib.import_module("dpkernels.backends.triton.sddmm")
    shape = f"{m}x{k}->{n}, {density:.1%}"
    nnz = round(density * n * k)

    def work(launch):
        tokens = launch.scalars["m_end"] - launch.scalars["m_start"]
        block_j = launch.constants["BLOCK_J"]
        row_span = 2 * (block_j / (density * k) + 1)  # bytes of dY per token under one program
        dy_l2 = math.ceil(nnz / block_j) * tokens * 32 * (math.ceil(row_span / 32) + 1)
        return Work(bytes=2 * tokens * (n + k) + nnz * (8 + 4 + 4), l2_bytes=nnz * tokens * 2 + dy_l2,
                    trips=math.ceil(tokens / launch.constants["BLOCK_M"]))

    choice = module.gathers_cheaper
    module.gathers_cheaper = lambda *shape: True  # the kernel's launches, whatever the launcher would pick
    try:
        (case,) = run_launcher(f"sddmm (fixed mask, {density:.1%})", shape, lambda: module.sddmm(
            _meta(m, n, dtype=BF16), _meta(m, k, dtype=BF16), _meta(nnz, dtype=torch.int64), k), work)
    finally:
        module.gathers_cheaper = choice
    transpose = modelled("transpose X (sddmm's input)", shape, bytes=2 * 2 * m * k)
    return Case(case.op, shape, transpose.rows + case.rows)


def scatter_cases() -> list[Case]:
    scatter = importlib.import_module("dpkernels.backends.triton.scatter")
    e = SWITCH_ENTRIES
    table, ids, index, values = (_meta(393, dtype=torch.int64), _meta(e, dtype=torch.int32),
                                 _meta(e, dtype=torch.int32), _meta(e))
    saved = _meta(e, dtype=BF16)
    # Per entry: id, index, value (4 B each), the saved base (2 B); the target read and written:
    # a scattered 2-byte access costs a 32-byte sector each way.
    shape = f"{e} entries"
    return (run_launcher("scatter_apply bf16 (switch in)", shape,
                         lambda: scatter.scatter_apply(None, table, ids, index, values, None, saved),
                         lambda _: Work(bytes=e * (4 + 4 + 4 + 2 + 2 * 32), elements=e), _elementwise)
            + run_launcher("scatter_restore bf16 (switch out)", shape,
                           lambda: scatter.scatter_restore(None, table, ids, index, None, saved),
                           lambda _: Work(bytes=e * (4 + 4 + 2 + 2 * 32), elements=e), _elementwise))


# ----------------------------------------------------------------------------------------------
# The CUDA extension's kernels, from its sm_90 build (dpkernels/_C).

# Mangled-name fragment: (op, DRAM bytes per element, the opcode prefix that marks the kernel's hot
# loop). The gate kernels are the paper's configuration unless the op says otherwise: training,
# beta = 1 (GateMode 2, kTrainBetaOne; 1 is kTrain, 0 kEval), the backward with the fused L0 term and
# fresh gradients (template flags kHasL0 = true, kAccumulate = false). Their hot loop is the one
# over whole aligned packs, the one holding the 16-byte loads (LDG.E.128); the scalar loop after it
# (the n % 4 tail, or misaligned tensors) does not run for these shapes.
_CUDA_KERNELS = {
    "gate_forward_kernelI13__nv_bfloat16S2_Lb1ELNS_8GateModeE2EE": ("gate_forward apply bf16", 12, "LDG.E.128"),
    "gate_forward_kernelI13__nv_bfloat16S2_Lb1ELNS_8GateModeE0EE": ("gate_forward eval apply bf16", 12, "LDG.E.128"),
    "gate_forward_kernelI13__nv_bfloat16S2_Lb1ELNS_8GateModeE1EE": ("gate_forward apply bf16, beta=2/3", 12,
                                                                    "LDG.E.128"),
    "gate_forward_kernelIffLb0ELNS_8GateModeE2EE": ("gate_forward z (sample_gates)", 8, "LDG.E.128"),
    "gate_backward_kernelI13__nv_bfloat16LNS_8GateModeE2ELb1ELb0EE": ("gate_backward bf16 g", 18, "LDG.E.128"),
    "gate_backward_kernelI13__nv_bfloat16LNS_8GateModeE0ELb1ELb0EE": ("gate_backward eval bf16 g", 18, "LDG.E.128"),
    # per entry as scatter_cases: id, index, value, the saved base, a 32-byte sector each way at the target
    "scatter_kernelItiLb1E": ("scatter_apply bf16 (switch in)", 4 + 4 + 4 + 2 + 2 * 32, "LDG"),
    "scatter_kernelItiLb0E": ("scatter_restore bf16 (switch out)", 4 + 4 + 2 + 2 * 32, "LDG"),
}
CUDA_VEC = 4  # csrc/packs.cuh kVec: elements per pack, one pack per grid-stride iteration
CUDA_THREADS = 256
CUDA_BLOCKS_PER_SM = 8  # csrc/bindings.cpp max_blocks_for_current_device: the grid's cap is 8 blocks per SM


def _extension_path() -> str | None:
    spec = importlib.util.find_spec("dpkernels._C")
    return spec.origin if spec is not None else None


def cuda_cases() -> list[Case]:
    """The extension's gate kernels at 4096 x 11008 and its scatter over BERT-large's switch: the hot
    grid-stride loop's body (see _CUDA_KERNELS) counted per pack of CUDA_VEC elements."""
    path = _extension_path()
    if path is None:
        return []
    functions = disassemble(path)
    n = 4096 * 11008
    cases = []
    for fragment, (op, per_element, hot_loop) in _CUDA_KERNELS.items():
        matches = [f for name, f in functions.items() if fragment in name]
        if len(matches) != 1:
            raise RuntimeError(f"the CUDA extension has {len(matches)} kernels matching {fragment!r}, not one")
        scatter = op.startswith("scatter")
        elements = SWITCH_ENTRIES if scatter else n
        shape = f"{elements} entries" if scatter else "4096x11008"
        # The launch as bindings.cpp makes it: a block per 256 packs, capped at 8 blocks per SM (both
        # GPUs have 132), the grid-stride loop taking the rest.
        packs = math.ceil(elements / CUDA_VEC)
        ctas = min(math.ceil(packs / CUDA_THREADS), CUDA_BLOCKS_PER_SM * H200.sms)
        trips = math.ceil(packs / (ctas * CUDA_THREADS))
        work = Work(bytes=elements * per_element, elements=elements, trips=trips, loop_marker=hot_loop,
                    main_loop_only=not scatter)
        cases.append(Case(op, shape, [analyse(op, "cuda", f"kVec={CUDA_VEC}, {CUDA_THREADS} threads", shape,
                                              matches[0], threads=CUDA_THREADS, ctas=ctas, work=work,
                                              per_thread_units=CUDA_VEC)]))
    return cases


# ----------------------------------------------------------------------------------------------
# DESIGN.md's per-layer targets (fwd + bwd incl. the L0 gradient, bf16), predicted.


@dataclass
class Target:
    shape: str
    provider: str
    h100_us: float
    h200_us: float
    linear_h100_us: float
    target: float | None  # ratio to nn.Linear on an H100 (DESIGN.md's targets are H100 figures); None: none set
    steps: str

    @property
    def ratio(self) -> float:
        return self.h100_us / self.linear_h100_us

    @property
    def met(self) -> bool | None:
        return None if self.target is None else self.ratio <= self.target


def layer_targets(fused: dict, sddmm: dict, gates_by_shape: dict) -> list[Target]:
    """nn.Linear (3 cuBLAS GEMMs) against each diff-pruning path, per DESIGN.md shape."""
    out = []
    for m, k, n in LINEAR_SHAPES:
        shape = f"{m}x{k}->{n}"
        # Each of the three GEMMs reads two of (W, X, dY) and writes the third, bf16.
        gemm = modelled("GEMM", shape, flops=2.0 * m * n * k, bytes=2.0 * (n * k + m * k + m * n))
        linear = [gemm] * 3
        apply_, route = gates_by_shape[(n, k)]
        unfused = [apply_] + linear + [route]
        fwd, dx, dw = (min(fused[shape][part], key=lambda c: c.us(H200)) for part in ("forward", "dX", "dW"))
        masked_weight = modelled("masked weight (theta0 copy + scatter)", shape,
                                 bytes=n * k * (2 + 2) + round(MASK_DENSITY * n * k) * (8 + 4 + 2 * 32))
        fixed = None
        if shape in sddmm:
            gathers, dense, launcher_picks_gathers = sddmm[shape]
            fixed = [masked_weight, gemm, gemm, gathers if launcher_picks_gathers else dense]
        fused_forward, fused_wgrad = importlib.import_module("dpkernels.path_cost").auto_paths(
            m, n, k, training=True, input_grad=True, gate_grad=True)
        auto = (([fwd, dx] if fused_forward else [apply_, gemm, gemm])
                + ([dw] if fused_wgrad else [gemm, route]))
        paths = {"unfused (gate pass + cuBLAS + routing pass)": unfused,
                 "fused (gates inside Triton GEMMs)": [fwd, dx, dw],
                 "auto (ops.diff_linear's choice)": auto}
        if fixed:
            paths["fixed-mask stage (0.5%)"] = fixed
        linear_h100 = sum(c.us(H100) for c in linear)
        out.append(Target(shape, "nn.Linear (full finetuning)", linear_h100, sum(c.us(H200) for c in linear),
                          linear_h100, 1.0, "3 GEMMs"))
        for name, steps in paths.items():
            # DESIGN.md: <= 1.10x at M = 8192, <= 2.0x at M = 512; fixed-mask steps faster than nn.Linear.
            target = 1.0 if name.startswith("fixed") else {8192: 1.10, 512: 2.0}.get(m)
            out.append(Target(shape, name, sum(c.us(H100) for c in steps), sum(c.us(H200) for c in steps),
                              linear_h100, target, " + ".join(c.op for c in steps)))
    return out


@dataclass
class StepTarget:
    what: str
    predicted: float
    target: float
    unit: str
    how: str

    @property
    def met(self) -> bool:
        return self.predicted <= self.target


# BERT-large (DESIGN.md's whole-model target): 24 layers, hidden 1024, FFN 4096, vocab 30522.
BERT_LARGE_LINEAR = 24 * (4 * 1024 * 1024 + 2 * 4096 * 1024)  # Q, K, V, O and the FFN's two
BERT_LARGE_PARAMS = 335_141_888  # every pretrained parameter (all gated), the head aside
BERT_LARGE_TENSORS = 393  # gated tensors (the paper's groups)
FULL_FT_MS, FULL_FT_GB, LORA_MS = 78.0, 8.7, 125.2  # DESIGN.md: H100, batch 32 x 128, bf16 autocast, AdamW


def model_step_targets(gates_by_shape: dict) -> list[StepTarget]:
    """DESIGN.md's whole-model targets predicted from its measured full-finetuning step (H100) plus
    what diff pruning adds by the model: per gated parameter one gate-apply pass (12 B) and one
    routing pass (18 B) at the gate kernels' predicted rate, AdamW over twice the parameters (diff
    and log_alpha: +28 B read and written per parameter) and the per-group norm (+4 B), two more
    launches per gated tensor. The GEMMs are full finetuning's (the unfused path). Host-side
    dispatch is not modelled (issue #17 measures it on the CPU)."""
    apply_, route = gates_by_shape[(11008, 4096)]
    per_element_s = (apply_.us(H100) + route.us(H100) - 2 * LAUNCH_S * 1e6) * 1e-6 / (11008 * 4096)
    gates_ms = BERT_LARGE_PARAMS * per_element_s * 1e3
    optimizer_ms = BERT_LARGE_PARAMS * (28 + 4) / H100.bandwidth * 1e3
    launches_ms = 2 * BERT_LARGE_TENSORS * LAUNCH_S * 1e3
    step = FULL_FT_MS + gates_ms + optimizer_ms + launches_ms
    # Memory: full finetuning holds fp32 weights, grads and two AdamW states (16 B per parameter) and
    # its activations; diff pruning the fp32 base (4 B), diff and log_alpha with grads and AdamW
    # states (24 B), the same activations, and per linear layer the bf16 effective weight saved for dX.
    activations_gb = FULL_FT_GB - BERT_LARGE_PARAMS * 16 / 1e9
    memory = activations_gb + BERT_LARGE_PARAMS * (4 + 24) / 1e9 + BERT_LARGE_LINEAR * 2 / 1e9
    return [
        StepTarget("BERT-large step / full finetuning (H100)", step / FULL_FT_MS, 1.15, "x",
                   f"{FULL_FT_MS} ms + gate passes {gates_ms:.1f} ms + AdamW and norms over diff and log_alpha "
                   f"{optimizer_ms:.1f} ms + launches {launches_ms:.1f} ms = {step:.1f} ms"),
        StepTarget("BERT-large step / LoRA r=16 (H100)", step / LORA_MS, 1.0, "x", f"{step:.1f} ms vs {LORA_MS} ms"),
        StepTarget("BERT-large peak memory (GB)", memory, FULL_FT_GB + BERT_LARGE_PARAMS * 20 / 1e9, "GB",
                   f"activations {activations_gb:.1f} + state 28 B/param + saved bf16 W "
                   f"{BERT_LARGE_LINEAR * 2 / 1e9:.1f}; target: full finetuning + 20 B/param"),
    ]


# ----------------------------------------------------------------------------------------------
# Everything, and the output.


@dataclass
class Report:
    cases: list[Case]
    targets: list[Target]
    sddmm_choices: dict  # shape -> whether the launcher picks its gathers (over GEMM + gather) at 0.5%
    step_targets: list[StepTarget]

    @property
    def rows(self) -> list[Row]:
        return [r for c in self.cases for r in c.rows]


def fp32_fused_cases(precision: str) -> list[Case]:
    """The fused GEMMs with fp32 activations at 512 x 4096 -> 4096: TF32 dots (held to no spill) or
    IEEE dots (reported only)."""
    with _fp32_matmul_precision(precision):
        parts = fused_cases(512, 4096, 4096, torch.float32)
    cases = [case for part in parts.values() for case in part]
    for case in cases:
        case.op += f" fp32-{precision}"
        for row in case.rows:
            row.op = case.op
    return cases


def _gate_pair(n: int, k: int) -> tuple[Case, Case]:
    return (_gate_case("gate_forward train apply bf16", n, k, backward=False),
            _gate_case("gate_backward train bf16 g, L0", n, k, backward=True))


def _in_worker(fn, *args):
    os.environ["DPKERNELS_AUTOTUNE"] = "1"  # every autotuning config (a test run's conftest sets 0)
    return fn(*args)


def collect(workers: int | None = None) -> Report:
    """Every case, compiled by `workers` processes (default: one per CPU, at most 4); the compiles
    are independent, and a fresh Triton cache makes them most of the run."""
    import concurrent.futures
    import multiprocessing

    workers = workers or min(4, os.cpu_count() or 1)
    sddmm_module = importlib.import_module("dpkernels.backends.triton.sddmm")
    weights = sorted({(n, k) for _, k, n in LINEAR_SHAPES})
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        submit = lambda fn, *args: pool.submit(_in_worker, fn, *args)  # noqa: E731
        jobs = {"gates": submit(gate_cases), "scatter": submit(scatter_cases), "cuda": submit(cuda_cases),
                "fp32": [submit(fp32_fused_cases, p) for p in ("tf32", "ieee")],
                "pairs": {w: submit(_gate_pair, *w) for w in weights},
                "fused": {(m, k, n): submit(fused_cases, m, k, n) for m, k, n in LINEAR_SHAPES},
                "sddmm": {(m, k, n): submit(sddmm_case, m, k, n) for m, k, n in LINEAR_SHAPES if m >= 512}}
        cases = jobs["gates"].result()
        gates_by_shape = {w: job.result() for w, job in jobs["pairs"].items()}
        fused, sddmm = {}, {}
        for (m, k, n), job in jobs["fused"].items():
            shape = f"{m}x{k}->{n}"
            fused[shape] = job.result()
            cases += [c for part in fused[shape].values() for c in part]
            if (m, k, n) in jobs["sddmm"]:
                nnz = round(MASK_DENSITY * n * k)
                gathers = jobs["sddmm"][(m, k, n)].result()
                dense = modelled("dense dY^T X GEMM (cuBLAS)", shape, flops=2.0 * m * n * k,  # fp32 out, gathered
                                 bytes=2.0 * m * (n + k) + 4.0 * n * k + nnz * (8 + 4 + 32))
                sddmm[shape] = (gathers, dense, sddmm_module.gathers_cheaper(m, n, k, nnz))
                cases += [gathers, dense]
        for job in jobs["fp32"]:
            cases += job.result()
        cases += jobs["scatter"].result() + jobs["cuda"].result()
    choices = {shape: picks for shape, (_, _, picks) in sddmm.items()}
    return Report(cases, layer_targets(fused, sddmm, gates_by_shape), choices, model_step_targets(gates_by_shape))


COLUMNS = ("kernel", "regs", "spill B", "smem KB", "CTAs/SM", "access B", "B/elem", "instr/unit", "MUFU/unit",
           "instr/MFLOP", "H200 us", "H100 us", "bound")


def kernel_table(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        cells = [r.name, r.registers, r.stack, f"{r.shared / 1024:.0f}", r.ctas_per_sm,
                 "/".join(map(str, r.global_access_bytes)), f"{r.bytes / r.elements:.0f}" if r.elements else "",
                 f"{r.per_unit:.0f}", f"{r.mufu_per_unit:.1f}",
                 f"{r.per_mflop:.0f}" if r.per_mflop else "", f"{r.h200_us:.1f}", f"{r.h100_us:.1f}", r.bound]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines)


def target_table(targets: list[Target]) -> str:
    lines = ["| shape | provider | H100 us | x nn.Linear | target | met | H200 us | steps |", "|" + "---|" * 8]
    for t in targets:
        target = "" if t.target is None else f"{t.target:.2f}"
        met = "" if t.met is None else ("yes" if t.met else "no")
        lines.append(f"| {t.shape} | {t.provider} | {t.h100_us:.0f} | {t.ratio:.2f} | {target} | {met} | "
                     f"{t.h200_us:.0f} | {t.steps} |")
    return "\n".join(lines)


def summary_rows(report: Report) -> list[Row]:
    """The rows RESULTS.md shows: gate passes and CUDA kernels at the large shape, each fused GEMM's
    best config per shape (bf16), the sddmm's launches summed, the switch."""
    rows = []
    for case in report.cases:
        first = case.rows[0]
        if first.backend == "cuda" or (first.op.startswith("gate_") and case.shape == "4096x11008") \
                or first.op.startswith("scatter"):
            rows += case.rows
        elif case.op.startswith("sddmm"):
            kernel = [r for r in case.rows if r.backend == "triton"]
            launches = f"{len(kernel)} launch" + ("es" if len(kernel) > 1 else "")
            merged = Row(**{**asdict(kernel[0]), "variant": f"{launches} + the transpose of X",
                            "h200_us": case.us(H200), "h100_us": case.us(H100)})
            rows.append(merged)
    best: dict[tuple[str, str], Row] = {}
    for r in report.rows:
        if r.op.startswith("gated_linear") and r.shape.count(" ") == 0:
            key = (r.op, r.shape)
            if key not in best or r.h200_us < best[key].h200_us:
                best[key] = r
    return rows + list(best.values())


def step_table(targets: list[StepTarget]) -> str:
    lines = ["| target | predicted | bound | met | how |", "|---|---|---|---|---|"]
    for t in targets:
        lines.append(f"| {t.what} | {t.predicted:.2f} {t.unit} | <= {t.target:.2f} {t.unit} | "
                     f"{'yes' if t.met else 'no'} | {t.how} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.static", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write the rows and targets as JSON to this file")
    parser.add_argument("--workers", type=int, help="compiling processes (default: one per CPU, at most 4)")
    parser.add_argument("--summary", action="store_true",
                        help="only the rows RESULTS.md shows (the best config of each fused GEMM, ...)")
    args = parser.parse_args(argv)
    report = collect(args.workers)
    print("Predicted per launch (sm_90 builds; a model, not a measurement):\n")
    print(kernel_table(summary_rows(report) if args.summary else report.rows))
    print("\nPredicted per layer, forward + backward (DESIGN.md's targets are ratios on an H100):\n")
    print(target_table(report.targets))
    print("\nPredicted per training step (DESIGN.md's measured full-finetuning step + the model's additions):\n")
    print(step_table(report.step_targets))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": [asdict(r) | {"name": r.name} for r in report.rows],
                       "cases": [{"op": c.op, "shape": c.shape, "backend": c.rows[-1].backend, "h200_us": c.us(H200),
                                  "h100_us": c.us(H100)} for c in report.cases],
                       "targets": [asdict(t) | {"ratio": t.ratio, "met": t.met} for t in report.targets],
                       "steps": [asdict(t) | {"met": t.met} for t in report.step_targets],
                       "sddmm_choices": report.sddmm_choices, "gpus": {g.name: asdict(g) for g in (H200, H100)}},
                      f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
