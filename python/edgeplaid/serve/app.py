"""The HTTP service: ``/v1/rerank``, ``/v1/search``, ``/v1/encode``, ``/healthz``, ``/metrics``.

Rerank and search requests go through micro-batchers (batcher.py): the requests of one window
are encoded together and scored by one ``maxsim_packed`` call per token width (rerank; texts
and precomputed embeddings of the same width share it) or one PLAID search (search). Bad
input is answered 422 with a message naming the field, an oversized body 413, a full queue
503 with Retry-After, a missing or wrong API key 401.

Everything is computed on one device (the model's and the index's; ``--device``): the
encoder's outputs, the packed documents, their offsets and the candidate lists stay there, and
only the scores come back to the host.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
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
    """Either texts (``query`` + ``documents``, encoded by the server's model) or precomputed
    token vectors (``query_embedding`` (Lq, dim) + ``document_embeddings``, one (Ld_i, dim) list
    per document): exactly one of the two forms."""

    query: str | None = Field(default=None, min_length=1)
    documents: list[str] | None = Field(default=None, min_length=1)
    # Plain lists here, converted by numpy in _embedding_job: pydantic's per-float validation
    # would cost about half as much again as parsing the JSON of a large body.
    query_embedding: list[Any] | None = Field(default=None, min_length=1)
    document_embeddings: list[Any] | None = Field(default=None, min_length=1)
    top_n: int | None = Field(default=None, ge=1)
    model: str | None = None  # accepted for client compatibility; the server has one model


@dataclass
class EmbeddingJob:
    """A rerank request in the embedding form, checked: host tensors, float32, all finite."""

    query: torch.Tensor  # (Lq, dim) float32
    tokens: torch.Tensor  # (n_tokens, dim) float32, the documents packed back to back
    doclens: list[int]  # tokens per document (each >= 1)
    top_n: int | None = None


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


def _matrix(rows: Any, name: str) -> torch.Tensor:
    """(n, dim) float32 host tensor from a JSON list of equal-length lists of finite numbers."""
    try:
        with np.errstate(over="ignore"):  # too large for float32: inf, refused below
            a = np.asarray(rows, dtype=np.float32)
    except (ValueError, TypeError):
        a = None
    if a is not None and a.size == 0:
        raise _BadRequest(f"{name}: no token vectors")
    if a is None or a.ndim != 2:
        raise _BadRequest(f"{name}: expected a list of token vectors, all lists of numbers of one length")
    bad = ~np.isfinite(a).all(axis=1)  # also what overflows float32
    if bad.any():
        raise _BadRequest(f"{name}[{int(bad.argmax())}]: non-finite value (NaN or infinity)")
    return torch.from_numpy(a)


def _embedding_job(req: RerankRequest) -> EmbeddingJob:
    query = _matrix(req.query_embedding, "query_embedding")
    dim = query.shape[1]
    docs = []
    for i, rows in enumerate(req.document_embeddings or ()):
        doc = _matrix(rows, f"document_embeddings[{i}]")
        if doc.shape[1] != dim:
            raise _BadRequest(
                f"document_embeddings[{i}]: token vectors of dim {doc.shape[1]}, "
                f"but query_embedding's are of dim {dim}"
            )
        docs.append(doc)
    return EmbeddingJob(query, torch.cat(docs), [d.shape[0] for d in docs], req.top_n)


@dataclass
class _Group:
    """The requests of one batch whose token vectors share a width: one ``maxsim_packed`` call.
    Blocks are on the service's device; document ids number the blocks' documents in order."""

    queries: list[torch.Tensor] = field(default_factory=list)  # (n_i, Lq_i, dim) blocks
    masks: list[torch.Tensor] = field(default_factory=list)  # (n_i, Lq_i) bool blocks
    tokens: list[torch.Tensor] = field(default_factory=list)  # (n_tokens_i, dim) blocks
    doclens: list[torch.Tensor] = field(default_factory=list)  # (n_docs_i,) int64 blocks
    candidates: list[list[int]] = field(default_factory=list)  # one row of doc ids per request
    jobs: list[int] = field(default_factory=list)  # each row's position in the batch
    n_docs: int = 0

    def add_documents(self, tokens: torch.Tensor, doclens: torch.Tensor) -> int:
        """Appends a block of packed documents; returns the id of its first document."""
        self.tokens.append(tokens)
        self.doclens.append(doclens)
        self.n_docs += doclens.shape[0]
        return self.n_docs - doclens.shape[0]

    def score(self, device: torch.device) -> tuple[list[list[float]], list[list[int]]]:
        """(scores, order), both n_requests rows of ``widest`` numbers: each row's candidate
        positions best first (stable), -1 padding (scored -inf) last."""
        n, lq = sum(q.shape[0] for q in self.queries), max(q.shape[1] for q in self.queries)
        queries = torch.zeros((n, lq, self.queries[0].shape[2]), device=device)
        mask = torch.zeros((n, lq), dtype=torch.bool, device=device)
        row = 0
        for q, m in zip(self.queries, self.masks, strict=True):
            queries[row : row + q.shape[0], : q.shape[1]] = q
            mask[row : row + q.shape[0], : q.shape[1]] = m
            row += q.shape[0]
        tokens = self.tokens[0] if len(self.tokens) == 1 else torch.cat(self.tokens)
        offsets = ops.offsets_from_lengths(torch.cat(self.doclens))
        widest = max(len(c) for c in self.candidates)
        candidates = torch.tensor([c + [-1] * (widest - len(c)) for c in self.candidates], device=device)
        scores = ops.maxsim_packed(queries, tokens, offsets, candidates, mask)
        scores, order = torch.sort(scores, dim=1, descending=True, stable=True)
        # Python lists in one conversion each: indexing tensors per result would cost ~1 us a number.
        return scores.cpu().tolist(), order.cpu().tolist()


def rerank_batch(
    model: Any, jobs: Sequence[RerankRequest | EmbeddingJob], device: str | torch.device = "cpu"
) -> list[list[dict[str, float]]]:
    """Every job's ranking, best first, as ``[{"index", "relevance_score"}]``.

    Text jobs are encoded together (one query encoding, one document encoding; a document text
    that several requests carry is encoded once) on the model's device; embedding jobs are
    packed on the host and copied to ``device`` once per batch. Then one ``maxsim_packed`` call
    per token width scores every job against its own candidates (-1 padding).
    """
    device = torch.device(device)
    groups: dict[int, _Group] = {}
    texts = [i for i, job in enumerate(jobs) if isinstance(job, RerankRequest)]
    if texts:
        queries, mask = model.encode_queries([jobs[i].query for i in texts])
        unique: dict[str, int] = {}
        for i in texts:
            for d in jobs[i].documents:
                unique.setdefault(d, len(unique))
        tokens, doclens = model.encode_documents(list(unique))
        group = groups.setdefault(tokens.shape[1], _Group())
        first = group.add_documents(tokens, doclens)
        group.queries.append(queries)
        group.masks.append(mask)
        for i in texts:
            group.candidates.append([first + unique[d] for d in jobs[i].documents])
            group.jobs.append(i)
    by_dim: dict[int, list[int]] = {}
    for i, job in enumerate(jobs):
        if isinstance(job, EmbeddingJob):
            by_dim.setdefault(job.query.shape[1], []).append(i)
    for dim, rows in by_dim.items():
        group = groups.setdefault(dim, _Group())
        first = group.add_documents(
            torch.cat([jobs[i].tokens for i in rows]).to(device),
            torch.tensor([n for i in rows for n in jobs[i].doclens], device=device),
        )
        lq = max(jobs[i].query.shape[0] for i in rows)
        queries = torch.zeros((len(rows), lq, dim))
        mask = torch.zeros((len(rows), lq), dtype=torch.bool)
        for r, i in enumerate(rows):
            queries[r, : jobs[i].query.shape[0]] = jobs[i].query
            mask[r, : jobs[i].query.shape[0]] = True
            group.candidates.append(list(range(first, first + len(jobs[i].doclens))))
            group.jobs.append(i)
            first += len(jobs[i].doclens)
        group.queries.append(queries.to(device))
        group.masks.append(mask.to(device))
    results: list[list[dict[str, float]]] = [[] for _ in jobs]
    for group in groups.values():
        scores, order = group.score(device)
        for row, i in enumerate(group.jobs):
            n = min(len(group.candidates[row]), jobs[i].top_n or len(group.candidates[row]))
            results[i] = [{"index": order[row][r], "relevance_score": scores[row][r]} for r in range(n)]
    return results


def search_batch(model: Any, index: Any, jobs: Sequence[SearchRequest]) -> list[dict[str, Any]]:
    """All jobs' queries encoded and searched together (top max-k), each answer cut to its k."""
    texts = [q for j in jobs for q in j.queries]
    queries, mask = model.encode_queries(texts)
    result = index.search(queries, k=max(j.k for j in jobs), queries_mask=mask)
    # The result is all that leaves the device: one copy, not one per row.
    scores, ids, user_ids = result.scores.cpu(), result.ids.cpu(), result.user_ids
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


def _same_device(d: str | torch.device) -> torch.device:
    """``d`` with its index: "cuda" and "cuda:0" are one device when cuda:0 is the current one."""
    d = torch.device(d)
    if d.type == "cuda" and d.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return d


def service_device(model: Any, index: Any = None, device: str | torch.device | None = None) -> torch.device:
    """The one device the service computes on: the model's, the index's and ``device`` (any of
    them may be absent; none: the CPU). ValueError naming each when they differ."""
    where: dict[str, torch.device] = {}
    if model is not None:
        where["the model"] = _same_device(model.device)
    if index is not None and getattr(index, "device", None) is not None:
        where["the index"] = _same_device(index.device)
    if device is not None:
        where["device"] = _same_device(device)
    if len(set(where.values())) > 1:
        raise ValueError(
            "device: the service computes on one device, but "
            + ", ".join(f"{name} is on {d}" for name, d in where.items())
        )
    return next(iter(where.values()), torch.device("cpu"))


def create_app(
    model: Any = None,
    index: Any = None,
    config: ServeConfig | None = None,
    *,
    device: str | torch.device | None = None,
) -> FastAPI:
    """The service around a loaded :class:`edgeplaid.ColBERT` (and optionally an
    :class:`edgeplaid.Index` for ``/v1/search``).

    Without a model it serves ``/v1/rerank`` in the embedding form only (texts are answered
    422, ``/v1/search`` and ``/v1/encode`` 404). ``device``: where embeddings are scored when
    there is no model; the model, the index and ``device`` must agree (ValueError otherwise).
    """
    cfg = config or ServeConfig()
    where = service_device(model, index, device)
    metrics = _Metrics()
    # One worker thread: the kernels and the encoder already use every core per call; a second
    # batch in parallel would only contend for them.
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edgeplaid-batch")
    window = cfg.batch_window_ms / 1e3
    batchers = {
        "rerank": MicroBatcher(
            lambda jobs: rerank_batch(model, jobs, where),
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

    def need_model(what: str) -> None:
        if model is None:
            raise _BadRequest(f"no model loaded: start the server with --model M to {what}", 404)

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "model": model is not None, "index": index is not None, "device": str(where)}

    @app.get("/metrics", dependencies=[Depends(check_key)])
    async def metrics_endpoint() -> PlainTextResponse:
        for name, b in batchers.items():
            metrics.queue_depth.labels(name).set(b.depth)
        return PlainTextResponse(
            generate_latest(metrics.registry).decode(), media_type="text/plain; version=0.0.4"
        )

    @app.post("/v1/rerank", dependencies=[Depends(check_key)])
    async def rerank(req: RerankRequest) -> dict[str, Any]:
        texts = [n for n in ("query", "documents") if getattr(req, n) is not None]
        vectors = [n for n in ("query_embedding", "document_embeddings") if getattr(req, n) is not None]
        if texts and vectors:
            raise _BadRequest(
                f"{vectors[0]}: give either query and documents (texts) or query_embedding and "
                "document_embeddings (token vectors), not both"
            )
        wanted = ("query_embedding", "document_embeddings") if vectors else ("query", "documents")
        missing = [n for n in wanted if getattr(req, n) is None]
        if missing:
            raise _BadRequest(
                f"{missing[0]}: field required (give query and documents, "
                "or query_embedding and document_embeddings)"
            )
        n_docs = len(getattr(req, wanted[1]))
        if n_docs > cfg.max_documents:
            raise _BadRequest(f"{wanted[1]}: {n_docs} documents, more than the limit of {cfg.max_documents}")
        if vectors:
            return {"results": await batchers["rerank"].submit(_embedding_job(req))}
        if model is None:
            raise _BadRequest(
                "query: this server has no model to encode texts (started without --model): "
                "send query_embedding and document_embeddings"
            )
        _check_texts([req.query], "query", cfg.max_text_chars)
        _check_texts(req.documents, "documents", cfg.max_text_chars)
        return {"results": await batchers["rerank"].submit(req)}

    @app.post("/v1/search", dependencies=[Depends(check_key)])
    async def search(req: SearchRequest) -> dict[str, Any]:
        if index is None:
            raise _BadRequest("no index loaded: start the server with --index DIR", 404)
        need_model("encode the queries")
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
        need_model("encode texts")
        if len(req.texts) > cfg.max_documents:
            raise _BadRequest(f"texts: {len(req.texts)} texts, more than the limit of {cfg.max_documents}")
        _check_texts(req.texts, "texts", cfg.max_text_chars)

        def run() -> dict[str, Any]:
            if req.kind == "query":
                emb, mask = model.encode_queries(req.texts)
                emb, mask = emb.cpu(), mask.cpu()  # the answer: one copy to the host
                return {"embeddings": [e[m].tolist() for e, m in zip(emb, mask, strict=True)]}
            tokens, doclens = model.encode_documents(req.texts)
            tokens, doclens = tokens.cpu(), doclens.cpu()
            return {"embeddings": [t.tolist() for t in torch.split(tokens, doclens.tolist())]}

        return await asyncio.get_running_loop().run_in_executor(executor, run)

    app.state.batchers = batchers
    app.state.config = cfg
    app.state.device = where
    app.state.metrics = metrics
    return app
