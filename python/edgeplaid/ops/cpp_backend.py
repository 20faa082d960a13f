"""The ``cpp`` backend: CPU tensors handed to ``edgeplaid._C`` as zero-copy numpy views.

Queries (small) are widened to fp32 here; documents, centroids and codes cross in their own
dtype (bf16 as a uint16 view) and are widened in registers by the kernels.
"""

from __future__ import annotations

import numpy as np
import torch

from edgeplaid._native import C

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


def maxsim_packed(
    queries: Tensor,
    doc_tokens: Tensor,
    doc_offsets: Tensor,
    candidates: Tensor | None = None,
    queries_mask: Tensor | None = None,
) -> Tensor:
    out = C.maxsim_packed(
        _q(queries),
        _np(queries_mask),
        _np(doc_tokens),
        _DTYPE_NAMES[doc_tokens.dtype],
        _np(doc_offsets),
        _np(candidates),
    )
    return torch.from_numpy(out)


def centroid_scores(
    queries: Tensor, centroids: Tensor, n_probe: int, queries_mask: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    scores, ids = C.centroid_scores(
        _q(queries), _np(queries_mask), _np(centroids), _DTYPE_NAMES[centroids.dtype], int(n_probe)
    )
    return torch.from_numpy(scores), torch.from_numpy(ids)


def decompress_residuals(
    codes: Tensor, residuals: Tensor, centroids: Tensor, bucket_weights: Tensor, nbits: int
) -> Tensor:
    name = _DTYPE_NAMES[centroids.dtype]
    out = C.decompress_residuals(
        _np(codes),
        _np(residuals),
        _np(centroids),
        name,
        _np(bucket_weights.float().contiguous()),
        int(nbits),
        name,
    )
    # Half-precision results come back as uint16 bit patterns.
    return torch.from_numpy(out).view(centroids.dtype)


def fused_decompress_maxsim(
    queries,
    codes,
    residuals,
    doc_offsets,
    candidates,
    centroids,
    bucket_weights,
    nbits,
    queries_mask=None,
    centroid_scores=None,
    inv_norm=None,
    precision="exact",
) -> torch.Tensor:
    if centroid_scores is not None:
        return torch.from_numpy(
            C.fused_decompress_maxsim_codes(
                _q(queries),
                _np(queries_mask),
                _np(codes),
                _np(residuals),
                _np(inv_norm),
                _np(doc_offsets),
                _np(candidates),
                _np(centroid_scores),
                _np(bucket_weights.float().contiguous()),
                int(nbits),
                precision,
            )
        )
    out = C.fused_decompress_maxsim(
        _q(queries),
        _np(queries_mask),
        _np(codes),
        _np(residuals),
        _np(doc_offsets),
        _np(candidates),
        _np(centroids),
        _DTYPE_NAMES[centroids.dtype],
        _np(bucket_weights.float().contiguous()),
        int(nbits),
    )
    return torch.from_numpy(out)


def centroid_interaction(
    centroid_scores, codes, doc_offsets, candidates=None, threshold=None, queries_mask=None
) -> torch.Tensor:
    out = C.centroid_interaction(
        _np(centroid_scores.float().contiguous()),
        _np(queries_mask),
        _np(codes),
        _np(doc_offsets),
        _np(candidates),
        threshold,
    )
    return torch.from_numpy(out)
