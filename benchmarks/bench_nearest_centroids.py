"""nearest_centroids: 100,000 tokens against 16,384 k-means centroids, dim 48 (index building).

Data: clustered tokens as benchmarks/_synthetic.py draws them (calibrated on SciFact), centroids by
edgeplaid's k-means on 2^18 of them. Contenders: torch's exhaustive fp32 matmul + argmax (what a
build without this op does), our exhaustive search (one group), and the coarse-to-fine search the
build uses (groups, members of the best groups), whose recall of the exact nearest is in the note.
"""

from __future__ import annotations

import numpy as np
import torch

import _synthetic
from _harness import Report, median_seconds, ours_label, quick, time_ours
from edgeplaid import ops
from edgeplaid.index import _codec
from edgeplaid.ops.nearest_centroids import exhaustive


def _data(n: int, n_cent: int) -> tuple[torch.Tensor, torch.Tensor]:
    need = n + 16 * n_cent
    rows, got = [], 0
    for t, _ in _synthetic.synthetic_corpus(need // 100 + 1, dim=48, seed=0):
        rows.append(t)
        got += t.shape[0]
        if got >= need:
            break
    x = np.concatenate(rows)[np.random.default_rng(0).permutation(got)]
    cents = _codec.kmeans(np.ascontiguousarray(x[n:need]), n_cent, iters=4, seed=0)
    return torch.from_numpy(np.ascontiguousarray(x[:n])), torch.from_numpy(cents)


def test_nearest_centroids(benchmark, peak_gflops, isa):
    n, n_cent = (20_000, 2048) if quick() else (100_000, 16384)
    x, cents = _data(n, n_cent)
    report = Report(
        "nearest_centroids",
        f"{n} tokens x {n_cent} centroids, dim 48, top-1",
        flops=2.0 * n * n_cent * 48,  # the exhaustive search's: GFLOP/s of the others are "effective"
        peak_gflops=peak_gflops,
    )
    xt, ct = x[:10_000], cents

    def torch_way():
        return (xt @ ct.T).argmax(dim=1)

    t_torch = median_seconds(torch_way, min_rounds=2) * n / xt.shape[0]
    report.add(
        "torch fp32 matmul + argmax (exhaustive)", t_torch, note=f"timed on {xt.shape[0]} tokens, scaled"
    )
    ex = exhaustive(cents.numpy())
    exact = ops.nearest_centroids(x, ex, 1)[1][:, 0]
    report.add(
        ours_label() + " exhaustive", median_seconds(lambda: ops.nearest_centroids(x, ex, 1), min_rounds=2)
    )
    assigner = _codec.Assigner(cents.numpy())  # what the build uses
    got = torch.from_numpy(assigner(x.numpy()))
    recall = float((got == exact).float().mean())
    report.add(
        ours_label() + f" coarse to fine ({assigner.groups.n_groups} groups, n_probe {assigner.n_probe})",
        time_ours(benchmark, lambda: assigner(x.numpy()), rounds=5),
        note=f"recall of the exact nearest {recall:.4f}; the groups are built once, not timed",
    )
    report.finish()
