"""PLAID search on CPU over an index's arrays, every heavy step in edgeplaid's kernels.

Stages (Santhanam et al., PLAID, 2022), for each query:

1. ``centroid_scores``: every query token against every centroid, and each token's top
   ``n_probe`` centroids; their IVF lists, merged, are the candidate documents.
2. ``centroid_interaction`` with ``threshold``: each candidate's tokens replaced by their
   centroid's score, tokens whose centroid no query token scores >= threshold pruned; the best
   ``n_candidates`` survive.
3. ``centroid_interaction`` without pruning on those; the best ``n_rerank`` survive.
4. ``fused_decompress_maxsim`` from the codes: MaxSim over the survivors, each token scored as
   (stage 1's centroid score + the residual term) * inv_norm, in int8 (default) or fp32 -> top k.

The numpy glue (candidate lists from the IVF, padding) is O(candidates) per query.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from edgeplaid.ops import centroid_interaction, centroid_scores, fused_decompress_maxsim

NEG_INF = float("-inf")
# The last stage's precision: int8 changed nDCG@10 on SciFact by <= 0.002 and recall@10 against
# exhaustive search by <= 0.005 at lower latency (benchmarks/bench_search.py, README).
DEFAULT_PRECISION = "int8"
# Queries scored together: bounds the (queries, query_len, n_centroids) fp32 centroid-score block
# (2 MiB: one 32-token query at 16K centroids). Larger blocks measured no faster on 2 cores and
# leave the allocator holding the scratch (RSS beyond the mapped index).
_MAX_SCORE_BLOCK = 1 << 19


@dataclass(frozen=True)
class SearchParams:
    """PLAID's knobs (colbert-ai's ncells, centroid_score_threshold, ndocs, ndocs // 4) and the
    precision of the last stage."""

    n_probe: int
    threshold: float | None
    n_candidates: int
    n_rerank: int
    precision: str = DEFAULT_PRECISION


def default_params(k: int) -> SearchParams:
    """Defaults scaled with k in colbert-ai's three tiers (k <= 10, <= 100, more), tuned on 48-dim
    SciFact (benchmarks/bench_search.py) for recall@10 >= 0.97 against exhaustive search at the
    least time. colbert-ai's k <= 10 tier (1 cell, threshold 0.5, 256 documents, 64 scored) gives
    0.976 there; 2 cells with threshold 0.6 give 0.989 in less time (the threshold prunes more
    tokens in stage 2, the costliest stage). For k <= 10 stage 2's 128 best go straight to exact
    scoring (n_rerank = n_candidates skips stage 3): exact scoring of 128 documents cost less
    than stage 3 on 256 plus exact scoring of 64, at higher recall."""
    if k <= 10:
        return SearchParams(n_probe=2, threshold=0.6, n_candidates=128, n_rerank=128)
    if k <= 100:
        return SearchParams(n_probe=2, threshold=0.55, n_candidates=1024, n_rerank=max(256, 4 * k))
    return SearchParams(n_probe=4, threshold=0.5, n_candidates=max(4 * k, 4096), n_rerank=max(1024, 4 * k))


def resolve_params(k: int, **overrides: Any) -> SearchParams:
    base = default_params(k)
    known = {"n_probe", "threshold", "n_candidates", "n_rerank", "precision"}
    unknown = set(overrides) - known
    if unknown:
        raise TypeError(f"unknown search parameter(s) {sorted(unknown)}; expected some of {sorted(known)}")
    values = {f: overrides.get(f, getattr(base, f)) for f in known}
    if "n_candidates" in overrides and "n_rerank" not in overrides:
        values["n_rerank"] = max(k, values["n_candidates"] // 4)
    if values["precision"] not in ("exact", "int8"):
        raise ValueError(f"precision: expected 'exact' or 'int8', got {values['precision']!r}")
    for f in ("n_probe", "n_candidates", "n_rerank"):
        if isinstance(values[f], bool) or not isinstance(values[f], int) or values[f] < 1:
            raise ValueError(f"{f}: expected a positive int, got {values[f]!r}")
    return SearchParams(**values)


def _pad(rows: list[np.ndarray], fill: int = -1) -> torch.Tensor:
    """Ragged int arrays -> (len(rows), max_len) int64 padded with ``fill``."""
    width = max((r.shape[0] for r in rows), default=0)
    out = np.full((len(rows), max(width, 1)), fill, dtype=np.int64)
    for i, r in enumerate(rows):
        out[i, : r.shape[0]] = r
    return torch.from_numpy(out)


def _select(scores: torch.Tensor, cand: torch.Tensor, n: int) -> torch.Tensor:
    """The n best candidates per row (nq, min(n, nc)) int64; -1 for padding and beyond."""
    if cand.shape[1] <= n:
        return cand
    # numpy, not torch: no second thread pool spinning beside the kernels' between the stages.
    s = scores.numpy().copy()
    c = cand.numpy()
    # A pruned document (-inf) still outranks padding: it stays a candidate, last.
    s[np.isneginf(s) & (c >= 0)] = np.finfo(np.float32).min
    s[c < 0] = NEG_INF
    pos = np.argpartition(-s, n - 1, axis=1)[:, :n]
    chosen = np.take_along_axis(c, pos, axis=1).copy()
    chosen[np.isneginf(np.take_along_axis(s, pos, axis=1))] = -1
    return torch.from_numpy(np.ascontiguousarray(chosen))


class PlaidSearcher:
    """Runs the PLAID stages over an index's arrays (all CPU tensors).

    Args:
        centroids: (C, dim) float16 or float32; bucket_weights: (2**nbits,) float32; nbits: int.
        codes: (n_tokens,) uint16 or int32; residuals: (n_tokens, dim * nbits / 8) uint8.
        inv_norm: (n_tokens,) float32, 1 / ||centroid + residual|| per token.
        doc_offsets: (n_docs + 1,) int64.
        ivf_offsets: (C + 1,) int64 numpy; ivf_docs: (n_ivf,) int32 numpy.
    """

    def __init__(
        self,
        centroids: torch.Tensor,
        bucket_weights: torch.Tensor,
        nbits: int,
        codes: torch.Tensor,
        residuals: torch.Tensor,
        inv_norm: torch.Tensor,
        doc_offsets: torch.Tensor,
        ivf_offsets: np.ndarray,
        ivf_docs: np.ndarray,
    ) -> None:
        self.centroids = centroids
        self.bucket_weights = bucket_weights
        self.nbits = nbits
        self.codes = codes
        self.residuals = residuals
        self.inv_norm = inv_norm
        self.doc_offsets = doc_offsets
        self.ivf_offsets = ivf_offsets
        self.ivf_docs = ivf_docs
        self.n_docs = doc_offsets.shape[0] - 1

    # ------------------------------------------------------------------ stage 1

    def _candidates(self, top_ids: np.ndarray, valid: np.ndarray, subset: np.ndarray | None) -> np.ndarray:
        """Sorted unique documents in the IVF lists of one query's probed centroids, (n,) int64."""
        cells = np.unique(top_ids[valid].ravel())
        cells = cells[cells >= 0]
        if cells.shape[0] == 0:
            return np.zeros(0, dtype=np.int64)
        starts = self.ivf_offsets[cells]
        ends = self.ivf_offsets[cells + 1]
        docs = np.unique(
            np.concatenate([self.ivf_docs[s:e] for s, e in zip(starts.tolist(), ends.tolist(), strict=True)])
        )
        if subset is not None:
            docs = docs[np.isin(docs, subset, assume_unique=True)]
        return docs.astype(np.int64, copy=False)

    # ------------------------------------------------------------------ the pipeline

    def search(
        self,
        queries: torch.Tensor,
        queries_mask: torch.Tensor | None,
        k: int,
        params: SearchParams,
        subset: list[np.ndarray | None] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """queries (nq, Lq, dim) float32, mask (nq, Lq) bool -> scores (nq, k) float32, ids (nq, k) int64."""
        nq, lq, _ = queries.shape
        n_cent = self.centroids.shape[0]
        per_block = max(1, _MAX_SCORE_BLOCK // max(1, lq * n_cent))
        out_s = torch.full((nq, k), NEG_INF, dtype=torch.float32)
        out_i = torch.full((nq, k), -1, dtype=torch.int64)
        n_probe = min(params.n_probe, n_cent)
        for b in range(0, nq, per_block):
            q = queries[b : b + per_block]
            m = None if queries_mask is None else queries_mask[b : b + per_block]
            cs, top = centroid_scores(q, self.centroids, n_probe, m)
            top_np = top.numpy()
            valid = np.ones(q.shape[:2], dtype=bool) if m is None else m.numpy()
            rows = []
            for i in range(q.shape[0]):
                sub = None if subset is None else subset[b + i]
                if sub is not None and sub.shape[0] <= params.n_candidates:
                    rows.append(sub)  # a small allowed set is scored whole: exact filtering
                else:
                    rows.append(self._candidates(top_np[i], valid[i], sub))
            cand = _pad(rows)
            if cand.shape[1] > params.n_candidates:
                s2 = centroid_interaction(cs, self.codes, self.doc_offsets, cand, params.threshold, m)
                cand = _select(s2, cand, params.n_candidates)
            if cand.shape[1] > params.n_rerank:
                s3 = centroid_interaction(cs, self.codes, self.doc_offsets, cand, None, m)
                cand = _select(s3, cand, params.n_rerank)
            s4 = fused_decompress_maxsim(
                q,
                self.codes,
                self.residuals,
                self.doc_offsets,
                cand,
                self.centroids,
                self.bucket_weights,
                self.nbits,
                m,
                centroid_scores=cs,
                inv_norm=self.inv_norm,
                precision=params.precision,
            )
            del cs
            s4n, cn = s4.numpy(), cand.numpy()
            s4n[cn < 0] = NEG_INF
            kk = min(k, cn.shape[1])
            pos = (
                np.argpartition(-s4n, kk - 1, axis=1)[:, :kk]
                if kk < cn.shape[1]
                else np.arange(kk)[None].repeat(cn.shape[0], 0)
            )
            vals = np.take_along_axis(s4n, pos, axis=1)
            order = np.argsort(-vals, axis=1, kind="stable")
            vals = np.take_along_axis(vals, order, axis=1)
            ids = np.take_along_axis(np.take_along_axis(cn, pos, axis=1), order, axis=1)
            ids[np.isneginf(vals)] = -1
            out_s[b : b + q.shape[0], :kk] = torch.from_numpy(vals)
            out_i[b : b + q.shape[0], :kk] = torch.from_numpy(ids)
        return out_s, out_i

    def exhaustive(
        self, queries: torch.Tensor, queries_mask: torch.Tensor | None, k: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact MaxSim of every query against every (decompressed) document, top k."""
        nq = queries.shape[0]
        out_s = torch.full((nq, k), NEG_INF, dtype=torch.float32)
        out_i = torch.full((nq, k), -1, dtype=torch.int64)
        kk = min(k, self.n_docs)
        if kk == 0:
            return out_s, out_i
        block = max(1, (1 << 26) // max(1, self.n_docs))
        for b in range(0, nq, block):
            q = queries[b : b + block]
            m = None if queries_mask is None else queries_mask[b : b + block]
            s = fused_decompress_maxsim(
                q,
                self.codes,
                self.residuals,
                self.doc_offsets,
                None,
                self.centroids,
                self.bucket_weights,
                self.nbits,
                m,
            )
            vals, ids = torch.topk(s, kk, dim=1)
            ids[torch.isneginf(vals)] = -1
            out_s[b : b + q.shape[0], :kk] = vals
            out_i[b : b + q.shape[0], :kk] = ids
        return out_s, out_i
