"""pytest-benchmark set-up for ``pytest benchmarks/ --benchmark-only`` (kept out of the default run:
pyproject's testpaths is tests/).

The micro-benchmarks run on the torch backend, so they measure the same code on every machine; on
a machine without CUDA, TRITON_INTERPRET=1 is set before anything imports a Triton kernel anyway
(as in tests/conftest.py), so a Triton call that slips in still runs, through the interpreter.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _torch_backend(monkeypatch):
    monkeypatch.setenv("DPKERNELS_BACKEND", "torch")
    monkeypatch.delenv("DPKERNELS_CHECK_FINITE", raising=False)
