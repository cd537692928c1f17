"""MultiTask: mixed-task batches on one plain base, each sample equal to its task's merged model.

Tiny random transformers models (test_model_families' configs): BERT (a sequence classifier with a
dense head per task; LayerNorm, position embeddings of batch 1), GPT-2 (Conv1D, the embedding tied
to the LM head), LLaMA (RMSNorm, tied and untied). Diffs touch every parameter.
"""

import copy

import pytest
import torch
from test_model_families import build
from test_sparse import Net

import dpkernels
from dpkernels import MultiTask, SparseDiff
from tests.conftest import INTERPRETED, assert_close_by_rule, same_bits

HEADS = ("classifier.", "score.", "head.")


def random_diff(model, seed, density=0.1, dense_heads=True, dense=()):
    """Random nonzeros in every parameter of `model` (at least one each), but the task heads, which
    are dense random values (dense_heads) or left to the base, and the `dense` ones (dense values)."""
    gen = torch.Generator().manual_seed(seed)
    deltas, dense_values = {}, {}
    for name, p in model.named_parameters():
        if name in dense:
            dense_values[name] = p.detach() + torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.1
            continue
        if name.startswith(HEADS):
            if dense_heads:
                dense_values[name] = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            continue
        k = max(1, int(density * p.numel()))
        deltas[name] = (torch.randperm(p.numel(), generator=gen)[:k], torch.randn(k, generator=gen) * 0.1)
    return SparseDiff.from_deltas(model, deltas, dense_values)


def three_tasks(base):
    """a and b with their own dense heads, c with the base's head."""
    return {"a": random_diff(base, 1), "b": random_diff(base, 2), "c": random_diff(base, 3, dense_heads=False)}


def ids(batch=5, seq=7, seed=0):
    return torch.randint(2, 100, (batch, seq), generator=torch.Generator().manual_seed(seed))


def merged_outputs(base, diffs, inputs, dtype=None):
    """Each task's merged model's logits on the whole batch (SparseDiff.apply on a copy)."""
    out = {}
    for name, diff in diffs.items():
        model = copy.deepcopy(base)
        if dtype is not None:
            model = model.to(dtype)
        diff.apply(model)
        with torch.no_grad():
            out[name] = model(**inputs).logits
    return out


