"""centroid_scores: 32 query tokens x 65,536 centroids, dim 48, with top-n_probe."""

from __future__ import annotations

import pytest
import torch

from _harness import Report, median_seconds, ours_label, quick, time_ours
from edgeplaid import ops


@pytest.mark.parametrize("n_probe", [4, 32])
def test_centroid_scores(benchmark, peak_gflops, isa, n_probe):
    n_centroids = 8192 if quick() else 65536
    g = torch.Generator().manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(1, 32, 48, generator=g), dim=-1)
    centroids = torch.nn.functional.normalize(torch.randn(n_centroids, 48, generator=g), dim=-1)
    report = Report(
        "centroid_scores",
        f"32 tokens x {n_centroids} centroids, dim 48, n_probe {n_probe}",
        flops=2.0 * 32 * n_centroids * 48,
        bytes_moved=4.0 * n_centroids * (48 + 32),
        peak_gflops=peak_gflops,
    )

    def torch_way():
        s = q[0] @ centroids.T
        return s, s.topk(n_probe, dim=-1).indices

    report.add("torch fp32 matmul + topk", median_seconds(torch_way))
    report.add(
        ours_label() + " (fresh output)",
        time_ours(benchmark, lambda: ops.centroid_scores(q, centroids, n_probe), rounds=50),
    )
    out = torch.empty(1, 32, n_centroids)
    from edgeplaid._native import C

    qn, cn, on = q.numpy(), centroids.numpy(), out.numpy()
    report.add(
        ours_label() + " (reused output buffer)",
        median_seconds(lambda: C.centroid_scores(qn, None, cn, "float32", n_probe, on)),
        note="_C call with scores_out",
    )
    report.finish()
