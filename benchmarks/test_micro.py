"""CPU-runnable micro-benchmarks (pytest-benchmark), torch backend, small sizes:

    pytest benchmarks/ --benchmark-only

Gate sampling, DiffLinear forward + backward, sparse apply/restore and a task switch, and one
training step of a toy BERT per provider of bench_model_step. Times track the CPU code paths
between commits (compare with ``--benchmark-autosave`` / ``--benchmark-compare``); they say nothing
about the GPU kernels.
"""

import itertools

import pytest
import torch

import dpkernels
from benchmarks.bench_model_step import PRESETS, build_model, make_batch, make_step, peft_missing
from benchmarks.bench_switch import make_diff


@pytest.fixture(scope="module")
def toy_base():
    return build_model("toy", "cpu").eval().requires_grad_(False)


def test_sample_gates(benchmark):
    log_alpha = torch.randn(256, 256, generator=torch.Generator().manual_seed(0)) * 2
    z = benchmark(dpkernels.sample_gates, log_alpha, 1234)
    assert z.shape == log_alpha.shape and bool(((z >= 0) & (z <= 1)).all())


def test_diff_linear_forward_backward(benchmark):
    torch.manual_seed(0)
    layer = dpkernels.DiffLinear(64, 128)
    with torch.no_grad():
        layer.diff.normal_(0, 0.01)
    x = torch.randn(32, 64, requires_grad=True)

    def step():
        layer.zero_grad(set_to_none=True)
        layer(x).square().sum().backward()

    benchmark(step)
    assert layer.diff.grad is not None and layer.log_alpha.grad is not None


def test_sparse_apply_restore(benchmark, toy_base):
    diff = make_diff(toy_base, 0.05, 1)
    before = [p.detach().clone() for p in toy_base.parameters()]

    def apply_restore():
        diff.apply(toy_base)
        diff.restore(toy_base)

    benchmark(apply_restore)
    assert all(torch.equal(a, p) for a, p in zip(before, toy_base.parameters(), strict=True))


def test_task_switch(benchmark, toy_base):
    switcher = dpkernels.TaskSwitcher(toy_base).add("a", make_diff(toy_base, 0.05, 1))
    switcher.add("b", make_diff(toy_base, 0.05, 2)).switch("a")
    order = itertools.cycle("ba")
    benchmark(lambda: switcher.switch(next(order)))
    switcher.reset()


@pytest.mark.parametrize("provider", ["full", "paper", "dpkernels", "dpkernels-fixed", "lora"])
def test_model_step(benchmark, provider):
    if provider == "lora" and peft_missing():
        pytest.skip(peft_missing())
    model = build_model("toy", "cpu")
    data = make_batch(model.config.vocab_size, PRESETS["toy"]["batch"], PRESETS["toy"]["seq"], "cpu")
    step, _, _ = make_step(provider, model, data, amp=False)
    benchmark(step)
