"""Batch encoding on Ray (an actor pool over a tiny random model) and the CLI on a sharded index."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import json
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray")

from edgeplaid.cli import main  # noqa: E402
from edgeplaid.distributed import ShardedIndex, encode  # noqa: E402

WORDS = "wing lift flow heat shock boundary layer slab conduction propeller supersonic pressure".split()
TEXTS = [" ".join(WORDS[(i * 5 + j) % len(WORDS)] for j in range(4 + i % 9)) for i in range(23)]


def test_encode_streams_in_order_equal_to_one_model(ray_cluster, model_dir):
    from edgeplaid.model import load_model

    # fp32: batches of other compositions give the same vectors to float32 rounding (in bf16 the
    # GEMMs' blocking follows the batch's shape and the last bits move)
    tokens, doclens = load_model(model_dir, precision="fp32").encode_documents(TEXTS)
    ids = [f"t{i}" for i in range(len(TEXTS))]
    batches = list(
        encode(
            model_dir,
            TEXTS,
            ids=ids,
            keep_texts=True,
            chunk_docs=4,
            n_actors=2,
            precision="fp32",
            progress=False,
        )
    )
    assert [len(b["ids"]) for b in batches] == [4, 4, 4, 4, 4, 3]
    assert [i for b in batches for i in b["ids"]] == ids
    assert [t for b in batches for t in b["texts"]] == TEXTS
    got_lens = np.concatenate([b["doclens"] for b in batches])
    np.testing.assert_array_equal(got_lens, doclens.numpy())
    got = np.concatenate([b["doc_tokens"] for b in batches])
    # the same model on the same texts; batches differ (padding), so fp32 rounding may too
    np.testing.assert_allclose(got, tokens.numpy(), atol=1e-5)
    with pytest.raises(ValueError, match="ids: 2 entries for 23 texts"):
        next(encode(model_dir, TEXTS, ids=["a", "b"]))
    with pytest.raises(ValueError, match="chunk_docs"):
        next(encode(model_dir, TEXTS, chunk_docs=0))


def _corpus(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.jsonl"
    with path.open("w") as f:
        for i, text in enumerate(TEXTS * 3):
            f.write(json.dumps({"_id": f"d{i}", "title": "", "text": text, "year": 2000 + i}) + "\n")
    return path


def test_cli_index_search_info_on_shards(ray_cluster, model_dir, tmp_path, capsys):
    out = tmp_path / "sharded"
    argv = ["index", str(_corpus(tmp_path)), "--model", model_dir, "--out", str(out), "--quiet"]
    assert main([*argv, "--shards", "3", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["shards"] == 3 and sum(report["shard_documents"]) == 69
    assert main(["info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["documents"] == 69 and len(info["shards"]) == 3 and info["manifest"]["lexical"]
    assert main(["info", str(out)]) == 0
    assert "sharded index, 3 shards" in capsys.readouterr().out
    query = f"{WORDS[2]} {WORDS[3]}"
    assert main(["search", str(out), query, "--k", "5", "--json", "--quiet"]) == 0
    late = json.loads(capsys.readouterr().out)["results"]["1"]
    assert len(late) == 5
    # the same search through the Python API: the CLI adds nothing but the encoding
    from edgeplaid.model import load_model

    q, m = load_model(model_dir).encode_queries([query])
    with ShardedIndex.load(out) as index:
        api = index.search(q, k=5, queries_mask=m)
        assert set(api.user_ids[0]) == set(late)
    assert main(["search", str(out), query, "--mode", "hybrid", "--json", "--quiet"]) == 0
    assert len(json.loads(capsys.readouterr().out)["results"]["1"]) == 10
    where = ["--where", "year >= ?", "--param", "2060"]
    assert main(["search", str(out), query, "--k", "20", "--json", "--quiet", *where]) == 0
    hits = json.loads(capsys.readouterr().out)["results"]["1"]
    assert hits and all(int(d[1:]) >= 60 for d in hits)
    # changes go through the Python API or the service, not the document commands
    assert main(["delete", str(out), "--ids", "d1"]) != 0
    assert "sharded index" in capsys.readouterr().err
    other = ["index", argv[1], "--model", model_dir, "--out", str(tmp_path / "other"), "--quiet"]
    assert main([*other, "--ray-address", "local"]) != 0  # --ray-address without --shards
    assert "--ray-address: only with --shards" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()
    # --overwrite --shards replaces a sharded index (and refuses anything else)
    assert main([*argv, "--shards", "2", "--overwrite"]) == 0
    assert json.loads((out / "sharded.json").read_text())["n_shards"] == 2
