"""A living index: add, delete, update, compact and rebuild, each one atomic.

Every change writes a new version of the index directory beside it and switches it in with one
atomic exchange (:class:`edgeplaid.index._storage.IndexWriter`): the arrays it does not change
are hard links to the previous version's files (never rewritten), so a change costs what it
adds, not the index's size. After a ``kill -9`` at any moment the path holds the old version or
the new one, never anything else, and the next open removes what the killed writer left.

- ``add`` compresses the new documents with the index's codec (no k-means) into a new segment.
- ``delete`` writes one tombstone array (the sorted deleted positions) however many ids.
- ``update`` is delete + add in the same version.
- ``compact`` copies the live documents' codes and residuals into one segment (nothing is
  recompressed), rebuilds the IVF, renumbers the metadata rows; ids never change.
- ``rebuild`` retrains the codec on the decompressed live documents (a build).

One writer at a time: the writer's ``flock`` beside the index; a second one waits up to
``LOCK_WAIT_S`` seconds, then gets an IndexLockedError (a RuntimeError) naming the index. A
writer works on the newest committed version (an Index object loaded before another process's
change is refreshed first), so no change is ever lost. Readers keep the version they loaded
until ``refresh()``.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from edgeplaid.index import _codec
from edgeplaid.index._build import build_ivf, check_batch, id_kind_of, write_ids
from edgeplaid.index._checks import open_checked
from edgeplaid.index._lexical import check_new_keys, check_texts, keys_of_ids, link_lexical, write_lexical
from edgeplaid.index._metadata import METADATA_FILE, check_metadata, write_metadata
from edgeplaid.index._pooling import pool_factor_of, pool_tokens
from edgeplaid.index._snapshot import Snapshot, metadata_path, open_snapshot
from edgeplaid.index._storage import (
    IndexLockedError,
    IndexWriter,
    changed,
    expected_arrays,
    read_manifest,
    segments_of,
    tombstones_ok,
)

if TYPE_CHECKING:
    from edgeplaid.index._index import Index

LOCK_WAIT_S = float(os.environ.get("EDGEPLAID_LOCK_WAIT_S", 30.0))
# A segment whose mean |residual| exceeds the codec's (avg_residual, measured at build on held-out
# tokens) by this factor is reported as drifting: its documents are farther from every centroid
# than the corpus the codec was trained on, and its 4-bit residuals lose more.
DRIFT_WARN = 1.5
_BLOCK_TOKENS = 1 << 16
MERGE_FACTOR = 4
_INT64_END = 1 << 63
_assigners: dict[tuple[str, str], _codec.Assigner] = {}


@contextlib.contextmanager
def _writing(index: Index) -> Iterator[tuple[IndexWriter, Snapshot]]:
    """The writer's lock and a version directory being written, with the newest committed
    snapshot; on success the index is refreshed to the new version."""
    try:
        w = IndexWriter(index.path, overwrite=True, wait=LOCK_WAIT_S)
    except IndexLockedError:
        raise IndexLockedError(
            f"{index.path}: another edgeplaid writer has held this index for {LOCK_WAIT_S:g} s; "
            "try again later (one writer at a time)"
        ) from None
    with w:
        st = index._state
        st = st if st.host is None else st.host  # a GPU index: the CPU views it was copied from
        if changed(index.path, st.manifest):
            # The newest version (another writer's change, or CPU views of a GPU index).
            st = open_checked(
                index.path, index.mmap, False, lambda m: open_snapshot(index.path, m, index.mmap)
            )
        try:
            yield w, st
        except _Nothing:
            return  # nothing to change: the unfinished version is discarded, nothing is switched
        # Still under the lock, so the version at the path is the one just committed: opened
        # without the load-time scan. Its arrays are the ones this writer wrote or linked from a
        # version already checked at its load; re-reading them would cost O(index) per change
        # (0.3 s of a 1-id delete at 500k documents).
        new = open_snapshot(index.path, read_manifest(index.path), index.mmap, trusted=True, previous=st)
    index._install(new)


def _finish(
    w: IndexWriter,
    st: Snapshot,
    segments: list[dict[str, Any]],
    id_kind: str,
    n_deleted: int,
    metadata: dict[str, Any] | str | None,
    next_id: int = 0,
    lexical: dict[str, Any] | str | None = "keep",
) -> None:
    """Links every array the new version needs and the writer did not write from the old
    version, then commits. ``metadata``: the new file's entry, None (no metadata) or "keep";
    ``next_id``: one past the largest id the change added (the high-water mark only grows);
    ``lexical``: the lexical side's new entry (written by :func:`_lexical_change`), or "keep"
    (the same documents: the old version's files linked)."""
    m = st.manifest
    body: dict[str, Any] = {
        "format_version": 4,  # for expected_arrays; commit() stamps the current version
        "dim": st.dim,
        "nbits": st.nbits,
        "n_docs": sum(s["n_docs"] for s in segments),
        "n_tokens": sum(s["n_tokens"] for s in segments),
        "n_centroids": st.n_centroids,
        "ids": id_kind,
        "segments": segments,
        "n_deleted": n_deleted,
    }
    if "build" in m:
        body["build"] = m["build"]
    if id_kind != "str":
        body["next_id"] = min(max(_next_id(st), next_id), _INT64_END - 1)
    for name in expected_arrays(body):
        if name not in w.arrays:
            if name not in m["arrays"]:
                raise AssertionError(
                    f"{name}: neither written nor in the previous version"
                )  # pragma: no cover
            w.link_array(m.dir, name, m["arrays"][name])
    if metadata == "keep":
        if m.get("metadata") is not None:
            w.link_file(m.dir, m["metadata"]["file"])
            body["metadata"] = m["metadata"]
    elif metadata is not None:
        body["metadata"] = metadata
    if lexical == "keep":
        lexical = link_lexical(w, m)
    if lexical is not None:
        body["lexical"] = lexical
    body.pop("format_version")
    w.carry_foreign(m.dir, m)
    w.commit(body)


def _metadata_src(st: Snapshot) -> str | None:
    return metadata_path(st.manifest)


def _assigner(st: Snapshot) -> _codec.Assigner:
    """The nearest-centroid search of the build, for this codec (cached per process)."""
    key = (str(st.path), str(st.manifest["arrays"]["centroids"]["checksum"]))
    a = _assigners.get(key)
    if a is None:
        cents = st.centroids.cpu().numpy().astype(np.float32)
        build = st.manifest.get("build", {})
        seed = int(build.get("seed", 0)) if isinstance(build.get("seed", 0), int) else 0
        a = _codec.Assigner(cents, seed=seed)
        probe = (
            build.get("assignment", {}).get("n_probe") if isinstance(build.get("assignment"), dict) else None
        )
        if isinstance(probe, int) and not a.exact:
            a.n_probe = min(probe, a.groups.n_groups)
        _assigners.clear()  # one codec at a time: the groups of a large codec are megabytes
        _assigners[key] = a
    return a


def _next_prefix(st: Snapshot) -> str:
    used = [int(s.prefix[1:-1]) for s in st.segments if s.prefix]
    return f"s{max(used, default=0) + 1}."


def _next_id(st: Snapshot) -> int:
    """The first auto id of the next add: one past the largest int id this index ever held. The
    manifest keeps it (``next_id``) because a compaction or a merge drops deleted documents and
    their ids: an id is never given to a second document, even after its first one is gone."""
    high = int(st.manifest.get("next_id", 0))
    u = st.user_ids
    if u is None:
        return max(high, st.n_positions)
    if isinstance(u, np.ndarray) and u.shape[0]:
        return max(high, int(u.max()) + 1)
    return high


def _ids_for_new(
    st: Snapshot, ids: Sequence[Any] | None, n: int, replacing: np.ndarray
) -> tuple[list[Any], str]:
    """(the new documents' ids, the index's id kind after the change)."""
    kind = st.id_kind
    if ids is None:
        if kind == "str":
            raise ValueError("ids: this index has str ids; give the new documents' ids")
        base = _next_id(st)
        if base + n > _INT64_END:
            raise ValueError("ids: the automatic ids would pass the int64 range; give the documents' ids")
        return list(range(base, base + n)), "int" if kind == "none" else kind
    new = [
        i.item() if isinstance(i, np.generic) else i
        for i in (ids.tolist() if hasattr(ids, "tolist") else ids)
    ]
    if len(new) != n:
        raise ValueError(f"ids: {len(new)} ids for {n} documents")
    if not n:
        return new, "int" if kind == "none" else kind
    got = id_kind_of(new)
    want = "str" if kind == "str" else "int"
    if got != want:
        raise ValueError(f"ids: this index's ids are {want}, got {got} ids")
    taken = set(replacing.tolist())
    clash = [u for u, p in zip(new, st.lookup(new).tolist(), strict=True) if p >= 0 and p not in taken]
    if clash:
        raise ValueError(f"ids: {clash[:5]} already in the index (update() replaces documents)")
    return new, want


def _texts_fit(st: Snapshot, texts: list[str] | None, n: int) -> None:
    """ValueError when texts are missing for an index with a lexical side, or given to one
    without: the two sides never disagree."""
    if st.manifest.get("lexical") is None:
        if texts is not None:
            raise ValueError("texts: this index has no lexical side (build it with texts=... to have one)")
    elif texts is None and n:
        raise ValueError("texts: this index has a lexical side (BM25): give the new documents' texts")


def _lexical_change(
    w: IndexWriter, st: Snapshot, texts: list[str] | None, new_ids: list[Any], kind: str, gone: np.ndarray
) -> dict[str, Any] | None:
    """The lexical side of the version ``w`` writes: ``st``'s with the documents at positions
    ``gone`` removed and ``new_ids`` (with ``texts``) added; its manifest entry (None: the index
    has no lexical side). The caller checked ``texts`` against the index (:func:`_texts_fit`)."""
    entry = st.manifest.get("lexical")  # texts against it: checked by _texts_fit before any work
    if entry is None:
        return None
    add_keys = keys_of_ids(new_ids, kind)
    del_keys = st.keys_of(gone)
    if kind == "str" and add_keys.shape[0]:
        check_new_keys(add_keys, None, new_ids)
        fresh = np.setdiff1d(add_keys, del_keys)
        # a new id equal to a kept one was refused already: a kept key here is a hash collision
        if fresh.shape[0] and st.lexical is not None and st.lexical.count(fresh):
            hit = np.flatnonzero(st.key_positions(add_keys) >= 0)
            culprit = new_ids[int(hit[0])] if hit.shape[0] else new_ids[0]
            raise ValueError(
                f"ids: {culprit!r} shares a lexical key (a 63-bit hash) with a document of the index; "
                "rename it"
            )
    return write_lexical(
        w,
        st.manifest,
        analyzer_name=entry["analyzer"],
        store_texts=entry["store_texts"],
        key_kind=kind,
        add_keys=add_keys,
        add_texts=texts or [],
        delete_keys=del_keys,
        n_docs=st.n_docs - int(gone.shape[0]) + len(new_ids),
    )


def _absorbed(st: Snapshot, n_tokens: int, deleted: np.ndarray) -> int:
    """How many trailing segments a new segment of ``n_tokens`` absorbs (tiered merging, as
    Lucene's and every LSM tree's: a segment is merged into the new one while its live tokens are
    at most MERGE_FACTOR times the tokens gathered so far). Each token is copied O(log n) times
    over any sequence of adds, and the segment count stays logarithmic: search pays a fixed cost
    per segment (each kernel call scores the query against every centroid once)."""
    acc, k = n_tokens, 0
    for seg in reversed(st.segments):
        lo, hi = np.searchsorted(deleted, [seg.start, seg.start + seg.n_docs])
        if hi > lo:
            gone = deleted[lo:hi] - seg.start
            live_tok = seg.n_tokens - int(seg.doclens.numpy()[gone].sum(dtype=np.int64))
        else:
            live_tok = seg.n_tokens
        if live_tok > MERGE_FACTOR * acc:
            break
        acc += live_tok
        k += 1
    return k


def _copy_live(
    w: IndexWriter, st: Snapshot, segs: list[Any], live: np.ndarray, prefix: str
) -> tuple[list[np.ndarray], list[np.ndarray], list[Any], np.ndarray]:
    """Appends the live documents of ``segs`` (consecutive segments) to the residual and inv_norm
    arrays being written under ``prefix``, in position order, copying (never recompressing) in
    blocks of 1M tokens; returns their (codes blocks, doclens blocks, ids, old positions)."""
    codes, doclens, ids, kept = [], [], [], []
    ul = st.user_ids
    for seg in segs:
        keep = live[seg.start : seg.start + seg.n_docs]
        dl = seg.doclens.numpy()
        doclens.append(dl[keep])
        pos = np.flatnonzero(keep) + seg.start
        kept.append(pos)
        if ul is None:
            ids.extend(pos.tolist())
        elif isinstance(ul, np.ndarray):
            ids.extend(ul[pos].tolist())
        else:
            ids.extend(ul[i] for i in pos.tolist())
        tok_live = np.repeat(keep, dl)
        seg_codes, seg_res, seg_inv = seg.codes.numpy(), seg.residuals.numpy(), seg.inv_norm.numpy()
        for s in range(0, seg.n_tokens, 1 << 20):  # bounded memory
            k = tok_live[s : s + (1 << 20)]
            codes.append(seg_codes[s : s + (1 << 20)][k])
            w.append(prefix + "residuals", seg_res[s : s + (1 << 20)][k])
            w.append(prefix + "inv_norm", seg_inv[s : s + (1 << 20)][k])
    return codes, doclens, ids, np.concatenate(kept) if kept else np.zeros(0, np.int64)


def _write_segment(
    w: IndexWriter,
    st: Snapshot,
    prefix: str,
    absorb: list[Any],
    live: np.ndarray,
    new: tuple[np.ndarray, np.ndarray, list[Any]] | None,
    kind: str,
) -> tuple[dict[str, Any], np.ndarray, float | None]:
    """Writes one segment under ``prefix``: the live documents of the ``absorb`` segments, then
    the ``new`` (tokens, doclens, ids) compressed with the codec. Returns its manifest entry,
    the old positions of the copied documents (in their new order) and the new tokens' mean
    |residual| (None without new tokens)."""
    row = st.dim * st.nbits // 8
    w.begin_array(prefix + "residuals", np.uint8, (row,))
    w.begin_array(prefix + "inv_norm", np.float32)
    codes, doclens, ids, kept = _copy_live(w, st, absorb, live, prefix)
    err = None
    if new is not None:
        tokens, dls, new_ids = new
        a = _assigner(st)
        cents = a.centroids
        cutoffs, weights = st.bucket_cutoffs.numpy(), st.bucket_weights.cpu().numpy()
        err_sum = 0.0
        for s in range(0, tokens.shape[0], _BLOCK_TOKENS):
            block = np.ascontiguousarray(tokens[s : s + _BLOCK_TOKENS])
            c, r, inv = _codec.compress(block, cents, cutoffs, weights, st.nbits, a)
            codes.append(c)
            err_sum += float(np.abs(block - cents[c]).sum(dtype=np.float64))
            w.append(prefix + "residuals", r)
            w.append(prefix + "inv_norm", inv)
        err = err_sum / max(tokens.shape[0] * st.dim, 1)
        doclens.append(dls)
        ids.extend(new_ids)
    w.end_array(prefix + "residuals")
    w.end_array(prefix + "inv_norm")
    dtype = st.segments[0].codes.numpy().dtype
    all_codes = np.concatenate(codes).astype(dtype, copy=False) if codes else np.zeros(0, dtype)
    dls = np.concatenate(doclens).astype(np.int64) if doclens else np.zeros(0, np.int64)
    w.write_array(prefix + "codes", all_codes)
    w.write_array(prefix + "doclens", dls.astype(np.int32))
    ivf_offsets, ivf_docs = build_ivf(all_codes, dls, st.n_centroids)
    w.write_array(prefix + "ivf_offsets", ivf_offsets)
    w.write_array(prefix + "ivf_docs", ivf_docs)
    if kind != "none":
        write_ids(w, ids, int(dls.shape[0]), prefix, kind)
    entry: dict[str, Any] = {
        "prefix": prefix,
        "n_docs": int(dls.shape[0]),
        "n_tokens": int(all_codes.shape[0]),
    }
    errs = [(s.residual_error, s.n_tokens) for s in absorb if s.residual_error is not None]
    if err is not None:
        errs.append((err, new[0].shape[0]))
    if errs:  # token-weighted mean over what the segment holds from adds
        entry["residual_error"] = round(sum(e * t for e, t in errs) / max(sum(t for _, t in errs), 1), 7)
    return entry, kept, err


def add(
    index: Index,
    doc_tokens: Any,
    doclens: Any,
    ids: Sequence[Any] | None,
    metadata: Any,
    replace: Sequence[Any] | Callable[[Snapshot], Sequence[Any]] | None = None,
    texts: Any = None,
) -> list[Any]:
    """See :meth:`edgeplaid.Index.add` (``replace``: ids to delete in the same version, update;
    or a function of the newest snapshot giving them, upsert).

    The new segment absorbs the trailing segments (see :func:`_absorbed`), dropping their deleted
    documents; the segments before them, their positions and their files are untouched."""
    tokens, dls = check_batch(doc_tokens, doclens, index.dim)
    # pooled as the index's documents were (the factor never changes between versions)
    tokens, dls = pool_tokens(tokens, dls, pool_factor_of(index._state.manifest))
    n, n_tok = int(dls.shape[0]), int(tokens.shape[0])
    metas = check_metadata(metadata, n)  # before taking the lock: bad input costs nothing
    texts = None if texts is None else check_texts(texts, n)
    err = None
    with _writing(index) as (w, st):
        _texts_fit(st, texts, n)  # before any compression: a refused change costs nothing
        if callable(replace):
            replace = replace(st)
        replacing = st.positions(replace) if replace else np.zeros(0, np.int64)
        new_ids, kind = _ids_for_new(st, ids, n, replacing)
        deleted = np.union1d(st.deleted, replacing) if replacing.shape[0] else st.deleted
        k = _absorbed(st, n_tok, deleted)
        keep_segs, absorb = st.segments[: len(st.segments) - k], st.segments[len(st.segments) - k :]
        if st.id_kind == "none":  # the positions were the ids: store them, they must not move
            for seg in keep_segs:
                write_ids(w, np.arange(seg.start, seg.start + seg.n_docs), seg.n_docs, seg.prefix, "int")
        live = np.ones(st.n_positions, dtype=bool)
        live[deleted] = False
        # A merge of everything is a compaction: the result takes the unprefixed names.
        prefix = "" if not keep_segs else _next_prefix(st)
        entry, kept, err = _write_segment(w, st, prefix, absorb, live, (tokens, dls, new_ids), kind)
        start = st.n_positions if not absorb else absorb[0].start
        deleted = deleted[deleted < start]  # tombstones of absorbed segments are gone with them
        if deleted.shape[0]:
            w.write_array("deleted", _tombstones(deleted, start))
        segments = [*[dict(e) for e in segments_of(st.manifest)][: len(keep_segs)], entry]
        meta: dict[str, Any] | str | None = "keep"
        src = _metadata_src(st)
        has_new = any(x is not None for x in metas)
        if (absorb and src is not None) or has_new:
            renumber = None
            if absorb and src is not None:
                renumber = np.arange(st.n_positions, dtype=np.int64)
                renumber[start:] = -1
                renumber[kept] = start + np.arange(kept.shape[0], dtype=np.int64)
            first_new = start + kept.shape[0]
            rows = [(first_new + i, m) for i, m in enumerate(metas) if m is not None]
            write_metadata(w.path(METADATA_FILE), src, add=rows, renumber=renumber)
            meta = w.file_entry(METADATA_FILE)
        top = max(new_ids) + 1 if new_ids and kind == "int" else 0
        lexical = _lexical_change(w, st, texts, new_ids, kind, replacing)
        _finish(w, st, segments, kind, int(deleted.shape[0]), meta, next_id=top, lexical=lexical)
    if n_tok and err is not None and err > DRIFT_WARN * index.avg_residual:
        warnings.warn(
            f"edgeplaid: the {n} added documents drift from the index's codec (mean |residual| "
            f"{err:.4f} vs {index.avg_residual:.4f} at build); Index.rebuild() retrains it",
            stacklevel=3,
        )
    return new_ids


def delete(index: Index, ids: Sequence[Any] | None, where: str | None, params: Sequence[Any] | None) -> int:
    """See :meth:`edgeplaid.Index.delete`."""
    if (ids is None) == (where is None):
        raise ValueError("delete: give ids or where (one of them)")
    if where is None and params is not None:
        raise ValueError("params: given without a where filter")
    count = 0
    with _writing(index) as (w, st):
        if where is not None:
            pos = type(index)._where(st, where, params)
        else:
            pos = np.unique(st.positions(list(ids)))
        count = int(pos.shape[0])
        if not count:
            raise _Nothing
        deleted = np.union1d(st.deleted, pos)
        w.write_array("deleted", _tombstones(deleted, st.n_positions))
        lexical = _lexical_change(w, st, None, [], st.id_kind, pos)
        segments = [dict(e) for e in segments_of(st.manifest)]
        _finish(w, st, segments, st.id_kind, int(deleted.shape[0]), "keep", lexical=lexical)
    return count


def _tombstones(deleted: np.ndarray, n_positions: int) -> np.ndarray:
    """``deleted`` as written: (n,) int64, sorted, unique, in [0, n_positions). Checked before the
    version is committed (a load would refuse anything else: never commit what cannot load)."""
    d = np.asarray(deleted, dtype=np.int64)
    if not tombstones_ok(d, n_positions):
        raise RuntimeError(f"edgeplaid bug: tombstones not sorted, unique and in [0, {n_positions})")
    return d


class _Nothing(Exception):
    """Raised inside a writer to leave without writing anything."""


def _given_ids(ids: Any, missing: str) -> list[Any]:
    """The ids a change names, as a list of Python values (numpy scalars unwrapped); ValueError
    with ``missing`` when None, or naming duplicates."""
    if ids is None:
        raise ValueError(f"ids: {missing}")
    out = [
        i.item() if isinstance(i, np.generic) else i
        for i in (ids.tolist() if hasattr(ids, "tolist") else ids)
    ]
    if len(set(out)) != len(out):
        raise ValueError("ids: duplicate ids")
    return out


def update(
    index: Index, ids: Sequence[Any], doc_tokens: Any, doclens: Any, metadata: Any, texts: Any = None
) -> list[Any]:
    """See :meth:`edgeplaid.Index.update`."""
    ids = _given_ids(ids, "update needs the ids of the documents it replaces")
    return add(index, doc_tokens, doclens, ids, metadata, replace=ids, texts=texts)


def upsert(
    index: Index, ids: Sequence[Any], doc_tokens: Any, doclens: Any, metadata: Any, texts: Any = None
) -> tuple[int, int]:
    """See :meth:`edgeplaid.Index.upsert`."""
    ids = _given_ids(ids, "upsert needs the documents' ids")
    counts = [0, 0]

    def existing(st: Snapshot) -> list[Any]:
        old = [i for i, p in zip(ids, st.lookup(ids).tolist(), strict=True) if p >= 0]
        counts[:] = [len(ids) - len(old), len(old)]
        return old

    add(index, doc_tokens, doclens, ids, metadata, replace=existing, texts=texts)
    return counts[0], counts[1]


def set_metadata(index: Index, ids: Sequence[Any], metadata: Any) -> int:
    """See :meth:`edgeplaid.Index.set_metadata`: one new metadata file (rows replaced or
    dropped), every array linked."""
    ids = _given_ids(ids, "set_metadata needs the documents' ids")
    metas = check_metadata(metadata, len(ids))
    with _writing(index) as (w, st):
        pos = st.positions(ids)
        if not pos.shape[0]:
            raise _Nothing
        gone = np.array([m is None for m in metas], dtype=bool)
        rows = [(p, m) for p, m in zip(pos.tolist(), metas, strict=True) if m is not None]
        write_metadata(w.path(METADATA_FILE), _metadata_src(st), add=rows, drop=pos[gone])
        segments = [dict(e) for e in segments_of(st.manifest)]
        _finish(w, st, segments, st.id_kind, int(st.deleted.shape[0]), w.file_entry(METADATA_FILE))
    return len(ids)


def compact(index: Index) -> bool:
    """See :meth:`edgeplaid.Index.compact`."""
    wrote = False
    with _writing(index) as (w, st):
        if len(st.segments) == 1 and st.live is None:
            raise _Nothing
        wrote = True
        live = np.ones(st.n_positions, dtype=bool) if st.live is None else st.live
        # Positions move: an index whose ids were its positions keeps the old ones as ids.
        kind = "int" if st.id_kind == "none" else st.id_kind
        entry, kept, _ = _write_segment(w, st, "", st.segments, live, None, kind)
        meta: dict[str, Any] | str | None = None
        src = _metadata_src(st)
        if src is not None:
            renumber = np.full(st.n_positions, -1, dtype=np.int64)
            renumber[kept] = np.arange(kept.shape[0], dtype=np.int64)
            write_metadata(w.path(METADATA_FILE), src, renumber=renumber)
            meta = w.file_entry(METADATA_FILE)
        _finish(w, st, [entry], kind, 0, meta)
    return wrote


def rebuild(index: Index, *, n_centroids: int | None, seed: int, progress: bool) -> Index:
    """See :meth:`edgeplaid.Index.rebuild`."""
    from edgeplaid.ops import decompress_residuals

    index.refresh()
    st = index._state
    if st.n_docs == 0:
        raise ValueError("rebuild: the index holds no live document")
    ids = st.live_ids()
    metas = st.metadata.get(st.live_positions().tolist()) if st.metadata is not None else None

    def batches() -> Iterator[tuple[np.ndarray, np.ndarray, list[Any]]]:
        # Read inside the build's writer lock: a version switched in before the lock was taken is
        # seen here, and none can be switched in after; never rebuild from a stale version.
        if changed(index.path, st.manifest):
            raise IndexLockedError(f"{index.path}: the index changed while rebuild started; run it again")
        done = 0
        for seg in st.segments:
            live = (
                np.ones(seg.n_docs, bool) if st.live is None else st.live[seg.start : seg.start + seg.n_docs]
            )
            offs = seg.doc_offsets.cpu().numpy()
            dl = seg.doclens.numpy()
            for d0 in range(0, seg.n_docs, 4096):
                d1 = min(seg.n_docs, d0 + 4096)
                keep = live[d0:d1]
                if not keep.any():
                    continue
                a, b = int(offs[d0]), int(offs[d1])
                x = decompress_residuals(
                    seg.codes[a:b].cpu(),
                    seg.residuals[a:b].cpu(),
                    st.centroids.cpu(),
                    st.bucket_weights.cpu(),
                    st.nbits,
                ).float()
                tok_keep = torch.from_numpy(np.repeat(keep, dl[d0:d1]))
                n_keep = int(keep.sum())
                yield x[tok_keep].numpy(), dl[d0:d1][keep].astype(np.int64), ids[done : done + n_keep]
                done += n_keep

    from edgeplaid.index import _build

    _build.build(
        index.path,
        batches(),
        None,
        st.nbits,
        None,
        metadata=metas,
        n_centroids=n_centroids,
        seed=seed,
        overwrite=True,
        progress=progress,
        carry_from=st.manifest,
        next_id=_next_id(st),
        # the recorded fit, else the default (an older index's rebuild gets the better levels)
        buckets=_codec.recorded_bucket_fit(st.manifest) or _codec.DEFAULT_BUCKET_FIT,
        record_pool_factor=pool_factor_of(st.manifest),  # the decompressed tokens are pooled already
    )
    index.refresh()
    return index
