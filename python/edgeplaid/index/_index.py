"""``edgeplaid.Index``: build, load (memory map), search, exhaustive search, colbert-ai import."""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgeplaid.index import _build, _codec
from edgeplaid.index._checks import open_checked
from edgeplaid.index._storage import (
    FORMAT_VERSION,
    IndexFormatError,
    changed,
    open_array,
    rewrite_index,
    verify_checksums,
)
from edgeplaid.ops import bundles
from edgeplaid.search._plaid import Ivf, PlaidSearcher, SearchParams, resolve_params


class SearchResult(tuple):
    """``(scores, ids)``: scores (nq, k) float32, ids (nq, k) int64 document positions (-1: none).

    Unpacks as a pair; ``user_ids`` maps the positions to the ids given at build (None for -1).
    """

    scores: torch.Tensor
    ids: torch.Tensor

    def __new__(cls, scores: torch.Tensor, ids: torch.Tensor, index: Index) -> SearchResult:
        self = super().__new__(cls, (scores, ids))
        self.__dict__["_index"] = index
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
        return self.__dict__["_index"].to_user_ids(self[1])


class Index:
    """A PLAID index of ColBERT document token vectors, stored in edgeplaid's on-disk format.

    Create one with :meth:`build` or :meth:`import_colbert`, open it with :meth:`load`.
    Attributes (read-only views of the files): ``centroids (C, dim) float16`` (float32 when
    stored so),
    ``bucket_cutoffs (2**nbits - 1,) float32``, ``bucket_weights (2**nbits,) float32``,
    ``codes (n_tokens,) uint16 (<= 65,536 centroids) or int32``,
    ``residuals (n_tokens, dim * nbits / 8) uint8``, ``inv_norm (n_tokens,) float32``
    (1 / ||centroid + residual|| per token, for scoring from the codes),
    ``doclens (n_docs,) int32``, ``doc_offsets (n_docs + 1,) int64``, ``ivf_offsets (C + 1,) int64``,
    ``ivf_docs (n_ivf,) int32``.
    """

    def __init__(self, path: Path, manifest: dict[str, Any], mmap: bool) -> None:
        self.device = torch.device("cpu")
        self.path = path
        self.manifest = manifest
        self.mmap = mmap
        self.dim = int(manifest["dim"])
        self.nbits = int(manifest["nbits"])
        self.n_docs = int(manifest["n_docs"])
        self.n_tokens = int(manifest["n_tokens"])
        self.n_centroids = int(manifest["n_centroids"])
        self._user_ids: np.ndarray | list[str] | None = None
        self._position: dict[Any, int] | None = None
        self._open(mmap)

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
        n_centroids: int | None = None,
        kmeans_iters: int = 4,
        sample_per_centroid: int = 16,
        seed: int = 0,
        overwrite: bool = False,
        progress: bool = True,
        compact_codes: bool = True,
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
            ids: optional user document ids, all int or all str, unique (n_docs,).
            n_centroids: default 2 ** floor(log2(16 * sqrt(n_tokens))), as colbert-ai.
            kmeans_iters: Lloyd iterations; sample_per_centroid: k-means sample size per centroid
                (the sample is at most 2**19 tokens, 5% more held out for the residual codec).
            seed: sampling and initialisation seed (the build is deterministic).
            overwrite: replace an existing index at ``path``.
            progress: tqdm progress bars.
            compact_codes: store codes as uint16 (2 bytes a token) when n_centroids <= 65536,
                else int32; both are memory-mapped and read by the kernels as stored.
        """
        timings = _build.build(
            path,
            doc_tokens,
            doclens,
            nbits,
            ids,
            n_centroids=n_centroids,
            kmeans_iters=kmeans_iters,
            sample_per_centroid=sample_per_centroid,
            seed=seed,
            overwrite=overwrite,
            progress=progress,
            compact_codes=compact_codes,
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
        positions below n_docs). Checksums: ``verify=None`` (default) checks every array's while
        the index is at most 1 GiB (``edgeplaid.index._checks.AUTO_VERIFY_BYTES``), above it all
        but the residuals' (those the scan reads anyway); ``verify=True`` every one (reads the
        whole index); ``verify=False`` none. Raises :class:`IndexFormatError` on a truncated,
        corrupt or mismatched index. Leftovers of a killed writer are cleaned up first.
        With ``mmap=True`` the codes, the residuals and the IVF are memory-mapped (the kernels
        read them in place). ``device`` ("cpu", "cuda", "cuda:N" or a torch.device) is where the
        index searches: on a GPU its arrays are copied there once (see :meth:`to`).
        """
        p = Path(path)
        index = open_checked(p, mmap, verify, lambda manifest: cls(p, manifest, mmap))
        return index.to(device)

    def to(self, device: Any) -> Index:
        """Moves the index to ``device`` in place and returns it: search then runs there (the C++
        kernels on CPU, the Triton kernels on CUDA). To a GPU the arrays are copied once; back to
        the CPU the files are mapped again (nothing copied back). Bundles are rebuilt from the
        arrays checked at load: nothing is re-validated."""
        dev = _device(device)
        if dev == self.device:
            return self
        if dev.type == "cpu":
            self.device = dev
            self._open(self.mmap)
            return self
        if not torch.cuda.is_available():
            raise ValueError(f"device: {dev} was asked for, but CUDA is not available here")
        codec, ivf = self._searcher.codec, self._searcher.ivf

        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(dev)

        self.centroids = move(self.centroids)
        self.bucket_weights = move(self.bucket_weights)
        self.codes = move(self.codes)
        self.residuals = move(self.residuals)
        self.inv_norm = move(self.inv_norm)
        self.doc_offsets = move(self.doc_offsets)
        self.device = dev
        self._searcher = PlaidSearcher(
            bundles.Codec(self.centroids, self.bucket_weights, codec.nbits),
            bundles.CompressedDocs(self.codes, self.residuals, self.doc_offsets, self.inv_norm),
            Ivf(move(ivf.offsets), move(ivf.docs)),
        )
        return self

    def upgrade(self) -> bool:
        """Moves an index written by an older edgeplaid to the current format, adding what it
        lacks (format_version 1: the per-token inv_norm, computed from the codes; 1 and 2: the
        manifest's own checksum), and reopens it. Returns whether anything was written. No file
        is modified in place: a new version of the directory (unchanged arrays hard-linked) is
        switched in atomically, as every write is (see :mod:`edgeplaid.index._storage`)."""
        if int(self.manifest["format_version"]) >= FORMAT_VERSION:
            return False
        add = {}
        if "inv_norm" not in self.manifest["arrays"]:
            add["inv_norm"] = self.inv_norm.cpu().numpy()
        rewrite_index(self.path, self.manifest, add)
        self.refresh()
        return True

    def verify(self) -> None:
        """Checks every file's checksum against the manifest (IndexFormatError on a mismatch)."""
        verify_checksums(self.path, self.manifest)

    def refresh(self) -> bool:
        """Reopens the index if the one at its path changed since it was loaded (overwritten,
        upgraded, or a file modified in place by another program); returns whether it did.

        edgeplaid never modifies an index file in place, so an index another process replaces
        keeps searching its old files until refreshed. A file modified in place by something
        else would fault its memory map (SIGBUS) at the next search: refresh detects it (inode,
        size, mtime) and reloads, raising IndexFormatError if the files are now inconsistent;
        do not search an index whose refresh raised."""
        if not changed(self.path, self.manifest):
            return False
        fresh = type(self).load(self.path, mmap=self.mmap, device=self.device)
        self.__dict__.update(fresh.__dict__)
        return True

    def _open(self, mmap: bool) -> None:
        p, m = self.path, self.manifest

        def arr(name: str, dtypes: tuple[str, ...], shape: tuple[int, ...]) -> np.ndarray:
            a = open_array(p, m, name, mmap)
            if a.dtype.str not in dtypes or a.shape != shape:
                raise IndexFormatError(
                    f"{p}: {name} is {a.dtype.str} {a.shape}, expected {'/'.join(dtypes)} {shape} "
                    f"(dim={self.dim}, nbits={self.nbits}, n_docs={self.n_docs}, n_tokens={self.n_tokens}, "
                    f"n_centroids={self.n_centroids})"
                )
            return a

        if self.nbits not in (1, 2, 4, 8) or self.dim < 1 or self.dim * self.nbits % 8:
            raise IndexFormatError(f"{p}: bad dim={self.dim} / nbits={self.nbits} in the manifest")
        nc, nb = self.n_centroids, 1 << self.nbits
        cents = arr("centroids", ("<f2", "<f4"), (nc, self.dim))
        # Kept in the stored dtype (fp16 from our builds and colbert-ai's): the kernels widen in
        # registers, and a fp32 copy would be memory outside the index's own bytes.
        self.centroids = torch.from_numpy(cents)
        self.bucket_cutoffs = torch.from_numpy(np.array(arr("bucket_cutoffs", ("<f4",), (nb - 1,))))
        self.bucket_weights = torch.from_numpy(np.array(arr("bucket_weights", ("<f4",), (nb,))))
        self.avg_residual = float(np.array(arr("avg_residual", ("<f4",), (1,)))[0])
        codes = arr("codes", ("<u2", "<i4"), (self.n_tokens,))
        # uint16 (<= 65,536 centroids) and int32 codes both stay mapped: the kernels read either
        # width. Not scanned here (that would read them all): the kernels check every code they
        # dereference, and verify=True checks the bytes.
        self.codes = torch.from_numpy(codes)
        res = arr("residuals", ("|u1", "<u1"), (self.n_tokens, self.dim * self.nbits // 8))
        self.residuals = torch.from_numpy(res)
        self._residuals_array = res  # the numpy.memmap under self.residuals when mmap
        if "inv_norm" in m["arrays"]:
            # Mapped like the codes. Not scanned here: the kernels reject a token whose inv_norm is
            # not positive and finite, and verify=True checks the bytes.
            self.inv_norm = torch.from_numpy(arr("inv_norm", ("<f4",), (self.n_tokens,)))
        elif int(m["format_version"]) >= 2:
            raise IndexFormatError(f"{p}: the manifest lacks inv_norm (format_version {m['format_version']})")
        else:
            warnings.warn(
                f"edgeplaid: {p} is a format_version 1 index: computing inv_norm on load "
                "(Index.upgrade() stores it once)",
                stacklevel=3,
            )
            self.inv_norm = torch.from_numpy(
                _codec.inv_norms(
                    codes, res, cents.astype(np.float32), self.bucket_weights.numpy(), self.nbits
                )
            )
        dl = arr("doclens", ("<i4",), (self.n_docs,))
        self.doclens = torch.from_numpy(np.array(dl))
        offsets = np.zeros(self.n_docs + 1, dtype=np.int64)
        np.cumsum(dl, out=offsets[1:])
        if self.n_docs and (int(dl.min()) < 0 or int(offsets[-1]) != self.n_tokens):
            raise IndexFormatError(
                f"{p}: doclens do not sum to n_tokens={self.n_tokens}: the index is corrupt"
            )
        self.doc_offsets = torch.from_numpy(offsets)
        self.ivf_offsets = np.array(arr("ivf_offsets", ("<i8",), (nc + 1,)))
        n_ivf = int(m["arrays"].get("ivf_docs", {}).get("shape", [0])[0])
        # A plain ndarray over the map: slicing a numpy.memmap builds a memmap object per slice
        # (measured 0.1 ms per query in the candidate gathering).
        self.ivf_docs = arr("ivf_docs", ("<i4",), (n_ivf,)).view(np.ndarray)
        io = self.ivf_offsets
        if io[0] != 0 or io[-1] != n_ivf or (nc and bool((io[1:] < io[:-1]).any())):
            raise IndexFormatError(
                f"{p}: IVF offsets are not a CSR over {n_ivf} entries: the index is corrupt"
            )
        kind = m.get("ids", "none")
        if kind == "int":
            self._user_ids = np.array(arr("ids", ("<i8",), (self.n_docs,)))
        elif kind == "str":
            raw = open_array(p, m, "ids_str", False).tobytes()
            so = arr("ids_str_offsets", ("<i8",), (self.n_docs + 1,))
            if int(so[-1]) != len(raw):
                raise IndexFormatError(f"{p}: string ids are truncated")
            self._user_ids = [
                raw[a:b].decode("utf-8") for a, b in zip(so[:-1].tolist(), so[1:].tolist(), strict=True)
            ]
        elif kind != "none":
            raise IndexFormatError(f"{p}: unknown ids kind {kind!r}")
        # The bundles the kernels receive, checked here once (the offsets were just derived from
        # the doclens; the kernels check every code and id they dereference).
        codec = bundles.codec(self.centroids, self.bucket_weights, self.nbits)
        docs = bundles.compressed_docs(
            self.codes,
            self.residuals,
            self.doc_offsets,
            self.inv_norm,
            codec=codec,
            device=codec.centroids.device,
        )
        self._searcher = PlaidSearcher(
            codec, docs, Ivf(torch.from_numpy(self.ivf_offsets), torch.from_numpy(self.ivf_docs))
        )

    # ------------------------------------------------------------------ ids

    @property
    def user_ids(self) -> np.ndarray | list[str] | None:
        """The ids given at build: (n_docs,) int64, a list of str, or None."""
        return self._user_ids

    def to_user_ids(self, positions: Any) -> list[list[Any]]:
        """Document positions (nq, k) (-1: none) -> nested lists of user ids (None for -1)."""
        pos = positions.tolist() if hasattr(positions, "tolist") else positions
        u = self._user_ids
        if u is None:
            return [[p if p >= 0 else None for p in row] for row in pos]
        if isinstance(u, np.ndarray):
            ul = u.tolist()
            return [[ul[p] if p >= 0 else None for p in row] for row in pos]
        return [[u[p] if p >= 0 else None for p in row] for row in pos]

    def positions(self, user_ids: Sequence[Any]) -> np.ndarray:
        """User ids -> document positions (n,) int64 (KeyError for an unknown id)."""
        if self._user_ids is None:
            return np.asarray(user_ids, dtype=np.int64)
        if self._position is None:
            ul = self._user_ids.tolist() if isinstance(self._user_ids, np.ndarray) else self._user_ids
            self._position = {u: i for i, u in enumerate(ul)}
        return np.array([self._position[u] for u in user_ids], dtype=np.int64)

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

    def _subsets(self, subset: Any, nq: int) -> list[np.ndarray | None] | None:
        if subset is None:
            return None
        if isinstance(subset, (np.ndarray, torch.Tensor)) or (
            len(subset) > 0 and not isinstance(subset[0], (list, tuple, np.ndarray, torch.Tensor, type(None)))
        ):
            subset = [subset] * nq
        if len(subset) != nq:
            raise ValueError(f"subset: expected one allowed-id list per query ({nq}), got {len(subset)}")
        out: list[np.ndarray | None] = []
        for s in subset:
            if s is None:
                out.append(None)
                continue
            a = np.unique(np.asarray(s.cpu().numpy() if isinstance(s, torch.Tensor) else s, dtype=np.int64))
            if a.shape[0] and (a[0] < 0 or a[-1] >= self.n_docs):
                raise ValueError(f"subset: document positions must be in [0, {self.n_docs})")
            out.append(a)
        return out

    def search(
        self,
        queries: Any,
        k: int = 10,
        queries_mask: Any = None,
        subset: Any = None,
        backend: str | None = None,
        **params: Any,
    ) -> SearchResult:
        """PLAID search: the k best documents of each query.

        Args:
            queries: (nq, Lq, dim) (or (Lq, dim)) float32/float16/bfloat16 query token vectors.
            k: results per query.
            queries_mask: (nq, Lq) bool, True for real tokens; None: every token counts.
            subset: allowed document positions (see :meth:`positions` for user ids): one sequence
                for every query, or a list with one sequence (or None) per query.
            **params: ``n_probe`` (IVF cells per query token), ``threshold`` (centroid-score
                pruning, stage 2; None disables), ``n_candidates`` (kept after stage 2),
                ``n_rerank`` (kept after stage 3, scored from the codes), ``precision`` of that
                last stage (``"int8"``, the default, or ``"exact"`` fp32; see
                :func:`edgeplaid.ops.fused_decompress_maxsim`; default int8 on CPU, exact on a
                GPU, whose Triton kernel decodes). Defaults scale with k
                (:func:`edgeplaid.search.default_params`).
            backend: the kernels' backend ("cpp", "triton", "reference"); None: by the index's
                device.

        Returns:
            SearchResult ``(scores (nq, k) float32, ids (nq, k) int64)`` on the index's device,
            best first; -inf / -1
            where fewer than k documents were found; ``.user_ids`` maps ids to the user's ids.
        """
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k: expected a positive int, got {k!r}")
        p: SearchParams = resolve_params(k, **params)
        q, m = self._queries(queries, queries_mask)
        scores, ids = self._searcher.search(
            bundles.queries(q, m), k, p, self._subsets(subset, q.shape[0]), backend=backend
        )
        return SearchResult(scores, ids, self)

    def search_exhaustive(
        self, queries: Any, k: int = 10, queries_mask: Any = None, backend: str | None = None
    ) -> SearchResult:
        """Exact MaxSim of every query against every document of the index (decompressed):
        the quality reference for :meth:`search`. Same arguments and result as :meth:`search`."""
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k: expected a positive int, got {k!r}")
        q, m = self._queries(queries, queries_mask)
        scores, ids = self._searcher.exhaustive(bundles.queries(q, m), k, backend=backend)
        return SearchResult(scores, ids, self)

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
        """Bytes of every file of the index on disk (manifest included)."""
        return sum(f.stat().st_size for f in self.path.iterdir() if f.is_file())

    def __len__(self) -> int:
        return self.n_docs

    def __repr__(self) -> str:
        return (
            f"Index({str(self.path)!r}, n_docs={self.n_docs}, n_tokens={self.n_tokens}, dim={self.dim}, "
            f"nbits={self.nbits}, n_centroids={self.n_centroids})"
        )


def _device(device: Any) -> torch.device:
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device: expected 'cpu', 'cuda' or 'cuda:N', got {device!r}") from exc
    if d.type == "cuda" and d.index is None and torch.cuda.is_available():
        d = torch.device("cuda", torch.cuda.current_device())  # tensors report their index
    return d
