"""bench_switch runs end to end on a tiny BERT (CPU; Triton through the interpreter when enabled)."""

import json

from benchmarks import bench_switch
from tests.conftest import INTERPRETED


def test_bench_switch_smoke(tmp_path):
    providers = ["torch", "index_add", "dense"] + (["triton"] if INTERPRETED else [])
    assert bench_switch.main(["--device", "cpu", "--layers", "1", "--hidden", "32", "--heads", "2", "--vocab", "50",
                              "--providers", ",".join(providers), "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "bench_switch.json").read_text())
    assert {r["provider"] for r in rows} == set(providers)
    assert all(r["op"] == "switch" and r["ms"] > 0 and r["dtype"] == "bf16" for r in rows)
    size = json.loads((tmp_path / "bench_switch_size.json").read_text())
    # BertModel: 3 embeddings + 2 LayerNorm + per layer 16 tensors + the pooler's 2.
    assert size["tensors"] == 23
    assert size["nnz"] == round(0.005 * size["params"])
    assert 0 < size["diff_file_bytes"] < size["dense_bf16_checkpoint_bytes"]
    assert size["switcher_restores_base_bit_exact"] is True
    assert size["index_add_drifted_elements_after_100_round_trips"] > 0  # the naive loop drifts in bf16


def test_bench_inference_serve_rows_smoke(tmp_path):
    """The mixed-task serving rows on a toy BERT: the merged forward, MultiTask and the switch loop
    per task count, and the mixed batch's logits equal to the switch loop's."""
    import re

    from benchmarks import bench_inference

    assert bench_inference.main(["--device", "cpu", "--providers", "multitask,switch-loop", "--serve-model", "toy",
                                 "--tasks", "1,2", "--reps", "2", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "bench_inference.json").read_text())
    assert [(r["provider"], r["shape"]) for r in rows] == [
        ("merged", "bert-toy b2 s8 T1"), ("multitask", "bert-toy b2 s8 T1"), ("switch-loop", "bert-toy b2 s8 T1"),
        ("multitask", "bert-toy b2 s8 T2"), ("switch-loop", "bert-toy b2 s8 T2")]
    assert all(r["op"] == "serve_mixed" and r["mode"] == "eval" and r["ms"] > 0 and r["dtype"] == "float32"
               for r in rows)
    for r in rows[1:]:
        assert "x merged" in r["notes"]
        diff = float(re.search(r"max \|multitask - switch-loop\| logit (\S+)", r["notes"]).group(1))
        assert diff < 1e-5, r["notes"]  # fp32: the same logits up to rounding (a wrong task would be ~0.1)
