"""The Triton kernels write nothing outside their tensors (CPU under the interpreter, and on a GPU),
and no two programs of a launch race (under the interpreter).

Every launch runs with its float inputs and its outputs in the middle of larger buffers: the
launchers' own output allocations (torch.empty / torch.empty_like in the launcher modules) are
redirected into such buffers for the call. The guard zones around each are filled with NaN (and,
for the scatter targets, random bits) and must be bit for bit unchanged afterwards: no write
outside a tensor. A read outside an input that reaches a result brings a NaN into it, so the
results must be finite and equal, bit for bit, to those of an unguarded run; a stray read whose
value is never stored (a masked-off lane's load) stays invisible here, as it is harmless to the
results (on a GPU, compute-sanitizer's memcheck would still report it).

The interpreter runs a launch's programs one by one, which hides races between them: conftest.py
checks every interpreted launch of the suite for them (tests/_triton_races.py: no byte stored by
two programs, or loaded by one and stored by another). Here each kernel also shows that the check
saw several of its programs, and a planted race of each kind is caught.
"""

import contextlib
import importlib
import math

import pytest
import torch
from _triton_races import ProgramAccesses
from conftest import BIT_VIEW, INTERPRETED, TRITON_DEVICES, same_bits

from dpkernels.backends import load

pytestmark = pytest.mark.parametrize("device", TRITON_DEVICES)

L, R, BETA = -1.5, 1.5, 1.0


class Guards:
    """Buffers of [guard | tensor | guard]; check() asserts every guard kept its bits."""

    def __init__(self):
        self.zones = []  # (buffer, guard length, numel, snapshot of the buffer)

    def place(self, shape, dtype, device, fill=None):
        shape = tuple(shape)
        numel = math.prod(shape)
        guard = max(1024, numel)  # wider than any tile's overhang at these shapes
        buf = torch.empty(guard + numel + guard, dtype=dtype, device=device)
        if dtype.is_floating_point:
            buf.fill_(float("nan"))
        else:
            buf.fill_(-12345)
        view = buf[guard:guard + numel].view(shape)
        if fill is not None:
            view.copy_(fill)
        self.zones.append((buf, guard, numel, buf.clone()))
        return view

    def check(self):
        for buf, guard, numel, before in self.zones:
            bits, was = buf.view(BIT_VIEW[buf.dtype]), before.view(BIT_VIEW[buf.dtype])
            assert torch.equal(bits[:guard], was[:guard]), "a write before the tensor"
            assert torch.equal(bits[guard + numel:], was[guard + numel:]), "a write past the tensor"


class _GuardedTorch:
    """What the launcher modules see as `torch` within guarded_outputs: torch, but for empty and
    empty_like, which place their tensors between guard zones."""

    def __init__(self, guards):
        self._guards = guards

    def empty(self, *size, dtype=None, device=None, **kwargs):
        shape = size[0] if len(size) == 1 and isinstance(size[0], (tuple, list, torch.Size)) else size
        return self._guards.place(shape, dtype or torch.get_default_dtype(), device or "cpu")

    def empty_like(self, t, dtype=None, device=None, **kwargs):
        return self._guards.place(t.shape, dtype or t.dtype, device or t.device)

    def __getattr__(self, name):
        return getattr(torch, name)


@contextlib.contextmanager
def guarded_outputs(guards):
    """The Triton launchers' output allocations go between guard zones (within the block); torch
    itself, and the interpreter, keep the real allocator."""
    modules = [importlib.import_module(f"dpkernels.backends.triton.{name}")
               for name in ("gates", "diff_linear", "sddmm", "scatter")]
    for module in modules:
        module.torch = _GuardedTorch(guards)
    try:
        yield
    finally:
        for module in modules:
            module.torch = torch


def _no_races():
    """(accesses, recording): `with recording():` records the block's Triton launches, for
    accesses.check() (interpreter only: on a GPU it records nothing)."""
    accesses = ProgramAccesses()
    return accesses, accesses.recording if INTERPRETED else contextlib.nullcontext


def _run_guarded(launch, inputs: dict, device) -> ProgramAccesses:
    """launch(**inputs) plain, then with every float input and output between guard zones:
    the same results bit for bit, finite, every guard zone intact and, interpreted, no races
    between programs. Returns the recorded accesses."""
    inputs = {name: t.to(device) if isinstance(t, torch.Tensor) else t for name, t in inputs.items()}
    plain = launch(**{name: t.clone() if isinstance(t, torch.Tensor) else t for name, t in inputs.items()})
    guards = Guards()
    placed = {name: guards.place(t.shape, t.dtype, device, fill=t)
              if isinstance(t, torch.Tensor) and t.dtype.is_floating_point else t for name, t in inputs.items()}
    accesses, recording = _no_races()
    with guarded_outputs(guards), recording():
        got = launch(**placed)
    guards.check()
    accesses.check()
    as_tuple = lambda out: (out,) if isinstance(out, torch.Tensor) else out  # noqa: E731
    for a, b in zip(as_tuple(plain), as_tuple(got), strict=True):
        assert same_bits(a, b)
        assert torch.isfinite(b.float()).all()
    return accesses


