"""PLAID index build in bounded memory: sample -> k-means -> residual codec -> codes + residuals -> IVF.

The build reads the corpus twice. Pass 1 counts tokens, keeps the k-means sample (the tokens
with the smallest pseudo-random keys, a key being a hash of the token's global position, so a
corpus given in batches samples exactly the tokens it would sample given at once) and, for an
iterator, spools the batches to a float32 file inside the index being written (from a background
thread). Pass 2 reads the spool back block by block (read ahead by a background thread), finds
each token's nearest centroid (edgeplaid.ops.nearest_centroids, coarse to fine above 4,096
centroids) and compresses it (edgeplaid.ops.compress_residuals) straight into the residual file.
Memory: the sample (2^19 tokens), a few batches / blocks, and the codes (2 bytes per token up to
65,536 centroids), then the IVF's sort (~20 bytes per token).
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from edgeplaid.index import _codec
from edgeplaid.index._lexical import (
    DEFAULT_ANALYZER,
    check_new_keys,
    check_texts,
    keys_of_ids,
    link_lexical,
    write_lexical,
)
from edgeplaid.index._lexical import analyzer as analyzer_of
from edgeplaid.index._pooling import check_pool_factor, pool_tokens
from edgeplaid.index._storage import IndexWriter

_SAMPLE_CAP = 1 << 19  # most tokens pass 1 keeps for k-means + held-out
_BATCH_TOKENS = 1 << 16  # pass-2 block when the corpus is one array


def _as_numpy(x: Any, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.dtype == torch.bfloat16:
            x = x.float()
        return x.numpy()
    if isinstance(x, np.ndarray):
        return x
    raise TypeError(f"{name}: expected a torch.Tensor or numpy.ndarray, got {type(x).__name__}")


def mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64's output function of (n,) uint64 (a bijection: distinct in, distinct out)."""
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def _keys(start: int, n: int, seed: int) -> np.ndarray:
    """splitmix64 of global token positions start..start+n: uniform, order-independent keys."""
    with np.errstate(over="ignore"):
        z = np.arange(start, start + n, dtype=np.uint64) + np.uint64(seed * 0x9E3779B97F4A7C15 % (1 << 64))
    return mix64(z)


