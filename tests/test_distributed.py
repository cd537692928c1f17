"""A diff-pruned tiny BERT under DistributedDataParallel and FSDP2 (2 CPU processes, gloo)."""

import socket

import _dist_worker
import pytest
import torch
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_two_ranks_train_to_identical_parameters_with_their_own_gates(tmp_path, mode):
    mp.spawn(_dist_worker.run, args=(2, mode, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"{mode}_rank{r}.pt") for r in (0, 1))
    # Gates come from a seed that differs per rank and per step...
    assert len(set(r0["seeds"])) == len(r0["seeds"]) and set(r0["seeds"]).isdisjoint(r1["seeds"])
    # ...and the ranks end with identical parameters, which moved away from the start.
    start = _dist_worker.build_model(fused_l0=mode == "fsdp2").state_dict()
    assert r0["state"].keys() == r1["state"].keys() == start.keys()
    for key in start:
        assert torch.equal(r0["state"][key], r1["state"][key]), key
    moved = [k for k in start if not torch.equal(r0["state"][k], start[k])]
    assert any(k.endswith("diff") for k in moved) and any(k.endswith("log_alpha") for k in moved)
    assert not [k for k in moved if k.endswith((".weight", ".bias", ".original")) and not k.startswith("classifier")]
    # (frozen bases never move; only diffs, gates and the dense head do)
