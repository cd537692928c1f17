"""Grouped gating (dpkernels.grouped): one gate pass per model forward for the small gated tensors.

Pinned here: the grouped draws equal each tensor's own draws bit for bit (the compiled CPU
Philox too); a grouped model's outputs and every gradient equal the per-tensor path's in float64
bit for bit, given the same seeds (training and eval, fused L0 gradient, l0_penalty, a DiffLinear
whose bias alone is grouped, the fixed-mask stage, gradient checkpointing; tied gates up to one
addition's rounding); the backends' grouped kernels against the float64 reference; what is grouped
and what is not; the optimizer side (foreach AdamW exact, clipping and l0_penalty a constant number
of ops); that the ATen ops a step spends on its gates do not grow with depth; and that a SparseDiff
made before grouping still applies bit for bit.
"""

import copy
from pathlib import Path

import pytest
import torch
from conftest import INTERPRETED, assert_close_by_rule
from torch import nn
from transformers import BertConfig, BertForSequenceClassification

import dpkernels
from dpkernels import grouped
from dpkernels import nn as dnn
from dpkernels import reference as ref
from dpkernels.backends import torch_fused
from dpkernels.nn import iter_gated

DATA = Path(__file__).parent / "data"


def tiny_bert(layers=2, hidden=16, dropout=0.0, seed=0):
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=40, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                        intermediate_size=2 * hidden, max_position_embeddings=16, num_labels=3,
                        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    return BertForSequenceClassification(config).double()


