from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edgeplaid.eval import DataError, evaluate, load_beir, read_texts, to_run, write_trec

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def _write_jsonl(path: Path, rows: list[object]) -> None:
    path.write_text(
        "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8"
    )


def _collection(root: Path) -> Path:
    (root / "qrels").mkdir(parents=True)
    _write_jsonl(
        root / "corpus.jsonl", [{"_id": "d1", "title": "T", "text": "alpha"}, {"_id": 2, "text": "beta"}]
    )
    _write_jsonl(root / "queries.jsonl", [{"_id": "q1", "text": "alpha?"}, {"_id": "q2", "text": "unjudged"}])
    (root / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\n", encoding="utf-8")
    return root


def test_load_beir(tmp_path):
    c = load_beir(_collection(tmp_path / "c"))
    assert c.doc_ids == ["d1", "2"] and c.doc_texts == ["T alpha", "beta"]
    assert c.query_ids == ["q1"] and c.query_texts == ["alpha?"]  # only judged queries
    assert c.qrels == {"q1": {"d1": 1}}


def test_malformed_line_names_file_and_line(tmp_path):
    root = _collection(tmp_path / "c")
    _write_jsonl(root / "corpus.jsonl", [{"_id": "d1", "text": "a"}, "{not json", {"_id": "d3", "text": "c"}])
    with pytest.raises(DataError, match=r"corpus.jsonl:2: malformed JSON line"):
        load_beir(root)
    with pytest.warns(UserWarning, match=r"corpus.jsonl:2"):
        c = load_beir(root, skip_bad_lines=True)
    assert c.doc_ids == ["d1", "d3"]


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([{"_id": "a", "text": "x"}, {"_id": "a", "text": "y"}], "duplicate id 'a'"),
        ([{"text": "no id"}], r"corpus.jsonl:1: expected an '_id'"),
        ([{"_id": "a", "text": 3}], "must be strings"),
        ([], "the corpus is empty"),
    ],
)
def test_bad_corpus(tmp_path, rows, message):
    root = _collection(tmp_path / "c")
    _write_jsonl(root / "corpus.jsonl", rows)
    with pytest.raises(DataError, match=message):
        load_beir(root)


def test_missing_files(tmp_path):
    with pytest.raises(DataError, match="not a directory"):
        load_beir(tmp_path / "nowhere")
    with pytest.raises(DataError, match="no such file"):
        read_texts(tmp_path / "queries.jsonl")


def test_plain_text_file_gets_line_numbers_as_ids(tmp_path):
    path = tmp_path / "docs.txt"
    path.write_text("first\n\nthird\n", encoding="utf-8")
    assert read_texts(path) == (["1", "3"], ["first", "third"])


def test_metrics_against_hand_computed_values(tmp_path):
    qrels = {"q1": {"a": 1, "b": 1}, "q2": {"c": 2}}
    run = to_run(
        ["q1", "q2"],
        [["a", "x", None], ["y", "c", None]],
        np.array([[3.0, 2.0, -np.inf], [2.0, 1.0, -np.inf]]),
    )
    assert run == {"q1": {"a": 3.0, "x": 2.0}, "q2": {"y": 2.0, "c": 1.0}}
    m = evaluate(run, qrels)
    assert m["RR@10"] == pytest.approx((1.0 + 0.5) / 2)
    assert m["R@100"] == pytest.approx((0.5 + 1.0) / 2)
    ndcg_q1 = 1.0 / (1.0 + 1.0 / np.log2(3))  # one of two relevant docs, at rank 1
    ndcg_q2 = (1.0 / np.log2(3)) / 1.0
    assert m["nDCG@10"] == pytest.approx((ndcg_q1 + ndcg_q2) / 2, abs=1e-4)
    path = tmp_path / "out" / "run.trec"
    write_trec(path, run)
    assert path.read_text().splitlines()[0] == "q1 Q0 a 1 3.000000 edgeplaid"
    assert not list(path.parent.glob(".*.tmp"))


@pytest.mark.skipif(not (SHARED / "cranfield").is_dir(), reason="../shared/data/cranfield is not here")
def test_cranfield_counts():
    with pytest.warns(UserWarning, match="2 empty documents left out: 471, 995"):
        c = load_beir(SHARED / "cranfield")
    assert len(c.doc_ids) == 1398 and len(c.query_ids) == 225
