"""ShardedIndex: N ordinary edgeplaid indexes sharing one codec, searched by scatter-gather
through one Ray actor per shard.

Search: the query batch is put in Ray's object store once; every shard actor returns its own
top-k (scores and user ids); the driver merges them into the global top-k (:func:`merge_topk`).
Because the shards share the codec, a document scores the same in any shard, so the merged
exhaustive search equals a single index's exactly, and the merged PLAID search is the union of
per-shard PLAID searches (each shard probes its own IVF with the same centroids).

Failures: a shard actor that dies is restarted by Ray from its directory (``max_restarts=-1``).
A read (search, lookups) that meets a dead or restarting shard asks it again, 50 ms to 1 s
apart, until it answers or ``timeout_s`` has passed, then raises :class:`ShardUnavailableError`
naming the shard. No partial results are ever returned. A change checks its arguments on the
driver first (ids of the index's kind, present or absent as the change needs, metadata, texts),
so a bad argument changes no shard; it is never retried (a change may have been committed
before a process died): a shard failing then raises ShardUnavailableError naming the shards
that did and did not change. One writer at a time: ``next_id`` lives in this process until it
is written to ``sharded.json``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgeplaid.distributed import _layout
from edgeplaid.distributed._cluster import connect
from edgeplaid.distributed._shard_actor import ShardActor
from edgeplaid.index._index import _mode
from edgeplaid.search._hybrid import (
    LATE_LIST,
    LEXICAL_LIST,
    check_fusion,
    fuse_top,
    hybrid_depth,
    late_depth,
)
from edgeplaid.search._plaid import resolve_params

_INLINE_BYTES = 64 << 10


def _to_numpy(x: Any) -> Any:
    """A torch tensor as a CPU numpy array (bfloat16 widened to float32); anything else as is."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        return (x.float() if x.dtype == torch.bfloat16 else x).numpy()
    return x


class ShardUnavailableError(RuntimeError):
    """A shard did not answer: its actor died and was not back within the timeout, or a change
    could not be applied to every shard it touched (the message says which shards changed)."""


class ShardedSearchResult(tuple):
    """``(scores (nq, k) float32, ids (nq, k) int64)`` of a sharded search, best first.

    ``ids`` are global handles ``shard * 2**40 + rank in that shard's own result list`` (-1
    where fewer than k documents were found): the shards' positions are their own, so the
    user's ids are in ``user_ids`` (lists, None where missing). ``shards`` (nq, k) int64 is the
    shard each result came from (-1 where missing)."""

    def __new__(
        cls, scores: torch.Tensor, ids: torch.Tensor, user_ids: list[list[Any]], shards: torch.Tensor
    ):
        self = super().__new__(cls, (scores, ids))
        self._user_ids = user_ids
        self._shards = shards
        return self

    @property
    def scores(self) -> torch.Tensor:  # type: ignore[override]
        return self[0]

    @property
    def ids(self) -> torch.Tensor:  # type: ignore[override]
        return self[1]

    @property
    def user_ids(self) -> list[list[Any]]:
        return self._user_ids

    @property
    def shards(self) -> torch.Tensor:
        return self._shards


def merge_topk(
    parts: Sequence[tuple[np.ndarray, list[list[Any]]]], k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[list[Any]]]:
    """The global top-k of per-shard top-k lists.

    Args:
        parts: per shard, (scores (nq, k_s) float32 best first, -inf for none; user ids per row,
            None for none).

    Returns:
        scores (nq, k) float32, handles (nq, k) int64 (shard * 2**40 + index in the shard's
        list; -1 none), shards (nq, k) int64 (-1 none), user ids (nq lists of k). Equal scores
        keep shard order, then each shard's own order.
    """
    nq = parts[0][0].shape[0]
    scores = np.full((nq, k), -np.inf, dtype=np.float32)
    handles = np.full((nq, k), -1, dtype=np.int64)
    shards = np.full((nq, k), -1, dtype=np.int64)
    users: list[list[Any]] = [[None] * k for _ in range(nq)]
    if nq == 0:
        return scores, handles, shards, users
    s_all = np.concatenate([np.asarray(p[0], dtype=np.float32).reshape(nq, -1) for p in parts], axis=1)
    shard_of = np.concatenate([np.full(p[0].shape[1], i, dtype=np.int64) for i, p in enumerate(parts)])
    rank_of = np.concatenate([np.arange(p[0].shape[1], dtype=np.int64) for p in parts])
    m = min(k, s_all.shape[1])
    # stable sort of -score: ties keep (shard, rank) order; -inf (no result) sorts last
    order = np.argsort(-s_all, axis=1, kind="stable")[:, :m]
    top = np.take_along_axis(s_all, order, axis=1)
    found = top > -np.inf
    scores[:, :m] = np.where(found, top, -np.inf)
    sh, rk = shard_of[order], rank_of[order]
    handles[:, :m] = np.where(found, sh * (1 << 40) + rk, -1)
    shards[:, :m] = np.where(found, sh, -1)
    for q in range(nq):
        for j in np.flatnonzero(found[q]).tolist():
            users[q][j] = parts[sh[q, j]][1][q][rk[q, j]]
    return scores, handles, shards, users


