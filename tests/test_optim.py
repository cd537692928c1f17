"""dpkernels.AdamW: torch's AdamW bit for bit, the grouped tensors stepped as one flat tensor.

Every test trains the same diff-pruned model twice, with torch.optim.AdamW's single-tensor loop
(foreach=False) and with dpkernels.AdamW, and compares parameters and optimizer state bit for bit;
around that: checkpoints across the two optimizers, gradients missing for a step, gradient
accumulation, options the flat path leaves to torch, and the op count that shows the flat path ran.
"""

import io

import pytest
import torch
from test_grouped import _inputs, _ops, randomise, tiny_bert

import dpkernels


def _model(dtype=torch.float32, layers=2):
    model = dpkernels.diff_prune(tiny_bert(layers=layers).to(dtype))
    randomise(model)
    return model


def _backward(model, inputs, labels):
    logits = model(input_ids=inputs).logits
    loss = torch.nn.functional.cross_entropy(logits, labels) + 1e-3 * dpkernels.l0_penalty(model)
    loss.backward()


def _train(make_opt, *, dtype=torch.float32, steps=4, before_step=None, accumulate=1, **kw):
    model = _model(dtype)
    opt = make_opt(dpkernels.optimizer_groups(model, weight_decay=0.01), **kw)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    inputs, labels = _inputs()
    torch.manual_seed(0)
    for i in range(steps):
        opt.zero_grad()
        for _ in range(accumulate):
            _backward(model.train(), inputs, labels)
        dpkernels.clip_grad_norms(opt.param_groups, 1.0)
        if before_step is not None:
            before_step(i, model)
        opt.step()
        sched.step()
    return model, opt


def _torch_loop(groups, **kw):
    return torch.optim.AdamW(groups, foreach=False, **kw)


def assert_same_training(a, b):
    (ma, oa), (mb, ob) = a, b
    for (name, pa), (_, pb) in zip(ma.named_parameters(), mb.named_parameters(), strict=True):
        assert torch.equal(pa, pb), name
    sa, sb = oa.state_dict()["state"], ob.state_dict()["state"]
    assert sa.keys() == sb.keys() and sa
    for index in sa:
        for key in sa[index]:
            assert torch.equal(sa[index][key], sb[index][key]), (index, key)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_it_trains_bit_for_bit_as_torchs_adamw(dtype):
    assert_same_training(_train(_torch_loop, dtype=dtype), _train(dpkernels.AdamW, dtype=dtype))


def test_torchs_foreach_path_agrees_too():
    assert_same_training(_train(_torch_loop), _train(dpkernels.AdamW, foreach=True))


def test_the_grouped_tensors_step_in_a_constant_number_of_ops():
    counts = {}
    for layers in (1, 3):
        model = _model(layers=layers)
        opt = dpkernels.AdamW(dpkernels.optimizer_groups(model))
        inputs, labels = _inputs()
        _backward(model.train(), inputs, labels)
        opt.step()  # (the flat state is built at the first step)
        counts[layers] = (_ops(opt.step, views=False), len(list(dpkernels.nn.iter_gated(model))))
    # Per step per group: ~8 elementwise ops on the flat tensors and one multi-tensor add to the
    # parameters, whatever the tensor count (torch's loop: ~10 ops per tensor).
    (ops1, tensors1), (ops3, tensors3) = counts[1], counts[3]
    assert tensors3 > tensors1 and ops3 == ops1


def test_a_step_without_some_gradients_matches_torch():
    def drop(i, model):
        if i == 1:  # a member without gradient: the flat run splits, its tensor skips the step
            next(p for n, p in model.named_parameters() if "LayerNorm" in n and n.endswith(".diff")).grad = None

    assert_same_training(_train(_torch_loop, before_step=drop, steps=4),
                         _train(dpkernels.AdamW, before_step=drop, steps=4))


def test_gradient_accumulation_matches_torch():
    assert_same_training(_train(_torch_loop, accumulate=2), _train(dpkernels.AdamW, accumulate=2))


@pytest.mark.parametrize("option", [dict(amsgrad=True), dict(maximize=True), dict(fused=True)])
def test_options_the_flat_path_leaves_to_torch(option):
    assert_same_training(_train(_torch_loop, **option) if "fused" not in option
                         else _train(torch.optim.AdamW, **option), _train(dpkernels.AdamW, **option))


def _steps(model, opt, steps, seed):
    inputs, labels = _inputs()
    torch.manual_seed(seed)
    for _ in range(steps):
        opt.zero_grad()
        _backward(model.train(), inputs, labels)
        opt.step()


@pytest.mark.parametrize("first, second", [(dpkernels.AdamW, dpkernels.AdamW), (_torch_loop, dpkernels.AdamW),
                                           (dpkernels.AdamW, _torch_loop)])
def test_a_checkpoint_resumes_bit_for_bit_across_optimizers(first, second):
    reference = _model()
    opt = _torch_loop(dpkernels.optimizer_groups(reference, weight_decay=0.01))
    _steps(reference, opt, 2, seed=0)
    _steps(reference, opt, 2, seed=1)

    model = _model()
    opt = first(dpkernels.optimizer_groups(model, weight_decay=0.01))
    _steps(model, opt, 2, seed=0)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    restarted = _model()
    restarted.load_state_dict(saved["model"])
    opt = second(dpkernels.optimizer_groups(restarted, weight_decay=0.01))
    opt.load_state_dict(saved["opt"])
    _steps(restarted, opt, 2, seed=1)
    for (name, pa), (_, pb) in zip(reference.named_parameters(), restarted.named_parameters(), strict=True):
        assert torch.equal(pa, pb), name


def test_a_parameter_group_added_later_is_stepped():
    results = []
    for make_opt in (_torch_loop, dpkernels.AdamW):
        model = _model()
        groups = dpkernels.optimizer_groups(model)
        opt = make_opt(groups[:1])
        for group in groups[1:]:
            opt.add_param_group(group)
        _steps(model, opt, 2, seed=0)
        results.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))