def randomise(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, _, gt in iter_gated(model):
            gt.diff.copy_(torch.randn(gt.diff.shape, generator=gen, dtype=gt.diff.dtype))
            gt.log_alpha.copy_(2 * torch.randn(gt.log_alpha.shape, generator=gen, dtype=gt.log_alpha.dtype))


def owners(model):
    return model._dpkernels_gate_groups.owners


def per_tensor_replay(monkeypatch, model, seeds):
    """Turn grouping off and make every module draw the seed it had in the grouped forward."""
    model._dpkernels_gate_groups.enabled = False

    def recorded(self):
        if not self.training:
            return None
        self._seed = seeds[id(self)]
        return self._seed

    monkeypatch.setattr(dnn._GatedModule, "_next_seed", recorded)


def step(model, inputs, labels, penalty=0.0):
    for p in model.parameters():
        p.grad = None
    logits = model(input_ids=inputs).logits
    loss = logits.square().sum() + nn.functional.cross_entropy(logits, labels)
    if penalty:
        loss = loss + penalty * dpkernels.l0_penalty(model)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads


def assert_same(a, b):
    (la, ga), (lb, gb) = a, b
    assert torch.equal(la, lb)
    assert ga.keys() == gb.keys() and ga
    for name in ga:
        assert torch.equal(ga[name], gb[name]), name


def _inputs():
    gen = torch.Generator().manual_seed(3)
    return torch.randint(0, 40, (3, 7), generator=gen), torch.tensor([0, 2, 1])


def _grouped_vs_per_tensor(monkeypatch, model, penalty=0.0):
    inputs, labels = _inputs()
    model.train()
    torch.manual_seed(5)
    grouped_result = step(model, inputs, labels, penalty)
    seeds = {id(o): o._seed for o, _ in owners(model)}
    per_tensor_replay(monkeypatch, model, seeds)
    assert_same(grouped_result, step(model, inputs, labels, penalty))
    return seeds


def test_grouped_draws_are_each_tensors_own_draws():
    seeds = torch.tensor([7, -5, (1 << 62) + 3], dtype=torch.int64)  # -5: the unsigned seed 2**64 - 5
    sizes, starts = [5, 300, 2], [0, (1 << 33) - 100, 17]
    owner = torch.cat([torch.full((n,), i) for i, n in enumerate(sizes)])
    counters = torch.cat([torch.arange(n) + s for n, s in zip(sizes, starts, strict=True)])
    u = ref.grouped_uniform(seeds, owner, counters).split(sizes)
    for i, (n, s) in enumerate(zip(sizes, starts, strict=True)):
        assert torch.equal(u[i], ref.uniform(int(seeds[i]), n, s))


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    not INTERPRETED and not torch.cuda.is_available(), reason="needs Triton's interpreter or a GPU"))])
@pytest.mark.parametrize("fused", [False, True])
def test_grouped_kernels_match_the_reference(backend, fused, monkeypatch):
    """Each backend's grouped passes (the torch backend's fused ones too) vs float64, DESIGN.md's rule."""
    if backend == "triton" and fused:
        pytest.skip("the torch backend's fusion only")
    monkeypatch.setenv("DPKERNELS_CPU_FUSE_MIN", "4096" if fused else "0")
    from dpkernels import backends

    module = backends.load(backend)
    device = "cuda" if backend == "triton" and not INTERPRETED else "cpu"
    gen = torch.Generator().manual_seed(0)
    n = 5003
    la, theta0, diff, g = (torch.randn(n, generator=gen) * s for s in (3, 1, 1, 1))
    la[:6] = torch.tensor([1e4, -1e4, 60.0, -60.0, 0.0, 1e-30])  # saturated gates, and the middle
    seeds = torch.randint(-(1 << 63), (1 << 63) - 1, (4,), generator=gen)
    owner = torch.randint(0, 4, (n,), generator=gen, dtype=torch.int32)
    counters = torch.randint(0, 1 << 40, (n,), generator=gen)
    on = lambda *ts: [t.to(device) for t in ts]  # noqa: E731
    args = (-1.5, 1.5, 1.0)
    out = module.grouped_gate_forward(*on(la, seeds, owner, counters), True, *args, *on(theta0, diff))
    ref64 = ref.grouped_gate_forward(la.double(), seeds, owner, counters, True, *args, theta0.double(), diff.double())
    ref32 = ref.grouped_gate_forward(la, seeds, owner, counters, True, *args, theta0, diff)
    eps = torch.finfo(torch.float32).eps
    assert_close_by_rule(out.cpu(), ref32, ref64, 8 * eps * 4, "effective")
    gd, gla = module.grouped_gate_backward(*on(g, diff, la, seeds, owner, counters), True, *args, 0.3)
    od, ola = ref.grouped_gate_backward(g.double(), diff.double(), la.double(), seeds, owner, counters, True, *args,
                                        0.3)
    td, tla = ref.grouped_gate_backward(g, diff, la, seeds, owner, counters, True, *args, 0.3)
    sbar = ref.hard_concrete(la.double(), ref.grouped_uniform(seeds, owner, counters).double(), l=-1.5, r=1.5,
                             beta=1.0)[0] * 3 - 1.5
    far = ((sbar.abs() > 1e-5) & ((sbar - 1).abs() > 1e-5)).cpu()
    scale = (g.abs() * diff.abs()).max().item() + 0.3
    assert_close_by_rule(gd.cpu(), td, od, 8 * eps * scale, "grad_diff")
    assert_close_by_rule(gla.cpu()[far], tla[far], ola[far], 8 * eps * scale, "grad_log_alpha")
    if fused:
        assert torch_fused.fused_calls > 0


def test_a_grouped_model_equals_the_per_tensor_path_bit_for_bit(monkeypatch):
    model = dpkernels.diff_prune(tiny_bert())
    randomise(model)
    groups = model._dpkernels_gate_groups
    seeds = _grouped_vs_per_tensor(monkeypatch, model)
    # Every gated tensor of the tiny model is small: one group, one seed per gate owner.
    assert len(groups._layouts) == 1 and len(seeds) == len(owners(model))
    (_, layout), = groups._layouts.values()
    assert len(layout.members) == len(list(iter_gated(model)))


def test_the_penalty_of_a_grouped_model_joins_its_routing_pass(monkeypatch):
    """After a forward, l0_penalty takes each group's E[L0] from the grouped pass (its gradient in
    the routing pass): loss and gradients equal the per-tensor path's bit for bit."""
    model = dpkernels.diff_prune(tiny_bert())
    randomise(model)
    model.train()(input_ids=_inputs()[0])
    covered, terms = model._dpkernels_gate_groups.penalties()
    assert len(covered) == len(list(iter_gated(model))) and len(terms) == 1
    _grouped_vs_per_tensor(monkeypatch, model, penalty=0.3)


