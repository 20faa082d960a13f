"""Synthetic clustered ColBERT-like corpora, generated in batches (bounded memory at any size).

Model (all vectors L2-normalised, ``dim`` wide):

- ``n_topics`` random unit *topic* directions (Gaussian, normalised), drawn from ``seed``.
- Each document has 60-200 tokens (uniform) and 4 distinct topics (uniform). Per topic it has a
  *facet*: ``normalize(topic + FACET_NOISE * u)`` with ``u`` a random unit vector, so documents
  sharing a topic are near but not identical there.
- Each token picks one of its document's 4 facets (uniform) and is
  ``normalize(facet + TOKEN_NOISE * u)`` with a fresh random unit ``u`` (cosine to its facet
  about ``1 / sqrt(1 + TOKEN_NOISE**2)`` = 0.93).
- The noise levels are calibrated on real tokens: at 1.3M tokens (10,000 documents) a token's
  cosine to its nearest k-means centroid (16,384 centroids, edgeplaid's build) averages 0.89, the
  median gap to the second nearest is 0.035; SciFact's MiniLM-48 tokens (benchmarks/_scifact.py,
  1.24M tokens, 16,384 centroids): 0.90 and 0.027. (The first version, noise 0.5 / 0.6, gave
  0.79: far more diffuse than real tokens.)
- A query of ``query_len`` tokens is drawn the same way from the facets of one *source* document.

Determinism: the corpus depends on ``(n_docs, dim, n_topics, seed)`` only, never on ``batch_docs``:
documents are generated in fixed blocks of ``BLOCK_DOCS``, block ``b`` from the generator
``numpy.random.default_rng([seed, b])`` (doc-level draws first, token draws after), and batches
are cut from the blocks. Queries re-draw only the doc-level part of their source document's block.

The scale benchmarks use ``seed=0``, ``dim=48``, ``n_topics=4096``: ``/tmp/edgeplaid_scale/idx_5k``,
``idx_50k`` and ``idx_500k`` are ``synthetic_corpus(5_000 | 50_000 | 500_000)`` (about 0.65M,
6.5M and 65M tokens) built with nbits 4 (``benchmarks/bench_build.py``).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

BLOCK_DOCS = 1024  # documents per generator block: the unit of determinism
MIN_LEN, MAX_LEN = 60, 200  # tokens per document, inclusive
TOPICS_PER_DOC = 4
FACET_NOISE = 0.35  # a document's facet = normalize(topic + 0.35 * unit noise): cosine ~0.94
TOKEN_NOISE = 0.4  # a token = normalize(facet + 0.4 * unit noise): cosine ~0.93
N_TOPICS = 4096


def _unit(x: np.ndarray) -> np.ndarray:
    """Rows of x (..., dim) scaled to unit L2 norm (float32)."""
    return (x / np.sqrt(np.einsum("...d,...d->...", x, x))[..., None]).astype(np.float32, copy=False)


def topics(dim: int = 48, n_topics: int = N_TOPICS, seed: int = 0) -> np.ndarray:
    """(n_topics, dim) float32 unit topic directions of a corpus."""
    rng = np.random.default_rng([seed, 1 << 40])
    return _unit(rng.standard_normal((n_topics, dim), dtype=np.float32))


def _block_docs(
    rng: np.random.Generator, n: int, dim: int, tops: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Doc-level draws of one block: doclens (n,) int64 and facets (n, 4, dim) float32."""
    doclens = rng.integers(MIN_LEN, MAX_LEN + 1, size=n).astype(np.int64)
    # 4 distinct topics per document: the smallest 4 of n_topics random keys would cost O(n_topics)
    # per document; redrawing the rare collisions keeps it O(1) and deterministic.
    t = rng.integers(0, tops.shape[0], size=(n, TOPICS_PER_DOC))
    for _ in range(64):
        s = np.sort(t, axis=1)
        dup = (s[:, 1:] == s[:, :-1]).any(axis=1)
        if not dup.any():
            break
        t[dup] = rng.integers(0, tops.shape[0], size=(int(dup.sum()), TOPICS_PER_DOC))
    noise = _unit(rng.standard_normal((n, TOPICS_PER_DOC, dim), dtype=np.float32))
    facets = _unit(tops[t] + FACET_NOISE * noise)
    return doclens, facets


