"""benchmarks.targets judges DESIGN.md's targets from rows: synthetic CUDA rows with known ratios."""

import json

import pytest

from benchmarks import targets

GPU = "NVIDIA H100 80GB HBM3"


def _row(op, provider, mode, shape, dtype, ms, peak_mb=float("nan"), gbps=float("nan"), device=GPU):
    return dict(op=op, provider=provider, mode=mode, shape=shape, dtype=dtype, ms=ms, ms_q20=ms, ms_q80=ms,
                peak_mb=peak_mb, gbps=gbps, device=device, torch="2.11", triton="3.6", date="2026-11-24",
                commit="abc1234", notes="")


def _layer(provider, shape, ms, peak_mb=float("nan")):
    return _row("diff_linear", provider, "full", shape, "bf16-autocast", ms, peak_mb)


def _write(folder, name, rows):
    folder.mkdir(exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps(rows))


def _by_target(verdicts):
    return {v.target: v for v in verdicts}


def test_verdicts_from_known_ratios(tmp_path):
    big, mid = "8192x4096->11008", "512x4096->4096"
    _write(tmp_path / "a", "bench_diff_linear", [
        _layer("nn.Linear", big, 3.0, peak_mb=900), _layer("triton", big, 3.15, peak_mb=1100),  # 1.05x: met
        _layer("torch.compile", big, 4.7, peak_mb=1000),  # triton's peak above torch.compile's: memory missed
        _layer("nn.Linear", mid, 0.2), _layer("triton", mid, 0.5),  # 2.5x: missed
        _layer("fixed-mask", "8192x4096->4096", 0.7), _layer("nn.Linear", "8192x4096->4096", 1.0),  # 0.7x: met
        _layer("fixed-mask-overlap", "8192x4096->4096", 0.85),  # 0.85x: missed (an optional provider)
        _layer("triton-unfused", big, 3.2), _layer("triton-fused", big, 3.5),
        _layer("triton-unfused-overlap", big, 3.1),
        _layer("nn.Linear", "8192x768->3072", 0.4, peak_mb=100),
        _layer("triton", "8192x768->3072", 0.5, peak_mb=float("nan")),  # no peak: not measured
        _row("diff_linear", "triton", "full", "8192x3072->768", "bf16-autocast", 9.0, device="cpu (x86_64, 2 cores)"),
    ])
    _write(tmp_path / "a", "bench_gates", [
        _row("gates", "copy", "forward", "4096x11008", "bf16", 0.2, gbps=3000),
        _row("gates", "triton", "forward", "4096x11008", "bf16", 0.2, gbps=2850),  # 95%: met
        _row("gates", "copy", "backward", "4096x11008", "bf16", 0.3, gbps=3000),
        _row("gates", "triton", "backward", "4096x11008", "bf16", 0.4, gbps=2000),  # 67%: missed
    ])
    shape = "bert L24 H1024 (393 tensors, nnz 1673000)"
    _write(tmp_path / "a", "bench_switch", [_row("switch", "triton", "restore+apply", shape, "bf16", 0.5)])
    _write(tmp_path / "a", "bench_switch_size", {"tensors": 393})  # a summary, not rows: skipped
    _write(tmp_path / "a", "bench_inference", [  # 16 tasks mixed at 1.05x the merged forward: met
        _row("serve_mixed", "merged", "eval", "bert-base b64 s128 T1", "bfloat16", 4.0),
        _row("serve_mixed", "multitask", "eval", "bert-base b64 s128 T16", "bfloat16", 4.2)])
    step = "bert-large b32 s128"
    _write(tmp_path / "a", "bench_model_step", [
        _row("model_step", p, "train", step, "bf16-autocast", ms) for p, ms in
        (("full", 80.0), ("dpkernels", 90.0), ("lora", 125.0), ("paper", 268.0))])
    _write(tmp_path / "a", "bench_model_step_targets", {
        "targets": {step: {"dpkernels": {"extra_bytes_per_gated_param": 19.5, "meets_memory_target": True}}},
        "memory_target_extra_bytes_per_gated_param": 20.0, "device": GPU})
    # A later folder's rerun replaces the switch row (now 0.15 ms, met) and adds a model size whose
    # step time is NaN (not measured); its targets file adds that size without dropping the first's.
    base = "bert-base b64 s128"
    _write(tmp_path / "b", "bench_switch", [_row("switch", "triton", "restore+apply", shape, "bf16", 0.15)])
    _write(tmp_path / "b", "bench_model_step", [_row("model_step", p, "train", base, "bf16-autocast", float("nan"))
                                                for p in ("full", "dpkernels")])
    _write(tmp_path / "b", "bench_model_step_targets", {
        "targets": {base: {"dpkernels": {"extra_bytes_per_gated_param": 25.0, "meets_memory_target": False}}},
        "memory_target_extra_bytes_per_gated_param": 20.0, "device": GPU})
    # A CPU smoke run's files count for nothing.
    _write(tmp_path / "c", "bench_model_step_targets", {"targets": {step: {}}, "device": "cpu (x86_64, 2 cores)",
                                                        "memory_target_extra_bytes_per_gated_param": 20.0})

    text, verdicts = targets.report([str(tmp_path / d) for d in "abc"])
    v = _by_target(verdicts)
    assert v[f"DiffLinear (triton) / nn.Linear, {big}, <= 1.1"].met is True
    assert v[f"DiffLinear (triton) / nn.Linear, {big}, <= 1.1"].figure.startswith("1.05x")
    assert v[f"DiffLinear (triton) / nn.Linear, {mid}, <= 2.0"].met is False
    assert v["DiffLinear (triton) / nn.Linear, 8192x3072->768, <= 1.1"].met is None  # only a CPU row
    assert v["fixed-mask / nn.Linear, 8192x4096->4096, <= 0.8"].met is True
    assert v["fixed-mask / nn.Linear, 8192x4096->11008, <= 0.8"].met is None
    assert v["fixed-mask-overlap / nn.Linear, 8192x4096->4096, <= 0.8"].met is False
    assert "fixed-mask-overlap / nn.Linear, 8192x4096->11008, <= 0.8" not in v  # no rows: not listed
    memory = [x for x in verdicts if x.target.startswith("peak MB")]
    assert {x.target.split(") ")[1].split(",")[0]: x.met for x in memory if x.met is not None} == {big: False}
    assert v["gate forward (triton) 4096x11008, >= 90% of copy bandwidth"].met is True
    assert v["gate backward (triton) 4096x11008, >= 90% of copy bandwidth"].met is False
    assert v[f"task switch (triton), {shape}, <= 0.2 ms"].met is True
    serve = v["mixed batch of 16 tasks (MultiTask) / merged forward, bert-base b64 s128, <= 1.1"]
    assert serve.met is True and serve.figure.startswith("1.05x")
    assert v[f"model step dpkernels / full, {step}, <= 1.15 and faster than LoRA"].figure.startswith("1.12x")
    assert v[f"model step dpkernels / full, {step}, <= 1.15 and faster than LoRA"].met is True
    assert v[f"model step peak over full finetuning, {step}, <= 20 B per gated parameter"].met is True
    assert v[f"model step dpkernels / full, {base}, <= 1.15 and faster than LoRA"].met is None
    assert v[f"model step peak over full finetuning, {base}, <= 20 B per gated parameter"].met is False
    assert f"device {GPU}" in text and "commit abc1234" in text and "cpu" not in text.split("\n")[0]
    # The paths table: the fastest path at 8192x4096->11008 and auto's time over it.
    line = next(x for x in text.splitlines() if x.startswith(f"| {big} |"))
    assert line == f"| {big} | 3.2 | 3.5 | - | - | 3.1 | triton-unfused-overlap | 1.02 |"


