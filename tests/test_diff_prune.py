"""diff_prune on whole models: every pretrained parameter gated, the head dense, penalties, groups."""

import math

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification

import dpkernels
from dpkernels import reference as ref
from dpkernels.nn import dense_task_parameters, iter_gated


def tiny_bert(seed=0, num_labels=3):
    cfg = BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
                     max_position_embeddings=40, num_labels=num_labels, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    torch.manual_seed(seed)
    return BertForSequenceClassification(cfg).eval()


def _batch(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 97, (4, 11), generator=gen), torch.tensor([0, 1, 2, 1])


def _randomise_gates(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, _, gt in iter_gated(model):
            gt.diff.copy_(torch.randn(gt.diff.shape, generator=gen) * 0.05)
            gt.log_alpha.copy_(torch.randn(gt.log_alpha.shape, generator=gen) * 2)


def test_every_pretrained_parameter_is_gated_and_the_head_is_dense():
    original = tiny_bert()
    model = dpkernels.diff_prune(tiny_bert())
    expected = {n for n, _ in original.named_parameters() if not n.startswith("classifier")}
    assert {name for name, _, _ in iter_gated(model)} == expected
    assert set(dense_task_parameters(model)) == {"classifier.weight", "classifier.bias"}
    x, _ = _batch()
    # diff = 0: the gated model is the pretrained model, in train and eval mode.
    torch.testing.assert_close(model(x).logits, original(x).logits, rtol=0, atol=1e-6)
    model.train()
    torch.testing.assert_close(model(x).logits, original(x).logits, rtol=0, atol=1e-6)  # gates drawn, w = 0


def test_linear_layers_become_difflinear_and_others_are_parametrized():
    model = dpkernels.diff_prune(tiny_bert())
    assert isinstance(model.bert.encoder.layer[0].attention.self.query, dpkernels.DiffLinear)
    plist = model.bert.embeddings.word_embeddings.parametrizations.weight
    assert isinstance(plist[0], dpkernels.GatedParameter) and not plist.original.requires_grad


def test_parametrized_gates_replay_from_the_seed():
    model = dpkernels.diff_prune(tiny_bert())
    _randomise_gates(model)
    model.train()
    x, _ = _batch()
    model(x)
    emb = model.bert.embeddings.word_embeddings
    gate = emb.parametrizations.weight[0]
    z = ref.sample_gates(gate.log_alpha.detach(), gate.seed)
    expected = emb.parametrizations.weight.original + z * gate.diff.detach()
    torch.testing.assert_close(emb.weight.detach(), expected)
    seed = gate.seed
    model(x)
    assert gate.seed != seed  # a new draw every forward


def test_training_step_reaches_every_trainable_tensor():
    model = dpkernels.diff_prune(tiny_bert())
    _randomise_gates(model)
    model.train()
    x, labels = _batch()
    (model(x, labels=labels).loss + 1e-3 * dpkernels.l0_penalty(model)).backward()
    for name, _, gt in iter_gated(model):
        assert gt.diff.grad is not None and gt.log_alpha.grad is not None, name
        assert torch.isfinite(gt.diff.grad).all() and torch.isfinite(gt.log_alpha.grad).all(), name
        assert gt.theta0.grad is None
    assert model.classifier.weight.grad is not None


def test_patterns_choose_gated_frozen_and_dense():
    model = dpkernels.diff_prune(tiny_bert(), include=r"encoder\.layer\.1\.", exclude=r"LayerNorm", dense=r"pooler")
    gated = {n for n, _, _ in iter_gated(model)}
    assert gated and all(n.startswith("bert.encoder.layer.1.") and "LayerNorm" not in n for n in gated)
    dense = set(dense_task_parameters(model))
    assert dense == {"bert.pooler.dense.weight", "bert.pooler.dense.bias"}
    assert not model.bert.encoder.layer[1].attention.output.LayerNorm.weight.requires_grad
    assert not model.bert.embeddings.word_embeddings.weight.requires_grad  # not included: frozen


def test_structured_penalty_is_the_product_form():
    model = dpkernels.diff_prune(tiny_bert(), structured=True)
    _randomise_gates(model)
    with torch.no_grad():
        for i, (_, _, gt) in enumerate(iter_gated(model)):
            gt.group_log_alpha.fill_(-1.0 + 0.1 * i)
    shift = math.log(1.5 / 1.5)  # beta log(-l / r) with the paper's constants
    expected = sum(torch.sigmoid(gt.group_log_alpha - shift).sum() * torch.sigmoid(gt.log_alpha - shift).sum()
                   for _, _, gt in iter_gated(model))
    torch.testing.assert_close(dpkernels.l0_penalty(model), expected)
    # Eval gates multiply: z_g * z_i.
    model.eval()
    layer = model.bert.encoder.layer[0].attention.self.query
    z = dpkernels.eval_gates(layer.log_alpha) * dpkernels.eval_gates(layer.group_log_alpha)
    torch.testing.assert_close(layer.to_linear().weight, layer.weight + z * layer.diff)


def test_structured_group_gate_gradient_matches_the_reference():
    layer = dpkernels.DiffLinear(9, 7, structured=True)
    with torch.no_grad():
        layer.diff.normal_()
        layer.bias_diff.normal_()
        layer.group_log_alpha.fill_(0.0)  # P(0 < z_g < 1) = 1/3 per draw
    x = torch.randn(4, 9)
    n = layer.weight.numel() + layer.bias.numel()
    torch.manual_seed(3)
    for _ in range(100):  # until a draw lands inside (0, 1), where dz_g/dlog_alpha_g != 0
        layer.group_log_alpha.grad = None
        layer(x).square().sum().backward()
        la_g = layer.group_log_alpha.detach().double().requires_grad_()
        z_g = ref.group_gate(la_g, layer.last_seed, n)
        if 0 < z_g.item() < 1:
            break
    else:
        pytest.fail("no interior group gate in 100 draws (probability (2/3)**100)")
    # The oracle in float64: the same draws, the group gate multiplying the weight's diff.
    z_gb = ref.group_gate(layer.bias_group_log_alpha.detach().double(), layer.last_seed, n + 1)
    y = ref.diff_linear(x.double(), layer.weight.double(), layer.bias.double(), layer.diff.detach().double() * z_g,
                        layer.log_alpha.detach().double(), layer.bias_diff.detach().double() * z_gb,
                        layer.bias_log_alpha.detach().double(), seed=layer.last_seed)
    (grad,) = torch.autograd.grad(y.square().sum(), la_g)
    torch.testing.assert_close(layer.group_log_alpha.grad.double(), grad, rtol=1e-4, atol=1e-6)


def test_bad_configurations():
    for bad, match in ((dict(structured=True, l0_lambda=0.1), "structured"), (dict(l=0.5), "l must be < 0"),
                       (dict(alpha_init=float("nan")), "alpha_init")):
        model = tiny_bert()
        before = {n: (p.requires_grad, p.detach().clone()) for n, p in model.named_parameters()}
        with pytest.raises(ValueError, match=match):
            dpkernels.diff_prune(model, exclude=r"embeddings", **bad)  # frozen ones come first
        after = {n: (p.requires_grad, p.detach()) for n, p in model.named_parameters()}  # untouched
        assert after.keys() == before.keys() and all(
            after[n][0] == r and torch.equal(after[n][1], t) for n, (r, t) in before.items())
    with pytest.raises(ValueError, match="no gated tensors"):
        dpkernels.l0_penalty(nn.Linear(2, 2))


def test_linear_subclasses_read_directly_are_gated_through_the_parametrization():
    # MultiheadAttention reads out_proj.weight itself: replacing out_proj would ignore the diff.
    torch.manual_seed(0)
    model = nn.Sequential(nn.MultiheadAttention(8, 2, batch_first=True))
    plain = nn.Sequential(nn.MultiheadAttention(8, 2, batch_first=True))
    plain.load_state_dict(model.state_dict())
    dpkernels.diff_prune(model, dense=())
    assert not isinstance(model[0].out_proj, dpkernels.DiffLinear)
    _randomise_gates(model)
    model.eval()
    x = torch.randn(2, 5, 8)
    out = model[0](x, x, x)[0]
    with torch.no_grad():
        for name, _, gt in iter_gated(model):
            plain.get_parameter(name).copy_(gt.theta0 + gt.eval_dense_delta())
    torch.testing.assert_close(out, plain[0](x, x, x)[0])


def test_optimizer_groups_and_separate_clipping():
    model = dpkernels.diff_prune(tiny_bert())
    groups = dpkernels.optimizer_groups(model, diff_lr=1e-3, log_alpha_lr=0.1, dense_lr=2e-3, weight_decay=0.01)
    by_name = {g["name"]: g for g in groups}
    assert set(by_name) == {"diff", "log_alpha", "dense"}
    assert by_name["log_alpha"]["lr"] == 0.1 and by_name["log_alpha"]["weight_decay"] == 0.0
    assert by_name["dense"]["lr"] == 2e-3
    n_gated = len(list(iter_gated(model)))
    assert len(by_name["diff"]["params"]) == len(by_name["log_alpha"]["params"]) == n_gated
    for g in groups:
        for p in g["params"]:
            p.grad = torch.full_like(p, 10.0)
    norms = dpkernels.clip_grad_norms(groups, 1.0)
    assert all(n > 1.0 for n in norms.values())
    for g in groups:
        total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in g["params"]]))
        assert total <= 1.0 + 1e-5
    torch.optim.AdamW(groups).step()


