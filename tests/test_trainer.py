"""DiffPruningTrainer: a transformers.Trainer run on a tiny random BERT, both stages."""

import pytest
import torch
from test_diff_prune import tiny_bert
from transformers import TrainingArguments

import dpkernels
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
    # Fixed-mask stage with a fresh trainer.
    k = dpkernels.project(model, 0.01)
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
