"""Lexical and hybrid search of one index version: BM25 alone, or BM25 fused with PLAID.

Hybrid, per query: the lexical side retrieves its ``depth`` best documents (BM25, tantivy); the
late side runs PLAID and keeps its ``depth`` best, and its last stage also scores the lexical
side's documents (so every document of the union has its late-interaction score, computed as
PLAID scores its own); the lexical side then scores the late side's documents that it did not
retrieve (0 where no term matches). Fusion (:mod:`edgeplaid.search._fusion`) is exact over that
union; the k best are returned. Filters apply to both sides before retrieval; deleted
documents are on neither side.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from edgeplaid.search._fusion import FUSIONS, fuse
from edgeplaid.search._lexical import LexicalSearcher
from edgeplaid.search._plaid import NEG_INF, PlaidSearcher, SearchParams

MODES = ("late", "lexical", "hybrid")
# Each side's list for the fusion: max(k, DEPTH_PER_K * k, DEPTH_MIN) documents (the late
# side's at most what PLAID's last stage scores, n_rerank). Deeper lists (40, 100 at k = 10)
# changed nDCG@10 by at most 0.003 (down on SciFact, up on Cranfield; bench_hybrid.py) and cost
# more lexical scoring: 20.
DEPTH_PER_K = 2
DEPTH_MIN = 20
# Chosen on SciFact and Cranfield with the MiniLM stand-in (benchmarks/bench_hybrid.py,
# results/hybrid.csv): relative_score at alpha 0.6 gave the best nDCG@10 of both fusions on both
# collections (SciFact 0.7125 vs late 0.6918, lexical 0.6619, RRF 0.7036 at its best alpha;
# Cranfield 0.3893 vs 0.3677, 0.3429, RRF 0.3883). RRF's default alpha 0.5 ranks as plain RRF.
DEFAULT_FUSION = "relative_score"
DEFAULT_ALPHA = {"rrf": 0.5, "relative_score": 0.6}


def check_fusion(fusion: str | None, alpha: float | None) -> tuple[str, float]:
    """(fusion, alpha) with the defaults filled in; ValueError naming a bad one."""
    f = DEFAULT_FUSION if fusion is None else fusion
    if f not in FUSIONS:
        raise ValueError(f"fusion: expected one of {', '.join(FUSIONS)}, got {fusion!r}")
    a = DEFAULT_ALPHA[f] if alpha is None else alpha
    if isinstance(a, bool) or not isinstance(a, (int, float)) or not 0.0 <= float(a) <= 1.0:
        raise ValueError(f"alpha: expected a number in [0, 1] (the late side's weight), got {alpha!r}")
    return f, float(a)


class _AllowedKeys:
    """Each query's allowed positions as sorted keys, made once per distinct array (a ``where``
    filter gives every query of a call the same one: O(allowed) once, not once per query)."""

    def __init__(self, keys_of: Callable[[np.ndarray], np.ndarray]) -> None:
        self.keys_of = keys_of
        self.made: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def __call__(self, sub: np.ndarray | None) -> np.ndarray | None:
        if sub is None:
            return None
        got = self.made.get(id(sub))
        if got is None or got[0] is not sub:
            got = self.made[id(sub)] = (sub, np.unique(self.keys_of(sub)))
        return got[1]


def lexical_search(
    lexical: LexicalSearcher,
    texts: list[str],
    k: int,
    subsets: list[np.ndarray | None] | None,
    keys_of: Callable[[np.ndarray], np.ndarray],
    positions_of: Callable[[np.ndarray], np.ndarray],
) -> tuple[np.ndarray, np.ndarray]:
    """BM25 alone: scores (nq, k) float32 (-inf past the matches), ids (nq, k) int64 positions
    (-1 past the matches)."""
    nq = len(texts)
    out_s = np.full((nq, k), NEG_INF, dtype=np.float32)
    out_i = np.full((nq, k), -1, dtype=np.int64)
    allowed = _AllowedKeys(keys_of)
    for i, text in enumerate(texts):
        sub = None if subsets is None else subsets[i]
        keys, scores = lexical.search(text, k, allowed(sub))
        pos = positions_of(keys)
        ok = pos >= 0  # always, for an index whose two sides agree (checked at load)
        n = int(ok.sum())
        out_s[i, :n], out_i[i, :n] = scores[ok], pos[ok]
    return out_s, out_i


LEXICAL_LIST, LATE_LIST = 1, 2


def hybrid_unions(
    plaid: PlaidSearcher,
    lexical: LexicalSearcher,
    queries: Any,
    texts: list[str],
    k: int,
    params: SearchParams,
    subsets: list[np.ndarray | None] | None,
    keys_of: Callable[[np.ndarray], np.ndarray],
    positions_of: Callable[[np.ndarray], np.ndarray],
    *,
    backend: str | None = None,
    depth: int | None = None,
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Each query's candidate union with both sides' exact scores, before fusion (see the
    module): per query ``(positions (n,) int64, late (n,) float32 MaxSim, lexical (n,) BM25
    float, 0 where no term matches, lists (n,) int8: LEXICAL_LIST | LATE_LIST, the side lists
    each document is on)``, the lexical side's list first. ``queries``: the bundle
    PLAID searches (nq queries on the index's device); ``texts``: nq query texts."""
    d = depth if depth is not None else hybrid_depth(k)
    lex: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    allowed = _AllowedKeys(keys_of)
    for i, text in enumerate(texts):
        sub = None if subsets is None else subsets[i]
        keys, scores = lexical.search(text, d, allowed(sub))
        pos = positions_of(keys)
        ok = pos >= 0
        lex.append((keys[ok], scores[ok], pos[ok]))
    s, ids, ext = plaid.search(
        queries, late_depth(k, d, params), params, subsets, backend, extra=[p for _, _, p in lex]
    )
    s, ids, ext = s.cpu().numpy(), ids.cpu().numpy(), ext.cpu().numpy()
    out = []
    for i, text in enumerate(texts):
        _, lex_scores, lex_pos = lex[i]
        late_ok = ids[i] >= 0
        late_pos, late_scores = ids[i][late_ok], s[i][late_ok]
        # lists of a few dozen: one broadcast comparison (np.isin sorts both sides: 0.12 ms a
        # call, a tenth of the hybrid's whole cost over late search on SciFact)
        both = late_pos[:, None] == lex_pos[None, :]
        only_late = ~both.any(axis=1)
        union = np.concatenate([lex_pos, late_pos[only_late]])
        late_u = np.concatenate([ext[i, : lex_pos.shape[0]], late_scores[only_late]])
        lex_u = np.concatenate([lex_scores, lexical.score(text, keys_of(late_pos[only_late]))])
        # which side's list each document is on: LEXICAL_LIST, LATE_LIST or both (a sharded
        # index rebuilds the single index's two lists from its shards' with these)
        lists = np.full(union.shape[0], LEXICAL_LIST, dtype=np.int8)
        lists[: lex_pos.shape[0]][both.any(axis=0)] |= LATE_LIST
        lists[lex_pos.shape[0] :] = LATE_LIST
        scored = np.isfinite(late_u)  # an empty document has no late score: it stays out
        out.append((union[scored], late_u[scored], lex_u[scored], lists[scored]))
    return out


