"""Sharded build: one pass over the corpus routes documents to per-shard spools and samples the
whole corpus; the shared codec is trained once on that sample; then every shard is built in
parallel as a Ray task (an ordinary index build with the shared codec, no k-means of its own).

The sample is the one ``Index.build`` would take from the same corpus (the tokens with the
smallest keys of their global positions), so a sharded build's codec equals a single build's,
and with it every document's codes, residuals and exhaustive scores.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from edgeplaid.distributed import _layout
from edgeplaid.index import _codec
from edgeplaid.index._build import _SAMPLE_CAP, _progress, _Sampler, check_batch, id_kind_of
from edgeplaid.index._lexical import analyzer as analyzer_of
from edgeplaid.index._lexical import check_texts
from edgeplaid.index._metadata import check_metadata
from edgeplaid.index._pooling import check_pool_factor, pool_tokens
from edgeplaid.index._storage import _exchange

_ROUTE_TOKENS = 1 << 16  # a one-shot corpus is routed in blocks of about this many tokens
_READ_TOKENS = 1 << 16  # a shard task reads its spool back in blocks of about this many tokens
_SPOOL_TOKENS, _SPOOL_DOCS = "tokens.f32", "docs.jsonl"


class _ShardSpool:
    """One shard's documents as routed: tokens appended to ``tokens.f32`` (float32), one JSON
    line per document (its token count, id, metadata and text) to ``docs.jsonl``."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True)
        self.tokens = open(directory / _SPOOL_TOKENS, "wb")
        self.docs = open(directory / _SPOOL_DOCS, "w", encoding="utf-8")
        self.n_docs = 0

    def add(self, tokens: np.ndarray, doclens: np.ndarray, ids: list[Any], metas: Any, texts: Any) -> None:
        self.tokens.write(memoryview(np.ascontiguousarray(tokens, dtype=np.float32)).cast("B"))
        lines = []
        for i, n in enumerate(doclens.tolist()):
            row: dict[str, Any] = {"n": n, "id": ids[i]}
            if metas is not None and metas[i] is not None:
                row["meta"] = metas[i]
            if texts is not None:
                row["text"] = texts[i]
            lines.append(json.dumps(row, ensure_ascii=False))
        if lines:
            self.docs.write("\n".join(lines) + "\n")
        self.n_docs += len(lines)

    def close(self) -> None:
        self.tokens.close()
        self.docs.close()


