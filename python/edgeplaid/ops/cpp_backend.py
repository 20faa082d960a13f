"""The ``cpp`` backend: CPU tensors handed to ``edgeplaid._C`` as zero-copy numpy views.

Queries (small) are widened to fp32 here; documents, centroids and codes cross in their own
dtype (bf16 as a uint16 view) and are widened in registers by the kernels.
"""

from __future__ import annotations

import numpy as np
import torch

from edgeplaid._native import C
from edgeplaid.ops.bundles import (
    Candidates,
    CentroidScores,
    Codec,
    CompressedDocs,
    PackedDocs,
    Queries,
    ids_of,
)

_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def _np(t: torch.Tensor | None) -> np.ndarray | None:
    if t is None:
        return None
    if t.dtype == torch.bfloat16:
        return t.view(torch.uint16).numpy()
    return t.numpy()


def _q(queries: torch.Tensor) -> np.ndarray:
    return queries.float().contiguous().numpy()


Tensor = torch.Tensor


def maxsim(
    queries: Tensor,
    documents: Tensor,
    queries_mask: Tensor | None = None,
    documents_mask: Tensor | None = None,
) -> Tensor:
    out = C.maxsim_padded(
        _q(queries), _np(queries_mask), _np(documents), _DTYPE_NAMES[documents.dtype], _np(documents_mask)
    )
    return torch.from_numpy(out)


def maxsim_packed(q: Queries, docs: PackedDocs, cand: Candidates | None) -> Tensor:
    out = C.maxsim_packed(
        _q(q.data),
        _np(q.mask),
        _np(docs.tokens),
        _DTYPE_NAMES[docs.tokens.dtype],
        _np(docs.offsets),
        _np(ids_of(cand)),
    )
    return torch.from_numpy(out)


def centroid_scores(
    q: Queries, centroids: Tensor, n_probe: int, centroid_major: bool
) -> tuple[Tensor, Tensor]:
    scores, ids = C.centroid_scores(
        _q(q.data),
        _np(q.mask),
        _np(centroids),
        _DTYPE_NAMES[centroids.dtype],
        int(n_probe),
        centroid_major=centroid_major,
    )
    return torch.from_numpy(scores), torch.from_numpy(ids)


def decompress_residuals(codes: Tensor, residuals: Tensor, codec: Codec) -> Tensor:
    name = _DTYPE_NAMES[codec.centroids.dtype]
    out = C.decompress_residuals(
        _np(codes), _np(residuals), _np(codec.centroids), name, _np(codec.bucket_weights), codec.nbits, name
    )
    # Half-precision results come back as uint16 bit patterns.
    return torch.from_numpy(out).view(codec.centroids.dtype)


def fused_decompress_maxsim(
    q: Queries, docs: CompressedDocs, codec: Codec, cand: Candidates | None
) -> Tensor:
    out = C.fused_decompress_maxsim(
        _q(q.data),
        _np(q.mask),
        _np(docs.codes),
        _np(docs.residuals),
        _np(docs.offsets),
        _np(ids_of(cand)),
        _np(codec.centroids),
        _DTYPE_NAMES[codec.centroids.dtype],
        _np(codec.bucket_weights),
        codec.nbits,
    )
    return torch.from_numpy(out)


def fused_decompress_maxsim_codes(
    q: Queries,
    docs: CompressedDocs,
    codec: Codec,
    cand: Candidates | None,
    cs: CentroidScores,
    precision: str,
) -> Tensor:
    out = C.fused_decompress_maxsim_codes(
        _q(q.data),
        _np(q.mask),
        _np(docs.codes),
        _np(docs.residuals),
        _np(docs.inv_norm),
        _np(docs.offsets),
        _np(ids_of(cand)),
        _np(cs.scores.contiguous()),
        _np(codec.bucket_weights),
        codec.nbits,
        precision,
        cs.query_len,
    )
    return torch.from_numpy(out)


def centroid_interaction(
    cs: CentroidScores,
    codes: Tensor,
    doc_offsets: Tensor,
    cand: Candidates | None,
    threshold: float | None,
    queries_mask: Tensor | None,
) -> Tensor:
    out = C.centroid_interaction(
        _np(cs.scores.contiguous()),
        _np(queries_mask),
        _np(codes),
        _np(doc_offsets),
        _np(ids_of(cand)),
        threshold,
        cs.query_len,
    )
    return torch.from_numpy(out)