def test_projection_of_a_diff_pruned_model_and_fixed_mask_training():
    model = dpkernels.diff_prune(tiny_bert())
    _randomise_gates(model)
    total = sum(gt.theta0.numel() for _, _, gt in iter_gated(model))
    k = dpkernels.project(model, 0.01)
    assert k == round(0.01 * total)
    assert all(gt.fixed_mask for _, _, gt in iter_gated(model))
    groups = dpkernels.optimizer_groups(model)
    assert {g["name"] for g in groups} == {"diff", "dense"}
    model.train()
    x, labels = _batch()
    model(x, labels=labels).loss.backward()
    for name, _, gt in iter_gated(model):
        assert gt.values.grad is not None and gt.values.grad.shape == gt.index.shape, name


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}, {n: p.requires_grad
                                                                          for n, p in model.named_parameters()}


def _assert_unchanged(model, snapshot):
    values, grads = snapshot
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    for n, p in model.named_parameters():
        assert torch.equal(p, values[n]), n


def test_a_second_diff_prune_is_refused_and_leaves_the_model_as_it_was():
    """Gating again would gate the gates' own tensors (parametrizations.*.original, diff, log_alpha)."""
    model = nn.Sequential(nn.Embedding(10, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    dpkernels.diff_prune(model, dense=())
    _randomise_gates(model)
    snapshot = _snapshot(model)
    with pytest.raises(ValueError, match="already diff-pruned"):
        dpkernels.diff_prune(model, dense=())
    _assert_unchanged(model, snapshot)
    torch.optim.AdamW(dpkernels.optimizer_groups(model))  # every group still holds leaf tensors
    # A model with any gated module is refused too, even where other parameters are still plain.
    mixed = nn.Sequential(nn.Embedding(10, 4), dpkernels.DiffLinear(4, 2))
    snapshot = _snapshot(mixed)
    with pytest.raises(ValueError, match="already diff-pruned"):
        dpkernels.diff_prune(mixed)
    _assert_unchanged(mixed, snapshot)


def _tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=16, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg)


def test_tied_parameters_excluded_under_every_name_train_untouched():
    """The tie check looks only at what the patterns select: GPT-2's tied wte / lm_head can be excluded."""
    model = _tiny_gpt2()
    tied = model.transformer.wte.weight.detach().clone()
    dpkernels.diff_prune(model, exclude=r"wte|lm_head")
    assert model.lm_head.weight is model.transformer.wte.weight and not model.lm_head.weight.requires_grad
    gated = {n for n, _, _ in iter_gated(model)}
    assert "transformer.wpe.weight" in gated and not any("wte" in n or "lm_head" in n for n in gated)
    _randomise_gates(model)
    opt = torch.optim.AdamW(dpkernels.optimizer_groups(model))
    model.train()
    x = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(0))
    model(x, labels=x).loss.backward()
    opt.step()
    assert torch.equal(model.transformer.wte.weight, tied)
    assert all(gt.diff.grad is not None for _, _, gt in iter_gated(model))
    # dense= under every name: trainable and ungated, one tensor.
    model = dpkernels.diff_prune(_tiny_gpt2(), dense=r"wte|lm_head")
    assert set(dense_task_parameters(model)) == {"transformer.wte.weight"}


