"""Typed argument bundles of the ops, validated once by their factory and trusted after.

Each bundle mirrors a struct of ``csrc/cpu/ops.h`` (``Queries``, ``PackedDocs``, ``Codec``,
``Compressed`` + offsets, ``Candidates``). The factories below (:func:`queries`,
:func:`packed_docs`, :func:`codec`, :func:`compressed_docs`, :func:`candidates`) are the one place
that checks an op's arguments: dtypes, ranks, shapes, devices and, for CPU tensors, the data
itself (offsets monotone from 0 to n_tokens, candidate ids in range), which costs O(n_docs). A
factory handed a bundle returns it unchanged after O(1) compatibility checks (dim, device, row
counts): an :class:`edgeplaid.Index` builds its bundles once at load, and no query re-scans
them. A bundle made by hand with the dataclass constructor is trusted as it is; the kernels
still check every id and offset they dereference, so a bad one raises ``ValueError``, never
crashes.

The one definition of the residual widths (:data:`NBITS`) and of the scoring precisions
(:data:`PRECISIONS`) lives here too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from edgeplaid.ops import _validate as v

NBITS = v.NBITS
# The last stage's arithmetic when scoring from the codes: fp32, or int8 dot products
# (see edgeplaid.ops.fused_decompress_maxsim).
PRECISIONS = ("exact", "int8")


def precision(p: Any) -> str:
    """``p`` if it names a precision, else ValueError naming the argument."""
    if p not in PRECISIONS:
        raise ValueError(f"precision: expected one of {', '.join(map(repr, PRECISIONS))}, got {p!r}")
    return p


@dataclass(frozen=True, eq=False)
class Queries:
    """Query token vectors.

    data: (nq, lq, dim) float32, float16 or bfloat16, contiguous.
    mask: (nq, lq) bool (True = the token counts) or None (every token counts).
    """

    data: torch.Tensor
    mask: torch.Tensor | None = None

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def shape(self) -> tuple[int, int, int]:
        nq, lq, dim = self.data.shape
        return nq, lq, dim

    def __getitem__(self, rows: slice) -> Queries:
        """The queries of ``rows`` (a slice of the first axis: still contiguous, still valid)."""
        return Queries(self.data[rows], None if self.mask is None else self.mask[rows])


@dataclass(frozen=True, eq=False)
class PackedDocs:
    """Ragged documents packed back to back: document n is tokens[offsets[n] : offsets[n + 1]].

    tokens: (n_tokens, dim) float32, float16 or bfloat16, contiguous.
    offsets: (n_docs + 1,) int64, non-decreasing from 0 to n_tokens.
    """

    tokens: torch.Tensor
    offsets: torch.Tensor

    @property
    def n_docs(self) -> int:
        return self.offsets.shape[0] - 1


@dataclass(frozen=True, eq=False)
class Codec:
    """PLAID's residual codec: token = normalize(centroids[code] + bucket_weights[bits]).

    centroids: (n_centroids, dim) float32, float16 or bfloat16.
    bucket_weights: (2**nbits,) float32. nbits: one of :data:`NBITS`, dim * nbits % 8 == 0.
    """

    centroids: torch.Tensor
    bucket_weights: torch.Tensor
    nbits: int

    @property
    def dim(self) -> int:
        return self.centroids.shape[1]

    @property
    def n_centroids(self) -> int:
        return self.centroids.shape[0]

    @property
    def row_bytes(self) -> int:
        """Bytes of one token's packed residual."""
        return self.dim * self.nbits // 8


@dataclass(frozen=True, eq=False)
class CompressedDocs:
    """Documents in PLAID's compressed form, packed like :class:`PackedDocs`.

    codes: (n_tokens,) uint16, int32 or int64 centroid ids.
    residuals: (n_tokens, dim * nbits / 8) uint8, bit order of decompress_residuals.
    offsets: (n_docs + 1,) int64, non-decreasing from 0 to n_tokens.
    inv_norm: (n_tokens,) float32, 1 / ||centroids[code] + residual||, or None.
    """

    codes: torch.Tensor
    residuals: torch.Tensor
    offsets: torch.Tensor
    inv_norm: torch.Tensor | None = None

    @property
    def n_docs(self) -> int:
        return self.offsets.shape[0] - 1

    @property
    def n_tokens(self) -> int:
        return self.codes.shape[0]


@dataclass(frozen=True, eq=False)
class DocCodes:
    """What stages 2-3 (:func:`edgeplaid.ops.centroid_interaction`) read of compressed documents:
    codes (n_tokens,) uint16/int32/int64 and offsets (n_docs + 1,) int64, non-decreasing from 0 to
    n_tokens. A living index joins its segments' codes into one of these, so that one kernel call
    scores candidates from every segment."""

    codes: torch.Tensor
    offsets: torch.Tensor

    @property
    def n_docs(self) -> int:
        return self.offsets.shape[0] - 1


