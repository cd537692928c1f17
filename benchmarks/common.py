"""Shared benchmark plumbing: timing, peak memory, and one row schema for CSV/JSON.

Row schema (Liger-Kernel style): op, provider, mode, shape, dtype, ms (median), ms_q20, ms_q80,
peak_mb, gbps (bytes moved / median, where meaningful), device, torch, triton, date, commit, and
notes (optional free text: derived figures such as tokens/s or a target ratio, or why a row was
skipped; rows without it write an empty cell). On CUDA the times are triton.testing.do_bench
medians; on CPU a perf_counter loop (smoke runs only: CPU numbers say nothing about the kernels)
and peak_mb is NaN (no allocator statistics).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import subprocess
import tempfile
import time
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version

import torch
from torch.utils._python_dispatch import TorchDispatchMode

FIELDS = ["op", "provider", "mode", "shape", "dtype", "ms", "ms_q20", "ms_q80", "peak_mb", "gbps", "device",
          "torch", "triton", "date", "commit", "notes"]


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def _commit() -> str:
    """The source's git commit; DPKERNELS_COMMIT names it where the tree travelled without .git (the GPU box)."""
    if os.environ.get("DPKERNELS_COMMIT"):
        return os.environ["DPKERNELS_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=os.path.dirname(os.path.abspath(__file__)))
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def cuda_extension_loads(bench: str) -> bool:
    """Whether the cuda backend (dpkernels._C) loads, for a benchmark's default providers; says why not."""
    from dpkernels import backends

    try:
        backends.load("cuda")
    except backends.BackendUnavailable as exc:
        print(f"{bench}: no cuda provider ({exc})")
        return False
    return True


def environment(device: str) -> dict:
    try:
        triton_version = version("triton")
    except PackageNotFoundError:
        triton_version = None
    return {"device": device_name(device), "torch": torch.__version__, "triton": triton_version,
            "date": datetime.date.today().isoformat(), "commit": _commit()}


def measure(fn, device: str, *, warmup: int = 3, reps: int = 20, rep_ms: int = 100,
            total_peak: bool = False) -> tuple[float, float, float, float]:
    """(median ms, 20% quantile, 80% quantile, peak MB allocated during one call beyond the start).

    ``total_peak``: the peak including what was allocated before the call (weights, optimizer
    state: what a whole training step holds). ``rep_ms``: do_bench's time budget on CUDA (raise it
    for calls of tens of ms, or the quantiles rest on a handful of runs); ``warmup``/``reps``: the
    CPU loop's counts.
    """
    if device == "cuda":
        from triton.testing import do_bench

        fn()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start_mb = 0.0 if total_peak else torch.cuda.memory_allocated() / 2**20
        fn()
        torch.cuda.synchronize()
        peak_mb = torch.cuda.max_memory_allocated() / 2**20 - start_mb
        q20, med, q80 = do_bench(fn, rep=rep_ms, quantiles=[0.2, 0.5, 0.8])
        return med, q20, q80, peak_mb
    med, q20, q80 = time_interleaved({"fn": fn}, warmup=warmup, reps=reps)["fn"]
    return med, q20, q80, float("nan")


def time_interleaved(fns: dict[str, Callable[[], object]], *, warmup: int = 3,
                     reps: int = 20) -> dict[str, tuple[float, float, float]]:
    """{name: (median ms, 20% quantile, 80% quantile)} of CPU calls (perf_counter), the functions
    taking turns call by call: on a shared CPU a neighbour's load then falls on every function
    alike instead of on whichever ran during it. ``warmup`` untimed rounds first."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1e3)
    out = {}
    for name, ms in times.items():
        q20, med, q80 = torch.tensor(ms, dtype=torch.float64).quantile(
            torch.tensor([0.2, 0.5, 0.8], dtype=torch.float64)).tolist()
        out[name] = (med, q20, q80)
    return out


class AtenOpCounter(TorchDispatchMode):
    """Counts the ATen operator calls that reach the dispatcher below autograd while active:
    forward, backward (the autograd engine carries the mode to its threads) and optimizer alike,
    each composite op already decomposed. Custom ops (torch.library) count as one each."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def count_aten_ops(fn: Callable[[], object]) -> int:
    """ATen operator calls of one call of ``fn`` (:class:`AtenOpCounter`)."""
    with AtenOpCounter() as counter:
        fn()
    return counter.count


def count_kernel_launches(fn: Callable[[], object]) -> int:
    """CUDA kernels one call of ``fn`` runs: torch.profiler's trace events of category "kernel"
    (ATen's, cuBLAS's, Triton's and the CUDA extension's alike; memcpy and memset are not kernels).
    Raises RuntimeError when the profiler saw none (no CUPTI): a step always launches some."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    launches = sum(1 for e in events if str(e.get("cat", "")).lower() == "kernel")
    if launches == 0:
        raise RuntimeError("torch.profiler recorded no CUDA kernels (is CUPTI available?)")
    return launches


def check_providers(parser: argparse.ArgumentParser, providers: list[str], known: tuple[str, ...]) -> None:
    """An argparse error naming the providers that are not `known` (a typo would measure nothing or
    the wrong thing, found out only after the run)."""
    unknown = [p for p in providers if p not in known]
    if unknown:
        parser.error(f"unknown provider(s) {', '.join(unknown)}; choose from {', '.join(known)}")


def dims_list(form: str):
    """An argparse type for a comma list of `form` ("KxN": 2 positive integers joined by 'x', "M": one):
    "4096x11008,768x3072" -> [(4096, 11008), (768, 3072)]; anything else is an error naming the entry."""
    count = form.count("x") + 1

    def parse(text: str) -> list[tuple[int, ...]]:
        entries = []
        for entry in text.split(","):
            parts = entry.strip().split("x")
            if len(parts) != count or not all(p.isdigit() and int(p) > 0 for p in parts):
                raise argparse.ArgumentTypeError(f"{entry!r} is not {form} (positive integers)")
            entries.append(tuple(int(p) for p in parts))
        return entries

    return parse


def write_rows(rows: list[dict], out_dir: str, name: str) -> tuple[str, str]:
    """NAME.csv and NAME.json in out_dir, each written to a temporary file and renamed: a run killed
    mid-write (a time limit) leaves the previous complete file, never a truncated one."""
    os.makedirs(out_dir, exist_ok=True)
    csv_path, json_path = os.path.join(out_dir, f"{name}.csv"), os.path.join(out_dir, f"{name}.json")
    with open(csv_path + ".tmp", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    with open(json_path + ".tmp", "w") as f:
        json.dump(rows, f, indent=1)
    os.replace(csv_path + ".tmp", csv_path)
    os.replace(json_path + ".tmp", json_path)
    return csv_path, json_path


def print_table(rows: list[dict]) -> None:
    cols = ["op", "provider", "mode", "shape", "dtype", "ms", "ms_q20", "ms_q80", "peak_mb", "gbps"]
    if any(r.get("notes") for r in rows):
        cols.append("notes")
    cells = [[_fmt(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))


def _fmt(v) -> str:
    if isinstance(v, float):
        return "-" if v != v else f"{v:.4g}"
    return str(v)
