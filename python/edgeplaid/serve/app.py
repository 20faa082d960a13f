"""The HTTP service: ``/v1/rerank``, ``/v1/search``, ``/v1/encode``, ``/v1/documents`` (POST: add
or update, DELETE: delete), ``/healthz``, ``/metrics``.

Rerank, search and encode requests go through micro-batchers (batcher.py): the requests of one
window are encoded together and scored by one ``maxsim_packed`` call per token width (rerank;
texts and precomputed embeddings of the same width share it) or one PLAID search per distinct k
(search: each request's queries are encoded on their own, so a request is answered exactly as
``Index.search(encode_queries(its queries), k=its k)``, whatever else is in its batch). Bad
input is answered 422 with a message naming the field (texts are checked before they join a
batch; a batch that fails anyway is retried request by request, so only the culprit fails), an
oversized body 413 (counted as it arrives, chunked or not), a full queue 503 with Retry-After,
a missing or wrong API key 401.

Writes (``/v1/documents``) change the served index while it keeps answering searches: texts
are encoded on the batch worker (the one thread that runs the model), then the index write
(compression, fsync, an atomic switch of the index directory) runs on a writer thread of its own,
one write at a time, so searches go on meanwhile; each search reads the index version it started
with, and every search after a write sees it. Writes waiting beyond ``max_write_queue`` are
refused 503; an unknown id is 404, an id already in the index 409 (unless ``upsert``).

Everything is computed on one device (the model's and the index's; ``--device``): the
encoder's outputs, the packed documents, their offsets and the candidate lists stay there, and
only the scores come back to the host.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import hmac
import json
import logging
import math
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, Field, StrictInt, StrictStr
from starlette.routing import Match

from edgeplaid import ops
from edgeplaid.index import IndexLockedError
from edgeplaid.index._metadata import WhereError, check_metadata, compile_where
from edgeplaid.serve.batcher import MicroBatcher, Overloaded

log = logging.getLogger("edgeplaid.serve")


@dataclass
class ServeConfig:
    """Limits and batching settings (see ``edgeplaid serve --help``)."""

    batch_window_ms: float = 2.0
    max_batch: int = 64
    max_queue: int = 256
    max_documents: int = 1000
    max_text_chars: int = 20_000
    # All the texts of one request together: bounds the work one request can ask of the only
    # worker (tokenising 780 texts of 20,000 characters held it for 33 s).
    max_request_chars: int = 1_000_000
    max_queries: int = 256
    max_k: int = 1000
    max_body_bytes: int = 16 * 2**20
    # Writes (/v1/documents) waiting for the writer thread, beyond which a write is refused 503:
    # each one holds its request body's documents in memory while it waits.
    max_write_queue: int = 16
    api_key: str | None = None
    # Slow or idle clients (server.py): a request's head and body must arrive within
    # request_timeout_s; an idle keep-alive connection is closed after keep_alive_s.
    request_timeout_s: float = 10.0
    keep_alive_s: int = 5


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
    # A metadata filter (edgeplaid.index._metadata.compile_where) and the values of its "?".
    where: str | None = None
    params: list[Any] | None = None
    # late (PLAID), lexical (BM25 of the query texts) or hybrid (both fused): Index.search
    mode: Literal["late", "lexical", "hybrid"] = "late"
    alpha: float | None = Field(default=None, ge=0.0, le=1.0)
    fusion: Literal["rrf", "relative_score"] | None = None


DocumentId = StrictStr | StrictInt  # strict: JSON true or 1.5 is no id (True == 1 in Python)


class DocumentIn(BaseModel):
    """One document of ``POST /v1/documents``: its id and either a text (encoded by the server's
    model) or its token vectors (``embedding``, (n_tokens, dim))."""

    id: DocumentId
    text: str | None = None
    embedding: list[Any] | None = Field(default=None, min_length=1)  # numpy converts (see RerankRequest)
    metadata: dict[str, Any] | None = None


class DocumentsRequest(BaseModel):
    """``POST /v1/documents``: documents to add (``upsert``: or to replace, by id). Metadata per
    document (its ``metadata`` key) or as one list beside the documents, not both."""

    documents: list[DocumentIn] = Field(min_length=1)
    metadata: list[dict[str, Any] | None] | None = None
    upsert: bool = False


class DeleteRequest(BaseModel):
    """``DELETE /v1/documents``: the ids to delete, or a metadata filter (``where`` + ``params``)."""

    ids: list[DocumentId] | None = Field(default=None, min_length=1)
    where: str | None = None
    params: list[Any] | None = None


class EncodeRequest(BaseModel):
    texts: list[str] = Field(min_length=1)
    kind: str = Field(default="document", pattern="^(query|document)$")


class _BadRequest(Exception):
    def __init__(self, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.status = status


def _check_text(text: str, name: str, limit: int) -> int:
    """The text is non-empty, within ``limit`` characters and valid Unicode (JSON's ``\\udfff``
    escapes decode to lone surrogates, which the tokenizer refuses: checked here, before the
    request joins a batch); returns its length. ``name`` names it in the message."""
    if not text.strip():
        raise _BadRequest(f"{name}: empty text")
    if len(text) > limit:
        raise _BadRequest(f"{name}: {len(text)} characters, more than the limit of {limit}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise _BadRequest(
            f"{name}: not valid Unicode (a lone surrogate, {text[e.start]!r}, at {e.start})"
        ) from None
    return len(text)


def _check_texts(texts: Sequence[str], field: str, limit: int) -> int:
    """:func:`_check_text` of each text (named ``field[i]``); the characters in all."""
    return sum(_check_text(text, f"{field}[{i}]", limit) for i, text in enumerate(texts))


def _check_request_chars(total: int, field: str, limit: int) -> None:
    if total > limit:
        raise _BadRequest(
            f"{field}: {total:,} characters in all, more than the limit of {limit:,} per request"
        )


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
    """Each job's answer is ``index.search(*model.encode_queries(its queries), k=its k)``, as the
    same request offline, whatever else is in its batch: each job's queries are encoded on their
    own (encoded with other texts, a query's vectors can differ in the last bits, and PLAID's
    candidate choices can turn that into other results), and each distinct k is its own search
    (the search effort follows k). Jobs of one k and one metadata filter (``where`` and
    ``params``, checked before they joined the batch) are searched together."""
    groups: dict[tuple[int, int, str], list[tuple[int, Any, Any]]] = {}
    filters: dict[str, dict[str, Any]] = {}
    for i, job in enumerate(jobs):
        queries = mask = None
        if job.mode != "lexical":
            queries, mask = model.encode_queries(job.queries)
        # The filter's JSON as its key: 1 and 1.0 and true are distinct params (equal in Python).
        key = json.dumps([job.where, job.params, job.mode, job.alpha, job.fusion])
        options: dict[str, Any] = {} if job.where is None else {"where": job.where, "params": job.params}
        if job.mode != "late":  # a late search is called exactly as before hybrid search came
            options["mode"] = job.mode
        if job.mode == "hybrid":
            options |= {"alpha": job.alpha, "fusion": job.fusion}
        filters.setdefault(key, options)
        width = 0 if queries is None else queries.shape[1]
        groups.setdefault((job.k, width, key), []).append((i, queries, mask))
    out: list[dict[str, Any]] = [{} for _ in jobs]
    for (k, width, key), members in groups.items():
        texts = [t for i, _, _ in members for t in jobs[i].queries]
        queries = mask = None
        if width:
            queries = torch.cat([q for _, q, _ in members])
            mask = torch.cat([m for _, _, m in members])
        text = {"text": texts} if "mode" in filters[key] else {}
        result = index.search(queries, k=k, queries_mask=mask, **text, **filters[key])
        # The result is all that leaves the device: one copy, not one per row.
        scores, ids, user_ids = result.scores.cpu().tolist(), result.ids.cpu().tolist(), result.user_ids
        row = 0
        for i, _, _ in members:
            n = len(jobs[i].queries)
            out[i] = {
                "ids": ids[row : row + n],
                "user_ids": [list(u) for u in user_ids[row : row + n]],
                # Fewer than k documents found: -inf pads the scores, which JSON cannot hold.
                "scores": [[x if math.isfinite(x) else None for x in r] for r in scores[row : row + n]],
            }
            row += n
    return out


def encode_batch(model: Any, jobs: Sequence[EncodeRequest]) -> list[dict[str, Any]]:
    """Each job's token vectors: the queries of all jobs encoded in one call, the documents in
    another, each text's own rows returned (padding and masked positions left out)."""
    out: list[dict[str, Any]] = [{} for _ in jobs]
    for kind in ("query", "document"):
        members = [i for i, job in enumerate(jobs) if job.kind == kind]
        if not members:
            continue
        texts = [t for i in members for t in jobs[i].texts]
        if kind == "query":
            emb, mask = model.encode_queries(texts)
            emb, mask = emb.cpu(), mask.cpu()  # the answer: one copy to the host
            vectors = [e[m].tolist() for e, m in zip(emb, mask, strict=True)]
        else:
            tokens, doclens = model.encode_documents(texts)
            tokens, doclens = tokens.cpu(), doclens.cpu()
            vectors = [t.tolist() for t in torch.split(tokens, doclens.tolist())]
        row = 0
        for i in members:
            n = len(jobs[i].texts)
            out[i] = {"embeddings": vectors[row : row + n]}
            row += n
    return out