@dataclass(frozen=True, eq=False)
class CentroidScores:
    """Stage 1's scores ⟨queries[q, i], centroids[c]⟩, float32 (finite when its inputs were
    checked), as :func:`edgeplaid.ops.centroid_scores` returns them, in one of two layouts:

    * token-major (``query_len`` None): scores (nq, lq, n_centroids);
    * centroid-major (``query_len`` = lq): scores (nq, n_centroids, stride), stride = lq rounded
      up to :data:`TABLE_LANES`; lane j of a row is the query's j-th valid token (valid tokens
      compacted, the other lanes zero). One centroid's scores for every token of a query are
      contiguous: the layout the C++ stages 2-4 read, so they use it in place instead of
      transposing the token-major one (``layout="centroid"`` of centroid_scores).
    """

    scores: torch.Tensor
    query_len: int | None = None

    @property
    def centroid_major(self) -> bool:
        return self.query_len is not None

    @property
    def shape(self) -> tuple[int, int, int]:
        """(nq, lq, n_centroids) in either layout."""
        if self.query_len is None:
            nq, lq, n_cent = self.scores.shape
            return nq, lq, n_cent
        return self.scores.shape[0], self.query_len, self.scores.shape[1]

    def token_major(self, mask: torch.Tensor | None = None) -> torch.Tensor:
        """(nq, lq, n_centroids) float32: the scores in the token-major layout, masked tokens 0.
        ``mask`` (nq, lq) bool: the queries' mask, which a centroid-major table compacted."""
        if self.query_len is None:
            return self.scores
        nq, lq, n_cent = self.shape
        if mask is None:
            return self.scores[:, :, :lq].transpose(1, 2)
        out = self.scores.new_zeros(nq, lq, n_cent)
        for i in range(nq):
            valid = mask[i].nonzero().squeeze(1)
            out[i, valid] = self.scores[i, :, : valid.shape[0]].T
        return out


