"""Sharded search on Ray (issue 20): quality and latency against a single index, and the inputs
of the scaling model in benchmarks/scaling.md.

    python benchmarks/bench_distributed.py                      # SciFact, 1/2/4 shards
    python benchmarks/bench_distributed.py --shards 4

SciFact (48-dim MiniLM stand-in vectors of ``_scifact.py``, 5,183 documents, 300 queries), on a
local Ray cluster of this machine's CPUs. For each shard count: the build (driver pass + codec +
parallel shard tasks) against a single build; recall@10 of the sharded PLAID search and of the
single index's own PLAID search against the single index's ``search_exhaustive``; whether the
sharded exhaustive search equals the single one (ids and scores); nDCG@10; and, one query at a
time with every variant timed interleaved query by query (p50, p95):

- ``single``: ``Index.search`` in this process (2 threads);
- ``sharded``: ``ShardedIndex.search`` (put the query, one actor call per shard, gather, merge);
- ``fan-out``: a no-op call to every shard actor, gathered (Ray's own cost of the scatter-gather);
- ``shard``: one shard's own ``Index.search`` in this process (the work each actor does);
- ``merge``: :func:`merge_topk` of the shards' lists.

Batched: all queries in one call, queries/s. Also each shard actor's resident memory. A shard's
own latency as its size grows is bench_search_scale.py's (``--sizes ... --profile``: the time of
each stage). Rows append to benchmarks/results/distributed.csv.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import _harness
import _scifact
import _synthetic
from edgeplaid import Index
from edgeplaid.eval.metrics import evaluate, to_run

RESULTS = _harness.RESULTS / "distributed.csv"
K = 10


def _recall(top: list[list], truth: list[list]) -> float:
    return float(np.mean([len(set(t) & set(g)) / len(t) for t, g in zip(truth, top, strict=True)]))


def _row(rows: list[dict], case: str, value: float, unit: str = "", baseline: str = "") -> None:
    print(f"  {case:<58} {value:12.4f} {unit} {baseline}", flush=True)
    rows.append({"case": case, "value": value, "unit": unit, "baseline": baseline})


def _data(quick: bool) -> dict:
    if not quick:
        return _scifact.embeddings(48)
    n = 600
    tokens, doclens = zip(*_synthetic.synthetic_corpus(n, batch_docs=n), strict=True)
    q, _ = _synthetic.synthetic_queries(40, n)
    return {
        "doc_tokens": np.concatenate(tokens),
        "doclens": np.concatenate(doclens),
        "doc_ids": [f"s{i}" for i in range(n)],
        "queries": q,
        "queries_mask": np.ones(q.shape[:2], dtype=bool),
        "query_ids": [f"q{i}" for i in range(q.shape[0])],
        "qrels": None,
    }


def _p(ts: list[float], pct: float) -> float:
    return float(np.percentile(np.asarray(ts) * 1e3, pct))


def run_scifact(shard_counts: tuple[int, ...], root: Path, quick: bool) -> list[dict]:
    import ray

    from edgeplaid.distributed import ShardedIndex, connect, merge_topk

    rows: list[dict] = []
    data = _data(quick)
    tokens, doclens, ids = data["doc_tokens"], data["doclens"], data["doc_ids"]
    q, qm = torch.from_numpy(data["queries"]), torch.from_numpy(data["queries_mask"])
    nq = q.shape[0]
    print(f"{'synthetic (quick)' if quick else 'SciFact'}: {len(ids)} documents, {tokens.shape[0]} tokens")
    connect("local", num_cpus=os.cpu_count())
    t0 = time.perf_counter()
    single = Index.build(root / "single", tokens, doclens, ids=ids, progress=False)
    t_single = time.perf_counter() - t0
    _row(rows, "single build", t_single, "s")
    exact = single.search_exhaustive(q, k=K, queries_mask=qm)
    plain = single.search(q, k=K, queries_mask=qm)
    _row(rows, "single PLAID recall@10 vs exhaustive", _recall(plain.user_ids, exact.user_ids))
    if data["qrels"] is not None:
        qids = data["query_ids"]
        nd = evaluate(to_run(qids, plain.user_ids, plain.scores.numpy()), data["qrels"])["nDCG@10"]
        _row(rows, "single nDCG@10", nd)
    for n in shard_counts:
        t0 = time.perf_counter()
        sh = ShardedIndex.build(root / f"sh{n}", tokens, doclens, ids=ids, n_shards=n, progress=False)
        t_build = time.perf_counter() - t0
        tag = f"{n} shards"
        _row(rows, f"{tag}: build (incl. actor start)", t_build, "s", f"single {t_single:.1f} s")
        for stage, secs in sh.build_timings["timings"].items():
            _row(rows, f"{tag}: build stage {stage}", secs, "s")
        ex = sh.search_exhaustive(q, k=K, queries_mask=qm)
        same = ex.user_ids == exact.user_ids and torch.equal(ex.scores, exact.scores)
        _row(rows, f"{tag}: exhaustive equals single (1 = ids and scores)", float(same))
        res = sh.search(q, k=K, queries_mask=qm)
        _row(rows, f"{tag}: PLAID recall@10 vs single exhaustive", _recall(res.user_ids, exact.user_ids))
        if data["qrels"] is not None:
            nd = evaluate(to_run(data["query_ids"], res.user_ids, res.scores.numpy()), data["qrels"])[
                "nDCG@10"
            ]
            _row(rows, f"{tag}: nDCG@10", nd)
        # one query at a time, every variant interleaved query by query
        shard0 = Index.load(root / f"sh{n}" / "shard-0000")
        actors = sh._actors
        times: dict[str, list[float]] = {k: [] for k in ("single", "sharded", "fan-out", "shard", "merge")}
        for _ in range(2):  # warm-up pass
            for i in range(min(nq, 20)):
                sh.search(q[i : i + 1], k=K, queries_mask=qm[i : i + 1])
                single.search(q[i : i + 1], k=K, queries_mask=qm[i : i + 1])
        for i in range(nq):
            qi, mi = q[i : i + 1], qm[i : i + 1]
            t = time.perf_counter()
            single.search(qi, k=K, queries_mask=mi)
            times["single"].append(time.perf_counter() - t)
            t = time.perf_counter()
            sh.search(qi, k=K, queries_mask=mi)
            times["sharded"].append(time.perf_counter() - t)
            t = time.perf_counter()
            ray.get([a.pid.remote() for a in actors])
            times["fan-out"].append(time.perf_counter() - t)
            t = time.perf_counter()
            shard0.search(qi, k=K, queries_mask=mi)
            times["shard"].append(time.perf_counter() - t)
            parts = [(r.scores.numpy(), r.user_ids) for r in [shard0.search(qi, k=K, queries_mask=mi)] * n]
            t = time.perf_counter()
            merge_topk(parts, K)
            times["merge"].append(time.perf_counter() - t)
        for name, ts in times.items():
            base = "" if name == "single" else f"single p50 {_p(times['single'], 50):.3f} ms"
            _row(rows, f"{tag}: p50 {name}", _p(ts, 50), "ms", base)
            _row(rows, f"{tag}: p95 {name}", _p(ts, 95), "ms")
        # batched: every query in one call
        for name, fn in (
            ("single", lambda: single.search(q, k=K, queries_mask=qm)),
            ("sharded", lambda: sh.search(q, k=K, queries_mask=qm)),  # noqa: B023
        ):
            fn()
            best = min(_timed(fn) for _ in range(3))
            _row(rows, f"{tag}: batched {name}", nq / best, "queries/s")
        for i, info in enumerate(sh.shard_info()):
            _row(
                rows,
                f"{tag}: shard {i} actor RSS",
                info["rss_bytes"] / 2**20,
                "MiB",
                f"{info['n_tokens']} tokens",
            )
            _row(rows, f"{tag}: shard {i} bytes per token", info["nbytes"] / max(info["n_tokens"], 1), "B")
        sh.close()
    ray.shutdown()
    return rows


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


@pytest.mark.benchmark
def test_distributed_smoke():
    """The benchmark runs (tiny synthetic corpus, 2 shards); nothing recorded in quick mode."""
    pytest.importorskip("ray")
    root = Path(tempfile.mkdtemp(prefix="edgeplaid-dist-"))
    try:
        rows = run_scifact((2,), root, quick=_harness.quick())
        same = next(r for r in rows if "exhaustive equals single" in r["case"])
        assert same["value"] == 1.0
        if not _harness.quick():
            _harness.append_cases(RESULTS, rows)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", type=int, nargs="+", default=[1, 2, 4])
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="edgeplaid-dist-"))
    try:
        _harness.append_cases(RESULTS, run_scifact(tuple(args.shards), root, False))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
