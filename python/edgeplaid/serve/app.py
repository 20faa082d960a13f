"""The HTTP service: ``/v1/rerank``, ``/v1/search``, ``/v1/encode``, ``/healthz``, ``/metrics``.

Rerank and search requests go through micro-batchers (batcher.py): the requests of one window
are encoded together and scored by one ``maxsim_packed`` call (rerank) or one PLAID search
(search). Bad input is answered 422 with a message naming the field, an oversized body 413,
a full queue 503 with Retry-After, a missing or wrong API key 401.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, Field

from edgeplaid import ops
from edgeplaid.serve.batcher import MicroBatcher, Overloaded


@dataclass
class ServeConfig:
    """Limits and batching settings (see ``edgeplaid serve --help``)."""

    batch_window_ms: float = 2.0
    max_batch: int = 64
    max_queue: int = 256
    max_documents: int = 1000
    max_text_chars: int = 20_000
    max_queries: int = 256
    max_k: int = 1000
    max_body_bytes: int = 16 * 2**20
    api_key: str | None = None


class RerankRequest(BaseModel):
    query: str = Field(min_length=1)
    documents: list[str] = Field(min_length=1)
    top_n: int | None = Field(default=None, ge=1)
    model: str | None = None  # accepted for client compatibility; the server has one model


class SearchRequest(BaseModel):
    queries: list[str] = Field(min_length=1)
    k: int = Field(default=10, ge=1)


class EncodeRequest(BaseModel):
    texts: list[str] = Field(min_length=1)
    kind: str = Field(default="document", pattern="^(query|document)$")


class _BadRequest(Exception):
    def __init__(self, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.status = status


def _check_texts(texts: Sequence[str], field: str, limit: int) -> None:
    for i, text in enumerate(texts):
        if not text.strip():
            raise _BadRequest(f"{field}[{i}]: empty text")
        if len(text) > limit:
            raise _BadRequest(f"{field}[{i}]: {len(text)} characters, more than the limit of {limit}")


def rerank_batch(model: Any, jobs: Sequence[RerankRequest]) -> list[list[dict[str, float]]]:
    """Every job's ranking from one query encoding, one document encoding and one
    ``maxsim_packed`` call with per-query candidate lists (-1 padding). A document text that
    several requests of the batch carry is encoded once."""
    queries, mask = model.encode_queries([j.query for j in jobs])
    unique: dict[str, int] = {}
    for job in jobs:
        for d in job.documents:
            unique.setdefault(d, len(unique))
    tokens, doclens = model.encode_documents(list(unique))
    widest = max(len(j.documents) for j in jobs)
    candidates = torch.full((len(jobs), widest), -1, dtype=torch.int64)
    for row, job in enumerate(jobs):
        candidates[row, : len(job.documents)] = torch.tensor([unique[d] for d in job.documents])
    device = tokens.device
    scores = ops.maxsim_packed(
        queries, tokens, ops.offsets_from_lengths(doclens).to(device), candidates.to(device), mask
    ).cpu()
    results = []
    for row, job in enumerate(jobs):
        s = scores[row, : len(job.documents)]
        order = torch.argsort(s, descending=True, stable=True)[: job.top_n]
        results.append([{"index": int(i), "relevance_score": float(s[i])} for i in order])
    return results


def search_batch(model: Any, index: Any, jobs: Sequence[SearchRequest]) -> list[dict[str, Any]]:
    """All jobs' queries encoded and searched together (top max-k), each answer cut to its k."""
    texts = [q for j in jobs for q in j.queries]
    queries, mask = model.encode_queries(texts)
    result = index.search(queries, k=max(j.k for j in jobs), queries_mask=mask)
    scores, ids, user_ids = result.scores, result.ids, result.user_ids
    out, row = [], 0
    for job in jobs:
        rows = range(row, row + len(job.queries))
        out.append(
            {
                "ids": [ids[r, : job.k].tolist() for r in rows],
                "user_ids": [user_ids[r][: job.k] for r in rows],
                "scores": [[float(x) for x in scores[r, : job.k]] for r in rows],
            }
        )
        row += len(job.queries)
    return out


