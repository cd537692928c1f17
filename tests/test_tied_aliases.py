"""A diff of a tied tensor applied to a base where its names are separate tensors (untied).

GPT-2 ties lm_head.weight to transformer.wte.weight. A diff made from the tied model stores the
tensor once, under transformer.wte.weight, and records lm_head.weight as its alias; on a base built
with tie_word_embeddings=False (the same values in two tensors) the delta must reach both, as the
task model read it in both places, or the LM head would silently keep the base's values.
"""

import copy

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import dpkernels
from dpkernels import MultiTask, SparseDiff, TaskSwitcher
from tests.conftest import same_bits

WTE, HEAD = "transformer.wte.weight", "lm_head.weight"


def _gpt2(tied: bool):
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=16, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=tied)
    model = GPT2LMHeadModel(cfg).eval()
    if not tied:  # the same values as the tied model, in two tensors
        model.lm_head.weight = torch.nn.Parameter(model.transformer.wte.weight.detach().clone())
    return model


def _task_diff(tied_base):
    """A diff-pruned copy of the tied base with random gates and diffs, its eval-mode diff."""
    model = dpkernels.diff_prune(copy.deepcopy(tied_base))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, _, gt in dpkernels.nn.iter_gated(model):
            gt.diff.copy_(torch.randn(gt.diff.shape, generator=gen) * 0.1)
            gt.log_alpha.copy_(torch.randn(gt.log_alpha.shape, generator=gen) * 2)
    return SparseDiff.from_model(model.eval())


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(2))


def test_the_diff_records_the_other_name_and_keeps_it_through_a_file(tmp_path):
    diff = _task_diff(_gpt2(tied=True))
    assert HEAD not in diff.tensors and diff.tensors[WTE].aliases == (HEAD,)
    assert all(t.aliases == () for n, t in diff.tensors.items() if n != WTE)
    diff.save(tmp_path / "d.safetensors")
    loaded = SparseDiff.load(tmp_path / "d.safetensors")
    assert loaded.tensors[WTE].aliases == (HEAD,)


def test_on_an_untied_base_the_delta_reaches_both_tensors_and_restores_bit_for_bit():
    tied, untied = _gpt2(tied=True), _gpt2(tied=False)
    assert untied.lm_head.weight is not untied.transformer.wte.weight
    diff = _task_diff(tied)
    expected = _logits(diff.apply(copy.deepcopy(tied)), IDS)
    before = {n: p.detach().clone() for n, p in untied.named_parameters()}
    diff.apply(untied)
    assert torch.equal(untied.lm_head.weight, untied.transformer.wte.weight)
    assert not torch.equal(untied.lm_head.weight, before[HEAD])
    assert torch.equal(_logits(untied, IDS), expected)
    diff.restore(untied)
    assert all(same_bits(p, before[n]) for n, p in untied.named_parameters())


def test_a_task_switcher_and_multitask_serve_an_untied_base_like_the_tied_one():
    tied, untied = _gpt2(tied=True), _gpt2(tied=False)
    diffs = {"a": _task_diff(tied)}
    expected = _logits(diffs["a"].apply(copy.deepcopy(tied)), IDS)
    switcher = TaskSwitcher(untied).add("a", diffs["a"])
    with switcher.task("a"):
        assert torch.equal(_logits(untied, IDS), expected)
    served = MultiTask(untied, diffs)
    with torch.no_grad():
        mixed = served(input_ids=IDS, tasks=torch.zeros(2, dtype=torch.int64)).logits
    torch.testing.assert_close(mixed, expected, rtol=1e-5, atol=1e-5)


def test_an_untied_head_with_other_values_is_refused_as_another_base():
    tied, untied = _gpt2(tied=True), _gpt2(tied=False)
    with torch.no_grad():
        untied.lm_head.weight.add_(1.0)  # a separately trained head: the diff was not made for it
    diff = _task_diff(tied)
    before = untied.lm_head.weight.detach().clone()
    with pytest.raises(ValueError, match=r"wrong base model.*lm_head\.weight.*untied here from 'transformer\.wte"):
        diff.apply(untied)
    assert torch.equal(untied.lm_head.weight, before)


def test_a_tied_base_still_gets_the_delta_once():
    tied = _gpt2(tied=True)
    diff = _task_diff(tied)
    gated, _ = diff.check_model(tied)
    assert HEAD not in gated
    wte = tied.transformer.wte.weight.detach().clone()
    diff.apply(tied)
    t = diff.tensors[WTE]
    flat = tied.transformer.wte.weight.detach().reshape(-1)
    assert torch.equal(flat[t.index], (wte.reshape(-1)[t.index] + t.values))


@pytest.mark.parametrize("bad", ["lm_head.weight", [1], [""], ["transformer.wte.weight"], ["x", "x"]])
def test_bad_aliases_are_refused(bad):
    diff = _task_diff(_gpt2(tied=True))
    t = diff.tensors[WTE]
    with pytest.raises(ValueError, match="alias"):
        SparseDiff({WTE: dpkernels.sparse.DiffTensor(t.shape, t.dtype, t.index, t.values, t.base_index,
                                                       t.base_values, t.gate, bad)} if bad != [WTE] else
                   {WTE: t, "other": dpkernels.sparse.DiffTensor(t.shape, t.dtype, t.index, t.values, t.base_index,
                                                                  t.base_values, t.gate, (WTE,))})


def test_a_file_with_malformed_aliases_metadata_is_refused(tmp_path):
    import json

    import safetensors.torch

    diff = _task_diff(_gpt2(tied=True))
    data, metadata = diff._serialise()
    tensors = safetensors.torch.load(data)
    records = json.loads(metadata["tensors"])
    for r in records:
        if r["name"] == WTE:
            r["aliases"] = "lm_head.weight"
    metadata["tensors"] = json.dumps(records)
    del metadata["sha256"]
    metadata["sha256"] = dpkernels.sparse._digest(tensors, metadata)
    path = tmp_path / "bad.safetensors"
    safetensors.torch.save_file(tensors, str(path), metadata)
    with pytest.raises(ValueError, match="aliases"):
        SparseDiff.load(path)