def test_cli_prints_the_tables_and_rejects_a_missing_folder(tmp_path, capsys):
    _write(tmp_path, "bench_diff_linear", [_layer("nn.Linear", "8192x4096->4096", 1.0),
                                           _layer("fixed-mask", "8192x4096->4096", 0.9)])
    assert targets.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| fixed-mask / nn.Linear, 8192x4096->4096, <= 0.8 | 0.90x (0.9 / 1 ms vs nn.Linear) | **MISSED** |" in out
    assert out.rstrip().endswith("0 met, 1 missed, 24 not measured")
    with pytest.raises(SystemExit) as exc:
        targets.main([str(tmp_path / "absent")])
    assert exc.value.code == 2 and "no such folder" in capsys.readouterr().err


def test_folders_without_rows_and_broken_files_are_named(tmp_path, capsys):
    from benchmarks import targets

    with pytest.raises(SystemExit) as exit_info:
        targets.main([str(tmp_path)])
    assert exit_info.value.code == 2 and "no bench_*.json rows" in capsys.readouterr().err
    (tmp_path / "bench_gates.json").write_text('[{"op": "gates", "device": "cuda"}]')
    with pytest.raises(SystemExit):
        targets.main([str(tmp_path)])
    assert f"{tmp_path / 'bench_gates.json'}: not a benchmark rows file (KeyError: 'provider')" in \
        capsys.readouterr().err
