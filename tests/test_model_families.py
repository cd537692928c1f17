"""Every transformers model family diff-prunes with no options, tied parameters gated once.

Tiny random models built in-process from transformers' config classes (no downloads): BERT,
RoBERTa, GPT-2, LLaMA (tied and untied embeddings), Qwen2 and T5, each as a sequence classifier
and as a causal LM (T5: a seq2seq LM). BERT's and RoBERTa's causal LMs carry the MLM head, whose
decoder weight and bias are tied; GPT-2's and tied LLaMA's lm_head is the input embedding; T5's
shared embedding is its encoder's, decoder's and lm_head's.
"""

import copy

import pytest
import torch
import transformers

import dpkernels
from dpkernels import reference as ref
from dpkernels.nn import dense_task_parameters, iter_gated

VOCAB = 100
SMALL = dict(vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=1)


def _config(family: str, causal: bool):
    bert_like = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                     max_position_embeddings=24, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                     is_decoder=causal, **SMALL)
    decoder = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                   intermediate_size=32, max_position_embeddings=24, **SMALL)
    if family == "bert":
        return transformers.BertConfig(**bert_like)
    if family == "roberta":
        return transformers.RobertaConfig(**bert_like)
    if family == "gpt2":
        return transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, n_positions=24, resid_pdrop=0.0,
                                       embd_pdrop=0.0, attn_pdrop=0.0, **SMALL)
    if family in ("llama", "llama-tied"):
        return transformers.LlamaConfig(tie_word_embeddings=family == "llama-tied", **decoder)
    if family in ("qwen2", "qwen2-tied"):
        return transformers.Qwen2Config(tie_word_embeddings=family == "qwen2-tied", **decoder)
    if family == "t5":
        return transformers.T5Config(d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2, dropout_rate=0.0,
                                     decoder_start_token_id=0, vocab_size=VOCAB, pad_token_id=0, eos_token_id=1)
    raise AssertionError(family)


_CLASSES = {
    ("bert", "cls"): "BertForSequenceClassification", ("bert", "lm"): "BertLMHeadModel",
    ("roberta", "cls"): "RobertaForSequenceClassification", ("roberta", "lm"): "RobertaForCausalLM",
    ("gpt2", "cls"): "GPT2ForSequenceClassification", ("gpt2", "lm"): "GPT2LMHeadModel",
    ("llama", "cls"): "LlamaForSequenceClassification", ("llama", "lm"): "LlamaForCausalLM",
    ("llama-tied", "lm"): "LlamaForCausalLM",
    ("qwen2", "cls"): "Qwen2ForSequenceClassification", ("qwen2", "lm"): "Qwen2ForCausalLM",
    ("qwen2-tied", "lm"): "Qwen2ForCausalLM",
    ("t5", "cls"): "T5ForSequenceClassification", ("t5", "lm"): "T5ForConditionalGeneration",
}
# The new task head that diff_prune's default dense patterns keep dense, per family.
_HEADS = {"bert": "classifier.", "roberta": "classifier.", "gpt2": "score.", "llama": "score.", "qwen2": "score.",
          "t5": "classification_head."}


def build(family: str, head: str, dtype=torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    cls = getattr(transformers, _CLASSES[family, head])
    return cls(_config(family, causal=head == "lm")).to(dtype).eval()


def batch(family: str, head: str, seed: int = 0) -> dict:
    """Token ids in [2, VOCAB): no padding (0) and no end-of-sequence (1) except where placed."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (2, 7), generator=gen)
    if family == "t5":
        ids[:, -1] = 1  # T5's classifier reads the hidden state at the (one) end-of-sequence token
    if head == "cls":
        return dict(input_ids=ids, labels=torch.tensor([0, 1]))
    if family == "t5":
        return dict(input_ids=ids, labels=torch.randint(2, VOCAB, (2, 5), generator=gen))
    return dict(input_ids=ids, labels=ids)


def tied_groups(model) -> list[list[str]]:
    """Every tied tensor's names, in named_parameters() order (the first is the canonical name)."""
    names_of = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(p), []).append(name)
    return [names for names in names_of.values() if len(names) > 1]


def read(model, name: str) -> torch.Tensor:
    """model's tensor `name` as its forward sees it (a gated parameter's effective value)."""
    path, _, attr = name.rpartition(".")
    return getattr(model.get_submodule(path), attr)


def assert_ties_intact(model, ties) -> None:
    for names in ties:
        first = model.get_parameter(names[0])
        for name in names[1:]:
            other = model.get_parameter(name)
            assert other is first and other.data_ptr() == first.data_ptr(), (names[0], name)