def _tokens(rng: np.random.Generator, facets: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """(sum(counts), dim) float32 tokens: counts[i] tokens near the facets (n, 4, dim) of item i."""
    n, _, dim = facets.shape
    total = int(counts.sum())
    owner = np.repeat(np.arange(n) * TOPICS_PER_DOC, counts)
    rows = torch.from_numpy(owner + rng.integers(0, TOPICS_PER_DOC, size=total))
    # torch draws the Gaussians (2-3x numpy's speed here: the noise is most of the generator's time),
    # from a generator seeded by this block's numpy stream, so the corpus stays a function of seed.
    gen = torch.Generator().manual_seed(int(rng.integers(0, 1 << 62)))
    noise = torch.randn((total, dim), generator=gen)
    noise.mul_(noise.square().sum(1, keepdim=True).rsqrt_().mul_(TOKEN_NOISE))
    x = torch.from_numpy(facets.reshape(n * TOPICS_PER_DOC, dim)).index_select(0, rows).add_(noise)
    return x.mul_(x.square().sum(1, keepdim=True).rsqrt_()).numpy()


def _block(b: int, n_docs: int, dim: int, tops: np.ndarray, seed: int, with_tokens: bool = True):
    n = min(BLOCK_DOCS, n_docs - b * BLOCK_DOCS)
    rng = np.random.default_rng([seed, b])
    doclens, facets = _block_docs(rng, n, dim, tops)
    toks = _tokens(rng, facets, doclens) if with_tokens else None
    return doclens, facets, toks


def synthetic_corpus(
    n_docs: int,
    dim: int = 48,
    n_topics: int = N_TOPICS,
    seed: int = 0,
    batch_docs: int = 4096,
    dtype: type = np.float32,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yields the corpus as ``(tokens (n, dim) dtype, doclens (b,) int64)`` batches of ``batch_docs``
    documents (the last one shorter); ``sum(doclens) == n``. See the module docstring for the model.

    The token count is about ``130 * n_docs``; :func:`corpus_tokens` gives it exactly without
    generating tokens.
    """
    if n_docs < 0 or batch_docs < 1:
        raise ValueError("n_docs must be >= 0 and batch_docs >= 1")
    tops = topics(dim, n_topics, seed)
    pend_t: list[np.ndarray] = []
    pend_d: list[np.ndarray] = []
    have = 0
    n_blocks = -(-n_docs // BLOCK_DOCS)
    for b in range(n_blocks):
        doclens, _, toks = _block(b, n_docs, dim, tops, seed)
        pend_t.append(toks)
        pend_d.append(doclens)
        have += doclens.shape[0]
        last = b == n_blocks - 1
        while have >= batch_docs or (last and have > 0):
            d = np.concatenate(pend_d)
            t = np.concatenate(pend_t)
            take = min(batch_docs, have)
            nt = int(d[:take].sum())
            yield t[:nt].astype(dtype, copy=False), d[:take].copy()
            pend_d, pend_t = [d[take:]], [t[nt:]]
            have -= take


def corpus_tokens(n_docs: int, dim: int = 48, n_topics: int = N_TOPICS, seed: int = 0) -> int:
    """Number of tokens of ``synthetic_corpus(n_docs, dim, n_topics, seed)`` (doc-level draws only)."""
    total = 0
    for b in range(-(-n_docs // BLOCK_DOCS)):
        n = min(BLOCK_DOCS, n_docs - b * BLOCK_DOCS)
        total += int(np.random.default_rng([seed, b]).integers(MIN_LEN, MAX_LEN + 1, size=n).sum())
    return total


def synthetic_queries(
    n_queries: int,
    n_docs: int,
    dim: int = 48,
    n_topics: int = N_TOPICS,
    seed: int = 0,
    query_len: int = 32,
    query_seed: int = 12345,
) -> tuple[np.ndarray, np.ndarray]:
    """Queries for ``synthetic_corpus(n_docs, dim, n_topics, seed)``.

    Returns:
        queries (n_queries, query_len, dim) float32, each token near a facet of its source
        document, and sources (n_queries,) int64: the source document's position in the corpus.
        ``query_seed`` picks the source documents and the query tokens' noise.
    """
    if n_docs < 1:
        raise ValueError("n_docs must be >= 1")
    tops = topics(dim, n_topics, seed)
    rng = np.random.default_rng([seed, query_seed, 1 << 41])
    sources = np.sort(rng.choice(n_docs, size=n_queries, replace=n_queries > n_docs)).astype(np.int64)
    facets = np.empty((n_queries, TOPICS_PER_DOC, dim), dtype=np.float32)
    cache: dict[int, np.ndarray] = {}
    for i, s in enumerate(sources):
        b = int(s) // BLOCK_DOCS
        if b not in cache:
            cache = {b: _block(b, n_docs, dim, tops, seed, with_tokens=False)[1]}
        facets[i] = cache[b][int(s) - b * BLOCK_DOCS]
    q = _tokens(rng, facets, np.full(n_queries, query_len))
    return q.reshape(n_queries, query_len, dim), sources
