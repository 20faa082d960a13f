"""The command line of a living index: metadata from the corpus, add / add --update, delete by ids
or filter, search --where, compact, info; and the one-line errors of each."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from edgeplaid.cli import _param_value, main
from edgeplaid.index import Index

WORDS = "wing lift flow heat shock boundary layer slab conduction propeller supersonic pressure".split()


def _text(i: int) -> str:
    return " ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(8 + i % 5))


def _line(i: int, **fields: object) -> str:
    return json.dumps({"_id": f"d{i}", "title": f"doc {i}", "text": _text(i), **fields}) + "\n"


@pytest.fixture()
def corpus(tmp_path: Path) -> Path:
    return _write_corpus(tmp_path)


def _write_corpus(root: Path) -> Path:
    """40 documents: year and source fields on all but every tenth (no metadata), tags on some."""
    path = root / "corpus.jsonl"
    with path.open("w") as f:
        for i in range(40):
            if i % 10 == 9:
                f.write(_line(i))
            elif i % 4 == 0:
                f.write(_line(i, year=2000 + i % 5, source="ab"[i % 2], tags=["x", {"n": i}]))
            else:
                f.write(_line(i, year=2000 + i % 5, source="ab"[i % 2]))
    return path


def run(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys: pytest.CaptureFixture, *argv: str) -> dict:
    code, out, err = run(capsys, *argv, "--json")
    assert code == 0, err
    return json.loads(out)


def test_round_trip(capsys, tmp_path, model_dir, corpus):
    idx = str(tmp_path / "idx")
    built = run_json(capsys, "index", str(corpus), "--model", model_dir, "--out", idx, "--quiet")
    assert built["documents"] == 40 and built["with_metadata"] == 36
    index = Index.load(idx)
    assert index.metadata(["d0", "d1", "d9"]) == [
        {"year": 2000, "source": "a", "tags": ["x", {"n": 0}]},
        {"year": 2001, "source": "b"},
        None,  # only _id, title and text: no metadata
    ]
    info = run_json(capsys, "info", idx)
    assert (info["documents"], info["segments"], info["deleted"], info["metadata"]) == (40, 1, 0, True)

    # d38, d39 are in the index: refused without --update, and nothing is written.
    more = tmp_path / "more.jsonl"
    more.write_text("".join(_line(i, year=2030, batch="more") for i in range(38, 43)))
    code, _, err = run(capsys, "add", idx, str(more), "--quiet")
    assert code == 2 and err.strip().splitlines() == [
        f"edgeplaid: error: {more}: 2 ids already in the index ('d38', 'd39'); "
        "--update replaces those documents"
    ]
    assert Index.load(idx).n_docs == 40

    added = run_json(capsys, "add", idx, str(more), "--update", "--quiet")
    assert (added["added"], added["updated"], added["n_docs"]) == (3, 2, 43)
    index = Index.load(idx)
    assert index.metadata(["d38", "d42"]) == [{"year": 2030, "batch": "more"}] * 2
    assert sorted(index.ids()) == sorted(f"d{i}" for i in range(43))
    # A change switches in a new index directory: the record of the model is kept in it.
    assert json.loads((Path(idx) / "encoder.json").read_text())["model"] == model_dir

    assert run_json(capsys, "delete", idx, "--ids", "d1", "d2", "d1")["deleted"] == 2
    code, _, err = run(capsys, "delete", idx, "--ids", "d3", "d1")
    assert code == 2 and err.strip() == "edgeplaid: error: --ids: 'd1' is not a document of this index"
    assert "d3" in Index.load(idx)  # all or nothing

    ids_file = tmp_path / "ids.txt"
    ids_file.write_text("d5\n\nd6\n")
    assert run_json(capsys, "delete", idx, "--ids-file", str(ids_file)) == {
        "index": idx,
        "deleted": 2,
        "n_docs": 39,
    }

    # --param values: JSON when they parse (2030 is a number), else text (b).
    want = Index.load(idx).select("year = ? OR source = ?", [2030, "b"])
    assert len(want) == 5 + 14  # d38..d42, and the live odd documents with metadata
    got = run_json(
        capsys, "delete", idx, "--where", "year = ? OR source = ?", "--param", "2030", "--param", "b"
    )
    assert got == {"index": idx, "deleted": len(want), "n_docs": 39 - len(want)}
    assert not set(want) & set(Index.load(idx).ids())

    hits = run_json(
        capsys, "search", idx, _text(4), "--k", "30", "--where", "year >= ?", "--param", "2003", "--quiet"
    )["results"]["1"]
    index = Index.load(idx)
    allowed = set(index.select("year >= 2003"))
    assert hits and set(hits) <= allowed and len(hits) == len(allowed)  # k above the allowed count
    assert all(m["year"] >= 2003 for m in index.metadata(list(hits)))

    before = run_json(capsys, "info", idx)
    # (how many segments the adds left depends on the index's merging: not asserted)
    assert before["deleted"] == before["positions"] - before["documents"] > 0
    compacted = run_json(capsys, "compact", idx)
    assert compacted["compacted"] and compacted["before"] == {
        k: before[k] for k in ("documents", "positions", "deleted", "segments")
    }
    assert compacted["after"] == {
        "documents": before["documents"],
        "positions": before["documents"],
        "deleted": 0,
        "segments": 1,
    }
    assert run_json(capsys, "compact", idx)["compacted"] is False
    code, text, _ = run(capsys, "info", idx)
    assert code == 0 and "1 segment, 0 deleted documents (until compact), metadata: yes" in text
    index = Index.load(idx)
    assert sorted(index.ids()) == sorted(
        set(f"d{i}" for i in range(43)) - {"d1", "d2", "d5", "d6"} - set(want)
    )
    assert index.metadata(["d0"]) == [{"year": 2000, "source": "a", "tags": ["x", {"n": 0}]}]
    # After it all, search still finds the model and the filter still applies.
    hits2 = run_json(capsys, "search", idx, _text(4), "--k", "30", "--where", "year >= 2003", "--quiet")
    assert set(hits2["results"]["1"]) == set(hits)


def test_no_metadata(capsys, tmp_path, model_dir, corpus):
    idx = str(tmp_path / "idx")
    built = run_json(
        capsys, "index", str(corpus), "--model", model_dir, "--out", idx, "--quiet", "--no-metadata"
    )
    assert built["with_metadata"] == 0
    assert run_json(capsys, "info", idx)["metadata"] is False
    more = tmp_path / "more.jsonl"
    more.write_text(_line(50, year=2050))
    assert run_json(capsys, "add", idx, str(more), "--no-metadata", "--quiet")["n_docs"] == 41
    assert Index.load(idx).metadata(["d50"]) == [None]
    with pytest.warns(UserWarning, match="holds no metadata"):
        code, out, _ = run(capsys, "search", idx, "wing", "--where", "year > 0", "--quiet", "--json")
    assert code == 0 and json.loads(out)["results"]["1"] == {}


def test_add_into_an_index_of_int_ids(capsys, tmp_path, model_dir):
    """An index built through the Python API with int ids: command-line ids are read as ints."""
    idx = tmp_path / "idx"
    rng = np.random.default_rng(0)
    tokens = rng.standard_normal((200, 32)).astype(np.float32)
    tokens /= np.linalg.norm(tokens, axis=1, keepdims=True)
    Index.build(idx, tokens, np.full(20, 10), ids=list(range(100, 120)), progress=False)
    (idx / "encoder.json").write_text(json.dumps({"model": model_dir, "dim": 32}))
    more = tmp_path / "more.jsonl"
    more.write_text('{"_id": "7", "text": "wing lift"}\n{"_id": 100, "text": "heat flow"}\n')
    assert run_json(capsys, "add", str(idx), str(more), "--update", "--quiet")["n_docs"] == 21
    assert run_json(capsys, "delete", str(idx), "--ids", "7", "101")["deleted"] == 2
    code, _, err = run(capsys, "delete", str(idx), "--ids", "d1")
    assert code == 2 and "--ids: this index's ids are integers, got 'd1'" in err


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, model_dir: str) -> Path:
    """An index of the corpus fixture's 40 documents, to be copied."""
    root = tmp_path_factory.mktemp("built")
    out = root / "idx"
    assert main(["index", str(_write_corpus(root)), "--model", model_dir, "--out", str(out), "--quiet"]) == 0
    return out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["delete", "{tmp}/missing", "--ids", "a"], "{tmp}/missing: no such index directory"),
        (["add", "{tmp}/missing", "{tmp}/ok.jsonl"], "{tmp}/missing: no such index directory"),
        (["compact", "{tmp}/missing"], "{tmp}/missing: no such index directory"),
        (["delete", "{idx}"], "--ids, --ids-file, --where: give exactly one of them"),
        (["delete", "{idx}", "--ids", "d1", "--where", "year = 1"], "(got --ids and --where)"),
        (["delete", "{idx}", "--ids-file", "{tmp}/ok.jsonl", "--ids", "d1"], "(got --ids and --ids-file)"),
        (["delete", "{idx}", "--ids", "d1", "--param", "1"], "--param: given without --where"),
        (["delete", "{idx}", "--ids", "nope"], "--ids: 'nope' is not a document of this index"),
        (["delete", "{idx}", "--ids-file", "{tmp}/none.txt"], "--ids-file {tmp}/none.txt: No such file"),
        (["delete", "{idx}", "--ids-file", "{tmp}/ok.jsonl"], "is not a document of this index"),
        (["delete", "{idx}", "--where", "year = 1; DROP TABLE docs"], "--where: ';' is not allowed"),
        (["delete", "{idx}", "--where", "year = ?"], "--where: the filter has 1 '?' but 0 params"),
        (["delete", "{idx}", "--where", ""], "--where: the filter is empty"),
        (["delete", "{idx}", "--where", "year = ?", "--param", "[1]"], "--where: params[0] has type list"),
        (
            ["delete", "{idx}", "--where", "load_extension('x') = 1"],
            "--where: function calls are not allowed",
        ),
        (["search", "{idx}", "wing", "--where", "(SELECT 1) = 1"], "--where: "),
        (["search", "{idx}", "wing", "--param", "1"], "--param: given without --where"),
        (["search", "{idx}", "wing", "--where", "n = 'caf\udce9'"], "--where: not valid UTF-8"),
        (["delete", "{idx}", "--where", "n = ?", "--param", "caf\udce9"], "--where: params[0] is not valid"),
        (["add", "{idx}", "{tmp}/nan.jsonl"], "nan.jsonl:2: metadata of 'b'"),
        (["add", "{idx}", "{tmp}/big.jsonl"], "big.jsonl:1: metadata of 'a', at ['n']: the integer"),
        (["add", "{idx}", "{tmp}/dup.jsonl"], "dup.jsonl: duplicate id 'a'"),
        (["add", "{idx}", "{tmp}/space.jsonl"], "'a b' is empty or contains whitespace"),
        (["compact", "{tmp}/ok.jsonl"], "no such index directory"),
    ],
)
def test_bad_input_is_one_line(capsys, tmp_path, model_dir, built, argv, message):
    idx = tmp_path / "idx"
    shutil.copytree(built, idx)
    (tmp_path / "ok.jsonl").write_text('{"_id": "zz", "text": "wing"}\n')
    (tmp_path / "nan.jsonl").write_text('{"_id": "a", "text": "x"}\n{"_id": "b", "text": "y", "w": NaN}\n')
    (tmp_path / "big.jsonl").write_text('{"_id": "a", "text": "x", "n": 100000000000000000000}\n')
    (tmp_path / "dup.jsonl").write_text('{"_id": "a", "text": "x"}\n{"_id": "a", "text": "y"}\n')
    (tmp_path / "space.jsonl").write_text('{"_id": "a b", "text": "x"}\n')
    before = sorted(p.name for p in idx.iterdir())
    code, _, err = run(capsys, *(a.format(tmp=tmp_path, idx=idx) for a in argv))
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("edgeplaid: error: ") and message.format(tmp=tmp_path) in err, err
    index = Index.load(idx)
    assert index.n_docs == 40 and len(index.segments) == 1  # nothing written
    assert sorted(p.name for p in idx.iterdir()) == before


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("2020", 2020),
        ("-1.5", -1.5),
        ("true", True),
        ("null", None),
        ('"2020"', "2020"),
        ("pubmed", "pubmed"),
        ("NaN", "NaN"),
        ("Infinity", "Infinity"),
        ("[1]", [1]),  # JSON: refused by the filter's own check, named
        ("", ""),
    ],
)
def test_param_values(text, value):
    assert _param_value(text) == value and type(_param_value(text)) is type(value)


