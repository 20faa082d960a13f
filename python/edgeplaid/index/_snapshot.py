"""One consistent version of an index in memory: its codec, segments, tombstones, ids, metadata.

An :class:`edgeplaid.Index` holds one :class:`Snapshot` and swaps it whole on ``refresh()``: a
search reads one snapshot from start to end (and its result maps positions to ids through that
same snapshot), so a concurrent writer, or a refresh from another thread, never mixes versions.
Every array of a snapshot is a view of the files of one directory version (memory-mapped); a
writer never modifies those files, so a snapshot stays valid while newer versions are written.
"""

from __future__ import annotations

import os
import sqlite3
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgeplaid.index import _codec
from edgeplaid.index._lexical import keys_of_ids, open_lexical
from edgeplaid.index._metadata import MetadataReader
from edgeplaid.index._storage import IndexFormatError, Manifest, open_array, segments_of
from edgeplaid.ops import bundles
from edgeplaid.search._lexical import LexicalSearcher
from edgeplaid.search._plaid import Ivf, Part, PlaidSearcher


@dataclass
class Segment:
    """One immutable segment (what one build or one ``add`` wrote), all arrays local to it.

    codes (n_tokens,) uint16/int32, residuals (n_tokens, dim * nbits / 8) uint8, inv_norm
    (n_tokens,) float32, doclens (n_docs,) int32, doc_offsets (n_docs + 1,) int64, ivf_offsets
    (C + 1,) int64, ivf_docs (n_ivf,) int32 (local positions); ``start`` is the global position
    of its first document.
    """

    prefix: str
    start: int
    n_docs: int
    n_tokens: int
    codes: torch.Tensor
    residuals: torch.Tensor
    inv_norm: torch.Tensor
    doclens: torch.Tensor
    doc_offsets: torch.Tensor
    ivf_offsets: np.ndarray
    ivf_docs: np.ndarray
    residual_error: float | None = None
    residuals_array: np.ndarray | None = None  # the numpy.memmap under residuals when mapped


