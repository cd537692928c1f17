"""Compile every Triton kernel of dpkernels for sm_90 ahead of time (no GPU needed) and report, per
variant, its registers and stack bytes (spills) from the cubin. Run in a fresh process without
TRITON_INTERPRET (tests/test_triton_sm90.py does); prints one JSON object.

The variants are the launchers' real ones: every autotuning config of the fused diff-linear
kernels, the gate kernels' flag combinations, sddmm and scatter at their block sizes.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

# The modules (the package's names sddmm, ... are the launcher functions).
diff_linear, gates, scatter, sddmm = (importlib.import_module(f"dpkernels.backends.triton.{m}")
                                      for m in ("diff_linear", "gates", "scatter", "sddmm"))

TARGET = GPUTarget("cuda", 90, 32)
_FLOATS = {"l", "r", "beta", "l0_lambda", "l0_shift"}
_INT64 = {"seed", "offset"}


def _signature(kernel, pointers: dict[str, str], constexprs: dict) -> dict[str, str]:
    """Argument types by name: pointers as given, seed/offset i64, gate constants fp32, other ints i32."""
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = "*" + pointers[name]
        elif name in _FLOATS:
            sig[name] = "fp32"
        else:
            sig[name] = "i64" if name in _INT64 else "i32"
    return sig


def _resources(cubin: bytes) -> tuple[int, int]:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True, check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+)", out)
    return int(m.group(1)), int(m.group(2))


def _compile(kernel, pointers, constexprs, num_warps, num_stages=3):
    src = ASTSource(fn=kernel, signature=_signature(kernel, pointers, constexprs), constexprs=constexprs)
    compiled = triton.compile(src, target=TARGET, options=dict(num_warps=num_warps, num_stages=num_stages))
    return _resources(compiled.asm["cubin"])


def variants():
    """(name, kernel, pointer dtypes, constexprs, warps, stages) for every variant the launchers use."""
    # Activations: bf16, fp32 with TF32 dots (torch's allow_tf32) and fp32 with IEEE dots, whose
    # emulated fp32 MMA needs more registers than any tile here leaves (reported, not held to no spill).
    activations = (("bf16", "bf16", "tf32"), ("fp32-tf32", "fp32", "tf32"), ("fp32-ieee", "fp32", "ieee"))
    for label, act, precision in activations:
        gemm = dict(A_ptr=act, THETA0_ptr=act, DIFF_ptr="fp32", LA_ptr="fp32", BIAS_ptr=act, OUT_ptr=act)
        for bm, bp, bq, warps, stages in diff_linear._MATMUL_SIZES:
            const = dict(TRAINING=True, HAS_BIAS=True, DOT_FP32=False, PRECISION=precision, BLOCK_M=bm, BLOCK_P=bp,
                         BLOCK_Q=bq, GROUP_M=8)
            yield f"gated_matmul {label} {bm}x{bp}x{bq} w{warps}", diff_linear._gated_matmul_kernel, gemm, const, \
                warps, stages
        wgrad = dict(GY_ptr=act, X_ptr=act, DIFF_ptr="fp32", LA_ptr="fp32", GRAD_DIFF_ptr="fp32", GRAD_LA_ptr="fp32")
        for bn, bk, bm, split, warps, stages in diff_linear._WGRAD_SIZES:
            const = dict(TRAINING=True, HAS_L0=True, DOT_FP32=False, PRECISION=precision, EPILOGUE_SPLIT=split,
                         BLOCK_N=bn, BLOCK_K=bk, BLOCK_M=bm, GROUP_N=8)
            yield f"gated_wgrad {label} {bn}x{bk}x{bm} split{split} w{warps}", diff_linear._gated_wgrad_kernel, \
                wgrad, const, warps, stages
    for training in (True, False):
        yield f"gate_forward apply training={training}", gates._gate_forward_kernel, dict(
            LA_ptr="fp32", THETA0_ptr="bf16", DIFF_ptr="fp32", OUT_ptr="bf16"), dict(
            TRAINING=training, APPLY=True, BLOCK=gates._BLOCK), gates._NUM_WARPS, 3
        yield f"gate_backward training={training}", gates._gate_backward_kernel, dict(
            G_ptr="bf16", DIFF_ptr="fp32", LA_ptr="fp32", GRAD_DIFF_ptr="fp32", GRAD_LA_ptr="fp32"), dict(
            TRAINING=training, ACCUMULATE=False, HAS_L0=True, BLOCK=gates._BLOCK), gates._NUM_WARPS, 3
    yield "sddmm", sddmm._sddmm_row_kernel, dict(DYT_ptr="bf16", XT_ptr="bf16", COLS_ptr="i64", ROW_PTR_ptr="i64",
                                                 OUT_ptr="fp32"), dict(BLOCK_J=sddmm._BLOCK_J,
                                                                       BLOCK_M=sddmm._BLOCK_M), 4, 3
    entries = dict(TABLE_ptr="i64", IDS_ptr="i32", INDEX_ptr="i32")
    yield "scatter_apply bf16", scatter._scatter_apply_kernel, dict(entries, VALUES_ptr="fp32", SAVED_ptr="bf16"), \
        dict(IS_BF16=True, BLOCK=scatter._BLOCK), scatter._NUM_WARPS, 3
    yield "scatter_restore bf16", scatter._scatter_restore_kernel, dict(entries, SAVED_ptr="bf16"), \
        dict(BLOCK=scatter._BLOCK), scatter._NUM_WARPS, 3


def main() -> int:
    report = {}
    for name, kernel, pointers, constexprs, warps, stages in variants():
        try:
            regs, stack = _compile(kernel, pointers, constexprs, warps, stages)
            report[name] = {"registers": regs, "stack_bytes": stack}
        except Exception as exc:  # reported per variant; the test fails on any
            report[name] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
