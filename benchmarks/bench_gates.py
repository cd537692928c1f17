"""Gate kernels alone: one-pass gate-apply (theta0 + z*w -> compute dtype) and gate-backward.

Elementwise and memory-bound, so the figure of merit is bandwidth: bytes moved per element are
forward 2 + 4 + 4 + 2 (bf16 theta0, fp32 w and log_alpha, bf16 out) and backward
2 + 4 + 4 + 4 + 4 (bf16 g in; fp32 w, log_alpha in; fp32 grads out). The ``copy`` provider is the
yardstick: one ``copy_`` moving the same bytes (half read, half written), the bandwidth the gate
kernels should reach (DESIGN.md section 3).

    python -m benchmarks.bench_gates [--device cuda] [--shapes 4096x11008,768x3072]
"""

from __future__ import annotations

import argparse
import os

import torch

from benchmarks.common import (
    check_providers,
    cuda_extension_loads,
    dims_list,
    environment,
    measure,
    print_table,
    write_rows,
)
from dpkernels.backends import load

DEFAULT_SHAPES = "768x3072,4096x4096,4096x11008"
GATES = (-1.5, 1.5, 1.0)  # l, r, beta
BYTES_PER_ELEMENT = {"forward": 12, "backward": 18}
PROVIDERS = ("torch", "triton", "cuda", "copy")


def _copy(nbytes: int, device: str):
    """A copy_ of nbytes from one buffer to another (reads and writes nbytes each)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_(0, 256)
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


def run(device: str, shapes: list[tuple[int, int]], providers: list[str]) -> list[dict]:
    env = environment(device)
    rows = []
    for n, k in shapes:
        gen = torch.Generator().manual_seed(0)
        theta0 = torch.randn(n, k, generator=gen).to(device, torch.bfloat16)
        w = (torch.randn(n, k, generator=gen) * 0.01).to(device)
        la = (torch.randn(n, k, generator=gen) * 2).to(device)
        g = torch.randn(n, k, generator=gen).to(device, torch.bfloat16)
        for provider in providers:
            if provider == "copy":
                cases = {mode: (_copy(n * k * bytes_per_element // 2, device), bytes_per_element)
                         for mode, bytes_per_element in BYTES_PER_ELEMENT.items()}
            else:
                backend = load(provider)

                def forward(backend=backend, la=la, theta0=theta0, w=w):
                    return backend.gate_forward(la, 7, 0, True, *GATES, theta0=theta0, diff=w,
                                                out_dtype=torch.bfloat16)

                def backward(backend=backend, g=g, w=w, la=la):
                    return backend.gate_backward(g, w, la, 7, 0, True, *GATES, 1e-3)

                cases = {"forward": (forward, BYTES_PER_ELEMENT["forward"]),
                         "backward": (backward, BYTES_PER_ELEMENT["backward"])}
            for mode, (fn, bytes_per_element) in cases.items():
                ms, q20, q80, peak = measure(fn, device)
                rows.append(dict(op="gates", provider=provider, mode=mode, shape=f"{n}x{k}", dtype="bf16", ms=ms,
                                 ms_q20=q20, ms_q80=q80, peak_mb=peak, gbps=bytes_per_element * n * k / ms / 1e6,
                                 **env))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shapes", type=dims_list("NxK"), default=DEFAULT_SHAPES,
                        help="comma list of NxK weight shapes")
    parser.add_argument("--providers", default=None,
                        help="comma list of torch,triton,cuda,copy (default: all on CUDA, cuda when the extension "
                             "is built; torch on CPU)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "out"))
    args = parser.parse_args(argv)
    if args.device != "cuda":
        print("bench_gates: no CUDA device; running the torch provider only, as a smoke test (CPU times say "
              "nothing about the GPU kernels)")
    providers = (args.providers or ("torch,triton,copy" if args.device == "cuda" else "torch")).split(",")
    check_providers(parser, providers, PROVIDERS)
    if args.providers is None and args.device == "cuda" and cuda_extension_loads("bench_gates"):
        providers.insert(2, "cuda")
    rows = run(args.device, args.shapes, providers)
    print_table(rows)
    print("wrote", *write_rows(rows, args.out, "bench_gates"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