def test_the_penalty_after_an_optimizer_step_is_recomputed():
    model = dpkernels.diff_prune(tiny_bert())
    randomise(model)
    model.train()(input_ids=_inputs()[0])
    with torch.no_grad():
        model.bert.pooler.dense.log_alpha.add_(1.0)  # as an optimizer step would
    covered, _ = model._dpkernels_gate_groups.penalties()
    assert not covered
    expected = torch.stack([gt.expected_l0() for _, _, gt in iter_gated(model)]).sum()
    torch.testing.assert_close(dpkernels.l0_penalty(model), expected, rtol=1e-15, atol=0)


def test_a_fully_grouped_models_penalty_skips_the_model_scan_only_while_its_structure_holds():
    """With every tensor grouped, l0_penalty after a forward is the group terms' sum alone (no walk
    over the model); a gated module added since, or a projection since, takes the full path."""
    model = dpkernels.diff_prune(tiny_bert())
    randomise(model)

    def expected():
        return torch.stack([gt.expected_l0() for _, _, gt in iter_gated(model)]).sum()

    model.train()(input_ids=_inputs()[0])
    dpkernels.l0_penalty(model)  # (the first call checks the groups' owners against the model)
    ops = _ops(lambda: dpkernels.l0_penalty(model))
    assert ops <= 3  # (the stack and the sum of the one group's term)
    penalty = dpkernels.l0_penalty(model)
    torch.testing.assert_close(penalty, expected(), rtol=1e-15, atol=0)
    # A gated layer added after diff_prune: not an owner of the groups, its term must count.
    model.extra = dnn.DiffLinear(3, 2, dtype=torch.float64)
    with torch.no_grad():
        model.extra.log_alpha.fill_(4.0)
    model(input_ids=_inputs()[0])
    torch.testing.assert_close(dpkernels.l0_penalty(model), expected(), rtol=1e-15, atol=0)
    del model.extra
    # A projection between the forward and the penalty: the mask sizes, not the forward's terms.
    model(input_ids=_inputs()[0])
    dpkernels.project(model, 0.05)
    torch.testing.assert_close(dpkernels.l0_penalty(model), expected(), rtol=1e-15, atol=0)


def test_each_grouped_tensor_replays_from_its_owners_seed():
    model = dpkernels.diff_prune(tiny_bert()).train()
    randomise(model)
    model(input_ids=_inputs()[0])
    layer = model.bert.encoder.layer[0].attention.self.query
    for gt, offset in zip(layer.gated_tensors(), (0, layer.weight.numel()), strict=True):
        z = ref.sample_gates(gt.log_alpha.detach(), layer.last_seed, offset=offset)
        effective = grouped.effective_tensors(layer)["bias_" if gt.name == "bias" else ""].detach()
        assert torch.equal(effective, gt.theta0 + z * gt.diff.detach())
    emb = model.bert.embeddings.word_embeddings
    gate = emb.parametrizations.weight[0]
    z = ref.sample_gates(gate.log_alpha.detach(), gate.seed)
    assert torch.equal(emb.weight.detach(), emb.parametrizations.weight.original + z * gate.diff.detach())


def test_seeds_are_one_draw_per_forward_and_reproducible():
    model = dpkernels.diff_prune(tiny_bert()).train()
    inputs = _inputs()[0]
    draws = []
    for _ in range(2):
        torch.manual_seed(1)
        model(input_ids=inputs)
        draws.append([int(o._seed) for o, _ in owners(model)])
    model(input_ids=inputs)
    assert draws[0] == draws[1] != [int(o._seed) for o, _ in owners(model)]
    torch.manual_seed(1)
    expected = torch.randint(0, (1 << 63) - 1, (len(draws[0]),), dtype=torch.int64).tolist()
    assert draws[0] == expected  # every owner's seed in one torch.randint, in module order


