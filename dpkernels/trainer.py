"""transformers.Trainer integration: the L0 penalty, the paper's optimizer groups, logging.

    model = dpkernels.diff_prune(AutoModelForSequenceClassification.from_pretrained(...))
    trainer = DiffPruningTrainer(model=model, args=args, train_dataset=..., l0_lambda=1.25e-7)
    trainer.train()                       # L0 stage
    dpkernels.project(model, 0.005)       # then fixed-mask finetuning with a fresh trainer
    DiffPruningTrainer(model=model, args=args, train_dataset=...).train()

The trainer adds ``l0_lambda * l0_penalty(model)`` to the loss while the model is in the L0 stage,
builds AdamW over :func:`dpkernels.optimizer_groups` (diff, log_alpha at lr 0.1, dense head),
clips each group's gradient norm separately to ``args.max_grad_norm`` (instead of Trainer's one
global clip), and logs ``expected_l0`` and ``nonzero_fraction`` (the fraction of gated entries whose
eval gate is nonzero, or the mask density after projection).

The penalty counts once per optimizer step whatever the gradient accumulation. A trainer built in
the L0 stage refuses to train on after ``project`` (its optimizer holds the dropped gates): use a
fresh one. ``resume_from_checkpoint`` works in both stages (into a freshly diff-pruned model; a
fixed-mask checkpoint's masks are entered first). ``save_model(output_dir)`` writes the task:
the diff folder of :meth:`dpkernels.SparseDiff.save_pretrained` (read it back with
``SparseDiff.from_pretrained`` and apply it to the base) and the tokenizer / processing class, as
Trainer saves them; the checkpoints Trainer writes itself still hold the whole diff-pruned state
(gates and optimizer), which resuming needs.
"""

from __future__ import annotations

import copy
import glob
import os

import torch
from transformers import Trainer, TrainerCallback

from .nn import iter_gated, require_gated
from .ops import eval_gates
from .optim import AdamW
from .prune import clip_grad_norms, l0_penalty, optimizer_groups
from .sparse import SparseDiff
from .training import enter_saved_masks


def gate_statistics(model: torch.nn.Module) -> dict[str, float]:
    """E[L0] and the fraction of gated entries that are nonzero in eval mode (no grad)."""
    total = nonzero = 0
    expected = 0.0
    with torch.no_grad():
        for _, _, gt in iter_gated(model):
            total += gt.theta0.numel()
            expected += float(gt.expected_l0())
            if gt.fixed_mask:
                nonzero += gt.index.numel()
                continue
            open_gates = eval_gates(gt.log_alpha, l=gt.l, r=gt.r) != 0
            if gt.group_log_alpha is not None:
                open_gates &= eval_gates(gt.group_log_alpha, l=gt.l, r=gt.r) != 0
            nonzero += int(open_gates.sum())
    return {"expected_l0": expected, "nonzero_fraction": nonzero / max(total, 1)}


class DiffPruningCallback(TrainerCallback):
    """Separate per-group gradient clipping before each optimizer step."""

    def __init__(self, max_grad_norm: float):
        self.max_grad_norm = max_grad_norm

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if self.max_grad_norm > 0 and optimizer is not None:
            clip_grad_norms(optimizer.param_groups, self.max_grad_norm)


def _saved_masks(folder) -> dict[str, torch.Tensor]:
    """The ``*diff_index`` entries of a Trainer checkpoint's weight files (safetensors or .bin)."""
    from safetensors import safe_open

    masks = {}
    for path in sorted(glob.glob(os.path.join(folder, "*.safetensors"))):
        with safe_open(path, framework="pt") as f:
            masks.update({k: f.get_tensor(k) for k in f.keys() if k.endswith("diff_index")})
    for path in sorted(glob.glob(os.path.join(folder, "pytorch_model*.bin"))):
        state = torch.load(path, map_location="cpu", weights_only=True)
        masks.update({k: v for k, v in state.items() if k.endswith("diff_index")})
    return masks


