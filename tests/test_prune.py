"""Projection to a target sparsity: exact k, global vs per-tensor, deterministic ties."""

import pytest
import torch
from torch import nn

import dpkernels
from dpkernels.prune import top_k_indices


def _brute_force_top_k(tensors, k):
    """Oracle: sort all entries by (-value, tensor order, flat index) and take the first k."""
    entries = [(-float(v), t, i) for t, x in enumerate(tensors) for i, v in enumerate(x.tolist())]
    keep = sorted(entries)[:k]
    return [sorted(i for _, t, i in keep if t == ti) for ti in range(len(tensors))]


@pytest.mark.parametrize("k", [0, 1, 7, 50, 123, 200])
def test_top_k_matches_brute_force_with_ties(k):
    gen = torch.Generator().manual_seed(k)
    # Small integers make many ties; zeros too.
    tensors = [torch.randint(0, 6, (n,), generator=gen).float() for n in (1, 60, 9, 130)]
    bits = [lambda x=x: x.view(torch.int32) for x in tensors]
    kept = top_k_indices(bits, [x.numel() for x in tensors], k)
    assert sum(i.numel() for i in kept) == k
    assert [i.tolist() for i in kept] == _brute_force_top_k(tensors, k)


def test_top_k_rejects_impossible_k():
    with pytest.raises(ValueError, match="cannot keep 5 of 3"):
        top_k_indices([lambda: torch.zeros(3).view(torch.int32)], [3], 5)


def _model(device="cpu", seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(dpkernels.DiffLinear(41, 33), nn.ReLU(), dpkernels.DiffLinear(33, 9, bias=False),
                          nn.Linear(9, 3)).to(device)
    with torch.no_grad():
        for layer in (model[0], model[2]):
            for gt in layer.gated_tensors():
                gt.diff.normal_()
                gt.log_alpha.normal_(0, 3)  # a mix of closed, open and partial eval gates
    return model


def _eval_magnitudes(model):
    mags = []
    for layer in (model[0], model[2]):
        for gt in layer.gated_tensors():
            mags.append((dpkernels.eval_gates(gt.log_alpha) * gt.diff).abs().reshape(-1))
    return mags


@pytest.mark.parametrize("sparsity", [0.0, 0.005, 0.05, 0.5, 1.0])
def test_global_projection_keeps_the_largest_entries(sparsity):
    model = _model()
    mags = _eval_magnitudes(model)
    deltas = [(dpkernels.eval_gates(gt.log_alpha) * gt.diff).reshape(-1) for layer in (model[0], model[2])
              for gt in layer.gated_tensors()]
    total = sum(m.numel() for m in mags)
    k = dpkernels.project(model, sparsity)
    assert k == round(sparsity * total)
    expected = _brute_force_top_k(mags, k)
    gated = [gt for layer in (model[0], model[2]) for gt in layer.gated_tensors()]
    assert [gt.index.tolist() for gt in gated] == expected
    for gt, delta in zip(gated, deltas, strict=True):
        assert gt.fixed_mask and gt.diff is None and gt.log_alpha is None
        assert torch.equal(gt.values, delta[gt.index])  # the eval-mode delta carries over
    # The dense head is untouched and still trainable.
    assert model[3].weight.requires_grad


def test_projection_fills_up_with_the_largest_expected_magnitudes_when_too_few_gates_are_open():
    # When the L0 stage closed more than N - k gates, the projection keeps every open entry and then
    # the closed ones of largest P(open) |w| (not zeros in index order).
    model = _model(seed=3)
    gated = [gt for layer in (model[0], model[2]) for gt in layer.gated_tensors()]
    with torch.no_grad():
        for gt in gated:
            gt.log_alpha.uniform_(-6, -1)  # closed: z_eval = 0
        gated[1].log_alpha[:3] = 2.0  # three open entries, in the first layer's bias
    mags = _eval_magnitudes(model)
    expected_mag = [torch.sigmoid(gt.log_alpha.detach()).reshape(-1) * gt.diff.detach().abs().reshape(-1)
                    for gt in gated]
    k = dpkernels.project(model, 0.01)
    open_entries = [m.nonzero().reshape(-1).tolist() for m in mags]
    assert sum(map(len, open_entries)) == 3 < k
    fill = _brute_force_top_k([torch.where(m > 0, 0.0, e) for m, e in zip(mags, expected_mag, strict=True)], k - 3)
    gated = [gt for layer in (model[0], model[2]) for gt in layer.gated_tensors()]
    assert [gt.index.tolist() for gt in gated] == [sorted(o + f) for o, f in zip(open_entries, fill, strict=True)]


def test_per_tensor_projection():
    model = _model(seed=1)
    mags = _eval_magnitudes(model)
    k = dpkernels.project(model, 0.1, scope="tensor")
    gated = [gt for layer in (model[0], model[2]) for gt in layer.gated_tensors()]
    assert k == sum(round(0.1 * m.numel()) for m in mags)
    for gt, mag in zip(gated, mags, strict=True):
        assert gt.index.tolist() == _brute_force_top_k([mag], round(0.1 * mag.numel()))[0]


def test_projected_model_predicts_with_the_kept_delta():
    model = _model(seed=2).eval()
    x = torch.randn(5, 41)
    dpkernels.project(model, 0.2)
    w = model[0].weight.detach().reshape(-1).clone()
    w[model[0].diff_index] += model[0].diff_values.detach()
    b = model[0].bias.detach().clone()
    b[model[0].bias_diff_index] += model[0].bias_diff_values.detach()
    hidden = torch.relu(nn.functional.linear(x, w.view(33, 41), b))
    w2 = model[2].weight.detach().reshape(-1).clone()
    w2[model[2].diff_index] += model[2].diff_values.detach()
    expected = model[3](nn.functional.linear(hidden, w2.view(9, 33)))
    torch.testing.assert_close(model(x), expected)


def test_projection_errors():
    with pytest.raises(ValueError, match="sparsity must be a number in"):
        dpkernels.project(_model(), 1.5)
    with pytest.raises(ValueError, match="scope must be"):
        dpkernels.project(_model(), 0.1, scope="layer")
    with pytest.raises(ValueError, match="no gated tensors"):
        dpkernels.project(nn.Linear(3, 3), 0.1)
    model = _model()
    dpkernels.project(model, 0.1)
    with pytest.raises(ValueError, match="already projected"):
        dpkernels.project(model, 0.1)
    bad = _model()
    with torch.no_grad():
        bad[0].diff[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        dpkernels.project(bad, 0.1)