def read_spool(
    directory: str | os.PathLike, dim: int
) -> tuple[Iterator[tuple[Any, Any, Any]], list[Any], list[Any]]:
    """(batches (tokens (n, dim) float32, doclens (b,) int64, ids) in blocks of about
    _READ_TOKENS tokens, every document's metadata, every document's text) of a shard spool."""
    d = Path(directory)
    doclens, ids, metas, texts = [], [], [], []
    with open(d / _SPOOL_DOCS, encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            doclens.append(row["n"])
            ids.append(row["id"])
            metas.append(row.get("meta"))
            texts.append(row.get("text"))
    dls = np.asarray(doclens, dtype=np.int64)

    def batches() -> Iterator[tuple[Any, Any, Any]]:
        with open(d / _SPOOL_TOKENS, "rb") as f:
            s = 0
            while s < dls.shape[0]:
                e = s + 1
                n = int(dls[s])
                while e < dls.shape[0] and n + int(dls[e]) <= _READ_TOKENS:
                    n += int(dls[e])
                    e += 1
                buf = np.empty((n, dim), dtype=np.float32)
                if f.readinto(memoryview(buf).cast("B")) != buf.nbytes:
                    raise OSError(f"{d / _SPOOL_TOKENS}: shorter than its documents")
                yield buf, dls[s:e], ids[s:e]
                s = e

    return batches(), metas, texts


def build_shard(
    spool: str, out: str, codec_dir: str, nbits: int, options: dict[str, Any]
) -> dict[str, float]:
    """Builds one shard (an ordinary index directory at ``out``) from its spool with the shared
    codec; returns its build timings (s). Run as a Ray task (:func:`build_sharded`)."""
    from edgeplaid.index._build import build

    codec = _codec.Codec.load(codec_dir)
    batches, metas, texts = read_spool(spool, codec.dim)
    has_meta = any(m is not None for m in metas)
    timings = build(
        out,
        batches,
        None,
        nbits,
        metadata=metas if has_meta else None,
        texts=texts if options["lexical"] else None,
        store_texts=options["store_texts"],
        analyzer=options["analyzer"],
        progress=False,
        record_pool_factor=options["pool_factor"],  # pooled on the driver, before the sample
        codec=codec,
    )
    shutil.rmtree(spool, ignore_errors=True)
    return timings


def _batches(doc_tokens: Any, doclens: Any, ids: Any, metadata: Any, texts: Any) -> Iterator[dict[str, Any]]:
    """The corpus as dict batches {doc_tokens, doclens, ids, metadata, texts}: a one-shot corpus
    cut at document boundaries into blocks of about _ROUTE_TOKENS tokens, or a stream's items
    (tuples (doc_tokens, doclens[, ids]) or such dicts) as they come."""
    if doclens is not None:
        t, d = check_batch(doc_tokens, doclens, None)
        n = d.shape[0]
        if ids is not None:
            ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        if ids is not None and len(ids) != n:
            raise ValueError(f"ids: {len(ids)} ids for {n} documents")
        if metadata is not None and len(metadata) != n:
            raise ValueError(f"metadata: {len(metadata)} entries for {n} documents")
        if texts is not None and len(texts) != n:
            raise ValueError(f"texts: {len(texts)} texts for {n} documents")
        offsets = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(d, out=offsets[1:])
        s = 0
        while s < n:
            e = max(s + 1, int(np.searchsorted(offsets, offsets[s] + _ROUTE_TOKENS, side="right")) - 1)
            e = min(e, n)
            yield {
                "doc_tokens": t[offsets[s] : offsets[e]],
                "doclens": d[s:e],
                "ids": None if ids is None else ids[s:e],
                "metadata": None if metadata is None else list(metadata[s:e]),
                "texts": None if texts is None else list(texts[s:e]),
            }
            s = e
        return
    if metadata is not None or texts is not None:
        raise ValueError("metadata, texts: with a stream of batches, give them in each batch (dict items)")
    for item in doc_tokens:
        if isinstance(item, dict):
            unknown = set(item) - {"doc_tokens", "doclens", "ids", "metadata", "texts"}
            if unknown or "doc_tokens" not in item or "doclens" not in item:
                raise ValueError(
                    "a dict batch holds doc_tokens, doclens and optionally ids, metadata, texts; "
                    f"got keys {sorted(item)}"
                )
            yield {k: item.get(k) for k in ("doc_tokens", "doclens", "ids", "metadata", "texts")}
        elif isinstance(item, (tuple, list)) and len(item) in (2, 3):
            yield {
                "doc_tokens": item[0],
                "doclens": item[1],
                "ids": item[2] if len(item) == 3 else None,
                "metadata": None,
                "texts": None,
            }
        else:
            raise ValueError(
                "a stream of batches must yield (doc_tokens, doclens), (doc_tokens, doclens, ids) "
                "or dicts {doc_tokens, doclens, ids, metadata, texts}"
            )


def build_sharded(
    path: str | os.PathLike,
    doc_tokens: Any,
    doclens: Any,
    nbits: int,
    ids: Any,
    *,
    n_shards: int,
    metadata: Any,
    texts: Any,
    store_texts: bool,
    analyzer: str,
    n_centroids: int | None,
    kmeans_iters: int,
    sample_per_centroid: int,
    seed: int,
    buckets: str,
    pool_factor: float,
    overwrite: bool,
    progress: bool,
    task_options: dict[str, Any] | None,
) -> dict[str, Any]:
    """Writes a sharded index at ``path`` (see :meth:`ShardedIndex.build`); Ray must be connected.
    Returns {"timings": {...}, "shards": [per-shard timings]}."""
    import ray

    if nbits not in (1, 2, 4, 8):
        raise ValueError(f"nbits: expected 1, 2, 4 or 8, got {nbits!r}")
    n_shards = _layout.check_n_shards(n_shards)
    _codec.check_bucket_fit(buckets)
    pool_factor = check_pool_factor(pool_factor)
    analyzer_of(analyzer)
    if type(store_texts) is not bool:
        raise ValueError(f"store_texts: expected a bool, got {store_texts!r}")
    # Absolute: Ray's workers resolve a relative path against their own working directory.
    dest = Path(path).absolute()
    if dest.exists() and not overwrite:
        raise FileExistsError(f"{dest}: exists; pass overwrite=True to replace it")
    if dest.exists() and not _layout.is_sharded(dest) and (not dest.is_dir() or any(dest.iterdir())):
        raise ValueError(f"{dest}: exists and is neither a sharded index nor empty: not replaced")
    work = dest.with_name(f".{dest.name}.building-{uuid.uuid4().hex[:12]}")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    t0 = time.perf_counter()
    try:
        spools = [_ShardSpool(work / "_spool" / _layout.shard_name(i)) for i in range(n_shards)]
        sampler = _Sampler(_SAMPLE_CAP, seed)
        dim: int | None = None
        n_tokens = n_docs = 0
        id_kind: str | None = None
        have_ids: bool | None = None
        lexical: bool | None = None
        next_id = 0  # int ids: one more than the largest (add() without ids continues there)
        bar = _progress(None, "edgeplaid: routing", progress)
        try:
            for b in _batches(doc_tokens, doclens, ids, metadata, texts):
                t, d = check_batch(b["doc_tokens"], b["doclens"], dim)
                dim = t.shape[1]
                nb = d.shape[0]
                bi = b["ids"]
                if have_ids is None:
                    have_ids = bi is not None
                elif have_ids != (bi is not None):
                    raise ValueError("ids: either every batch has ids or none does")
                if bi is None:
                    bi = list(range(n_docs, n_docs + nb))  # auto ids continue across batches
                else:  # numpy / torch ints become Python ints (the spool is JSON)
                    bi = bi.tolist() if hasattr(bi, "tolist") else list(bi)
                    bi = [int(i) if isinstance(i, np.integer) else i for i in bi]
                    if len(bi) != nb:
                        raise ValueError(f"ids: {len(bi)} ids for {nb} documents")
                kind = id_kind_of(bi) if nb else id_kind
                if id_kind is not None and kind != id_kind:
                    raise ValueError(f"ids: expected all {id_kind} ids, got {kind} ids in a later batch")
                id_kind = kind
                if kind == "int" and nb:
                    next_id = max(next_id, int(max(bi)) + 1)
                metas = check_metadata(b["metadata"], nb) if b["metadata"] is not None else None
                if lexical is None:
                    lexical = b["texts"] is not None
                elif lexical != (b["texts"] is not None):
                    raise ValueError("texts: either every batch has texts or none does")
                bt = check_texts(b["texts"], nb) if b["texts"] is not None else None
                if pool_factor > 1:
                    t, d = pool_tokens(t, d, pool_factor)
                sampler.add(n_tokens, t)
                where = _layout.shard_of(bi, id_kind or "int", n_shards) if nb else np.zeros(0, np.int64)
                for s in np.unique(where).tolist():
                    mine = where == s
                    docs = np.flatnonzero(mine)
                    spools[s].add(
                        t[np.repeat(mine, d)],  # the tokens of the shard's documents, in order
                        d[docs],
                        [bi[j] for j in docs.tolist()],
                        None if metas is None else [metas[j] for j in docs.tolist()],
                        None if bt is None else [bt[j] for j in docs.tolist()],
                    )
                n_tokens += t.shape[0]
                n_docs += nb
                if bar is not None:
                    bar.update(t.shape[0])
        finally:
            for sp in spools:
                sp.close()
            if bar is not None:
                bar.close()
        if dim is None or n_tokens == 0:
            raise ValueError("doc_tokens: the corpus has no token")
        if dim * nbits % 8:
            raise ValueError(f"nbits: dim * nbits must be a multiple of 8, got dim={dim}, nbits={nbits}")
        empty = [i for i, sp in enumerate(spools) if sp.n_docs == 0]
        if empty:
            raise ValueError(
                f"n_shards: {n_shards} shards for {n_docs} documents leave shard(s) {empty[:8]} "
                "empty; use fewer shards"
            )
        t_route = time.perf_counter() - t0

        t1 = time.perf_counter()
        codec, _, _ = _codec.train_codec(
            sampler.smallest(),
            n_tokens,
            nbits,
            n_centroids=n_centroids,
            kmeans_iters=kmeans_iters,
            sample_per_centroid=sample_per_centroid,
            seed=seed,
            buckets=buckets,
        )
        del sampler
        (work / _layout.CODEC_DIR).mkdir()
        codec.save(work / _layout.CODEC_DIR)
        t_codec = time.perf_counter() - t1

        t2 = time.perf_counter()
        options = {
            "lexical": bool(lexical),
            "store_texts": store_texts,
            "analyzer": analyzer,
            "pool_factor": pool_factor,
        }
        task = ray.remote(build_shard).options(**(task_options or {}))
        refs = [
            task.remote(
                str(work / "_spool" / _layout.shard_name(i)),
                str(work / _layout.shard_name(i)),
                str(work / _layout.CODEC_DIR),
                nbits,
                options,
            )
            for i in range(n_shards)
        ]
        try:
            shard_timings = ray.get(refs)
        except BaseException:
            # The siblings of a failed task would go on writing into ``work`` after it is removed.
            for ref in refs:
                ray.cancel(ref, force=True)
            ray.wait(refs, num_returns=len(refs), timeout=60)
            raise
        t_shards = time.perf_counter() - t2
        shutil.rmtree(work / "_spool", ignore_errors=True)
        manifest = _layout.new_manifest(
            n_shards,
            id_kind or "int",
            int(dim),
            nbits,
            next_id=next_id,
            lexical=bool(lexical),
            analyzer=analyzer,
            pool_factor=pool_factor,
        )
        _layout.write_manifest(work, manifest)
        if dest.exists():
            # One atomic swap where the file system has it: readers see the old index or the new.
            if _exchange(work, dest):
                shutil.rmtree(work, ignore_errors=True)  # now the old index
            else:
                old = dest.with_name(f".{dest.name}.replaced-{uuid.uuid4().hex[:12]}")
                os.replace(dest, old)
                os.replace(work, dest)
                shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(work, dest)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return {
        "timings": {
            "route": t_route,
            "codec": t_codec,
            "shards": t_shards,
            "total": time.perf_counter() - t0,
        },
        "shards": shard_timings,
    }