@dataclass
class _Documents:
    """The documents of a ``POST /v1/documents``, checked: ids, token vectors (host, float32)
    and metadata, each in request order."""

    ids: list[Any]
    vectors: list[torch.Tensor]  # one (n_tokens_i, dim) per document
    metadata: list[dict[str, Any] | None] | None
    upsert: bool
    texts: list[str] | None = None  # for an index with a lexical side: every document's text

    def pack(self, rows: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, Any, list[str] | None]:
        """(tokens, doclens, metadata, texts) of the documents ``rows``, packed as Index.add
        takes them."""
        tokens = torch.cat([self.vectors[r] for r in rows])
        doclens = torch.tensor([self.vectors[r].shape[0] for r in rows], dtype=torch.int64)
        meta = None if self.metadata is None else [self.metadata[r] for r in rows]
        texts = None if self.texts is None else [self.texts[r] for r in rows]
        return tokens, doclens, meta, texts


def _id_kind(index: Any) -> type:
    """str or int: the kind of the index's ids (an index built without ids numbers them)."""
    return str if index.id_kind == "str" else int


def _check_ids(ids: Sequence[Any], field: str, kind: type, unique: bool) -> None:
    """Every id of the index's kind, ints within int64, strings valid Unicode (and, with
    ``unique``, none twice): refused 422 before any work, naming the id's field."""
    seen: set[Any] = set()
    for i, doc_id in enumerate(ids):
        name = field.format(i=i)
        if not isinstance(doc_id, kind):
            want = "strings" if kind is str else "integers"
            raise _BadRequest(f"{name}: this index's ids are {want}, got {doc_id!r}")
        if kind is int and not -(2**63) <= doc_id < 2**63:
            raise _BadRequest(f"{name}: {doc_id} is out of the 64-bit integer range")
        if kind is str:
            try:
                doc_id.encode("utf-8")
            except UnicodeEncodeError:
                raise _BadRequest(f"{name}: not valid Unicode (a lone surrogate)") from None
        if unique:
            if doc_id in seen:
                raise _BadRequest(f"{name}: the id {doc_id!r} is given twice")
            seen.add(doc_id)


