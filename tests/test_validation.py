"""Bad input gets a clear Python error; backend dispatch honours DPKERNELS_BACKEND."""

import pytest
import torch
from conftest import CUDA_EXT_MISSING

import dpkernels


def _layer_args(n=4, k=6, **over):
    args = dict(x=torch.randn(3, k), weight=torch.randn(n, k), bias=torch.randn(n), diff=torch.zeros(n, k),
                log_alpha=torch.zeros(n, k), bias_diff=torch.zeros(n), bias_log_alpha=torch.zeros(n))
    args.update(over)
    return args


def _call(**over):
    a = _layer_args(**{k: v for k, v in over.items() if k in _layer_args()})
    kw = {k: v for k, v in over.items() if k not in a}
    kw.setdefault("seed", 1)
    return dpkernels.diff_linear(a["x"], a["weight"], a["bias"], a["diff"], a["log_alpha"], a["bias_diff"],
                                 a["bias_log_alpha"], **kw)


@pytest.mark.parametrize("over,error,match", [
    (dict(x=torch.randn(3, 5)), ValueError, "in_features = 6"),
    (dict(x=torch.tensor(1.0)), ValueError, "last dimension"),
    (dict(x=torch.ones(3, 6, dtype=torch.int64)), TypeError, "x must be a floating-point"),
    (dict(x=[[1.0] * 6]), TypeError, "x must be a torch.Tensor"),
    (dict(weight=torch.randn(4, 6, 1)), ValueError, "weight must be 2-D"),
    (dict(diff=torch.zeros(6, 4)), ValueError, r"diff has shape \(6, 4\), weight has \(4, 6\)"),
    (dict(log_alpha=torch.zeros(4, 5)), ValueError, "log_alpha has shape"),
    (dict(log_alpha=torch.zeros(4, 6, dtype=torch.float64)), TypeError, "must share a dtype"),
    (dict(diff=torch.zeros(4, 6, dtype=torch.int32)), TypeError, "diff must be a floating-point"),
    (dict(bias=torch.randn(5)), ValueError, r"bias has shape \(5,\)"),
    (dict(bias_diff=torch.zeros(3)), ValueError, "bias_diff has shape"),
    (dict(bias_log_alpha=None), ValueError, "both bias_diff and bias_log_alpha"),
    (dict(bias=None), ValueError, "bias_diff given for a layer without bias"),
    (dict(x=torch.randn(3, 6, device="meta")), ValueError, "x is on meta, weight on cpu"),
    (dict(diff=torch.zeros(4, 6, device="meta")), ValueError, "diff is on meta"),
    (dict(seed=None), ValueError, "need a seed"),
    (dict(seed=2**64), ValueError, "seed must lie in"),
    (dict(seed=1.5), TypeError, "seed must be an integer"),
    (dict(l=0.5), ValueError, "l must be < 0"),
    (dict(r=1.0), ValueError, "r must be > 1"),
    (dict(beta=-1.0), ValueError, "beta must be > 0"),
    (dict(beta=float("nan")), ValueError, "finite number"),
])
def test_diff_linear_rejects_bad_input(over, error, match):
    with pytest.raises(error, match=match):
        _call(**over)


def test_non_finite_log_alpha_on_the_training_path_is_checked_on_request(monkeypatch):
    bad = torch.zeros(4, 6)
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        _call(log_alpha=bad, check_finite_log_alpha=True)
    _call(log_alpha=bad)  # the hot path pays no host sync unless asked
    monkeypatch.setenv("DPKERNELS_CHECK_FINITE", "1")
    with pytest.raises(ValueError, match="NaN or infinite"):
        _call(log_alpha=bad)


def test_gate_functions_reject_bad_input():
    with pytest.raises(TypeError, match="log_alpha must be a torch.Tensor"):
        dpkernels.sample_gates([0.0], 1)
    with pytest.raises(ValueError, match="offset must satisfy"):
        dpkernels.sample_gates(torch.zeros(3), 1, offset=-1)
    with pytest.raises(ValueError, match="offset must satisfy"):
        dpkernels.sample_gates(torch.zeros(3), 1, offset=2**63 - 2)
    with pytest.raises(TypeError, match="offset must be an int"):
        dpkernels.sample_gates(torch.zeros(3), 1, offset=1.0)
    with pytest.raises(ValueError, match="r must be > 1"):
        dpkernels.eval_gates(torch.zeros(3), r=0.5)
    with pytest.raises(ValueError, match="l must be < 0"):
        dpkernels.expected_l0(torch.zeros(3), l=0.0)


def test_backend_names_are_validated(monkeypatch):
    monkeypatch.setenv("DPKERNELS_BACKEND", "cudnn")
    with pytest.raises(ValueError, match="not one of auto, triton, cuda, torch"):
        dpkernels.sample_gates(torch.zeros(3), 1)
    from dpkernels import backends

    with pytest.raises(ValueError, match="unknown backend 'cudnn'"):  # not sent to the cuda loader
        backends.load("cudnn")


def test_explicit_unavailable_backend_raises(monkeypatch):
    monkeypatch.setenv("DPKERNELS_BACKEND", "cuda")
    with pytest.raises(dpkernels.BackendUnavailable, match="runs on CUDA tensors"):
        dpkernels.sample_gates(torch.zeros(3), 1)
    monkeypatch.setenv("DPKERNELS_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # CPU tensors pass the device check, also on a GPU machine
    with pytest.raises(dpkernels.BackendUnavailable, match="float32"):
        dpkernels.sample_gates(torch.zeros(3, dtype=torch.float64), 1)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(dpkernels.BackendUnavailable, match="TRITON_INTERPRET"):
        dpkernels.sample_gates(torch.zeros(3), 1)


def test_auto_picks_a_backend_that_can_run_and_reports_it():
    dpkernels.sample_gates(torch.zeros(3, dtype=torch.float64), 1)
    dpkernels.diff_linear(**_layer_args(), seed=3)
    report = dpkernels.info()
    assert report["requested"] == "auto"
    assert report["last_used"]["sample_gates"] == "torch"  # CPU tensors: the reference
    assert report["last_used"]["diff_linear"] == "torch"
    assert report["backends"]["torch"]["available"] is True
    assert report["backends"]["cuda"]["available"] is (CUDA_EXT_MISSING is None)  # built or not
    assert set(report) >= {"dpkernels", "torch", "triton", "cuda_device", "backends", "last_used"}
