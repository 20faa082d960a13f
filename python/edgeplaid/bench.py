"""``edgeplaid bench``: the kernels on this machine against the torch way, as % of its peak.

A compact, installed counterpart of the repository's ``benchmarks/`` (which also runs the
peers and records CSVs): each case times edgeplaid's op and the pure-PyTorch reference in
the same process, and reports GFLOP/s against the fp32 FMA peak measured now.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from edgeplaid import ops
from edgeplaid._native import C
from edgeplaid.ops import reference


def median_ms(fn: Callable[[], object], min_rounds: int = 5, min_seconds: float = 0.5) -> float:
    """Median wall time of fn() in ms, after one warm-up call."""
    fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_rounds or (time.perf_counter() - start < min_seconds and len(times) < 200):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def _packed_docs(n_docs: int, dim: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    offsets = ops.offsets_from_lengths(torch.randint(100, 301, (n_docs,), generator=g))
    tokens = torch.nn.functional.normalize(torch.randn(int(offsets[-1]), dim, generator=g), dim=-1)
    return tokens, offsets


def _cases(quick: bool) -> list[tuple[str, float, Callable[[], object], Callable[[], object]]]:
    """(name, flops, ours, torch) per case."""
    g = torch.Generator().manual_seed(0)
    n_docs = 100 if quick else 1000
    tokens, offsets = _packed_docs(n_docs, 48, g)
    tokens16 = tokens.half()
    q = torch.nn.functional.normalize(torch.randn(1, 32, 48, generator=g), dim=-1)
    cand = torch.arange(n_docs)[None]
    padded, mask = reference.pad_documents(tokens, offsets, cand[0])
    n_tokens = int(offsets[-1])
    n_cent = 8192 if quick else 65536
    cents = torch.nn.functional.normalize(torch.randn(n_cent, 48, generator=g), dim=-1)
    codes = torch.randint(0, n_cent, (n_tokens,), generator=g, dtype=torch.int32)
    residuals = torch.randint(0, 256, (n_tokens, 24), generator=g, dtype=torch.uint8)
    weights = torch.linspace(-0.05, 0.05, 16)
    rerank_flops = 2.0 * 32 * n_tokens * 48
    return [
        (
            f"maxsim_packed rerank 1x32 vs {n_docs} docs, dim 48, fp16",
            rerank_flops,
            lambda: ops.maxsim_packed(q, tokens16, offsets, cand),
            lambda: reference.maxsim(q, padded, None, mask),
        ),
        (
            f"fused_decompress_maxsim rerank, nbits 4, {n_cent} centroids",
            rerank_flops,
            lambda: ops.fused_decompress_maxsim(q, codes, residuals, offsets, cand, cents, weights, 4),
            lambda: reference.fused_decompress_maxsim(q, codes, residuals, offsets, cand, cents, weights, 4),
        ),
        (
            f"centroid_scores 32 x {n_cent}, dim 48, n_probe 4",
            2.0 * 32 * n_cent * 48,
            lambda: ops.centroid_scores(q, cents, 4),
            lambda: reference.centroid_scores(q, cents, 4),
        ),
    ]


def run_benchmarks(
    quick: bool = False, plot: str | None = None, log: Callable[[str], Any] | None = print
) -> list[dict[str, Any]]:
    """Runs every case; returns one row per case and writes a bar plot to ``plot`` (PNG) when
    matplotlib is installed."""
    peak = float(C.peak_gflops(0.5)) if C is not None else float("nan")
    isa = C.cpu_isa() if C is not None else "none"
    rows = []
    if log:
        threads = C.get_num_threads() if C is not None else 1
        log(f"fp32 FMA peak measured now: {peak:.0f} GFLOP/s ({isa}, {threads} threads)")
    for name, flops, ours, torch_way in _cases(quick):
        ours_ms, torch_ms = median_ms(ours), median_ms(torch_way, min_rounds=3)
        gflops = flops / ours_ms / 1e6
        row = {
            "case": name,
            "edgeplaid_ms": round(ours_ms, 4),
            "torch_ms": round(torch_ms, 4),
            "speedup": round(torch_ms / ours_ms, 2),
            "gflops": round(gflops, 1),
            "pct_of_peak": round(100 * gflops / peak, 1),
            "isa": isa,
        }
        rows.append(row)
        if log:
            log(
                f"  {name:<58} {ours_ms:9.3f} ms  {gflops:7.1f} GFLOP/s {row['pct_of_peak']:5.1f}% of peak"
                f"  torch {torch_ms:9.3f} ms  x{row['speedup']}"
            )
    if plot:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            if log:
                log("(no plot: matplotlib is not installed)")
            return rows
        fig, ax = plt.subplots(figsize=(8, 0.6 + 0.5 * len(rows)))
        ax.barh([r["case"] for r in rows], [r["pct_of_peak"] for r in rows], color="#3a7")
        ax.set_xlabel(f"% of fp32 FMA peak ({peak:.0f} GFLOP/s, {isa})")
        ax.set_xlim(0, 100)
        for i, r in enumerate(rows):
            ax.text(r["pct_of_peak"] + 1, i, f"x{r['speedup']} vs torch", va="center", fontsize=8)
        fig.tight_layout()
        fig.savefig(plot, dpi=120)
        plt.close(fig)
        if log:
            log(f"plot written to {plot}")
    return rows
