"""One linear layer, M tokens x K -> N, bf16 autocast, fp32 parameters: full finetuning vs diff pruning.

Providers:
    nn.Linear       full finetuning (the target to match)
    torch           dpkernels on its torch backend (reference gate math, eager)
    torch.compile   dpkernels.reference.diff_linear under torch.compile
    triton          dpkernels on its Triton backend, the path chosen by shape (DPKERNELS_DIFF_LINEAR=auto)
    triton-unfused  gate-apply kernel writing W in bf16, cuBLAS, cuBLAS dY^T X, gate-backward kernel
    triton-fused    gates drawn inside Triton GEMM tile loads; weight gradient routed in the GEMM epilogue
    triton-fused-forward, triton-fused-wgrad   one half fused, the other unfused (DPKERNELS_DIFF_LINEAR)
    triton-unfused-overlap   triton-unfused with the gate-backward pass on a side stream beside the dX
                    GEMM (DPKERNELS_OVERLAP_WGRAD=1; its rows decide whether that becomes the default)
    cuda            dpkernels on the compiled extension (gate kernels + cuBLAS), when it is built
    fixed-mask      after projection to 0.5%: W = theta0 + scatter(values), weight gradient only at
                    the mask (sddmm) -- the fixed-mask finetuning stage (Triton backend on CUDA)
    fixed-mask-overlap   fixed-mask with the sddmm on a side stream beside the dX GEMM
                    (DPKERNELS_OVERLAP_WGRAD=1)
Modes: forward, backward (the backward alone, graph retained; not for torch.compile, whose compiled
backward donates its saved buffers and so cannot run twice on one graph), full (forward +
backward; the L0 gradient included in the L0 stage). The fused/unfused pair at several token
counts is what calibrates dpkernels.path_cost, auto's model.

    python -m benchmarks.bench_diff_linear [--device cuda] [--tokens 64,512,8192] [--shapes 4096x11008]
    python -m benchmarks.bench_diff_linear --layers 8192x4096x11008,512x4096x4096 --providers nn.Linear,triton
"""

from __future__ import annotations

import argparse
import os
import time

import torch

import dpkernels
from benchmarks.common import (
    check_providers,
    cuda_extension_loads,
    dims_list,
    environment,
    measure,
    print_table,
    write_rows,
)
from dpkernels import ops, reference

DEFAULT_SHAPES = "768x3072,3072x768,1024x4096,4096x1024,4096x4096,4096x11008"
L0_LAMBDA = 1e-3
# The providers _providers builds, in its order.
PROVIDERS = ("nn.Linear", "torch", "torch.compile", "triton", *(f"triton-{path}" for path in ops._PATHS),
             "triton-unfused-overlap", "cuda", "fixed-mask", "fixed-mask-overlap")


