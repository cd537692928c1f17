"""Worker for the distributed tests: 2 CPU processes, gloo, DDP or FSDP2 around a diff-pruned model."""

import os

import torch
import torch.distributed as dist
from torch import nn

import dpkernels

L0_LAMBDA = 1e-3


def build_model(fused_l0: bool = False):
    torch.manual_seed(0)  # the same pretrained weights and gates on every rank
    model = nn.Sequential(nn.Linear(12, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                          nn.Linear(16, 3))
    # The last layer plays the new task head. FSDP2 shards log_alpha, so the L0 gradient is fused
    # into the gate backward (computed on the unsharded tensors) instead of a penalty in the loss.
    dpkernels.diff_prune(model, dense=r"^5\.", l0_lambda=L0_LAMBDA if fused_l0 else 0.0)
    with torch.no_grad():
        for _, _, gt in dpkernels.nn.iter_gated(model):
            gt.log_alpha.normal_(0, 2)  # gates that are often interior, so log_alpha learns too
    return model


def run(rank: int, world: int, mode: str, port: int, out_dir: str, steps: int = 4):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = build_model(fused_l0=mode == "fsdp2")
        if mode == "ddp":
            wrapped = nn.parallel.DistributedDataParallel(model)
        else:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh("cpu", (world,))
            for layer in model:
                if any(p.requires_grad for p in layer.parameters()):
                    fully_shard(layer, mesh=mesh)
            wrapped = fully_shard(model, mesh=mesh)
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
            x, y = torch.randn(8, 12, generator=gen), torch.randint(0, 3, (8,), generator=gen)
            loss = nn.functional.cross_entropy(wrapped(x), y)
            if mode == "ddp":
                loss = loss + L0_LAMBDA * dpkernels.l0_penalty(model)
            opt.zero_grad()
            loss.backward()
            opt.step()
            seeds.append(model[0].last_seed)
        state = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
                 for k, v in model.state_dict().items()}
        torch.save({"state": state, "seeds": seeds}, os.path.join(out_dir, f"{mode}_rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