def test_fused_l0_eval_mode_and_no_grad(monkeypatch):
    model = dpkernels.diff_prune(tiny_bert(), l0_lambda=0.05)
    randomise(model)
    _grouped_vs_per_tensor(monkeypatch, model)
    model._dpkernels_gate_groups.enabled = True
    inputs, labels = _inputs()
    model.eval()
    grouped_result = step(model, inputs, labels)
    with torch.no_grad():
        assert torch.equal(model(input_ids=inputs).logits, grouped_result[0])
    model._dpkernels_gate_groups.enabled = False
    assert_same(grouped_result, step(model, inputs, labels))


def test_a_diff_linear_whose_weight_is_too_large_groups_its_bias_alone(monkeypatch):
    model = dpkernels.diff_prune(tiny_bert())
    monkeypatch.setattr(grouped, "GROUP_MAX_NUMEL", 32)  # the 32-wide FFN biases, hidden 16: LayerNorms
    randomise(model)
    inputs = _inputs()[0]
    model.train()(input_ids=inputs)
    layer = model.bert.encoder.layer[0].intermediate.dense  # weight 32 x 16: not grouped, bias 32: grouped
    assert set(grouped.effective_tensors(layer)) == {"bias_"}
    assert grouped.effective_tensors(model.bert.embeddings.word_embeddings.parametrizations.weight[0]) == {}
    _grouped_vs_per_tensor(monkeypatch, model)


def test_tied_gates_group_once_per_forward(monkeypatch):
    from test_model_families import _randomise_tied_gate, build

    model = dpkernels.diff_prune(build("gpt2", "lm").double())
    randomise(model)
    _randomise_tied_gate(model, "transformer.wte.weight")
    ids = torch.randint(0, model.config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(0))
    gate = model.lm_head.parametrizations.weight[0]

    def run():
        for p in model.parameters():
            p.grad = None
        logits = model(input_ids=ids).logits
        logits.square().mean().backward()
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    model.train()
    torch.manual_seed(2)
    grouped_result = run()
    assert grouped.effective_tensors(gate)  # the tied gate is a member, drawn once for both uses
    seeds = {id(o): o._seed for o, _ in owners(model)}
    per_tensor_replay(monkeypatch, model, seeds)
    gate.begin_model_forward = lambda: (setattr(gate, "seed", seeds[id(gate)]),  # its one seed per forward
                                        setattr(gate, "in_model_forward", True), setattr(gate, "_l0_due", True))
    (logits, grads), (logits_pt, grads_pt) = grouped_result, run()
    assert torch.equal(logits, logits_pt) and grads.keys() == grads_pt.keys()
    # Per tensor each use routes its own gradient (g1 z + g2 z); grouped, autograd adds the uses'
    # gradients first ((g1 + g2) z): equal but for the rounding of one addition.
    for name in grads:
        torch.testing.assert_close(grads[name], grads_pt[name], rtol=1e-14, atol=1e-17)


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated:FutureWarning")
@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("l0_lambda", [0.0, 0.05])
def test_gradient_checkpointing_recomputes_with_the_forwards_gates(reentrant, l0_lambda):
    """Reentrant checkpointing runs the grouped node's backward twice (block, then the rest): the
    gradients, with the fused L0 term counted once, equal the plain model's."""
    plain = dpkernels.diff_prune(tiny_bert(), l0_lambda=l0_lambda)
    randomise(plain)
    checkpointed = copy.deepcopy(plain)
    checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    inputs, labels = _inputs()
    results = []
    for model in (plain, checkpointed):
        torch.manual_seed(4)
        results.append(step(model.train(), inputs, labels))
    assert_same(*results)


def test_projected_tensors_leave_the_gate_groups_for_a_fixed_mask_group():
    model = dpkernels.diff_prune(tiny_bert())
    randomise(model)
    model.train()(input_ids=_inputs()[0])
    assert [key[0] for key in model._dpkernels_gate_groups._layouts] == [torch.device("cpu")]
    dpkernels.project(model, 0.05)
    model(input_ids=_inputs()[0])
    assert [key[0] for key in model._dpkernels_gate_groups._layouts] == ["fixed"]
    assert model._dpkernels_gate_groups.penalties() == (set(), [])