class ShardedIndex:
    """A PLAID index split into ``n_shards`` ordinary edgeplaid indexes that share one codec,
    placed by a stable hash of each document's id (:mod:`edgeplaid.distributed._layout`), each
    served by a Ray actor. Same methods and arguments as :class:`edgeplaid.Index` where they make
    sense across shards (positions are per shard: ``subset`` is refused, filter with ``where``).

    Create one with :meth:`build`, open one with :meth:`load`; :meth:`close` ends its actors.
    """

    def __init__(
        self,
        path: Path,
        manifest: dict[str, Any],
        actors: list[Any],
        timeout_s: float,
    ) -> None:
        self.path = path
        self.manifest = manifest
        self._actors = actors
        self.timeout_s = timeout_s

    # ------------------------------------------------------------------ build / load

    @classmethod
    def build(
        cls,
        path: str | os.PathLike,
        doc_tokens: Any,
        doclens: Any = None,
        nbits: int = 4,
        ids: Sequence[str] | Sequence[int] | None = None,
        *,
        n_shards: int,
        metadata: Sequence[dict[str, Any] | None] | None = None,
        n_centroids: int | None = None,
        kmeans_iters: int = 4,
        sample_per_centroid: int = 16,
        seed: int = 0,
        overwrite: bool = False,
        progress: bool = True,
        texts: Sequence[str] | None = None,
        store_texts: bool = True,
        analyzer: str = "plain",
        buckets: str = "lloyd_max",
        pool_factor: float = 1.0,
        ray_address: str | None = None,
        device: str = "cpu",
        actor_options: dict[str, Any] | None = None,
        task_options: dict[str, Any] | None = None,
        timeout_s: float = 120.0,
    ) -> ShardedIndex:
        """Builds a sharded index at ``path`` and returns it loaded (:meth:`load`).

        Arguments as :meth:`edgeplaid.Index.build`, and:
            doc_tokens: packed document vectors (n_tokens, dim) with ``doclens``; or, with
                ``doclens=None``, an iterable of batches ``(doc_tokens, doclens[, ids])`` or dicts
                ``{doc_tokens, doclens, ids, metadata, texts}`` (e.g. :func:`edgeplaid.distributed.
                encode`): read once, routed to per-shard spools inside the index being written.
            ids: optional user ids (all int or all str, unique); without them documents are
                numbered 0 .. n_docs - 1 in corpus order (every shard stores its documents' ids).
            n_shards: shards (1 .. 4096); each must receive at least one document.
            ray_address: the Ray cluster: None (the running one if any, else a local one started
                for this process), ``"auto"`` (the running one), ``"local"`` (a new local one) or
                an address.
            task_options: ``ray.remote`` options of the shard build tasks (default: 1 CPU each).
            device, actor_options, timeout_s: as :meth:`load`.

        The codec is trained once, on the driver, on the sample a single build of the same corpus
        takes (so it is that build's codec); the shards are then built in parallel as Ray tasks,
        each an ordinary build with that codec (no k-means of its own). The path must be visible
        to every node of the cluster (a shared filesystem) on a multi-node cluster.
        """
        from edgeplaid.distributed._sharded_build import build_sharded

        connect(ray_address)
        report = build_sharded(
            path,
            doc_tokens,
            doclens,
            nbits,
            ids,
            n_shards=n_shards,
            metadata=metadata,
            texts=texts,
            store_texts=store_texts,
            analyzer=analyzer,
            n_centroids=n_centroids,
            kmeans_iters=kmeans_iters,
            sample_per_centroid=sample_per_centroid,
            seed=seed,
            buckets=buckets,
            pool_factor=pool_factor,
            overwrite=overwrite,
            progress=progress,
            task_options=task_options,
        )
        index = cls.load(path, device=device, actor_options=actor_options, timeout_s=timeout_s)
        index.build_timings = report
        return index

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        *,
        device: str = "cpu",
        ray_address: str | None = None,
        actor_options: dict[str, Any] | None = None,
        threads: int | None = None,
        timeout_s: float = 120.0,
    ) -> ShardedIndex:
        """Opens the sharded index at ``path``: one Ray actor per shard, each loading its shard
        (checked as ``Index.load`` checks an index) on ``device``.

        Args:
            ray_address: see :meth:`build`.
            actor_options: ``ray.remote`` options of the shard actors. Default: ``num_cpus`` 0
                (nothing reserved, as Ray's default for a running actor; ``num_gpus`` 1 on a GPU
                device), spread over the nodes, ``max_restarts=-1`` (a dead actor is restarted
                from its directory).
            threads: CPU kernel threads per actor (default: its ``num_cpus``, or the cluster's
                CPUs / n_shards when that is 0; at least 1).
            timeout_s: how long a read waits for a shard (its start included) before
                ShardUnavailableError.
        """
        import ray

        p = Path(path).absolute()  # the actors' working directory is not ours
        manifest = _layout.read_manifest(p)
        connect(ray_address)
        n = manifest["n_shards"]
        # Reserving no CPU (Ray's own default for a running actor) leaves the cluster's CPUs to
        # tasks, e.g. the shard builds of another ShardedIndex.build: actors holding 2/3 of a CPU
        # each on a 2-CPU cluster left a build's 1-CPU tasks pending forever.
        opts: dict[str, Any] = {"num_cpus": 0, "scheduling_strategy": "SPREAD"}
        if str(device).startswith("cuda"):
            opts["num_gpus"] = 1
        opts.update(actor_options or {})
        opts["max_restarts"] = opts.get("max_restarts", -1)
        opts["max_task_retries"] = 0  # reads retry here, after the restart; changes never
        if threads is None:
            cpus = opts["num_cpus"] or ray.cluster_resources().get("CPU", 1.0) / n
            threads = max(1, int(cpus))
        remote = ray.remote(ShardActor).options(**opts)
        actors = [remote.remote(str(p / name), str(device), threads) for name in manifest["shards"]]
        index = cls(p, manifest, actors, float(timeout_s))
        try:
            index._infos = index._read(lambda s: actors[s].info.remote(), "load")
        except BaseException:
            index.close()
            raise
        return index

    def close(self) -> None:
        """Ends the shard actors (the directories stay)."""
        import ray

        for a in self._actors:
            ray.kill(a, no_restart=True)
        self._actors = []

    def __enter__(self) -> ShardedIndex:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ plumbing

    def _read(self, call: Callable[[int], Any], what: str, shards: Sequence[int] | None = None) -> list[Any]:
        """``call(shard)`` (a Ray object ref) on the given shards (default all), gathered within
        timeout_s. A shard whose actor is dead or restarting is asked again, with a growing
        pause (50 ms to 1 s), until it answers: Ray restarts the actor from its directory. A
        shard that has not answered by the deadline raises ShardUnavailableError naming it.
        Application errors (ValueError, KeyError, ...) pass through as the shard raised them."""
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError

        self._check_open()
        shards = list(range(self.n_shards)) if shards is None else list(shards)
        deadline = time.monotonic() + self.timeout_s
        refs = {s: call(s) for s in shards}
        out: dict[int, Any] = {}
        pending, pause = shards, 0.05
        while pending:
            down: list[int] = []
            for s in pending:
                try:
                    out[s] = ray.get(refs[s], timeout=max(0.0, deadline - time.monotonic()))
                except GetTimeoutError:
                    raise ShardUnavailableError(
                        f"{what}: shard {s} ({_layout.shard_name(s)}) did not answer within "
                        f"{self.timeout_s:g} s; no partial results are returned"
                    ) from None
                except RayActorError as e:
                    if time.monotonic() + pause >= deadline:
                        cause = str(e).strip().splitlines()
                        raise ShardUnavailableError(
                            f"{what}: shard {s} ({_layout.shard_name(s)}) is down and did not come "
                            f"back within {self.timeout_s:g} s; no partial results are returned "
                            f"({type(e).__name__}: {cause[0] if cause else ''})"
                        ) from e
                    down.append(s)
            if down:
                time.sleep(pause)
                pause = min(2 * pause, 1.0)
                refs.update({s: call(s) for s in down})
            pending = down
        return [out[s] for s in shards]

    def _check_open(self) -> None:
        if not self._actors:
            raise RuntimeError(f"{self!r}: closed (its shard actors have ended)")

    def _route(self, ids: Sequence[Any]) -> dict[int, list[int]]:
        """Shard -> the positions in ``ids`` of the ids that live there."""
        where = _layout.shard_of(list(ids), self.id_kind, self.n_shards)
        return {int(s): np.flatnonzero(where == s).tolist() for s in np.unique(where)}

    # ------------------------------------------------------------------ properties

    @property
    def n_shards(self) -> int:
        return int(self.manifest["n_shards"])

    @property
    def id_kind(self) -> str:
        """ "int" or "str": the kind of the documents' ids."""
        return str(self.manifest["id_kind"])

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    @property
    def nbits(self) -> int:
        return int(self.manifest["nbits"])

    @property
    def has_lexical(self) -> bool:
        return bool(self.manifest.get("lexical"))

    @property
    def has_metadata(self) -> bool:
        """Whether any shard had documents with metadata when last asked (load, shard_info)."""
        return any(i["has_metadata"] for i in self._infos)

    @property
    def pool_factor(self) -> float:
        return float(self.manifest.get("pool_factor", 1.0))

    @property
    def device(self) -> torch.device:
        return torch.device(self._infos[0]["device"])

    def shard_info(self) -> list[dict[str, Any]]:
        """Per shard: n_docs, n_tokens, segments, bytes, ... as its actor reports them now."""
        self._infos = self._read(lambda s: self._actors[s].info.remote(), "shard_info")
        return self._infos

    @property
    def n_docs(self) -> int:
        return sum(i["n_docs"] for i in self.shard_info())

    def __len__(self) -> int:
        return self.n_docs

    def nbytes(self) -> int:
        return sum(i["nbytes"] for i in self.shard_info())

    def __contains__(self, user_id: Any) -> bool:
        (s,) = self._route([user_id])
        return bool(self._read(lambda s: self._actors[s].contains.remote([user_id]), "contains", [s])[0][0])

    def __repr__(self) -> str:
        return (
            f"ShardedIndex({str(self.path)!r}, n_shards={self.n_shards}, dim={self.dim}, nbits={self.nbits})"
        )

    # ------------------------------------------------------------------ search

    def _prepare(self, queries: Any, k: int, kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        """Checked k; the queries and mask as numpy (a torch tensor argument cost ~2.5 ms a call
        in Ray's pickling against ~0.1 ms for the same array), a large batch put in the object
        store once for every shard, a small one sent inline with each call."""
        import ray

        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k: expected a positive int, got {k!r}")
        if kwargs.pop("subset", None) is not None:
            raise ValueError("subset: positions are per shard in a sharded index; filter with where=")
        queries = _to_numpy(queries)
        kwargs["queries_mask"] = _to_numpy(kwargs.get("queries_mask"))
        if isinstance(queries, np.ndarray) and queries.nbytes > _INLINE_BYTES:
            queries = ray.put(queries)
        return queries, kwargs

    def _scatter(self, exhaustive: bool, queries: Any, k: int, kwargs: dict[str, Any]) -> ShardedSearchResult:
        q_ref, kwargs = self._prepare(queries, k, kwargs)
        parts = self._read(lambda s: self._actors[s].search.remote(exhaustive, q_ref, k, kwargs), "search")
        return self._result(*merge_topk(parts, k))

    @staticmethod
    def _result(
        scores: np.ndarray, handles: np.ndarray, shards: np.ndarray, users: list[list[Any]]
    ) -> ShardedSearchResult:
        # On the driver's CPU, whatever device the shards search on (the driver may have none).
        return ShardedSearchResult(
            torch.from_numpy(scores), torch.from_numpy(handles), users, torch.from_numpy(shards)
        )

    def _hybrid(self, queries: Any, k: int, kwargs: dict[str, Any]) -> ShardedSearchResult:
        """Hybrid search fused on the driver. Fused scores are relative to their union (min-max
        over it, or ranks in it), so shards cannot fuse on their own and be merged. Every shard
        returns its union unfused (``Index.hybrid_candidates``); per query the driver keeps the
        lexical side's best ``max(2k, 20)`` and the late side's best as many over all shards
        (the lists a single index keeps: each global best is among its own shard's best) and
        fuses that union as a single index does (:func:`fuse_top`)."""
        fusion, alpha = check_fusion(kwargs.pop("fusion"), kwargs.pop("alpha"))
        text = kwargs.pop("text")
        kwargs.pop("mode")
        kwargs.pop("backend")
        fixed = ("queries_mask", "where", "params", "subset")
        params = resolve_params(k, **{n: v for n, v in kwargs.items() if n not in fixed})
        q_ref, kwargs = self._prepare(queries, k, kwargs)
        call = {**kwargs, "text": text}
        parts = self._read(lambda s: self._actors[s].hybrid.remote(q_ref, k, call), "search")
        nq = len(parts[0])
        depth = hybrid_depth(k)
        late_n = late_depth(k, depth, params)
        scores = np.full((nq, k), -np.inf, dtype=np.float32)
        handles = np.full((nq, k), -1, dtype=np.int64)
        shards = np.full((nq, k), -1, dtype=np.int64)
        users: list[list[Any]] = [[None] * k for _ in range(nq)]
        for q in range(nq):
            rows = [p[q] for p in parts]
            late = np.concatenate([np.asarray(r[1], dtype=np.float32) for r in rows])
            lex = np.concatenate([np.asarray(r[2], dtype=np.float64) for r in rows])
            shard = np.concatenate([np.full(len(r[0]), s, np.int64) for s, r in enumerate(rows)])
            rank = np.concatenate([np.arange(len(r[0]), dtype=np.int64) for r in rows])
            lists = np.concatenate([np.asarray(r[3], dtype=np.int8) for r in rows])
            # each side's list over all shards: its best among the shards' lists of that side
            on_lex = np.flatnonzero(lists & LEXICAL_LIST)
            on_late = np.flatnonzero(lists & LATE_LIST)
            by_lex = on_lex[np.argsort(-lex[on_lex], kind="stable")[:depth]]
            by_late = on_late[np.argsort(-late[on_late], kind="stable")[:late_n]]
            keep = np.union1d(by_lex, by_late)
            fused, order = fuse_top(keep, late[keep], lex[keep], k, fusion, alpha)
            top = keep[order]
            n = top.shape[0]
            scores[q, :n] = fused
            handles[q, :n] = shard[top] * (1 << 40) + rank[top]
            shards[q, :n] = shard[top]
            for j, t in enumerate(top.tolist()):
                users[q][j] = rows[shard[t]][0][rank[t]]
        return self._result(scores, handles, shards, users)

    def search(
        self,
        queries: Any = None,
        k: int = 10,
        queries_mask: Any = None,
        subset: Any = None,
        backend: str | None = None,
        *,
        where: str | None = None,
        params: Sequence[Any] | None = None,
        text: str | Sequence[str] | None = None,
        mode: str | None = None,
        alpha: float | None = None,
        fusion: str | None = None,
        **knobs: Any,
    ) -> ShardedSearchResult:
        """The k best live documents of each query over every shard: each shard runs
        :meth:`edgeplaid.Index.search` with these arguments (filters, lexical and hybrid options
        pass through) and returns its k best; the driver merges them (:func:`merge_topk`).
        ``subset`` (positions) is refused: positions are per shard. Hybrid search is fused on
        the driver over every shard's candidates (:meth:`_hybrid`), as a single index fuses its
        own. BM25 scores use each shard's own statistics (document frequencies, average
        length): with documents placed by a hash the shards are random samples of the corpus,
        so lexical and hybrid results agree closely but not exactly with a single index's."""
        kwargs = {
            "queries_mask": queries_mask,
            "subset": subset,
            "backend": backend,
            "where": where,
            "params": params,
            "text": text,
            "mode": mode,
            "alpha": alpha,
            "fusion": fusion,
            **knobs,
        }
        if _mode(mode, queries, text) == "hybrid":
            return self._hybrid(queries, k, kwargs)
        return self._scatter(False, queries, k, kwargs)

    def search_exhaustive(
        self,
        queries: Any,
        k: int = 10,
        queries_mask: Any = None,
        backend: str | None = None,
        *,
        where: str | None = None,
        params: Sequence[Any] | None = None,
    ) -> ShardedSearchResult:
        """Exact MaxSim of every query against every live document of every shard (decompressed
        with the shared codec): equal to a single index's ``search_exhaustive`` over the same
        documents built with the same codec (same ids, same scores)."""
        kwargs = {"queries_mask": queries_mask, "backend": backend, "where": where, "params": params}
        return self._scatter(True, queries, k, kwargs)

    # ------------------------------------------------------------------ lookups

    def _by_id(self, method: str, ids: Sequence[Any]) -> list[Any]:
        ids = list(ids.tolist() if hasattr(ids, "tolist") else ids)
        out: list[Any] = [None] * len(ids)
        routes = self._route(ids) if ids else {}
        shards = list(routes)
        results = self._read(
            lambda s: self._actors[s].call.remote(method, [ids[j] for j in routes[s]]), method, shards
        )
        for s, res in zip(shards, results, strict=True):
            for j, r in zip(routes[s], res, strict=True):
                out[j] = r
        return out

    def metadata(self, ids: Sequence[Any]) -> list[dict[str, Any] | None]:
        """The metadata of the documents with these ids (KeyError for an unknown id)."""
        return self._by_id("metadata", ids)

    def texts(self, ids: Sequence[Any]) -> list[str | None]:
        """The stored texts of the documents with these ids (None for an unknown one)."""
        return self._by_id("texts", ids)

    def select(self, where: str, params: Sequence[Any] | None = None) -> list[Any]:
        """The ids of the live documents of every shard whose metadata satisfies ``where``."""
        parts = self._read(lambda s: self._actors[s].call.remote("select", where, params), "select")
        return [u for p in parts for u in p]

    # ------------------------------------------------------------------ changes

    def _change(self, method: str, routes: dict[int, Any]) -> list[Any]:
        """Applies ``method`` on each shard of ``routes`` (shard -> (args, kwargs)), all at once;
        a shard that fails makes the whole call raise, naming the shards that changed."""
        import ray
        from ray.exceptions import RayActorError

        self._check_open()
        shards = sorted(routes)
        refs = [self._actors[s].call.remote(method, *routes[s][0], **routes[s][1]) for s in shards]
        done, failed, results, first = [], [], [], None
        for s, ref in zip(shards, refs, strict=True):
            try:
                results.append(ray.get(ref, timeout=self.timeout_s))
                done.append(s)
            except Exception as e:  # every shard's outcome first, then one error
                failed.append(s)
                results.append(None)
                first = first or e
        if first is not None:
            if not done and not isinstance(first, RayActorError | ray.exceptions.GetTimeoutError):
                raise first  # nothing changed: the shard's own error (ValueError, KeyError)
            raise ShardUnavailableError(
                f"{method}: shards {failed} failed ({type(first).__name__}: {first}); shards {done} "
                "changed. Each shard's change is atomic; retry the failed shards' documents"
            ) from first
        return results

    def _split(self, ids: list[Any], *columns: Any) -> dict[int, list[Any]]:
        """Per shard: its ids and the matching rows of each column (None stays None)."""
        out: dict[int, list[Any]] = {}
        for s, rows in self._route(ids).items():
            out[s] = [[ids[j] for j in rows]] + [None if c is None else [c[j] for j in rows] for c in columns]
        return out

    def _split_tokens(self, doc_tokens: Any, doclens: Any, n: int) -> tuple[list[np.ndarray], np.ndarray]:
        from edgeplaid.index._build import check_batch

        t, d = check_batch(doc_tokens, doclens, self.dim)
        if d.shape[0] != n:
            raise ValueError(f"doclens: {d.shape[0]} documents for {n} ids")
        offsets = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(d, out=offsets[1:])
        return [t[offsets[j] : offsets[j + 1]] for j in range(n)], d

    def _routed_docs(
        self, ids: list[Any], doc_tokens: Any, doclens: Any, metadata: Any, texts: Any
    ) -> dict[int, Any]:
        docs, d = self._split_tokens(doc_tokens, doclens, len(ids))
        if metadata is not None and len(metadata) != len(ids):
            raise ValueError(f"metadata: {len(metadata)} entries for {len(ids)} documents")
        if texts is not None and len(texts) != len(ids):
            raise ValueError(f"texts: {len(texts)} texts for {len(ids)} documents")
        routes = {}
        for s, rows in self._route(ids).items():
            routes[s] = (
                np.concatenate([docs[j] for j in rows]),
                d[rows],
                [ids[j] for j in rows],
                None if metadata is None else [metadata[j] for j in rows],
                None if texts is None else [texts[j] for j in rows],
            )
        return routes

    def _found(self, ids: list[Any], what: str) -> list[bool]:
        """Whether each id is a live document (asked of its shard)."""
        routes = self._route(ids) if ids else {}
        hits = self._read(
            lambda s: self._actors[s].contains.remote([ids[j] for j in routes[s]]), what, list(routes)
        )
        out = [False] * len(ids)
        for rows, got in zip(routes.values(), hits, strict=True):
            for j, hit in zip(rows, got, strict=True):
                out[j] = bool(hit)
        return out

    def _check_known(self, ids: list[Any], what: str) -> None:
        """KeyError naming the first id that is not a live document (before any change)."""
        for i, hit in zip(ids, self._found(ids, what), strict=True):
            if not hit:
                raise KeyError(f"ids: {i!r} is not in the index ({what} changes nothing)")

    def _check_new(self, ids: list[Any], metadata: Any, texts: Any, what: str) -> None:
        """The checks a shard would make, made first on the driver so that a bad argument changes
        no shard: ids unique and of the index's kind, metadata and texts one per document, texts
        given exactly when the index has a lexical side."""
        from edgeplaid.index._lexical import check_texts
        from edgeplaid.index._metadata import check_metadata

        if len(set(ids)) != len(ids):
            raise ValueError("ids: duplicate document ids")
        _layout.shard_of(ids, self.id_kind, self.n_shards)  # raises on an id of the other kind
        if metadata is not None:
            check_metadata(metadata, len(ids))
        if self.has_lexical and texts is None:
            raise ValueError(f"texts: this index has a lexical side: {what} needs the documents' texts")
        if not self.has_lexical and texts is not None:
            raise ValueError("texts: this index has no lexical side (built without texts)")
        if texts is not None:
            check_texts(texts, len(ids))

    def _bump_next_id(self, ids: list[Any]) -> None:
        """Int ids: records in sharded.json that auto ids continue after the largest given."""
        if self.id_kind != "int" or not ids:
            return
        nxt = max(int(self.manifest["next_id"]), max(int(i) for i in ids) + 1)
        if nxt != self.manifest["next_id"]:
            self.manifest = {**self.manifest, "next_id": nxt}
            _layout.write_manifest(self.path, self.manifest)

    def add(
        self,
        doc_tokens: Any,
        doclens: Any,
        ids: Sequence[Any] | None = None,
        metadata: Sequence[dict[str, Any] | None] | None = None,
        texts: Sequence[str] | None = None,
    ) -> list[Any]:
        """Adds documents, each to the shard its id hashes to (compressed there with the shared
        codec); returns their ids. Without ids (int-id indexes only) they continue after the
        largest id the sharded index ever gave or held (``next_id`` in ``sharded.json``)."""
        from edgeplaid.index._build import check_batch

        n = int(check_batch(doc_tokens, doclens, self.dim)[1].shape[0])
        auto = ids is None
        if auto:
            if self.id_kind != "int":
                raise ValueError("ids: this index's ids are str: give the new documents' ids")
            start = int(self.manifest["next_id"])
            ids = list(range(start, start + n))
        ids = list(ids.tolist() if hasattr(ids, "tolist") else ids)
        if len(ids) != n:
            raise ValueError(f"ids: {len(ids)} ids for {n} documents")
        self._check_new(ids, metadata, texts, "add")
        taken = [i for i, hit in zip(ids, self._found(ids, "add"), strict=True) if hit]
        if taken:
            raise ValueError(f"ids: {taken[0]!r} is in the index already (add changes nothing; see upsert)")
        routes = self._routed_docs(ids, doc_tokens, doclens, metadata, texts)
        # next_id first: a failure part-way never leaves a shard holding ids it would give again
        self._bump_next_id(ids)
        self._change("add", {s: ((r[0], r[1], r[2], r[3], r[4]), {}) for s, r in routes.items()})
        return ids

    def delete(
        self,
        ids: Sequence[Any] | None = None,
        *,
        where: str | None = None,
        params: Sequence[Any] | None = None,
    ) -> int:
        """Deletes the documents with these ids (each in its shard) or those matching ``where``
        (in every shard); returns how many. An unknown id raises KeyError and deletes nothing
        (every id is looked up first)."""
        if (ids is None) == (where is None):
            raise ValueError("give either ids or where")
        if where is not None:
            res = self._change(
                "delete", {s: ((), {"where": where, "params": params}) for s in range(self.n_shards)}
            )
            return int(sum(res))
        ids = list(ids.tolist() if hasattr(ids, "tolist") else ids)
        if not ids:
            return 0
        self._check_known(ids, "delete")
        routes = self._route(ids)
        res = self._change("delete", {s: (([ids[j] for j in rows],), {}) for s, rows in routes.items()})
        return int(sum(res))

    def update(
        self,
        ids: Sequence[Any],
        doc_tokens: Any,
        doclens: Any,
        metadata: Sequence[dict[str, Any] | None] | None = None,
        texts: Sequence[str] | None = None,
    ) -> list[Any]:
        """Replaces the documents with these ids (all must exist), each in its shard."""
        ids = list(ids.tolist() if hasattr(ids, "tolist") else ids)
        self._check_new(ids, metadata, texts, "update")
        self._check_known(ids, "update")
        routes = self._routed_docs(ids, doc_tokens, doclens, metadata, texts)
        self._change("update", {s: ((r[2], r[0], r[1], r[3], r[4]), {}) for s, r in routes.items()})
        return ids

    def upsert(
        self,
        ids: Sequence[Any],
        doc_tokens: Any,
        doclens: Any,
        metadata: Sequence[dict[str, Any] | None] | None = None,
        texts: Sequence[str] | None = None,
    ) -> tuple[int, int]:
        """Adds the new ids and replaces the existing ones, each in its shard; returns (added,
        updated)."""
        ids = list(ids.tolist() if hasattr(ids, "tolist") else ids)
        self._check_new(ids, metadata, texts, "upsert")
        routes = self._routed_docs(ids, doc_tokens, doclens, metadata, texts)
        self._bump_next_id(ids)
        res = self._change("upsert", {s: ((r[2], r[0], r[1], r[3], r[4]), {}) for s, r in routes.items()})
        return sum(a for a, _ in res), sum(u for _, u in res)

    def set_metadata(self, ids: Sequence[Any], metadata: Sequence[dict[str, Any] | None]) -> int:
        """Replaces the metadata of the documents with these ids, each in its shard."""
        ids = list(ids.tolist() if hasattr(ids, "tolist") else ids)
        from edgeplaid.index._metadata import check_metadata

        check_metadata(metadata, len(ids))
        self._check_known(ids, "set_metadata")
        routes = self._split(ids, list(metadata))
        return int(sum(self._change("set_metadata", {s: ((r[0], r[1]), {}) for s, r in routes.items()})))

    def compact(self) -> bool:
        """Compacts every shard (see :meth:`edgeplaid.Index.compact`); whether any changed."""
        return any(self._change("compact", {s: ((), {}) for s in range(self.n_shards)}))
