"""DiffPruningTrainer: a transformers.Trainer run on a tiny random BERT, both stages."""

import os

import pytest
import torch
from test_diff_prune import tiny_bert
from test_hf import make_tokenizer
from test_sparse import assert_same_diff
from transformers import AutoModelForSequenceClassification, TrainingArguments

import dpkernels
from dpkernels import SparseDiff
from dpkernels.nn import iter_gated
from dpkernels.trainer import DiffPruningTrainer, gate_statistics


def _dataset(n=24, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 97, (n, 9), generator=gen)
    labels = (ids[:, 0] % 3)  # learnable from the first token
    return [{"input_ids": ids[i], "attention_mask": torch.ones(9, dtype=torch.long), "labels": labels[i]}
            for i in range(n)]


def _args(tmp_path, **over):
    kw = dict(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=8, learning_rate=1e-2,
              logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, max_grad_norm=0.5, seed=0)
    kw.update(over)
    return TrainingArguments(**kw)


def test_trainer_runs_both_stages_and_logs_gate_statistics(tmp_path):
    model = dpkernels.diff_prune(tiny_bert())
    start = {n: gt.diff.detach().clone() for n, _, gt in iter_gated(model)}
    trainer = DiffPruningTrainer(model=model, args=_args(tmp_path), train_dataset=_dataset(), l0_lambda=1e-4)
    names = [g["name"] for g in trainer.create_optimizer().param_groups]
    assert names == ["diff", "log_alpha", "dense"]
    assert trainer.create_optimizer().param_groups[1]["lr"] == 0.1
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "expected_l0" in entry]
    assert logged and all(0 <= e["nonzero_fraction"] <= 1 for e in logged)
    assert any(not torch.equal(gt.diff, start[n]) for n, _, gt in iter_gated(model))
    # Fixed-mask stage with a fresh trainer: the old one's optimizer holds the dropped gates.
    k = dpkernels.project(model, 0.01)
    with pytest.raises(ValueError, match="fresh DiffPruningTrainer"):
        trainer.train()
    trainer = DiffPruningTrainer(model=model, args=_args(tmp_path), train_dataset=_dataset(seed=1))
    assert [g["name"] for g in trainer.create_optimizer().param_groups] == ["diff", "dense"]
    values = {n: gt.values.detach().clone() for n, _, gt in iter_gated(model)}
    trainer.train()
    assert any(not torch.equal(gt.values, values[n]) for n, _, gt in iter_gated(model))
    assert gate_statistics(model)["nonzero_fraction"] == pytest.approx(k / sum(
        gt.theta0.numel() for _, _, gt in iter_gated(model)))


def test_per_group_clipping_replaces_the_global_clip(tmp_path):
    model = dpkernels.diff_prune(tiny_bert())
    trainer = DiffPruningTrainer(model=model, args=_args(tmp_path, max_grad_norm=0.25), train_dataset=_dataset())
    assert trainer.args.max_grad_norm == 0.0
    seen = []
    original = dpkernels.trainer.clip_grad_norms

    def spy(groups, max_norm):
        norms = original(groups, max_norm)
        seen.append((max_norm, {g["name"] for g in groups}))
        return norms

    dpkernels.trainer.clip_grad_norms = spy
    try:
        trainer.train()
    finally:
        dpkernels.trainer.clip_grad_norms = original
    assert seen and all(m == 0.25 and names == {"diff", "log_alpha", "dense"} for m, names in seen)


def test_trainer_needs_a_diff_pruned_model(tmp_path):
    with pytest.raises(ValueError, match="diff_prune"):
        DiffPruningTrainer(model=tiny_bert(), args=_args(tmp_path), train_dataset=_dataset())