@dataclass
class Snapshot:
    """Everything a search of one index version reads (see the module docstring)."""

    path: Path
    manifest: Manifest
    mmap: bool
    device: torch.device
    dim: int
    nbits: int
    n_centroids: int
    centroids: torch.Tensor
    bucket_cutoffs: torch.Tensor
    bucket_weights: torch.Tensor
    avg_residual: float
    segments: list[Segment]
    deleted: np.ndarray  # (n_deleted,) int64 sorted global positions
    live: np.ndarray | None  # (n_positions,) bool; None when nothing is deleted
    id_kind: str  # "none" (ids are positions), "int" or "str"
    user_ids: np.ndarray | list[str] | None  # per position, deleted ones included
    metadata: MetadataReader | None
    searcher: PlaidSearcher
    # A device copy's CPU snapshot (moving back to the CPU reopens nothing; None on the CPU).
    host: Snapshot | None = field(default=None, repr=False)
    lexical: LexicalSearcher | None = None  # the BM25 side (None: built without texts)
    _position: Any = field(default=None, repr=False)  # the id lookup, made on first use
    _joined: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    # str ids' lexical keys per segment, (prefix, ids checksum, n_docs) -> (keys (n_docs,) int64,
    # their order): made on first use, carried over from the previous version for kept segments
    _seg_keys: dict[tuple[str, str | None, int], tuple[np.ndarray, np.ndarray]] = field(
        default_factory=dict, repr=False
    )

    @property
    def n_positions(self) -> int:
        return sum(s.n_docs for s in self.segments)

    @property
    def n_docs(self) -> int:
        """Live documents."""
        return self.n_positions - int(self.deleted.shape[0])

    @property
    def n_tokens(self) -> int:
        return sum(s.n_tokens for s in self.segments)

    def joined(self, name: str) -> torch.Tensor:
        """Array ``name`` over all segments (the segment's own when there is one; a cached
        concatenation otherwise, doc_offsets made global)."""
        if len(self.segments) == 1:
            return getattr(self.segments[0], name)
        if name not in self._joined:
            if name == "doc_offsets":
                lens = torch.cat([s.doclens.to(torch.int64) for s in self.segments])
                out = torch.zeros(lens.shape[0] + 1, dtype=torch.int64, device=lens.device)
                torch.cumsum(lens, 0, out=out[1:])
            else:
                out = torch.cat([getattr(s, name) for s in self.segments])
            self._joined[name] = out
        return self._joined[name]

    # ------------------------------------------------------------------ ids

    def live_positions(self) -> np.ndarray:
        return np.arange(self.n_positions, dtype=np.int64) if self.live is None else np.flatnonzero(self.live)

    def _int_keys(self) -> tuple[np.ndarray, np.ndarray]:
        """(sorted int ids of the live documents, their positions): the id lookup of an int-id
        index, made once per snapshot in O(n log n) numpy (a dict of 500k Python ints cost 70 ms)."""
        if self._position is None:
            pos = self.live_positions()
            keys = self.user_ids[pos]  # type: ignore[index]
            order = np.argsort(keys, kind="stable")
            self._position = (keys[order], pos[order])
        return self._position  # type: ignore[return-value]

    def _str_map(self) -> dict[str, int]:
        if self._position is None:
            ul, live = self.user_ids, self.live
            self._position = {u: i for i, u in enumerate(ul) if live is None or live[i]}  # type: ignore[arg-type]
        return self._position  # type: ignore[return-value]

    def lookup(self, user_ids: Any) -> np.ndarray:
        """User ids -> (n,) int64 global positions of the live documents holding them, -1 for an
        id no live document holds (unknown, deleted, or not of the index's id type). O(n log N)
        for int ids (no per-position Python objects), a dict for str ids."""
        kind = self.id_kind
        if kind == "str":
            smap = self._str_map()
            return np.fromiter(
                (smap.get(u, -1) if isinstance(u, str) else -1 for u in user_ids), np.int64, len(user_ids)
            )
        if isinstance(user_ids, np.ndarray) and user_ids.dtype.kind in "iu" and user_ids.ndim == 1:
            q = user_ids.astype(np.int64)
            ok = np.ones(q.shape[0], bool) if user_ids.dtype != np.uint64 else user_ids < (1 << 63)
        else:
            vals = [u.item() if isinstance(u, np.generic) else u for u in user_ids]
            ok = np.array([type(u) is int and -(1 << 63) <= u < (1 << 63) for u in vals], dtype=bool).reshape(
                -1
            )
            q = np.array([u if k else 0 for u, k in zip(vals, ok.tolist(), strict=True)], np.int64).reshape(
                -1
            )
        if kind == "none":  # the ids are the positions
            ok &= (q >= 0) & (q < self.n_positions)
            out = np.where(ok, q, -1)
            if self.live is not None:
                out[ok] = np.where(self.live[q[ok]], q[ok], -1)
            return out
        keys, pos = self._int_keys()
        at = np.searchsorted(keys, q)
        hit = ok & (at < keys.shape[0])
        hit[hit] = keys[at[hit]] == q[hit]
        return np.where(hit, pos[np.minimum(at, max(keys.shape[0] - 1, 0))] if keys.shape[0] else -1, -1)

    def positions(self, user_ids: Any) -> np.ndarray:
        """User ids -> global positions (n,) int64; KeyError naming the first unknown (or deleted) id."""
        out = self.lookup(user_ids)
        missing = np.flatnonzero(out < 0)
        if missing.shape[0]:
            u = user_ids[int(missing[0])]
            raise KeyError(f"ids: {u!r} is not a document of this index")
        return out

    def to_user_ids(self, positions: Any) -> list[list[Any]]:
        """Positions (rows of ints, -1: none) -> the ids they hold (None for -1); O(what is asked)."""
        u = self.user_ids
        if isinstance(positions, torch.Tensor):
            positions = positions.cpu().numpy()
        pos = np.asarray(positions, dtype=np.int64)
        if pos.ndim == 1:
            pos = pos[None]
        if u is None:
            got = pos.tolist()
        elif isinstance(u, np.ndarray):
            got = u[np.maximum(pos, 0)].tolist()
        else:
            return [[u[p] if p >= 0 else None for p in row] for row in pos.tolist()]
        none = pos < 0
        if none.any():
            for r, c in zip(*np.nonzero(none), strict=True):
                got[r][c] = None
        return got

    # ------------------------------------------------------------------ lexical keys

    def _segment_keys(self, seg: Segment) -> tuple[np.ndarray, np.ndarray]:
        """(keys (n_docs,) int64 of a str-id segment's documents, argsort of them), made once per
        segment: a version that keeps the segment reuses them (O(change) per version)."""
        tag = (seg.prefix, _ids_sum(self.manifest, seg.prefix), seg.n_docs)
        got = self._seg_keys.get(tag)
        if got is None:
            keys = keys_of_ids(self.user_ids[seg.start : seg.start + seg.n_docs], "str")  # type: ignore[index]
            got = self._seg_keys[tag] = (keys, np.argsort(keys, kind="stable"))
        return got

    def keys_of(self, positions: np.ndarray) -> np.ndarray:
        """Global positions (n,) -> the lexical keys (n,) int64 of their documents (see
        :mod:`edgeplaid.index._lexical`: the id itself, or a hash of a str id)."""
        pos = np.asarray(positions, dtype=np.int64)
        u = self.user_ids
        if u is None:
            return pos.copy()
        if isinstance(u, np.ndarray):
            return u[pos].astype(np.int64)
        # the asked ids hashed (O(asked)): a one-document change must not hash a whole segment
        return keys_of_ids([u[p] for p in pos.tolist()], "str")

    def key_positions(self, keys: np.ndarray) -> np.ndarray:
        """Lexical keys (n,) int64 -> global positions (n,) int64 of the live documents holding
        them, -1 for none. Str ids: a binary search in each segment's sorted keys (a deleted
        document's key may live again in a later segment: only a live one counts)."""
        if self.id_kind != "str":
            return self.lookup(keys)
        out = np.full(keys.shape[0], -1, dtype=np.int64)
        for seg in self.segments:
            if seg.n_docs == 0:
                continue
            sk, order = self._segment_keys(seg)
            at = np.minimum(np.searchsorted(sk, keys, sorter=order), seg.n_docs - 1)
            local = order[at]
            hit = sk[local] == keys
            pos = seg.start + local
            if self.live is not None:
                hit &= self.live[pos]
            out[hit] = pos[hit]
        return out

    def live_ids(self) -> list[Any]:
        """The user ids of every live document, in position order."""
        pos = self.live_positions()
        u = self.user_ids
        if u is None:
            return pos.tolist()
        if isinstance(u, np.ndarray):
            return u[pos].tolist()
        return u if self.live is None else [u[i] for i in pos.tolist()]

    # ------------------------------------------------------------------ device

    def to(self, device: torch.device) -> Snapshot:
        """A copy of this snapshot whose arrays live on ``device`` (CUDA: copied once)."""

        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(device)

        segs = [
            Segment(
                s.prefix,
                s.start,
                s.n_docs,
                s.n_tokens,
                move(s.codes),
                move(s.residuals),
                move(s.inv_norm),
                s.doclens,
                move(s.doc_offsets),
                s.ivf_offsets,
                s.ivf_docs,
                s.residual_error,
            )
            for s in self.segments
        ]
        out = Snapshot(
            self.path,
            self.manifest,
            self.mmap,
            device,
            self.dim,
            self.nbits,
            self.n_centroids,
            move(self.centroids),
            self.bucket_cutoffs,
            move(self.bucket_weights),
            self.avg_residual,
            segs,
            self.deleted,
            self.live,
            self.id_kind,
            self.user_ids,
            self.metadata,
            self.searcher,
        )
        out.searcher = _searcher(out)
        out.host = self if self.host is None else self.host
        out.lexical, out._seg_keys = self.lexical, self._seg_keys
        return out


