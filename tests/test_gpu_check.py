"""benchmarks/gpu_check.sh's quick stage, without the GPU machine: which tests it keeps, and a dry run
of the whole stage on the CPU (its control flow, deadlines and bundle).

The dry run puts stand-ins first on PATH, only here: an ``nvidia-smi`` printing one CSV line and a
``python3`` that runs the real interpreter except for the modules ``DRYRUN_STAND_INS`` names, which
it stands in for: "ok" prints a line and exits 0 (the build; pytest, whose selection is tested on
its own below; and what costs seconds here and is tested elsewhere: ``dpkernels info``,
bench_switch, the plots), "hang" sleeps past the step's deadline. The real bench_diff_linear gets
CPU-sized options appended (argparse keeps the last value, so the script's own sizes are still
parsed); benchmarks.targets runs as it is.
"""

import importlib.util
import json
import os
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from types import SimpleNamespace

import _quick
import pytest

ROOT = Path(__file__).resolve().parents[1]
HEADLINE_LAYERS = "8192x4096x11008,512x4096x4096"
HEADLINE_PROVIDERS = "nn.Linear,triton,triton-unfused,triton-fused,fixed-mask"

_PYTHON3 = f"""#!{sys.executable}
import json, os, sys, time
args = sys.argv[1:]
with open(os.environ["DRYRUN_CALLS"], "a") as f:
    f.write(json.dumps({{"args": args, "quick": os.environ.get("DPKERNELS_QUICK")}}) + "\\n")
module = args[1] if args[:1] == ["-m"] else None
stand_in = json.loads(os.environ["DRYRUN_STAND_INS"]).get(module)
if stand_in == "hang":
    print("hanging", flush=True)
    time.sleep(600)
if stand_in == "ok":
    print(module, "stand-in")
    sys.exit(0)
args += json.loads(os.environ["DRYRUN_CPU_ARGS"]).get(module, [])
os.execv(sys.executable, [sys.executable, *args])
"""
_NVIDIA_SMI = """#!/bin/sh
echo "name, driver_version, memory.total [MiB], clocks.max.sm [MHz]"
echo "NVIDIA H200 (dry-run stand-in), 000.00, 143771 MiB, 1980 MHz"
"""
CPU_ARGS = {"benchmarks.bench_diff_linear": ["--device", "cpu", "--layers", "4x16x24,2x24x16",
                                             "--providers", "nn.Linear,torch"]}
STAND_INS = {"pip": "ok", "pytest": "ok", "dpkernels": "ok", "benchmarks.bench_gates": "hang",
             "benchmarks.bench_switch": "ok", "benchmarks": "ok"}


def _stand_ins(folder: Path) -> Path:
    folder.mkdir()
    for name, text in (("python3", _PYTHON3), ("nvidia-smi", _NVIDIA_SMI)):
        (folder / name).write_text(text)
        (folder / name).chmod(0o755)
    return folder


def test_every_gpu_kernel_has_a_small_and_a_real_shape_pick():
    for kernel in _quick.KERNELS:
        sizes = {pick.real for pick in _quick.PICKS if kernel in pick.kernels}
        assert sizes == {False, True}, f"{kernel}: picks at {'real' if True in sizes else 'small'} shapes only"
    assert {k for pick in _quick.PICKS for k in pick.kernels} == set(_quick.KERNELS)


class _Item:
    """A collected test as _quick.select sees it: node id, parameters, whether it is cuda-marked."""

    def __init__(self, nodeid, cuda=True, **params):
        self.nodeid, self.cuda, self.callspec = nodeid, cuda, SimpleNamespace(params=params)

    def get_closest_marker(self, name):
        return object() if name == "cuda" and self.cuda else None


def test_quick_select_keeps_picked_and_unmarked_tests_and_refuses_a_stale_pick(monkeypatch):
    picks = [_quick.Pick("test_a.py::test_x", ("philox",), params=dict(n=9)),
             _quick.Pick("test_a.py::test_y", ("philox",), real=True)]
    monkeypatch.setattr(_quick, "PICKS", picks)
    small, other = _Item("tests/test_a.py::test_x[cuda-9]", n=9), _Item("tests/test_a.py::test_x[cuda-1]", n=1)
    cpu, real = _Item("tests/test_a.py::test_x[cpu-1]", cuda=False, n=1), _Item("tests/test_a.py::test_y")
    assert _quick.select([small, other, cpu, real]) == ([real, small, cpu], [other])
    with pytest.raises(ValueError, match=r"no cuda-marked test matches the pick\(s\) test_a.py::test_x \{'n': 9\}"):
        _quick.select([other, cpu, real])
    # Picks of a file that was not collected (a run of other files) are not stale.
    elsewhere = _Item("tests/test_b.py::test_z")
    assert _quick.select([elsewhere]) == ([], [elsewhere])


