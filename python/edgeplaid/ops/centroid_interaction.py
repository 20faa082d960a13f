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


def centroid_interaction_topk(
    centroid_scores: Any,
    codes: Any,
    ivf: Any,
    probed: Any,
    n_keep: int,
    threshold: float | None = None,
    queries_mask: Any = None,
    centroid_max: Any = None,
    live: Any = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PLAID stages 1b-2 in one call: the candidates of each query are the live documents of its
    probed IVF cells, each scored once as :func:`centroid_interaction` scores it (with
    ``threshold``'s pruning), and the ``n_keep`` best are kept. The C++ kernel gathers the cells'
    lists itself (a bitmap marks documents already seen), scores the ragged list and selects in
    place: no padded candidate matrix, no separate selection pass.

    Args:
        centroid_scores: a ``CentroidScores`` bundle (either layout; the kernel reads the
            centroid-major one in place, a token-major one is transposed first) or (nq, Lq, C)
            float32.
        codes: a ``CompressedDocs`` or ``DocCodes`` bundle (codes (n_tokens,) uint16/int32/int64,
            offsets (nd + 1,) int64).
        ivf: the inverted file, any object with ``offsets`` (C + 1,) int64 and ``docs``
            (n_entries,) int32 (document positions in [0, nd), unique within a cell).
        probed: (nq, n_probed) int64 centroid ids whose lists are the candidates, -1 = none
            (stage 1's top ids, reshaped).
        n_keep: documents returned per query.
        threshold: the pruning threshold, or None (every token counts).
        queries_mask: (nq, Lq) bool or None.
        centroid_max: (nq, C) float32, each centroid's best score over the query's valid tokens
            (``centroid_scores(..., with_max=True)``), or None: taken from the scores.
        live: (nd,) bool, False for deleted documents (never candidates), or None.
        backend: "cpp" or "reference"; None picks by device.

    Returns:
        ids (nq, n_keep) int64 and scores (nq, n_keep) float32, best first: a higher score, then
        a lower id; documents with no kept token (-inf) after the scored ones; -1 / -inf past
        each query's candidates.
    """
    cs = b.centroid_scores(centroid_scores, nq=None, lq=None, n_centroids=None, device=None)
    nq, lq, n_cent = cs.shape
    device = cs.scores.device
    if not isinstance(codes, (b.CompressedDocs, b.DocCodes)):
        raise ValueError("codes: expected a CompressedDocs or DocCodes bundle (codes with their offsets)")
    v.check_device("codes", codes.codes, device)
    offsets = codes.offsets
    ivf_offsets, ivf_docs = getattr(ivf, "offsets", None), getattr(ivf, "docs", None)
    if (
        not isinstance(ivf_offsets, torch.Tensor)
        or ivf_offsets.dtype != torch.int64
        or ivf_offsets.shape != (n_cent + 1,)
    ):
        raise ValueError(f"ivf: expected offsets of shape ({n_cent + 1},) int64 (one per centroid + 1)")
    if not isinstance(ivf_docs, torch.Tensor) or ivf_docs.dtype != torch.int32 or ivf_docs.dim() != 1:
        raise ValueError("ivf: expected docs (n_entries,) int32")
    pr = v.as_tensor(probed, "probed")
    if pr.dtype != torch.int64 or pr.dim() != 2 or pr.shape[0] != nq:
        raise ValueError(f"probed: expected ({nq}, n_probed) int64, got {tuple(pr.shape)} {pr.dtype}")
    if isinstance(n_keep, bool) or not isinstance(n_keep, int) or n_keep < 1:
        raise ValueError(f"n_keep: expected a positive int, got {n_keep!r}")
    if threshold is not None:
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or math.isnan(threshold):
            raise ValueError(f"threshold: expected a float or None, got {threshold!r}")
        threshold = float(threshold)
    qm = v.mask(queries_mask, "queries_mask", nq, lq, device)
    if centroid_max is not None and (
        centroid_max.dtype != torch.float32 or tuple(centroid_max.shape) != (nq, n_cent)
    ):
        raise ValueError(f"centroid_max: expected ({nq}, {n_cent}) float32")
    nd = offsets.shape[0] - 1
    if live is not None and (live.dtype != torch.bool or tuple(live.shape) != (nd,)):
        raise ValueError(f"live: expected ({nd},) bool")
    fn = resolve("centroid_interaction_topk", device, backend)
    return fn(cs, centroid_max, codes.codes, offsets, ivf_offsets, ivf_docs, pr, live, threshold, n_keep, qm)


def _reference_topk(cs, cmax, codes, offsets, ivf_offsets, ivf_docs, probed, live, threshold, n_keep, qm):
    return reference.centroid_interaction_topk(
        cs.token_major(qm), codes, offsets, ivf_offsets, ivf_docs, probed, n_keep, threshold, qm, live
    )


def _cpp_topk(cs, cmax, codes, offsets, ivf_offsets, ivf_docs, probed, live, threshold, n_keep, qm):
    table = cs.scores if cs.centroid_major else b.centroid_major(cs.scores, qm)
    ids, scores = cpp.C.centroid_interaction_topk(
        cpp.host(table.contiguous()),
        cpp.host(cmax),
        cpp.host(qm),
        cpp.host(codes),
        cpp.host(offsets),
        cpp.host(ivf_offsets),
        cpp.host(ivf_docs),
        cpp.host(probed.contiguous()),
        cpp.host(live),
        threshold,
        n_keep,
        cs.shape[1],
    )
    return torch.from_numpy(ids), torch.from_numpy(scores)


register("centroid_interaction_topk", "reference", _reference_topk)
register("centroid_interaction_topk", "cpp", _cpp_topk)
register("centroid_interaction", "reference", _reference)
register("centroid_interaction", "cpp", _cpp)
register("centroid_interaction", "triton", _triton)