def metadata_path(m: Manifest) -> str | None:
    """The metadata file of the version ``m`` was read from, through that version's directory
    descriptor (a writer switching in a new directory cannot redirect it); None without one."""
    entry = m.get("metadata")
    return None if entry is None else f"/proc/self/fd/{m.dir.fd}/{entry['file']}"


def _open_metadata(path: Path, m: Manifest, n_positions: int) -> MetadataReader | None:
    """The metadata reader of the version ``m`` was read from (None without metadata).

    SQLite opens a file by path (it even resolves /proc/self/fd links to the path they name), so
    this version's file is reached through its directory's descriptor and, once open, the
    directory is checked to be still the one at the index's path: then SQLite cannot have opened
    a newer version's file. When it was replaced meanwhile, IndexFormatError (a load starts again
    on the new version); never a fall back to ``path``, which may name another version's file."""
    entry = m.get("metadata")
    if entry is None:
        return None
    src = metadata_path(m)
    if not os.path.isdir("/proc/self/fd"):  # no procfs: by path, the check below still holds
        src = str(path / entry["file"])
    try:
        reader = MetadataReader(src, n_positions)
    except (FileNotFoundError, sqlite3.Error) as e:
        raise IndexFormatError(f"{path}: cannot open the metadata of this version ({e})") from e
    if m.dir.removed():
        reader.close()
        raise IndexFormatError(f"{path}: the index was replaced while its metadata was opened")
    return reader