def _check_where(where: str | None, params: list[Any] | None) -> None:
    """A filter outside the grammar (or params without one) is refused 422 before any work."""
    if where is None:
        if params is not None:
            raise _BadRequest("params: given without a where filter")
        return
    try:
        compile_where(where, params)
    except WhereError as e:  # its message starts with "where: "
        raise _BadRequest(str(e)) from None


def write_documents(index: Any, docs: _Documents) -> dict[str, int]:
    """Adds the documents (``upsert``: replaces those whose ids are in the index, adds the
    others, in one atomic version); the caller serialises writes. An id in the index without
    ``upsert`` is refused (409) before anything is written."""
    old = [r for r, doc_id in enumerate(docs.ids) if doc_id in index]
    if old and not docs.upsert:
        raise _BadRequest(
            f"documents[{old[0]}].id: {docs.ids[old[0]]!r} is in the index already"
            + (f" (and {len(old) - 1} more)" if len(old) > 1 else "")
            + '; "upsert": true replaces documents',
            409,
        )
    tokens, doclens, meta, texts = docs.pack(range(len(docs.ids)))
    if docs.upsert:
        added, updated = index.upsert(list(docs.ids), tokens, doclens, metadata=meta, texts=texts)
    else:
        index.add(tokens, doclens, ids=list(docs.ids), metadata=meta, texts=texts)
        added, updated = len(docs.ids), 0
    return {"added": added, "updated": updated, "n_docs": index.n_docs}


