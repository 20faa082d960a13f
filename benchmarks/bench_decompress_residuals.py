"""decompress_residuals: 1M tokens, dim 48, nbits 2/4, to fp16 and fp32."""

from __future__ import annotations

import pytest

from _data import compressed
from _harness import Report, median_seconds, ours_label, quick, time_ours
from edgeplaid import ops
from edgeplaid.ops import reference


@pytest.mark.parametrize("nbits", [4, 2])
def test_decompress(benchmark, peak_gflops, isa, nbits):
    n = 100_000 if quick() else 1_000_000
    codes, residuals, centroids, weights = compressed(n, 48, nbits)
    report = Report(
        "decompress_residuals",
        f"{n} tokens, dim 48, nbits {nbits}, fp16 out",
        bytes_moved=float(n * (4 + 48 * nbits // 8 + 2 * 48)),
        peak_gflops=peak_gflops,
    )
    c16 = centroids.half()
    report.add(
        "torch reference",
        median_seconds(
            lambda: reference.decompress_residuals(codes, residuals, c16, weights, nbits), min_rounds=2
        ),
    )
    report.add(
        ours_label(),
        time_ours(
            benchmark, lambda: ops.decompress_residuals(codes, residuals, c16, weights, nbits), rounds=10
        ),
    )
    report.finish()