def test_a_layer_called_alone_applies_its_own_gates():
    model = dpkernels.diff_prune(tiny_bert()).train()
    randomise(model)
    model(input_ids=_inputs()[0])
    layer = model.bert.encoder.layer[0].attention.self.query
    seed = layer.last_seed
    x = torch.randn(2, 16, dtype=torch.float64)
    y = layer(x)
    assert layer.last_seed != seed  # a fresh per-tensor draw, not the model forward's gates
    w = ref.effective_weight(layer.weight, layer.diff.detach(), layer.log_alpha.detach(), seed=layer.last_seed)
    z_b = ref.sample_gates(layer.bias_log_alpha.detach(), layer.last_seed, offset=layer.weight.numel())
    b = layer.bias + z_b * layer.bias_diff.detach()
    torch.testing.assert_close(y.detach(), nn.functional.linear(x, w, b), rtol=0, atol=1e-12)


def test_foreach_adamw_steps_the_groups_exactly_as_the_loop():
    results = []
    for foreach in (False, True):
        model = dpkernels.diff_prune(tiny_bert().float())
        randomise(model)
        opt = torch.optim.AdamW(dpkernels.optimizer_groups(model, weight_decay=0.01), foreach=foreach)
        inputs, labels = _inputs()
        torch.manual_seed(0)
        for _ in range(3):
            opt.zero_grad()
            step(model.train(), inputs, labels)
            dpkernels.clip_grad_norms(opt.param_groups, 1.0)
            opt.step()
        results.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))


# Metadata-only ops (views of existing storage), told apart from ops that compute or allocate.
VIEW_OPS = {"aten.view.default", "aten.t.default", "aten.transpose.int", "aten.slice.Tensor", "aten.detach.default",
            "aten._unsafe_view.default", "aten.expand.default", "aten.alias.default", "aten.as_strided.default",
            "aten.unsqueeze.default", "aten.permute.default", "aten.select.int"}


def _ops(fn, *, views=True) -> int:
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += views or str(func) not in VIEW_OPS
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return Count.n


def test_clipping_and_the_penalty_cost_the_same_ops_whatever_the_tensor_count():
    counts, tensors = {}, {}
    for layers in (1, 4):
        model = dpkernels.diff_prune(tiny_bert(layers=layers))
        tensors[layers] = len(list(iter_gated(model)))
        groups = dpkernels.optimizer_groups(model)
        for g in groups:
            for p in g["params"]:
                p.grad = torch.ones_like(p)
        counts[layers] = (_ops(lambda: dpkernels.clip_grad_norms(groups, 1.0)),  # noqa: B023
                          _ops(lambda: dpkernels.l0_penalty(model)))  # noqa: B023
    # Clipping: one foreach norm and scaling per group; the penalty: foreach add, sigmoid and norm
    # (its backward: three foreach ops, then autograd's accumulation into each leaf).
    assert tensors[4] > tensors[1]
    assert counts[4] == counts[1]


def test_l0_penalty_equals_the_per_tensor_sum():
    model = dpkernels.diff_prune(tiny_bert())
    randomise(model)
    gated = [gt for _, _, gt in iter_gated(model)]
    expected = torch.stack([gt.expected_l0() for gt in gated]).sum()
    penalty = dpkernels.l0_penalty(model)
    torch.testing.assert_close(penalty, expected, rtol=1e-15, atol=0)
    grads = torch.autograd.grad(penalty, [gt.log_alpha for gt in gated])
    for gt, grad in zip(gated, grads, strict=True):
        assert torch.equal(grad, ref.expected_l0_grad(gt.log_alpha.detach()))


def test_gate_ops_per_step_do_not_grow_with_depth():
    """Ops that compute or allocate in an L0 step (forward, loss, penalty, backward; after a first
    step, which builds the groups' layout) per extra layer: full finetuning's plus 1 per gated
    tensor -- the second leaf's gradient accumulation (diff and log_alpha where full finetuning has
    one weight; the penalty's gradient joins the routing pass) -- not the hundreds each gated tensor
    cost when drawn on its own. Views are left out (metadata, no pass over memory)."""
    inputs, labels = _inputs()

    def count(layers, diff_pruned):
        model = tiny_bert(layers=layers)
        if diff_pruned:
            dpkernels.diff_prune(model)
        model.train()

        def one_step():
            logits = model(input_ids=inputs).logits
            loss = nn.functional.cross_entropy(logits, labels)
            if diff_pruned:
                loss = loss + 1e-3 * dpkernels.l0_penalty(model)
            loss.backward()

        one_step()
        return _ops(one_step, views=False), len(list(iter_gated(model))) if diff_pruned else 0

    (full3, _), (full1, _) = count(3, False), count(1, False)
    (ours3, tensors3), (ours1, tensors1) = count(3, True), count(1, True)
    assert ours3 - ours1 <= (full3 - full1) + (tensors3 - tensors1)