def delete_documents(index: Any, req: DeleteRequest) -> dict[str, int]:
    """Deletes by ids (KeyError for an unknown one: nothing deleted) or by filter."""
    if req.ids is not None:
        n = index.delete(req.ids)
    else:
        n = index.delete(where=req.where, params=req.params)
    return {"deleted": n, "n_docs": index.n_docs}


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


class _BodyTooLarge(HTTPException):
    """Raised from the body stream once it passes the limit. An HTTPException, so that FastAPI's
    body reading passes it on (it turns other exceptions into 400) to its handler: 413."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"body over the limit of {limit} bytes")


UNMATCHED = "unmatched"  # the metrics label of every URL that is no route: one series, not one per URL


class _HTTPGuard:
    """An ASGI layer around every route: the body limit on bytes as they arrive, and request
    metrics labelled by route template.

    A declared Content-Length over the limit is answered 413 before the body is read; any other
    body (chunked, or a Content-Length that lies) is counted as it arrives and refused as soon
    as it passes the limit, so no more than the limit is ever buffered.
    """

    def __init__(self, app: Any, max_body_bytes: int, metrics: _Metrics) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics

    def _label(self, scope: dict[str, Any]) -> str:
        route = scope.get("route")  # set by FastAPI on a match
        if route is not None:
            return route.path
        for r in getattr(scope.get("app"), "routes", ()):
            if r.matches(scope)[0] != Match.NONE:  # e.g. a 405: the route's template still
                return r.path
        return UNMATCHED

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = 500  # what the server answers if the app raises before responding

        async def send_status(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        received = 0

        async def counted() -> dict[str, Any]:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise _BodyTooLarge(self.max_body_bytes)
            return message

        length = dict(scope["headers"]).get(b"content-length")
        try:
            if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
                response = JSONResponse(
                    {"error": f"body of {int(length)} bytes is over the limit of {self.max_body_bytes}"},
                    413,
                    headers={"connection": "close"},  # the body is not read: the connection cannot go on
                )
                await response(scope, receive, send_status)
            else:
                await self.app(scope, counted, send_status)
        finally:
            label = self._label(scope)
            self.metrics.requests.labels(label, str(status)).inc()
            self.metrics.latency.labels(label).observe(time.perf_counter() - t0)


def _malloc_trimmer(every_s: float) -> Any:
    """A function that hands glibc's freed heap memory back to the system (``malloc_trim``), at
    most once every ``every_s`` seconds. Called after each batch: without it the process keeps
    the high-water mark of its largest batch so far, and RSS says little about what is in use.
    A no-op off glibc."""
    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return lambda: None
    last = 0.0

    def maybe_trim() -> None:
        nonlocal last
        now = time.monotonic()
        if now - last >= every_s:
            last = now
            trim(0)

    return maybe_trim


def create_app(
    model: Any = None,
    index: Any = None,
    config: ServeConfig | None = None,
    *,
    device: str | torch.device | None = None,
) -> FastAPI:
    """The service around a loaded :class:`edgeplaid.ColBERT` (and optionally an
    :class:`edgeplaid.Index` for ``/v1/search``). Run it with
    ``uvicorn.Server(edgeplaid.serve.uvicorn_config(app, host, port))`` (``edgeplaid serve``
    does), which adds the deadlines for slow clients.

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
    # Index writes block for their fsyncs: a thread of their own, so searches (on the batch
    # worker) go on meanwhile. One thread and one lock: one write at a time, each one's checks
    # (which ids exist) and its change made together.
    write_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edgeplaid-write")
    write_lock = threading.Lock()
    pending_writes = 0
    window = cfg.batch_window_ms / 1e3
    work = {
        "rerank": lambda jobs: rerank_batch(model, jobs, where),
        "search": lambda jobs: search_batch(model, index, jobs),
        "encode": lambda jobs: encode_batch(model, jobs),
    }
    trim = _malloc_trimmer(10.0)

    def then_trim(fn: Any) -> Any:
        def run(jobs: Sequence[Any]) -> Any:
            try:
                return fn(jobs)
            finally:
                trim()

        return run

    batchers = {
        name: MicroBatcher(
            then_trim(fn),
            executor,
            window,
            cfg.max_batch,
            cfg.max_queue,
            on_batch=metrics.batch_size.labels(name).observe,
        )
        for name, fn in work.items()
    }

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        for b in batchers.values():
            b.start()
        yield  # uvicorn returns here on SIGTERM once in-flight requests are answered
        for b in batchers.values():
            await b.stop()
        executor.shutdown(wait=True)
        write_executor.shutdown(wait=True)  # a write under way is finished, never cut

    # With a key, the interactive docs are off (a browser would fetch the schema without the key)
    # and the schema is served to key holders only (below): only /healthz answers without a key.
    keyed = cfg.api_key is not None
    app = FastAPI(
        title="edgeplaid",
        lifespan=lifespan,
        docs_url=None if keyed else "/docs",
        redoc_url=None if keyed else "/redoc",
        openapi_url=None if keyed else "/openapi.json",
    )
    app.add_middleware(_HTTPGuard, max_body_bytes=cfg.max_body_bytes, metrics=metrics)

    def check_key(request: Request) -> None:
        if cfg.api_key is None:
            return
        given = request.headers.get("x-api-key") or ""
        auth = request.headers.get("authorization") or ""
        if auth.lower().startswith("bearer "):
            given = auth[7:]
        if not hmac.compare_digest(given.encode(), cfg.api_key.encode()):
            raise _BadRequest("missing or wrong API key (Authorization: Bearer KEY or X-API-Key)", 401)

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

    @app.exception_handler(_BodyTooLarge)
    async def too_large(request: Request, exc: _BodyTooLarge) -> JSONResponse:
        # The rest of the body is not read: the connection cannot carry another request.
        return JSONResponse({"error": exc.detail}, 413, headers={"connection": "close"})

    @app.exception_handler(Overloaded)
    async def overloaded(request: Request, exc: Overloaded) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, 503, headers={"Retry-After": str(exc.retry_after)})

    async def submit(name: str, item: Any) -> Any:
        try:
            return await batchers[name].submit(item)
        except (Overloaded, _BadRequest):
            raise
        except Exception as exc:
            # Logged by the batcher. Answered here rather than left to the server, which would
            # answer 500 too but then reset the client's keep-alive connection.
            raise _BadRequest(f"internal error: {type(exc).__name__}: {exc}", 500) from None

    def need_model(what: str) -> None:
        if model is None:
            raise _BadRequest(f"no model loaded: start the server with --model M to {what}", 404)

    def need_index() -> None:
        if index is None:
            raise _BadRequest("no index loaded: start the server with --index DIR", 404)

    def locked(fn: Any, *args: Any) -> Any:
        with write_lock:
            return fn(index, *args)

    async def write(fn: Any, *args: Any) -> dict[str, int]:
        """``fn(index, *args)`` on the writer thread, under the write lock; the index's refusals
        answered as the client's errors. A client that leaves does not cut a write short."""
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(write_executor, locked, fn, *args)
        except _BadRequest:
            raise
        except KeyError as exc:  # an unknown id: nothing was written
            raise _BadRequest(str(exc.args[0]) if exc.args else "unknown id", 404) from None
        except ValueError as exc:  # WhereError included: the index refused the input
            raise _BadRequest(str(exc)) from None
        except IndexLockedError:
            # Another process (e.g. `edgeplaid add`) held the index's lock for the whole wait.
            raise Overloaded(retry_after=5) from None
        except Exception as exc:
            log.error("a write failed", exc_info=exc)
            raise _BadRequest(f"internal error: {type(exc).__name__}: {exc}", 500) from None

    @contextlib.contextmanager
    def write_slot() -> Any:
        """Admission for writes: at most ``max_write_queue`` at a time (503 beyond)."""
        nonlocal pending_writes
        if pending_writes >= cfg.max_write_queue:
            raise Overloaded()
        pending_writes += 1
        try:
            yield
        finally:
            pending_writes -= 1

    def encode_texts(texts: list[str]) -> list[torch.Tensor]:
        """Each text's token vectors (host tensors): runs on the batch worker, the thread that
        runs the model for every other request."""
        tokens, doclens = model.encode_documents(texts)
        return list(torch.split(tokens.cpu().float(), doclens.cpu().tolist()))

    async def documents_of(req: DocumentsRequest) -> _Documents:
        """The request's documents checked (422 naming the field) and their texts encoded."""
        n = len(req.documents)
        if n > cfg.max_documents:
            raise _BadRequest(f"documents: {n} documents, more than the limit of {cfg.max_documents}")
        ids = [d.id for d in req.documents]
        _check_ids(ids, "documents[{i}].id", _id_kind(index), unique=True)
        per_doc = [d.metadata for d in req.documents]
        if req.metadata is not None:
            if any(m is not None for m in per_doc):
                raise _BadRequest("metadata: give it per document or as one list, not both")
            if len(req.metadata) != n:
                raise _BadRequest(f"metadata: {len(req.metadata)} items for {n} documents")
            per_doc = list(req.metadata)
        metadata = per_doc if any(m is not None for m in per_doc) else None
        try:
            check_metadata(metadata, n)  # "metadata: document i: ..." names the document
        except ValueError as exc:
            raise _BadRequest(str(exc)) from None
        vectors: list[torch.Tensor | None] = [None] * n
        texts: list[int] = []
        chars = 0
        lexical = index.has_lexical
        for i, d in enumerate(req.documents):
            if lexical and d.text is None:
                raise _BadRequest(
                    f"documents[{i}].text: this index has a lexical side (BM25): every document needs "
                    "its text (with or without embedding)"
                )
            if not lexical and (d.text is None) == (d.embedding is None):
                raise _BadRequest(f"documents[{i}]: give either text or embedding (token vectors)")
            if d.text is not None and d.embedding is not None:  # the text for BM25 only
                chars += _check_text(d.text, f"documents[{i}].text", cfg.max_text_chars)
            elif d.text is not None:
                if model is None:
                    raise _BadRequest(
                        f"documents[{i}].text: this server has no model to encode texts (started "
                        "without --model): send embedding"
                    )
                chars += _check_text(d.text, f"documents[{i}].text", cfg.max_text_chars)
                texts.append(i)
                continue
            v = _matrix(d.embedding, f"documents[{i}].embedding")
            if v.shape[1] != index.dim:
                raise _BadRequest(
                    f"documents[{i}].embedding: token vectors of dim {v.shape[1]}, "
                    f"the index's are of dim {index.dim}"
                )
            vectors[i] = v
        _check_request_chars(chars, "documents", cfg.max_request_chars)
        if texts:
            loop = asyncio.get_running_loop()
            encoded = await loop.run_in_executor(
                executor, encode_texts, [req.documents[i].text for i in texts]
            )
            for i, v in zip(texts, encoded, strict=True):
                if v.shape[1] != index.dim:  # the server's model and index disagree
                    raise _BadRequest(
                        f"the model encodes {v.shape[1]}-dim vectors, the index holds {index.dim}", 500
                    )
                vectors[i] = v
        doc_texts = [d.text for d in req.documents] if lexical else None
        return _Documents(ids, vectors, metadata, req.upsert, doc_texts)  # type: ignore[arg-type]

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "model": model is not None, "index": index is not None, "device": str(where)}

    if keyed:

        @app.get("/openapi.json", dependencies=[Depends(check_key)], include_in_schema=False)
        async def openapi() -> JSONResponse:
            return JSONResponse(app.openapi())

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
            return {"results": await submit("rerank", _embedding_job(req))}
        if model is None:
            raise _BadRequest(
                "query: this server has no model to encode texts (started without --model): "
                "send query_embedding and document_embeddings"
            )
        total = _check_texts([req.query], "query", cfg.max_text_chars)
        total += _check_texts(req.documents, "documents", cfg.max_text_chars)
        _check_request_chars(total, "documents", cfg.max_request_chars)
        return {"results": await submit("rerank", req)}

    @app.post("/v1/search", dependencies=[Depends(check_key)])
    async def search(req: SearchRequest) -> dict[str, Any]:
        need_index()
        if req.mode != "lexical":
            need_model("encode the queries")
        if req.mode != "late" and not index.has_lexical:
            raise _BadRequest(f"mode: {req.mode!r} needs a lexical side; this index was built without texts")
        if req.mode != "hybrid" and (req.alpha is not None or req.fusion is not None):
            raise _BadRequest("alpha, fusion: only with mode 'hybrid'")
        if len(req.queries) > cfg.max_queries:
            raise _BadRequest(
                f"queries: {len(req.queries)} queries, more than the limit of {cfg.max_queries}"
            )
        if req.k > cfg.max_k:
            raise _BadRequest(f"k: {req.k} is over the limit of {cfg.max_k}")
        total = _check_texts(req.queries, "queries", cfg.max_text_chars)
        _check_request_chars(total, "queries", cfg.max_request_chars)
        _check_where(req.where, req.params)
        return await submit("search", req)

    @app.post("/v1/documents", dependencies=[Depends(check_key)])
    async def add_documents(req: DocumentsRequest) -> dict[str, int]:
        need_index()
        with write_slot():
            docs = await documents_of(req)
            return await write(write_documents, docs)

    @app.delete("/v1/documents", dependencies=[Depends(check_key)])
    async def remove_documents(req: DeleteRequest) -> dict[str, int]:
        need_index()
        if (req.ids is None) == (req.where is None):
            raise _BadRequest("ids: give either ids or a where filter (with its params), one of them")
        if req.ids is not None:
            if req.params is not None:
                raise _BadRequest("params: given without a where filter")
            if len(req.ids) > cfg.max_documents:
                raise _BadRequest(f"ids: {len(req.ids)} ids, more than the limit of {cfg.max_documents}")
            _check_ids(req.ids, "ids[{i}]", _id_kind(index), unique=False)
        _check_where(req.where, req.params)
        with write_slot():
            return await write(delete_documents, req)

    @app.post("/v1/encode", dependencies=[Depends(check_key)])
    async def encode(req: EncodeRequest) -> dict[str, Any]:
        need_model("encode texts")
        if len(req.texts) > cfg.max_documents:
            raise _BadRequest(f"texts: {len(req.texts)} texts, more than the limit of {cfg.max_documents}")
        total = _check_texts(req.texts, "texts", cfg.max_text_chars)
        _check_request_chars(total, "texts", cfg.max_request_chars)
        return await submit("encode", req)

    app.state.batchers = batchers
    app.state.config = cfg
    app.state.device = where
    app.state.metrics = metrics
    return app