def test_lexical_and_hybrid_from_the_command_line(capsys, tmp_path, model_dir, corpus):
    """index keeps the texts for BM25 by default; search --mode lexical|hybrid, add indexes the
    new texts, --no-lexical indexes none; eval reports every mode asked for."""
    idx = str(tmp_path / "idx")
    run_json(capsys, "index", str(corpus), "--model", model_dir, "--out", idx, "--quiet")
    index = Index.load(idx)
    assert index.has_lexical and index.texts(["d3"]) == [f"doc 3 {_text(3)}"]
    info = run_json(capsys, "info", idx)["lexical"]
    assert info["analyzer"] == "plain" and info["store_texts"] and info["n_docs"] == 40 and info["bytes"] > 0
    lexical = run_json(capsys, "search", idx, "supersonic propeller", "--mode", "lexical", "--k", "5")
    want = index.search(text="supersonic propeller", k=5)
    assert list(lexical["results"]["1"]) == [u for u in want.user_ids[0] if u is not None]
    hybrid = run_json(
        capsys, "search", idx, "supersonic propeller", "--mode", "hybrid", "--alpha", "0.7", "--quiet"
    )
    assert len(hybrid["results"]["1"]) == 10
    code, _, err = run(capsys, "search", idx, "wing", "--alpha", "0.3", "--quiet")
    assert code == 2 and "--alpha, --fusion: only with --mode hybrid" in err
    code, _, err = run(capsys, "search", idx, "wing", "--mode", "hybrid", "--alpha", "3")
    assert code == 2 and "--alpha" in err

    more = tmp_path / "more.jsonl"
    more.write_text(json.dumps({"_id": "z1", "title": "t", "text": "zeppelin mooring masts"}) + "\n")
    run_json(capsys, "add", idx, str(more), "--quiet")
    assert run_json(capsys, "search", idx, "zeppelin", "--mode", "lexical")["results"]["1"].keys() == {"z1"}

    plain = str(tmp_path / "plain")
    run_json(capsys, "index", str(corpus), "--model", model_dir, "--out", plain, "--no-lexical", "--quiet")
    code, _, err = run(capsys, "search", plain, "wing", "--mode", "hybrid", "--quiet")
    assert code == 2 and "has no lexical side" in err

    beir = tmp_path / "beir"
    (beir / "qrels").mkdir(parents=True)
    shutil.copy(corpus, beir / "corpus.jsonl")
    (beir / "queries.jsonl").write_text(
        "".join(json.dumps({"_id": f"q{i}", "text": _text(i)}) + "\n" for i in range(4))
    )
    (beir / "qrels" / "test.tsv").write_text(
        "query-id\tcorpus-id\tscore\n" + "".join(f"q{i}\td{i}\t1\n" for i in range(4))
    )
    report = run_json(
        capsys, "eval", str(beir), "--model", model_dir, "--mode", "late", "lexical", "hybrid", "--quiet"
    )
    assert set(report["modes"]) == {"late", "lexical", "hybrid"}
    assert report["metrics"] == report["modes"]["late"]
    assert all(0 <= m["nDCG@10"] <= 1 for m in report["modes"].values())
    code, out, _ = run(
        capsys, "eval", str(beir), "--model", model_dir, "--mode", "lexical", "hybrid", "--quiet"
    )
    assert code == 0 and "lexical:" in out and "hybrid:" in out
