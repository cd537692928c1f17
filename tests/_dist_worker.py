"""Worker for the distributed tests: 2 CPU processes, gloo, DDP or FSDP2 around a diff-pruned model."""

import os

import torch
import torch.distributed as dist
from torch import nn

import dpkernels

L0_LAMBDA = 1e-3


def build_model(fused_l0: bool = False):
    """A tiny randomly initialised BERT classifier, diff-pruned (the same on every rank)."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24,
                     max_position_embeddings=16, num_labels=3, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    model = BertForSequenceClassification(cfg)
    # FSDP2 shards log_alpha, so there the L0 gradient is fused into the gate backward (computed on
    # the unsharded tensors) instead of a penalty term in the loss.
    dpkernels.diff_prune(model, dense=r"^classifier\.", l0_lambda=L0_LAMBDA if fused_l0 else 0.0)
    with torch.no_grad():
        for _, _, gt in dpkernels.nn.iter_gated(model):
            gt.log_alpha.normal_(0, 2)  # gates that are often interior, so log_alpha learns too
    return model


def _shard(model, mesh):
    from torch.distributed.fsdp import fully_shard

    for layer in model.bert.encoder.layer:
        fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def run(rank: int, world: int, mode: str, port: int, out_dir: str, steps: int = 4):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = build_model(fused_l0=mode == "fsdp2")
        if mode == "ddp":
            wrapped = nn.parallel.DistributedDataParallel(model)
        else:
            from torch.distributed.device_mesh import init_device_mesh

            wrapped = _shard(model, init_device_mesh("cpu", (world,)))
            try:
                dpkernels.l0_penalty(model)
                raise AssertionError("l0_penalty accepted sharded gates")
            except ValueError as exc:
                assert "sharded" in str(exc)
        opt = torch.optim.AdamW(dpkernels.optimizer_groups(wrapped.module if mode == "ddp" else model))
        torch.manual_seed(1000 + rank)  # gate seeds differ per rank and per step, fixed for the run
        seeds = []
        gen = torch.Generator().manual_seed(rank)  # each rank its own data shard
        for _ in range(steps):
            x, y = torch.randint(1, 50, (8, 7), generator=gen), torch.randint(0, 3, (8,), generator=gen)
            loss = nn.functional.cross_entropy(wrapped(input_ids=x).logits, y)
            if mode == "ddp":
                loss = loss + L0_LAMBDA * dpkernels.l0_penalty(model)
            opt.zero_grad()
            loss.backward()
            opt.step()
            seeds.append(model.bert.encoder.layer[0].attention.self.query.last_seed)
        state = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
                 for k, v in model.state_dict().items()}
        torch.save({"state": state, "seeds": seeds}, os.path.join(out_dir, f"{mode}_rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
