"""The one-launch scatter kernels against the reference, their dispatch, and the TaskSwitcher."""

import gc
import random
import weakref

import pytest
import torch

import dpkernels
from dpkernels import SparseDiff, TaskSwitcher, backends, sparse
from dpkernels import reference as ref
from tests.conftest import _CASES, TRITON_DEVICES, _case_marks, same_bits
from tests.test_sparse import Net, assert_same_bits, bits, contract_merge, random_diff


def _layout(sizes, density, dtype, device, gen, index_dtype=torch.int32):
    """Random targets of the given sizes and a random diff over them in the kernels' layout."""
    targets = [(torch.randn(n, generator=gen) * 2).to(device, dtype) for n in sizes]
    counts = [max(1, int(density * n)) for n in sizes]
    index = torch.cat([torch.randperm(n, generator=gen)[:k].sort().values for n, k in zip(sizes, counts, strict=True)])
    ids = torch.repeat_interleave(torch.arange(len(sizes), dtype=torch.int32), torch.tensor(counts))
    # Values from tiny (rounds away in bf16) to larger than the base.
    values = torch.randn(index.numel(), generator=gen) * torch.exp2(torch.randint(-30, 3, (index.numel(),),
                                                                                  generator=gen).float())
    starts = [0]
    for k in counts:
        starts.append(starts[-1] + k)
    table = torch.tensor([t.data_ptr() for t in targets], dtype=torch.int64, device=device)
    return targets, table, ids.to(device), index.to(device, index_dtype), values.to(device), starts


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=str)
def test_triton_scatter_matches_the_reference_bitwise(device, dtype, index_dtype):
    from dpkernels.backends import triton as tri

    _check_scatter(tri, [1, 9, 341, 4231, 2, 1030], 0.3, dtype, device, index_dtype)


def _check_scatter(kernels, sizes, density, dtype, device, index_dtype=torch.int32):
    """kernels' scatter_apply (merged base and saved entries) bit for bit the reference's, and its
    scatter_restore the original base bit for bit."""
    gen = torch.Generator().manual_seed(0)
    targets, table, ids, index, values, starts = _layout(sizes, density, dtype, device, gen, index_dtype)
    originals = [t.clone() for t in targets]
    ref_targets = [t.clone() for t in targets]
    ref_saved = torch.empty(ids.numel(), dtype=dtype, device=device)
    ref.scatter_apply(ref_targets, None, ids, index, values, starts, ref_saved)
    saved = torch.full((ids.numel(),), float("nan"), dtype=dtype, device=device)  # poisoned: must be written
    kernels.scatter_apply(targets, table, ids, index, values, starts, saved)
    assert same_bits(saved, ref_saved)
    for t, r in zip(targets, ref_targets, strict=True):
        assert same_bits(t, r)
    changed = sum(int((t != o).sum()) for t, o in zip(targets, originals, strict=True))
    assert changed > 0  # not vacuous (deltas below half an ulp of the base round away, by design of the data)
    kernels.scatter_restore(targets, table, ids, index, starts, saved)
    for t, o in zip(targets, originals, strict=True):
        assert same_bits(t, o)


# The scatter kernels' backends (the torch backend's scatter is the reference itself).
_SCATTER_KERNELS = [pytest.param((d, b), id=f"{d}-{b}", marks=_case_marks(d, b)) for d, b in _CASES if b != "torch"]


@pytest.mark.parametrize("case", _SCATTER_KERNELS)
def test_scatter_kernels_at_a_real_model_size(case):
    """A 0.5% diff over a LLaMA-7B MLP weight and bias, an attention weight and a LayerNorm (about
    310k entries in one launch) on a GPU; a stand-in of a few thousand entries on the CPU."""
    device, backend = case
    sizes = [4096 * 11008, 11008, 4096 * 4096, 4096] if device == "cuda" else [20_000, 83, 9_000, 64]
    _check_scatter(backends.load(backend), sizes, 0.005 if device == "cuda" else 0.2, torch.bfloat16, device)


def test_reference_scatter_is_the_rounded_fp32_sum():
    gen = torch.Generator().manual_seed(1)
    targets, table, ids, index, values, starts = _layout([77, 500], 0.5, torch.bfloat16, "cpu", gen)
    base = [t.clone() for t in targets]
    saved = torch.empty(ids.numel(), dtype=torch.bfloat16)
    ref.scatter_apply(targets, table, ids, index, values, starts, saved)
    for t, (b, target) in enumerate(zip(base, targets, strict=True)):
        idx = index[starts[t] : starts[t + 1]].long()
        exact = b[idx].double() + values[starts[t] : starts[t + 1]].double()
        assert torch.equal(target[idx], exact.float().bfloat16())
        assert torch.equal(saved[starts[t] : starts[t + 1]], b[idx])