def bits(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


CASES = sorted(_CLASSES)
EXPECTED_TIES = {"bert-lm": 2, "roberta-lm": 2, "gpt2-lm": 1, "llama-tied-lm": 1, "qwen2-tied-lm": 1, "t5-cls": 1,
                 "t5-lm": 1}


@pytest.mark.parametrize(("family", "head"), CASES, ids=[f"{f}-{h}" for f, h in CASES])
def test_diff_prune_with_no_options_trains_projects_and_round_trips(family, head, tmp_path):
    model = build(family, head)
    base = copy.deepcopy(model)  # the plain base (deepcopy keeps the ties), for the diff to apply to
    ties = tied_groups(base)
    assert len(ties) == EXPECTED_TIES.get(f"{family}-{head}", 0)
    inputs = batch(family, head)

    dpkernels.diff_prune(model)
    canonical = [n for n, _ in base.named_parameters()]  # each tied tensor once, under its first name
    gated = [n for n, _, _ in iter_gated(model)]
    dense = set(dense_task_parameters(model))
    expected_dense = {n for n in canonical if head == "cls" and n.startswith(_HEADS[family.split("-")[0]])}
    assert dense == expected_dense
    assert sorted(gated) == sorted(n for n in canonical if n not in dense)  # tied tensors gated once
    total = sum(base.get_parameter(n).numel() for n in gated)

    # Three L0 steps: gradients reach every diff (the penalty every log_alpha) and the loss falls.
    optimizer = torch.optim.AdamW(dpkernels.optimizer_groups(model, diff_lr=1e-2))
    with torch.no_grad():
        loss_before = model(**inputs).loss
    model.train()
    for step in range(3):
        loss = model(**inputs).loss + 1e-4 * dpkernels.l0_penalty(model)
        optimizer.zero_grad()
        loss.backward()
        if step == 0:
            for name, _, gt in iter_gated(model):
                assert torch.isfinite(gt.diff.grad).all() and gt.log_alpha.grad.ne(0).all(), name
            # Softmax ignores a constant added to all of a query's scores, and q . b_key is one, so
            # the loss does not depend on BERT's and RoBERTa's key bias: its gradient is rounding noise.
            grads = {name: gt.diff.grad.abs().max() for name, _, gt in iter_gated(model)}
            scale = max(grads.values())
            zero = [name for name, g in grads.items() if (g > 1e-9 * scale) == name.endswith("self.key.bias")]
            assert not zero, zero
            assert all(p.grad is not None and p.grad.any() for p in dense_task_parameters(model).values())
        optimizer.step()
    model.eval()
    with torch.no_grad():
        assert model(**inputs).loss < loss_before
        for names in ties:  # one effective tensor under every name
            assert all(torch.equal(read(model, n), read(model, names[0])) for n in names[1:]), names

    # Projection counts a tied tensor once; then one fixed-mask step.
    assert dpkernels.project(model, 0.05) == round(0.05 * total)
    model.train()
    optimizer = torch.optim.AdamW(dpkernels.optimizer_groups(model))
    model(**inputs).loss.backward()
    optimizer.step()
    model.eval()

    # The diff stores a tied tensor once, under its canonical name; applied to a fresh base it
    # gives the diff-pruned model's logits exactly, and the base keeps its ties throughout.
    diff = dpkernels.SparseDiff.from_model(model)
    assert set(diff.tensors) == set(gated) and diff.total == total
    diff.save(tmp_path / "task.safetensors")
    diff = dpkernels.SparseDiff.load(tmp_path / "task.safetensors")
    with torch.no_grad():
        expected = model(**inputs).logits
        original = bits(base)
        diff.apply(base)
        assert_ties_intact(base, ties)
        assert torch.equal(base(**inputs).logits, expected)
        diff.restore(base)
        assert_ties_intact(base, ties)
        assert all(torch.equal(p, original[n]) for n, p in bits(base).items())
        switcher = dpkernels.TaskSwitcher(base).add("task", diff)
        with switcher.task("task"):
            assert_ties_intact(base, ties)
            assert torch.equal(base(**inputs).logits, expected)
        assert_ties_intact(base, ties)
        assert all(torch.equal(p, original[n]) for n, p in bits(base).items())


def _randomise_tied_gate(model, name, seed=0):
    """Random diff and log_alpha for the gated weight `name` only (the others keep diff = 0); returns
    its GatedTensor and GatedParameter."""
    gt = next(gt for n, _, gt in iter_gated(model) if n == name)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        gt.diff.copy_(torch.randn(gt.diff.shape, generator=gen, dtype=gt.diff.dtype) * 0.3)
        gt.log_alpha.copy_(torch.randn(gt.log_alpha.shape, generator=gen, dtype=gt.diff.dtype) * 2)
    return gt, model.get_submodule(name.rpartition(".")[0]).parametrizations.weight[0]


@pytest.mark.parametrize(("family", "head"), [("gpt2", "lm"), ("t5", "lm")])
def test_a_tied_tensor_gradient_is_the_sum_over_its_uses(family, head):
    """float64: the gated model's diff / log_alpha gradients equal the chain rule applied to the sum,
    over every name of the tied tensor, of the loss gradient with respect to that name's copy (the
    plain model untied by functional_call, each copy set to theta0 + z * w with the forward's z)."""
    plain = build(family, head, torch.float64)
    names = tied_groups(plain)[0]
    model = dpkernels.diff_prune(copy.deepcopy(plain))
    gt, gate = _randomise_tied_gate(model, names[0])
    inputs = batch(family, head)
    model.train()
    torch.manual_seed(1)
    loss = model(**inputs).loss
    loss.backward()
    seed = gate.seed  # one draw for every use in this forward

    log_alpha = gt.log_alpha.detach().clone().requires_grad_()
    w = gt.diff.detach()
    effective = gt.theta0 + ref.sample_gates(log_alpha, seed) * w
    copies = {n: effective.detach().clone().requires_grad_() for n in names}
    ref_loss = torch.func.functional_call(plain.train(), copies, kwargs=inputs, tie_weights=False).loss
    torch.testing.assert_close(loss.detach(), ref_loss.detach(), rtol=1e-12, atol=0)
    uses = torch.autograd.grad(ref_loss, list(copies.values()), allow_unused=True)
    used = [g for g in uses if g is not None]
    assert len(used) >= 2 and all(g.any() for g in used)  # at least two uses contribute
    summed = torch.stack(used).sum(0)
    (expected_log_alpha,) = torch.autograd.grad(effective, log_alpha, summed)
    z = ref.sample_gates(gt.log_alpha.detach(), seed)
    torch.testing.assert_close(gt.diff.grad, z * summed, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(gt.log_alpha.grad, expected_log_alpha, rtol=1e-9, atol=1e-12)
    assert not torch.allclose(gt.diff.grad, z * used[0])  # one use alone is not the gradient


def test_a_fused_l0_gradient_counts_a_tied_tensor_once():
    """diff_prune(l0_lambda=...) adds lambda * dE[L0]/dlog_alpha once per tensor and forward, as the
    penalty term does, though GPT-2 reads its tied embedding twice per forward."""
    lam = 0.3
    grads = []
    for options, penalty in ((dict(l0_lambda=lam), 0.0), (dict(), lam)):
        model = dpkernels.diff_prune(build("gpt2", "lm"), **options)
        gt, _ = _randomise_tied_gate(model, "transformer.wte.weight")
        model.train()
        torch.manual_seed(1)
        inputs = batch("gpt2", "lm")
        (model(**inputs).loss + penalty * dpkernels.l0_penalty(model)).backward()
        grads.append(gt.log_alpha.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)


def test_a_tied_model_checkpoint_resumes_and_a_deepcopy_gates_on_its_own(tmp_path):
    from dpkernels.training import load_checkpoint, save_checkpoint

    model = dpkernels.diff_prune(build("gpt2", "lm"))
    _randomise_tied_gate(model, "transformer.wte.weight")
    dpkernels.project(model, 0.05)
    optimizer = torch.optim.AdamW(dpkernels.optimizer_groups(model))
    save_checkpoint(tmp_path / "ckpt.pt", model, optimizer, step=3)
    fresh = dpkernels.diff_prune(build("gpt2", "lm"))
    load_checkpoint(tmp_path / "ckpt.pt", fresh, lambda m: torch.optim.AdamW(dpkernels.optimizer_groups(m)))
    inputs = batch("gpt2", "lm")
    with torch.no_grad():
        assert torch.equal(fresh(**inputs).logits, model(**inputs).logits)
        assert torch.equal(fresh.lm_head.weight, fresh.transformer.wte.weight)
    # A deepcopy's model-level hooks draw the copy's shared seed, not the original's.
    model = dpkernels.diff_prune(build("gpt2", "lm"))
    twin = copy.deepcopy(model).train()
    gate = model.transformer.wte.parametrizations.weight[0]
    twin_gate = twin.transformer.wte.parametrizations.weight[0]
    assert twin_gate is twin.lm_head.parametrizations.weight[0] and twin_gate is not gate
    twin(**inputs)
    assert gate.seed is None and twin_gate.seed is not None
