"""The L0 stage's constraint (prune.L0Target): E[L0] / N reaches its target whatever the stage's length."""

import math

import pytest
import torch
from torch import nn

import dpkernels
from dpkernels.prune import L0Target, log_alpha_lr

IN, OUT, PLANTED = 32, 8, 6


def _planted_task(seed: int):
    """A diff-pruned Linear whose task is theta0 + a diff of PLANTED entries, and that task's data."""
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(IN, OUT, bias=False))
    dpkernels.diff_prune(model, alpha_init=3.0)
    layer = model[0]
    truth = torch.zeros(OUT * IN)
    where = torch.randperm(OUT * IN, generator=g)[:PLANTED]
    truth[where] = 1.5 * torch.sign(torch.randn(PLANTED, generator=g))
    x = torch.randn(512, IN, generator=g)
    y = x @ (layer.weight.detach() + truth.view(OUT, IN)).T
    return model, where, x, y


def _l0_stage(steps: int, target_fraction: float, seed: int = 0):
    model, where, x, y = _planted_task(seed)
    torch.manual_seed(seed)
    groups = dpkernels.optimizer_groups(model, diff_lr=2e-2, log_alpha_lr=log_alpha_lr(3.0, steps))
    optimizer = torch.optim.Adam(groups)
    constraint = L0Target(model, target_fraction=target_fraction, steps=steps)
    for step in range(steps):
        rows = torch.arange(step * 32, step * 32 + 32) % x.shape[0]
        loss = nn.functional.mse_loss(model(x[rows]), y[rows])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        constraint.after_step(optimizer)
    return model, where, constraint


@pytest.mark.parametrize("steps", [40, 400])
def test_the_stage_ends_near_its_target_and_ranks_the_planted_entries_first(steps):
    # The same target is met by a 40-step and a 400-step stage, and the gates the stage leaves
    # most open are the planted diff's (a fixed lambda closes far fewer gates in the short stage
    # than in the long one: see test_a_fixed_lambda_depends_on_the_step_count).
    target = 2 * PLANTED / (OUT * IN)
    model, where, constraint = _l0_stage(steps, target)
    log_alpha = model[0].log_alpha.detach().reshape(-1)
    assert int((log_alpha > 0).sum()) <= 2 * PLANTED  # z_eval > 0
    assert target / 1.5 <= constraint.fraction() <= 1.5 * target, (constraint.fraction(), target)
    assert sorted(log_alpha.topk(PLANTED).indices.tolist()) == sorted(where.tolist())
    # The history: the target falls to its end value and holds; S starts at sigmoid(alpha_init).
    targets = [h["target"] for h in constraint.history]
    assert targets == sorted(targets, reverse=True) and targets[-1] == pytest.approx(target)
    assert constraint.start_fraction == pytest.approx(torch.sigmoid(torch.tensor(3.0)).item(), rel=1e-5)
    multipliers = [h["multiplier"] for h in constraint.history]
    assert 0 <= min(multipliers) <= max(multipliers) <= 2


def test_a_fixed_lambda_depends_on_the_step_count():
    # What L0Target replaces: lambda * E[L0] in the loss at log_alpha's former lr 0.1 closes
    # (z_eval = 0) none of the gates in 25 steps and most in 400.
    closed = {}
    for steps in (25, 400):
        model, _, x, y = _planted_task(0)
        torch.manual_seed(0)
        optimizer = torch.optim.Adam(dpkernels.optimizer_groups(model, diff_lr=2e-2, log_alpha_lr=0.1))
        for step in range(steps):
            rows = torch.arange(step * 32, step * 32 + 32) % x.shape[0]
            loss = nn.functional.mse_loss(model(x[rows]), y[rows]) + 1e-2 * dpkernels.l0_penalty(model)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        closed[steps] = float((model[0].log_alpha <= 0).float().mean())
    assert closed[25] == 0 and closed[400] > 0.5, closed


def test_push_is_the_targets_logit_step_plus_a_share_of_the_error():
    model, _, _, _ = _planted_task(0)
    layer = model[0]
    optimizer = torch.optim.SGD(dpkernels.optimizer_groups(model, log_alpha_lr=0.5))
    constraint = L0Target(model, target_fraction=0.1, steps=40, ramp=0.5, gain=0.3)
    assert constraint.multiplier == 0
    before = layer.log_alpha.detach().clone()
    constraint.after_step(optimizer)  # S = S_0 > t(1): the push is the target's step plus 0.3 x the error
    s, t = constraint.history[0]["fraction"], constraint.history[0]["target"]
    push = (_logit(t) - _logit(constraint.target(2))) + 0.3 * (_logit(s) - _logit(t))
    assert s == pytest.approx(constraint.start_fraction) and constraint.multiplier == pytest.approx(push / 0.5)
    torch.testing.assert_close(layer.log_alpha.detach(), before - 0.5 * constraint.multiplier)
    with torch.no_grad():
        layer.log_alpha.fill_(-8.0)  # now nearly every gate is closed: S << t, so no push at all
    constraint.after_step(optimizer)
    assert constraint.multiplier == 0
    torch.testing.assert_close(layer.log_alpha.detach(), torch.full_like(before, -8.0))
    with torch.no_grad():
        layer.log_alpha.fill_(20.0)  # every gate wide open far past the target: the push saturates at 2 lr
    constraint.after_step(optimizer)
    assert constraint.multiplier == 2
    assert constraint.target(19) > 0.1 and constraint.target(20) == constraint.target(39) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="log_alpha"):
        constraint.after_step(torch.optim.SGD([layer.diff], lr=0.1))


def _logit(p):
    return math.log(p / (1 - p))


def test_log_alpha_rate_scales_with_the_stage():
    assert log_alpha_lr(3.0, 70) == pytest.approx(0.2)  # 7 in half of 70 steps
    assert log_alpha_lr(3.0, 700) == pytest.approx(0.02)
    assert log_alpha_lr(-2.0, 8) == pytest.approx(1.0)  # a start below 0 still travels to -4


@pytest.mark.parametrize("kwargs, message", [
    (dict(target_fraction=0.0), "target_fraction"),
    (dict(target_fraction=1.0), "target_fraction"),
    (dict(target_fraction=0.1, steps=0), "steps"),
    (dict(target_fraction=0.1, ramp=0.0), "ramp"),
    (dict(target_fraction=0.1, steps=2.5), "steps"),
    (dict(target_fraction=0.1, gain=0.0), "gain"),
    (dict(target_fraction=0.1, gain=1.5), "gain"),
])
def test_bad_arguments(kwargs, message):
    model, _, _, _ = _planted_task(0)
    with pytest.raises(ValueError, match=message):
        L0Target(model, **{"steps": 10, **kwargs})
    with pytest.raises(ValueError, match="diff-prune|gated"):
        L0Target(nn.Linear(2, 2), target_fraction=0.1, steps=3)