def test_scatter_dispatch(monkeypatch):
    module = backends.select("scatter_apply", torch.device("cpu"), torch.bfloat16,
                             dtypes=(torch.bfloat16,), primitive="scatter_apply")
    assert module.scatter_apply is ref.scatter_apply  # auto on CPU: the torch backend, i.e. the reference
    monkeypatch.setenv("DPKERNELS_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # CPU tensors pass the device check, also on a GPU machine
    with pytest.raises(dpkernels.BackendUnavailable, match="takes float16, bfloat16 tensors, got torch.float32"):
        backends.select("scatter_apply", torch.device("cpu"), torch.float32,
                        dtypes=(torch.float16, torch.bfloat16), primitive="scatter_apply")
    monkeypatch.setenv("DPKERNELS_BACKEND", "torch")
    with pytest.raises(dpkernels.BackendUnavailable, match="the torch backend has no no_such_kernel"):
        backends.select("x", torch.device("cpu"), torch.float32, primitive="no_such_kernel")
    monkeypatch.setenv("DPKERNELS_BACKEND", "cuda")
    model = Net()
    diff = random_diff(model, seed=0)
    before = bits(model)
    with pytest.raises(dpkernels.BackendUnavailable, match="runs on CUDA tensors"):
        diff.apply(model)
    assert_same_bits(bits(model), before)


# --------------------------------------------------------------------------------------------
# TaskSwitcher
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_1000_random_switches_leave_the_base_bitwise_identical(device_backend, dtype):
    device, backend = device_backend
    model = Net(dtype, device)
    original = bits(model)
    # Four tasks, overlapping supports, two with dense heads, one that leaves a tensor alone.
    diffs = {"a": random_diff(model, seed=1), "b": random_diff(model, seed=2, density=0.3),
             "c": random_diff(model, seed=3, dense=()), "d": random_diff(model, seed=4, dense=("head.bias",))}
    expected = {name: contract_merge(model, diff) for name, diff in diffs.items()}
    switcher = TaskSwitcher(model)
    for name, diff in diffs.items():
        switcher.add(name, diff)
    rng = random.Random(0)
    choices = [*diffs, None]
    for step in range(1000):
        name = rng.choice(choices)
        if name is None:
            switcher.reset()
        else:
            switcher.switch(name)
        assert switcher.active == name
        if step % 10 == 0 or step > 990:  # every switch is checked against the fresh merge now and then
            assert_same_bits(bits(model), original if name is None else expected[name])
    assert dpkernels.info()["last_used"]["scatter_apply"] == backend
    switcher.reset()
    assert_same_bits(bits(model), original)


def test_switcher_api_and_errors():
    model = Net()
    original = bits(model)
    a, b = random_diff(model, seed=1), random_diff(model, seed=2)
    switcher = TaskSwitcher(model).add("a", a).add("b", b)
    assert switcher.tasks == ["a", "b"] and "a" in switcher and len(switcher) == 2 and switcher.active is None
    with pytest.raises(ValueError, match="already added"):
        switcher.add("a", b)
    with pytest.raises(TypeError, match="SparseDiff"):
        switcher.add("c", "not a diff")
    with pytest.raises(KeyError, match="no task 'c'"):
        switcher.switch("c")
    with pytest.raises(ValueError, match="wrong base model"):
        switcher.add("other", random_diff(Net(seed=5), seed=1))
    assert "other" not in switcher
    switcher.switch("a")
    assert repr(switcher) == "TaskSwitcher(tasks=['a', 'b'], active='a')"
    with pytest.raises(ValueError, match="already has a diff applied \\(by a TaskSwitcher\\)"):
        a.apply(model)
    with pytest.raises(ValueError, match="already has a diff applied \\(by a TaskSwitcher\\)"):
        TaskSwitcher(model).add("b", b).switch("b")
    # Adding while a task is active validates against the true base.
    switcher.add("c", random_diff(model, seed=3))
    switcher.switch("c").switch("b")
    switcher.remove("b")  # the active task: the base comes back first
    assert switcher.active is None and switcher.tasks == ["a", "c"]
    assert_same_bits(bits(model), original)
    a.apply(model)  # free again for others
    a.restore(model)


def test_switcher_follows_a_reallocated_parameter_and_refuses_a_moved_one():
    model = Net()
    original = bits(model)
    diff = random_diff(model, seed=1)
    switcher = TaskSwitcher(model).add("a", diff).switch("a")
    merged = bits(model)
    with torch.no_grad():
        model.enc.weight.data = model.enc.weight.data.clone()  # same device and dtype, new memory
    switcher.reset()
    assert_same_bits(bits(model), original)
    switcher.switch("a")
    assert_same_bits(bits(model), merged)
    model.mid.to(torch.float64)
    with pytest.raises(RuntimeError, match="was moved"):
        switcher.reset()


def test_an_empty_diff_switches_trivially():
    model = Net()
    original = bits(model)
    empty = SparseDiff.from_deltas(model, {"enc.bias": (torch.tensor([], dtype=torch.int64), torch.tensor([]))})
    TaskSwitcher(model).add("none", empty).switch("none").reset()
    assert_same_bits(bits(model), original)


def test_a_model_in_two_dtypes_gets_one_group_per_dtype(device_backend):
    device, _ = device_backend
    model = Net(torch.float32, device)
    model.mid.to(torch.bfloat16)
    original = bits(model)
    diff = random_diff(model, seed=2)
    expected = contract_merge(model, diff)
    switcher = TaskSwitcher(model).add("a", diff).switch("a")
    assert len(switcher._tasks["a"].groups) == 2
    assert_same_bits(bits(model), expected)
    switcher.reset()
    assert_same_bits(bits(model), original)



def test_applied_reports_the_owner_and_a_discarded_model_is_freed():
    model = Net()
    diff = random_diff(model, seed=1)
    assert sparse.applied(model) is None
    diff.apply(model)
    assert sparse.applied(model) is diff
    with pytest.raises(ValueError, match="another SparseDiff is"):
        random_diff(model, seed=2).restore(model)
    sparse.applied(model).restore(model)
    switcher = TaskSwitcher(model).add("a", diff).switch("a")
    assert sparse.applied(model) is switcher and switcher.model is model
    ref = weakref.ref(model)
    del model, switcher  # a task still active: the record must not keep the model alive
    gc.collect()
    assert ref() is None