def hybrid_depth(k: int) -> int:
    """Documents each side retrieves for the fusion at k results."""
    return max(k, DEPTH_PER_K * k, DEPTH_MIN)


def late_depth(k: int, depth: int, params: SearchParams) -> int:
    """The late side's list: ``depth``, at most what PLAID's last stage scores (n_rerank)."""
    return max(k, min(depth, params.n_rerank))


def fuse_top(
    union: np.ndarray, late: np.ndarray, lexical: np.ndarray, k: int, fusion: str, alpha: float
) -> tuple[np.ndarray, np.ndarray]:
    """The k best of one query's union (:func:`hybrid_unions`): (fused scores (<= k,) float32,
    the indices into ``union`` they belong to (<= k,) int64), best first; ties: the higher late
    score, then the lower ``union`` value (deterministic)."""
    if union.shape[0] == 0:
        return np.zeros(0, np.float32), np.zeros(0, np.int64)
    fused = fuse(late, lexical, fusion, alpha)
    order = np.lexsort((union, -late, -fused))[:k]
    return fused[order].astype(np.float32), order.astype(np.int64)


def hybrid_search(
    plaid: PlaidSearcher,
    lexical: LexicalSearcher,
    queries: Any,
    texts: list[str],
    k: int,
    params: SearchParams,
    subsets: list[np.ndarray | None] | None,
    keys_of: Callable[[np.ndarray], np.ndarray],
    positions_of: Callable[[np.ndarray], np.ndarray],
    *,
    fusion: str,
    alpha: float,
    backend: str | None = None,
    depth: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Hybrid search (see the module): fused scores (nq, k) float32 (-inf past the union), ids
    (nq, k) int64 positions (-1 past the union). Arguments as :func:`hybrid_unions`."""
    unions = hybrid_unions(
        plaid,
        lexical,
        queries,
        texts,
        k,
        params,
        subsets,
        keys_of,
        positions_of,
        backend=backend,
        depth=depth,
    )
    out_s = np.full((len(texts), k), NEG_INF, dtype=np.float32)
    out_i = np.full((len(texts), k), -1, dtype=np.int64)
    for i, (union, late_u, lex_u, _) in enumerate(unions):
        fused, order = fuse_top(union, late_u, lex_u, k, fusion, alpha)
        out_s[i, : order.shape[0]] = fused
        out_i[i, : order.shape[0]] = union[order]
    return out_s, out_i


def to_device(scores: np.ndarray, ids: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.from_numpy(scores).to(device), torch.from_numpy(ids).to(device)
