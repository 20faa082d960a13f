"""Fusion of late-interaction and lexical scores over one query's candidate union.

Both functions take the exact scores of every document of the union from both sides: ``late``
(n,) float32 MaxSim scores (finite) and ``lexical`` (n,) float32 BM25 scores (0: the document
matches no query term, so it is not on the lexical side's list).

- ``rrf`` (reciprocal rank fusion, Cormack et al. 2009), weighted:
  fused = alpha / (RRF_K + rank_late) + (1 - alpha) / (RRF_K + rank_lexical), ranks from 1 over
  the union (equal scores share the best of their ranks: a tie is no evidence); a document with
  no lexical match adds nothing on that side. alpha = 0.5 ranks as plain RRF.
- ``relative_score`` (min-max normalised scores, Weaviate's relativeScoreFusion):
  fused = alpha * (late - min) / (max - min) + (1 - alpha) * (lexical - min) / (max - min), each
  side's min and max over the union (a side whose scores are all equal normalises to 0).
"""

from __future__ import annotations

import numpy as np

FUSIONS = ("rrf", "relative_score")
RRF_K = 60  # the constant of Cormack et al., used unchanged by every engine that offers RRF


def _ranks(scores: np.ndarray) -> np.ndarray:
    """1-based rank of each score, best first; equal scores share the lowest of their ranks
    ("competition" ranking: 1, 2, 2, 4)."""
    neg = -scores.astype(np.float64)
    return (np.searchsorted(np.sort(neg), neg, side="left") + 1).astype(np.float64)


def _minmax(x: np.ndarray) -> np.ndarray:
    lo, hi = float(x.min()), float(x.max())
    return np.zeros(x.shape[0]) if hi <= lo else (x.astype(np.float64) - lo) / (hi - lo)


def fuse(late: np.ndarray, lexical: np.ndarray, fusion: str, alpha: float) -> np.ndarray:
    """(n,) float64 fused scores (higher is better) of the union's documents; see the module."""
    if late.shape[0] == 0:
        return np.zeros(0)
    if fusion == "rrf":
        out = alpha / (RRF_K + _ranks(late))
        matched = lexical > 0
        out[matched] += (1.0 - alpha) / (RRF_K + _ranks(lexical)[matched])
        return out
    if fusion == "relative_score":
        return alpha * _minmax(late) + (1.0 - alpha) * _minmax(lexical)
    raise ValueError(f"fusion: expected one of {', '.join(FUSIONS)}, got {fusion!r}")