def test_quick_keeps_the_picked_cuda_tests_real_shapes_first():
    env = {**os.environ, "DPKERNELS_QUICK": "1"}
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "cuda", "-p",
                          "no:cacheprovider", "tests"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    kept, marked = map(int, re.search(r"DPKERNELS_QUICK=1: (\d+) of (\d+) cuda-marked tests", out.stdout).groups())
    ids = [line for line in out.stdout.splitlines() if "::" in line]
    assert len(ids) == kept and 100 < kept < marked / 3
    names = [i.split("[", 1)[0].rsplit("/", 1)[-1] for i in ids]
    real = {pick.test for pick in _quick.PICKS if pick.real}
    first_small = next(n for n, name in enumerate(names) if name not in real)
    assert set(names[:first_small]) == real and not real & set(names[first_small:])
    # A selection that kept a case the picks do not name, or dropped every case of a pick, would show here.
    assert {pick.test for pick in _quick.PICKS} == set(names)


@pytest.mark.skipif(sys.platform == "win32", reason="bash script")
def test_quick_stage_dry_run_bundles_every_step_and_stops_an_overrun(tmp_path):
    from benchmarks import bench_diff_linear

    bin_dir, calls = _stand_ins(tmp_path / "bin"), tmp_path / "calls.jsonl"
    budget = 35  # the tests' share (10 of 21 parts) over the 10 s pytest needs at least, even on a busy CPU
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "OUT": str(tmp_path / "out"),
           "GPU_CHECK_BUDGET": str(budget), "DPKERNELS_COMMIT": "dryrun1", "DRYRUN_CALLS": str(calls),
           "DRYRUN_CPU_ARGS": json.dumps(CPU_ARGS), "DRYRUN_STAND_INS": json.dumps(STAND_INS),
           "CUDA_VISIBLE_DEVICES": ""}
    for name in ("DPKERNELS_QUICK", "TESTS_TIMEOUT", "TEST_WORKERS", "PEFT_WHEEL"):  # the script's other knobs
        env.pop(name, None)
    start = time.monotonic()
    run = subprocess.run(["bash", "benchmarks/gpu_check.sh", "quick"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=budget + 60)
    elapsed = time.monotonic() - start
    assert run.returncode == 1, run.stdout[-3000:] + run.stderr[-3000:]  # 1: the stopped benchmark
    assert elapsed < budget + 20  # the deadlines held (targets.md and the plots have their own limits)

    steps = [json.loads(line) for line in calls.read_text().splitlines()]
    modules = [s["args"][1] for s in steps if s["args"][:1] == ["-m"]]
    assert modules[0] == "pip" and modules.index("pytest") < modules.index("benchmarks.bench_diff_linear") \
        < modules.index("benchmarks.bench_gates") < modules.index("benchmarks.bench_switch") \
        < modules.index("benchmarks.targets") < modules.index("benchmarks")  # the plots after the verdicts
    pytest_call = next(s for s in steps if s["args"][1] == "pytest")
    assert pytest_call["quick"] == "1" and pytest_call["args"][-2:] == ["-m", "cuda"]
    args = {s["args"][1]: s["args"] for s in steps}
    assert args["benchmarks.bench_diff_linear"][2:] == ["--out", str(tmp_path / "out" / "gpu_check-quick"),
                                                       "--layers", HEADLINE_LAYERS, "--providers", HEADLINE_PROVIDERS]
    assert set(HEADLINE_PROVIDERS.split(",")) <= set(bench_diff_linear.PROVIDERS)
    ext = ",cuda" if importlib.util.find_spec("dpkernels._C") else ""  # the extension's rows where it is built
    assert args["benchmarks.bench_gates"][-4:] == ["--shapes", "4096x11008", "--providers", f"triton{ext},copy"]
    assert args["benchmarks.bench_switch"][-2:] == ["--providers", "triton"]

    bundle = tmp_path / "out" / "gpu_check-quick.tgz"
    assert bundle.is_file() and not (tmp_path / "out" / "gpu_check-quick").exists()
    with tarfile.open(bundle) as tar:
        files = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
        text = {name: tar.extractfile(m).read().decode() for name, m in files.items()
                if name.endswith((".txt", ".log", ".md", ".json"))}
    assert {"gpu.txt", "install.log", "tests-cuda.log", "bench_diff_linear.log", "bench_diff_linear.csv",
            "bench_diff_linear.json", "bench_gates.log", "bench_switch.log", "targets.md", "suite.log"} <= set(files)
    assert "NVIDIA H200 (dry-run stand-in)" in text["gpu.txt"] and "commit dryrun1" in text["gpu.txt"]
    assert "gpu_check: bench_gates stopped at its deadline" in text["bench_gates.log"]
    assert "bench_gates.json" not in files  # stopped before it wrote a row
    rows = json.loads(text["bench_diff_linear.json"])
    assert [r["shape"] for r in rows if r["provider"] == "torch" and r["mode"] == "full"] == ["4x16->24", "2x24->16"]
    assert "stopped" not in text["bench_diff_linear.log"] + text["bench_switch.log"]
    assert "not measured" in text["targets.md"]  # CPU rows say nothing about the targets
