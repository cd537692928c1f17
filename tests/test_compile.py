"""torch.compile and torch.library: the gate op's custom-op contract and a whole diff-pruned model."""

import pytest
import torch
import torch._inductor.config as inductor_config
from conftest import DEVICES
from test_diff_prune import _batch, _randomise_gates, tiny_bert

import dpkernels
from dpkernels import ops


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_gate_apply_custom_op_passes_opcheck(device, training, out_dtype):
    gen = torch.Generator().manual_seed(0)
    theta0 = torch.randn(7, 5, generator=gen).to(device)
    diff = (torch.randn(7, 5, generator=gen) * 0.5).to(device).requires_grad_()
    log_alpha = (torch.randn(7, 5, generator=gen) * 2).to(device).requires_grad_()
    for base_grad in (False, True):
        args = (theta0.clone().requires_grad_(base_grad), diff, log_alpha, ops._seed_tensor(2**64 - 3), 11, training,
                -1.5, 1.5, 1.0, 0.05, out_dtype)
        torch.library.opcheck(torch.ops.dpkernels.gate_apply.default, args)


def test_a_diff_pruned_transformers_model_compiles_fullgraph_and_matches_eager():
    """Every DiffLinear and every GatedParameter (embeddings, LayerNorm) goes through the custom ops."""
    model = dpkernels.diff_prune(tiny_bert()).train()
    _randomise_gates(model)
    ids, labels = _batch()
    trainable = [p for p in model.parameters() if p.requires_grad]

    def step(fn):
        torch.manual_seed(5)
        out = fn(input_ids=ids, labels=labels)
        return out.logits.detach(), torch.autograd.grad(out.loss, trainable)

    logits, grads = step(model)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    with inductor_config.patch(fallback_random=True):  # the seeds drawn as in eager
        logits_c, grads_c = step(compiled)
    torch.testing.assert_close(logits_c, logits)
    for a, b in zip(grads_c, grads, strict=True):
        torch.testing.assert_close(a, b)
