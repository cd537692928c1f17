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

op "serve_mixed" (mode "eval"), one batch whose samples belong to T tasks (sample i to task i mod T),
on the --serve-model preset (BERT-base, batch 64 x 128, bf16 on CUDA; ``small``: 4 layers, hidden
128, batch 16 x 32, fp32 on CPU), for each T of --tasks (1, 4, 16). Each task: random nonzeros at
--sparsity in every base tensor (uniform per tensor) and its own dense classifier head:
    merged              one task's merged model on the whole batch (shape "... T1"): the reference
    multitask           dpkernels.MultiTask: one forward of the plain base, every sample its own task
                        (the base GEMMs plus each row's task's sparse correction); the target on a
                        GPU: T = 16 within 1.10x merged
    switch-loop         a TaskSwitcher on the base: per task, switch and run its samples' sub-batch,
                        then reset (T switches, T forwards of batch / T samples)
On CPU the serve rows take turns call by call (common.time_interleaved), so a neighbour's load
falls on all of them alike.

    python -m benchmarks.bench_inference [--device cuda] [--models large] [--sparsity 0.005]
                                         [--serve-model base] [--tasks 1,4,16]
"""

from __future__ import annotations

import copy
import itertools
import math
import os

import torch

import dpkernels
from benchmarks.bench_model_step import PRESETS, build_model, make_batch, parse_args, peft_missing
from benchmarks.bench_switch import make_diff, random_diff_model
from benchmarks.common import environment, measure, print_table, time_interleaved, write_rows
from dpkernels import MultiTask, SparseDiff, TaskSwitcher

SERVE_PROVIDERS = ("multitask", "switch-loop")
PROVIDERS = ("dpkernels", "lora", "merged", "unmerged-l0", "unmerged-fixed-mask", "lora-unmerged", *SERVE_PROVIDERS)
CUDA_REP_MS = 1000
SERVE_TARGET = 1.10  # mixed batch of 16 tasks / merged single-task forward (GPU)


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


def random_task_diff(base: torch.nn.Module, sparsity: float, seed: int) -> SparseDiff:
    """A task of `base`: round(sparsity * numel) random nonzeros (uniform positions, values ~0.01)
    in every base tensor and a dense random classifier head."""
    device = next(base.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    deltas, dense = {}, {}
    for name, p in base.named_parameters():
        if name.startswith("classifier."):
            dense[name] = (torch.randn(p.shape, generator=gen, device=device) * 0.02).to(p.dtype)
            continue
        k = max(1, round(sparsity * p.numel()))
        deltas[name] = (torch.randperm(p.numel(), generator=gen, device=device)[:k],
                        torch.randn(k, generator=gen, device=device) * 0.01)
    return SparseDiff.from_deltas(base, deltas, dense)


def serve_preset(device: str, preset: str, providers: list[str], tasks: list[int], *, sparsity: float,
                 batch: int | None = None, seq: int | None = None, reps: int = 10) -> list[dict]:
    """The serve_mixed rows: merged single-task forward, MultiTask and the TaskSwitcher loop per T."""
    env = environment(device)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    b, s = batch or PRESETS[preset]["batch"], seq or PRESETS[preset]["seq"]
    if max(tasks) > b:
        raise ValueError(f"--tasks {max(tasks)} exceeds the batch of {b} samples (every task needs one)")
    base = build_model(preset, device, dtype).eval().requires_grad_(False)
    inputs = make_batch(base.config.vocab_size, b, s, device)
    inputs.pop("labels")
    names = [f"task{i}" for i in range(max(tasks))]
    diffs = {name: random_task_diff(base, sparsity, seed=i + 1) for i, name in enumerate(names)}
    nnz = diffs[names[0]].nnz
    # Copies before MultiTask hooks the base (a deepcopy would carry the hooks along).
    merged = diffs[names[0]].apply(copy.deepcopy(base))
    switched = copy.deepcopy(base)
    switcher = TaskSwitcher(switched)
    for name in names:
        switcher.add(name, diffs[name])
    multi = MultiTask(base, diffs)
    no_grad = torch.no_grad()

    fns, checks = {("merged", 1): no_grad(lambda: merged(**inputs).logits)}, {}
    for t in tasks:
        assign = torch.arange(b, device=device) % t
        samples = [(assign == i).nonzero().squeeze(1) for i in range(t)]
        subs = [{k: v[rows] for k, v in inputs.items()} for rows in samples]

        def mixed(assign=assign):
            return multi(**inputs, tasks=assign).logits

        def loop(t=t, subs=subs, samples=samples):
            out = torch.empty(b, base.config.num_labels, dtype=dtype, device=device)
            for i in range(t):
                switcher.switch(names[i])
                out[samples[i]] = switched(**subs[i]).logits
            switcher.reset()
            return out

        if "multitask" in providers:
            fns["multitask", t] = mixed
        if "switch-loop" in providers:
            fns["switch-loop", t] = no_grad(loop)
        if {"multitask", "switch-loop"} <= set(providers):
            checks[t] = (mixed().float() - no_grad(loop)().float()).abs().max().item()
    if device == "cuda":
        times = {key: measure(fn, device, rep_ms=CUDA_REP_MS) for key, fn in fns.items()}
    else:
        times = {key: (*t, math.nan) for key, t in time_interleaved(fns, reps=reps).items()}
    rows = []
    for (provider, t), (ms, q20, q80, peak) in times.items():
        notes = f"nnz {nnz} per task; {b * s / ms * 1e3:.4g} tokens/s"
        if provider != "merged":
            ratio = ms / times["merged", 1][0]
            notes += f"; x merged {ratio:.3g}"
            if provider == "multitask" and t == 16 and device == "cuda":
                notes += f" (target <= {SERVE_TARGET}: {'met' if ratio <= SERVE_TARGET else 'missed'})"
            if t in checks:
                notes += f"; max |multitask - switch-loop| logit {checks[t]:.2g}"
        rows.append(dict(op="serve_mixed", provider=provider, mode="eval", shape=f"bert-{preset} b{b} s{s} T{t}",
                         dtype=str(dtype).removeprefix("torch."), ms=ms, ms_q20=q20, ms_q80=q80, peak_mb=peak,
                         gbps=math.nan, **env, notes=notes))
    multi.close()
    return rows


def _task_counts(text: str) -> list[int]:
    import argparse

    try:
        counts = [int(v) for v in text.split(",")]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma list of positive task counts")
    return counts


def main(argv=None) -> int:
    def extra(parser):
        parser.add_argument("--sparsity", type=float, default=0.005, help="fraction of entries kept (default: 0.005)")
        parser.add_argument("--serve-model", default=None, choices=list(PRESETS),
                            help="preset of the serve_mixed rows (default: base on CUDA, small on CPU)")
        parser.add_argument("--tasks", type=_task_counts, default=[1, 4, 16],
                            help="task counts T of the serve_mixed rows (default: 1,4,16)")
        parser.add_argument("--threads", type=int, default=None,
                            help="torch.set_num_threads for the run (default: torch's own)")

    args = parse_args(argv, doc=__doc__, providers=PROVIDERS, cuda_models="large", extra=extra)
    if not 0 < args.sparsity <= 1:
        args.error(f"--sparsity must lie in (0, 1], got {args.sparsity}")
    if args.threads is not None:
        if args.threads < 1:
            args.error(f"--threads must be a positive integer, got {args.threads}")
        torch.set_num_threads(args.threads)
    serve_model = args.serve_model or ("base" if args.device == "cuda" else "small")
    serve_batch = args.batch or PRESETS[serve_model]["batch"]
    if any(p in SERVE_PROVIDERS for p in args.providers) and max(args.tasks) > serve_batch:
        args.error(f"--tasks {max(args.tasks)} exceeds the {serve_batch} samples of the serve batch")
    if args.device != "cuda":
        print("bench_inference: no CUDA device; a CPU smoke run in fp32 (CPU times say nothing about the GPU)")
    main_providers = [p for p in args.providers if p not in SERVE_PROVIDERS]
    rows = [r for preset in args.models if main_providers
            for r in run_preset(args.device, preset, main_providers, sparsity=args.sparsity, batch=args.batch,
                                seq=args.seq, reps=args.reps)]
    if any(p in SERVE_PROVIDERS for p in args.providers):
        rows += serve_preset(args.device, serve_model, args.providers, args.tasks, sparsity=args.sparsity,
                             batch=args.batch, seq=args.seq, reps=args.reps)
    print_table(rows)
    print("wrote", *write_rows(rows, args.out, "bench_inference"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
