"""Checkpoint and resume: an interrupted run resumed from its checkpoint ends bit-identical."""

import pytest
import torch
from torch import nn

import dpkernels
from dpkernels.training import load_checkpoint, save_checkpoint

STEPS, PROJECT_AT = 8, 4


def _model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 12), nn.LayerNorm(12), nn.Tanh(), nn.Linear(12, 3))
    dpkernels.diff_prune(model, dense=r"^3\.")
    with torch.no_grad():
        for _, _, gt in dpkernels.nn.iter_gated(model):
            gt.log_alpha.normal_(0, 2)
    return model.train()


def _optimizer(model):
    return torch.optim.AdamW(dpkernels.optimizer_groups(model, diff_lr=1e-2))


def _step(model, optimizer, step):
    gen = torch.Generator().manual_seed(step)  # the data of a step depends on the step alone
    x, y = torch.randn(16, 10, generator=gen), torch.randint(0, 3, (16,), generator=gen)
    loss = nn.functional.cross_entropy(model(x), y)
    if step < PROJECT_AT:
        loss = loss + 1e-3 * dpkernels.l0_penalty(model)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def _train(model, optimizer, start, stop):
    for step in range(start, stop):
        if step == PROJECT_AT:
            dpkernels.project(model, 0.1)
            optimizer = _optimizer(model)
        _step(model, optimizer, step)
    return optimizer


@pytest.mark.parametrize("interrupt_at", [2, 6])  # in the L0 stage, and in the fixed-mask stage
def test_resume_reproduces_the_uninterrupted_run(tmp_path, interrupt_at):
    torch.manual_seed(123)
    full = _model()
    _train(full, _optimizer(full), 0, STEPS)

    torch.manual_seed(123)
    first = _model()
    optimizer = _train(first, _optimizer(first), 0, interrupt_at)
    save_checkpoint(tmp_path / "ckpt.pt", first, optimizer, step=interrupt_at)
    torch.manual_seed(999)  # whatever happens in between must not matter
    torch.rand(100)

    resumed = _model()
    optimizer, info = load_checkpoint(tmp_path / "ckpt.pt", resumed, _optimizer)
    assert info["step"] == interrupt_at
    _train(resumed, optimizer, interrupt_at, STEPS)
    expected = full.state_dict()
    assert resumed.state_dict().keys() == expected.keys()
    for key, value in resumed.state_dict().items():
        assert torch.equal(value, expected[key]), key


def test_bad_checkpoints_raise(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        load_checkpoint(bad, _model())
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(ValueError, match=r"not a readable checkpoint: \S"):  # a reason after the colon
        load_checkpoint(tmp_path / "empty.pt", _model())
    with pytest.raises(FileNotFoundError, match="no such checkpoint file"):
        load_checkpoint(tmp_path / "missing.pt", _model())
    torch.save({"format": "other"}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="is not a dpkernels.checkpoint"):
        load_checkpoint(tmp_path / "other.pt", _model())


def test_interrupted_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    model = _model()
    save_checkpoint(path, model, step=1)
    before = path.read_bytes()

    def failing_save(obj, f):
        with open(f, "wb") as fh:
            fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, model, step=2)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no temporary left behind


def test_save_errors_name_the_target_not_the_temporary_file(tmp_path):
    model = dpkernels.diff_prune(nn.Sequential(nn.Linear(3, 2)))
    diff = dpkernels.SparseDiff.from_model(model)
    for save in (diff.save, lambda path: save_checkpoint(path, model)):
        missing = tmp_path / "no" / "x.bin"
        with pytest.raises(FileNotFoundError, match=f"the folder {tmp_path / 'no'} does not exist") as info:
            save(missing)
        assert info.value.filename == str(missing)
        with pytest.raises(IsADirectoryError, match="is a folder") as info:
            save(tmp_path)
        assert info.value.filename == str(tmp_path)
    assert list(tmp_path.iterdir()) == []  # no temporary file left
