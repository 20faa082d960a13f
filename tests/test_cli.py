"""The `edgeplaid` command line, end to end on a tiny random model and a tiny collection."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from edgeplaid.cli import main

WORDS = "wing lift flow heat shock boundary layer slab conduction propeller supersonic pressure".split()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("beir")
    (root / "qrels").mkdir()
    with (root / "corpus.jsonl").open("w") as f:
        for i in range(60):
            text = " ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(8 + i % 5))
            f.write(json.dumps({"_id": f"d{i}", "title": f"doc {i}", "text": text}) + "\n")
    with (root / "queries.jsonl").open("w") as f:
        for i in range(5):
            f.write(json.dumps({"_id": f"q{i}", "text": f"{WORDS[i]} {WORDS[i + 3]}"}) + "\n")
    (root / "qrels" / "test.tsv").write_text(
        "query-id\tcorpus-id\tscore\n" + "".join(f"q{i}\td{i * 3}\t1\n" for i in range(5))
    )
    return root


def run(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_index_codec_options(capsys, tmp_path, model_dir, dataset):
    out = tmp_path / "pooled"
    argv = ["index", str(dataset / "corpus.jsonl"), "--model", model_dir, "--out", str(out), "--quiet"]
    code, _, _ = run(capsys, *argv, "--nbits", "2", "--buckets", "quantile", "--pool-factor", "1.5")
    assert code == 0
    code, text, _ = run(capsys, "info", str(out))
    assert code == 0 and "buckets quantile, pool factor 1.5" in text
    code, text, _ = run(capsys, "info", str(out), "--json")
    build = json.loads(text)["manifest"]["build"]
    assert build["pool_factor"] == 1.5 and build["buckets"] == "quantile"
    for bad in ("0.5", "x", "nan"):
        with pytest.raises(SystemExit):
            main([*argv[:5], str(tmp_path / "bad"), "--pool-factor", bad])
        assert "--pool-factor" in capsys.readouterr().err


def test_index_search_info_rerank_eval(capsys, tmp_path, model_dir, dataset):
    out = tmp_path / "idx"
    code, text, _ = run(
        capsys,
        "index",
        str(dataset / "corpus.jsonl"),
        "--model",
        model_dir,
        "--out",
        str(out),
        "--quiet",
        "--json",
    )
    assert code == 0 and json.loads(text)["documents"] == 60

    code, text, _ = run(
        capsys, "search", str(out), "wing lift", "--k", "5", "--device", "cpu", "--quiet", "--json"
    )
    results = json.loads(text)["results"]["1"]
    assert code == 0 and len(results) == 5 and all(d.startswith("d") for d in results)

    trec = tmp_path / "run.trec"
    code, _, _ = run(
        capsys,
        "search",
        str(out),
        "--queries",
        str(dataset / "queries.jsonl"),
        "--k",
        "3",
        "--out",
        str(trec),
        "--quiet",
    )
    lines = trec.read_text().splitlines()
    assert code == 0 and len(lines) == 15 and lines[0].split()[1] == "Q0"

    code, text, _ = run(capsys, "info", str(out), "--json")
    info = json.loads(text)
    assert code == 0 and info["encoder"]["model"] == model_dir and info["bytes_per_token"] > 0

    code, text, _ = run(
        capsys,
        "rerank",
        "--model",
        model_dir,
        "--query",
        "heat conduction",
        "--docs",
        str(dataset / "corpus.jsonl"),
        "--k",
        "4",
        "--device",
        "cpu",
        "--quiet",
        "--json",
    )
    ranked = json.loads(text)["results"]
    assert code == 0 and len(ranked) == 4
    assert [r["score"] for r in ranked] == sorted((r["score"] for r in ranked), reverse=True)

    code, text, _ = run(
        capsys,
        "eval",
        str(dataset),
        "--model",
        model_dir,
        "--k",
        "10",
        "--exhaustive",
        "--device",
        "cpu",
        "--quiet",
        "--json",
    )
    report = json.loads(text)
    assert code == 0 and set(report["metrics"]) == {"nDCG@10", "RR@10", "R@100"}
    assert 0 <= report["recall_vs_exhaustive"] <= 1 and report["n_docs"] == 60


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["search", "{tmp}/missing", "q"], "no such index directory"),
        (["search", "{tmp}", "--queries", "{tmp}/none.jsonl"], None),  # not an index either
        (
            ["index", "{tmp}/bad.jsonl", "--model", "{model}", "--out", "{tmp}/o"],
            "bad.jsonl:2: malformed JSON line",
        ),
        (["index", "{tmp}/empty.jsonl", "--model", "{model}", "--out", "{tmp}/o"], "the corpus is empty"),
        (["index", "{tmp}/dup.jsonl", "--model", "{model}", "--out", "{tmp}/o"], "duplicate id 'a'"),
        (["index", "{tmp}/ok.jsonl", "--model", "{tmp}", "--out", "{tmp}/o"], None),  # not a model
        (["eval", "{tmp}/nowhere", "--model", "{model}"], "not a directory"),
    ],
)
def test_bad_input_is_one_line_and_nonzero(capsys, tmp_path, model_dir, argv, message):
    (tmp_path / "bad.jsonl").write_text('{"_id": "a", "text": "x"}\n{oops\n')
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "dup.jsonl").write_text('{"_id": "a", "text": "x"}\n{"_id": "a", "text": "y"}\n')
    (tmp_path / "ok.jsonl").write_text('{"_id": "a", "text": "x"}\n')
    code, _, err = run(capsys, *(a.format(tmp=tmp_path, model=model_dir) for a in argv))
    assert code == 2
    lines = err.strip().splitlines()
    assert lines[-1].startswith("edgeplaid: error: ")
    if message:
        assert message in lines[-1]
    assert not (tmp_path / "o").exists()  # nothing half-written


def test_skip_bad_lines(capsys, tmp_path, model_dir):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"_id": "a", "text": "wing lift"}\n{oops\n{"_id": "b", "text": "heat flow"}\n')
    out = str(tmp_path / "o")
    with pytest.warns(UserWarning, match=r"c.jsonl:2: malformed JSON line"):
        code, text, _ = run(
            capsys, "index", str(corpus), "--model", model_dir, "--out", out, "--skip-bad-lines", "--json"
        )
    assert code == 0 and json.loads(text)["documents"] == 2


def test_k_must_be_positive(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "edgeplaid.cli", "search", str(tmp_path), "q", "--k", "0"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "expected a positive integer, got 0" in proc.stderr
    # One line, as every other error (argparse printed the usage block first).
    assert proc.stderr.strip().splitlines() == [
        "edgeplaid: error: argument --k: expected a positive integer, got 0 (see edgeplaid search -h)"
    ]


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory: pytest.TempPathFactory, model_dir: str, dataset: Path) -> Path:
    out = tmp_path_factory.mktemp("cli-index") / "idx"
    assert (
        main(["index", str(dataset / "corpus.jsonl"), "--model", model_dir, "--out", str(out), "--quiet"])
        == 0
    )
    return out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        # A lone surrogate (a JSON \udfff escape) in the corpus: named with its line.
        (["index", "{tmp}/surrogate.jsonl", "--model", "{model}", "--out", "{tmp}/o"], "surrogate.jsonl:2:"),
        # Bytes that are not UTF-8 on a line: that line named.
        (["index", "{tmp}/latin1.jsonl", "--model", "{model}", "--out", "{tmp}/o"], "latin1.jsonl:2: "),
        # --out checked before the model is even loaded (the model here does not exist).
        (
            ["index", "{tmp}/ok.jsonl", "--model", "{tmp}/nomodel", "--out", "{tmp}/afile/o"],
            "afile is not a directory",
        ),
        (
            ["index", "{tmp}/ok.jsonl", "--model", "{tmp}/nomodel", "--out", "/proc/edgeplaid-no/o"],
            "--out /proc/edgeplaid-no/o: cannot write in /proc",
        ),
        (["search", "{index}", "wing", "--k", str(2**40)], "at most 100,000, got 1099511627776"),
        (
            ["rerank", "--model", "{model}", "--query", "q", "--docs", "{tmp}/ok.jsonl", "--k", str(2**40)],
            "--k",
        ),
        (["search", "{index}", "--queries", "{tmp}/ok.jsonl", "--out", "{tmp}"], "is a directory"),
        (["search", "{tmp}/no-model-index", "wing"], 'encoder.json: no "model"'),
        (["search", "{tmp}/list-encoder-index", "wing"], "encoder.json: expected a JSON object"),
        (["info", "{tmp}/list-manifest-index"], "manifest.json"),
        (["search", "{index}", "wing \udcff"], "query: not valid UTF-8"),
        (["search", "{index}", "wing", "--colour", "x"], "unrecognized arguments: --colour x"),
        (["search", "{index}", "wing", "--mode", "x"], "argument --mode: invalid choice: 'x'"),
        (["serve", "--request-timeout", "0"], "--request-timeout: expected a positive number, got 0.0"),
    ],
)
def test_hostile_input_is_one_line(capsys, tmp_path, model_dir, index_dir, argv, message):
    import shutil

    (tmp_path / "surrogate.jsonl").write_text(
        '{"_id": "a", "text": "x"}\n{"_id": "b", "text": "y \\udfff"}\n'
    )
    (tmp_path / "latin1.jsonl").write_bytes(b'{"_id": "a", "text": "x"}\n{"_id": "b", "text": "caf\xe9"}\n')
    (tmp_path / "ok.jsonl").write_text('{"_id": "a", "text": "x"}\n')
    (tmp_path / "afile").write_text("a file, not a directory")
    for name, encoder, manifest in (
        ("no-model-index", {"dim": 48}, None),
        ("list-encoder-index", [], None),
        ("list-manifest-index", None, []),
    ):
        shutil.copytree(index_dir, tmp_path / name)
        if encoder is not None:
            (tmp_path / name / "encoder.json").write_text(json.dumps(encoder))
        if manifest is not None:
            (tmp_path / name / "manifest.json").write_text(json.dumps(manifest))
    argv = [a.format(tmp=tmp_path, model=model_dir, index=index_dir) for a in argv]
    try:
        code, _, err = run(capsys, *argv)
    except SystemExit as exc:  # argparse's errors exit from parse_args
        code, err = exc.code, capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("edgeplaid: error: ") and message in err, err
    assert not (tmp_path / "o").exists()


def test_skip_bad_lines_skips_a_line_that_is_not_utf8(capsys, tmp_path, model_dir):
    corpus = tmp_path / "c.jsonl"
    corpus.write_bytes(
        b'{"_id": "a", "text": "wing"}\n{"_id": "x", "text": "caf\xe9"}\n{"_id": "b", "text": "heat"}\n'
    )
    lines = tmp_path / "c.txt"  # the plain-text form, one document a line
    lines.write_bytes(b"wing lift\n\xff\xfe\nheat flow\n")
    for path, n in ((corpus, 2), (lines, 2)):
        with pytest.warns(UserWarning, match=rf"{path.name}:2: .*not valid UTF-8.*skipped"):
            code, text, _ = run(
                capsys,
                "index",
                str(path),
                "--model",
                model_dir,
                "--out",
                str(tmp_path / path.suffix[1:]),
                "--skip-bad-lines",
                "--json",
                "--quiet",
            )
        assert code == 0 and json.loads(text)["documents"] == n


DEVICE_COMMANDS = [
    ["search", "{tmp}", "q"],
    ["rerank", "--model", "m", "--query", "q", "--docs", "{tmp}/d.jsonl"],
    ["eval", "{tmp}", "--model", "m"],
    ["demo"],
    ["serve", "--model", "m"],
]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("argv", DEVICE_COMMANDS, ids=lambda a: a[0])
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_a_cuda_device_without_cuda_is_one_line(capsys, tmp_path, argv, device):
    code, _, err = run(capsys, *(a.format(tmp=tmp_path) for a in argv), "--device", device)
    assert code == 2
    assert err.strip().splitlines() == [
        f"edgeplaid: error: --device {device}: CUDA is not available here "
        f"({'a CPU-only build of torch' if torch.version.cuda is None else 'no CUDA device visible'}); "
        "use --device cpu"
    ]


@pytest.mark.parametrize("device", ["gpu", "cuda:", "cuda:x", "CPU", "cuda:-1"])
def test_a_misspelt_device_is_one_line(capsys, tmp_path, device):
    code, _, err = run(capsys, "search", str(tmp_path), "q", "--device", device)
    assert code == 2
    assert err.strip().splitlines() == [
        f"edgeplaid: error: --device: expected cpu, cuda or cuda:N, got {device!r}"
    ]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_device_error_from_the_shell(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "edgeplaid.cli",
            "rerank",
            "--model",
            "m",
            "--query",
            "q",
            "--docs",
            "d",
            "--device",
            "cuda:0",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("edgeplaid: error: --device cuda:0: CUDA")
    assert len(proc.stderr.strip().splitlines()) == 1


def test_serve_takes_the_index_model_or_none(capsys, tmp_path, monkeypatch):
    import edgeplaid.serve

    seen = []
    monkeypatch.setattr(edgeplaid.serve, "serve", seen.append)
    (tmp_path / "encoder.json").write_text(json.dumps({"model": "the-index-model", "dim": 48}))
    assert run(capsys, "serve", "--index", str(tmp_path), "--device", "cpu")[0] == 0
    assert seen[-1].model == "the-index-model" and seen[-1].device == "cpu"
    code, _, err = run(capsys, "serve")
    assert code == 0 and seen[-1].model is None and "precomputed embeddings only" in err
    code, _, err = run(capsys, "serve", "--index", str(tmp_path / "nowhere"))
    assert code == 2 and "no such index directory" in err and len(seen) == 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_rerank_and_search_on_cuda(capsys, tmp_path, model_dir, dataset):
    out = tmp_path / "idx"
    assert (
        run(capsys, "index", str(dataset / "corpus.jsonl"), "--model", model_dir, "--out", str(out))[0] == 0
    )
    results = {}
    for device in ("cpu", "cuda"):
        code, text, _ = run(capsys, "search", str(out), "wing lift", "--k", "5", "--device", device, "--json")
        assert code == 0
        results[device] = json.loads(text)["results"]["1"]
    assert list(results["cpu"]) == list(results["cuda"])
    argv = ["rerank", "--model", model_dir, "--query", "heat", "--docs", str(dataset / "corpus.jsonl")]
    ranked = {
        d: json.loads(run(capsys, *argv, "--device", d, "--json")[1])["results"] for d in ("cpu", "cuda")
    }
    assert [r["id"] for r in ranked["cpu"][:5]] == [r["id"] for r in ranked["cuda"][:5]]


def test_trec_ids_with_whitespace_are_refused(capsys, tmp_path, model_dir, dataset):
    # A TREC run file is whitespace-separated: such an id would corrupt it, so it is refused,
    # named, at `index` (before any encoding) and at `search --out`.
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"_id": "a", "text": "wing"}\n{"_id": "b c", "text": "lift"}\n')
    code, _, err = run(capsys, "index", str(corpus), "--model", model_dir, "--out", str(tmp_path / "o"))
    assert code == 2 and "'b c'" in err and "TREC" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()
    out = tmp_path / "idx"
    assert (
        run(
            capsys, "index", str(dataset / "corpus.jsonl"), "--model", model_dir, "--out", str(out), "--quiet"
        )[0]
        == 0
    )
    queries = tmp_path / "q.jsonl"
    queries.write_text('{"_id": "q\\n1", "text": "wing"}\n')
    code, _, err = run(
        capsys, "search", str(out), "--queries", str(queries), "--out", str(tmp_path / "r"), "--quiet"
    )
    assert code == 2 and "'q\\n1'" in err and not (tmp_path / "r").exists()


def test_overwrite_replaces_only_an_index(capsys, tmp_path, model_dir, dataset):
    d = tmp_path / "d"
    d.mkdir()
    (d / "notes.txt").write_text("x")
    corpus = str(dataset / "corpus.jsonl")
    code, _, err = run(
        capsys, "index", corpus, "--model", model_dir, "--out", str(d), "--overwrite", "--quiet"
    )
    assert code == 2 and "not an edgeplaid index" in err and (d / "notes.txt").read_text() == "x"
    out = tmp_path / "idx"
    for _ in range(2):  # an index is replaced
        assert (
            run(capsys, "index", corpus, "--model", model_dir, "--out", str(out), "--overwrite", "--quiet")[0]
            == 0
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "idx"]