def test_the_penalty_does_not_grow_with_gradient_accumulation(tmp_path):
    """One optimizer step over the same 8 examples, as 1 x 8 or 2 x 4 or 4 x 2 micro-batches: the
    penalty's share of the log_alpha gradient is the same (the Trainer leaves the task loss
    unscaled for models that normalise it over the accumulated tokens; the penalty was then added
    once per micro-batch, multiplying lambda by the accumulation steps)."""
    from transformers import TrainerCallback

    class Record(TrainerCallback):
        def __init__(self):
            self.sums = []

        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            self.sums.append(sum(float(gt.log_alpha.grad.sum()) for _, _, gt in iter_gated(model)))

    sums = []
    for steps, batch in ((1, 8), (2, 4), (4, 2)):
        record = Record()
        args = _args(tmp_path, max_steps=1, per_device_train_batch_size=batch, gradient_accumulation_steps=steps,
                     max_grad_norm=0.0)
        DiffPruningTrainer(model=dpkernels.diff_prune(tiny_bert()), args=args, train_dataset=_dataset(n=8),
                           l0_lambda=1.0, callbacks=[record]).train()
        sums += record.sums
    assert sums[0] == pytest.approx(sums[1], rel=1e-3) and sums[0] == pytest.approx(sums[2], rel=1e-3)


@pytest.mark.parametrize("stage", ["l0", "fixed_mask"])
def test_resume_from_a_trainer_checkpoint_in_either_stage(tmp_path, stage):
    """resume_from_checkpoint into a freshly diff-pruned model ends where the uninterrupted run does;
    a fixed-mask checkpoint's masks are entered first (its weights and optimizer state fit no L0 model)."""
    def start():
        torch.manual_seed(0)
        model = dpkernels.diff_prune(tiny_bert())
        if stage == "fixed_mask":
            for _, _, gt in iter_gated(model):
                with torch.no_grad():
                    gt.diff.normal_()
            dpkernels.project(model, 0.05)
        return model

    def trainer(model, out):
        args = _args(out, max_steps=4, save_strategy="steps", save_steps=2, data_seed=0)
        return DiffPruningTrainer(model=model, args=args, train_dataset=_dataset(n=64), l0_lambda=1e-3)

    whole = start()
    trainer(whole, tmp_path / "whole").train()
    resumed = start() if stage == "l0" else dpkernels.diff_prune(tiny_bert())  # the masks come from the checkpoint
    trainer(resumed, tmp_path / "resumed").train(resume_from_checkpoint=str(tmp_path / "whole" / "checkpoint-2"))
    final = {n: p for n, p in whole.state_dict().items()}
    assert final.keys() == resumed.state_dict().keys()
    for name, value in resumed.state_dict().items():
        assert torch.equal(value, final[name]), name


def test_save_model_writes_the_diff_folder_and_checkpoints_keep_the_whole_state(tmp_path):
    """save_model writes the task (a save_pretrained diff folder and the tokenizer), in either stage:
    loaded with from_pretrained and applied to a fresh base from the recorded name, it gives the
    trained model's eval logits. The checkpoints Trainer writes itself still hold the gated state."""
    base_dir = tmp_path / "base"
    tiny_bert().save_pretrained(base_dir)
    model = dpkernels.diff_prune(AutoModelForSequenceClassification.from_pretrained(base_dir))
    args = _args(tmp_path / "run", max_steps=2, save_strategy="steps", save_steps=2)
    trainer = DiffPruningTrainer(model=model, args=args, train_dataset=_dataset(), l0_lambda=1e-4,
                                 processing_class=make_tokenizer(tmp_path))
    trainer.train()
    checkpoint = os.listdir(tmp_path / "run" / "checkpoint-2")
    assert "model.safetensors" in checkpoint and "diff_config.json" not in checkpoint
    x = torch.randint(1, 97, (4, 9), generator=torch.Generator().manual_seed(5))
    for stage in ("l0", "fixed_mask"):
        if stage == "fixed_mask":
            dpkernels.project(model, 0.01)
        folder = tmp_path / stage
        trainer.save_model(str(folder))
        files = os.listdir(folder)
        assert {"diff.safetensors", "diff_config.json", "tokenizer_config.json"} <= set(files)
        assert not any(name.startswith("model") for name in files)
        diff = SparseDiff.from_pretrained(folder)
        assert_same_diff(diff, SparseDiff.from_model(model))
        assert diff.base_model == {"name_or_path": str(base_dir), "revision": None}
        assert diff.info["trainer"] == {"global_step": 2, "stage": stage, "l0_lambda": 1e-4, "diff_lr": 1e-2,
                                        "log_alpha_lr": 0.1, "dense_lr": None}
        fresh = AutoModelForSequenceClassification.from_pretrained(diff.base_model["name_or_path"]).eval()
        torch.testing.assert_close(diff.apply(fresh)(x).logits, model.eval()(x).logits, rtol=0, atol=1e-6)
