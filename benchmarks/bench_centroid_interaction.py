"""centroid_interaction: 1 query x 32 tokens, 65,536 centroids, 5,000 candidate documents."""

from __future__ import annotations

import pytest
import torch

from _data import packed_documents, queries
from _harness import Report, median_seconds, ours_label, quick, time_ours
from edgeplaid import ops
from edgeplaid.ops import reference


@pytest.mark.parametrize("threshold", [None, 0.4])
def test_interaction(benchmark, peak_gflops, isa, threshold):
    n_docs, n_centroids = (500, 8192) if quick() else (5000, 65536)
    _, offsets = packed_documents(n_docs, 8)
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, n_centroids, (int(offsets[-1]),), generator=g, dtype=torch.int32)
    centroids = torch.nn.functional.normalize(torch.randn(n_centroids, 48, generator=g), dim=-1)
    scores, _ = ops.centroid_scores(queries(1, 32, 48), centroids, 1)
    report = Report(
        "centroid_interaction",
        f"32 tokens, {n_centroids} centroids, {n_docs} docs, threshold {threshold}",
        bytes_moved=float(offsets[-1] * (4 + 32 * 4)),
        peak_gflops=peak_gflops,
    )
    report.add(
        "torch reference",
        median_seconds(
            lambda: reference.centroid_interaction(scores, codes, offsets, None, threshold), min_rounds=2
        ),
    )
    report.add(
        ours_label(),
        time_ours(
            benchmark, lambda: ops.centroid_interaction(scores, codes, offsets, None, threshold), rounds=20
        ),
    )
    report.finish()
