"""Synthetic benchmark inputs with the shapes of ANCHORS.md (unit-norm token vectors)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def packed_documents(n_docs: int, dim: int, min_len: int = 100, max_len: int = 300, seed: int = 0):
    """tokens (n_tokens, dim) fp32 unit vectors, offsets (n_docs + 1,) int64."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, max_len + 1, (n_docs,), generator=g)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    tokens = F.normalize(torch.randn(int(offsets[-1]), dim, generator=g), dim=-1)
    return tokens, offsets


def queries(n: int, length: int, dim: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, length, dim, generator=g), dim=-1)


def compressed(tokens_count: int, dim: int, nbits: int, n_centroids: int = 4096, seed: int = 2):
    """codes (n,) int32, residuals (n, dim*nbits/8) uint8, centroids (C, dim), bucket_weights."""
    g = torch.Generator().manual_seed(seed)
    centroids = F.normalize(torch.randn(n_centroids, dim, generator=g), dim=-1)
    codes = torch.randint(0, n_centroids, (tokens_count,), generator=g, dtype=torch.int32)
    residuals = torch.randint(0, 256, (tokens_count, dim * nbits // 8), generator=g, dtype=torch.uint8)
    weights = torch.linspace(-0.05, 0.05, 1 << nbits)
    return codes, residuals, centroids, weights
