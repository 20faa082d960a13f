"""``edgeplaid.Index``: build, load (memory map), search, exhaustive search, add / delete / update /
compact (a living index), metadata filters, colbert-ai import."""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgeplaid.index import _build, _mutate
from edgeplaid.index._checks import open_checked
from edgeplaid.index._lexical import check_text
from edgeplaid.index._pooling import pool_factor_of
from edgeplaid.index._snapshot import Snapshot, open_snapshot
from edgeplaid.index._storage import FORMAT_VERSION, changed, rewrite_index, verify_checksums
from edgeplaid.ops import bundles
from edgeplaid.search._hybrid import (
    MODES,
    check_fusion,
    hybrid_search,
    hybrid_unions,
    lexical_search,
    to_device,
)
from edgeplaid.search._plaid import SearchParams, resolve_params


class SearchResult(tuple):
    """``(scores, ids)``: scores (nq, k) float32, ids (nq, k) int64 internal document positions
    of the index version searched (-1: none).

    Unpacks as a pair; ``user_ids`` maps the positions to the user's ids (None for -1) through the
    same version, so a concurrent add, delete or compaction never changes what they name.
    Positions are internal (compaction renumbers them); the ids are what to keep.
    """

    scores: torch.Tensor
    ids: torch.Tensor

    def __new__(cls, scores: torch.Tensor, ids: torch.Tensor, state: Snapshot) -> SearchResult:
        self = super().__new__(cls, (scores, ids))
        self.__dict__["_state"] = state
        return self

    @property
    def scores(self) -> torch.Tensor:  # type: ignore[override]
        return self[0]

    @property
    def ids(self) -> torch.Tensor:  # type: ignore[override]
        return self[1]

    @property
    def user_ids(self) -> list[list[Any]]:
        """(nq, k) nested list of the user's document ids (positions when none were given)."""
        return self.__dict__["_state"].to_user_ids(self[1])


def _joined(name: str, doc: str) -> property:
    return property(lambda self: self._state.joined(name), doc=doc)


def _state_attr(name: str) -> property:
    return property(lambda self: getattr(self._state, name))