class DiffPruningTrainer(Trainer):
    """A Trainer for diff-pruned models (see the module docstring)."""

    def __init__(self, *args, l0_lambda: float = 0.0, diff_lr: float | None = None, log_alpha_lr: float = 0.1,
                 dense_lr: float | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        require_gated(self.model)
        self.l0_lambda = float(l0_lambda)
        self.group_lrs = dict(diff_lr=self.args.learning_rate if diff_lr is None else diff_lr,
                              log_alpha_lr=log_alpha_lr, dense_lr=dense_lr)
        # Per-group clipping replaces Trainer's global clip (which would mix w and log_alpha).
        self.add_callback(DiffPruningCallback(self.args.max_grad_norm))
        # A shallow copy: dataclasses.replace would rerun __post_init__ and reset accelerate's state,
        # and the caller's TrainingArguments stay untouched.
        self.args = copy.copy(self.args)
        self.args.max_grad_norm = 0.0

    def create_optimizer(self, model=None):
        if self.optimizer is not None:
            current = {id(p) for p in self.model.parameters()}
            if any(id(p) not in current for g in self.optimizer.param_groups for p in g["params"]):
                raise ValueError("this trainer's optimizer holds parameters the model no longer has (the model "
                                 "entered the fixed-mask stage, e.g. dpkernels.project, after it was built): "
                                 "train on with a fresh DiffPruningTrainer")
        if self.optimizer is None:
            groups = optimizer_groups(self.model, weight_decay=self.args.weight_decay, **self.group_lrs)
            self.optimizer = AdamW(groups, betas=(self.args.adam_beta1, self.args.adam_beta2),
                                   eps=self.args.adam_epsilon, foreach=True)
        return self.optimizer

    def log(self, logs: dict, *args, **kwargs) -> None:
        if "loss" in logs:  # training logs carry the gate statistics too
            logs = {**logs, **gate_statistics(self.model)}
        super().log(logs, *args, **kwargs)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Write the task to `output_dir` (default ``args.output_dir``): the model's diff as a
        :meth:`SparseDiff.save_pretrained` folder (the base model's name, fingerprint, labels, and
        this run's step, l0_lambda and learning rates in ``info``), and the processing class
        (tokenizer) as Trainer writes it. Only the process that saves writes. Trainer's own calls
        (``_internal_call``: checkpoints, hub pushes) save the whole diff-pruned state as before,
        gates and all, which ``resume_from_checkpoint`` loads; so ``args.push_to_hub`` pushes
        that, not this folder (upload the folder with huggingface_hub to share the task)."""
        if _internal_call:
            super().save_model(output_dir, _internal_call=True)
            return
        if self.is_fsdp_enabled or self.is_deepspeed_enabled:
            raise NotImplementedError("save_model reads the diff from the whole model; under FSDP or DeepSpeed "
                                      "gather the full model and save SparseDiff.from_model(model).save_pretrained")
        if not self.args.should_save:
            return
        output_dir = self.args.output_dir if output_dir is None else output_dir
        fixed_mask = all(gt.fixed_mask for _, _, gt in iter_gated(self.model))
        info = {"trainer": {"global_step": self.state.global_step, "stage": "fixed_mask" if fixed_mask else "l0",
                            "l0_lambda": self.l0_lambda, **self.group_lrs}}
        SparseDiff.from_model(self.model, info=info).save_pretrained(output_dir)
        # What Trainer._save writes beside the weights (its training_args.bin is left out: this
        # trainer's copy of the arguments has max_grad_norm 0, the per-group clip being its own).
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        elif getattr(self.data_collator, "tokenizer", None) is not None:
            self.data_collator.tokenizer.save_pretrained(output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        # A checkpoint of the fixed-mask stage holds its masks: enter that stage first, or neither its
        # weights nor its optimizer state would fit the freshly diff-pruned model being resumed.
        enter_saved_masks(model if model is not None else self.model, _saved_masks(resume_from_checkpoint))
        super()._load_from_checkpoint(resume_from_checkpoint, model)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        in_l0_stage = any(not gt.fixed_mask for _, _, gt in iter_gated(self.model))
        if self.l0_lambda and in_l0_stage and model.training:
            loss = loss + self.l0_lambda / self._penalty_parts(num_items_in_batch) * l0_penalty(self.model)
        return (loss, outputs) if return_outputs else loss

    def _penalty_parts(self, num_items_in_batch) -> int:
        """Over how many micro-batches the penalty, added to each, must be spread so that it counts
        once per optimizer step: Trainer divides the loss by the gradient-accumulation steps itself
        unless the loss is already normalised over them (a model taking num_items_in_batch, or a
        compute_loss_func); then the division is ours (else GA steps multiplied lambda)."""
        scaled = getattr(self, "loss_is_scaled_for_ga", None)
        if scaled is None:
            scaled = (getattr(self, "model_accepts_loss_kwargs", False) and num_items_in_batch is not None) or \
                getattr(self, "compute_loss_func", None) is not None
        return getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps) \
            if scaled else 1
