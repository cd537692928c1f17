"""The reference Philox stream: Random123's known answers, and bit-identity with Triton's tl.rand
(and with the kernels' own Philox, gates._uniform, which forms each product in one wide multiply)."""

import pytest
import torch
import triton
import triton.language as tl
from conftest import DEVICES, TRITON_DEVICES

from dpkernels import reference as ref
from dpkernels.backends.triton.gates import _uniform

# Random123's known-answer tests for Philox4x32-10 (kat_vectors): counter, key, output.
_KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("counter,key,expected", _KAT)
def test_philox4x32_known_answers(counter, key, expected):
    words = [torch.tensor([c], dtype=torch.int64) for c in counter]
    out = ref.philox4x32(key[0] | (key[1] << 32), *words)
    assert [int(o) for o in out] == list(expected)


@triton.jit
def _rand_probe_kernel(OFF_ptr, U_ptr, I_ptr, OWN_ptr, seed, n, BLOCK: tl.constexpr):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n
    offs = tl.load(OFF_ptr + idx, mask=mask, other=0)
    tl.store(U_ptr + idx, tl.rand(seed, offs), mask=mask)
    tl.store(I_ptr + idx, tl.randint(seed, offs), mask=mask)
    tl.store(OWN_ptr + idx, _uniform(seed, offs), mask=mask)


def _triton_rand(seed: int, offsets: torch.Tensor):
    """(tl.rand, tl.randint, gates._uniform) at the offsets, from one launch."""
    signed = seed - (1 << 64) if seed >= (1 << 63) else seed
    u = torch.full(offsets.shape, float("nan"), device=offsets.device)  # poisoned
    own = torch.full(offsets.shape, float("nan"), device=offsets.device)
    i = torch.full(offsets.shape, -7, dtype=torch.int32, device=offsets.device)
    n = offsets.numel()
    _rand_probe_kernel[(triton.cdiv(n, 256),)](offsets, u, i, own, signed, n, BLOCK=256)
    return u, i, own


def _seeds():
    gen = torch.Generator().manual_seed(1234)
    randoms = [int.from_bytes(torch.randint(0, 256, (8,), generator=gen, dtype=torch.uint8).numpy().tobytes(),
                              "little") for _ in range(6)]
    return [0, 1, 2**31 - 1, 2**31, 2**32 - 1, 2**32 + 17, 2**63 - 1, 2**63, 2**64 - 1] + randoms


def _offsets(device):
    gen = torch.Generator().manual_seed(99)
    parts = [
        torch.arange(0, 3000),
        torch.randint(0, 2**31, (2000,), generator=gen),
        torch.randint(0, 2**40, (2000,), generator=gen),  # counters with a nonzero high word
        torch.arange(2**31 - 64, 2**31 + 64),
        torch.arange(2**32 - 64, 2**32 + 64),
        torch.tensor([2**62 + 12345, 2**63 - 1]),
    ]
    return torch.cat(parts).to(device)


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("seed", _seeds())
def test_reference_philox_matches_tl_rand_bit_for_bit(seed, device):
    offsets = _offsets(device)
    u_triton, i_triton, u_own = _triton_rand(seed, offsets)
    assert torch.equal(ref.philox_randint(seed, offsets), i_triton)
    u_ref = ref.philox_uniform(seed, offsets)
    assert torch.equal(u_ref.view(torch.int32), u_triton.view(torch.int32))
    assert torch.equal(u_own.view(torch.int32), u_triton.view(torch.int32))
    assert (u_ref >= 0).all() and (u_ref < 1).all()


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_reference_philox_matches_tl_rand_over_a_real_layers_counters(device):
    """The counters one gate draw of a LLaMA-7B MLP weight takes (45M, from an offset that crosses
    the high word's boundary) on a GPU, bit for bit; on the CPU a stand-in of a few blocks."""
    n = 4096 * 11008 if device == "cuda" else 3000
    offsets = torch.arange(n, device=device) + (2**32 - n // 2)
    seed = 2**63 + 12345
    u_triton, i_triton, u_own = _triton_rand(seed, offsets)
    assert torch.equal(ref.philox_randint(seed, offsets), i_triton)
    assert torch.equal(ref.philox_uniform(seed, offsets).view(torch.int32), u_triton.view(torch.int32))
    assert torch.equal(u_own.view(torch.int32), u_triton.view(torch.int32))


def test_negative_seed_is_twos_complement():
    offsets = torch.arange(100)
    assert torch.equal(ref.philox_uniform(-1, offsets), ref.philox_uniform(2**64 - 1, offsets))
    assert torch.equal(ref.philox_uniform(-(2**63), offsets), ref.philox_uniform(2**63, offsets))


def test_chunked_emulation_matches_unchunked(monkeypatch):
    offsets = torch.arange(10_000) * 7919
    whole = ref.philox_uniform(42, offsets)
    monkeypatch.setattr(ref, "_CHUNK", 1000)
    assert torch.equal(ref.philox_uniform(42, offsets), whole)


def test_uniform_covers_the_range_evenly():
    u = ref.uniform(7, 1 << 20)
    assert u.dtype == torch.float32
    hist = torch.histc(u, bins=16, min=0, max=1)
    expected = u.numel() / 16
    # Poisson noise per bin ~ sqrt(65536) = 256; 6 sigma.
    assert (hist - expected).abs().max() < 6 * expected**0.5


@pytest.mark.parametrize("bad", [None, 1.5, "3", True, 2**64, -(2**63) - 1])
def test_bad_seed_raises(bad):
    with pytest.raises((TypeError, ValueError)):
        ref.normalize_seed(bad)


def test_bad_offsets_raise():
    with pytest.raises(ValueError, match="non-negative"):
        ref.philox_uniform(0, torch.tensor([-1]))
    with pytest.raises(TypeError):
        ref.philox_uniform(0, torch.tensor([1.0]))


@pytest.mark.parametrize("device", DEVICES)
def test_reference_stream_is_device_independent(device):
    offsets = torch.arange(5000) + 2**32 - 2500
    assert torch.equal(ref.philox_uniform(5, offsets.to(device)).cpu(), ref.philox_uniform(5, offsets))
