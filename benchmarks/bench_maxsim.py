"""maxsim (padded documents + masks): 32 queries x 1,000 padded documents of 300 tokens, dim 48."""

from __future__ import annotations

import torch

from _data import queries
from _harness import Report, median_seconds, ours_label, quick, time_ours
from edgeplaid import ops
from edgeplaid.ops import reference


def test_padded(benchmark, peak_gflops, isa):
    n_docs = 100 if quick() else 1000
    g = torch.Generator().manual_seed(0)
    docs = torch.nn.functional.normalize(torch.randn(n_docs, 300, 48, generator=g), dim=-1)
    mask = torch.arange(300)[None, :] < torch.randint(100, 301, (n_docs, 1), generator=g)
    q = queries(32, 32, 48)
    valid = int(mask.sum())
    report = Report(
        "maxsim",
        f"32x32 vs {n_docs} padded docs of 300 (100-300 valid), dim 48",
        flops=2.0 * 32 * 32 * valid * 48,
        peak_gflops=peak_gflops,
    )
    report.add(
        "torch padded fp32 einsum (PyLate way)",
        median_seconds(lambda: reference.maxsim(q, docs, None, mask), min_rounds=1, min_seconds=0),
    )
    docs16 = docs.half()
    report.add(
        ours_label() + " fp16 docs", time_ours(benchmark, lambda: ops.maxsim(q, docs16, None, mask), 5)
    )
    report.finish()