@pytest.mark.parametrize("options", [dict(exclude=r"^transformer\.wte"), dict(dense=r"lm_head"),
                                     dict(include=r"lm_head"), dict(exclude=r"wte", dense=r"lm_head")])
def test_a_tied_parameter_selected_under_only_some_names_is_refused(options):
    """Gating it under one name would leave the other name reading the plain tensor: say which names tie."""
    model = _tiny_gpt2()
    snapshot = _snapshot(model)
    with pytest.raises(ValueError, match=r"tied \(shared\).*transformer\.wte\.weight.*lm_head\.weight.*one role"):
        dpkernels.diff_prune(model, **options)
    _assert_unchanged(model, snapshot)
    assert not any(True for _ in iter_gated(model))


def test_optimizer_groups_refuse_a_model_that_was_never_diff_pruned():
    """Every parameter would land in the "dense" group: plain full finetuning, silently."""
    with pytest.raises(ValueError, match="no gated tensors.*diff_prune it first"):
        dpkernels.optimizer_groups(tiny_bert())


def test_a_zero_dense_lr_is_kept():
    """dense_lr=0.0 freezes the head's updates; it must not fall back to diff_lr."""
    model = dpkernels.diff_prune(tiny_bert())
    groups = {g["name"]: g for g in dpkernels.optimizer_groups(model, diff_lr=1e-3, dense_lr=0.0)}
    assert groups["dense"]["lr"] == 0.0
    groups = {g["name"]: g for g in dpkernels.optimizer_groups(model, diff_lr=1e-3)}
    assert groups["dense"]["lr"] == 1e-3


