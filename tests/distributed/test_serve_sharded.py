"""`edgeplaid serve` on a sharded index: /v1/search (late, hybrid, filtered) answers as
ShardedIndex.search does, and /v1/documents writes go to the shards."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import sys
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "serve"))
from _serve_tools import DOCS, Server, build_model  # noqa: E402

from edgeplaid.distributed import ShardedIndex  # noqa: E402
from edgeplaid.serve import create_app  # noqa: E402

TEXTS = [f"{d} Sample {i}." for i in range(8) for d in DOCS]
pytestmark = pytest.mark.filterwarnings("ignore:.*drift from the index's codec")


def test_search_and_writes_through_the_service(ray_cluster, tmp_path_factory, tmp_path):
    model = build_model(tmp_path_factory)
    tokens, doclens = model.encode_documents(TEXTS)
    ids = [f"doc-{i}" for i in range(len(TEXTS))]
    meta = [{"n": i} for i in range(len(TEXTS))]
    index = ShardedIndex.build(
        tmp_path / "sh", tokens, doclens, ids=ids, metadata=meta, texts=TEXTS, n_shards=2, progress=False
    )
    queries = ["heat in slabs", "wing lift"]
    q, m = model.encode_queries(queries)
    try:
        with Server(create_app(model, index)) as url, httpx.Client(base_url=url, timeout=60) as client:
            for body, want in (
                ({}, index.search(q, k=5, queries_mask=m)),
                ({"mode": "hybrid"}, index.search(q, k=5, queries_mask=m, text=queries)),
                (
                    {"where": "n >= ?", "params": [20]},
                    index.search(q, k=5, queries_mask=m, where="n >= ?", params=[20]),
                ),
            ):
                r = client.post("/v1/search", json={"queries": queries, "k": 5, **body})
                assert r.status_code == 200, r.text
                assert r.json()["user_ids"] == want.user_ids
            r = client.post("/v1/documents", json={"documents": [{"id": "t-1", "text": "zeppelin airships"}]})
            assert r.status_code == 200, r.text
            assert r.json()["n_docs"] == len(TEXTS) + 1 and "t-1" in index
            hit = client.post("/v1/search", json={"queries": ["zeppelin"], "k": 1, "mode": "lexical"})
            assert hit.json()["user_ids"] == [["t-1"]]
            r = client.request("DELETE", "/v1/documents", json={"ids": ["t-1", "doc-3"]})
            assert r.status_code == 200 and r.json()["deleted"] == 2, r.text
            assert "t-1" not in index and index.n_docs == len(TEXTS) - 1
    finally:
        index.close()
