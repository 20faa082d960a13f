"""The HTTP service, started for real on 127.0.0.1 and driven by a real HTTP client."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from _serve_tools import DOCS, build_model, check_same, offline
from _serve_tools import Server as _Server

from edgeplaid.model._testing import minilm_dir
from edgeplaid.reranking import rerank
from edgeplaid.serve import ServeConfig, create_app


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory):
    return build_model(tmp_path_factory)


_offline = offline
_check_same = check_same


def test_rerank_equals_offline_and_batches(model):
    app = create_app(model, config=ServeConfig(batch_window_ms=50, max_batch=16))
    requests = [
        {"query": "wing lift in a slipstream", "documents": DOCS, "top_n": 3},
        {"query": "heat conduction", "documents": DOCS[::-1]},
        {"query": "supersonic shock", "documents": DOCS[:2]},
    ] * 3
    with _Server(app) as url:

        def post(body: dict) -> dict:
            r = httpx.post(f"{url}/v1/rerank", json=body, timeout=60)
            assert r.status_code == 200, r.text
            return r.json()

        with ThreadPoolExecutor(len(requests)) as pool:
            answers = list(pool.map(post, requests))
        for body, answer in zip(requests, answers, strict=True):
            _check_same(
                answer["results"], _offline(model, body["query"], body["documents"], body.get("top_n"))
            )
        metrics = httpx.get(f"{url}/metrics").text
    assert 'edgeplaid_requests_total{endpoint="/v1/rerank",status="200"} 9.0' in metrics
    # The 50 ms window gathered concurrent requests into shared kernel calls.
    batches = float(metrics.split('edgeplaid_batch_size_count{endpoint="rerank"} ')[1].split()[0])
    assert batches < len(requests)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"query": "", "documents": ["a"]}, "query"),
        ({"query": "q", "documents": []}, "documents"),
        ({"query": "q", "documents": "not a list"}, "documents"),
        ({"query": "q", "documents": ["a", 3]}, "documents.1"),
        ({"query": "q", "documents": ["   "]}, "documents[0]: empty text"),
        ({"query": "q", "documents": ["a"] * 11}, "more than the limit of 10"),
        ({"query": "q", "documents": ["x" * 101]}, "more than the limit of 100"),
        ({"query": "q", "documents": ["a"], "top_n": 0}, "top_n"),
    ],
)
def test_bad_input_is_422_with_the_field(model, body, message):
    app = create_app(model, config=ServeConfig(max_documents=10, max_text_chars=100))
    with _Server(app) as url:
        r = httpx.post(f"{url}/v1/rerank", json=body)
        assert r.status_code == 422 and message in r.json()["error"], r.text
        r = httpx.post(f"{url}/v1/rerank", content=b"{not json", headers={"content-type": "application/json"})
        assert r.status_code == 422


def test_api_key_body_limit_health_and_encode(model):
    app = create_app(model, config=ServeConfig(api_key="s3cret", max_body_bytes=2000))
    with _Server(app) as url:
        assert httpx.get(f"{url}/healthz").json()["status"] == "ok"  # no key needed
        body = {"query": "wing", "documents": DOCS[:2]}
        assert httpx.post(f"{url}/v1/rerank", json=body).status_code == 401
        assert httpx.post(f"{url}/v1/rerank", json=body, headers={"X-API-Key": "wrong"}).status_code == 401
        ok = httpx.post(f"{url}/v1/rerank", json=body, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200
        big = {"query": "wing", "documents": ["word " * 500]}
        assert httpx.post(f"{url}/v1/rerank", json=big, headers={"X-API-Key": "s3cret"}).status_code == 413
        enc = httpx.post(f"{url}/v1/encode", json={"texts": DOCS[:2]}, headers={"X-API-Key": "s3cret"}).json()
        tokens, doclens = model.encode_documents(DOCS[:2])
        assert [len(e) for e in enc["embeddings"]] == doclens.tolist()
        assert torch.tensor(enc["embeddings"][0]) == pytest.approx(tokens[: doclens[0]], abs=1e-5)
        assert (
            httpx.post(
                f"{url}/v1/search", json={"queries": ["x"]}, headers={"X-API-Key": "s3cret"}
            ).status_code
            == 404
        )


def test_overload_is_503_with_retry_after(model):
    app = create_app(model, config=ServeConfig(max_queue=1, batch_window_ms=0, max_batch=1))
    body = {"query": "wing", "documents": DOCS * 40}

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            return await asyncio.gather(*(client.post("/v1/rerank", json=body) for _ in range(12)))

    with _Server(app) as url:
        responses = asyncio.run(burst())
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 503} and 503 in codes and 200 in codes
    assert all(r.headers["retry-after"] == "1" for r in responses if r.status_code == 503)


def test_search_endpoint(model, tmp_path: Path):
    from edgeplaid.index import Index

    tokens, doclens = model.encode_documents(DOCS * 8)
    ids = [f"doc-{i}" for i in range(len(DOCS) * 8)]
    index = Index.build(tmp_path / "idx", tokens, doclens, ids=ids, progress=False)
    app = create_app(model, index)
    with _Server(app) as url:
        r = httpx.post(f"{url}/v1/search", json={"queries": ["heat in slabs", "wing lift"], "k": 3})
    assert r.status_code == 200, r.text
    got = r.json()
    queries, mask = model.encode_queries(["heat in slabs", "wing lift"])
    want = index.search(queries, k=3, queries_mask=mask)
    assert got["ids"] == want.ids.tolist() and got["user_ids"] == want.user_ids
    assert torch.tensor(got["scores"]) == pytest.approx(want.scores, abs=1e-5)


def test_sigterm_answers_the_requests_in_flight(model, tmp_path: Path):
    import signal
    import socket
    import subprocess
    import sys

    from edgeplaid.model._testing import build_bert_colbert as build

    path = build(tmp_path / "m", minilm_dir(), seed=5)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "edgeplaid.cli",
            "serve",
            "--model",
            str(path),
            "--port",
            str(port),
            "--quiet",
        ],
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline and proc.poll() is None, "the server did not start"
            time.sleep(0.2)
        body = {"query": "wing lift", "documents": DOCS * 120}  # long enough to be in flight
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(httpx.post, f"{url}/v1/rerank", json=body, timeout=120)
            # SIGTERM once the batch is being scored (its size is recorded as it starts), not
            # after a fixed sleep that a busy machine can outlast.
            started = 'edgeplaid_batch_size_count{endpoint="rerank"} 1.0'
            while started not in httpx.get(f"{url}/metrics", timeout=10).text:
                assert not pending.done(), pending.result()
                time.sleep(0.01)
            proc.send_signal(signal.SIGTERM)
            response = pending.result()
        assert response.status_code == 200 and len(response.json()["results"]) == len(DOCS) * 120
        # uvicorn re-raises the signal once it has shut down gracefully: -SIGTERM is the clean exit.
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()


# ----------------------------------------------------------------- precomputed embeddings


def _embeddings(dim: int, n_docs: int, seed: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    query = torch.nn.functional.normalize(torch.randn(6, dim, generator=g), dim=-1)
    docs = [
        torch.nn.functional.normalize(torch.randn(1 + 3 * i, dim, generator=g), dim=-1) for i in range(n_docs)
    ]
    return query, docs


def _embedding_body(query: torch.Tensor, docs: list[torch.Tensor], **extra) -> dict:
    return {"query_embedding": query.tolist(), "document_embeddings": [d.tolist() for d in docs], **extra}


def test_embeddings_batch_with_texts_and_equal_offline(model):
    """Embedding requests of the model's width share the text requests' kernel call; another
    width gets its own; every answer equals edgeplaid.rerank offline."""
    dim = model.output_dim
    same = [_embeddings(dim, 7, seed) for seed in range(3)]
    other = _embeddings(40, 5, 9)
    bodies = [_embedding_body(q, d, top_n=4) for q, d in same] + [_embedding_body(*other)]
    bodies += [{"query": "wing lift", "documents": DOCS}, {"query": "heat", "documents": DOCS[:3]}]
    app = create_app(model, config=ServeConfig(batch_window_ms=100, max_batch=16))
    with _Server(app) as url:
        with ThreadPoolExecutor(len(bodies)) as pool:
            answers = list(pool.map(lambda b: httpx.post(f"{url}/v1/rerank", json=b, timeout=60), bodies))
        metrics = httpx.get(f"{url}/metrics").text
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
    for (q, d), answer in zip([*same, other], answers, strict=False):
        top_n = 4 if len(d) == 7 else None
        scores, order = rerank(q, d, k=top_n)
        _check_same(answer.json()["results"], (order.tolist(), scores.tolist()))
    for body, answer in zip(bodies[-2:], answers[-2:], strict=True):
        _check_same(answer.json()["results"], _offline(model, body["query"], body["documents"], None))
    batches = float(metrics.split('edgeplaid_batch_size_count{endpoint="rerank"} ')[1].split()[0])
    assert batches < len(bodies)


NAN_BODY = b'{"query_embedding": [[1.0, 0.0]], "document_embeddings": [[[0.5, NaN]]]}'


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            {"query_embedding": [[1.0, 0.0]], "document_embeddings": [[[1.0, 0.0]], [[1.0, 0.0, 2.0]]]},
            "document_embeddings[1]: token vectors of dim 3, but query_embedding's are of dim 2",
        ),
        (
            {"query": "q", "documents": ["a"], "query_embedding": [[1.0]], "document_embeddings": [[[1.0]]]},
            "query_embedding: give either query and documents",
        ),
        ({"query": "q", "query_embedding": [[1.0]]}, "query_embedding: give either"),
        ({"top_n": 2}, "query: field required"),
        ({"query_embedding": [[1.0]]}, "document_embeddings: field required"),
        (NAN_BODY, "document_embeddings[0][0]: non-finite value"),
        (
            {"query_embedding": [[1e39, 0.0]], "document_embeddings": [[[1.0, 0.0]]]},
            "query_embedding[0]: non-finite value",
        ),
        ({"query_embedding": [[1.0, 0.0], [1.0]], "document_embeddings": [[[1.0, 0.0]]]}, "query_embedding:"),
        (
            {"query_embedding": [[1.0]], "document_embeddings": [[[1.0]], []]},
            "document_embeddings[1]: no token",
        ),
        ({"query_embedding": [[1.0]], "document_embeddings": [[["x"]]]}, "document_embeddings[0]: expected"),
        ({"query_embedding": [[1.0]], "document_embeddings": [[[1.0]]] * 11}, "more than the limit of 10"),
        ({"query_embedding": [], "document_embeddings": [[[1.0]]]}, "query_embedding"),
        ({"query_embedding": [[1.0]], "document_embeddings": "no"}, "document_embeddings"),
    ],
)
def test_bad_embeddings_are_422_with_the_field(model, body, message):
    app = create_app(model, config=ServeConfig(max_documents=10))
    with _Server(app) as url:
        if isinstance(body, bytes):  # JSON's NaN extension: what Python's json.dumps writes
            r = httpx.post(f"{url}/v1/rerank", content=body, headers={"content-type": "application/json"})
        else:
            r = httpx.post(f"{url}/v1/rerank", json=body)
    assert r.status_code == 422 and message in r.json()["error"], r.text


def test_a_service_without_a_model_serves_embeddings(model):
    query, docs = _embeddings(16, 4, 1)
    app = create_app(None, config=ServeConfig(max_body_bytes=200_000))
    with _Server(app) as url:
        health = httpx.get(f"{url}/healthz").json()
        r = httpx.post(f"{url}/v1/rerank", json=_embedding_body(query, docs, top_n=2))
        text = httpx.post(f"{url}/v1/rerank", json={"query": "wing", "documents": DOCS})
        encode = httpx.post(f"{url}/v1/encode", json={"texts": DOCS})
        big = _embedding_body(*_embeddings(64, 300, 2))  # the body limit holds for vectors too
        too_big = httpx.post(f"{url}/v1/rerank", json=big)
    assert health == {"status": "ok", "model": False, "index": False, "device": "cpu"}
    scores, order = rerank(query, docs, k=2)
    assert r.status_code == 200, r.text
    _check_same(r.json()["results"], (order.tolist(), scores.tolist()))
    assert text.status_code == 422 and "no model to encode texts" in text.json()["error"]
    assert encode.status_code == 404 and "--model" in encode.json()["error"]
    assert too_big.status_code == 413


def test_the_service_runs_on_one_device(model):
    # meta stands in for a second device on a CPU-only machine.
    with pytest.raises(ValueError, match="the model is on cpu, device is on meta"):
        create_app(model, device="meta")
    assert create_app(None, device="meta").state.device == torch.device("meta")
    assert create_app(model).state.device == torch.device("cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_rerank_on_a_cuda_model_equals_cpu(model):
    import copy

    on_gpu = copy.deepcopy(model).to("cuda")
    query, docs = _embeddings(model.output_dim, 6, 4)
    bodies = [{"query": "wing lift", "documents": DOCS, "top_n": 3}, _embedding_body(query, docs)]
    answers = {}
    for name, m in (("cpu", model), ("cuda", on_gpu)):
        with _Server(create_app(m, config=ServeConfig(batch_window_ms=50))) as url:
            assert httpx.get(f"{url}/healthz").json()["device"] == ("cuda:0" if name == "cuda" else "cpu")
            with ThreadPoolExecutor(2) as pool:
                answers[name] = list(
                    pool.map(lambda b: httpx.post(f"{url}/v1/rerank", json=b).json(), bodies)
                )
    for cpu, gpu in zip(answers["cpu"], answers["cuda"], strict=True):
        scores = [r["relevance_score"] for r in cpu["results"]]
        _check_same(gpu["results"], ([r["index"] for r in cpu["results"]], scores))