def test_projection_takes_any_real_sparsity_and_refuses_the_rest():
    np = pytest.importorskip("numpy")
    model = dpkernels.diff_prune(tiny_bert())
    _randomise_gates(model)
    total = sum(gt.theta0.numel() for _, _, gt in iter_gated(model))
    for bad in (True, np.bool_(True), float("nan"), np.float32("nan"), -0.1, 1.5, np.float64(2), "0.5", None):
        with pytest.raises(ValueError, match="sparsity must be a number"):
            dpkernels.project(model, bad)
    assert not any(gt.fixed_mask for _, _, gt in iter_gated(model))
    assert dpkernels.project(model, np.float32(0.01)) == round(float(np.float32(0.01)) * total)


def test_a_tied_linear_weight_is_gated_once_and_read_alike_by_both_layers():
    """Two Linears holding one weight stay Linears (a DiffLinear would own a second diff): one
    GatedParameter, registered on both, gives both the same effective weight, one draw per forward."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4))
    model[2].weight = model[0].weight
    dpkernels.diff_prune(model, dense=())
    assert not any(isinstance(m, dpkernels.DiffLinear) for m in model)
    assert [n for n, _, _ in iter_gated(model)] == ["0.weight", "0.bias", "2.bias"]
    gate = model[0].parametrizations.weight[0]
    assert model[2].parametrizations.weight[0] is gate and gate.shared
    _randomise_gates(model)
    model.train()
    x = torch.randn(3, 4)
    y = model(x)
    z = ref.sample_gates(gate.log_alpha.detach(), gate.seed)
    weight = model[0].parametrizations.weight.original + z * gate.diff.detach()
    plain = nn.functional.linear
    hidden = torch.tanh(plain(x, weight, model[0].bias.detach()))
    torch.testing.assert_close(y.detach(), plain(hidden, weight, model[2].bias.detach()))
    # Called on its own (outside the model's forward), a layer draws a fresh seed per call.
    seed = gate.seed
    model[2](x)
    assert gate.seed != seed and not gate.in_model_forward
