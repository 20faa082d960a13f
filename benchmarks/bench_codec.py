"""The residual codec's variants against exact late interaction (issue 18), SciFact and Cranfield.

For each variant an index is built from the collection's MiniLM-48 vectors (benchmarks/_scifact.py)
and measured against exact fp32 MaxSim over the original vectors: recall@10 of
``search_exhaustive`` (what the codec allows) and of PLAID search (the default parameters),
nDCG@10, bytes per original token (all files), build time, and the p50 of one query at a time,
timed query by query with the variants alternating (runs one after the other drift on a shared
machine). "Simulated" rows are codecs not shipped (they need a per-query transform): the default
build's centroids and codes, the residuals quantised the variant's way, exhaustive exact MaxSim
over the reconstructed tokens (what ``search_exhaustive`` over such an index would return).

Usage: ``python benchmarks/bench_codec.py [--collections scifact,cranfield] [--no-simulated]``;
rows appended to ``benchmarks/results/codec.csv``. Under EDGEPLAID_BENCH_QUICK=1 (CI) a small
synthetic corpus and two variants, nothing recorded.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import _harness  # noqa: E402
import _scifact  # noqa: E402
import _synthetic  # noqa: E402
from edgeplaid import Index  # noqa: E402
from edgeplaid.index import _codec  # noqa: E402
from edgeplaid.ops import maxsim_packed  # noqa: E402

RESULTS = HERE / "results" / "codec.csv"
K = 10

# (name, Index.build keywords); "2x" centroids: twice the default count
VARIANTS: list[tuple[str, dict[str, Any]]] = [
    ("quantile nbits 4 (colbert-ai, before)", {"nbits": 4, "buckets": "quantile"}),
    ("lloyd_max nbits 4 (default)", {"nbits": 4}),
    ("lloyd_max nbits 4, 2x centroids", {"nbits": 4, "n_centroids": "2x"}),
    ("lloyd_max nbits 4, kmeans_iters 10", {"nbits": 4, "kmeans_iters": 10}),
    ("quantile nbits 2", {"nbits": 2, "buckets": "quantile"}),
    ("lloyd_max nbits 2", {"nbits": 2}),
    ("lloyd_max nbits 4, pool_factor 2", {"nbits": 4, "pool_factor": 2}),
    ("lloyd_max nbits 2, pool_factor 1.5", {"nbits": 2, "pool_factor": 1.5}),
]
SIMULATED = ("per-dimension scale + lloyd_max", "random rotation + lloyd_max", "per-dimension lloyd_max")


def _data(name: str) -> dict:
    if _harness.quick():
        batches = list(_synthetic.synthetic_corpus(300, 48, n_topics=64, seed=0))
        q, _ = _synthetic.synthetic_queries(16, 300, 48, n_topics=64, seed=0, query_len=16)
        tokens = np.concatenate([b[0] for b in batches])
        doclens = np.concatenate([b[1] for b in batches])
        mask = np.ones(q.shape[:2], dtype=bool)
        return {"doc_tokens": tokens, "doclens": doclens, "queries": q, "queries_mask": mask, "qrels": None}
    return _scifact.embeddings(48, name)


def ndcg(top: np.ndarray, data: dict) -> float:
    """Mean nDCG@10 (graded gains, trec_eval's definition) of ranked corpus positions."""
    if data["qrels"] is None:
        return float("nan")
    ids, out = data["doc_ids"], []
    for row, qid in zip(top.tolist(), data["query_ids"], strict=True):
        rel = data["qrels"].get(qid, {})
        dcg = sum(rel.get(ids[d], 0) / np.log2(i + 2) for i, d in enumerate(row[:K]) if d >= 0)
        ideal = sorted(rel.values(), reverse=True)[:K]
        idcg = sum(g / np.log2(i + 2) for i, g in enumerate(ideal))
        out.append(dcg / idcg if idcg > 0 else 0.0)
    return float(np.mean(out))


def recall(top: np.ndarray, truth: np.ndarray) -> float:
    hits = [len(set(a.tolist()) & set(b.tolist())) for a, b in zip(top, truth, strict=True)]
    return float(np.mean(hits)) / K


def _cell(m: dict[str, float], key: str, fmt: str) -> str:
    return format(m[key], fmt) if key in m else "–"


def _simulated(index: Index, tokens: np.ndarray, offsets: torch.Tensor, q, qm, which: str) -> np.ndarray:
    """Top-10 of exact MaxSim over tokens reconstructed by a codec that is not shipped (see the
    module docstring), on the index's centroids and codes (one segment)."""
    cents = index.centroids.float().numpy()
    codes = index.codes.numpy().astype(np.int64)
    r = tokens - cents[codes]
    rng = np.random.default_rng(0)
    held = r[rng.choice(r.shape[0], size=min(r.shape[0], 26_000), replace=False)]
    nbits = index.nbits
    if which == "per-dimension lloyd_max":
        rh = np.empty_like(r)
        for d in range(r.shape[1]):
            _, c, w = _codec.fit_buckets(held[:, d : d + 1], nbits)
            rh[:, d] = w[np.searchsorted(c, r[:, d])]
    else:
        rot = np.eye(r.shape[1], dtype=np.float32)
        if which.startswith("random rotation"):
            rot = np.linalg.qr(rng.standard_normal((r.shape[1], r.shape[1])))[0].astype(np.float32)
        hr, rr = held @ rot.T, r @ rot.T
        s = np.abs(hr).mean(0) if which.startswith("per-dimension scale") else np.ones(r.shape[1], np.float32)
        _, c, w = _codec.fit_buckets(hr / s, nbits)
        rh = (w[np.searchsorted(c, rr / s)] * s) @ rot
    x = torch.nn.functional.normalize(torch.from_numpy(cents[codes] + rh), dim=1)
    return maxsim_packed(q, x, offsets, None, qm).topk(K, dim=1).indices.numpy()


def _p50s(indexes: dict[str, Index], q: torch.Tensor, qm: torch.Tensor, repeats: int) -> dict[str, float]:
    """p50 seconds of one query at a time per variant, the variants alternating query by query
    after an untimed pass."""
    times: dict[str, list[float]] = {n: [] for n in indexes}
    for idx in indexes.values():
        idx.search(q, K, queries_mask=qm)
    for _ in range(repeats):
        for i in range(q.shape[0]):
            for n, idx in indexes.items():
                t = time.perf_counter()
                idx.search(q[i : i + 1], K, queries_mask=qm[i : i + 1])
                times[n].append(time.perf_counter() - t)
    return {n: float(np.median(t)) for n, t in times.items()}


def run(names: tuple[str, ...] = ("scifact", "cranfield"), simulated: bool = True) -> list[dict]:
    quick = _harness.quick()
    variants = VARIANTS[:2] if quick else VARIANTS
    rows: list[dict] = []
    root = Path(tempfile.mkdtemp(prefix="edgeplaid-codec-"))
    for name in names[:1] if quick else names:
        data = _data(name)
        tokens, doclens = data["doc_tokens"], data["doclens"]
        q, qm = torch.from_numpy(data["queries"]), torch.from_numpy(data["queries_mask"])
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), torch.from_numpy(doclens).cumsum(0)])
        exact = maxsim_packed(q, torch.from_numpy(tokens), offsets, None, qm).topk(K, dim=1).indices.numpy()
        n_tok = tokens.shape[0]
        label = "synthetic (quick)" if quick else name
        print(f"\n{label}: {doclens.shape[0]} docs, {n_tok} tokens, {q.shape[0]} queries; ", end="")
        print(f"exact fp32 MaxSim nDCG@10 {ndcg(exact, data):.4f}", flush=True)
        table: dict[str, dict[str, float]] = {}
        indexes: dict[str, Index] = {}
        for vname, kw in variants:
            kw = dict(kw)
            if kw.get("n_centroids") == "2x":
                kw["n_centroids"] = 2 * _codec.num_centroids(n_tok)
            t = time.perf_counter()
            idx = Index.build(root / f"{name}-{len(indexes)}", tokens, doclens, progress=False, **kw)
            build_s = time.perf_counter() - t
            ex = idx.search_exhaustive(q, K, qm).ids.numpy()
            pl = idx.search(q, K, queries_mask=qm).ids.numpy()
            indexes[vname] = idx
            table[vname] = {
                "recall_exhaustive": recall(ex, exact),
                "recall_plaid": recall(pl, exact),
                "recall_plaid_vs_exhaustive": recall(pl, ex),
                "ndcg_exhaustive": ndcg(ex, data),
                "ndcg_plaid": ndcg(pl, data),
                "bytes_per_token": idx.nbytes() / n_tok,
                "build_s": build_s,
            }
        for vname, p50 in _p50s(indexes, q, qm, 1 if quick else 2).items():
            table[vname]["p50_ms"] = p50 * 1e3
        if simulated and not quick:
            default = indexes["lloyd_max nbits 4 (default)"]
            for which in SIMULATED:
                top = _simulated(default, tokens, offsets, q, qm, which)
                table[f"simulated: {which}"] = {
                    "recall_exhaustive": recall(top, exact),
                    "ndcg_exhaustive": ndcg(top, data),
                    "bytes_per_token": table["lloyd_max nbits 4 (default)"]["bytes_per_token"],
                }
        print(
            "| variant | recall@10 exhaustive | recall@10 PLAID | nDCG@10 PLAID | bytes/token "
            "| build s | p50 ms |\n|---|---:|---:|---:|---:|---:|---:|"
        )
        before = table[variants[0][0]].get("p50_ms", float("nan"))
        for vname, m in table.items():
            p50 = f"{m['p50_ms']:.2f} (x{m['p50_ms'] / before:.2f})" if "p50_ms" in m else "–"
            print(
                f"| {vname} | {_cell(m, 'recall_exhaustive', '.4f')} | {_cell(m, 'recall_plaid', '.4f')} "
                f"| {_cell(m, 'ndcg_plaid', '.4f')} | {_cell(m, 'bytes_per_token', '.1f')} "
                f"| {_cell(m, 'build_s', '.1f')} | {p50} |"
            )
            for key, value in m.items():
                rows.append({"case": f"{name} {vname} {key}", "value": value, "unit": "", "baseline": ""})
        indexes.clear()
    return rows


@pytest.mark.benchmark
def test_codec_variants():
    if not _harness.quick() and not (_scifact.DATA / "corpus.jsonl").exists():
        pytest.skip("../shared/data is not here")
    rows = run()
    assert rows
    if not _harness.quick():
        _harness.append_cases(RESULTS, rows)


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--collections", default="scifact,cranfield")
    ap.add_argument("--no-simulated", action="store_true")
    a = ap.parse_args()
    out = run(tuple(a.collections.split(",")), simulated=not a.no_simulated)
    if not _harness.quick():
        _harness.append_cases(RESULTS, out)
