"""The sampler's statistics against the hard-concrete closed forms of DESIGN.md.

    P(z = 0)   = sigmoid(beta logit(-l / (r - l)) - log_alpha)
    P(z = 1)   = 1 - sigmoid(beta logit((1 - l) / (r - l)) - log_alpha)
    P(z <= t)  = sigmoid(beta logit((t - l) / (r - l)) - log_alpha),   0 < t < 1

Each estimate is a binomial proportion over n draws; the bound is 5 standard deviations
(two-sided, about 6e-7 false-alarm probability per check; the seeds are fixed, so a run is
deterministic). Same seeds on every backend, so the backends see the same draws.
"""

import math

import pytest
import torch

import dpkernels

N = 1 << 18
CASES = [
    (0.0, -1.5, 1.5, 1.0),
    (2.0, -1.5, 1.5, 1.0),
    (-3.0, -1.5, 1.5, 1.0),
    (0.5, -0.1, 1.1, 2 / 3),
    (-1.0, -0.1, 1.1, 2 / 3),
    (1.0, -0.5, 1.2, 0.3),
]


def _logit(p):
    return math.log(p / (1 - p))


def _sigmoid(x):
    return 1 / (1 + math.exp(-x))


def _cdf(t, log_alpha, l, r, beta):
    return _sigmoid(beta * _logit((t - l) / (r - l)) - log_alpha)


def _assert_proportion(hits, n, p, what):
    sd = math.sqrt(p * (1 - p) / n)
    p_hat = hits / n
    assert abs(p_hat - p) <= 5 * sd + 1e-12, f"{what}: estimate {p_hat:.5f}, closed form {p:.5f} (sd {sd:.2g})"


@pytest.mark.parametrize("log_alpha,l,r,beta", CASES)
def test_gate_distribution_matches_closed_forms(device_backend, log_alpha, l, r, beta):
    device, _ = device_backend
    la = torch.full((N,), log_alpha, device=device)
    z = dpkernels.sample_gates(la, seed=1000 + int(10 * log_alpha), l=l, r=r, beta=beta).cpu().double()
    p0 = _sigmoid(beta * _logit(-l / (r - l)) - log_alpha)
    p1 = 1 - _sigmoid(beta * _logit((1 - l) / (r - l)) - log_alpha)
    _assert_proportion(int((z == 0).sum()), N, p0, "P(z=0)")
    _assert_proportion(int((z == 1).sum()), N, p1, "P(z=1)")
    for t in (0.1, 0.25, 0.5, 0.75, 0.9):
        _assert_proportion(int((z <= t).sum()), N, _cdf(t, log_alpha, l, r, beta), f"P(z<={t})")
    # Kolmogorov-Smirnov on the interior: sup |F_n - F| over the sorted interior samples.
    inside = z[(z > 0) & (z < 1)].sort().values
    m = inside.numel()
    cdf = torch.tensor([_cdf(t, log_alpha, l, r, beta) for t in inside.tolist()], dtype=torch.float64)
    n0 = int((z == 0).sum())
    above = (n0 + torch.arange(1, m + 1, dtype=torch.float64)) / N  # F_n at each sample
    below = above - 1 / N  # F_n just before it
    ks = torch.maximum((above - cdf).abs(), (below - cdf).abs()).max().item()
    # The KS statistic of n samples exceeds 1.95 / sqrt(n) with probability ~0.001.
    assert ks <= 1.95 / math.sqrt(N), f"KS distance {ks:.4g}"


def test_expected_l0_is_the_mean_number_of_nonzero_gates(device_backend):
    device, _ = device_backend
    la = torch.linspace(-4, 4, 64, device=device).repeat_interleave(4096)
    z = dpkernels.sample_gates(la, seed=31337)
    nonzero = (z != 0).double().sum().item()
    expected = dpkernels.expected_l0(la).item()
    p = la.double().sigmoid()  # P(z != 0) = sigmoid(log_alpha - beta log(-l / r)); log(1.5 / 1.5) = 0
    sd = (p * (1 - p)).sum().sqrt().item()
    assert abs(nonzero - expected) <= 5 * sd


def test_gates_differ_across_seeds_and_repeat_for_a_seed(device_backend):
    device, _ = device_backend
    la = torch.zeros(4096, device=device)
    a = dpkernels.sample_gates(la, 1)
    assert torch.equal(a, dpkernels.sample_gates(la, 1))
    b = dpkernels.sample_gates(la, 2)
    assert (a != b).float().mean() > 0.5