def _randn(gen, *shape, scale=1.0):
    return torch.randn(*shape, generator=gen) * scale


@pytest.mark.parametrize("n", [1, 9, 1031])
@pytest.mark.parametrize("training", [True, False])
def test_gate_kernels_stay_inside_their_tensors(device, n, training):
    tk, gen = load("triton"), torch.Generator().manual_seed(n)
    la, w, g = _randn(gen, n, scale=3), _randn(gen, n), _randn(gen, n).bfloat16()
    theta0 = _randn(gen, n).half()
    gates = dict(seed=7, offset=2**32 - 5, training=training, l=L, r=R, beta=BETA)
    runs = [
        _run_guarded(lambda **a: tk.gate_forward(a["la"], **gates), dict(la=la), device),
        _run_guarded(lambda **a: tk.gate_forward(a["la"], **gates, theta0=a["theta0"], diff=a["w"],
                                                 out_dtype=torch.bfloat16), dict(la=la, theta0=theta0, w=w), device),
        _run_guarded(lambda **a: tk.gate_backward(a["g"], a["w"], a["la"], **gates, l0_lambda=0.1),
                     dict(g=g, w=w, la=la), device),
        _run_guarded(lambda **a: tk.gate_backward(a["g"], a["w"], a["la"], **gates, l0_lambda=0.1,
                                                  grad_diff=a["gd"], grad_log_alpha=a["gla"]),
                     dict(g=g, w=w, la=la, gd=_randn(gen, n), gla=_randn(gen, n)), device),
    ]
    if INTERPRETED and n > 1024:  # two blocks of 1024: the race check compared two programs
        kernels = ["_gate_forward_kernel"] * 2 + ["_gate_backward_kernel"] * 2
        assert all(acc.programs(name) == 2 for acc, name in zip(runs, kernels, strict=True))


@pytest.mark.parametrize("m,k,n,slices", [(1, 1, 1, None), (5, 341, 9, None), (17, 9, 70, None), (33, 64, 48, None),
                                           (5, 341, 9, 3), (33, 64, 48, 7)])
def test_fused_linear_kernels_stay_inside_their_tensors(device, m, k, n, slices, monkeypatch):
    """slices: split-K forced (the fp32 workspace guarded too; 7 slices of 3-4 steps: some empty)."""
    if slices is not None:
        module = importlib.import_module("dpkernels.backends.triton.diff_linear")
        monkeypatch.setattr(module, "_split_slices", lambda *args: slices)
    tk, gen = load("triton"), torch.Generator().manual_seed(m + k + n)
    inputs = dict(x=_randn(gen, m, k), gy=_randn(gen, m, n), theta0=_randn(gen, n, k, scale=k**-0.5),
                  diff=_randn(gen, n, k, scale=0.5), la=_randn(gen, n, k, scale=2.0), bias=_randn(gen, n))
    gates = dict(seed=3, offset=0, training=True, l=L, r=R, beta=BETA)
    runs = [
        _run_guarded(lambda **a: tk.gated_linear(a["x"], a["theta0"], a["diff"], a["la"], a["bias"], **gates),
                     inputs, device),
        _run_guarded(lambda **a: tk.gated_linear_grad_input(a["gy"], a["theta0"], a["diff"], a["la"], **gates),
                     inputs, device),
        _run_guarded(lambda **a: tk.gated_linear_grad_weight(a["gy"], a["x"], a["diff"], a["la"], **gates,
                                                             l0_lambda=1e-3), inputs, device),
    ]
    if INTERPRETED and min(m, k, n) > 16:  # several 16x16 tiles each way: programs were compared
        kernels = ["_gated_matmul_kernel"] * 2 + ["_gated_wgrad_kernel"]
        assert all(acc.programs(name) > 2 for acc, name in zip(runs, kernels, strict=True))


