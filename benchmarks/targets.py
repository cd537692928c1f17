"""DESIGN.md section 3's performance targets, judged from benchmark rows: the tables for RESULTS.md.

    python -m benchmarks.targets DIR [DIR ...]

DIRs hold bench_*.json files (``python -m benchmarks --out DIR``, or unpacked gpu_check bundles);
a later DIR's row replaces an earlier one with the same op, provider, mode, shape and dtype (a rerun
of some shapes). Only CUDA rows count: CPU smoke rows say nothing about the kernels. Prints two
Markdown tables: every target with its figure and verdict (met, MISSED, or not measured when a row
is absent), and the diff-linear paths side by side per token count, which is what calibrates
``dpkernels.path_cost`` (auto's model). The verdicts are computed here, from the rows, and never
typed by hand.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
from dataclasses import dataclass

# Layer level (bench_diff_linear: fwd+bwd incl. the L0 gradient, bf16 autocast, "full" mode).
LAYER_SHAPES = [(768, 3072), (3072, 768), (1024, 4096), (4096, 1024), (4096, 4096), (4096, 11008)]
LAYER_TARGETS = {8192: 1.10, 512: 2.0}  # DiffLinear time / nn.Linear time, per token count
FIXED_MASK_TARGET = 0.8  # fixed-mask DiffLinear / nn.Linear at M = 8192
FIXED_MASK_SHAPES = [(4096, 4096), (4096, 11008)]
PATHS = ["triton-unfused", "triton-fused", "triton-fused-forward", "triton-fused-wgrad", "triton-unfused-overlap"]
# Gate kernels (bench_gates): "at copy bandwidth", read as at least this fraction of a copy_ moving the same bytes.
GATES_SHAPE, COPY_FRACTION = "4096x11008", 0.9
SWITCH_MS, SWITCH_MODEL = 0.2, "bert L24 H1024"  # a whole BERT-large task switch (bench_switch)
# Mixed-task serving (bench_inference): a batch of 16 tasks through MultiTask / one task's merged forward.
SERVE_TARGET, SERVE_SHAPE = 1.10, "bert-base b64 s128"
# Whole model (bench_model_step; its targets file holds the memory verdicts).
MODEL_STEP_TARGET = 1.15
MODEL_MEMORY_BYTES = 20.0  # extra peak bytes per gated parameter (bench_model_step.MEMORY_TARGET_BYTES)


@dataclass
class Verdict:
    target: str
    figure: str
    met: bool | None  # None: not measured

    def cells(self) -> list[str]:
        status = "not measured" if self.met is None else "met" if self.met else "**MISSED**"
        return [self.target, self.figure, status]


def load_rows(dirs: list[str]) -> tuple[dict[tuple, dict], dict]:
    """(CUDA rows keyed by op, provider, mode, shape, dtype; the model-step targets file, if any)."""
    rows, model_targets = {}, {}
    for folder in dirs:
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"{folder}: no such folder")
        paths = sorted(glob.glob(os.path.join(folder, "bench_*.json")))
        if not paths:
            raise FileNotFoundError(f"{folder}: no bench_*.json rows (a benchmark run's --out folder)")
        for path in paths:
            try:
                with open(path) as f:
                    data = json.load(f)
                _add_rows(path, data, rows, model_targets)
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                raise ValueError(f"{path}: not a benchmark rows file ({type(exc).__name__}: {exc})") from None
    return rows, model_targets


def _add_rows(path: str, data, rows: dict, model_targets: dict) -> None:
    """One bench_*.json file's CUDA rows (and the model-step targets) into rows / model_targets."""
    if path.endswith("bench_model_step_targets.json") and not str(data.get("device", "")).startswith("cpu"):
        model_targets.setdefault("targets", {}).update(data["targets"])  # per shape, like the rows
        model_targets["memory_target_extra_bytes_per_gated_param"] = data["memory_target_extra_bytes_per_gated_param"]
    if not isinstance(data, list):  # the other summaries (bench_switch_size.json)
        return
    for row in data:
        if not str(row.get("device", "")).startswith("cpu"):
            rows[(row["op"], row["provider"], row["mode"], row["shape"], row["dtype"])] = row


def _field(rows, key, field) -> float | None:
    """A row's finite value of `field`, or None (no such row, or NaN: not measured)."""
    row = rows.get(key)
    return row[field] if row is not None and _finite(row.get(field)) else None


def _ms(rows, op, provider, mode, shape, dtype) -> float | None:
    return _field(rows, (op, provider, mode, shape, dtype), "ms")


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def _layer(m, k, n) -> str:
    return f"{m}x{k}->{n}"


