"""Task switching on a BERT-large-sized model: the one-launch scatter vs per-tensor loops vs a dense merge.

Model: transformers' BertModel from a BertConfig with random weights (offline): hidden 1024, 24
layers, 16 heads, vocabulary 30522 -- 335M parameters in 391 tensors (embeddings, LayerNorms,
every Linear, the pooler) -- held in bf16 for inference. Each task's diff is made the way a user
makes one: ``dpkernels.diff_prune`` on an fp32 copy (every nn.Linear becomes a DiffLinear;
embeddings and LayerNorms are gated too, through GatedParameter), random diff magnitudes, then
``dpkernels.project(model, 0.005)`` (global top 0.5%) and ``SparseDiff.from_model``. So every one of
the 391 tensors takes part; BertModel has no task head, so there are no dense parameters. The
diffs are made against the fp32 base and applied to its bf16 cast (the fingerprint accepts a cast).

Providers, each timed over a full switch A -> B (undo A, apply B) on the bf16 model:

    triton      TaskSwitcher, Triton backend: one restore launch and one apply launch in all
    cuda        TaskSwitcher, the compiled extension's scatter kernels (when dpkernels._C is built)
    torch       TaskSwitcher, torch backend: the reference's per-tensor loop (index ops per tensor)
    index_add   per tensor ``p.index_add_(-A)`` then ``p.index_add_(+B)`` in bf16 (the naive way; it
                does not restore the base exactly -- the drift is reported)
    dense       per tensor ``torch.add(theta0, delta_B, out=p)`` from dense bf16 deltas resident on
                the device (what switching costs without sparsity)

Also reported (bench_switch_size.json): the diff file's size vs a dense bf16 checkpoint, and the
bf16 elements the index_add loop has drifted from the base after 100 round trips (the TaskSwitcher
is checked to restore the base bit for bit).

    python -m benchmarks.bench_switch [--device cuda] [--layers 24 --hidden 1024]

On CPU it runs a small smoke configuration (2 layers, hidden 128, vocabulary 1000) unless sizes
are given, with the torch, index_add and dense providers: CPU times say nothing about the GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import itertools
import json
import os
import tempfile

import torch
from transformers import BertConfig, BertModel

import dpkernels
from benchmarks.common import check_providers, cuda_extension_loads, environment, measure, print_table, write_rows
from dpkernels import SparseDiff, TaskSwitcher
from dpkernels.nn import iter_gated

LARGE = dict(layers=24, hidden=1024, heads=16, vocab=30522)
SMOKE = dict(layers=2, hidden=128, heads=2, vocab=1000)
PROVIDERS = ("triton", "cuda", "torch", "index_add", "dense")


@contextlib.contextmanager
def _backend(name: str):
    """DPKERNELS_BACKEND=name inside the block, the previous value after."""
    previous = os.environ.get("DPKERNELS_BACKEND")
    os.environ["DPKERNELS_BACKEND"] = name
    try:
        yield
    finally:
        if previous is None:
            del os.environ["DPKERNELS_BACKEND"]
        else:
            os.environ["DPKERNELS_BACKEND"] = previous


def build_base(layers: int, hidden: int, heads: int, vocab: int, device: str) -> BertModel:
    config = BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=4 * hidden)
    torch.manual_seed(0)
    with torch.device(device):
        return BertModel(config).eval()


def random_diff_model(base: torch.nn.Module, seed: int) -> torch.nn.Module:
    """diff_prune a copy of `base` and give it random diffs (log_alpha stays at alpha_init: all gates open)."""
    model = dpkernels.diff_prune(copy.deepcopy(base))
    gen = torch.Generator(device=next(base.parameters()).device).manual_seed(seed)
    with torch.no_grad():
        for _, _, gt in iter_gated(model):
            gt.diff.copy_(torch.randn(gt.diff.shape, generator=gen, device=gt.diff.device) * 0.01)
    return model


def make_diff(base: torch.nn.Module, sparsity: float, seed: int) -> SparseDiff:
    """A random diff of `base` (fp32 diff values whatever its dtype), projected to `sparsity`, extracted."""
    model = random_diff_model(base, seed)
    dpkernels.project(model, sparsity)
    return SparseDiff.from_model(model)


def _per_tensor(model, diff, dtype):
    params = dict(model.named_parameters())
    return [(params[name].detach().view(-1), t.index.to(params[name].device), t.values.to(params[name].device, dtype))
            for name, t in diff.tensors.items() if t.nnz]


def run(device: str, sizes: dict, sparsity: float, providers: list[str]) -> tuple[list[dict], dict]:
    env = environment(device)
    base = build_base(**sizes, device=device)
    diffs = {"a": make_diff(base, sparsity, 1), "b": make_diff(base, sparsity, 2)}
    model = base.to(torch.bfloat16).requires_grad_(False)  # the inference model (the fp32 base is done with)
    params = dict(model.named_parameters())
    original = {n: p.detach().clone() for n, p in params.items()}
    nnz = {k: d.nnz for k, d in diffs.items()}
    shape = f"bert L{sizes['layers']} H{sizes['hidden']} ({len(params)} tensors, nnz {nnz['a']})"
    rows = []

    def row(provider, fn, bytes_moved):
        ms, q20, q80, peak = measure(fn, device)
        rows.append(dict(op="switch", provider=provider, mode="restore+apply", shape=shape, dtype="bf16", ms=ms,
                         ms_q20=q20, ms_q80=q80, peak_mb=peak, gbps=bytes_moved / ms / 1e6, **env))

    # Bytes per switch: undo A (ids 4, index 4, saved 2 read, base 2 written per entry), apply B
    # (ids, index, value 4, base read 2, saved 2 and base 2 written).
    scatter_bytes = 12 * nnz["a"] + 18 * nnz["b"]
    switcher = TaskSwitcher(model).add("a", diffs["a"]).add("b", diffs["b"])
    exact = True
    for provider in [p for p in providers if p in ("triton", "cuda", "torch")]:
        with _backend(provider):
            switcher.switch("a")
            order = itertools.cycle("ba")
            row(provider, lambda order=order: switcher.switch(next(order)), scatter_bytes)
            switcher.reset()
        exact &= all(torch.equal(p.view(torch.int16), original[n].view(torch.int16)) for n, p in params.items())

    drift = None
    if "index_add" in providers:
        loops = {k: _per_tensor(model, d, torch.bfloat16) for k, d in diffs.items()}

        def merge(key, sign):
            for flat, index, values in loops[key]:
                flat.index_add_(0, index, values, alpha=sign)

        def reset_base():
            for n, p in params.items():
                p.copy_(original[n])

        merge("a", 1)
        pairs = itertools.cycle([("a", "b"), ("b", "a")])

        def index_add_switch():
            old, new = next(pairs)
            merge(old, -1)
            merge(new, 1)

        # Bytes per tensor entry and pass: index 8, value 2, base read 2 and written 2; two passes.
        row("index_add", index_add_switch, 14 * (nnz["a"] + nnz["b"]))
        reset_base()
        for _ in range(100):
            merge("a", 1)
            merge("a", -1)
        drift = sum(int((p.view(torch.int16) != original[n].view(torch.int16)).sum()) for n, p in params.items())
        reset_base()

    if "dense" in providers:
        deltas = {}
        for key, diff in diffs.items():
            deltas[key] = []
            for name, t in diff.tensors.items():
                delta = torch.zeros(params[name].numel(), dtype=torch.bfloat16, device=device)
                delta[t.index.to(device)] = t.values.to(device, torch.bfloat16)
                deltas[key].append((params[name], original[name], delta.view(params[name].shape)))
        order = itertools.cycle("ba")

        def dense_switch():
            for p, theta0, delta in deltas[next(order)]:
                torch.add(theta0, delta, out=p)

        # Bytes per element: theta0 and delta read, the parameter written (bf16 each).
        row("dense", dense_switch, 6 * sum(p.numel() for p in params.values()))
        for n, p in params.items():
            p.copy_(original[n])

    with tempfile.TemporaryDirectory() as tmp:
        file_bytes = diffs["a"].save(os.path.join(tmp, "a.safetensors"))
    dense_bytes = sum(p.numel() * p.element_size() for p in params.values())
    summary = dict(tensors=len(params), params=sum(p.numel() for p in params.values()), nnz=nnz["a"],
                   sparsity=diffs["a"].sparsity, diff_file_bytes=file_bytes, dense_bf16_checkpoint_bytes=dense_bytes,
                   size_ratio=file_bytes / dense_bytes, switcher_restores_base_bit_exact=exact,
                   index_add_drifted_elements_after_100_round_trips=drift, **env)
    return rows, summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    for name in LARGE:
        parser.add_argument(f"--{name}", type=int, default=None)
    parser.add_argument("--sparsity", type=float, default=0.005)
    parser.add_argument("--providers", default=None,
                        help="comma list of triton,cuda,torch,index_add,dense (default: all on CUDA, cuda when "
                             "the extension is built; torch,index_add,dense on CPU)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "out"))
    args = parser.parse_args(argv)
    given = {k: getattr(args, k) for k in LARGE if getattr(args, k) is not None}
    defaults = LARGE if args.device == "cuda" else SMOKE
    if args.device != "cuda":
        print("bench_switch: no CUDA device; a smoke run" + (" of the small configuration" if not given else "")
              + " (CPU times say nothing about the GPU kernels)")
    sizes = {**defaults, **given}
    providers = (args.providers or ("triton,torch,index_add,dense" if args.device == "cuda"
                                    else "torch,index_add,dense")).split(",")
    check_providers(parser, providers, PROVIDERS)
    if args.providers is None and args.device == "cuda" and cuda_extension_loads("bench_switch"):
        providers.insert(1, "cuda")
    rows, summary = run(args.device, sizes, args.sparsity, providers)
    print_table(rows)
    print(json.dumps({k: summary[k] for k in ("tensors", "params", "nnz", "diff_file_bytes",
                                               "dense_bf16_checkpoint_bytes", "size_ratio",
                                               "switcher_restores_base_bit_exact",
                                               "index_add_drifted_elements_after_100_round_trips")}, indent=1))
    print("wrote", *write_rows(rows, args.out, "bench_switch"))
    with open(os.path.join(args.out, "bench_switch_size.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return 0 if summary["switcher_restores_base_bit_exact"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