@pytest.mark.parametrize("m,k,n", [(1, 1, 1), (9, 41, 9), (130, 24, 16)])
def test_sddmm_kernel_stays_inside_its_tensors(device, m, k, n, monkeypatch):
    tk, gen = load("triton"), torch.Generator().manual_seed(m + k + n)
    module = importlib.import_module("dpkernels.backends.triton.sddmm")
    monkeypatch.setattr(module, "gathers_cheaper", lambda *shape: True)  # the kernel, not the dense GEMM
    monkeypatch.setattr(module, "CHUNK_BYTES", 1)  # one launch per BLOCK_M tokens: several at m = 9 and 130
    monkeypatch.setattr(module, "_BLOCK_J", 32)  # several programs over these few entries
    index = torch.randperm(n * k, generator=gen)[: max(1, n * k // 3)].sort().values.to(device)
    accesses = _run_guarded(lambda **a: tk.sddmm(a["gy"], a["x"], index, k),
                            dict(gy=_randn(gen, m, n), x=_randn(gen, m, k)), device)
    assert not INTERPRETED or n < 9 or accesses.programs("_sddmm_kernel") > 2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64], ids=str)
def test_scatter_kernels_stay_inside_their_tensors(device, dtype):
    tk, gen = load("triton"), torch.Generator().manual_seed(4)
    guards = Guards()
    sizes = [1, 9, 341, 1030, 3100]  # over 1024 entries: two programs, checked for races between them
    # Each target between random-bit guards (a stray write of a merged value would change them).
    targets = [guards.place((s,), dtype, device, fill=_randn(gen, s).to(dtype)) for s in sizes]
    for buf, guard, numel, _ in guards.zones:
        noise = torch.randint(-2**15, 2**15, buf.shape, generator=gen).to(BIT_VIEW[dtype])
        buf.view(BIT_VIEW[dtype])[:guard] = noise[:guard]
        buf.view(BIT_VIEW[dtype])[guard + numel:] = noise[guard + numel:]
    guards.zones = [(buf, guard, numel, buf.clone()) for buf, guard, numel, _ in guards.zones]
    originals = [t.clone() for t in targets]
    counts = [max(1, s // 3) for s in sizes]
    index = torch.cat([torch.randperm(s, generator=gen)[:c].sort().values for s, c in zip(sizes, counts, strict=True)])
    ids = torch.repeat_interleave(torch.arange(len(sizes), dtype=torch.int32), torch.tensor(counts)).to(device)
    index = index.to(device)
    values = guards.place(index.shape, torch.float32, device, fill=_randn(gen, index.numel()))
    saved = guards.place(index.shape, dtype, device)
    table = torch.tensor([t.data_ptr() for t in targets], dtype=torch.int64, device=device)
    starts = [0, *torch.tensor(counts).cumsum(0).tolist()]
    accesses, recording = _no_races()
    with recording():
        tk.scatter_apply(targets, table, ids, index, values, starts, saved)
    guards.check()
    assert any(not same_bits(t, o) for t, o in zip(targets, originals, strict=True))
    with recording():
        tk.scatter_restore(targets, table, ids, index, starts, saved)
    guards.check()
    accesses.check()
    assert not INTERPRETED or accesses.programs("_scatter_apply_kernel") == accesses.programs(
        "_scatter_restore_kernel") == 2
    assert all(same_bits(t, o) for t, o in zip(targets, originals, strict=True))


def test_the_guards_catch_a_write_past_a_tensor(device):
    guards = Guards()
    t = guards.place((10,), torch.float32, device)
    buf, guard, _, _ = guards.zones[0]
    buf[guard + 10] = 1.0  # one element past t
    with pytest.raises(AssertionError, match="a write past the tensor"):
        guards.check()
    assert t.shape == (10,)


def _planted_race_kernels():
    """Three two-program kernels over x: each program stores into x[0] (a race), stores into its
    own slot what the other program's slot held (a race), or adds one to its own slot (none)."""
    import triton
    import triton.language as tl

    @triton.jit
    def store_first(X):
        tl.store(X, tl.program_id(0).to(tl.float32))

    @triton.jit
    def swap_in_place(X):
        pid = tl.program_id(0)
        tl.store(X + pid, tl.load(X + 1 - pid))

    @triton.jit
    def own_slot(X):
        pid = tl.program_id(0)
        tl.store(X + pid, tl.load(X + pid) + 1.0)

    return store_first, swap_in_place, own_slot


def test_the_race_check_catches_planted_races(device):
    if not INTERPRETED:
        pytest.skip("the race check records the interpreter's programs")
    store_first, swap_in_place, own_slot = _planted_race_kernels()
    for kernel, message in [(store_first, r"store_first: programs \[0, 1\] all store byte"),
                            (swap_in_place, r"swap_in_place: program \d loads byte 0x[0-9a-f]+, which program \d")]:
        accesses = ProgramAccesses()
        with accesses.recording():
            kernel[(2,)](torch.zeros(2, device=device))
        with pytest.raises(AssertionError, match=message):
            accesses.check()
    accesses, x = ProgramAccesses(), torch.zeros(2, device=device)
    with accesses.recording():
        own_slot[(2,)](x)
    accesses.check()
    assert x.tolist() == [1.0, 1.0] and accesses.programs("own_slot") == 2
