"""fused_decompress_maxsim: MaxSim straight from PLAID's compressed form."""

from __future__ import annotations

from typing import Any

import torch

from edgeplaid.ops import _validate as v
from edgeplaid.ops import cpp_backend, reference, triton_backend
from edgeplaid.ops.dispatch import register, resolve


def fused_decompress_maxsim(
    queries: Any,
    codes: Any,
    residuals: Any,
    doc_offsets: Any,
    candidates: Any,
    centroids: Any,
    bucket_weights: Any,
    nbits: int,
    queries_mask: Any = None,
    backend: str | None = None,
) -> torch.Tensor:
    """maxsim_packed(queries, decompress_residuals(codes, residuals, ...), doc_offsets, candidates).

    score[q, c] = Σ_{valid i} max_{t in doc} ⟨queries[q, i], token[t]⟩ with
    token[t] = normalize(centroids[codes[t]] + bucket_weights[b_t]) decoded in fp32 (bit order
    and formula: decompress_residuals). The kernel decodes each candidate document into an
    on-chip tile and scores it there; the documents never exist in memory.

    Args:
        queries: (nq, Lq, dim) float32, float16 or bfloat16.
        codes: (n_tokens,) uint16, int32 or int64; residuals: (n_tokens, dim * nbits / 8) uint8.
        doc_offsets: (nd + 1,) int64, non-decreasing, from 0 to n_tokens.
        candidates: (nq, nc) int64 (-1 = padding, scores -inf) or None for every document.
        centroids: (C, dim) float32, float16 or bfloat16; bucket_weights: (2**nbits,) float.
        nbits: 1, 2, 4 or 8.
        queries_mask: (nq, Lq) bool or None.
        backend: "cpp", "triton" or "reference"; None picks by device.

    Returns:
        (nq, nc) float32.
    """
    q = v.queries(queries)
    nq, lq, dim = q.shape
    cents, weights, n = v.codec(centroids, bucket_weights, nbits, dim, q.device)
    c = v.codes(codes, q.device)
    res = v.residuals(residuals, c.shape[0], dim * n // 8, q.device)
    offsets = v.offsets(doc_offsets, c.shape[0], q.device)
    cand = v.candidates(candidates, nq, offsets.shape[0] - 1, q.device)
    qm = v.mask(queries_mask, "queries_mask", nq, lq, q.device)
    fn = resolve("fused_decompress_maxsim", q.device, backend)
    return fn(q, c, res, offsets, cand, cents, weights, n, qm)


register("fused_decompress_maxsim", "reference", reference.fused_decompress_maxsim)
register("fused_decompress_maxsim", "cpp", cpp_backend.fused_decompress_maxsim)
register("fused_decompress_maxsim", "triton", triton_backend.fused_decompress_maxsim)
