"""fused_decompress_maxsim vs decompress_residuals + maxsim_packed vs maxsim_packed on fp16
documents: reranking 1 query x 32 tokens against 1,000 compressed documents, dim 48."""

from __future__ import annotations

import pytest
import torch

from _data import compressed, packed_documents, queries
from _harness import Report, median_seconds, ours_label, quick, time_ours
from edgeplaid import ops
from edgeplaid.ops import reference


@pytest.mark.parametrize("nbits", [4, 2])
def test_fused(benchmark, peak_gflops, isa, nbits):
    n_docs = 100 if quick() else 1000
    _, offsets = packed_documents(n_docs, 48)
    n_tokens = int(offsets[-1])
    codes, residuals, centroids, weights = compressed(n_tokens, 48, nbits)
    q = queries(1, 32, 48)
    cand = torch.arange(n_docs)[None]
    tokens16 = ops.decompress_residuals(codes, residuals, centroids.half(), weights, nbits)
    report = Report(
        "fused_decompress_maxsim",
        f"rerank 1x32 vs {n_docs} docs, dim 48, nbits {nbits}",
        flops=2.0 * 32 * n_tokens * 48,
        bytes_moved=float(n_tokens * (4 + 48 * nbits // 8)),
        peak_gflops=peak_gflops,
    )
    report.add(
        "torch reference (decompress + padded einsum)",
        median_seconds(
            lambda: reference.fused_decompress_maxsim(
                q, codes, residuals, offsets, cand, centroids, weights, nbits
            ),
            min_rounds=3,
        ),
    )
    report.add(
        ours_label() + " decompress_residuals + maxsim_packed",
        median_seconds(
            lambda: ops.maxsim_packed(
                q, ops.decompress_residuals(codes, residuals, centroids, weights, nbits), offsets, cand
            )
        ),
    )
    plain = median_seconds(lambda: ops.maxsim_packed(q, tokens16, offsets, cand))
    report.add(ours_label() + " maxsim_packed on fp16 tokens", plain, note="same documents, uncompressed")
    fused = time_ours(
        benchmark,
        lambda: ops.fused_decompress_maxsim(q, codes, residuals, offsets, cand, centroids, weights, nbits),
        rounds=50,
    )
    report.add(
        ours_label() + " fused_decompress_maxsim", fused, note=f"{fused / plain:.2f}x maxsim_packed fp16"
    )
    report.finish()
    print(
        f"  goal (issue 2): faster than decompress + maxsim_packed, <= 2x maxsim_packed fp16 -> "
        f"{fused / plain:.2f}x"
    )