class _Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "edgeplaid_requests", "HTTP requests", ["endpoint", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "edgeplaid_request_latency_seconds",
            "Request latency",
            ["endpoint"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "edgeplaid_batch_size",
            "Requests per kernel batch",
            ["endpoint"],
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "edgeplaid_queue_depth", "Requests waiting", ["endpoint"], registry=self.registry
        )


def create_app(model: Any, index: Any = None, config: ServeConfig | None = None) -> FastAPI:
    """The service around a loaded :class:`edgeplaid.ColBERT` (and optionally an
    :class:`edgeplaid.Index` for ``/v1/search``)."""
    cfg = config or ServeConfig()
    metrics = _Metrics()
    # One worker thread: the kernels and the encoder already use every core per call; a second
    # batch in parallel would only contend for them.
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edgeplaid-batch")
    window = cfg.batch_window_ms / 1e3
    batchers = {
        "rerank": MicroBatcher(
            lambda jobs: rerank_batch(model, jobs),
            executor,
            window,
            cfg.max_batch,
            cfg.max_queue,
            on_batch=metrics.batch_size.labels("rerank").observe,
        ),
        "search": MicroBatcher(
            lambda jobs: search_batch(model, index, jobs),
            executor,
            window,
            cfg.max_batch,
            cfg.max_queue,
            on_batch=metrics.batch_size.labels("search").observe,
        ),
    }

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        for b in batchers.values():
            b.start()
        yield  # uvicorn returns here on SIGTERM once in-flight requests are answered
        for b in batchers.values():
            await b.stop()
        executor.shutdown(wait=True)

    app = FastAPI(title="edgeplaid", lifespan=lifespan)

    def check_key(request: Request) -> None:
        if cfg.api_key is None:
            return
        given = request.headers.get("x-api-key") or ""
        auth = request.headers.get("authorization") or ""
        if auth.lower().startswith("bearer "):
            given = auth[7:]
        if not hmac.compare_digest(given.encode(), cfg.api_key.encode()):
            raise _BadRequest("missing or wrong API key (Authorization: Bearer KEY or X-API-Key)", 401)

    @app.middleware("http")
    async def observe(request: Request, call_next):
        endpoint = request.url.path
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > cfg.max_body_bytes:
            response = JSONResponse(
                {"error": f"body of {length} bytes is over the limit of {cfg.max_body_bytes}"}, 413
            )
        else:
            t0 = time.perf_counter()
            response = await call_next(request)
            metrics.latency.labels(endpoint).observe(time.perf_counter() - t0)
        metrics.requests.labels(endpoint, str(response.status_code)).inc()
        return response

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for e in exc.errors():
            where = ".".join(str(x) for x in e.get("loc", ()) if x != "body") or "body"
            parts.append(f"{where}: {e.get('msg', 'invalid')}")
        return JSONResponse({"error": "; ".join(parts)}, 422)

    @app.exception_handler(_BadRequest)
    async def bad(request: Request, exc: _BadRequest) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, exc.status)

    @app.exception_handler(Overloaded)
    async def overloaded(request: Request, exc: Overloaded) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, 503, headers={"Retry-After": str(exc.retry_after)})

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "index": index is not None}

    @app.get("/metrics", dependencies=[Depends(check_key)])
    async def metrics_endpoint() -> PlainTextResponse:
        for name, b in batchers.items():
            metrics.queue_depth.labels(name).set(b.depth)
        return PlainTextResponse(
            generate_latest(metrics.registry).decode(), media_type="text/plain; version=0.0.4"
        )

    @app.post("/v1/rerank", dependencies=[Depends(check_key)])
    async def rerank(req: RerankRequest) -> dict[str, Any]:
        if len(req.documents) > cfg.max_documents:
            raise _BadRequest(
                f"documents: {len(req.documents)} documents, more than the limit of {cfg.max_documents}"
            )
        _check_texts([req.query], "query", cfg.max_text_chars)
        _check_texts(req.documents, "documents", cfg.max_text_chars)
        return {"results": await batchers["rerank"].submit(req)}

    @app.post("/v1/search", dependencies=[Depends(check_key)])
    async def search(req: SearchRequest) -> dict[str, Any]:
        if index is None:
            raise _BadRequest("no index loaded: start the server with --index DIR", 404)
        if len(req.queries) > cfg.max_queries:
            raise _BadRequest(
                f"queries: {len(req.queries)} queries, more than the limit of {cfg.max_queries}"
            )
        if req.k > cfg.max_k:
            raise _BadRequest(f"k: {req.k} is over the limit of {cfg.max_k}")
        _check_texts(req.queries, "queries", cfg.max_text_chars)
        return await batchers["search"].submit(req)

    @app.post("/v1/encode", dependencies=[Depends(check_key)])
    async def encode(req: EncodeRequest) -> dict[str, Any]:
        if len(req.texts) > cfg.max_documents:
            raise _BadRequest(f"texts: {len(req.texts)} texts, more than the limit of {cfg.max_documents}")
        _check_texts(req.texts, "texts", cfg.max_text_chars)

        def run() -> dict[str, Any]:
            if req.kind == "query":
                emb, mask = model.encode_queries(req.texts)
                return {"embeddings": [e[m].tolist() for e, m in zip(emb, mask, strict=True)]}
            tokens, doclens = model.encode_documents(req.texts)
            return {"embeddings": [t.tolist() for t in torch.split(tokens, doclens.tolist())]}

        return await asyncio.get_running_loop().run_in_executor(executor, run)

    app.state.batchers = batchers
    app.state.config = cfg
    app.state.metrics = metrics
    return app
