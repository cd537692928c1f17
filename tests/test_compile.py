"""torch.compile and torch.library: the gate op's custom-op contract and a whole diff-pruned model."""

import pytest
import torch
import torch._inductor.config as inductor_config
from conftest import DEVICES
from test_diff_prune import _batch, _randomise_gates, tiny_bert

import dpkernels
from dpkernels import ops
from dpkernels.nn import iter_gated


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


@pytest.mark.parametrize("structured", [False, True])
def test_a_diff_pruned_transformers_model_compiles_fullgraph_and_matches_eager(structured):
    """Every DiffLinear and every GatedParameter (embeddings, LayerNorm) goes through the custom ops;
    structured group gates take their draw through dpkernels::philox_uniform."""
    model = dpkernels.diff_prune(tiny_bert(), structured=structured).train()
    _randomise_gates(model)
    if structured:
        with torch.no_grad():
            for _, _, gt in iter_gated(model):
                gt.group_log_alpha.fill_(0.3)  # group gates strictly between 0 and 1: they scale the diff
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


def test_a_tied_model_compiles_fullgraph_with_one_seed_per_forward():
    """GPT-2's tied embedding / LM head: the model-level hooks that give the shared gate one seed
    per forward trace without a graph break, and the compiled steps match eager's."""
    from test_model_families import _randomise_tied_gate, batch, build

    model = dpkernels.diff_prune(build("gpt2", "lm")).train()
    _randomise_tied_gate(model, "transformer.wte.weight")
    ids = batch("gpt2", "lm")["input_ids"]  # the loss computed here: transformers' loss_function warns once
    gate = model.lm_head.parametrizations.weight[0]
    trainable = [p for p in model.parameters() if p.requires_grad]

    def step(fn, seed):
        torch.manual_seed(seed)
        logits = fn(input_ids=ids).logits
        return gate.seed, logits.detach(), torch.autograd.grad(logits.square().mean(), trainable)

    seeds = (5, 6)
    eager = [step(model, seed) for seed in seeds]
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    graphs = []
    for seed, expected in zip(seeds, eager, strict=True):
        with inductor_config.patch(fallback_random=True):
            got = step(compiled, seed)
        graphs.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
        assert got[0] == expected[0] and not gate.in_model_forward
        torch.testing.assert_close(got[1], expected[1])
        for a, b in zip(got[2], expected[2], strict=True):
            torch.testing.assert_close(a, b)
    assert eager[0][0] != eager[1][0] and graphs[0] == graphs[1]  # a fresh draw, the same graph


def test_group_gate_draw_is_the_reference_draw():
    la = torch.tensor([0.3, -2.0, 4.0], requires_grad=True)
    for seed in (0, 2**63 + 1, ops._seed_tensor(2**64 - 5)):
        z = ops.group_gate(la, seed, 17)
        torch.testing.assert_close(z, dpkernels.reference.group_gate(la, seed, 17), rtol=0, atol=0)
    z.sum().backward()
    assert la.grad is not None and torch.isfinite(la.grad).all()
    torch.testing.assert_close(ops.group_gate(la, None, 0, training=False), dpkernels.reference.eval_gates(la))


def _fixed_mask_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(dpkernels.DiffLinear(9, 16), torch.nn.GELU(), dpkernels.DiffLinear(16, 5))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "diff" in name:
                p.normal_()
    dpkernels.project(model, 0.3)
    return model


def test_the_fixed_mask_stage_compiles_fullgraph_and_matches_eager():
    model = _fixed_mask_model()
    x = torch.randn(2, 3, 9)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert all(isinstance(m, dpkernels.DiffLinear) and m.fixed_mask for m in model[::2])

    def step(fn):
        y = fn(x)
        return y.detach(), torch.autograd.grad(y.square().sum(), trainable)

    y, grads = step(model)
    torch._dynamo.reset()
    y_c, grads_c = step(torch.compile(model, fullgraph=True))
    torch.testing.assert_close(y_c, y)
    for a, b in zip(grads_c, grads, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_fixed_mask_custom_op_passes_opcheck(device):
    layer = _fixed_mask_model()[0].to(device)
    x = torch.randn(6, 9, device=device, requires_grad=True)
    for bias_args in ((layer.bias, layer.bias_diff_values, layer.bias_diff_index), (layer.bias, None, None),
                      (None, None, None)):
        args = (x, layer.weight, bias_args[0], layer.diff_values, layer.diff_index, bias_args[1], bias_args[2])
        torch.library.opcheck(torch.ops.dpkernels.fixed_mask_linear.default, args)


@pytest.mark.parametrize("grad_mode", [torch.no_grad, torch.inference_mode])
def test_a_compiled_model_follows_task_switches_without_recompiling(grad_mode):
    """TaskSwitcher writes the parameters in place, which the compiled graph reads as inputs: one
    graph serves every task, the base and the dense heads (serving many tasks from one compile)."""
    from test_sparse import Net, random_diff

    class Model(Net):
        def forward(self, x):
            return self.head(self.one(self.mid(self.norm(self.enc(x)))))

    model, x = Model().eval(), torch.randn(5, 9)
    diffs = {"a": random_diff(Model(), seed=1), "b": random_diff(Model(), seed=2)}
    expected = {None: model(x).detach()}
    for name, diff in diffs.items():
        merged = diff.apply(Model().eval())
        expected[name] = merged(x).detach()
    switcher = dpkernels.TaskSwitcher(model).add("a", diffs["a"]).add("b", diffs["b"])
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(model, fullgraph=True)
    for name in ["a", "b", None, "b", "a", None, "a"]:
        switcher.switch(name) if name else switcher.reset()
        with grad_mode():
            torch.testing.assert_close(compiled(x), expected[name], rtol=1e-5, atol=1e-6)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


def test_the_first_call_compiles_in_a_fresh_process(monkeypatch):
    """Dynamo cannot trace an import: the gated modules import the backends when built, so the
    very first call of a model under torch.compile(fullgraph=True) finds them imported."""
    from dpkernels import backends

    monkeypatch.setattr(backends, "_loaded", {})  # as in a fresh process: nothing imported yet
    monkeypatch.setattr(backends, "_load_errors", {})
    layer = dpkernels.DiffLinear.from_linear(torch.nn.Linear(16, 8))
    assert "torch" in backends._loaded
    x = torch.randn(4, 16)
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(layer, fullgraph=True)(x), layer(x))
