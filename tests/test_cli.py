"""The dpkernels command and the benchmark scripts run end to end (small sizes, CPU)."""

import json

from dpkernels.cli import main, run_demo


def test_demo_recovers_a_planted_sparse_diff():
    result = run_demo(features=64, steps=200, samples=1024, log=lambda *_: None)
    # 20 planted entries of 4096; the L0 penalty must prune nearly all the rest of the gates,
    # and the kept diff must explain the task far better than the base layer does.
    assert result["planted_nonzeros"] == 20
    assert result["expected_l0"] < 0.05 * 64 * 64
    assert result["mse_diff_pruned"] < 0.01 * result["mse_base"]
    assert result["support_recovered"] >= 0.9


def test_info_prints_the_backends(capsys):
    assert main(["info"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["backends"]["torch"]["available"] is True


def test_benchmark_scripts_smoke(tmp_path):
    from benchmarks import bench_diff_linear, bench_gates

    assert bench_gates.main(["--device", "cpu", "--shapes", "16x24", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "bench_gates.json").read_text())
    assert {(r["provider"], r["mode"]) for r in rows} == {("torch", "forward"), ("torch", "backward")}
    assert bench_diff_linear.main(["--device", "cpu", "--tokens", "4", "--shapes", "16x24",
                                   "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "bench_diff_linear.json").read_text())
    assert {r["provider"] for r in rows} == {"nn.Linear", "torch"} and all(r["ms"] > 0 for r in rows)
