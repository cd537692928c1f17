"""The benchmark suite in one command: every ``benchmarks/bench_*.py``, one table, CSV/JSON and plots.

    python -m benchmarks [NAMES...] [--device cuda|cpu] [--out DIR] [--quick] [--list] [--replot] [-- EXTRA ARGS]
    dpkernels bench      (the same, from a source checkout)

NAMES are benchmark names (``gates``, ``diff_linear``, ``switch``, ...: the ``bench_*.py`` files,
with or without the ``bench_`` prefix); none means all. Each benchmark runs as
``bench_NAME.main(["--device", DEVICE, "--out", DIR, *DEFAULTS, *EXTRA])``, so EXTRA (everything
after ``--``) overrides the defaults and goes to every benchmark named (with several, pass only
options they all take, such as ``--providers``).

On CUDA every benchmark runs its full GPU configuration. Without CUDA the suite runs the
CPU-meaningful subset, a smoke run that says so: the torch providers only, one BERT-base-sized
layer (768x3072) for the layer benchmarks, bench_switch's small model, and a tiny BERT (2 layers,
hidden 64, batch 4, sequence 32) for the whole-model step and inference -- CPU times prove the
code runs end to end and say nothing about the GPU kernels. ``--quick`` shrinks every benchmark to
toy sizes (seconds; what the tests run).

Writes, in --out: each benchmark's own ``bench_NAME.csv/json``, ``suite.csv/json`` (every row, the
schema of ``benchmarks/common.py``), and with matplotlib installed ``bench_NAME.png`` (median time
per shape, one line per provider, a panel per mode; plus peak memory on CUDA) and
``bench_NAME_speedup.png`` for the benchmarks with a dense baseline (bench_diff_linear: time relative
to nn.Linear; bench_model_step: relative to full finetuning). ``--replot`` runs nothing and writes
the suite files and plots from the bench_NAME.json already in --out (a GPU run's unpacked bundle).
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import pkgutil
import sys
import time
import traceback

import torch

HERE = os.path.dirname(os.path.abspath(__file__))

# Sizes of the CPU smoke subset and of --quick, per benchmark (benchmarks not listed run their own
# defaults, which must then be CPU-sized on CPU).
CPU_SMOKE = {
    "gates": ["--shapes", "768x3072"],
    "diff_linear": ["--tokens", "128", "--shapes", "768x3072"],
    "switch": [],  # bench_switch picks its small configuration on CPU itself
    "model_step": [],  # the model benchmarks pick their tiny preset on CPU themselves
    "inference": [],
}
QUICK = {
    "gates": ["--shapes", "16x24"],
    "diff_linear": ["--tokens", "4", "--shapes", "16x24"],
    "switch": ["--layers", "1", "--hidden", "32", "--heads", "2", "--vocab", "50"],
    "model_step": ["--models", "toy", "--reps", "2"],
    "inference": ["--models", "toy", "--reps", "2", "--serve-model", "toy", "--tasks", "1,2"],
}
# Provider whose time the others are divided by in bench_NAME_speedup.png (the dense baseline).
SPEEDUP_BASELINES = ("nn.Linear", "full")


def available() -> dict[str, str]:
    """{name: first line of the module docstring} for every benchmarks/bench_*.py."""
    found = {}
    for info in sorted(pkgutil.iter_modules([HERE]), key=lambda m: m.name):
        if info.name.startswith("bench_"):
            found[info.name.removeprefix("bench_")] = _summary_line(os.path.join(HERE, info.name + ".py"))
    return found


def _summary_line(path: str) -> str:
    try:
        with open(path) as f:
            text = f.read(4000)
    except OSError:
        return ""
    for quote in ('"""', "'''"):
        if text.lstrip().startswith(quote):
            body = text.lstrip()[3:]
            return body.split("\n", 1)[0].strip().rstrip(quote)
    return ""


def _normalise(name: str) -> str:
    name = name.strip().removesuffix(".py")
    name = os.path.basename(name)
    return name.removeprefix("bench_")


def _split_extra(argv: list[str]) -> tuple[list[str], list[str]]:
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


