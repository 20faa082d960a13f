"""centroid_interaction: PLAID stages 2-3, approximate scores from centroid scores only."""

from __future__ import annotations

import math
from typing import Any

import torch

from edgeplaid.ops import _validate as v
from edgeplaid.ops import bundles as b
from edgeplaid.ops import cpp_backend as cpp
from edgeplaid.ops import reference, triton_backend
from edgeplaid.ops.dispatch import register, resolve


def centroid_interaction(
    centroid_scores: Any,
    codes: Any,
    doc_offsets: Any = None,
    candidates: Any = None,
    threshold: float | None = None,
    queries_mask: Any = None,
    backend: str | None = None,
) -> torch.Tensor:
    """score[q, c] = Σ_{valid i} max_{kept t in doc} centroid_scores[q, i, codes[t]], doc = candidates[q, c].

    Each document token is replaced by its centroid's score. With a threshold, token t is
    kept only when max_{valid i} centroid_scores[q, i, codes[t]] >= threshold (PLAID's
    centroid pruning, stage 2); without, every token counts (stage 3). A document with no
    kept token scores -inf.

    Args:
        centroid_scores: (nq, Lq, C) float32, as returned by centroid_scores (or a
            ``CentroidScores`` bundle, not re-checked, in either layout).
        codes: (n_tokens,) uint16, int32 or int64 centroid ids; doc_offsets: (nd + 1,) int64.
        candidates: (nq, nc) int64 (-1 = padding, scores -inf) or None for every document.
        threshold: float or None.
        queries_mask: (nq, Lq) bool or None; masked tokens neither score nor prune.
        backend: "cpp", "triton" or "reference"; None picks by device.

    ``codes`` may be a ``CompressedDocs`` or ``DocCodes`` bundle (offsets inside, not re-checked) and
    ``candidates`` a ``Candidates``.

    Returns:
        (nq, nc) float32.
    """
    cs = b.centroid_scores(centroid_scores, nq=None, lq=None, n_centroids=None, device=None)
    nq, lq, _ = cs.shape
    device = cs.scores.device
    if isinstance(codes, (b.CompressedDocs, b.DocCodes)):
        if doc_offsets is not None:
            raise ValueError("doc_offsets: give the offsets inside the CompressedDocs bundle, not beside it")
        v.check_device("codes", codes.codes, device)
        c, offsets = codes.codes, codes.offsets
    else:
        c = v.codes(codes, device)
        offsets = v.offsets(doc_offsets, c.shape[0], device)
    cand = b.candidates(candidates, nq, offsets.shape[0] - 1, device)
    qm = v.mask(queries_mask, "queries_mask", nq, lq, device)
    if threshold is not None:
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or math.isnan(threshold):
            raise ValueError(f"threshold: expected a float or None, got {threshold!r}")
        threshold = float(threshold)
    return resolve("centroid_interaction", device, backend)(cs, c, offsets, cand, threshold, qm)


def _reference(cs: b.CentroidScores, codes, offsets, cand, threshold, qm) -> torch.Tensor:
    return reference.centroid_interaction(cs.token_major(qm), codes, offsets, b.ids_of(cand), threshold, qm)


def _cpp(cs: b.CentroidScores, codes, offsets, cand, threshold, qm) -> torch.Tensor:
    # The centroid-major layout is read in place (query_len given); token-major is transposed.
    out = cpp.C.centroid_interaction(
        cpp.host(cs.scores.contiguous()),
        cpp.host(qm),
        cpp.host(codes),
        cpp.host(offsets),
        cpp.host(b.ids_of(cand)),
        threshold,
        cs.query_len,
    )
    return torch.from_numpy(out)


def _triton(cs: b.CentroidScores, codes, offsets, cand, threshold, qm) -> torch.Tensor:
    scores = cs.token_major(qm).contiguous()
    return triton_backend.call("centroid_interaction", scores, codes, offsets, b.ids_of(cand), threshold, qm)


register("centroid_interaction", "reference", _reference)
register("centroid_interaction", "cpp", _cpp)
register("centroid_interaction", "triton", _triton)