def _ratio_verdict(target: str, num: float | None, den: float | None, bound: float, what: str) -> Verdict:
    if num is None or den is None:
        return Verdict(target, "", None)
    ratio = num / den
    return Verdict(target, f"{ratio:.2f}x ({num:.3g} / {den:.3g} ms {what})", ratio <= bound)


def layer_verdicts(rows) -> list[Verdict]:
    out = []
    for m, bound in LAYER_TARGETS.items():
        for k, n in LAYER_SHAPES:
            for provider in ("triton", "cuda"):
                num = _ms(rows, "diff_linear", provider, "full", _layer(m, k, n), "bf16-autocast")
                if num is None and provider == "cuda":
                    continue  # the extension's rows are optional
                den = _ms(rows, "diff_linear", "nn.Linear", "full", _layer(m, k, n), "bf16-autocast")
                out.append(_ratio_verdict(f"DiffLinear ({provider}) / nn.Linear, {_layer(m, k, n)}, <= {bound}",
                                          num, den, bound, "vs nn.Linear"))
    for k, n in FIXED_MASK_SHAPES:
        shape = _layer(8192, k, n)
        for provider in ("fixed-mask", "fixed-mask-overlap"):
            num = _ms(rows, "diff_linear", provider, "full", shape, "bf16-autocast")
            if num is None and provider == "fixed-mask-overlap":
                continue  # DPKERNELS_OVERLAP_WGRAD=1, an option: its rows are optional
            out.append(_ratio_verdict(f"{provider} / nn.Linear, {shape}, <= {FIXED_MASK_TARGET}", num,
                                      _ms(rows, "diff_linear", "nn.Linear", "full", shape, "bf16-autocast"),
                                      FIXED_MASK_TARGET, "vs nn.Linear"))
    return out


def layer_memory_verdicts(rows) -> list[Verdict]:
    """Peak of fwd+bwd: at most torch.compile's, and at most nn.Linear's plus diff's and log_alpha's fp32 grads."""
    out = []
    for k, n in LAYER_SHAPES:
        shape = _layer(8192, k, n)
        peak = {p: _field(rows, ("diff_linear", p, "full", shape, "bf16-autocast"), "peak_mb")
                for p in ("triton", "nn.Linear", "torch.compile")}
        target = f"peak MB, DiffLinear (triton) {shape}, <= torch.compile and <= nn.Linear + 8 B x K x N"
        if None in peak.values():
            out.append(Verdict(target, "", None))
            continue
        grads_mb = 8 * k * n / 2**20
        bound = min(peak["torch.compile"], peak["nn.Linear"] + grads_mb)
        out.append(Verdict(target, f"{peak['triton']:.0f} MB (torch.compile {peak['torch.compile']:.0f}, "
                                   f"nn.Linear {peak['nn.Linear']:.0f} + {grads_mb:.0f})", peak["triton"] <= bound))
    return out


def gate_verdicts(rows) -> list[Verdict]:
    out = []
    for mode in ("forward", "backward"):
        copy = _field(rows, ("gates", "copy", mode, GATES_SHAPE, "bf16"), "gbps")
        for provider in ("triton", "cuda"):
            gbps = _field(rows, ("gates", provider, mode, GATES_SHAPE, "bf16"), "gbps")
            if gbps is None and provider == "cuda":
                continue
            target = f"gate {mode} ({provider}) {GATES_SHAPE}, >= {COPY_FRACTION:.0%} of copy bandwidth"
            if gbps is None or copy is None:
                out.append(Verdict(target, "", None))
                continue
            out.append(Verdict(target, f"{gbps:.0f} GB/s ({gbps / copy:.0%} of copy_'s {copy:.0f})",
                               gbps >= COPY_FRACTION * copy))
    return out


def switch_verdicts(rows) -> list[Verdict]:
    out = []
    for key in sorted(rows):
        op, provider, _, shape, _ = key
        if op == "switch" and provider in ("triton", "cuda") and shape.startswith(SWITCH_MODEL + " "):
            target = f"task switch ({provider}), {shape}, <= {SWITCH_MS} ms"
            ms = _field(rows, key, "ms")
            out.append(Verdict(target, "", None) if ms is None else Verdict(target, f"{ms:.3g} ms", ms <= SWITCH_MS))
    return out or [Verdict(f"task switch, {SWITCH_MODEL}, <= {SWITCH_MS} ms", "", None)]


def serve_verdicts(rows) -> list[Verdict]:
    num = _ms(rows, "serve_mixed", "multitask", "eval", f"{SERVE_SHAPE} T16", "bfloat16")
    den = _ms(rows, "serve_mixed", "merged", "eval", f"{SERVE_SHAPE} T1", "bfloat16")
    return [_ratio_verdict(f"mixed batch of 16 tasks (MultiTask) / merged forward, {SERVE_SHAPE}, <= {SERVE_TARGET}",
                           num, den, SERVE_TARGET, "vs merged")]