class _Parser(argparse.ArgumentParser):
    """One-line errors (``prog: error: message (see prog --help)``), exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = _Parser(prog=prog or "python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", metavar="NAME", help="benchmarks to run (default: all; see --list)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--out", default=os.path.join(HERE, "out"), help="output folder (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="toy sizes: a seconds-long check that everything runs")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    parser.add_argument("--replot", action="store_true",
                        help="run nothing: the table, suite.csv/json and plots from the bench_NAME.json already in "
                             "--out (a GPU run's bundle, say)")
    return parser


def main(argv=None, *, prog: str | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    head, extra = _split_extra(argv)
    parser = build_parser(prog)
    args = parser.parse_args(head)
    benches = available()
    if args.list:
        width = max(map(len, benches), default=0)
        for name, line in benches.items():
            print(f"{name.ljust(width)}  {line}")
        return 0
    names = [_normalise(n) for n in args.names] or list(benches)
    unknown = [n for n in names if n not in benches]
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(benches)}")
    if args.replot:
        if extra or args.quick or args.device:
            parser.error("--replot runs nothing: it takes no --device, --quick or arguments after --")
        found = [n for n in names if os.path.isfile(os.path.join(args.out, f"bench_{n}.json"))]
        if not found:
            parser.error(f"--replot: no bench_NAME.json for {', '.join(names)} in {args.out}")
        _summarise([row for name in found for row in _rows(name, args.out, not args.no_plots)], args.out)
        return 0
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: this torch sees no CUDA device")
    if device not in ("cuda", "cpu"):
        parser.error(f"--device must be cuda or cpu, got {device!r}")
    if args.quick:
        print(f"benchmark suite: --quick, toy sizes on {device} (checks that everything runs; the numbers mean "
              "nothing)")
    elif device == "cpu":
        print("benchmark suite: no CUDA device, so running the CPU smoke subset (torch providers only, one "
              "768x3072 layer, bench_switch's small model, a tiny BERT for the model step and inference); CPU "
              "times say nothing about the GPU kernels")
    else:
        print(f"benchmark suite: full GPU configuration on {torch.cuda.get_device_name()}")
    os.makedirs(args.out, exist_ok=True)

    all_rows, failed = [], {}
    for name in names:
        defaults = QUICK.get(name, []) if args.quick else (CPU_SMOKE.get(name, []) if device == "cpu" else [])
        bench_argv = ["--device", device, "--out", args.out, *defaults, *extra]
        print(f"\n== bench_{name} {' '.join(bench_argv)}", flush=True)
        start = time.perf_counter()
        argv0, sys.argv[0] = sys.argv[0], f"bench_{name}"  # the benchmark's argparse names itself
        try:
            module = importlib.import_module(f"benchmarks.bench_{name}")
            code = module.main(bench_argv)
        except SystemExit as exc:  # argparse inside a benchmark: a bad extra argument
            code = exc.code if isinstance(exc.code, int) else 2
        except Exception:
            traceback.print_exc()
            code = 1
        finally:
            sys.argv[0] = argv0
        print(f"== bench_{name}: {'ok' if code == 0 else f'FAILED (exit {code})'} in "
              f"{time.perf_counter() - start:.1f} s", flush=True)
        if code:
            failed[name] = code
            continue
        if os.path.isfile(os.path.join(args.out, f"bench_{name}.json")):
            all_rows += _rows(name, args.out, not args.no_plots)

    if all_rows:
        _summarise(all_rows, args.out)
    if failed:
        print(f"benchmark suite: {len(failed)} failed: {', '.join(failed)}", file=sys.stderr)
        return 2 if set(failed.values()) == {2} else 1  # 2: only bad arguments
    return 0


def _rows(name: str, out: str, plots: bool) -> list[dict]:
    """bench_NAME.json's rows, plotted unless told not to."""
    with open(os.path.join(out, f"bench_{name}.json")) as f:
        rows = json.load(f)
    if plots:
        plot(rows, name, out)
    return rows


def _summarise(rows: list[dict], out: str) -> None:
    from benchmarks.common import print_table, write_rows

    print("\n== all benchmarks")
    print_table(rows)
    print("wrote", *write_rows(rows, out, "suite"))


