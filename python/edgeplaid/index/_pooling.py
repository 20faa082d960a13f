"""Document token pooling: fewer token vectors per document by merging near-duplicate tokens.

Each document's tokens are clustered hierarchically (Ward's linkage, scipy), cut into
ceil(n_tokens / pool_factor) clusters, and each cluster is replaced by its normalised mean, in
the order of the cluster's first token. The idea of PyLate's ``pool_factor``: a document's tokens
repeat (the same word, near-synonyms, padding-like specials), so half of them carry most of its
MaxSim. Measured with benchmarks/bench_codec.py (MiniLM-48 vectors, nDCG@10 of PLAID search; exact
fp32 MaxSim: SciFact 0.6686, Cranfield 0.3536): nbits 2 with pool_factor 1.5 stores 14.8 bytes per
original token (33.7 at nbits 4 unpooled) at 0.6669 / 0.3564; nbits 4 with pool_factor 2, 17.5
bytes, 0.6644 / 0.3447. Off by default (pool_factor 1).

Cost: about 2 ms per 256-token document on one core (the linkage is O(n_tokens^2) per document).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

MAX_POOL_FACTOR = 64.0


def check_pool_factor(pool_factor: Any) -> float:
    """A pool factor: a real number in [1, MAX_POOL_FACTOR] (1 = no pooling)."""
    if isinstance(pool_factor, bool) or not isinstance(pool_factor, (int, float)):
        raise ValueError(f"pool_factor: expected a number >= 1, got {pool_factor!r}")
    f = float(pool_factor)
    if not math.isfinite(f) or not 1.0 <= f <= MAX_POOL_FACTOR:
        raise ValueError(f"pool_factor: expected 1 <= pool_factor <= {MAX_POOL_FACTOR:g}, got {f!r}")
    return f


def pool_factor_of(manifest: dict) -> float:
    """The pool factor an index's documents were pooled with (manifest ``build.pool_factor``; 1
    for an index that records none: built before pooling existed, or imported from colbert-ai).
    Adds pool their documents with it, so every document of the index is pooled alike."""
    from edgeplaid.index._storage import IndexFormatError

    build = manifest.get("build")
    f = build.get("pool_factor", 1.0) if isinstance(build, dict) else 1.0
    try:
        return check_pool_factor(f)
    except ValueError as e:
        raise IndexFormatError(f"manifest build.pool_factor: {e}") from None


def pooled_length(n_tokens: int, pool_factor: float) -> int:
    """Tokens a document of ``n_tokens`` keeps: ceil(n_tokens / pool_factor), at least 1 (0 for 0)."""
    return 0 if n_tokens == 0 else max(1, math.ceil(n_tokens / pool_factor - 1e-9))


def _pool_one(x: np.ndarray, m: int) -> np.ndarray:
    from scipy.cluster.hierarchy import fcluster, linkage

    labels = fcluster(linkage(x.astype(np.float64), method="ward"), t=m, criterion="maxclust") - 1
    # clusters in the order of their first token: deterministic, and close to the text's order
    _, first = np.unique(labels, return_index=True)
    rank = np.empty(first.shape[0], dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(first.shape[0])
    lab = rank[labels]
    sums = np.zeros((first.shape[0], x.shape[1]), dtype=np.float64)
    np.add.at(sums, lab, x)
    norms = np.linalg.norm(sums, axis=1, keepdims=True)
    # a cluster whose tokens cancel out (norm ~0) keeps its first token rather than a zero vector
    firsts = x[np.sort(first)].astype(np.float64)
    out = np.where(norms > 1e-6, sums / np.maximum(norms, 1e-12), firsts)
    return out.astype(np.float32)


def pool_tokens(
    doc_tokens: np.ndarray, doclens: np.ndarray, pool_factor: float
) -> tuple[np.ndarray, np.ndarray]:
    """Pools every document's tokens (see the module docstring).

    Args:
        doc_tokens: (n_tokens, dim) float32 or float16, packed in document order.
        doclens: (n_docs,) int64 tokens per document, summing to n_tokens.
        pool_factor: >= 1; a document of n tokens keeps ceil(n / pool_factor) (documents of 1 or
            2 tokens, and any whose count would not shrink, are kept as they are, unnormalised).

    Returns:
        tokens (m, dim) float32 and doclens (n_docs,) int64, m = Σ pooled lengths; pooled rows
        have unit L2 norm.
    """
    f = check_pool_factor(pool_factor)
    dls = np.asarray(doclens, dtype=np.int64)
    if f == 1.0:
        return np.asarray(doc_tokens, dtype=np.float32), dls
    if not np.isfinite(doc_tokens).all():
        raise ValueError("doc_tokens: NaN or infinite values cannot be pooled")
    out: list[np.ndarray] = []
    lens = np.empty(dls.shape[0], dtype=np.int64)
    s = 0
    for i, n in enumerate(dls.tolist()):
        x = doc_tokens[s : s + n]
        s += n
        m = pooled_length(n, f)
        y = np.asarray(x, dtype=np.float32) if n <= 2 or m >= n else _pool_one(np.asarray(x), m)
        out.append(y)
        lens[i] = y.shape[0]
    dim = doc_tokens.shape[1]
    tokens = np.concatenate(out) if out else np.zeros((0, dim), dtype=np.float32)
    return np.ascontiguousarray(tokens, dtype=np.float32), lens
