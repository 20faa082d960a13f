"""PLAID search end to end on the GPU: the index loaded with ``device="cuda"``, every stage on
the Triton kernels, the glue in torch on the GPU.

Corpus: the synthetic clustered 48-dim tokens of benchmarks/_synthetic.py (10,000 documents,
about 1.3M tokens; 2,000 in quick mode), built once on the host CPU (not timed here). Queries:
32 tokens each, near one document's topics.

Reported, all in the same run: p50/p90 latency of one query at a time (the result copied to the
host, as a service would), batched queries/s (all queries in one call), recall@10 and top-1
agreement against exhaustive MaxSim over the same index on the GPU, and the same figures for
the CPU pipeline (the C++ kernels on the host's cores) over the same index as the baseline.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from _gpu import GpuReport, device_name, needs_cuda
from _harness import quick
from _synthetic import synthetic_corpus, synthetic_queries
from edgeplaid import Index

pytestmark = needs_cuda


def _timed(fn, n: int) -> list[float]:
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        fn(i)
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def _recall(got: torch.Tensor, want: torch.Tensor) -> tuple[float, float]:
    g, w = got.cpu().tolist(), want.cpu().tolist()
    recall = float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(g, w, strict=True)]))
    top1 = float(np.mean([a[0] == b[0] for a, b in zip(g, w, strict=True)]))
    return recall, top1


def _measure(idx: Index, q: torch.Tensor, n_single: int) -> dict[str, float]:
    sync = torch.cuda.synchronize if idx.device.type == "cuda" else (lambda: None)

    def one(i: int) -> None:
        idx.search(q[i : i + 1], k=10).ids.cpu()  # the result reaches the host, as a service's

    for i in range(5):  # warm-up: autotuning and compilation happen here
        one(i)
    lat = _timed(one, n_single)
    sync()
    t0 = time.perf_counter()
    res = idx.search(q, k=10)
    res.ids.cpu()
    batched_s = time.perf_counter() - t0
    exact = idx.search_exhaustive(q, k=10)
    recall, top1 = _recall(res.ids, exact.ids)
    lat.sort()
    return {
        "p50": statistics.median(lat),
        "p90": lat[int(0.9 * (len(lat) - 1))],
        "qps": q.shape[0] / batched_s,
        "recall": recall,
        "top1": top1,
    }


@pytest.mark.benchmark
def test_search_gpu() -> None:
    n_docs = 2_000 if quick() else 10_000
    n_queries = 64 if quick() else 256
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "idx"
        t0 = time.perf_counter()
        cpu = Index.build(path, synthetic_corpus(n_docs, batch_docs=4096), progress=False)
        build_s = time.perf_counter() - t0
        q_np, _ = synthetic_queries(n_queries, n_docs)
        q = torch.from_numpy(q_np)
        gpu = Index.load(path, device="cuda")
        g = _measure(gpu, q.cuda(), n_single=min(100, n_queries))
        c = _measure(cpu, q, n_single=min(100, n_queries))
        case = (
            f"gpu search, {n_docs} synthetic docs ({cpu.n_tokens / 1e6:.2f}M tokens, dim 48, nbits 4), "
            f"k=10, {n_queries} queries x 32 tokens"
        )
        report = GpuReport("search_gpu", case, flops=0.0, bytes_moved=0.0)
        for name, m in (("edgeplaid triton (cuda)", g), ("edgeplaid cpp (host CPU)", c)):
            note = (
                f"p90 {m['p90']:.2f} ms; batched {m['qps']:.0f} QPS; recall@10 vs exhaustive "
                f"{m['recall']:.3f}; top-1 {m['top1']:.3f}; build {build_s:.0f} s on the host"
            )
            row = report.add_ms(name, m["p50"], note)
            if "host" in name:
                row["device"] = "host CPU of " + device_name()
                row["isa"] = ""
        report.finish(baseline="edgeplaid cpp")
        print(
            f"  GPU vs host CPU: p50 x{c['p50'] / g['p50']:.2f}, batched QPS x{g['qps'] / c['qps']:.2f}; "
            f"GPU recall@10 {g['recall']:.3f} (CPU {c['recall']:.3f})"
        )
        assert g["top1"] >= 0.9, g