def _providers(k: int, n: int, device: str):
    """name -> (module-like callable taking x, the trainable parameters)."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(k, n, device=device)
    layer = dpkernels.DiffLinear.from_linear(linear, l0_lambda=L0_LAMBDA)
    with torch.no_grad():
        layer.diff.normal_(0, 0.01)
        layer.log_alpha.normal_(0, 2)
    gated = [layer.diff, layer.log_alpha, layer.bias_diff, layer.bias_log_alpha]

    def step(module, backend, path="auto", overlap=False):
        """module(x) under the backend, diff-linear path and overlap switch named (read at each call)."""
        def fn(x):
            os.environ.update(DPKERNELS_BACKEND=backend, DPKERNELS_DIFF_LINEAR=path,
                              DPKERNELS_OVERLAP_WGRAD="1" if overlap else "0")
            return module(x), None
        return fn

    def reference_step(x, seed=1234):
        y = reference.diff_linear(x, layer.weight, layer.bias, layer.diff, layer.log_alpha, layer.bias_diff,
                                  layer.bias_log_alpha, seed=seed)
        return y, L0_LAMBDA * (reference.expected_l0(layer.log_alpha) + reference.expected_l0(layer.bias_log_alpha))

    # One code object serves every shape: without a reset dynamo's recompile limit (8) is reached
    # within the default shapes and the later "torch.compile" rows would silently run eager.
    torch._dynamo.reset()
    compiled = torch.compile(reference_step)
    fixed = dpkernels.DiffLinear.from_linear(linear)
    with torch.no_grad():
        fixed.diff.normal_(0, 0.01)
    dpkernels.project(fixed, 0.005)
    fixed_backend = "triton" if device == "cuda" else "torch"

    return {
        "nn.Linear": (lambda x: (linear(x), None), list(linear.parameters())),
        "torch": (step(layer, "torch"), gated),
        "torch.compile": (compiled, gated),
        "triton": (step(layer, "triton"), gated),
        **{f"triton-{path}": (step(layer, "triton", path), gated) for path in ops._PATHS},
        "triton-unfused-overlap": (step(layer, "triton", "unfused", overlap=True), gated),
        "cuda": (step(layer, "cuda"), gated),
        "fixed-mask": (step(fixed, fixed_backend), [fixed.diff_values, fixed.bias_diff_values]),
        "fixed-mask-overlap": (step(fixed, fixed_backend, overlap=True), [fixed.diff_values, fixed.bias_diff_values]),
    }


def run(device: str, layers: list[tuple[int, int, int]], providers: list[str], out: str | None = None) -> list[dict]:
    """The rows of each (M tokens, K, N) layer in turn; with `out`, the CSV/JSON are rewritten after
    each layer, so that a run stopped at a time limit keeps what it measured."""
    env = environment(device)
    rows = []
    start = time.perf_counter()
    available, built_for = None, None
    for m, k, n in layers:
        if built_for != (k, n):  # one set of modules per weight shape, shared by its token counts
            available, built_for = _providers(k, n, device), (k, n)
        x = torch.randn(m, k, device=device, requires_grad=True)
        gy = torch.randn(m, n, device=device, dtype=torch.bfloat16)
        for name in providers:
            fn, params = available[name]

            def forward(fn=fn, x=x):
                with torch.autocast(device_type=device, dtype=torch.bfloat16):
                    return fn(x)

            def graph(fn=fn, x=x, gy=gy):
                """(outputs, their gradients) of one forward; the compiled reference adds E[L0] to the loss."""
                y, penalty = forward(fn, x)
                if penalty is None:
                    return [y], [gy]
                return [y, penalty], [gy, torch.ones_like(penalty)]

            def backward(outputs, grads, params=params, x=x, retain=False):
                # autograd.grad, not .backward: no accumulation into .grad between repetitions
                return torch.autograd.grad(outputs, [x, *params], grads, retain_graph=retain)

            def full():
                return backward(*graph())

            def backward_only():
                outputs, grads = graph()
                return lambda: backward(outputs, grads, retain=True)

            for mode in ("forward", "backward", "full"):
                if mode == "backward" and name == "torch.compile":
                    # Its compiled backward donates saved buffers, which a retained graph
                    # forbids; turning donation off would raise its peak in the other rows.
                    continue
                case = forward if mode == "forward" else full if mode == "full" else backward_only()
                with torch.no_grad() if mode == "forward" else torch.enable_grad():
                    ms, q20, q80, peak = measure(case, device)
                del case  # the retained graph of the backward mode
                rows.append(dict(op="diff_linear", provider=name, mode=mode, shape=f"{m}x{k}->{n}",
                                 dtype="bf16-autocast", ms=ms, ms_q20=q20, ms_q80=q80, peak_mb=peak,
                                 gbps=float("nan"), **env))
        if out is not None:
            write_rows(rows, out, "bench_diff_linear")
        print(f"bench_diff_linear: {m}x{k}->{n} done, {time.perf_counter() - start:.0f} s", flush=True)
    for name in ("DPKERNELS_BACKEND", "DPKERNELS_DIFF_LINEAR", "DPKERNELS_OVERLAP_WGRAD"):
        os.environ.pop(name, None)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tokens", type=dims_list("M"), default="64,512,8192", help="comma list of token counts M")
    parser.add_argument("--shapes", type=dims_list("KxN"), default=DEFAULT_SHAPES,
                        help="comma list of KxN (in x out features), each at every --tokens count")
    parser.add_argument("--layers", type=dims_list("MxKxN"), default=None,
                        help="comma list of MxKxN (tokens x in x out), in this order, instead of --tokens x --shapes")
    parser.add_argument("--providers", default=None, help="default: all on CUDA; nn.Linear,torch on CPU")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "out"))
    args = parser.parse_args(argv)
    if args.device != "cuda":
        print("bench_diff_linear: no CUDA device; a CPU smoke run of nn.Linear and the torch backend only")
    gpu_default = "nn.Linear,torch,torch.compile,triton,triton-unfused,triton-fused,triton-fused-forward," \
        "triton-fused-wgrad,triton-unfused-overlap,fixed-mask,fixed-mask-overlap"
    default = gpu_default if args.device == "cuda" else "nn.Linear,torch"
    providers = (args.providers or default).split(",")
    check_providers(parser, providers, PROVIDERS)
    if args.providers is None and args.device == "cuda" and cuda_extension_loads("bench_diff_linear"):
        providers.append("cuda")
    layers = args.layers or [(m, k, n) for k, n in args.shapes for (m,) in args.tokens]
    rows = run(args.device, layers, providers, args.out)
    print_table(rows)
    print("wrote", *write_rows(rows, args.out, "bench_diff_linear"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
