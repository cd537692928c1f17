"""Hugging Face conventions: SparseDiff.save_pretrained / from_pretrained, merge_and_unload, and
TaskSwitcher.task. The base is a tiny BERT classifier saved to a folder, as a pretrained model is."""

import json
import os

import pytest
import safetensors
import torch
from test_sparse import _sparse_gates, assert_same_bits, assert_same_diff, bits, random_diff, tiny_bert
from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification

import dpkernels
from dpkernels import SparseDiff, TaskSwitcher, merge_and_unload, sparse
from dpkernels.nn import iter_gated

LABELS = {0: "neg", 1: "neu", 2: "pos"}


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A 'pretrained' tiny BERT classifier with named labels, saved by transformers."""
    folder = tmp_path_factory.mktemp("base")
    cfg = BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
                     max_position_embeddings=40, id2label=LABELS, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    BertForSequenceClassification(cfg).save_pretrained(folder)
    return folder


def load_base(folder):
    return AutoModelForSequenceClassification.from_pretrained(folder).eval()


def task_diff(base_dir, seed=0):
    """(the diff, the diff-pruned model it came from): sparse random gates and a random head."""
    model = dpkernels.diff_prune(load_base(base_dir))
    _sparse_gates(model, seed)
    with torch.no_grad():
        model.classifier.weight.normal_()
    return SparseDiff.from_model(model), model


def _inputs(seed=1):
    return torch.randint(0, 97, (4, 11), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------
# save_pretrained / from_pretrained
# --------------------------------------------------------------------------------------------


def test_save_pretrained_writes_the_file_and_a_config_that_restates_it(tmp_path, base_dir):
    diff, _ = task_diff(base_dir)
    diff.info = {"run": "test"}
    folder = tmp_path / "task"
    diff.save_pretrained(folder)  # creates the folder
    assert sorted(os.listdir(folder)) == ["diff.safetensors", "diff_config.json"]
    diff.save(tmp_path / "plain.safetensors")  # the same file (its checksum covers every tensor and field)
    metadata = [safetensors.safe_open(path, framework="pt").metadata()
                for path in (folder / "diff.safetensors", tmp_path / "plain.safetensors")]
    assert metadata[0] == metadata[1]
    checksum = metadata[0]["sha256"]
    assert json.loads((folder / "diff_config.json").read_text()) == {
        "format": "dpkernels.diff_config", "format_version": 1, "diff_sha256": checksum,
        "created_by": f"dpkernels {dpkernels.__version__}",
        "base_model": {"name_or_path": str(base_dir), "revision": None}, "base_fingerprint": diff.base_fingerprint,
        "gate_config": {"l": -1.5, "r": 1.5, "beta": 1.0}, "id2label": {"0": "neg", "1": "neu", "2": "pos"},
        "nnz": diff.nnz, "total": diff.total, "sparsity": diff.sparsity, "tensors": len(diff.tensors),
        "dense": ["classifier.weight", "classifier.bias"], "info": {"run": "test"}}

    loaded = SparseDiff.from_pretrained(folder)
    assert_same_diff(diff, loaded)
    assert (loaded.base_model, loaded.id2label, loaded.info) == (diff.base_model, LABELS, {"run": "test"})
    a, b = load_base(base_dir), load_base(base_dir)
    assert_same_bits(bits(diff.apply(a)), bits(loaded.apply(b)))
    # Saving again replaces both files.
    other, _ = task_diff(base_dir, seed=1)
    other.save_pretrained(folder)
    assert_same_diff(SparseDiff.from_pretrained(folder), other)


def test_base_model_and_labels_come_from_the_config_or_are_given(base_dir):
    diff, model = task_diff(base_dir)
    assert diff.base_model == {"name_or_path": str(base_dir), "revision": None} and diff.id2label == LABELS
    model.config._commit_hash = "0123abcd"  # set by from_pretrained for a model from the Hub
    assert SparseDiff.from_model(model).base_model == {"name_or_path": str(base_dir), "revision": "0123abcd"}
    given = SparseDiff.from_model(model, base_model="org/bert", id2label={"0": "a", "1": "b", "2": "c"})
    assert given.base_model == {"name_or_path": "org/bert", "revision": None}
    assert given.id2label == {0: "a", 1: "b", 2: "c"}
    other_base = dpkernels.diff_prune(tiny_bert(seed=1))  # built from a config: no name
    assert SparseDiff.from_model(other_base).base_model is None
    # One base (and the same gated tensors): one base fingerprint; another base: another.
    assert task_diff(base_dir, seed=1)[0].base_fingerprint == diff.base_fingerprint
    assert SparseDiff.from_model(other_base).base_fingerprint != diff.base_fingerprint
    for field, bad, message in (("base_model", "", "non-empty string"),
                                ("base_model", {"name": "x"}, "keys name_or_path and revision"),
                                ("base_model", {"name_or_path": "x", "revision": 3}, "revision must be"),
                                ("id2label", {0: 1}, "str names"), ("id2label", {"a": "x"}, "non-negative int ids"),
                                ("id2label", {0: "a", "0": "b"}, "id 0 twice"), ("id2label", {}, "non-empty")):
        with pytest.raises(ValueError, match=message):
            setattr(diff, field, bad)


def _edit(key, fn):
    def edit(config):
        config[key] = fn(config[key])
    return edit


MISMATCHES = {
    "nnz edited": (_edit("nnz", lambda n: n + 1), r"in 'nnz': nnz is \d+ in the config, \d+ in the file"),
    "an int written as a float": (_edit("tensors", float), "tensors is 39.0 in the config, 39 in the file"),
    "labels edited": (_edit("id2label", lambda d: {**d, "0": "bad"}), "in 'id2label'"),
    "base model edited": (_edit("base_model", lambda b: {**b, "name_or_path": "other"}), "in 'base_model'"),
    "field dropped": (lambda c: c.pop("base_fingerprint"), "base_fingerprint is absent in the config"),
    "field added": (lambda c: c.__setitem__("extra", 1), "extra is 1 in the config, absent in the file"),
}


@pytest.mark.parametrize("case", list(MISMATCHES))
def test_a_config_edited_away_from_its_file_is_refused(tmp_path, base_dir, case):
    edit, message = MISMATCHES[case]
    task_diff(base_dir)[0].save_pretrained(tmp_path)
    config = json.loads((tmp_path / "diff_config.json").read_text())
    edit(config)
    (tmp_path / "diff_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message) as info:
        SparseDiff.from_pretrained(tmp_path)
    assert str(tmp_path / "diff_config.json") in str(info.value)


def test_a_config_beside_another_diff_file_is_refused(tmp_path, base_dir):
    """What an interrupted save_pretrained (the file replaced, not yet its config) or a copied file leaves."""
    for seed in (0, 1):
        task_diff(base_dir, seed)[0].save_pretrained(tmp_path / str(seed))
    os.replace(tmp_path / "1" / "diff.safetensors", tmp_path / "0" / "diff.safetensors")
    with pytest.raises(ValueError, match=r"disagrees with .*diff\.safetensors in 'diff_sha256', 'nnz'"):
        SparseDiff.from_pretrained(tmp_path / "0")


def test_missing_and_corrupt_files_are_refused_naming_them(tmp_path, base_dir):
    folder = tmp_path / "task"
    task_diff(base_dir)[0].save_pretrained(folder)
    config_path, diff_path = folder / "diff_config.json", folder / "diff.safetensors"
    good_config, good_diff = config_path.read_bytes(), diff_path.read_bytes()
    with pytest.raises(FileNotFoundError, match="no such folder"):
        SparseDiff.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(NotADirectoryError, match="SparseDiff.load reads a single diff file"):
        SparseDiff.from_pretrained(diff_path)
    version_2 = json.dumps({**json.loads(good_config), "format_version": 2}).encode()
    flipped = good_diff[:-1] + bytes([good_diff[-1] ^ 1])
    cases = [
        (config_path, None, FileNotFoundError, "missing from the save_pretrained folder"),
        (diff_path, None, FileNotFoundError, "missing from the save_pretrained folder"),
        (config_path, good_config[:-20], ValueError, "not a JSON file"),
        (config_path, b"[]", ValueError, "not a dpkernels diff config"),
        (config_path, version_2, ValueError, "format version 2 is newer than the supported 1; upgrade dpkernels"),
        (diff_path, flipped, ValueError, "checksum mismatch"),
        (diff_path, good_diff[:100], ValueError, "not a readable safetensors file"),
    ]
    for path, content, error, message in cases:
        if content is None:
            path.unlink()
        else:
            path.write_bytes(content)
        with pytest.raises(error, match=message) as info:
            SparseDiff.from_pretrained(folder)
        assert str(path) in str(info.value)
        config_path.write_bytes(good_config)
        diff_path.write_bytes(good_diff)
    SparseDiff.from_pretrained(folder)  # the restored pair loads


# --------------------------------------------------------------------------------------------
# merge_and_unload
# --------------------------------------------------------------------------------------------


def test_merge_and_unload_gives_a_plain_model_that_transformers_round_trips(tmp_path, base_dir):
    diff, _ = task_diff(base_dir)
    applied = diff.apply(load_base(base_dir))
    diff.id2label = {0: "sad", 1: "meh", 2: "glad"}
    model = load_base(base_dir)
    merged = merge_and_unload(model, diff)
    assert merged is model and sparse.applied(model) is None and next(iter_gated(model), None) is None
    assert_same_bits(bits(merged), bits(applied))  # exactly what apply writes
    with pytest.raises(ValueError, match="this diff is not applied"):
        diff.restore(model)  # nothing left to restore
    assert model.config.id2label == diff.id2label and model.config.label2id == {"sad": 0, "meh": 1, "glad": 2}
    merged.save_pretrained(tmp_path / "merged")
    again = load_base(tmp_path / "merged")
    assert_same_bits(bits(again), bits(applied))
    assert torch.equal(again(_inputs()).logits, applied(_inputs()).logits)
    assert again.config.id2label == diff.id2label


def test_merge_and_unload_refuses_what_it_cannot_merge_and_writes_nothing(base_dir):
    diff, pruned = task_diff(base_dir)
    with pytest.raises(ValueError, match=r"^the model is diff-pruned"):
        merge_and_unload(pruned, diff)
    model = load_base(base_dir)
    before = bits(model)
    other = random_diff(model, seed=3, dense=("classifier.weight",))
    other.apply(model)
    with pytest.raises(ValueError, match="applied by another SparseDiff: restore"):
        merge_and_unload(model, diff)
    other.restore(model)
    switcher = TaskSwitcher(model).add("task", diff).switch("task")
    with pytest.raises(ValueError, match="applied by a TaskSwitcher: pass the switcher"):
        merge_and_unload(model, diff)
    switcher.reset()
    with pytest.raises(TypeError, match="a task name needs the TaskSwitcher"):
        merge_and_unload(model, "task")
    with pytest.raises(TypeError, match="takes a model or a TaskSwitcher"):
        merge_and_unload("model", diff)
    diff.id2label = {0: "a", 1: "b"}
    with pytest.raises(ValueError, match="not as many as the model config's 3"):
        merge_and_unload(model, diff)
    assert_same_bits(bits(model), before)
    # A model that has this diff applied keeps it, also through a wrapper, which gives the plain model.
    diff.id2label = None
    merged = bits(diff.apply(model))
    assert merge_and_unload(torch.compile(model), diff) is model
    assert_same_bits(bits(model), merged)
    assert sparse.applied(model) is None and model.config.id2label == LABELS
    with pytest.raises(RuntimeError, match="merged and unloaded"):  # the idle switcher on it is retired
        switcher.switch("task")


@pytest.mark.parametrize("how", ["by name", "the active task", "another diff"])
def test_merge_and_unload_of_a_switcher_detaches_it(base_dir, how):
    a, _ = task_diff(base_dir, seed=0)
    b, _ = task_diff(base_dir, seed=1)
    b.id2label = {0: "x", 1: "y", 2: "z"}
    expected = bits(b.apply(load_base(base_dir)))
    model = load_base(base_dir)
    switcher = TaskSwitcher(model).add("a", a).switch("a")
    if how == "another diff":
        target = b  # not one of the switcher's tasks: "a" is restored, then b applied
    elif how == "by name":
        target = "b"
        switcher.add("b", b)
    else:
        target = None
        switcher.add("b", b).switch("b")
    assert merge_and_unload(switcher, target) is model
    assert_same_bits(bits(model), expected)
    assert sparse.applied(model) is None and model.config.id2label == b.id2label
    for call in (lambda: switcher.switch("a"), switcher.reset, lambda: switcher.add("c", a),
                 lambda: switcher.remove("a"), lambda: switcher.task("a").__enter__(),
                 lambda: merge_and_unload(switcher, "a")):
        with pytest.raises(RuntimeError, match="merged and unloaded"):
            call()
    assert_same_bits(bits(model), expected)


def test_merge_and_unload_of_a_switcher_needs_a_task(base_dir):
    model = load_base(base_dir)
    before = bits(model)
    switcher = TaskSwitcher(model).add("a", task_diff(base_dir)[0])
    with pytest.raises(ValueError, match=r"no task is active on the TaskSwitcher; name one of \['a'\]"):
        merge_and_unload(switcher)
    with pytest.raises(KeyError, match=r"no task 'z'; added: \['a'\]"):
        merge_and_unload(switcher, "z")
    with pytest.raises(TypeError, match="a task name or a SparseDiff"):
        merge_and_unload(switcher, 3)
    assert_same_bits(bits(model), before)
    switcher.switch("a").reset()  # still the switcher's


# --------------------------------------------------------------------------------------------
# TaskSwitcher.task
# --------------------------------------------------------------------------------------------


def test_task_context_restores_the_previous_task_on_exit_and_on_error(base_dir):
    a, _ = task_diff(base_dir, seed=0)
    b, _ = task_diff(base_dir, seed=1)
    expected = {"a": bits(a.apply(load_base(base_dir))), "b": bits(b.apply(load_base(base_dir)))}
    model = load_base(base_dir)
    base = bits(model)
    switcher = TaskSwitcher(model).add("a", a).add("b", b)
    with switcher.task("a") as entered:
        assert entered is switcher and switcher.active == "a"
        assert_same_bits(bits(model), expected["a"])
        with switcher.task("b"):
            assert_same_bits(bits(model), expected["b"])
        assert switcher.active == "a"
        assert_same_bits(bits(model), expected["a"])
    assert switcher.active is None
    assert_same_bits(bits(model), base)

    switcher.switch("b")
    with pytest.raises(ZeroDivisionError), switcher.task("a"):
        assert switcher.active == "a"
        1 / 0  # noqa: B018
    assert switcher.active == "b"
    assert_same_bits(bits(model), expected["b"])
    with switcher.task("b"):  # the active task itself: nothing to switch
        assert switcher.active == "b"
    assert switcher.active == "b"
    with pytest.raises(KeyError, match=r"no task 'c'; added: \['a', 'b'\]"), switcher.task("c"):
        pass
    assert switcher.active == "b"
    assert_same_bits(bits(model), expected["b"])
