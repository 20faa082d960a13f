"""compress_residuals: 1M tokens, dim 48, nbits 2/4, fp32 in (index building's pass 2 after assignment)."""

from __future__ import annotations

import pytest
import torch

from _harness import Report, median_seconds, ours_label, quick, time_ours
from edgeplaid import ops
from edgeplaid.ops import reference


@pytest.mark.parametrize("nbits", [4, 2])
def test_compress(benchmark, peak_gflops, isa, nbits):
    n = 100_000 if quick() else 1_000_000
    n_cent, dim = 16384, 48
    g = torch.Generator().manual_seed(0)
    cents = torch.nn.functional.normalize(torch.randn(n_cent, dim, generator=g), dim=-1)
    codes = torch.randint(0, n_cent, (n,), generator=g)
    noise = torch.nn.functional.normalize(torch.randn(n, dim, generator=g), dim=-1)
    tokens = torch.nn.functional.normalize(cents[codes] + 0.4 * noise, dim=-1)
    b = 1 << nbits
    sample = (tokens[:100_000] - cents[codes[:100_000]]).flatten()
    cutoffs = torch.quantile(sample[:4_000_000], torch.arange(1, b) / b)
    weights = torch.quantile(sample[:4_000_000], (torch.arange(b) + 0.5) / b)
    report = Report(
        "compress_residuals",
        f"{n} tokens, dim {dim}, nbits {nbits}, {n_cent} centroids",
        # reads the token and its centroid (fp32), writes the packed row and inv_norm
        bytes_moved=float(n * (4 * dim * 2 + dim * nbits // 8 + 4 + 8)),
        peak_gflops=peak_gflops,
    )

    def torch_way():  # what the build did before this op: bucketize + pack, then the norms
        r = tokens - cents[codes]
        buckets = torch.bucketize(r, cutoffs)
        packed = reference.pack_residuals(buckets, nbits)
        return packed, reference.residual_inv_norms(codes, packed, cents, weights, nbits)

    report.add("torch bucketize + pack + residual_inv_norms", median_seconds(torch_way, min_rounds=2))
    report.add(
        ours_label(),
        time_ours(
            benchmark,
            lambda: ops.compress_residuals(tokens, codes, cents, cutoffs, weights, nbits),
            rounds=10,
        ),
    )
    report.finish()
