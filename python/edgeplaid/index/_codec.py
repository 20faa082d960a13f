"""PLAID's k-means and residual codec (ColBERT's vocabulary: centroids, avg_residual,
bucket_cutoffs, bucket_weights, codes, residuals)."""

from __future__ import annotations

import math

import numpy as np
import torch

from edgeplaid._native import C
from edgeplaid.ops import centroid_scores, residual_inv_norms

# Tokens per centroid_scores call in assignment: the (chunk, n_centroids) fp32 score block stays
# small enough to be reused from cache (a caller-owned buffer: no page faults per call).
_ASSIGN_CHUNK = 256


def num_centroids(n_tokens: int) -> int:
    """ColBERT's choice: 2 ** floor(log2(16 * sqrt(n_tokens))), at most n_tokens."""
    if n_tokens <= 0:
        return 1
    c = int(2 ** math.floor(math.log2(16 * math.sqrt(n_tokens))))
    return max(1, min(c, n_tokens))


def assign(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Nearest centroid (max inner product, ties to the lower id) of every row.

    Args:
        x: (n, dim) float32.
        centroids: (C, dim) float32.

    Returns:
        (n,) int64 centroid ids.
    """
    n = x.shape[0]
    out = np.empty(n, dtype=np.int64)
    if n == 0:
        return out
    cents = np.ascontiguousarray(centroids, dtype=np.float32)
    chunk = _ASSIGN_CHUNK
    if C is not None:
        buf = np.empty((1, min(chunk, n), cents.shape[0]), dtype=np.float32)
        for s in range(0, n, chunk):
            q = np.ascontiguousarray(x[s : s + chunk], dtype=np.float32)[None]
            sc = buf if q.shape[1] == buf.shape[1] else None
            _, ids = C.centroid_scores(q, None, cents, "float32", 1, sc)
            out[s : s + q.shape[1]] = ids[0, :, 0]
        return out
    ct = torch.from_numpy(cents)
    for s in range(0, n, 4096):
        q = torch.from_numpy(np.ascontiguousarray(x[s : s + 4096], dtype=np.float32))[None]
        out[s : s + q.shape[1]] = centroid_scores(q, ct, 1)[1][0, :, 0].numpy()
    return out


def kmeans(sample: np.ndarray, k: int, iters: int = 4, seed: int = 0) -> np.ndarray:
    """Spherical k-means (inner-product assignment, normalised means), as ColBERT's centroids.

    Args:
        sample: (n, dim) float32 unit rows, n >= k.
        k: number of centroids.
        iters: Lloyd iterations after the initialisation (k distinct sample rows).
        seed: initialisation seed.

    Returns:
        (k, dim) float32 unit rows. An empty cluster keeps its previous centroid.
    """
    n, dim = sample.shape
    rng = np.random.default_rng(seed)
    cents = np.ascontiguousarray(sample[np.sort(rng.choice(n, size=k, replace=False))], dtype=np.float32)
    xs = torch.from_numpy(np.ascontiguousarray(sample, dtype=np.float32))
    for _ in range(iters):
        ids = torch.from_numpy(assign(sample, cents))
        sums = torch.zeros(k, dim, dtype=torch.float32).index_add_(0, ids, xs)
        counts = torch.bincount(ids, minlength=k)
        norms = sums.norm(dim=1, keepdim=True)
        new = sums / norms.clamp_min(1e-12)
        keep = (counts == 0) | (norms[:, 0] == 0)
        new[keep] = torch.from_numpy(cents)[keep]
        cents = new.numpy().astype(np.float32, copy=False)
    return np.ascontiguousarray(cents)


def fit_buckets(residuals: np.ndarray, nbits: int) -> tuple[float, np.ndarray, np.ndarray]:
    """ColBERT's residual codec from held-out residuals (x - centroid[code]).

    Args:
        residuals: (n, dim) float32.
        nbits: bits per dimension.

    Returns:
        avg_residual (float: mean |residual|), bucket_cutoffs (2**nbits - 1,) float32 (quantiles
        i / 2**nbits) and bucket_weights (2**nbits,) float32 (quantiles (i + 0.5) / 2**nbits).
    """
    r = torch.from_numpy(np.ascontiguousarray(residuals, dtype=np.float32)).flatten()
    if r.numel() > 8_000_000:  # torch.quantile's input limit is 16M; a strided subsample is plenty
        r = r[:: math.ceil(r.numel() / 8_000_000)]
    if r.numel() == 0:
        r = torch.zeros(1)
    b = 1 << nbits
    q = torch.arange(b, dtype=torch.float32) / b
    cutoffs = torch.quantile(r, q[1:]).numpy().astype(np.float32)
    weights = torch.quantile(r, q + 0.5 / b).numpy().astype(np.float32)
    return float(r.abs().mean()), cutoffs, weights


def pack_buckets(buckets: np.ndarray, nbits: int) -> np.ndarray:
    """Bucket indices (n, dim) uint8 -> packed residuals (n, dim * nbits / 8) uint8.

    Bit order of edgeplaid.ops (reference.pack_residuals): dimension d's index occupies bits
    [d * nbits, (d + 1) * nbits) of the row read as a little-endian bit string.
    """
    n, dim = buckets.shape
    per = 8 // nbits
    g = buckets.astype(np.uint8, copy=False).reshape(n, dim // per, per)
    out = np.zeros((n, dim // per), dtype=np.uint8)
    for j in range(per):
        out |= g[:, :, j] << np.uint8(j * nbits)
    return out


def compress(
    x: np.ndarray, centroids: np.ndarray, bucket_cutoffs: np.ndarray, nbits: int
) -> tuple[np.ndarray, np.ndarray]:
    """codes (n,) int64 and packed residuals (n, dim * nbits / 8) uint8 of rows x (n, dim) float32."""
    codes = assign(x, centroids)
    r = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)) - torch.from_numpy(centroids)[codes]
    buckets = torch.bucketize(r, torch.from_numpy(bucket_cutoffs)).to(torch.uint8).numpy()
    return codes, pack_buckets(buckets, nbits)


def inv_norms(
    codes: np.ndarray, residuals: np.ndarray, centroids: np.ndarray, weights: np.ndarray, nbits: int
) -> np.ndarray:
    """(n,) float32 1 / ||centroids[code] + bucket_weights[residual buckets]||: stored per token for
    scoring from the codes (edgeplaid.ops.fused_decompress_maxsim). centroids as stored (fp16)
    widened to fp32, so the norm is that of the vector the kernels decompress."""
    return residual_inv_norms(
        torch.from_numpy(np.ascontiguousarray(codes)),
        torch.from_numpy(np.ascontiguousarray(residuals)),
        torch.from_numpy(np.ascontiguousarray(centroids, dtype=np.float32)),
        torch.from_numpy(np.ascontiguousarray(weights, dtype=np.float32)),
        nbits,
    ).numpy()