def model_step_verdicts(rows, model_targets) -> list[Verdict]:
    out = []
    shapes = sorted({key[3] for key in rows if key[0] == "model_step"})
    for shape in shapes:
        ms = {p: _ms(rows, "model_step", p, "train", shape, "bf16-autocast") for p in ("full", "dpkernels", "lora")}
        target = f"model step dpkernels / full, {shape}, <= {MODEL_STEP_TARGET} and faster than LoRA"
        if ms["full"] is None or ms["dpkernels"] is None:
            out.append(Verdict(target, "", None))
        else:
            ratio = ms["dpkernels"] / ms["full"]
            lora = "" if ms["lora"] is None else f", LoRA {ms['lora'] / ms['full']:.2f}x"
            out.append(Verdict(target, f"{ratio:.2f}x ({ms['dpkernels']:.3g} / {ms['full']:.3g} ms{lora})",
                               ratio <= MODEL_STEP_TARGET and (ms["lora"] is None or ms["dpkernels"] < ms["lora"])))
        verdict = model_targets.get("targets", {}).get(shape, {}).get("dpkernels", {})
        bound = model_targets.get("memory_target_extra_bytes_per_gated_param", MODEL_MEMORY_BYTES)
        target = f"model step peak over full finetuning, {shape}, <= {bound:g} B per gated parameter"
        if "extra_bytes_per_gated_param" in verdict:
            out.append(Verdict(target, f"{verdict['extra_bytes_per_gated_param']:.1f} B",
                               verdict["meets_memory_target"]))
        else:
            out.append(Verdict(target, "", None))
    return out or [Verdict(f"model step dpkernels / full, <= {MODEL_STEP_TARGET}", "", None)]


def path_table(rows) -> list[list[str]]:
    """Per layer shape and token count: fwd+bwd ms of each diff-linear path and which is fastest."""
    table = []
    tokens = sorted({int(key[3].split("x", 1)[0]) for key in rows if key[0] == "diff_linear"})
    for k, n in LAYER_SHAPES:
        for m in tokens:
            times = {p: _ms(rows, "diff_linear", p, "full", _layer(m, k, n), "bf16-autocast") for p in PATHS}
            measured = {p: t for p, t in times.items() if t is not None}
            if not measured:
                continue
            auto = _ms(rows, "diff_linear", "triton", "full", _layer(m, k, n), "bf16-autocast")
            best = min(measured, key=measured.get)
            table.append([_layer(m, k, n), *(f"{t:.3g}" if t is not None else "-" for t in times.values()),
                          best, "-" if auto is None else f"{auto / measured[best]:.2f}"])
    return table


def markdown(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in body])


def report(dirs: list[str]) -> tuple[str, list[Verdict]]:
    rows, model_targets = load_rows(dirs)
    verdicts = (gate_verdicts(rows) + layer_verdicts(rows) + layer_memory_verdicts(rows) + switch_verdicts(rows)
                + serve_verdicts(rows) + model_step_verdicts(rows, model_targets))
    devices = sorted({r["device"] for r in rows.values()})
    commits = sorted({str(r.get("commit")) for r in rows.values()})
    dates = sorted({str(r.get("date")) for r in rows.values()})
    parts = [f"Rows from {', '.join(dirs)}: device {', '.join(devices) or 'none (no CUDA rows)'}, "
             f"date {', '.join(dates) or '-'}, commit {', '.join(commits) or '-'}.", "",
             markdown(["target", "measured", "verdict"], [v.cells() for v in verdicts])]
    paths = path_table(rows)
    if paths:
        parts += ["", "Diff-linear paths, fwd+bwd ms (bf16 autocast); auto/best: the auto path's time over the "
                      "fastest path's", "",
                  markdown(["M x K->N", *PATHS, "fastest", "auto/best"], paths)]
    return "\n".join(parts), verdicts


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.targets", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dirs", nargs="+", metavar="DIR", help="folders holding bench_*.json")
    args = parser.parse_args(argv)
    try:
        text, verdicts = report(args.dirs)
    except (OSError, ValueError, KeyError) as exc:
        parser.exit(2, f"{parser.prog}: error: {exc}\n")
    print(text)
    missed = sum(v.met is False for v in verdicts)
    absent = sum(v.met is None for v in verdicts)
    print(f"\n{len(verdicts) - missed - absent} met, {missed} missed, {absent} not measured")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
