"""Inference, BERT: a task switch next to LoRA's merge/unmerge, and eval forward merged vs unmerged.

Model: bench_model_step's BertForSequenceClassification presets with random weights, held in bf16
on CUDA (``large``: 24 layers, hidden 1024, 391 gated tensors plus the dense head; batch 32,
sequence 128) and in fp32 on CPU (``tiny``). Diffs are made as in bench_switch: diff_prune a copy,
random diff magnitudes, ``project`` to 0.5% globally, ``SparseDiff.from_model``.

op "switch" (mode "restore+apply"), one switch between two task models:
    dpkernels           TaskSwitcher.switch(A -> B): undo A, apply B, O(nnz) (one launch each on
                        CUDA with the Triton backend; bench_switch compares it with per-tensor loops)
    lora                peft LoRA r = 16 on every encoder Linear: merge_adapter() + unmerge_adapter(),
                        the work of switching merged LoRA tasks (skipped without peft)

op "model_forward" (mode "eval"), logits of one batch under torch.no_grad:
    merged              the plain base model with the SparseDiff applied (what serving runs)
    unmerged-l0         the diff-pruned model before projection, eval mode: every forward forms
                        theta0 + z_eval * w (DiffLinear, GatedParameter) from the dense diff
    unmerged-fixed-mask the projected model, eval mode: theta0 + scatter(values) per forward
    lora-unmerged       the peft model with its adapter unmerged (x W^T + x A^T B^T per Linear)

    python -m benchmarks.bench_inference [--device cuda] [--models large] [--sparsity 0.005]
"""

from __future__ import annotations

import itertools
import math
import os

import torch

import dpkernels
from benchmarks.bench_model_step import PRESETS, build_model, make_batch, parse_args, peft_missing
from benchmarks.bench_switch import make_diff, random_diff_model
from benchmarks.common import environment, measure, print_table, write_rows
from dpkernels import SparseDiff, TaskSwitcher

PROVIDERS = ("dpkernels", "lora", "merged", "unmerged-l0", "unmerged-fixed-mask", "lora-unmerged")
CUDA_REP_MS = 1000


def _row(op: str, provider: str, shape: str, fn, *, device: str, dtype: torch.dtype, env: dict, reps: int,
         notes: str = "") -> dict:
    """One row; fn None: not measured (NaN times), the notes say why."""
    r = dict(op=op, provider=provider, mode="restore+apply" if op == "switch" else "eval", shape=shape,
             dtype=str(dtype).removeprefix("torch."), ms=math.nan, ms_q20=math.nan, ms_q80=math.nan,
             peak_mb=math.nan, gbps=math.nan, **env, notes=notes)
    if fn is not None:
        ms, q20, q80, peak = measure(fn, device, reps=reps, rep_ms=CUDA_REP_MS)
        r.update(ms=ms, ms_q20=q20, ms_q80=q80, peak_mb=peak)
    return r


def run_preset(device: str, preset: str, providers: list[str], *, sparsity: float, batch: int | None = None,
               seq: int | None = None, reps: int = 10) -> list[dict]:
    env = environment(device)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    b, s = batch or PRESETS[preset]["batch"], seq or PRESETS[preset]["seq"]
    base = build_model(preset, device, dtype).eval().requires_grad_(False)
    inputs = make_batch(base.config.vocab_size, b, s, device)
    inputs.pop("labels")
    fwd_shape = f"bert-{preset} b{b} s{s}"
    switch_shape = f"bert-{preset} ({sum(1 for _ in base.parameters())} tensors)"
    rows = []

    def row(op, provider, fn, notes=""):
        rows.append(_row(op, provider, switch_shape if op == "switch" else fwd_shape, fn, device=device,
                         dtype=dtype, env=env, reps=reps, notes=notes))
        return rows[-1]

    def forward(model, provider, notes):
        if provider in providers:
            r = row("model_forward", provider, torch.no_grad()(lambda: model(**inputs).logits), notes)
            r["notes"] += f"; {b * s / r['ms'] * 1e3:.4g} tokens/s"

    task = random_diff_model(base, 1).eval()
    forward(task, "unmerged-l0", "eval gates, dense diff")
    nnz = dpkernels.project(task, sparsity)
    forward(task, "unmerged-fixed-mask", f"nnz {nnz}")
    diff_a = SparseDiff.from_model(task)
    del task
    diff_a.apply(base)
    forward(base, "merged", f"SparseDiff applied, nnz {nnz}")
    diff_a.restore(base)

    if "dpkernels" in providers:
        switcher = TaskSwitcher(base).add("a", diff_a).add("b", make_diff(base, sparsity, 2)).switch("a")
        order = itertools.cycle("ba")
        row("switch", "dpkernels", lambda: switcher.switch(next(order)),
            f"TaskSwitcher (backend {os.environ.get('DPKERNELS_BACKEND', 'auto')}), nnz {nnz}")
        switcher.reset()
    lora_providers = [p for p in ("lora", "lora-unmerged") if p in providers]
    if lora_providers and peft_missing():
        for provider in lora_providers:
            row("switch" if provider == "lora" else "model_forward", provider, None, peft_missing())
    elif lora_providers:
        from peft import LoraConfig, get_peft_model
        from peft.tuners.lora import LoraLayer

        # init_lora_weights=False: a nonzero B, as after training (a zero B would merge nothing).
        lora = get_peft_model(base, LoraConfig(task_type="SEQ_CLS", r=16, lora_alpha=32, target_modules="all-linear",
                                               init_lora_weights=False)).eval()
        layers = sum(isinstance(m, LoraLayer) for m in lora.modules())
        if "lora" in providers:
            def merge_unmerge():
                lora.merge_adapter()
                lora.unmerge_adapter()

            row("switch", "lora", merge_unmerge, f"peft LoRA r16 on {layers} Linear: merge_adapter + unmerge_adapter")
        forward(lora, "lora-unmerged", f"peft LoRA r16 on {layers} Linear, unmerged")

    merged = [r["ms"] for r in rows if r["provider"] == "merged"]
    for r in rows:
        if merged and r["op"] == "model_forward" and r["provider"] != "merged" and math.isfinite(r["ms"]):
            r["notes"] += f"; x merged {r['ms'] / merged[0]:.3g}"
    return rows


def main(argv=None) -> int:
    def sparsity_arg(parser):
        parser.add_argument("--sparsity", type=float, default=0.005, help="fraction of entries kept (default: 0.005)")

    args = parse_args(argv, doc=__doc__, providers=PROVIDERS, cuda_models="large", extra=sparsity_arg)
    if not 0 < args.sparsity <= 1:
        args.error(f"--sparsity must lie in (0, 1], got {args.sparsity}")
    if args.device != "cuda":
        print("bench_inference: no CUDA device; a CPU smoke run in fp32 (CPU times say nothing about the GPU)")
    rows = [r for preset in args.models
            for r in run_preset(args.device, preset, args.providers, sparsity=args.sparsity, batch=args.batch,
                                seq=args.seq, reps=args.reps)]
    print_table(rows)
    print("wrote", *write_rows(rows, args.out, "bench_inference"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