def centroid_major(scores: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Token-major (nq, lq, n_centroids) scores -> the centroid-major table (nq, n_centroids,
    table_stride(lq)) of :class:`CentroidScores`, each query's valid tokens compacted."""
    nq, lq, n_cent = scores.shape
    table = scores.new_zeros(nq, n_cent, table_stride(lq))
    for i in range(nq):
        valid = torch.arange(lq, device=scores.device) if mask is None else mask[i].nonzero().squeeze(1)
        table[i, :, : valid.shape[0]] = scores[i, valid].T
    return table


# Lanes of a centroid-major CentroidScores row: its stride is lq rounded up to this (csrc/cpu/ops.h
# kTableLanes, a multiple of every CPU vector width).
TABLE_LANES = 16


def table_stride(query_len: int) -> int:
    """The stride of a centroid-major CentroidScores of query_len-token queries."""
    return max(1, -(-query_len // TABLE_LANES)) * TABLE_LANES


@dataclass(frozen=True, eq=False)
class Candidates:
    """Per-query candidate documents: ids (nq, nc) int64, -1 = padding (scores -inf), every other
    id in [0, n_docs) of the documents they were checked against."""

    ids: torch.Tensor
    n_docs: int


# ---------------------------------------------------------------------------------- factories


def queries(x: Any, mask: Any = None) -> Queries:
    """A validated :class:`Queries` from (nq, lq, dim) vectors and an optional (nq, lq) mask."""
    if isinstance(x, Queries):
        if mask is not None:
            raise ValueError("queries_mask: give the mask inside the Queries bundle, not beside it")
        return x
    q = v.queries(x)
    return Queries(q, v.mask(mask, "queries_mask", q.shape[0], q.shape[1], q.device))


def packed_docs(tokens: Any, offsets: Any = None, *, dim: int, device: torch.device) -> PackedDocs:
    """A validated :class:`PackedDocs` of ``dim``-wide tokens on ``device``."""
    if isinstance(tokens, PackedDocs):
        if offsets is not None:
            raise ValueError("doc_offsets: give the offsets inside the PackedDocs bundle, not beside it")
        v.check_size(tokens.tokens, "doc_tokens", 1, dim, "dim of queries")
        v.check_device("doc_tokens", tokens.tokens, device)
        return tokens
    t = v.float_tensor(tokens, "doc_tokens", 2, "(n_tokens, dim)")
    v.check_size(t, "doc_tokens", 1, dim, "dim of queries")
    v.check_device("doc_tokens", t, device)
    if offsets is None:
        raise ValueError("doc_offsets: expected (n_docs + 1,) int64 offsets, got None")
    return PackedDocs(t, v.offsets(offsets, t.shape[0], device))


def codec(
    centroids: Any,
    bucket_weights: Any = None,
    nbits: Any = None,
    *,
    dim: int | None = None,
    device: torch.device | None = None,
) -> Codec:
    """A validated :class:`Codec`; bucket_weights are kept as fp32 (widened once here)."""
    if isinstance(centroids, Codec):
        if bucket_weights is not None or nbits is not None:
            raise ValueError("bucket_weights: give them (and nbits) inside the Codec bundle, not beside it")
        c = centroids
        if dim is not None:
            v.check_size(c.centroids, "centroids", 1, dim, "dim")
        if device is not None:
            v.check_device("centroids", c.centroids, device)
        return c
    cents, weights, n = v.codec(centroids, bucket_weights, nbits, dim, device)
    return Codec(cents, weights.float().contiguous(), n)


def compressed_docs(
    codes: Any,
    residuals: Any = None,
    offsets: Any = None,
    inv_norm: Any = None,
    *,
    codec: Codec,
    device: torch.device,
) -> CompressedDocs:
    """A validated :class:`CompressedDocs` for ``codec`` on ``device``."""
    if isinstance(codes, CompressedDocs):
        if residuals is not None or offsets is not None:
            raise ValueError("residuals: give them (and doc_offsets) inside the CompressedDocs bundle")
        d = codes
        v.check_device("codes", d.codes, device)
        v.check_size(d.residuals, "residuals", 1, codec.row_bytes, "dim * nbits / 8 bytes")
        if inv_norm is not None:
            d = CompressedDocs(d.codes, d.residuals, d.offsets, _inv_norm(inv_norm, d.n_tokens, device))
        return d
    c = v.codes(codes, device)
    res = v.residuals(residuals, c.shape[0], codec.row_bytes, device)
    if offsets is None:
        raise ValueError("doc_offsets: expected (n_docs + 1,) int64 offsets, got None")
    off = v.offsets(offsets, c.shape[0], device)
    inv = None if inv_norm is None else _inv_norm(inv_norm, c.shape[0], device)
    return CompressedDocs(c, res, off, inv)


def _inv_norm(x: Any, n_tokens: int, device: torch.device) -> torch.Tensor:
    inv = v.as_tensor(x, "inv_norm")
    v.check_rank(inv, "inv_norm", 1, "(n_tokens,)")
    v.check_dtype(inv, "inv_norm", (torch.float32,))
    v.check_contiguous(inv, "inv_norm")
    v.check_size(inv, "inv_norm", 0, n_tokens, "one per code")
    v.check_device("inv_norm", inv, device)
    return inv


def centroid_scores(
    x: Any, *, nq: int | None, lq: int | None, n_centroids: int | None, device: torch.device | None
) -> CentroidScores:
    """A validated :class:`CentroidScores` of the given sizes (None: any) on ``device``: a bundle
    (either layout, O(1) checks), or a token-major (nq, lq, n_centroids) float32 tensor."""
    if isinstance(x, CentroidScores):
        bundle, cs = x, x.scores
    else:
        cs = v.float_tensor(x, "centroid_scores", 3, "(n_queries, query_len, n_centroids)")
        v.check_dtype(cs, "centroid_scores", (torch.float32,))
        v.check_finite(cs, "centroid_scores")
        bundle = CentroidScores(cs)
    names = ("n_queries", "query_len", "n_centroids")
    for axis, want, what in zip(range(3), (nq, lq, n_centroids), names, strict=True):
        if want is None:
            continue
        if not bundle.centroid_major:
            v.check_size(cs, "centroid_scores", axis, want, what)
        elif bundle.shape[axis] != want:
            raise ValueError(
                f"centroid_scores: expected {what} {want}, got {bundle.shape[axis]} (centroid-major, "
                f"shape {tuple(cs.shape)}, query_len {bundle.query_len})"
            )
    if device is not None:
        v.check_device("centroid_scores", cs, device)
    return bundle


def candidates(x: Any, n_queries: int, n_docs: int, device: torch.device) -> Candidates | None:
    """A validated :class:`Candidates` (or None: every document) for n_queries x n_docs."""
    if x is None:
        return None
    if isinstance(x, Candidates):
        if x.n_docs != n_docs:
            raise ValueError(f"candidates: checked against {x.n_docs} documents, these are {n_docs}")
        v.check_size(x.ids, "candidates", 0, n_queries, "n_queries")
        v.check_device("candidates", x.ids, device)
        return x
    ids = v.candidates(x, n_queries, n_docs, device)
    assert ids is not None
    return Candidates(ids, n_docs)


def ids_of(c: Candidates | None) -> torch.Tensor | None:
    """The id tensor of a candidates bundle (None: every document)."""
    return None if c is None else c.ids
