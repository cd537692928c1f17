"""SparseDiff: extraction, the safetensors format and its validation, apply/restore against a model."""

import contextlib
import copy
import json
import os

import pytest
import safetensors.torch
import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification

import dpkernels
from dpkernels import SparseDiff, TaskSwitcher, sparse
from dpkernels.nn import iter_gated
from tests.conftest import BIT_VIEW, assert_close_by_rule


class Net(nn.Module):
    """Odd sizes; a bias-free layer; a head that diffs carry dense."""

    def __init__(self, dtype=torch.float32, device="cpu", seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.enc = nn.Linear(9, 341)
        self.norm = nn.LayerNorm(341)
        self.mid = nn.Linear(341, 41, bias=False)
        self.one = nn.Linear(41, 1)
        self.head = nn.Linear(1, 3)
        with torch.no_grad():  # LayerNorm starts at exactly 1 and 0: make it random like the rest
            self.norm.weight.normal_(1.0, 0.1)
            self.norm.bias.normal_(0.0, 0.1)
        self.to(device, dtype)


def bits(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter's bit pattern (so -0.0 != 0.0 and NaN payloads count), on the CPU."""
    return {n: p.detach().cpu().view(BIT_VIEW[p.dtype]).clone() for n, p in model.named_parameters()}


def assert_same_bits(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs bitwise"


def random_diff(model, seed, density=0.05, dense=("head.weight", "head.bias")):
    """A diff with random indices (at least one per tensor) and fp32 values for every parameter
    of `model` but the `dense` ones, which get random whole values."""
    gen = torch.Generator().manual_seed(seed)
    deltas, dense_values = {}, {}
    for name, p in model.named_parameters():
        if name in dense:
            dense_values[name] = torch.randn(p.shape, generator=gen)
            continue
        k = max(1, int(density * p.numel()))
        index = torch.randperm(p.numel(), generator=gen)[:k]
        deltas[name] = (index, torch.randn(k, generator=gen) * 0.05)
    return SparseDiff.from_deltas(model, deltas, dense_values)


def contract_merge(model, diff) -> dict[str, torch.Tensor]:
    """The apply contract from the float64 sum: round(acc(base) + acc(delta)) per entry, acc = fp32
    (fp64 for fp64 bases); dense parameters replaced (cast to the parameter's dtype)."""
    out = {}
    params = dict(model.named_parameters())
    for name, p in params.items():
        base = p.detach().cpu()
        if name in diff.dense:
            out[name] = diff.dense[name].to(p.dtype)
        elif name in diff.tensors:
            t = diff.tensors[name]
            acc = torch.float64 if p.dtype == torch.float64 else torch.float32
            flat = base.reshape(-1).clone()
            exact = base.reshape(-1)[t.index].double() + t.values.double()
            flat[t.index] = exact.to(acc).to(p.dtype)
            out[name] = flat.view(p.shape)
        else:
            out[name] = base.clone()
    return {n: t.view(BIT_VIEW[t.dtype]) for n, t in out.items()}


# --------------------------------------------------------------------------------------------
# Extraction
# --------------------------------------------------------------------------------------------


def tiny_bert(seed=0):
    cfg = BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
                     max_position_embeddings=40, num_labels=3, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    torch.manual_seed(seed)
    return BertForSequenceClassification(cfg).eval()


def _sparse_gates(model, seed=0):
    """Random diffs whose eval gates are mostly exactly 0 (log_alpha = -10), some 1, some between."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, _, gt in iter_gated(model):
            gt.diff.copy_(torch.randn(gt.diff.shape, generator=gen) * 0.05)
            u = torch.rand(gt.log_alpha.shape, generator=gen)
            gt.log_alpha.copy_(torch.where(u < 0.9, -10.0, torch.where(u < 0.95, 10.0, 0.3)))


def test_from_model_collects_the_eval_delta_and_the_head():
    plain = tiny_bert()
    model = dpkernels.diff_prune(copy.deepcopy(plain))
    _sparse_gates(model)
    with torch.no_grad():
        model.classifier.weight.normal_()
    diff = SparseDiff.from_model(model)
    gated = {name: gt for name, _, gt in iter_gated(model)}
    assert set(diff.tensors) == set(gated) == {n for n in dict(plain.named_parameters()) if "classifier" not in n}
    assert set(diff.dense) == {"classifier.weight", "classifier.bias"}
    for name, gt in gated.items():
        delta = gt.eval_dense_delta().reshape(-1)
        t = diff.tensors[name]
        assert torch.equal(t.index, delta.nonzero().reshape(-1))
        assert torch.equal(t.values, delta[t.index])
        assert t.shape == tuple(gt.theta0.shape) and t.dtype == torch.float32
        assert t.gate == {"l": -1.5, "r": 1.5, "beta": 1.0}
    assert 0 < diff.nnz < 0.2 * diff.total and diff.sparsity == diff.nnz / diff.total
    assert torch.equal(diff.dense["classifier.weight"], model.classifier.weight)

    # Applied to the plain pretrained model, the diff reproduces the diff-pruned model's eval output.
    diff.apply(plain)
    x = torch.randint(0, 97, (4, 11), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(plain(x).logits, model.eval()(x).logits, rtol=0, atol=1e-6)


def test_from_model_after_projection_and_gate_config_check():
    model = dpkernels.diff_prune(tiny_bert())
    _sparse_gates(model)
    kept = dpkernels.project(model, 0.01)
    diff = SparseDiff.from_model(model, gate_config={"l": -1.5, "r": 1.5, "beta": 1.0})
    assert diff.nnz <= kept  # entries whose eval delta is exactly 0 are dropped
    for name, _, gt in iter_gated(model):
        keep = gt.values != 0
        assert torch.equal(diff.tensors[name].index, gt.index[keep])
    with pytest.raises(ValueError, match="gate config"):
        SparseDiff.from_model(model, gate_config={"l": -0.1, "r": 1.1, "beta": 2 / 3})
    with pytest.raises(ValueError, match="keys l, r, beta"):
        SparseDiff.from_model(model, gate_config={"l": -1.5})


def test_from_model_reads_the_base_without_an_applied_diff():
    """A diff applied before diff_prune (apply refuses a diff-pruned model) is not read as the base:
    not at the Linears' bases either, which diff_prune wraps in new Parameters on the same memory."""
    reference = dpkernels.diff_prune(tiny_bert())
    _sparse_gates(reference)
    before = SparseDiff.from_model(reference)
    model = tiny_bert()
    # Another task: sparse on every base tensor and on the classifier's bias, dense classifier weight.
    other = random_diff(tiny_bert(), seed=5, density=0.3, dense=("classifier.weight",))
    switcher = TaskSwitcher(model).add("other", other).switch("other")
    dpkernels.diff_prune(model)
    _sparse_gates(model)
    assert_same_diff(SparseDiff.from_model(model), before)
    switcher.reset()  # allowed on the diff-pruned model: it only writes the true base back
    bases = {name: gt.theta0 for name, _, gt in iter_gated(model)}
    for name, _, gt in iter_gated(reference):
        assert torch.equal(bases[name].view(torch.int32), gt.theta0.view(torch.int32)), name


def test_from_model_refuses_a_model_without_gated_tensors():
    """A model never diff-pruned has no diff: from_model would copy every parameter whole as dense."""
    for model in (Net(), torch.compile(tiny_bert())):
        with pytest.raises(ValueError, match="^the model has no gated tensors: diff_prune it first$"):
            SparseDiff.from_model(model)
    # Freshly diff-pruned (every delta still 0): an empty diff, not an error.
    diff = SparseDiff.from_model(dpkernels.diff_prune(Net(), dense=r"^head\."))
    assert diff.nnz == 0 and len(diff.tensors) == 7 and set(diff.dense) == {"head.weight", "head.bias"}


def test_from_deltas_sorts_and_rejects_bad_input():
    model = Net()
    diff = SparseDiff.from_deltas(model, {"enc.bias": (torch.tensor([7, 2, 300]), torch.tensor([1.0, 2.0, 3.0]))})
    assert diff.tensors["enc.bias"].index.tolist() == [2, 7, 300]
    assert diff.tensors["enc.bias"].values.tolist() == [2.0, 1.0, 3.0]
    with pytest.raises(ValueError, match="no parameters named 'nope'"):
        SparseDiff.from_deltas(model, {"nope": (torch.tensor([0]), torch.tensor([1.0]))})
    with pytest.raises(ValueError, match="free of duplicates"):
        SparseDiff.from_deltas(model, {"enc.bias": (torch.tensor([3, 3]), torch.tensor([1.0, 2.0]))})
    with pytest.raises(ValueError, match="outside"):
        SparseDiff.from_deltas(model, {"enc.bias": (torch.tensor([341]), torch.tensor([1.0]))})
    with pytest.raises(ValueError, match="NaN"):
        SparseDiff.from_deltas(model, {"enc.bias": (torch.tensor([1]), torch.tensor([float("nan")]))})
    with pytest.raises(ValueError, match="2 values for 1 indices"):
        SparseDiff.from_deltas(model, {"enc.bias": (torch.tensor([1]), torch.tensor([1.0, 2.0]))})
    with pytest.raises(ValueError, match="both gated and dense"):
        SparseDiff.from_deltas(model, {"head.bias": (torch.tensor([1]), torch.tensor([1.0]))},
                               {"head.bias": torch.zeros(3)})


# --------------------------------------------------------------------------------------------
# The file
# --------------------------------------------------------------------------------------------


def assert_same_diff(a: SparseDiff, b: SparseDiff) -> None:
    assert list(a.tensors) == list(b.tensors) and list(a.dense) == list(b.dense)
    for name, t in a.tensors.items():
        u = b.tensors[name]
        assert (t.shape, t.dtype, t.gate) == (u.shape, u.dtype, u.gate)
        for field in ("index", "values", "base_index", "base_values"):
            x, y = getattr(t, field), getattr(u, field)
            assert x.dtype == y.dtype and torch.equal(x.cpu(), y.cpu()), f"{name}.{field}"
    for name, d in a.dense.items():
        assert d.dtype == b.dense[name].dtype and torch.equal(d.cpu(), b.dense[name].cpu())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_save_load_round_trip(tmp_path, dtype):
    model = Net(dtype)
    diff = random_diff(model, seed=1)
    empty = SparseDiff.from_deltas(model, {"one.bias": (torch.tensor([], dtype=torch.int64), torch.tensor([]))})
    for d, name in ((diff, "a.safetensors"), (empty, "empty.safetensors")):
        path = tmp_path / name
        size = d.save(path)
        assert size == os.path.getsize(path) and d.num_bytes < size
        loaded = SparseDiff.load(path, device="cpu")
        assert_same_diff(d, loaded)
        assert repr(loaded) == repr(d)
    raw = safetensors.torch.load_file(tmp_path / "a.safetensors")
    assert raw["enc.weight.indices"].dtype == torch.int32 and raw["enc.weight.values"].dtype == torch.float32
    assert raw["head.weight.dense"].dtype == torch.float32
    assert diff.dense_num_bytes == sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                                       if not n.startswith("head")) + 4 * 6
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(tmp_path / "a.safetensors").st_mode & 0o777 == 0o666 & ~umask


def test_info_travels_with_the_file(tmp_path):
    model = Net()
    info = {"finetune": {"model": None, "seed": 3, "labels": ["neg", "pos"], "max_examples": 3000}}
    diff = random_diff(model, seed=1)
    assert diff.info is None and "info" not in diff._metadata()  # optional: absent unless given
    diff.info = info
    loaded = SparseDiff.load(_write(tmp_path / "i.safetensors", *_raw_file(diff)))
    assert loaded.info == info and loaded.to("cpu").info == info
    assert SparseDiff(diff.tensors, diff.dense, info={"k": (1, 2)}).info == {"k": [1, 2]}  # as JSON reads it back
    for bad, message in ((["a"], "info must be a dict"), ({"x": object()}, "JSON-serialisable"),
                         ({"x": float("nan")}, "JSON-serialisable")):
        with pytest.raises(ValueError, match=message):
            SparseDiff(diff.tensors, diff.dense, info=bad)


def _raw_file(diff):
    """(tensors, metadata) exactly as save() writes them."""
    tensors = {k: v.detach().cpu().clone() for k, v in diff._file_tensors().items()}
    metadata = diff._metadata()
    return tensors, metadata


def _write(path, tensors, metadata, checksum=True):
    metadata = dict(metadata)
    if checksum:
        metadata["sha256"] = sparse._digest(tensors, metadata)
    path.write_bytes(safetensors.torch.save(tensors, metadata))
    return path


def _bad(tmp_path, mutate, checksum=True):
    """A file written from a valid diff after `mutate(tensors, metadata)`."""
    tensors, metadata = _raw_file(random_diff(Net(), seed=2))
    mutate(tensors, metadata)
    return _write(tmp_path / "bad.safetensors", tensors, metadata, checksum)


def _set(key, value):
    return lambda tensors, metadata: metadata.__setitem__(key, value)


def _tensor(key, fn):
    return lambda tensors, metadata: tensors.__setitem__(key, fn(tensors[key]))


def _retype(tensors, metadata):
    records = json.loads(metadata["tensors"])
    records[0]["dtype"] = "int8"
    metadata["tensors"] = json.dumps(records)


def _reshape_record(tensors, metadata):
    records = json.loads(metadata["tensors"])
    records[0]["shape"] = [341, 10]
    metadata["tensors"] = json.dumps(records)


def _drop(key):
    return lambda tensors, metadata: tensors.pop(key)


def _swap_first_two(t):
    t = t.clone()
    t[[0, 1]] = t[[1, 0]]
    return t


def _dup_first(t):
    t = t.clone()
    t[1] = t[0]
    return t


BAD_FILES = {
    "wrong format": (_set("format", "something.else"), "not a dpkernels sparse diff"),
    "newer version": (_set("format_version", "2"), "newer than the supported 1"),
    "bad version": (_set("format_version", "x"), "format version 'x'"),
    "missing tensor": (_drop("enc.weight.values"), "missing 'enc.weight.values'"),
    "extra tensor": (lambda t, m: t.__setitem__("stray", torch.zeros(2)), "extra 'stray'"),
    "unsorted indices": (_tensor("enc.weight.indices", _swap_first_two), "must be sorted and free of duplicates"),
    "duplicated indices": (_tensor("enc.weight.indices", _dup_first), "must be sorted and free of duplicates"),
    "index out of range": (_tensor("enc.bias.indices", lambda t: torch.cat([t[:-1], t.new_tensor([341])])),
                           "outside \\[0, 341\\)"),
    "negative index": (_tensor("enc.bias.indices", lambda t: torch.cat([t.new_tensor([-1]), t[1:]])), "outside"),
    "float indices": (_tensor("enc.weight.indices", lambda t: t.float()), "indices are torch.float32"),
    "int16 indices": (_tensor("enc.weight.indices", lambda t: t.to(torch.int16)), "indices are torch.int16"),
    "nan value": (_tensor("enc.weight.values", lambda t: torch.cat([t[:-1], t.new_tensor([float("nan")])])), "NaN"),
    "short values": (_tensor("enc.weight.values", lambda t: t[:-1]), "values for"),
    "fp16 values": (_tensor("enc.weight.values", lambda t: t.half()), "values must be a 1-D float32"),
    "nnz disagrees": (_tensor("enc.weight.indices", lambda t: t[:-1]), "metadata says nnz="),
    "total disagrees": (_set("total", "12"), "metadata total=12"),
    "sparsity disagrees": (_set("sparsity", "0.5"), "metadata sparsity"),
    "tensors not json": (_set("tensors", "[{"), "'tensors' is not JSON"),
    "unknown base dtype": (_retype, "base dtype 'int8'"),
    "shape disagrees": (_reshape_record, "outside|metadata total"),
    "dense shape": (_tensor("head.weight.dense", lambda t: t[:2]), "dense 'head.weight'"),
    "gate config": (_set("gate_config", json.dumps({"l": -1.0, "r": 1.5, "beta": 1.0})), "gate_config"),
    "no checksum": (lambda t, m: None, "no sha256"),
    "info not json": (_set("info", "{"), "'info' is not JSON"),
    "info not an object": (_set("info", "[1, 2]"), "metadata 'info': info must be a dict"),
    "base_model without a name": (_set("base_model", json.dumps({"revision": "abc"})),
                                  "metadata 'base_model': base_model's name_or_path must be a non-empty string"),
    "id2label with a bad id": (_set("id2label", json.dumps({"x": "neg"})), "metadata 'id2label': id2label maps"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_files_raise_a_value_error_naming_the_problem(tmp_path, case):
    mutate, message = BAD_FILES[case]
    path = _bad(tmp_path, mutate, checksum=case != "no checksum")
    with pytest.raises(ValueError, match=message) as info:
        SparseDiff.load(path)
    assert str(path) in str(info.value)


def test_garbage_truncated_and_corrupt_files(tmp_path):
    good = tmp_path / "good.safetensors"
    random_diff(Net(), seed=3).save(good)
    data = good.read_bytes()
    header = 8 + int.from_bytes(data[:8], "little")
    cases = {
        "text": (b"hello, I am not a tensor file", "not a readable safetensors file"),
        "empty": (b"", "not a readable safetensors file"),
        "truncated": (data[:-5], "not a readable safetensors file"),
        "truncated header": (data[: header // 2], "not a readable safetensors file"),
        "data byte flipped": (data[:-3] + bytes([data[-3] ^ 0x10]) + data[-2:], "checksum mismatch"),
        "metadata edited": (data.replace(b'"values_dtype":"float32"', b'"values_dtype":"float16"'),
                            "checksum mismatch"),
    }
    for name, (content, message) in cases.items():
        assert content != data, name
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(content)
        with pytest.raises(ValueError, match=message):
            SparseDiff.load(path)
    # A plain safetensors checkpoint is not a diff.
    plain = tmp_path / "plain.safetensors"
    safetensors.torch.save_file({"w": torch.zeros(3)}, plain)
    with pytest.raises(ValueError, match="not a dpkernels sparse diff"):
        SparseDiff.load(plain)
    with pytest.raises(FileNotFoundError):
        SparseDiff.load(tmp_path / "missing.safetensors")


class _Interrupt(BaseException):
    pass


@pytest.mark.parametrize("error", [OSError("disk full"), _Interrupt()])
@pytest.mark.parametrize("existing", [True, False])
def test_interrupted_save_keeps_the_old_file(tmp_path, monkeypatch, error, existing):
    model = Net()
    old, new = random_diff(model, seed=4), random_diff(model, seed=5, density=0.2)
    path = tmp_path / "diff.safetensors"
    if existing:
        old.save(path)
    before = path.read_bytes() if existing else None

    def write_half_then_fail(f, data):
        f.write(data[: len(data) // 2])
        raise error

    monkeypatch.setattr(sparse, "_write_all", write_half_then_fail)
    with pytest.raises(type(error)):
        new.save(path)
    assert os.listdir(tmp_path) == (["diff.safetensors"] if existing else [])
    if existing:
        assert path.read_bytes() == before
        assert_same_diff(SparseDiff.load(path), old)
    monkeypatch.undo()
    new.save(path)
    assert_same_diff(SparseDiff.load(path), new)


# --------------------------------------------------------------------------------------------
# Apply / restore
# --------------------------------------------------------------------------------------------

DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float64]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_apply_is_the_rounded_sum_and_restore_is_bit_exact(device_backend, dtype):
    device, backend = device_backend
    model = Net(dtype, device)
    diff = random_diff(model, seed=6)
    original = bits(model)
    expected = contract_merge(model, diff)
    diff.apply(model)
    assert dpkernels.info()["last_used"]["scatter_apply"] == backend
    assert_same_bits(bits(model), expected)
    # The error against the exact float64 sum follows DESIGN's rule against torch's direct rounding.
    params = dict(model.named_parameters())
    for name, t in diff.tensors.items():
        base = original[name].view(dtype).reshape(-1)[t.index].double()
        exact = base + t.values.double()
        merged = params[name].detach().cpu().reshape(-1)[t.index]
        assert_close_by_rule(merged, exact.to(dtype), exact, atol=0.0, name=name)
    diff.restore(model)
    assert dpkernels.info()["last_used"]["scatter_restore"] == backend
    assert_same_bits(bits(model), original)


def test_apply_validates_before_touching_the_model():
    model = Net()
    diff = random_diff(model, seed=7)
    original = bits(model)
    cases = [
        (Net(seed=1), "wrong base model"),  # same architecture, other weights
        (nn.Sequential(nn.Linear(9, 341)), "no parameters named"),
    ]
    wide = Net()
    wide.mid = nn.Linear(341, 42, bias=False)
    cases.append((wide, "'mid.weight' has shape \\(42, 341\\) in the model, \\(41, 341\\) in the diff"))
    head = Net()
    head.head = nn.Linear(1, 4)
    cases.append((head, "dense 'head.weight' has shape"))
    for other, message in cases:
        other_bits = bits(other)
        with pytest.raises(ValueError, match=message):
            diff.apply(other)
        assert_same_bits(bits(other), other_bits)
    for share in ("same parameter", "same storage"):
        tied = Net()
        tied.one.weight = tied.mid.weight if share == "same parameter" else nn.Parameter(tied.mid.weight.detach())
        tied_bits = bits(tied)
        both = {n: (torch.tensor([0, 5]), torch.tensor([1.0, 2.0])) for n in ("mid.weight", "one.weight")}
        with pytest.raises(ValueError, match="'mid.weight' and 'one.weight' share memory"):
            SparseDiff.from_deltas(tied, both).apply(tied)
        assert_same_bits(bits(tied), tied_bits)
    diff.apply(model)
    applied = bits(model)
    with pytest.raises(ValueError, match="already has a diff applied \\(by this diff\\)"):
        diff.apply(model)
    with pytest.raises(ValueError, match="already has a diff applied \\(by a SparseDiff\\)"):
        random_diff(model, seed=8).apply(model)
    with pytest.raises(ValueError, match="already has a diff applied"):
        TaskSwitcher(model).add("x", random_diff(model, seed=8)).switch("x")
    assert_same_bits(bits(model), applied)
    with pytest.raises(ValueError, match="not applied"):
        random_diff(model, seed=8).restore(model)
    diff.restore(model)
    assert_same_bits(bits(model), original)
    with pytest.raises(ValueError, match="not applied"):
        diff.restore(model)


@pytest.mark.parametrize("to_dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_a_cast_base_passes_the_fingerprint_and_another_model_does_not(to_dtype):
    diff = random_diff(Net(torch.float32), seed=9)
    cast = Net(torch.float32).to(to_dtype)
    diff.apply(cast)
    diff.restore(cast)
    other = Net(torch.float32, seed=3).to(to_dtype)
    with pytest.raises(ValueError, match=r"wrong base model: 7 tensor\(s\) differ.*'enc.weight' \(16 of 16 samples\)"):
        diff.apply(other)
    # One tensor nudged by 2% (beyond any cast's rounding) at every position is named.
    nudged = Net(torch.float32)
    with torch.no_grad():
        nudged.mid.weight.mul_(1.02)
    with pytest.raises(ValueError, match="'mid.weight' \\(16 of 16 samples\\)"):
        diff.apply(nudged.to(to_dtype))


def test_same_dtype_fingerprint_is_exact():
    model = Net(torch.bfloat16)
    diff = random_diff(model, seed=10)
    with torch.no_grad():  # one ulp at one sampled position of one tensor
        flat = model.enc.weight.view(-1)
        pos = int(diff.tensors["enc.weight"].base_index[3])
        flat.view(torch.int16)[pos] += 1
    with pytest.raises(ValueError, match="'enc.weight' \\(1 of 16 samples\\)"):
        diff.apply(model)


class _Same(nn.Module):
    """A parametrization that leaves the value as it is."""

    def forward(self, x):
        return x


def test_parametrized_targets_resolve_by_plain_name():
    """A parametrized parameter is a target under its plain name: its ``original`` is written."""
    model = Net()
    torch.nn.utils.parametrize.register_parametrization(model.norm, "weight", _Same())
    diff = random_diff(Net(), seed=11)
    before = model.norm.parametrizations.weight.original.detach().clone()
    diff.apply(model)
    after = model.norm.parametrizations.weight.original
    changed = (after != before).reshape(-1).nonzero().reshape(-1)
    assert set(changed.tolist()) <= set(diff.tensors["norm.weight"].index.tolist())
    assert changed.numel() > 0
    diff.restore(model)
    assert torch.equal(after.view(torch.int32), before.view(torch.int32))
    # A diff-pruned model's gated parameters likewise: its fingerprint is the plain base's.
    pruned = dpkernels.diff_prune(tiny_bert())
    name = "bert.embeddings.word_embeddings.weight"
    SparseDiff.from_deltas(pruned, {name: (torch.tensor([0, 5]), torch.tensor([1.0, 2.0]))}).check_model(tiny_bert())


def test_every_flipped_byte_is_refused(tmp_path):
    """A bit flipped anywhere in the header (each byte) or the tensor data (a sample) raises a
    ValueError: never another exception, never a load."""
    good = tmp_path / "good.safetensors"
    random_diff(Net(), seed=3).save(good)
    data = good.read_bytes()
    header = 8 + int.from_bytes(data[:8], "little")
    rng = torch.Generator().manual_seed(0)
    sample = (header + torch.randperm(len(data) - header, generator=rng)[:200]).tolist()
    case = tmp_path / "case.safetensors"
    for pos, flip in [(p, 0x01) for p in range(header)] + [(p, 0x80) for p in sample]:
        corrupt = bytearray(data)
        corrupt[pos] ^= flip
        case.write_bytes(corrupt)
        with pytest.raises(ValueError):
            SparseDiff.load(case)


# --------------------------------------------------------------------------------------------
# Wrapped and diff-pruned models
# --------------------------------------------------------------------------------------------

WRAPPERS = {
    "compile": torch.compile,
    "DataParallel": nn.DataParallel,
    "DDP": nn.parallel.DistributedDataParallel,
    "compile(DDP)": lambda m: torch.compile(nn.parallel.DistributedDataParallel(m)),
    "DataParallel(compile)": lambda m: nn.DataParallel(torch.compile(m)),
}


@contextlib.contextmanager
def _process_group(tmp_path):
    """A gloo group of this one process: DistributedDataParallel needs one to be built."""
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("wrap", list(WRAPPERS))
def test_wrapped_models_stand_for_the_plain_model(tmp_path, wrap):
    """torch.compile and (Distributed)DataParallel prefix parameter names (``_orig_mod.``,
    ``module.``): diffs from and onto wrapped models use the plain model's names, so a diff from a
    wrapped model applies to a plain base, and a switcher on a wrapped base switches the plain one."""
    pruned = dpkernels.diff_prune(Net(), dense=r"^head\.")
    _sparse_gates(pruned)
    diff = SparseDiff.from_model(pruned)
    base = Net()
    original, merged = bits(base), contract_merge(base, diff)
    with _process_group(tmp_path) if "DDP" in wrap else contextlib.nullcontext():
        assert_same_diff(SparseDiff.from_model(WRAPPERS[wrap](pruned)), diff)
        wrapped = WRAPPERS[wrap](base)
        assert diff.apply(wrapped) is wrapped and sparse.applied(base) is diff is sparse.applied(wrapped)
        assert_same_bits(bits(base), merged)
        diff.restore(base)  # one record, whichever of the two it is asked through
        assert_same_bits(bits(base), original)
        switcher = TaskSwitcher(wrapped).add("task", diff).switch("task")
        assert switcher.model is base
        assert_same_bits(bits(base), merged)
        switcher.reset()
        assert_same_bits(bits(base), original)
        one = SparseDiff.from_deltas(wrapped, {"enc.bias": (torch.tensor([3]), torch.tensor([1.0]))})
        assert list(one.tensors) == ["enc.bias"] and set(one.check_model(wrapped)[0]) == {"enc.bias"}


def test_a_diff_pruned_model_is_refused_as_a_target():
    """A diff written into a diff-pruned model's frozen base sits under the live diff: the diff the
    model itself gives would count twice. apply, check_model and TaskSwitcher.add refuse it, wrapped
    or not, and leave it untouched; the plain base takes the diff."""
    model = dpkernels.diff_prune(tiny_bert())
    _sparse_gates(model)
    own = SparseDiff.from_model(model)
    other = random_diff(tiny_bert(), seed=12, dense=("classifier.weight",))
    original = bits(model)
    calls = {"apply": lambda d, m: d.apply(m), "check_model": lambda d, m: d.check_model(m),
             "TaskSwitcher.add": lambda d, m: TaskSwitcher(m).add("task", d)}
    for target in (model, torch.compile(model)):
        for diff in (own, other):
            for call in calls.values():
                with pytest.raises(ValueError, match=r"^the model is diff-pruned \(gated tensors such as "
                                   r"'bert\.embeddings\.word_embeddings\.weight'\): apply diffs to the plain base"):
                    call(diff, target)
                assert_same_bits(bits(model), original)
                assert sparse.applied(model) is None
    plain = tiny_bert()
    own.apply(plain)
    x = torch.randint(0, 97, (4, 11), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(plain(x).logits, model.eval()(x).logits, rtol=0, atol=1e-6)


def test_a_model_with_weight_norm_round_trips():
    """weight_norm's parametrization keeps original0/original1 (no single `original`): both are
    gated as plain parameters and the diff applies and restores through them."""
    def model():
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(5, 6), nn.Conv1d(6, 4, 3))
        nn.utils.parametrizations.weight_norm(m[1])
        return m

    pruned, base = dpkernels.diff_prune(model(), dense=()), model()
    before = bits(base)
    for _, _, gt in dpkernels.nn.iter_gated(pruned):
        with torch.no_grad():
            gt.diff.normal_()
    diff = SparseDiff.from_model(pruned)
    assert "1.parametrizations.weight.original1" in diff.tensors
    x = torch.randn(2, 6, 5)
    torch.testing.assert_close(diff.apply(base)(x), pruned.eval()(x))
    assert_same_bits(bits(diff.restore(base)), before)