def params_bits(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize(("family", "head"), [("bert", "cls"), ("gpt2", "lm"), ("gpt2", "cls"), ("llama-tied", "lm"),
                                              ("llama", "cls")])
def test_each_sample_equals_its_tasks_merged_model_in_float64(family, head):
    base = build(family, head, torch.float64)
    before = params_bits(base)
    diffs = three_tasks(base)
    multi = MultiTask(base, diffs)
    inputs = dict(input_ids=ids())
    tasks = ["a", "c", "b", "a", "c"]
    out = multi(**inputs, tasks=tasks).logits
    expected = merged_outputs(base, diffs, inputs)
    for b, task in enumerate(tasks):
        # float64 rounding: the corrections are summed in another order than the merged GEMM's.
        torch.testing.assert_close(out[b], expected[task][b], rtol=1e-12, atol=1e-12)
        assert not torch.allclose(out[b], expected[next(t for t in diffs if t != task)][b])  # tasks do differ
    by_index = multi(**inputs, tasks=torch.tensor([0, 2, 1, 0, 2])).logits
    assert torch.equal(by_index, out)
    # The base was never written, and called directly it is the base.
    assert all(torch.equal(p, before[n]) for n, p in params_bits(base).items())
    with torch.no_grad():
        plain = base(**inputs).logits
    assert not torch.allclose(plain, out)
    assert multi._state.sample_task is None


class _Net(Net):
    def forward(self, x):
        return self.head(self.one(self.mid(torch.tanh(self.norm(self.enc(x))))))


def test_parameters_some_task_holds_dense_are_served_per_sample_too():
    """A task with its own dense position embedding, Conv1D weight and bias and final LayerNorm
    (each sample then multiplies or looks up its own task's copy) beside tasks holding them sparse."""
    base = build("gpt2", "lm", torch.float64)
    dense = ("transformer.wpe.weight", "transformer.h.0.mlp.c_fc.weight", "transformer.h.0.mlp.c_fc.bias",
             "transformer.ln_f.weight")
    diffs = {"a": random_diff(base, 1, dense=dense), "b": random_diff(base, 2)}
    assert set(diffs["a"].dense) == set(dense)
    inputs = dict(input_ids=ids(batch=3))
    tasks = ["b", "a", "b"]
    out = MultiTask(base, diffs)(**inputs, tasks=tasks).logits
    expected = merged_outputs(base, diffs, inputs)
    for b, task in enumerate(tasks):
        torch.testing.assert_close(out[b], expected[task][b], rtol=1e-12, atol=1e-12)


def test_a_plain_torch_model_with_2d_inputs_odd_sizes_and_a_dense_head():
    base = _Net(torch.float64)
    diffs = three_tasks(base)
    multi = MultiTask(base, diffs)
    x = torch.randn(6, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    tasks = ["b", "b", "a", "c", "a", "b"]
    out = multi(x, tasks=tasks)
    for b, task in enumerate(tasks):
        model = copy.deepcopy(base)
        diffs[task].apply(model)
        with torch.no_grad():
            torch.testing.assert_close(out[b], model(x)[b], rtol=1e-12, atol=1e-12)


@pytest.mark.skipif(not INTERPRETED, reason="Triton on CPU needs TRITON_INTERPRET=1")
@pytest.mark.parametrize(("family", "head"), [("bert", "cls"), ("gpt2", "lm")])
def test_the_triton_kernels_serve_the_mixed_batch(family, head, monkeypatch):
    monkeypatch.setenv("DPKERNELS_BACKEND", "triton")
    base = build(family, head, torch.float64)
    diffs = three_tasks(base)
    inputs = dict(input_ids=ids(batch=3))
    tasks = ["b", "a", "c"]
    out = MultiTask(base, diffs)(**inputs, tasks=tasks).logits
    last = dpkernels.info()["last_used"]
    assert last["segmented_spmm"] == "triton" and last["segmented_gather"] == "triton"
    monkeypatch.setenv("DPKERNELS_BACKEND", "torch")
    expected = merged_outputs(base, diffs, inputs)
    for b, task in enumerate(tasks):
        torch.testing.assert_close(out[b], expected[task][b], rtol=1e-12, atol=1e-12)


def test_no_grad_inference_mode_and_grad_mode_give_one_result_and_no_graph():
    base = build("bert", "cls")
    multi = MultiTask(base, three_tasks(base))
    inputs = dict(input_ids=ids())
    tasks = ["a", "b", "c", "b", "a"]
    plain = multi(**inputs, tasks=tasks).logits  # grad mode on, base parameters requiring grad
    assert not plain.requires_grad  # inference only: no graph through the corrections
    with torch.no_grad():
        assert torch.equal(multi(**inputs, tasks=tasks).logits, plain)
    with torch.inference_mode():
        assert torch.equal(multi(**inputs, tasks=tasks).logits, plain)


@pytest.mark.parametrize(("family", "head"), [("bert", "cls"), ("gpt2", "lm")])
def test_under_cpu_bf16_autocast_each_sample_is_as_close_as_its_merged_model(family, head):
    """DESIGN.md's rule against the float64 merged model: err(mixed under autocast) <= 2 err(merged
    model under autocast) + one bf16 ulp of the logits' scale."""
    base = build(family, head)
    diffs = three_tasks(base)
    inputs = dict(input_ids=ids())
    tasks = ["a", "c", "b", "a", "b"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = MultiTask(base, diffs)(**inputs, tasks=tasks).logits
        autocast = merged_outputs(base, diffs, inputs)
    oracle = merged_outputs(base, diffs, inputs, torch.float64)
    assert out.dtype == torch.bfloat16
    for b, task in enumerate(tasks):
        ulp = torch.finfo(torch.bfloat16).eps * oracle[task][b].abs().max().item()
        assert_close_by_rule(out[b], autocast[task][b], oracle[task][b], atol=ulp, name=f"sample {b}")


def _forward_hooks(model):
    return {name: len(m._forward_hooks) for name, m in model.named_modules()}


@pytest.mark.parametrize(("family", "head"), [("bert", "cls"), ("gpt2", "lm")])
def test_compiles_fullgraph_and_tasks_come_and_go_without_touching_the_base(family, head):
    """torch.compile(fullgraph=True) (aot_eager: the graph AOTAutograd makes, without inductor's
    compile time) matches eager; add() and remove() rebuild only the wrapper's per-task tensors:
    the base's modules are the same objects with the same hooks and bits, and the compiled
    wrapper (retraced: the per-task tensors changed shape) serves the new set of tasks."""
    base = build(family, head)
    diffs = three_tasks(base)
    multi = MultiTask(base, {"a": diffs["a"], "b": diffs["b"]})
    modules = [id(m) for m in base.modules()]
    hooks, before = _forward_hooks(base), params_bits(base)
    inputs = dict(input_ids=ids(batch=4))
    torch._dynamo.reset()
    compiled = torch.compile(multi, backend="aot_eager", fullgraph=True)
    for tasks in (torch.tensor([0, 1, 1, 0]), torch.tensor([1, 1, 0, 1])):
        assert torch.equal(compiled(**inputs, tasks=tasks).logits, multi(**inputs, tasks=tasks).logits)
    multi.add("c", diffs["c"])
    tasks = torch.tensor([2, 0, 1, 2])
    out = compiled(**inputs, tasks=tasks).logits
    expected = merged_outputs(base, diffs, inputs)
    for b, name in enumerate(["c", "a", "b", "c"]):
        torch.testing.assert_close(out[b], expected[name][b])
    multi.remove("a")  # b and c are now tasks 0 and 1
    out = compiled(**inputs, tasks=torch.tensor([1, 0, 0, 1])).logits
    for b, name in enumerate(["c", "b", "b", "c"]):
        torch.testing.assert_close(out[b], expected[name][b])
    assert multi.tasks == ["b", "c"]
    assert [id(m) for m in base.modules()] == modules and _forward_hooks(base) == hooks
    assert all(same_bits(p, before[n]) for n, p in params_bits(base).items())
    with pytest.raises(ValueError, match="task index 2 is out of range for 2 tasks"):
        compiled(**inputs, tasks=torch.tensor([0, 2, 0, 0]))


def test_close_removes_the_hooks_and_a_dropped_wrapper_takes_them_along():
    import gc

    base = build("bert", "cls")
    hooks = _forward_hooks(base)
    multi = MultiTask(base, three_tasks(base))
    assert sum(_forward_hooks(base).values()) > sum(hooks.values())
    multi.close()
    assert _forward_hooks(base) == hooks
    with pytest.raises(RuntimeError, match="closed"):
        multi(input_ids=ids(), tasks=["a"] * 5)
    MultiTask(base, three_tasks(base))
    gc.collect()
    assert _forward_hooks(base) == hooks


class _Transposing(torch.nn.Module):
    """A Linear fed a sequence-first input: no batch-first rows to give their own task."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 2)

    def forward(self, x):
        return self.lin(x.transpose(0, 1))


class _Scaled(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(3))

    def forward(self, x):
        return x * self.scale


def test_bad_input_gets_a_clear_error():
    base = build("bert", "cls")
    diffs = three_tasks(base)
    multi = MultiTask(base, {"a": diffs["a"], "b": diffs["b"]})
    inputs = dict(input_ids=ids(batch=3))
    with pytest.raises(ValueError, match=r"unknown task\(s\) 'zz'; added: \['a', 'b'\]"):
        multi(**inputs, tasks=["a", "zz", "b"])
    with pytest.raises(ValueError, match="tasks has 2 entries for a batch of 3 samples"):
        multi(**inputs, tasks=["a", "b"])
    with pytest.raises(ValueError, match="tasks has 4 entries for a batch of 3"):
        multi(**inputs, tasks=torch.tensor([0, 1, 0, 1]))
    for bad, message in ((torch.tensor([0, 2, 1]), "task index 2 is out of range for 2 tasks"),
                         (torch.tensor([0, -1, 1]), "task index -1 is out of range")):
        with pytest.raises(ValueError, match=message):
            multi(**inputs, tasks=bad)
    with pytest.raises(TypeError, match="integer task indices, got torch.float32"):
        multi(**inputs, tasks=torch.zeros(3))
    with pytest.raises(TypeError, match="sequence of task names"):
        multi(**inputs, tasks="a")
    with pytest.raises(ValueError, match="already added"):
        multi.add("a", diffs["c"])
    with pytest.raises(KeyError, match="no task 'zz'"):
        multi.remove("zz")
    assert multi._state.sample_task is None  # nothing left set by the failed calls
    # A diff for another base model (same architecture, other weights): the fingerprint says so.
    other = build("bert", "cls")
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.01)
    with pytest.raises(ValueError, match="wrong base model"):
        multi.add("other", random_diff(other, 4))
    # A dense head of another shape (a 3-label task for a 2-label base).
    wide = copy.deepcopy(base)
    wide.classifier = torch.nn.Linear(16, 3)
    with pytest.raises(ValueError, match=r"dense 'classifier.weight' has shape \(2, 16\) in the model, \(3, 16\)"):
        multi.add("wide", random_diff(wide, 5))
    with pytest.raises(ValueError, match="diff-pruned"):
        MultiTask(dpkernels.diff_prune(copy.deepcopy(base)))
    assert multi.tasks == ["a", "b"]
    # The base with a diff applied (a TaskSwitcher's task) is not the base.
    switcher = dpkernels.TaskSwitcher(base).add("c", diffs["c"])
    with switcher.task("c"), pytest.raises(ValueError, match="the base has a diff applied"):
        multi(**inputs, tasks=["a", "b", "a"])
    assert multi(**inputs, tasks=["a", "b", "a"]).logits.shape == (3, 2)


def test_unsupported_modules_and_inputs_are_refused():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), _Scaled())
    with pytest.raises(ValueError, match=r"parameter '1.scale' is held by '1', a _Scaled"):
        MultiTask(model, {"a": random_diff(model, 1)})
    MultiTask(model, {"a": SparseDiff.from_deltas(model, {"0.weight": ([0], [1.0])})})  # _Scaled untouched
    model = _Transposing()
    multi = MultiTask(model, {"a": random_diff(model, 1)})
    with pytest.raises(ValueError, match="module 'lin' got an input of shape \\(5, 4, 3\\), not batch-first"):
        multi(torch.randn(4, 5, 3), tasks=["a"] * 4)
    assert multi._state.sample_task is None  # cleared on the exception