# ----------------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------------


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


_WARNED = []


def plot(rows: list[dict], name: str, out: str) -> list[str]:
    """bench_NAME.png (median ms per shape, a line per provider, a panel per mode; peak memory below
    when measured) and, where a dense baseline provider (SPEEDUP_BASELINES) ran, the time relative
    to it. Returns the paths."""
    plt = _pyplot()
    if plt is None:
        if not _WARNED:
            print("no plots: matplotlib is not installed (pip install matplotlib)")
            _WARNED.append(True)
        return []
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    has_memory = any(_finite(r.get("peak_mb")) for r in rows)
    n_rows = 2 if has_memory else 1
    fig, axes = plt.subplots(n_rows, len(modes), figsize=(4.5 * len(modes) + 1, 3.6 * n_rows), squeeze=False)
    for j, mode in enumerate(modes):
        shapes = _shapes(rows, mode)
        for metric, i, label in (("ms", 0, "median ms (log)"), ("peak_mb", 1, "peak MB")):
            if i >= n_rows:
                continue
            ax = axes[i][j]
            for provider in providers:
                points = {r["shape"]: r[metric] for r in rows if r["mode"] == mode and r["provider"] == provider
                          and _finite(r.get(metric))}
                xs = [k for k, s in enumerate(shapes) if s in points]
                if xs:
                    ax.plot(xs, [points[shapes[k]] for k in xs], marker="o", label=provider)
            ax.set_xticks(range(len(shapes)), shapes, rotation=30, ha="right", fontsize=8)
            if metric == "ms":
                ax.set_yscale("log")
            ax.set_title(f"{name}: {mode}" + (" (memory)" if i else ""), fontsize=10)
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
    for ax in axes[0]:  # a legend per mode: the modes may have different providers
        if ax.get_lines():
            ax.legend(fontsize=8)
    device = rows[0].get("device", "")
    fig.suptitle(f"bench_{name} on {device} ({rows[0].get('date', '')}, {rows[0].get('commit', '')})", fontsize=10)
    fig.tight_layout()
    paths = [os.path.join(out, f"bench_{name}.png")]
    fig.savefig(paths[0], dpi=120)
    plt.close(fig)
    baseline = next((b for b in SPEEDUP_BASELINES if any(r["provider"] == b for r in rows)), None)
    if baseline is not None:
        paths += _speedup_plot(plt, rows, name, out, modes, providers, baseline)
    return paths


def _shapes(rows: list[dict], mode: str) -> list[str]:
    """The shapes measured in `mode`, in row order (the x axis of that mode's panel)."""
    return list(dict.fromkeys(r["shape"] for r in rows if r["mode"] == mode))


def _speedup_plot(plt, rows, name, out, modes, providers, baseline) -> list[str]:
    fig, axes = plt.subplots(1, len(modes), figsize=(4.5 * len(modes) + 1, 3.6), squeeze=False)
    for j, mode in enumerate(modes):
        ax, shapes = axes[0][j], _shapes(rows, mode)
        base = {r["shape"]: r["ms"] for r in rows if r["mode"] == mode and r["provider"] == baseline}
        for provider in providers:
            if provider == baseline:
                continue
            xs, ys = [], []
            for k, shape in enumerate(shapes):
                ms = [r["ms"] for r in rows if r["mode"] == mode and r["provider"] == provider and r["shape"] == shape]
                if ms and shape in base and _finite(ms[0]) and base[shape] > 0:
                    xs.append(k)
                    ys.append(ms[0] / base[shape])
            if xs:
                ax.plot(xs, ys, marker="o", label=provider)
        ax.axhline(1.0, color="black", lw=1, ls="--", label=baseline)
        ax.set_xticks(range(len(shapes)), shapes, rotation=30, ha="right", fontsize=8)
        ax.set_yscale("log")
        ax.set_title(f"{name}: {mode}, time / {baseline}", fontsize=10)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(out, f"bench_{name}_speedup.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [path]


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


if __name__ == "__main__":
    raise SystemExit(main())
