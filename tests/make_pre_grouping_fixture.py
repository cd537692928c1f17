"""Writes tests/data/pre_grouping*.safetensors: a SparseDiff made by the code before grouped gating
(commit 29ff984: per-tensor gate draws) and the base it applies to, merged. test_grouped.py checks
that today's code loads and applies it bit for bit. Run from a checkout of that commit:

    git worktree add /tmp/pre 29ff984 && cd /tmp/pre && python <this file> <repo>/tests/data
"""

import sys

import torch
from safetensors.torch import save_file
from transformers import BertConfig, BertForSequenceClassification

import dpkernels


def base_model() -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16, num_labels=3,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(config)


def main(out: str) -> None:
    model = dpkernels.diff_prune(base_model(), alpha_init=0.5).train()
    opt = torch.optim.AdamW(dpkernels.optimizer_groups(model, diff_lr=0.05, log_alpha_lr=0.5))
    gen = torch.Generator().manual_seed(1)
    ids, labels = torch.randint(0, 40, (4, 9), generator=gen), torch.tensor([0, 1, 2, 1])
    torch.manual_seed(2)
    for _ in range(3):  # a few L0 steps, drawn per tensor as before grouping
        opt.zero_grad()
        (model(input_ids=ids, labels=labels).loss + 1e-3 * dpkernels.l0_penalty(model)).backward()
        opt.step()
    dpkernels.project(model, 0.05)
    diff = dpkernels.SparseDiff.from_model(model)
    diff.save(f"{out}/pre_grouping.safetensors")
    merged = diff.apply(base_model())
    save_file({k: v.contiguous() for k, v in merged.state_dict().items()}, f"{out}/pre_grouping_merged.safetensors")


if __name__ == "__main__":
    main(sys.argv[1])
