"""Test set-up: Triton kernels run under the interpreter on CPU-only machines.

TRITON_INTERPRET must be set before the first @triton.jit runs; dpkernels imports its Triton
kernels lazily, so setting it here (before any test module imports them) is enough. With a GPU
the real kernels run and the cuda-marked tests are collected too.
"""

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
# Under pytest-xdist (the README's test command: -n 2) each worker takes its share of the cores, so
# that two workers' torch thread pools do not contend for the same two.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    torch.set_num_threads(max(1, torch.get_num_threads() // _WORKERS))
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
# On a GPU the fused kernels launch one fixed tile: autotuning would compile all of them for every
# specialisation the suite hits (minutes); test_fused_diff_linear.py checks every tile, and the
# autotuner once, explicitly.
os.environ.setdefault("DPKERNELS_AUTOTUNE", "0")
# The torch backend's CPU gate passes stay on the eager reference below 2**18 elements: the tests of
# the torch backend check the oracle itself, and fusing every test tensor compiles a graph per dtype
# combination (CI: +3.5 min). test_torch_fused.py tests the fused passes, at the default threshold too.
os.environ.setdefault("DPKERNELS_CPU_FUSE_MIN", str(1 << 18))
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def _cuda_ext_missing() -> str | None:
    """Why the cuda backend (the compiled dpkernels._C) cannot load here, or None when it loads."""
    from dpkernels import backends

    try:
        backends.load("cuda")
    except backends.BackendUnavailable as exc:
        return str(exc)
    return None


CUDA_EXT_MISSING = _cuda_ext_missing()

# (device, backend) pairs every backend-parametrized test runs on.
_CASES = [("cpu", "torch"), ("cpu", "triton"), ("cuda", "torch"), ("cuda", "triton"), ("cuda", "cuda")]


def _case_marks(device: str, backend: str):
    marks = []
    if device == "cuda":
        marks += [pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")]
    if device == "cpu" and backend == "triton":
        marks.append(pytest.mark.skipif(not INTERPRETED, reason="Triton on CPU needs TRITON_INTERPRET=1"))
    if backend == "cuda":
        marks.append(pytest.mark.skipif(CUDA_EXT_MISSING is not None, reason=f"{CUDA_EXT_MISSING}"))
    return marks


BACKEND_CASES = [pytest.param((d, b), id=f"{d}-{b}", marks=_case_marks(d, b)) for d, b in _CASES]
# Devices for tests of the torch code paths alone.
DEVICES = [pytest.param("cpu"), pytest.param("cuda", marks=_case_marks("cuda", "torch"))]
# Devices where Triton kernels can run (CPU only through the interpreter).
TRITON_DEVICES = [pytest.param(d, marks=_case_marks(d, "triton")) for d in ("cpu", "cuda")]


@pytest.fixture(autouse=True)
def _default_backend_env(monkeypatch):
    """Every test starts from DPKERNELS_BACKEND unset (auto), the auto diff-linear path (routing in
    order), and no finite-check override."""
    for name in ("DPKERNELS_BACKEND", "DPKERNELS_DIFF_LINEAR", "DPKERNELS_OVERLAP_WGRAD", "DPKERNELS_CHECK_FINITE"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(autouse=True)
def _no_races_between_programs():
    """Every interpreted Triton launch of every test: no two programs store one byte, none loads a
    byte another stores (the interpreter runs programs one by one, so a race would not show in the
    results; tests/_triton_races.py)."""
    if not INTERPRETED or importlib.util.find_spec("triton") is None:
        yield
        return
    from _triton_races import ProgramAccesses

    accesses = ProgramAccesses()
    with accesses.recording():
        yield
    accesses.check()


@pytest.fixture(params=BACKEND_CASES)
def device_backend(request, monkeypatch):
    """(device, backend) with DPKERNELS_BACKEND set to that backend."""
    device, backend = request.param
    monkeypatch.setenv("DPKERNELS_BACKEND", backend)
    return device, backend


# Same-size integer dtypes, to compare tensors bit for bit (-0.0 != 0.0, NaN payloads count).
BIT_VIEW = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32,
            torch.float64: torch.int64, torch.int32: torch.int32, torch.int64: torch.int64}


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether a and b have the same dtype, shape and bits."""
    return (a.dtype == b.dtype and a.shape == b.shape
            and torch.equal(a.reshape(-1).view(BIT_VIEW[a.dtype]), b.reshape(-1).view(BIT_VIEW[b.dtype])))


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_close_by_rule(kernel, torch_same_dtype, oracle, atol: float, name: str = "") -> None:
    """DESIGN.md's rule: err(kernel) <= 2 * err(torch in the same dtype) + atol, errors vs the fp64 oracle."""
    assert kernel.shape == oracle.shape, f"{name}: shape {tuple(kernel.shape)} != {tuple(oracle.shape)}"
    assert torch.isfinite(kernel).all(), f"{name}: non-finite values"
    err_kernel = max_err(kernel, oracle)
    err_torch = max_err(torch_same_dtype, oracle)
    assert err_kernel <= 2 * err_torch + atol, (
        f"{name}: kernel error {err_kernel:.3g} > 2 * torch error {err_torch:.3g} + atol {atol:.3g}")


def far_from_clamp(log_alpha: torch.Tensor, seed, offset: int, training: bool, l=-1.5, r=1.5, beta=1.0):
    """Mask of the gates whose float64 sbar is not within 1e-5 of 0 or 1, where fp32 may round across
    the clamp (and so legitimately differ from the oracle in dz/dlog_alpha)."""
    from dpkernels import reference

    la = log_alpha.double()
    if training:
        u = reference.uniform(seed, la.numel(), offset, la.device).reshape(la.shape).double()
        s = torch.sigmoid((u.log() - (1 - u).log() + la) / beta)
    else:
        s = torch.sigmoid(la)
    sbar = s * (r - l) + l
    return (sbar.abs() > 1e-5) & ((sbar - 1).abs() > 1e-5)


QUICK = os.environ.get("DPKERNELS_QUICK") == "1"  # the quick GPU run's subset of the cuda-marked tests
_QUICK_SUMMARY = pytest.StashKey[str]()


def pytest_collection_modifyitems(config, items):
    """DPKERNELS_QUICK=1: of the cuda-marked tests, only those tests/_quick.py picks (every GPU kernel
    at a small and a real shape), the real-shape ones first."""
    if not QUICK:
        return
    from _quick import select

    cuda_marked = sum(item.get_closest_marker("cuda") is not None for item in items)
    try:
        kept, deselected = select(items)
    except ValueError as exc:
        raise pytest.UsageError(str(exc)) from None
    if deselected:
        config.hook.pytest_deselected(items=deselected)
    items[:] = kept
    config.stash[_QUICK_SUMMARY] = (f"DPKERNELS_QUICK=1: {cuda_marked - len(deselected)} of {cuda_marked} "
                                    "cuda-marked tests")


def pytest_report_collectionfinish(config):
    return config.stash.get(_QUICK_SUMMARY, [])


def sm90_tools_missing() -> str | None:
    """Why Triton cannot compile for sm_90 here (no triton, or its ptxas/cuobjdump missing), or None."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return None if os.path.exists(tool) else "triton's NVIDIA backend tools (ptxas, cuobjdump) are missing"


def run_sm90_compiles(args: list[str]) -> subprocess.CompletedProcess:
    """`python ARGS` from the repository root in a fresh process that compiles for real: without
    TRITON_INTERPRET (set above for this process) and without DPKERNELS_AUTOTUNE=0 (every config)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "DPKERNELS_AUTOTUNE")}
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    run = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=root, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    return run
