"""benchmarks.static's machinery on the diff-linear paths, for tests/test_path_cost.py: run in a
fresh process without TRITON_INTERPRET (it compiles for sm_90); prints one JSON object.

Every fused-GEMM launch at DESIGN.md's layers (every autotuning config, split-K as the launcher
picks it) and the gate passes are compiled as the runtime would compile them and predicted by
benchmarks.static.analyse, with the traffic dpkernels.path_cost assumes (its Work below); the
instruction counts, CTAs and loop trips are the compiled kernels'.
"""

from __future__ import annotations

import json
import math
import sys

import torch

from benchmarks import static
from benchmarks.sass import compile_launches
from dpkernels import path_cost
from dpkernels.backends.triton import diff_linear

BF16 = torch.bfloat16
_meta = static._meta  # meta tensors: launchers run on them, nothing is allocated
WEIGHTS = [(4096, 4096), (11008, 4096), (3072, 768)]  # (N, K) of DESIGN.md's layers
TOKENS = [1, 16, 64, 512, 8192]
EFFICIENCY = path_cost.TRITON_TENSOR_EFFICIENCY
SPILLS: dict[str, int] = {}  # stack bytes per thread of any launch that spills


def _rows(op, call, work_of, units_of=lambda launch: 0):
    with compile_launches() as launches:
        call()
    rows = []
    for launch in launches:
        fn = launch.function()  # benchmarks.sass caches the disassembly per cubin: the shapes share them
        if fn.stack:
            SPILLS[f"{launch.kernel} {launch.constants}"] = fn.stack
        rows.append((launch, static.analyse(op, "triton", launch.kernel, "", fn, threads=launch.threads,
                                            ctas=launch.ctas, work=work_of(launch),
                                            per_thread_units=units_of(launch))))
    return rows


def _matmul(m, p, q, call):
    """(best config's H200 us incl. the slice sum, its slices, its CTAs, per-config instructions per
    rebuilt element)."""
    rows = _rows("gated_linear", call, static.fused_matmul_work(m, p, q, flops=2.0 * m * p * q / EFFICIENCY))
    tiles = [(launch, row) for launch, row in rows if launch.kernel == "_gated_matmul_kernel"]
    sums = [row.h200_us for launch, row in rows if launch.kernel == "_slice_sum_kernel"]
    launch, best = min(tiles, key=lambda lr: lr[1].h200_us)
    per_element = {_name(lc): row.per_unit * lc.threads / (lc.constants["BLOCK_P"] * lc.constants["BLOCK_Q"])
                   for lc, row in tiles}
    return best.h200_us + sum(sums), launch.grid[1], best.ctas, per_element


def _name(launch) -> str:
    c = launch.constants
    return f"{c['BLOCK_M']}x{c['BLOCK_P']}x{c['BLOCK_Q']} w{launch.num_warps}"


def _gate_passes(n: int, k: int) -> tuple[float, float]:
    """H200 us of the gate-apply pass writing W in bf16 and of the routing pass (bf16 dW, with L0)."""
    return tuple(static._gate_case("gate", n, k, backward=backward).us(static.H200) for backward in (False, True))


def _fused(m: int, n: int, k: int, training: bool = True):
    """The fused forward's, dX's and weight gradient's predictions at M x K -> N."""
    weight = (_meta(n, k, dtype=BF16), _meta(n, k), _meta(n, k))
    fwd = _matmul(m, n, k, lambda: diff_linear.gated_linear(
        _meta(m, k, dtype=BF16), *weight, _meta(n, dtype=BF16), 5, 0, training, -1.5, 1.5, 1.0))
    if not training:
        return fwd
    dx = _matmul(m, k, n, lambda: diff_linear.gated_linear_grad_input(
        _meta(m, n, dtype=BF16), *weight, 5, 0, True, -1.5, 1.5, 1.0))
    wgrad = [row for _, row in _rows("wgrad", lambda: diff_linear.gated_linear_grad_weight(
        _meta(m, n, dtype=BF16), _meta(m, k, dtype=BF16), _meta(n, k), _meta(n, k), 5, 0, True, -1.5, 1.5, 1.0,
        1e-3), lambda launch: static.Work(bytes=16 * n * k + 2 * m * (n + k), flops=2.0 * m * n * k / EFFICIENCY,
                                          trips=math.ceil(m / launch.constants["BLOCK_M"])))]
    return fwd, dx, min(wgrad, key=lambda r: r.h200_us)


def main() -> int:
    report = {"gpu": {"sms": static.H200.sms, "issue_rate": static.H200.issue_rate,
                      "bandwidth": static.H200.bandwidth, "l2_bandwidth": static.H200.l2_bandwidth,
                      "tensor_flops": static.H200.tensor_flops, "launch_s": static.LAUNCH_S},
              "per_element": {}, "shapes": []}
    for n, k in WEIGHTS:
        apply_us, route_us = _gate_passes(n, k)
        for m in TOKENS:
            fwd, dx, wgrad = _fused(m, n, k)
            report["shapes"].append(dict(
                m=m, n=n, k=k, forward_us=fwd[0], forward_slices=fwd[1], forward_ctas=fwd[2], dx_us=dx[0],
                dx_slices=dx[1], dx_ctas=dx[2], wgrad_us=wgrad.h200_us, wgrad_h100_us=wgrad.h100_us,
                gate_apply_us=apply_us, gate_backward_us=route_us))
            if (m, n, k) == (64, 4096, 4096):
                report["per_element"]["forward train"], report["per_element"]["dX train"] = fwd[3], dx[3]
    report["per_element"]["forward eval"] = _fused(64, 4096, 4096, training=False)[3]  # eval gates: no draw
    report["spills"] = SPILLS
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
