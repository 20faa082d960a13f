"""Clustered synthetic corpora for the index and search tests (unit-norm token vectors)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def corpus(n_docs: int = 300, dim: int = 48, n_topics: int = 30, seed: int = 0, noise: float = 0.08):
    """tokens (n_tokens, dim) float32, doclens (n_docs,) int64, topics (n_topics, dim)."""
    g = torch.Generator().manual_seed(seed)
    topics = F.normalize(torch.randn(n_topics, dim, generator=g), dim=-1)
    doclens = torch.randint(1, 50, (n_docs,), generator=g)
    n = int(doclens.sum())
    doc_topic = torch.randint(0, n_topics, (n_docs, 3), generator=g)
    tok_doc = torch.repeat_interleave(torch.arange(n_docs), doclens)
    pick = doc_topic[tok_doc, torch.randint(0, 3, (n,), generator=g)]
    tokens = F.normalize(topics[pick] + noise * torch.randn(n, dim, generator=g), dim=-1)
    return tokens, doclens, topics


def queries(topics: torch.Tensor, n: int = 16, length: int = 8, seed: int = 1, noise: float = 0.08):
    """queries (n, length, dim) float32 and a mask (n, length) bool with ragged lengths."""
    g = torch.Generator().manual_seed(seed)
    pick = torch.randint(0, topics.shape[0], (n, length), generator=g)
    q = F.normalize(topics[pick] + noise * torch.randn(n, length, topics.shape[1], generator=g), dim=-1)
    lengths = torch.randint(2, length + 1, (n,), generator=g)
    mask = torch.arange(length)[None, :] < lengths[:, None]
    return q, mask
