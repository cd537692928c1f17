"""Static performance model of every GPU kernel, from its sm_90 build: speed checked without a GPU.

    python -m benchmarks.static [--json FILE] [--write-results]

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
import json
import math
import os
import sys
from dataclasses import asdict, dataclass

if os.environ.get("TRITON_INTERPRET") == "1":  # before triton's import: the real compiler, not numpy
    sys.exit("benchmarks.static compiles the real kernels: run it without TRITON_INTERPRET=1")

import torch  # noqa: E402

from benchmarks.sass import Function, access_bytes, compile_launches, disassemble  # noqa: E402


@dataclass(frozen=True)
class Gpu:
    name: str
    sms: int
    clock_hz: float  # sustained SM clock under load
    bandwidth: float  # DRAM bytes/s the model uses (a copy's measured rate where known)
    peak_bandwidth: float  # the datasheet's
    tensor_flops: float  # dense bf16 FLOP/s reached by a large GEMM
    l2_bandwidth: float  # L2 -> SM bytes/s (a lead, not measured here)

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
# L2 bandwidth: ~5.5 TB/s, published microbenchmarks of an H100, a lead for both.
H200 = Gpu("H200", 132, 1.98e9, 4.3e12, 4.8e12, 788e12, 5.5e12)
H100 = Gpu("H100", 132, 1.755e9, 2.9e12, 3.35e12, 676e12, 5.5e12)
LAUNCH_S = 2e-6  # per kernel launch, back to back on one stream (a lead)
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
    dynamic = fn.count() + body_count * (work.trips - 1)
    mufu_static = sum(n for op_, n in fn.histogram().items() if op_.startswith("MUFU"))
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
    widths = sorted({access_bytes(o) for o in fn.memory_ops()})
    return Row(op, backend, variant, shape, fn.registers, fn.stack, fn.shared, ctas, ctas_per_sm(fn, threads), widths,
               dynamic, per_unit, per_mflop, mufu_per_unit, work.bytes, work.flops, times["H200"][0] * 1e6,
               times["H100"][0] * 1e6, times["H200"][1])


# ----------------------------------------------------------------------------------------------
# The workloads: DESIGN.md's shapes.

LINEAR_SHAPES = [(8192, 768, 3072), (8192, 4096, 11008), (512, 4096, 4096), (64, 4096, 4096), (16, 4096, 4096),
                 (1, 4096, 4096)]  # M x K -> N
GATE_SHAPES = [(4096, 11008), (768, 3072)]  # weight (N, K) of the gate passes
MASK_DENSITY = 0.005
SIZE = {torch.bfloat16: 2, torch.float16: 2, torch.float32: 4}


def _meta(*shape, dtype=torch.float32):
    return torch.empty(*shape, dtype=dtype, device="meta")


def _triton_rows() -> list[Row]:
    import importlib

    # The modules (the package's names sddmm, ... are the launcher functions).
    diff_linear, gates, scatter, sddmm = (importlib.import_module(f"dpkernels.backends.triton.{m}")
                                          for m in ("diff_linear", "gates", "scatter", "sddmm"))
    rows = []

    def record(op, shape, work_of, launch_fn, units_of):
        with compile_launches() as launches:
            launch_fn()
        for launch in launches:
            fn = launch.function()
            c = launch.constants
            variant = ", ".join(f"{k}={v}" for k, v in c.items() if k.startswith("BLOCK") or k == "EPILOGUE_SPLIT")
            variant = (variant + f", w{launch.num_warps}").lstrip(", ")
            rows.append(analyse(op, "triton", variant, shape, fn, threads=launch.threads, ctas=launch.ctas,
                                work=work_of(launch), per_thread_units=units_of(launch)))

    bf16 = torch.bfloat16
    for n_out, k_in in GATE_SHAPES:
        n = n_out * k_in
        shape = f"{n_out}x{k_in}"
        elementwise = lambda launch: launch.constants["BLOCK"] // launch.threads  # noqa: E731
        for training in (True, False):
            mode = "train" if training else "eval"
            record(f"gate_forward {mode} apply bf16", shape, lambda _: Work(bytes=n * (4 + 4 + 2 + 2), elements=n),
                   lambda t=training: gates.gate_forward(_meta(n), 5, 0, t, -1.5, 1.5, 1.0, theta0=_meta(n, dtype=bf16),
                                                         diff=_meta(n), out_dtype=bf16), elementwise)
            record(f"gate_backward {mode} bf16 g, L0", shape, lambda _: Work(bytes=n * (2 + 4 + 4 + 4 + 4), elements=n),
                   lambda t=training: gates.gate_backward(_meta(n, dtype=bf16), _meta(n), _meta(n), 5, 0, t, -1.5, 1.5,
                                                          1.0, 1e-3), elementwise)
        record("gate_forward train z (sample_gates)", shape, lambda _: Work(bytes=n * 8, elements=n),
               lambda: gates.gate_forward(_meta(n), 5, 0, True, -1.5, 1.5, 1.0), elementwise)
        record("gate_forward train apply bf16, beta=2/3", shape, lambda _: Work(bytes=n * 12, elements=n),
               lambda: gates.gate_forward(_meta(n), 5, 0, True, -0.1, 1.1, 2 / 3, theta0=_meta(n, dtype=bf16),
                                          diff=_meta(n), out_dtype=bf16), elementwise)

    for m, k, n in LINEAR_SHAPES:
        shape = f"{m}x{k}->{n}"
        weight_bytes = n * k * (2 + 4 + 4)  # theta0 (bf16), diff, log_alpha
        flops = 2.0 * m * n * k

        def gemm_work(launch, reduction, out_elems):
            c = launch.constants
            if launch.kernel == "_slice_sum_kernel":  # split-K: the fp32 slices summed in order
                return Work(bytes=out_elems * (4 * c["SLICES"] + 2), elements=out_elems)
            slices = launch.grid[1]  # split-K: each slice's CTAs run 1/slices of the reduction, write fp32
            block = c.get("BLOCK_Q") or c.get("BLOCK_M")
            out_bytes = out_elems * (2 if slices == 1 else 4 * slices)
            return Work(bytes=weight_bytes + 2 * m * k + out_bytes, flops=flops,
                        trips=math.ceil(math.ceil(reduction / block) / slices))

        record("gated_linear forward (fused)", shape, lambda launch: gemm_work(launch, k, m * n),
               lambda: diff_linear.gated_linear(_meta(m, k, dtype=bf16), _meta(n, k, dtype=bf16), _meta(n, k),
                                                _meta(n, k), _meta(n, dtype=bf16), 5, 0, True, -1.5, 1.5, 1.0),
               lambda launch: 0)
        record("gated_linear dX (fused)", shape, lambda launch: gemm_work(launch, n, m * k),
               lambda: diff_linear.gated_linear_grad_input(_meta(m, n, dtype=bf16), _meta(n, k, dtype=bf16),
                                                           _meta(n, k), _meta(n, k), 5, 0, True, -1.5, 1.5, 1.0),
               lambda launch: 0)
        record("gated_linear dW routed (fused)", shape,
               lambda launch: Work(bytes=n * k * 16 + 2 * m * (n + k), flops=flops,
                                   trips=math.ceil(m / launch.constants["BLOCK_M"])),
               lambda: diff_linear.gated_linear_grad_weight(_meta(m, n, dtype=bf16), _meta(m, k, dtype=bf16),
                                                            _meta(n, k), _meta(n, k), 5, 0, True, -1.5, 1.5, 1.0,
                                                            1e-3),
               lambda launch: 0)
        nnz = round(MASK_DENSITY * n * k)
        record(f"sddmm (fixed mask, {MASK_DENSITY:.1%})", shape, lambda launch: sddmm_work(m, n, k, nnz),
               lambda: sddmm.sddmm(_meta(m, n, dtype=bf16), _meta(m, k, dtype=bf16), _meta(nnz, dtype=torch.int64),
                                   k), lambda launch: 0)

    entries = 1_700_000  # BERT-large's 393 tensors at 0.5% (335M parameters)
    table = _meta(393, dtype=torch.int64)
    ids, index, values = _meta(entries, dtype=torch.int32), _meta(entries, dtype=torch.int32), _meta(entries)
    saved = _meta(entries, dtype=bf16)
    per_entry = lambda launch: launch.constants["BLOCK"] // launch.threads  # noqa: E731
    record("scatter_apply bf16 (switch in)", f"{entries} entries",
           lambda _: Work(bytes=entries * (4 + 4 + 4 + 2 + 2 + 2 + 2 * 30), elements=entries),
           lambda: scatter.scatter_apply(None, table, ids, index, values, None, saved), per_entry)
    record("scatter_restore bf16 (switch out)", f"{entries} entries",
           lambda _: Work(bytes=entries * (4 + 4 + 2 + 2 * 30), elements=entries),
           lambda: scatter.scatter_restore(None, table, ids, index, None, saved), per_entry)
    return rows


def sddmm_work(m: int, n: int, k: int, nnz: int) -> Work:
    """The sampled dY^T X: dY (M, N) and X (M, K) read from DRAM once; each entry's M-long dot reads
    its X column and dY column again from L2 (2 B each per token, bf16); 2 M nnz FLOPs on CUDA cores."""
    return Work(bytes=2 * m * (n + k) + nnz * (8 + 4), l2_bytes=nnz * m * 2 * 2)


def dense_gemm_us(gpu: Gpu, m: int, n: int, k: int) -> float:
    """cuBLAS-like GEMM time: FLOPs at the measured tensor rate (+ one launch)."""
    return (2.0 * m * n * k / gpu.tensor_flops + LAUNCH_S) * 1e6


# ----------------------------------------------------------------------------------------------
# The CUDA extension's kernels, from its sm_90 build.

_CUDA_KERNELS = {
    # mangled-name fragment: (op, work per element in bytes, kernel's elements per loop iteration)
    "gate_forward_kernelI13__nv_bfloat16S2_Lb1E": ("gate_forward apply bf16", 12),
    "gate_forward_kernelIffLb0E": ("gate_forward z (sample_gates)", 8),
    "gate_backward_kernelI13__nv_bfloat16E": ("gate_backward bf16 g", 18),
    "scatter_kernelItiLb1E": ("scatter_apply bf16 (switch in)", 18 + 60),
    "scatter_kernelItiLb0E": ("scatter_restore bf16 (switch out)", 10 + 60),
}
CUDA_VEC = 4  # csrc/packs.cuh kVec: elements per pack, one pack per grid-stride iteration
CUDA_THREADS = 256


def _extension_path() -> str | None:
    import importlib.util

    spec = importlib.util.find_spec("dpkernels._C")
    return spec.origin if spec is not None else None


def _cuda_rows() -> list[Row]:
    path = _extension_path()
    if path is None:
        return []
    rows = []
    functions = disassemble(path)
    n = 4096 * 11008
    for fragment, (op, per_element) in _CUDA_KERNELS.items():
        matches = [f for name, f in functions.items() if fragment in name]
        if not matches:
            raise RuntimeError(f"the CUDA extension has no kernel matching {fragment!r}")
        fn = matches[0]
        elements = 1_700_000 if op.startswith("scatter") else n
        ctas = math.ceil(elements / CUDA_VEC / CUDA_THREADS)
        trips = 1  # a grid-stride loop: with one pack per thread the loop body runs once
        work = Work(bytes=elements * per_element, elements=elements, trips=trips, loop_marker="LDG")
        rows.append(analyse(op, "cuda", f"kVec={CUDA_VEC}, {CUDA_THREADS} threads", "4096x11008"
                            if not op.startswith("scatter") else f"{elements} entries", fn, threads=CUDA_THREADS,
                            ctas=ctas, work=work, per_thread_units=CUDA_VEC))
    return rows


def collect() -> list[Row]:
    return _triton_rows() + _cuda_rows()


# ----------------------------------------------------------------------------------------------
# Output.

COLUMNS = ("kernel", "regs", "spill B", "smem KB", "CTAs/SM", "access B", "instr/unit", "MUFU/unit", "instr/MFLOP",
           "H200 us", "H100 us", "bound")


def table(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        cells = [r.name, r.registers, r.stack, f"{r.shared / 1024:.0f}", r.ctas_per_sm,
                 "/".join(map(str, r.global_access_bytes)), f"{r.per_unit:.0f}", f"{r.mufu_per_unit:.1f}",
                 f"{r.per_mflop:.0f}" if r.per_mflop else "", f"{r.h200_us:.1f}", f"{r.h100_us:.1f}", r.bound]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.static", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write the rows as JSON to this file")
    args = parser.parse_args(argv)
    rows = collect()
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) | {"name": r.name} for r in rows], f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