def check_batch(tokens: Any, doclens: Any, dim: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Validated (tokens (n, dim) float32, doclens (b,) int64) of one batch."""
    t = _as_numpy(tokens, "doc_tokens")
    d = _as_numpy(doclens, "doclens")
    if t.ndim != 2:
        raise ValueError(f"doc_tokens: expected (n_tokens, dim), got shape {t.shape}")
    if t.dtype not in (np.float32, np.float16, np.float64):
        raise ValueError(f"doc_tokens: expected a float array, got {t.dtype}")
    if dim is not None and t.shape[1] != dim:
        raise ValueError(f"doc_tokens: dim {t.shape[1]} differs from the first batch's {dim}")
    if d.ndim != 1 or d.dtype.kind not in "iu":
        raise ValueError(f"doclens: expected (n_docs,) integers, got {d.dtype} {d.shape}")
    d = d.astype(np.int64)
    if (d < 0).any():
        raise ValueError("doclens: negative document length")
    if int(d.sum()) != t.shape[0]:
        raise ValueError(f"doclens: sum {int(d.sum())} != n_tokens {t.shape[0]} of doc_tokens")
    return np.ascontiguousarray(t, dtype=np.float32), d


class _Sampler:
    """Keeps the ``cap`` tokens with the smallest keys seen so far."""

    def __init__(self, cap: int, seed: int) -> None:
        self.cap, self.seed = cap, seed
        self.keys = np.empty(0, dtype=np.uint64)
        self.rows: np.ndarray | None = None

    def add(self, start: int, tokens: np.ndarray) -> None:
        keys = _keys(start, tokens.shape[0], self.seed)
        if self.rows is None:
            self.rows = np.empty((0, tokens.shape[1]), dtype=np.float32)
        if self.keys.shape[0] == self.cap:
            # Full: only keys below the largest kept can enter (keys are distinct: splitmix64 is a
            # bijection), so most of a batch is dropped before any copy (at 65M tokens, copying
            # every batch into the sample cost as much as the rest of pass 1).
            below = keys < self.keys.max()
            keys, tokens = keys[below], tokens[below]
        if keys.shape[0] > self.cap:  # only this batch's best can enter
            keep = np.argpartition(keys, self.cap - 1)[: self.cap]
            keys, tokens = keys[keep], tokens[keep]
        keys = np.concatenate([self.keys, keys])
        rows = np.concatenate([self.rows, tokens])
        if keys.shape[0] > self.cap:
            keep = np.argpartition(keys, self.cap - 1)[: self.cap]
            keys, rows = keys[keep], rows[keep]
        self.keys, self.rows = keys, rows

    def smallest(self) -> np.ndarray:
        """Kept rows ordered by key, (n, dim) float32."""
        assert self.rows is not None
        return self.rows[np.argsort(self.keys, kind="stable")]


class _SpoolWriter:
    """Appends float32 batches to the spool file from a background thread (file writes release
    the GIL): pass 1 goes on reading and sampling while the disk takes the previous batch (at 65M
    tokens the 12.5 GB of spool written inline cost ~40 s at this machine's 300 MB/s). At most
    ``depth`` batches wait in the queue: memory stays bounded."""

    def __init__(self, path: str, depth: int = 2) -> None:
        self.file = open(path, "wb")
        self.queue: queue.Queue[np.ndarray | None] = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="edgeplaid-spool", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (item := self.queue.get()) is not None:
            if self.error is None:
                try:
                    self.file.write(memoryview(item).cast("B"))  # no copy of the batch
                except BaseException as e:  # reported by put/close, in the caller's thread
                    self.error = e

    def put(self, batch: np.ndarray) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put(batch)

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join()
        self.file.close()
        if self.error is not None:
            raise self.error


def _spool_blocks(path: str, n_tokens: int, dim: int, block: int, depth: int = 2) -> Iterator[np.ndarray]:
    """Consecutive (<= block, dim) float32 blocks of the spool, read ahead by a background thread
    (``depth`` blocks at most) while the caller compresses the current one. Plain reads, not a
    memory map: a mapped 12.5 GB spool counted in the process' RSS as it was paged in (14 GB peak
    at 65M tokens)."""
    q: queue.Queue[np.ndarray | BaseException | None] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            with open(path, "rb") as f:
                for s in range(0, n_tokens, block):
                    buf = np.empty((min(block, n_tokens - s), dim), dtype=np.float32)
                    if f.readinto(memoryview(buf).cast("B")) != buf.nbytes:
                        raise OSError(f"{path}: spool shorter than {n_tokens} tokens")
                    while not stop.is_set():
                        try:
                            q.put(buf, timeout=0.1)
                            break
                        except queue.Full:
                            continue
                    if stop.is_set():
                        return
            q.put(None)
        except BaseException as e:
            q.put(e)

    thread = threading.Thread(target=produce, name="edgeplaid-spool-read", daemon=True)
    thread.start()
    try:
        while (item := q.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()


def _batches(doc_tokens: Any, doclens: Any, ids: Any) -> Iterator[tuple[Any, Any, Any]]:
    if doclens is not None:
        yield doc_tokens, doclens, ids
        return
    for item in doc_tokens:
        if not isinstance(item, (tuple, list)) or len(item) not in (2, 3):
            raise ValueError(
                "an iterator of batches must yield (doc_tokens, doclens) or (doc_tokens, doclens, ids)"
            )
        yield item[0], item[1], item[2] if len(item) == 3 else None


def _progress(total: int | None, desc: str, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return None
    return tqdm(total=total, desc=desc, unit="tok", unit_scale=True, leave=False)


def build(
    path: str | os.PathLike,
    doc_tokens: Any,
    doclens: Any = None,
    nbits: int = 4,
    ids: Any = None,
    *,
    metadata: Any = None,
    n_centroids: int | None = None,
    kmeans_iters: int = 4,
    sample_per_centroid: int = 16,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
    compact_codes: bool = True,
    carry_from: Any = None,
    next_id: int | None = None,
    texts: Any = None,
    store_texts: bool = True,
    analyzer: str = DEFAULT_ANALYZER,
    buckets: str = _codec.DEFAULT_BUCKET_FIT,
    pool_factor: float = 1.0,
    record_pool_factor: float | None = None,
    codec: _codec.Codec | None = None,
) -> dict[str, float]:
    """Builds an index at ``path`` (see :meth:`edgeplaid.Index.build`); returns stage timings (s).

    For ``Index.rebuild``: ``carry_from``, the manifest of the version the build replaces, whose
    files kept beside the index (``encoder.json``) and lexical side (same documents, same keys)
    are carried over; ``next_id``, its auto-id high-water mark, kept so that ids dropped with
    deleted documents are never given again; ``record_pool_factor``, the pool factor its
    documents were pooled with (recorded, not applied again: later adds pool with it).

    ``codec``: a trained codec (:func:`edgeplaid.index._codec.train_codec`) to compress with
    instead of training one (the shards of a sharded index share one); ``nbits`` must be its
    own, and n_centroids, kmeans_iters, sample_per_centroid, seed and buckets are then unused."""
    if nbits not in (1, 2, 4, 8):
        raise ValueError(f"nbits: expected 1, 2, 4 or 8, got {nbits!r}")
    if codec is not None and codec.nbits != nbits:
        raise ValueError(f"nbits: the codec's is {codec.nbits}, got {nbits}")
    _codec.check_bucket_fit(buckets)
    pool_factor = check_pool_factor(pool_factor)
    if texts is not None:
        texts = check_texts(texts, None)  # the count once the documents are read
        analyzer_of(analyzer)  # a bad name fails before the costly passes
        if type(store_texts) is not bool:
            raise ValueError(f"store_texts: expected a bool, got {store_texts!r}")
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    one_shot = doclens is not None
    with IndexWriter(path, overwrite=overwrite) as w:
        # ---- pass 1: count, sample, collect doclens / ids, spool an iterator
        sampler = _Sampler(_SAMPLE_CAP, seed)
        all_doclens: list[np.ndarray] = []
        user_ids: list[Any] = []
        have_ids: bool | None = None
        dim: int | None = None
        n_tokens = 0
        spool_path = w.path("_spool.f32")
        spool = None if one_shot else _SpoolWriter(spool_path)
        whole: np.ndarray | None = None
        bar = _progress(None, "edgeplaid: reading", progress)
        try:
            for bt, bd, bi in _batches(doc_tokens, doclens, ids):
                t, d = check_batch(bt, bd, dim)
                dim = t.shape[1]
                if pool_factor > 1:
                    t, d = pool_tokens(t, d, pool_factor)
                if bi is not None:
                    bi = list(bi.tolist() if isinstance(bi, (np.ndarray, torch.Tensor)) else bi)
                    if len(bi) != d.shape[0]:
                        raise ValueError(f"ids: {len(bi)} ids for {d.shape[0]} documents")
                if have_ids is None:
                    have_ids = bi is not None
                elif have_ids != (bi is not None):
                    raise ValueError("ids: either every batch has ids or none does")
                if bi is not None:
                    user_ids.extend(bi)
                if codec is None:  # a given codec needs no sample
                    sampler.add(n_tokens, t)
                all_doclens.append(d)
                if spool is not None:
                    # Written later by the spool thread: a batch that is the caller's memory (which
                    # an iterator may reuse for its next batch) is copied first.
                    spool.put(t if t.flags.owndata and t is not bt else t.copy())
                else:
                    whole = t
                n_tokens += t.shape[0]
                if bar is not None:
                    bar.update(t.shape[0])
        finally:
            if spool is not None:
                spool.close()
            if bar is not None:
                bar.close()
        if dim is None:
            raise ValueError("doc_tokens: no batch given")
        if dim * nbits % 8:
            raise ValueError(f"nbits: dim * nbits must be a multiple of 8, got dim={dim}, nbits={nbits}")
        dls = np.concatenate(all_doclens) if all_doclens else np.zeros(0, np.int64)
        n_docs = dls.shape[0]
        if n_tokens == 0:
            raise ValueError("doc_tokens: the corpus has no token")
        # Checked and written before the costly passes: bad metadata or texts fail fast.
        meta_entry = write_metadata_file(w, metadata, n_docs)
        if texts is not None and len(texts) != n_docs:
            check_texts(texts, n_docs)  # raises, naming both counts
        timings["read"] = time.perf_counter() - t0

        # ---- k-means on the sample, codec on a held-out slice (or the codec given)
        if codec is None:
            codec, assigner, codec_timings = _codec.train_codec(
                sampler.smallest(),
                n_tokens,
                nbits,
                n_centroids=n_centroids,
                kmeans_iters=kmeans_iters,
                sample_per_centroid=sample_per_centroid,
                seed=seed,
                buckets=buckets,
            )
            timings.update(codec_timings)
        else:
            if codec.dim != dim:
                raise ValueError(f"codec: its dim {codec.dim} differs from the documents' {dim}")
            t1 = time.perf_counter()
            assigner = codec.assigner()
            timings["groups"] = time.perf_counter() - t1
        del sampler
        k, centroids = codec.n_centroids, codec.centroids
        cutoffs, weights, avg_residual = codec.bucket_cutoffs, codec.bucket_weights, codec.avg_residual

        # ---- pass 2: compress into codes + residuals
        t2 = time.perf_counter()
        code_dtype = np.uint16 if compact_codes and k <= 1 << 16 else np.int32
        codes = np.empty(n_tokens, dtype=code_dtype)
        w.begin_array("residuals", np.uint8, (dim * nbits // 8,))
        w.begin_array("inv_norm", np.float32)
        bar = _progress(n_tokens, "edgeplaid: compressing", progress)
        if one_shot:
            assert whole is not None
            blocks = (whole[s : s + _BATCH_TOKENS] for s in range(0, n_tokens, _BATCH_TOKENS))
        else:
            blocks = _spool_blocks(spool_path, n_tokens, dim, _BATCH_TOKENS)
        s = 0
        for block in blocks:
            block = np.ascontiguousarray(block)
            c, r, inv = _codec.compress(block, centroids, cutoffs, weights, nbits, assigner)
            codes[s : s + block.shape[0]] = c
            w.append("residuals", r)
            w.append("inv_norm", inv)
            s += block.shape[0]
            if bar is not None:
                bar.update(block.shape[0])
        if bar is not None:
            bar.close()
        w.end_array("residuals")
        w.end_array("inv_norm")
        del blocks, whole
        if not one_shot:
            os.remove(spool_path)
        timings["compress"] = time.perf_counter() - t2

        # ---- IVF: centroid -> sorted unique documents (CSR)
        t3 = time.perf_counter()
        ivf_offsets, ivf_docs = build_ivf(codes, dls, k)
        timings["ivf"] = time.perf_counter() - t3

        w.write_array("centroids", centroids.astype(np.float16))
        w.write_array("avg_residual", np.array([avg_residual], dtype=np.float32))
        w.write_array("bucket_cutoffs", cutoffs)
        w.write_array("bucket_weights", weights)
        w.write_array("codes", codes)
        w.write_array("doclens", dls.astype(np.int32))
        w.write_array("ivf_offsets", ivf_offsets)
        w.write_array("ivf_docs", ivf_docs)
        id_kind = write_ids(w, user_ids if have_ids else None, n_docs)
        manifest = {
            "dim": int(dim),
            "nbits": int(nbits),
            "n_docs": int(n_docs),
            "n_tokens": int(n_tokens),
            "n_centroids": int(k),
            "ids": id_kind,
            "segments": [{"prefix": "", "n_docs": int(n_docs), "n_tokens": int(n_tokens)}],
            "build": {
                "kmeans_iters": codec.kmeans_iters,
                "kmeans_sample": codec.kmeans_sample,
                "buckets": codec.buckets,
                "pool_factor": record_pool_factor if record_pool_factor is not None else pool_factor,
                "seed": codec.seed,
                "source": "edgeplaid",
                # nearest-centroid search of pass 2 (edgeplaid.ops.nearest_centroids)
                "assignment": {
                    "n_groups": int(assigner.groups.n_groups),
                    "n_probe": int(assigner.n_probe),
                    "heldout_recall": assigner.recall,
                },
            },
        }
        if meta_entry is not None:
            manifest["metadata"] = meta_entry
        t4 = time.perf_counter()
        if texts is not None:
            keys = keys_of_ids(user_ids, id_kind) if have_ids else np.arange(n_docs, dtype=np.int64)
            if id_kind == "str":
                check_new_keys(keys, None, user_ids)
            manifest["lexical"] = write_lexical(
                w,
                None,
                analyzer_name=analyzer,
                store_texts=store_texts,
                key_kind=id_kind,
                add_keys=keys,
                add_texts=texts,
                delete_keys=np.zeros(0, np.int64),
                n_docs=n_docs,
            )
            timings["lexical"] = time.perf_counter() - t4
        elif carry_from is not None and carry_from.get("lexical") is not None:
            lex = dict(link_lexical(w, carry_from))  # type: ignore[arg-type]
            if lex["n_docs"] != n_docs:
                raise RuntimeError("edgeplaid bug: rebuild's documents are not its lexical side's")
            manifest["lexical"] = lex
        if carry_from is not None:
            w.carry_foreign(carry_from.dir, carry_from)
        if next_id is not None and id_kind != "str":
            manifest["next_id"] = int(next_id)
        w.commit(manifest)
    timings["total"] = time.perf_counter() - t0
    return timings


def build_ivf(codes: np.ndarray, doclens: np.ndarray, n_centroids: int) -> tuple[np.ndarray, np.ndarray]:
    """IVF in CSR form from codes (n_tokens,) and doclens (n_docs,).

    Returns offsets (n_centroids + 1,) int64 and docs (n_ivf,) int32: the sorted unique
    documents having a token in centroid c are docs[offsets[c]:offsets[c + 1]].
    """
    n_docs = doclens.shape[0]
    doc_of = np.repeat(np.arange(n_docs, dtype=np.int32), doclens)
    # Tokens are in document order, so a stable sort by code (a radix sort for uint16 codes) leaves
    # each centroid's documents ascending: duplicates are then adjacent. (np.unique of a combined
    # int64 key sorted 8-byte keys: 3x slower at 65M tokens.)
    order = np.argsort(codes, kind="stable")
    cs, ds = codes[order], doc_of[order]
    del order
    keep = np.ones(cs.shape[0], dtype=bool)
    if cs.shape[0] > 1:
        keep[1:] = (cs[1:] != cs[:-1]) | (ds[1:] != ds[:-1])
    docs = ds[keep]
    offsets = np.zeros(n_centroids + 1, dtype=np.int64)
    np.cumsum(np.bincount(cs[keep].astype(np.int64), minlength=n_centroids), out=offsets[1:])
    return offsets, docs


def id_kind_of(ids: list[Any]) -> str:
    """ "int" or "str" for a list (or 1-d int array) of ids all of one kind, unique; ValueError
    otherwise."""
    if isinstance(ids, np.ndarray) and ids.dtype.kind in "iu" and ids.ndim == 1:
        if ids.dtype == np.uint64 and ids.shape[0] and int(ids.max()) >= 1 << 63:
            raise ValueError(f"ids: {int(ids.max())} does not fit in int64")
        if np.unique(ids).shape[0] != ids.shape[0]:
            raise ValueError("ids: duplicate document ids")
        return "int"
    if all(isinstance(i, (int, np.integer)) and not isinstance(i, bool) for i in ids):
        big = next((i for i in ids if not -(1 << 63) <= int(i) < 1 << 63), None)
        if big is not None:
            raise ValueError(f"ids: {big} does not fit in int64")
        arr = np.asarray(ids, dtype=np.int64) if ids else np.zeros(0, np.int64)
        if np.unique(arr).shape[0] != len(ids):
            raise ValueError("ids: duplicate document ids")
        return "int"
    if all(isinstance(i, str) for i in ids):
        if len(set(ids)) != len(ids):
            raise ValueError("ids: duplicate document ids")
        return "str"
    raise ValueError("ids: expected all int or all str document ids")


def write_ids(
    w: IndexWriter, ids: list[Any] | None, n_docs: int, prefix: str = "", kind: str | None = None
) -> str:
    """Stores one segment's user ids (all int or all str, unique) under ``prefix``; returns their
    kind: none, int or str (``kind``: the index's, which the ids must match)."""
    if ids is None:
        return "none"
    if len(ids) != n_docs:
        raise ValueError(f"ids: {len(ids)} ids for {n_docs} documents")
    got = id_kind_of(ids) if len(ids) or kind is None else kind
    if kind is not None and got != kind:
        raise ValueError(f"ids: this index's ids are {kind}, got {got} ids")
    if got == "int":
        w.write_array(prefix + "ids", np.asarray(ids, dtype=np.int64).reshape(-1))
        return "int"
    enc = [s.encode("utf-8") for s in ids]
    offsets = np.zeros(n_docs + 1, dtype=np.int64)
    np.cumsum([len(b) for b in enc], out=offsets[1:])
    w.write_array(prefix + "ids_str", np.frombuffer(b"".join(enc), dtype=np.uint8))
    w.write_array(prefix + "ids_str_offsets", offsets)
    return "str"


def write_metadata_file(
    w: IndexWriter, metadata: Any, n_docs: int, src: Any = None, start: int = 0
) -> dict[str, Any] | None:
    """Writes the metadata file of the version ``w`` writes: the rows of ``src`` (a path, or
    None) plus ``metadata`` (None or one JSON object / None per document) for positions
    start, start + 1, ...; returns its manifest entry, None when there is no metadata at all."""
    from edgeplaid.index._metadata import METADATA_FILE, check_metadata, write_metadata

    metas = check_metadata(metadata, n_docs)
    rows = [(start + i, m) for i, m in enumerate(metas) if m is not None]
    if not rows and src is None:
        return None
    write_metadata(w.path(METADATA_FILE), src, add=rows)
    return w.file_entry(METADATA_FILE)