class Index:
    """A PLAID index of ColBERT document token vectors, stored in edgeplaid's on-disk format.

    Create one with :meth:`build` or :meth:`import_colbert`, open it with :meth:`load`; change it
    with :meth:`add`, :meth:`delete`, :meth:`update` and :meth:`compact` (each one atomic, see
    :mod:`edgeplaid.index._mutate`).

    An index is one or more immutable segments sharing one codec, plus tombstones. Attributes
    (read-only views of the files of the loaded version): ``centroids (C, dim) float16`` (float32
    when stored so), ``bucket_cutoffs (2**nbits - 1,) float32``, ``bucket_weights (2**nbits,)
    float32``; over all segments, in position order: ``codes (n_tokens,) uint16 (<= 65,536
    centroids) or int32``, ``residuals (n_tokens, dim * nbits / 8) uint8``, ``inv_norm (n_tokens,)
    float32`` (1 / ||centroid + residual|| per token), ``doclens (n_positions,) int32``,
    ``doc_offsets (n_positions + 1,) int64`` (with several segments these are concatenated copies,
    made on first use; the searcher reads each segment's mapped files). ``n_docs`` counts live
    documents, ``n_positions`` every stored one (deleted included, until :meth:`compact`).
    """

    centroids = _state_attr("centroids")
    bucket_cutoffs = _state_attr("bucket_cutoffs")
    bucket_weights = _state_attr("bucket_weights")
    avg_residual = _state_attr("avg_residual")
    dim = _state_attr("dim")
    nbits = _state_attr("nbits")
    n_centroids = _state_attr("n_centroids")
    n_docs = _state_attr("n_docs")
    n_positions = _state_attr("n_positions")
    n_tokens = _state_attr("n_tokens")
    manifest = _state_attr("manifest")
    segments = _state_attr("segments")
    codes = _joined("codes", "(n_tokens,) codes over all segments")
    residuals = _joined("residuals", "(n_tokens, dim * nbits / 8) uint8 over all segments")
    inv_norm = _joined("inv_norm", "(n_tokens,) float32 over all segments")
    doclens = _joined("doclens", "(n_positions,) int32 over all segments")
    doc_offsets = _joined("doc_offsets", "(n_positions + 1,) int64 over all segments")

    def __init__(self, path: Path, state: Snapshot) -> None:
        self.path = path
        self.mmap = state.mmap
        self._state = state
        # Serialises the swaps of _state (refresh, to): two refreshes racing could otherwise
        # install the older of the versions they loaded last. Searches never take it.
        self._swap = threading.RLock()

    @property
    def device(self) -> torch.device:
        return self._state.device

    @property
    def ivf_offsets(self) -> np.ndarray:
        """(C + 1,) int64 IVF offsets of a one-segment index (each segment has its own)."""
        return self._one_segment("ivf_offsets")

    @property
    def ivf_docs(self) -> np.ndarray:
        """(n_ivf,) int32 IVF document positions of a one-segment index."""
        return self._one_segment("ivf_docs")

    def _one_segment(self, name: str) -> Any:
        segs = self._state.segments
        if len(segs) != 1:
            raise AttributeError(
                f"{name}: the index has {len(segs)} segments, each with its own (index.segments)"
            )
        return getattr(segs[0], name)

    @property
    def _searcher(self):  # the search pipeline of the loaded version (tests and benchmarks)
        return self._state.searcher

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
        metadata: Sequence[dict[str, Any] | None] | None = None,
        n_centroids: int | None = None,
        kmeans_iters: int = 4,
        sample_per_centroid: int = 16,
        seed: int = 0,
        overwrite: bool = False,
        progress: bool = True,
        compact_codes: bool = True,
        texts: Sequence[str] | None = None,
        store_texts: bool = True,
        analyzer: str = "plain",
        buckets: str = "lloyd_max",
        pool_factor: float = 1.0,
    ) -> Index:
        """Builds a PLAID index at ``path`` and returns it loaded (memory-mapped).

        Args:
            path: destination directory; written aside and renamed into place (atomic).
            doc_tokens: packed document vectors (n_tokens, dim) float32/float16 (torch or numpy),
                as ``ColBERT.encode_documents`` returns them; or, with ``doclens=None``, an
                iterable of batches ``(doc_tokens, doclens)`` / ``(doc_tokens, doclens, ids)``
                for a corpus larger than memory (spooled to disk once, bounded memory).
            doclens: (n_docs,) integer tokens per document, summing to n_tokens.
            nbits: residual bits per dimension (1, 2, 4 or 8; dim * nbits a multiple of 8).
            ids: optional user document ids, all int or all str, unique (n_docs,); without them
                the ids are 0 .. n_docs - 1. Ids are stable: add, delete, update and compaction
                never change them.
            metadata: optional per-document JSON objects (n_docs,) (None for a document without),
                stored in the index's SQLite file for ``where`` filters (see :meth:`search`).
            n_centroids: default 2 ** floor(log2(16 * sqrt(n_tokens))), as colbert-ai.
            kmeans_iters: Lloyd iterations; sample_per_centroid: k-means sample size per centroid
                (the sample is at most 2**19 tokens, 5% more held out for the residual codec).
            seed: sampling and initialisation seed (the build is deterministic).
            overwrite: replace an existing index at ``path``.
            progress: tqdm progress bars.
            compact_codes: store codes as uint16 (2 bytes a token) when n_centroids <= 65536,
                else int32; both are memory-mapped and read by the kernels as stored.
            texts: optional document texts (n_docs,) str: the index then also has a lexical
                side (BM25 by tantivy, :mod:`edgeplaid.index._lexical`) for ``mode="lexical"``
                and ``"hybrid"`` searches, kept in step with every change (``add``/``update``/
                ``upsert`` then need the new documents' texts).
            store_texts: keep the texts themselves too (:meth:`texts`); False indexes them only.
            analyzer: how texts become terms: ``"plain"`` (split on non-alphanumerics,
                lowercased) or ``"english"`` (the same, Snowball-stemmed).
            buckets: how the residual buckets are fitted on the held-out residuals:
                ``"lloyd_max"`` (levels of least squared error; on SciFact recall@10 against
                exact fp32 MaxSim 0.974 for search_exhaustive and 0.966 for search, where
                colbert-ai's rule gives 0.954 and 0.950) or ``"quantile"`` (colbert-ai's
                equal-mass bins). Same format, kernels and bytes either way.
            pool_factor: >= 1; above 1 each document keeps ceil(n_tokens / pool_factor) token
                vectors, near-duplicates merged (:func:`edgeplaid.index.pool_tokens`); later
                ``add``/``update``/``upsert`` pool alike. With ``nbits=2``, 1.5 stores 14.8 bytes
                per token instead of 33.7 (nbits 4, unpooled) at SciFact's nDCG@10 (0.6669
                against exact fp32 MaxSim's 0.6686); pooling costs ~2 ms per 256-token
                document at build.
        """
        timings = _build.build(
            path,
            doc_tokens,
            doclens,
            nbits,
            ids,
            metadata=metadata,
            n_centroids=n_centroids,
            kmeans_iters=kmeans_iters,
            sample_per_centroid=sample_per_centroid,
            seed=seed,
            overwrite=overwrite,
            progress=progress,
            compact_codes=compact_codes,
            texts=texts,
            store_texts=store_texts,
            analyzer=analyzer,
            buckets=buckets,
            pool_factor=pool_factor,
        )
        index = cls.load(path)
        index.build_timings = timings
        return index

    @classmethod
    def load(
        cls, path: str | os.PathLike, mmap: bool = True, verify: bool | None = None, *, device: Any = "cpu"
    ) -> Index:
        """Opens the index at ``path``.

        Always checks the manifest (its own checksum, a schema: keys, types, ranges, arrays), opens
        only regular files of the directory and checks their sizes first, and scans every array
        but the residuals once for what a search relies on (finite centroids and weights, codes
        below the centroid count, positive finite inv_norm, monotone doc and IVF offsets, IVF
        positions below each segment's n_docs, tombstones sorted and in range). Checksums:
        ``verify=None`` (default) checks every array's while the index is at most 1 GiB
        (``edgeplaid.index._checks.AUTO_VERIFY_BYTES``), above it all but the residuals' (those
        the scan reads anyway); ``verify=True`` every one (reads the whole index);
        ``verify=False`` none. Raises :class:`IndexFormatError` on a truncated, corrupt or
        mismatched index. Leftovers of a killed writer are cleaned up first.
        With ``mmap=True`` the codes, the residuals and the IVF are memory-mapped (the kernels
        read them in place). ``device`` ("cpu", "cuda", "cuda:N" or a torch.device) is where the
        index searches: on a GPU its arrays are copied there once (see :meth:`to`).
        """
        p = Path(path)
        index = open_checked(p, mmap, verify, lambda manifest: cls(p, open_snapshot(p, manifest, mmap)))
        return index.to(device)

    def to(self, device: Any) -> Index:
        """Moves the index to ``device`` in place and returns it: search then runs there (the C++
        kernels on CPU, the Triton kernels on CUDA). To a GPU the arrays are copied once; back to
        the CPU the files are mapped again (nothing copied back). Bundles are rebuilt from the
        arrays checked at load: nothing is re-validated."""
        dev = _device(device)
        with self._swap:
            st = self._state
            if dev == st.device:
                return self
            if dev.type == "cpu":
                self._state = (
                    st.host if st.host is not None else open_snapshot(self.path, st.manifest, self.mmap)
                )
                return self
            if not torch.cuda.is_available():
                raise ValueError(f"device: {dev} was asked for, but CUDA is not available here")
            self._state = st.to(dev)
            return self

    def upgrade(self) -> bool:
        """Moves an index written by an older edgeplaid to the current format, adding what it
        lacks (format_version 1: the per-token inv_norm, computed from the codes; 1 and 2: the
        manifest's own checksum; 1-3: the segment list), and reopens it. Returns whether anything
        was written. No file is modified in place: a new version of the directory (unchanged
        arrays hard-linked) is switched in atomically, as every write is (see
        :mod:`edgeplaid.index._storage`)."""
        st = self._state
        if int(st.manifest["format_version"]) >= FORMAT_VERSION:
            return False
        add = {}
        if "inv_norm" not in st.manifest["arrays"]:
            add["inv_norm"] = st.segments[0].inv_norm.cpu().numpy()
        rewrite_index(self.path, st.manifest, add)
        self.refresh()
        return True

    def verify(self) -> None:
        """Checks every file's checksum (arrays and metadata) against the manifest of the loaded
        version (IndexFormatError on a mismatch)."""
        verify_checksums(self.path, self._state.manifest)

    def _install(self, st: Snapshot) -> None:
        """Switches to ``st`` (a CPU snapshot of a version this object's writer just committed),
        on this index's device."""
        with self._swap:
            self._state = st if self.device.type == "cpu" else st.to(self.device)

    def refresh(self) -> bool:
        """Switches to the newest version of the index at its path if it changed since this one
        was loaded (another process or Index object added, deleted, compacted, overwrote or
        upgraded it; or a file was modified in place by another program); returns whether it did.

        Searches already running finish on the version they started with; the next ones see the
        new version. edgeplaid never modifies an index file in place, so an index another process
        replaces keeps searching its old files until refreshed. A file modified in place by
        something else would fault its memory map (SIGBUS) at the next search: refresh detects it
        (inode, size, mtime) and reloads, raising IndexFormatError if the files are now
        inconsistent; do not search an index whose refresh raised."""
        with self._swap:  # each refresh loads a version no older than the one it replaces
            if not changed(self.path, self._state.manifest):
                return False
            fresh = type(self).load(self.path, mmap=self.mmap, device=self.device)
            self._state = fresh._state
            return True

    # ------------------------------------------------------------------ ids and metadata

    @property
    def user_ids(self) -> np.ndarray | list[str] | None:
        """The ids of every stored position, deleted ones included: (n_positions,) int64, a list
        of str, or None (an index built without ids and never changed: the ids are positions)."""
        return self._state.user_ids

    def ids(self) -> list[Any]:
        """The ids of the live documents, in position order."""
        return self._state.live_ids()

    def to_user_ids(self, positions: Any) -> list[list[Any]]:
        """Document positions (nq, k) (-1: none) of the loaded version -> nested lists of user ids
        (None for -1)."""
        return self._state.to_user_ids(positions)

    def positions(self, user_ids: Sequence[Any]) -> np.ndarray:
        """User ids -> positions (n,) int64 of the live documents holding them in the loaded
        version (KeyError for an unknown or deleted id)."""
        return self._state.positions(user_ids)

    def __contains__(self, user_id: Any) -> bool:
        return bool(self._state.lookup([user_id])[0] >= 0)

    def metadata(self, ids: Sequence[Any]) -> list[dict[str, Any] | None]:
        """The metadata of the documents with these ids (None where a document has none)."""
        st = self._state
        pos = st.positions(ids)
        if st.metadata is None:
            return [None] * len(pos)
        return st.metadata.get(pos.tolist())

    def select(self, where: str, params: Sequence[Any] | None = None) -> list[Any]:
        """The ids of the live documents whose metadata satisfies ``where`` (see :meth:`search`)."""
        st = self._state
        pos = self._where(st, where, params)
        return st.to_user_ids(pos[None])[0]

    @staticmethod
    def _where(st: Snapshot, where: str, params: Sequence[Any] | None) -> np.ndarray:
        """Live positions (sorted int64) whose metadata matches ``where``."""
        if st.metadata is None:
            from edgeplaid.index._metadata import compile_where

            compile_where(where, params)  # a malformed filter is refused even without metadata
            return np.zeros(0, dtype=np.int64)
        pos = st.metadata.select(where, params)  # read-only: the reader keeps it
        # positions were checked below n_positions when the metadata was opened
        return pos[st.live[pos]] if st.live is not None and pos.shape[0] else pos.copy()

    # ------------------------------------------------------------------ changes

    def add(
        self,
        doc_tokens: Any,
        doclens: Any,
        ids: Sequence[Any] | None = None,
        metadata: Sequence[dict[str, Any] | None] | None = None,
        texts: Sequence[str] | None = None,
    ) -> list[Any]:
        """Adds documents as a new segment compressed with the index's codec (no k-means), in
        one atomic write; returns their ids.

        Args:
            doc_tokens: (n_tokens, dim) float32/float16 document vectors (torch or numpy).
            doclens: (n_docs,) integers summing to n_tokens.
            ids: new ids, unique and not in the index (same kind, int or str, as the index's);
                None: int ids continuing after the largest the index ever held (never reused).
            metadata: optional per-document JSON objects (or None each).
            texts: the documents' texts (n_docs,) str: required by an index with a lexical side
                (built with ``texts``), refused by one without.

        A segment whose mean residual magnitude exceeds the codec's by more than 50% warns that
        the new documents drift from the codec (``index.segments[-1].residual_error`` against
        ``index.avg_residual``); :meth:`rebuild` retrains it."""
        return _mutate.add(self, doc_tokens, doclens, ids, metadata, texts=texts)

    def delete(
        self,
        ids: Sequence[Any] | None = None,
        *,
        where: str | None = None,
        params: Sequence[Any] | None = None,
    ) -> int:
        """Deletes the documents with these ids, or those whose metadata matches ``where``, in one
        atomic write (tombstones: the data stays on disk until :meth:`compact`); returns how many
        were deleted. An unknown id raises KeyError and deletes nothing."""
        return _mutate.delete(self, ids, where, params)

    def update(
        self,
        ids: Sequence[Any],
        doc_tokens: Any,
        doclens: Any,
        metadata: Sequence[dict[str, Any] | None] | None = None,
        texts: Sequence[str] | None = None,
    ) -> list[Any]:
        """Replaces the documents with these ids (all must exist) by new vectors (and metadata,
        and texts: see :meth:`add`) under the same ids: delete + add in one atomic write. The
        replaced documents' metadata go with them: pass ``metadata`` again to keep it."""
        return _mutate.update(self, ids, doc_tokens, doclens, metadata, texts)

    def upsert(
        self,
        ids: Sequence[Any],
        doc_tokens: Any,
        doclens: Any,
        metadata: Sequence[dict[str, Any] | None] | None = None,
        texts: Sequence[str] | None = None,
    ) -> tuple[int, int]:
        """Adds the documents whose ids are new and replaces those whose ids exist, in one atomic
        write (a reader sees all of it or none); returns (added, updated). ``texts``: see
        :meth:`add`."""
        return _mutate.upsert(self, ids, doc_tokens, doclens, metadata, texts)

    def set_metadata(self, ids: Sequence[Any], metadata: Sequence[dict[str, Any] | None]) -> int:
        """Replaces the metadata of the documents with these ids (None removes a document's) in
        one atomic write, vectors untouched; returns how many. An unknown id raises KeyError and
        changes nothing."""
        return _mutate.set_metadata(self, ids, metadata)

    def compact(self) -> bool:
        """Merges every segment into one and drops deleted documents (codes and residuals copied,
        not recompressed; the IVF rebuilt; ids and metadata kept); returns whether anything was
        written. Positions change, ids do not."""
        return _mutate.compact(self)

    def rebuild(self, *, n_centroids: int | None = None, seed: int = 0, progress: bool = False) -> Index:
        """Retrains the codec (k-means, buckets) on the live documents, decompressed, and
        recompresses them into one segment, keeping ids and metadata: for an index whose added
        documents drifted from its codec. Costs a build; the decompressed vectors carry the old
        codec's error once more (rebuild from the original vectors with :meth:`build` when you
        have them)."""
        return _mutate.rebuild(self, n_centroids=n_centroids, seed=seed, progress=progress)

    # ------------------------------------------------------------------ search

    def _queries(self, queries: Any, queries_mask: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        q = torch.from_numpy(queries) if isinstance(queries, np.ndarray) else queries
        if not isinstance(q, torch.Tensor):
            raise ValueError(
                f"queries: expected a torch.Tensor or numpy.ndarray, got {type(queries).__name__}"
            )
        if q.dim() == 2:
            q = q[None]
        if q.dim() != 3 or q.shape[2] != self.dim:
            raise ValueError(
                f"queries: expected (n_queries, query_len, {self.dim}), got shape {tuple(q.shape)}"
            )
        # Queries follow the index (they are small): a query encoded on a GPU searches a CPU index.
        q = q.to(self.device, torch.float32).contiguous()
        m = queries_mask
        if m is not None:
            m = torch.from_numpy(m) if isinstance(m, np.ndarray) else m
            if m.dim() == 1:
                m = m[None]
            m = m.to(self.device, torch.bool).contiguous()
            if tuple(m.shape) != tuple(q.shape[:2]):
                raise ValueError(f"queries_mask: expected shape {tuple(q.shape[:2])}, got {tuple(m.shape)}")
        return q, m

    def _subsets(
        self, st: Snapshot, subset: Any, nq: int, where: str | None, params: Sequence[Any] | None
    ) -> list[np.ndarray | None] | None:
        """Per query None or the sorted unique live positions allowed (``subset`` and ``where``
        intersected; deleted positions dropped)."""
        allowed = None if where is None else self._where(st, where, params)
        if params is not None and where is None:
            raise ValueError("params: given without a where filter")
        if subset is None:
            return None if allowed is None else [allowed] * nq
        if isinstance(subset, (np.ndarray, torch.Tensor)) or (
            len(subset) > 0 and not isinstance(subset[0], (list, tuple, np.ndarray, torch.Tensor, type(None)))
        ):
            subset = [subset] * nq
        if len(subset) != nq:
            raise ValueError(f"subset: expected one allowed-id list per query ({nq}), got {len(subset)}")
        out: list[np.ndarray | None] = []
        n = st.n_positions
        for s in subset:
            if s is None:
                out.append(allowed)
                continue
            a = np.unique(np.asarray(s.cpu().numpy() if isinstance(s, torch.Tensor) else s, dtype=np.int64))
            if a.shape[0] and (a[0] < 0 or a[-1] >= n):
                raise ValueError(f"subset: document positions must be in [0, {n})")
            if st.live is not None and a.shape[0]:
                a = a[st.live[a]]
            if allowed is not None:
                a = np.intersect1d(a, allowed, assume_unique=True)
            out.append(a)
        return out

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
    ) -> SearchResult:
        """The k best live documents of each query: PLAID search (late interaction), BM25
        (lexical), or both fused (hybrid).

        Args:
            queries: (nq, Lq, dim) (or (Lq, dim)) float32/float16/bfloat16 query token vectors
                (None for a lexical search).
            k: results per query.
            queries_mask: (nq, Lq) bool, True for real tokens; None: every token counts.
            subset: allowed document positions (see :meth:`positions` for user ids): one sequence
                for every query, or a list with one sequence (or None) per query.
            where: a metadata filter, e.g. ``"year >= ? AND source = ?"`` with ``params=[2020,
                "pubmed"]`` (grammar: :func:`edgeplaid.index._metadata.compile_where`; values
                bound, never spliced into SQL). An allowed set of at most ``min(n_candidates,
                n_rerank)`` documents (160 at k <= 10) is scored whole (exact top-k among them);
                a larger one filters the IVF candidates.
            params: the values of the ``?`` of ``where``, in order.
            **knobs: ``n_probe`` (IVF cells per query token), ``threshold`` (centroid-score
                pruning, stage 2; None disables), ``n_candidates`` (kept after stage 2),
                ``n_rerank`` (kept after stage 3, scored from the codes), ``precision`` of that
                last stage (``"int8"``, the default, or ``"exact"`` fp32; see
                :func:`edgeplaid.ops.fused_decompress_maxsim`; default int8 on CPU, exact on a
                GPU, whose Triton kernel decodes; at int8 stage 1 is int8 too on AVX-512 VNNI
                CPUs, ``edgeplaid.ops.centroid_scores.stage1_precision``). Defaults scale with k
                (:func:`edgeplaid.search.default_params`).
            backend: the kernels' backend ("cpp", "triton", "reference"); None: by the index's
                device.
            text: the query text (one str, or nq of them) for the lexical side, an index built
                with ``texts`` (:meth:`build`).
            mode: ``"late"`` (PLAID), ``"lexical"`` (BM25 of ``text``) or ``"hybrid"`` (both,
                fused: :mod:`edgeplaid.search._hybrid`); None: hybrid when both ``queries`` and
                ``text`` are given, else the one given. Filters apply to both sides.
            alpha: hybrid only: the late side's weight in [0, 1] (the lexical side's is 1 -
                alpha); default 0.6 for relative_score, 0.5 for rrf.
            fusion: hybrid only: ``"relative_score"`` (min-max normalised scores, the default)
                or ``"rrf"`` (reciprocal rank fusion); see :mod:`edgeplaid.search._fusion`.

        Returns:
            SearchResult ``(scores (nq, k) float32, ids (nq, k) int64)`` on the index's device,
            best first; -inf / -1 where fewer than k documents were found; ``.user_ids`` maps ids
            to the user's ids. Deleted documents are never returned nor counted in k. Scores are
            MaxSim (late), BM25 (lexical) or the fused score (hybrid).
        """
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k: expected a positive int, got {k!r}")
        mode = _mode(mode, queries, text)
        st = self._state  # one version for the whole search and its result
        if mode == "late":
            if alpha is not None or fusion is not None:
                raise ValueError("alpha, fusion: only for mode='hybrid'")
            p: SearchParams = resolve_params(k, **knobs)
            q, m = self._queries(queries, queries_mask)
            subsets = self._subsets(st, subset, q.shape[0], where, params)
            scores, ids = st.searcher.search(bundles.queries(q, m), k, p, subsets, backend=backend)
            return SearchResult(scores, ids, st)
        if st.lexical is None:
            raise ValueError(f"mode: {mode!r} needs a lexical side; this index was built without texts")
        if mode == "lexical":
            if alpha is not None or fusion is not None or knobs or queries_mask is not None:
                raise ValueError("alpha, fusion, queries_mask and PLAID's knobs: not for mode='lexical'")
            texts = _texts(text, None)
            subsets = self._subsets(st, subset, len(texts), where, params)
            s, i = lexical_search(st.lexical, texts, k, subsets, st.keys_of, st.key_positions)
            return SearchResult(*to_device(s, i, st.device), st)
        f, a = check_fusion(fusion, alpha)
        p = resolve_params(k, **knobs)
        q, m = self._queries(queries, queries_mask)
        texts = _texts(text, q.shape[0])
        subsets = self._subsets(st, subset, q.shape[0], where, params)
        s, i = hybrid_search(
            st.searcher,
            st.lexical,
            bundles.queries(q, m),
            texts,
            k,
            p,
            subsets,
            st.keys_of,
            st.key_positions,
            fusion=f,
            alpha=a,
            backend=backend,
        )
        return SearchResult(*to_device(s, i, st.device), st)

    def hybrid_candidates(
        self,
        queries: Any,
        k: int = 10,
        queries_mask: Any = None,
        *,
        text: str | Sequence[str],
        where: str | None = None,
        params: Sequence[Any] | None = None,
        **knobs: Any,
    ) -> list[tuple[list[Any], np.ndarray, np.ndarray, np.ndarray]]:
        """What a hybrid :meth:`search` fuses, before fusion: each query's candidate union (the
        lexical side's best ``max(2k, 20)`` and PLAID's) with both sides' exact scores, as
        ``(user ids (n), late (n,) float32 MaxSim, lexical (n,) BM25, lists (n,) int8: on the
        lexical side's list (1), the late side's (2) or both (3))``. A sharded index fuses
        these over all its shards at once (:class:`edgeplaid.distributed.ShardedIndex`), since
        fused scores are relative to their union. Arguments as :meth:`search`."""
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k: expected a positive int, got {k!r}")
        st = self._state
        if st.lexical is None:
            raise ValueError("mode: 'hybrid' needs a lexical side; this index was built without texts")
        p = resolve_params(k, **knobs)
        q, m = self._queries(queries, queries_mask)
        texts = _texts(text, q.shape[0])
        subsets = self._subsets(st, None, q.shape[0], where, params)
        unions = hybrid_unions(
            st.searcher, st.lexical, bundles.queries(q, m), texts, k, p, subsets, st.keys_of, st.key_positions
        )
        return [(st.to_user_ids(u[None])[0], late, lex, lists) for u, late, lex, lists in unions]

    def texts(self, ids: Sequence[Any]) -> list[str | None]:
        """The stored texts of the documents with these ids (None for an unknown or deleted id);
        ValueError for an index without a lexical side or built with ``store_texts=False``."""
        st = self._state
        if st.lexical is None:
            raise ValueError("texts: this index has no lexical side (built without texts)")
        pos = st.lookup(list(ids.tolist() if hasattr(ids, "tolist") else ids))
        found = pos >= 0
        out: list[str | None] = [None] * pos.shape[0]
        for i, t in zip(
            np.flatnonzero(found).tolist(), st.lexical.texts(st.keys_of(pos[found])), strict=True
        ):
            out[i] = t
        return out

    @property
    def pool_factor(self) -> float:
        """The token pool factor of this index's documents (1: unpooled; see :meth:`build`)."""
        return pool_factor_of(self._state.manifest)

    @property
    def has_lexical(self) -> bool:
        """Whether this index has a lexical (BM25) side: built with ``texts``."""
        return self._state.lexical is not None

    @property
    def id_kind(self) -> str:
        """``"none"`` (ids are positions, 0 .. n - 1 at build), ``"int"`` or ``"str"``."""
        return self._state.id_kind

    @property
    def has_metadata(self) -> bool:
        """Whether any document of the loaded version has metadata (``where`` can match)."""
        return self._state.manifest.get("metadata") is not None

    def search_exhaustive(
        self,
        queries: Any,
        k: int = 10,
        queries_mask: Any = None,
        backend: str | None = None,
        *,
        where: str | None = None,
        params: Sequence[Any] | None = None,
    ) -> SearchResult:
        """Exact MaxSim of every query against every live document of the index (decompressed),
        or against those matching ``where``: the quality reference for :meth:`search`. Same
        arguments and result as :meth:`search`."""
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k: expected a positive int, got {k!r}")
        st = self._state
        q, m = self._queries(queries, queries_mask)
        allowed = None if where is None else self._where(st, where, params)
        scores, ids = st.searcher.exhaustive(bundles.queries(q, m), k, backend=backend, allowed=allowed)
        return SearchResult(scores, ids, st)

    # ------------------------------------------------------------------ misc

    @classmethod
    def import_colbert(
        cls, src_dir: str | os.PathLike, dst_path: str | os.PathLike, overwrite: bool = False
    ) -> Index:
        """Converts a PLAID index written by colbert-ai (Stanford ColBERT) to edgeplaid's format.

        Reads metadata.json / plan.json, centroids.pt, avg_residual.pt, buckets.pt,
        ``N.codes.pt``, ``N.residuals.pt``, ``doclens.N.json`` and ivf.pid.pt (or ivf.pt). The
        codes, bucket indices, centroids and bucket weights are carried over exactly (residual
        bits re-ordered to edgeplaid's bit order), so every document decompresses to the vectors
        colbert-ai decompresses. Needs torch only (not colbert-ai).
        """
        from edgeplaid.index._colbert import import_colbert

        import_colbert(Path(src_dir), Path(dst_path), overwrite=overwrite)
        return cls.load(dst_path)

    def nbytes(self) -> int:
        """Bytes of the index's own files on disk (manifest, arrays, ids, metadata): what the
        late-interaction side costs; the lexical side is :meth:`lexical_nbytes`."""
        return sum(f.stat().st_size for f in self.path.iterdir() if f.is_file())

    def lexical_nbytes(self) -> int:
        """Bytes of the lexical (BM25) side's files (0 without one), stored texts included."""
        from edgeplaid.index._lexical import lexical_bytes

        return lexical_bytes(self.manifest)

    def __len__(self) -> int:
        return self.n_docs

    def __repr__(self) -> str:
        st = self._state
        more = (
            f", segments={len(st.segments)}, deleted={st.deleted.shape[0]}"
            if len(st.segments) > 1 or st.live is not None
            else ""
        )
        return (
            f"Index({str(self.path)!r}, n_docs={st.n_docs}, n_tokens={st.n_tokens}, dim={st.dim}, "
            f"nbits={st.nbits}, n_centroids={st.n_centroids}{more})"
        )