def _searcher(st: Snapshot) -> PlaidSearcher:
    codec = bundles.codec(st.centroids, st.bucket_weights, st.nbits)
    parts = []
    for s in st.segments:
        docs = bundles.compressed_docs(
            s.codes, s.residuals, s.doc_offsets, s.inv_norm, codec=codec, device=codec.centroids.device
        )
        live = None if st.live is None else st.live[s.start : s.start + s.n_docs]
        if live is not None and live.all():
            live = None
        live_t = None if live is None else torch.from_numpy(live).to(st.device)
        ivf = Ivf(torch.from_numpy(s.ivf_offsets).to(st.device), torch.from_numpy(s.ivf_docs).to(st.device))
        parts.append(Part(docs, ivf, s.start, live, live_t))
    return PlaidSearcher(codec, parts=parts)


def _ids_sum(m: Manifest, prefix: str) -> str | None:
    entry = m["arrays"].get(prefix + "ids_str")
    return None if entry is None else entry["checksum"]


def open_snapshot(
    path: Path, m: Manifest, mmap: bool, trusted: bool = False, previous: Snapshot | None = None
) -> Snapshot:
    """The snapshot of the index version ``m`` was read from (arrays checked by the caller's
    load-time scan; here only dtypes and shapes against the manifest), on the CPU. ``trusted``:
    a version this process's writer just committed (its new ids were checked against the old
    ones), so the O(n log n) check that no two live documents share an id is skipped, and the
    string ids of the segments it kept from ``previous`` (the version it changed) are reused
    rather than decoded again (O(changed segments), not O(index), per change)."""
    kept_ids: dict[tuple[str, str | None, int], list[str]] = {}
    if trusted and previous is not None and previous.id_kind == "str" and m.get("ids") == "str":
        for seg in previous.segments:
            key = (seg.prefix, _ids_sum(previous.manifest, seg.prefix), seg.n_docs)
            kept_ids[key] = previous.user_ids[seg.start : seg.start + seg.n_docs]  # type: ignore[index]
    dim, nbits, nc = int(m["dim"]), int(m["nbits"]), int(m["n_centroids"])

    def arr(name: str, dtypes: tuple[str, ...], shape: tuple[int, ...]) -> np.ndarray:
        a = open_array(path, m, name, mmap)
        if a.dtype.str not in dtypes or a.shape != shape:
            raise IndexFormatError(
                f"{path}: {name} is {a.dtype.str} {a.shape}, expected {'/'.join(dtypes)} {shape} "
                f"(dim={dim}, nbits={nbits}, n_centroids={nc})"
            )
        return a

    if nbits not in (1, 2, 4, 8) or dim < 1 or dim * nbits % 8:
        raise IndexFormatError(f"{path}: bad dim={dim} / nbits={nbits} in the manifest")
    nb = 1 << nbits
    cents = arr("centroids", ("<f2", "<f4"), (nc, dim))
    # Kept in the stored dtype (fp16 from our builds and colbert-ai's): the kernels widen in
    # registers, and a fp32 copy would be memory outside the index's own bytes.
    centroids = torch.from_numpy(cents)
    cutoffs = torch.from_numpy(np.array(arr("bucket_cutoffs", ("<f4",), (nb - 1,))))
    weights = torch.from_numpy(np.array(arr("bucket_weights", ("<f4",), (nb,))))
    avg_residual = float(np.array(arr("avg_residual", ("<f4",), (1,)))[0])
    kind = m.get("ids", "none")
    if kind not in ("none", "int", "str"):
        raise IndexFormatError(f"{path}: unknown ids kind {kind!r}")
    segments: list[Segment] = []
    id_parts: list[Any] = []
    start = 0
    for entry in segments_of(m):
        p, n_docs, n_tokens = entry["prefix"], int(entry["n_docs"]), int(entry["n_tokens"])
        codes = arr(p + "codes", ("<u2", "<i4"), (n_tokens,))
        # uint16 (<= 65,536 centroids) and int32 codes both stay mapped: the kernels read either
        # width. Not scanned here (that would read them all): the kernels check every code they
        # dereference, and verify=True checks the bytes.
        res = arr(p + "residuals", ("|u1", "<u1"), (n_tokens, dim * nbits // 8))
        if p + "inv_norm" in m["arrays"]:
            # Mapped like the codes: the kernels reject a token whose inv_norm is not positive
            # and finite, and verify=True checks the bytes.
            inv = torch.from_numpy(arr(p + "inv_norm", ("<f4",), (n_tokens,)))
        elif int(m["format_version"]) >= 2:
            raise IndexFormatError(
                f"{path}: the manifest lacks inv_norm (format_version {m['format_version']})"
            )
        else:
            warnings.warn(
                f"edgeplaid: {path} is a format_version 1 index: computing inv_norm on load "
                "(Index.upgrade() stores it once)",
                stacklevel=4,
            )
            inv = torch.from_numpy(
                _codec.inv_norms(codes, res, cents.astype(np.float32), weights.numpy(), nbits)
            )
        dl = arr(p + "doclens", ("<i4",), (n_docs,))
        offsets = np.zeros(n_docs + 1, dtype=np.int64)
        np.cumsum(dl, out=offsets[1:])
        if n_docs and (int(dl.min()) < 0 or int(offsets[-1]) != n_tokens):
            raise IndexFormatError(
                f"{path}: {p}doclens do not sum to n_tokens={n_tokens}: the index is corrupt"
            )
        ivf_offsets = np.array(arr(p + "ivf_offsets", ("<i8",), (nc + 1,)))
        n_ivf = int(m["arrays"].get(p + "ivf_docs", {}).get("shape", [0])[0])
        # A plain ndarray over the map: slicing a numpy.memmap builds a memmap object per slice
        # (measured 0.1 ms per query in the candidate gathering).
        ivf_docs = arr(p + "ivf_docs", ("<i4",), (n_ivf,)).view(np.ndarray)
        io = ivf_offsets
        if io[0] != 0 or io[-1] != n_ivf or (nc and bool((io[1:] < io[:-1]).any())):
            raise IndexFormatError(
                f"{path}: IVF offsets are not a CSR over {n_ivf} entries: the index is corrupt"
            )
        segments.append(
            Segment(
                p,
                start,
                n_docs,
                n_tokens,
                torch.from_numpy(codes),
                torch.from_numpy(res),
                inv,
                torch.from_numpy(np.array(dl)),
                torch.from_numpy(offsets),
                ivf_offsets,
                ivf_docs,
                entry.get("residual_error"),
                res,
            )
        )
        if kind == "int":
            id_parts.append(np.array(arr(p + "ids", ("<i8",), (n_docs,))))
        elif kind == "str" and (p, _ids_sum(m, p), n_docs) in kept_ids:
            # A segment the previous version already held (the same ids file): its decoded ids.
            id_parts.extend(kept_ids[(p, _ids_sum(m, p), n_docs)])
        elif kind == "str":
            raw = open_array(path, m, p + "ids_str", False).tobytes()
            so = arr(p + "ids_str_offsets", ("<i8",), (n_docs + 1,))
            if int(so[-1]) != len(raw):
                raise IndexFormatError(f"{path}: string ids are truncated")
            id_parts.extend(
                raw[a:b].decode("utf-8") for a, b in zip(so[:-1].tolist(), so[1:].tolist(), strict=True)
            )
        start += n_docs
    n_positions = start
    user_ids: np.ndarray | list[str] | None = None
    if kind == "int":
        user_ids = np.concatenate(id_parts) if id_parts else np.zeros(0, np.int64)
    elif kind == "str":
        user_ids = id_parts
    n_deleted = int(m.get("n_deleted", 0))
    deleted = np.array(arr("deleted", ("<i8",), (n_deleted,))) if n_deleted else np.zeros(0, np.int64)
    live = None
    if n_deleted:
        live = np.ones(n_positions, dtype=bool)
        live[deleted] = False
    if user_ids is not None and len(segments) > 1 and not trusted:
        # Within a segment ids are unique (checked at load); across segments a deleted document's
        # id may live again in a later one (update), but two live documents never share one.
        live_ids = user_ids[live] if isinstance(user_ids, np.ndarray) and live is not None else user_ids
        if isinstance(live_ids, list) and live is not None:
            live_ids = [u for u, keep in zip(live_ids, live.tolist(), strict=True) if keep]
        n_unique = np.unique(live_ids).shape[0] if isinstance(live_ids, np.ndarray) else len(set(live_ids))
        if n_unique != len(live_ids):
            raise IndexFormatError(f"{path}: two live documents share an id: the index is corrupt")
    metadata = _open_metadata(path, m, n_positions)
    st = Snapshot(
        path,
        m,
        mmap,
        torch.device("cpu"),
        dim,
        nbits,
        nc,
        centroids,
        cutoffs,
        weights,
        avg_residual,
        segments,
        deleted,
        live,
        kind,
        user_ids,
        metadata,
        None,  # type: ignore[arg-type]
    )
    st.searcher = _searcher(st)
    st.lexical = open_lexical(path, m)
    if trusted and previous is not None and kind == "str":
        kept = {(g.prefix, _ids_sum(m, g.prefix), g.n_docs) for g in segments}
        st._seg_keys = {t: v for t, v in previous._seg_keys.items() if t in kept}  # lexical keys kept
    if previous is not None and _codes_key(previous) == _codes_key(st):
        # The same segments (a delete, a metadata change): the codes stages 2-3 read joined are
        # the previous version's, not joined again (a 130 MB copy at 66M tokens).
        st.searcher.reuse_codes(previous.searcher)
    return st


def _codes_key(st: Snapshot) -> list[tuple[str, int, str]]:
    return [
        (s.prefix, s.n_tokens, st.manifest["arrays"][s.prefix + "codes"]["checksum"]) for s in st.segments
    ]