def test_a_sparse_diff_made_before_grouping_applies_bit_for_bit():
    """tests/data/pre_grouping.safetensors was made by the per-tensor code (commit 29ff984, see
    tests/make_pre_grouping_fixture.py): today's code loads it and merges the same bits."""
    from make_pre_grouping_fixture import base_model
    from safetensors.torch import load_file

    diff = dpkernels.SparseDiff.load(DATA / "pre_grouping.safetensors")
    merged = diff.apply(base_model())
    expected = load_file(DATA / "pre_grouping_merged.safetensors")
    state = merged.state_dict()
    assert state.keys() == expected.keys()
    for name, value in expected.items():
        assert torch.equal(state[name], value), name


def test_a_trained_model_deep_copies():
    """The effective tensors of the latest forward (autograd outputs) live beside the modules, so
    deepcopy, which refuses non-leaf tensors, takes a diff-pruned model mid-training."""
    model = dpkernels.diff_prune(tiny_bert()).train()
    inputs, labels = _inputs()
    step(model, inputs, labels)
    twin = copy.deepcopy(model)
    torch.manual_seed(0)
    result = step(model, inputs, labels)
    torch.manual_seed(0)
    assert_same(result, step(twin, inputs, labels))


def test_the_grouped_cpu_passes_stay_compiled_across_a_training_loops_modes(monkeypatch):
    """Grad / no_grad / inference mode, autocast on and off, bf16 / fp32 bases and gradients, with
    and without the fused L0 term: a grouped model's CPU passes run compiled, none past dynamo's
    recompile limit (beyond which calls would silently run eager)."""
    import contextlib

    from torch._C._dynamo.eval_frame import _debug_get_cache_entry_list

    monkeypatch.setenv("DPKERNELS_CPU_FUSE_MIN", "1")
    monkeypatch.setattr(torch_fused, "_disabled_reason", None)
    before = torch_fused.fused_calls
    inputs, labels = _inputs()
    for base in (torch.float32, torch.bfloat16):
        for l0_lambda in (0.0, 0.05):
            model = dpkernels.diff_prune(tiny_bert().to(base), l0_lambda=l0_lambda).train()
            for context in (contextlib.nullcontext, torch.no_grad, torch.inference_mode):
                for autocast in (False, True):
                    with context(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                        loss = model(input_ids=inputs, labels=labels).loss
                    if context is contextlib.nullcontext:
                        loss.backward()
    assert torch_fused.fused_calls > before
    limit = torch._dynamo.config.recompile_limit
    for name in (("grouped_keep", True), ("route_kept", True)):  # (what a grouped model runs on a CPU)
        fn = torch_fused.GROUPED_MODES[name]
        entries = len(_debug_get_cache_entry_list(fn.__code__))
        assert 0 < entries < limit, f"{name}: {entries} compiled graphs (dynamo keeps {limit})"


def test_the_cpu_fused_penalty_of_large_tensors_matches_the_reference(monkeypatch):
    """l0_penalty's tensors outside the groups (large ones): on a CPU one fused pass each gives the
    sum and the slope p (1 - p), within float32 rounding of the reference's formulas."""
    monkeypatch.setenv("DPKERNELS_CPU_FUSE_MIN", "1")
    monkeypatch.setattr(torch_fused, "_disabled_reason", None)
    monkeypatch.setattr(grouped, "GROUP_MAX_NUMEL", 0)  # nothing grouped: every tensor takes this path
    model = dpkernels.diff_prune(tiny_bert().float())
    randomise(model)
    gated = [gt for _, _, gt in iter_gated(model)]
    before = torch_fused.fused_calls
    penalty = dpkernels.l0_penalty(model)
    assert torch_fused.fused_calls >= before + len(gated)
    las = [gt.log_alpha for gt in gated]
    grads = torch.autograd.grad(3.0 * penalty, las)
    expected = sum(ref.expected_l0(la.detach().double()) for la in las)
    torch.testing.assert_close(penalty.double(), expected, rtol=1e-6, atol=0)
    eps = torch.finfo(torch.float32).eps
    for la, grad in zip(las, grads, strict=True):
        la = la.detach()
        assert_close_by_rule(grad, 3.0 * ref.expected_l0_grad(la), 3.0 * ref.expected_l0_grad(la.double()),
                             8 * eps * 3.0 * 0.25, "grad_log_alpha")  # (p (1 - p) <= 1/4)


@pytest.mark.parametrize("n", [3, 1000, 4099])
def test_the_compiled_philox_draws_the_references_bits(n):
    """The torch backend's compiled passes form Philox's 32 x 32-bit products by wrapping int64
    multiplies: the same bits as the reference's exact emulation, vector body and tail alike."""
    gen = torch.Generator().manual_seed(n)
    seeds = torch.tensor([(1 << 63) + 12345 - (1 << 64), 987654321], dtype=torch.int64)  # an unsigned seed >= 2**63
    owner = torch.randint(0, 2, (n,), generator=gen)
    counters = torch.randint(0, 1 << 40, (n,), generator=gen)
    draws = torch.compile(torch_fused._grouped_draws, dynamic=True)(seeds, owner, counters)
    assert torch.equal(draws, ref.grouped_uniform(seeds, owner, counters))


def test_the_fixed_mask_stage_groups_its_small_tensors_bit_for_bit():
    """After project, the small tensors' theta0 + scatter(index, values) come from one indexed write
    and their gradients from one gather: outputs and gradients equal the per-tensor path's."""
    model = dpkernels.diff_prune(tiny_bert())
    randomise(model)
    dpkernels.project(model, 0.05)
    inputs, labels = _inputs()
    grouped_result = step(model.train(), inputs, labels)
    (key,) = model._dpkernels_gate_groups._layouts
    assert key[0] == "fixed"
    model._dpkernels_gate_groups.enabled = False
    assert_same(grouped_result, step(model, inputs, labels))


def test_a_fixed_mask_layer_under_autocast_keeps_its_own_path():
    """Under autocast a DiffLinear's sampled weight gradient accumulates in fp32 on its own path;
    the group's effective weight (base dtype) is not used for it."""
    model = dpkernels.diff_prune(tiny_bert().float())
    randomise(model)
    dpkernels.project(model, 0.05)
    inputs, labels = _inputs()
    model.train()
    results = []
    for enabled in (True, False):
        model._dpkernels_gate_groups.enabled = enabled
        for p in model.parameters():
            p.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=inputs, labels=labels).loss
        loss.backward()
        layer = model.bert.encoder.layer[0].attention.self.query
        results.append(layer.diff_values.grad.clone())
    assert torch.equal(*results)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_grouped_model_on_the_gpu_matches_its_per_tensor_path(monkeypatch):
    """On a GPU (Triton's grouped kernels): the grouped model against the per-tensor path with the
    same seeds, the gates drawn by the same Philox and gate formulas (so the GPU check runs it)."""
    model = dpkernels.diff_prune(tiny_bert().float().cuda())
    randomise(model)
    inputs, labels = (t.cuda() for t in _inputs())
    model.train()
    torch.manual_seed(5)
    logits, grads = step(model, inputs, labels, penalty=0.3)
    assert grouped.effective_tensors(model.bert.encoder.layer[0].attention.self.query)
    seeds = {id(o): o._seed for o, _ in owners(model)}
    per_tensor_replay(monkeypatch, model, seeds)
    logits_pt, grads_pt = step(model, inputs, labels, penalty=0.3)
    torch.testing.assert_close(logits, logits_pt)
    assert grads.keys() == grads_pt.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], grads_pt[name], msg=name)