def _mode(mode: str | None, queries: Any, text: Any) -> str:
    """The search mode asked for, or the one the given inputs imply; ValueError when they do not
    fit it."""
    if mode is None:
        mode = (
            "hybrid" if queries is not None and text is not None else "lexical" if queries is None else "late"
        )
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {', '.join(MODES)}, got {mode!r}")
    if mode != "lexical" and queries is None:
        raise ValueError(f"queries: mode={mode!r} needs the query vectors")
    if mode != "late" and text is None:
        raise ValueError(f"text: mode={mode!r} needs the query text")
    if mode == "late" and text is not None:
        raise ValueError("text: given with mode='late' (use mode='hybrid' or 'lexical')")
    return mode


def _texts(text: Any, nq: int | None) -> list[str]:
    """``text`` as a list of query texts, one per query (``nq``: the queries' count, if known)."""
    if isinstance(text, str):
        return [check_text(text, "text")] * (1 if nq is None else nq)
    texts = list(text) if isinstance(text, Sequence) else []
    if not texts or any(not isinstance(t, str) for t in texts):
        raise ValueError("text: expected a str or a non-empty sequence of str")
    if nq is not None and len(texts) != nq:
        raise ValueError(f"text: expected one text per query ({nq}), got {len(texts)}")
    return [check_text(t, f"text[{i}]") for i, t in enumerate(texts)]


def _device(device: Any) -> torch.device:
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device: expected 'cpu', 'cuda' or 'cuda:N', got {device!r}") from exc
    if d.type == "cuda" and d.index is None and torch.cuda.is_available():
        d = torch.device("cuda", torch.cuda.current_device())  # tensors report their index
    return d
