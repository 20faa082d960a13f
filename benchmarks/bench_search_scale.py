"""PLAID search at scale: how latency and quality grow with the corpus (issue 14).

Data: synthetic clustered 48-dim tokens (``_synthetic.py``): a few thousand topic directions,
each document's 60-200 tokens near 4 of them, each query's 32 tokens near one document's topics.

Run: ``python benchmarks/bench_search_scale.py --sizes 5000 50000 500000 [--profile]`` (or through
pytest with ``-m benchmark``; ``EDGEPLAID_BENCH_QUICK=1`` shrinks it to a smoke run that writes no
CSV). For each corpus size it reports: build time and tokens/s (when this run built the index),
p50/p90 latency of ``Index.search(Q, k=10)`` one query at a time after a warm-up (per query the best
of ``--repeats`` passes, interleaved across the sizes: the machine is shared), batched QPS (all
queries in one call, best pass), top-1 agreement and recall@10 against ``Index.search_exhaustive``
(on the first ``--exhaustive-queries`` queries only at large sizes, where exhaustive MaxSim costs
seconds a query), the RSS of a fresh process searching the index ``load(mmap=True)``, and p50(size)
/ p50(smallest size). ``--profile`` adds the time per stage of the pipeline (see
:func:`stage_profile`). Rows append to ``benchmarks/results/search_scale.csv``.

Indexes: ``--index-dir`` (default /tmp/edgeplaid_scale, or $EDGEPLAID_SCALE_DIR) holding
``idx_5k``, ``idx_50k``, ``idx_500k`` built from ``synthetic_corpus(n, seed=--seed)`` are reused
when their manifest has the asked n_docs; otherwise the benchmark builds the index itself (and
times it), except past ``--max-build-tokens`` (a 65M-token build is a long job: build it once,
outside the benchmark, and point ``--index-dir`` at it).
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import _harness
import _synthetic
import edgeplaid
from edgeplaid import Index
from edgeplaid._native import C

HERE = Path(__file__).parent
RESULTS = HERE / "results" / "search_scale.csv"
K = 10
DIM = 48
# Issue 14's bar: p50 at 500,000 documents <= 6x the one at 5,000, top-1 agreement >= 0.95.
GOAL_P50_RATIO = 6.0
GOAL_TOP1 = 0.95
# Past this many tokens the benchmark does not build an index itself: at today's build speed
# (13k tokens/s at 6.5M tokens, ANCHORS.md) 65M tokens would take hours.
MAX_BUILD_TOKENS = 10_000_000
# Exhaustive MaxSim reads every token of the corpus per query: above this many tokens only the
# first --exhaustive-queries queries are checked against it.
EXHAUSTIVE_ALL_TOKENS = 10_000_000
FULL_SIZES = [5000, 50_000, 500_000]
# Quick mode: a few seconds of building.
QUICK_SIZES = [300, 2000]


def code_commit() -> str:
    """The commit of the edgeplaid that was imported, "-dirty" when its python/ or csrc/ differ
    from it: the search code under measurement changes while others work in the same tree, and a
    measurement of a snapshot (PYTHONPATH) is not one of the benchmark's own checkout."""
    pkg = Path(edgeplaid.__file__).resolve().parent
    try:
        root = subprocess.run(
            ["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True, cwd=pkg, check=True
        ).stdout.strip()
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=root, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", "python", "csrc"],
            capture_output=True,
            text=True,
            cwd=root,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return f"{_harness.commit()} (edgeplaid from {pkg})"
    return head + ("-dirty" if dirty else "")


def index_name(n_docs: int) -> str:
    return f"idx_{n_docs // 1000}k" if n_docs % 1000 == 0 else f"idx_{n_docs}"


def _rss_status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def find_index(index_dir: Path, n_docs: int) -> Index | None:
    """The prebuilt index of n_docs documents under index_dir, or None (absent, partly written,
    or of another size)."""
    path = index_dir / index_name(n_docs)
    if not path.is_dir():
        return None
    try:
        idx = Index.load(path, mmap=True)
    except Exception as e:  # an index being written by another process, an old format...
        print(f"  {path}: not usable ({e})")
        return None
    if idx.n_docs != n_docs or idx.dim != DIM:
        print(f"  {path}: has n_docs={idx.n_docs}, dim={idx.dim}; wanted {n_docs}, {DIM}")
        return None
    return idx


def build_index(path: Path, n_docs: int, seed: int) -> tuple[Index, float]:
    """Builds from the generator's batches (bounded memory) and returns the index and seconds."""
    t = time.perf_counter()
    idx = Index.build(
        path,
        _synthetic.synthetic_corpus(n_docs, dim=DIM, seed=seed),
        None,
        nbits=4,
        overwrite=True,
        progress=False,
    )
    return idx, time.perf_counter() - t


def queries_for(n_docs: int, n_queries: int, seed: int) -> tuple[torch.Tensor, np.ndarray]:
    """(n_queries, 32, dim) float32 queries and the document each was drawn from."""
    q, sources = _synthetic.synthetic_queries(n_queries, n_docs, dim=DIM, seed=seed)
    return torch.as_tensor(np.ascontiguousarray(q), dtype=torch.float32), sources


def latency(idx: Index, queries: torch.Tensor) -> tuple[np.ndarray, list[list[int]]]:
    """Seconds per query, one query per call; and the top-k ids."""
    times = np.empty(queries.shape[0])
    ids: list[list[int]] = []
    for i in range(queries.shape[0]):
        t = time.perf_counter()
        r = idx.search(queries[i : i + 1], K)
        times[i] = time.perf_counter() - t
        ids.append(r.ids[0].tolist())
    return times, ids


def batched_seconds(idx: Index, queries: torch.Tensor) -> tuple[float, list[list[int]]]:
    """Seconds for all queries in one call; and the top-k ids."""
    t = time.perf_counter()
    r = idx.search(queries, K)
    return time.perf_counter() - t, r.ids.tolist()


def agreement(got: list[list[int]], want: list[list[int]]) -> tuple[float, float]:
    """(top-1 agreement, recall@10) of got against want, over want's rows."""
    top1 = np.mean([g[0] == w[0] for g, w in zip(got, want, strict=False)])
    rec = np.mean([len(set(g[:K]) & set(w[:K])) / K for g, w in zip(got, want, strict=False)])
    return float(top1), float(rec)


_PROBE = """
import json, sys, numpy as np, torch, edgeplaid
def status(key):
    for line in open('/proc/self/status'):
        if line.startswith(key + ':'):
            return int(line.split()[1]) * 1024
def mapped(prefix):  # resident bytes of the files mapped from the index directory
    total, cur = 0, ''
    for line in open('/proc/self/smaps'):
        parts = line.split()
        if len(parts) >= 5 and '-' in parts[0] and ':' not in parts[0]:
            cur = parts[5] if len(parts) > 5 else ''
        elif parts[0] == 'Rss:' and cur.startswith(prefix):
            total += int(parts[1]) * 1024
    return total
index_path, tiny_path, queries_path = sys.argv[1:4]
qs = torch.from_numpy(np.load(queries_path))
tiny = edgeplaid.Index.load(tiny_path)  # one-time costs (imports, thread pool) not charged
for i in range(4):
    tiny.search(qs[i:i+1], k=10)
tiny.search(qs, k=10)
del tiny
base, anon = status('VmRSS'), status('RssAnon')
idx = edgeplaid.Index.load(index_path, mmap=True)
for i in range(qs.shape[0]):
    idx.search(qs[i:i+1], k=10)
single = mapped(index_path) + status('RssAnon') - anon
idx.search(qs, k=10)
print(json.dumps({'single': single, 'index_mapped': mapped(index_path),
                  'anon_growth': status('RssAnon') - anon, 'vmrss_growth': status('VmRSS') - base}))
"""


def rss_probe(index_path: Path, tiny_path: Path, queries: torch.Tensor, work: Path) -> dict[str, int]:
    """RSS of a fresh process that loads the index with mmap and runs every query (single, then
    batched): the index pages it touched plus its anonymous growth, the figure a server pays."""
    qpath = work / "queries.npy"
    np.save(qpath, queries.numpy())
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, str(index_path), str(tiny_path), str(qpath)],
        capture_output=True,
        text=True,
    )
    if out.returncode != 0:
        raise RuntimeError(f"RSS probe failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------- stage profile


class _Timer:
    """Inclusive and exclusive (self) time per key of nested wrapped calls: a stage's self time is
    its own Python, its children (the kernel under an op, the gathering under the candidates)
    excluded, so the self times add up to the total."""

    def __init__(self) -> None:
        self.incl: dict[str, float] = defaultdict(float)
        self.self: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._children: list[float] = []

    def wrap(self, key: Callable[..., str] | str, fn: Callable) -> Callable:
        def wrapper(*args, **kwargs):
            name = key(*args, **kwargs) if callable(key) else key
            self._children.append(0.0)
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - t
                children = self._children.pop()
                self.incl[name] += elapsed
                self.self[name] += elapsed - children
                self.calls[name] += 1
                if self._children:
                    self._children[-1] += elapsed

        return wrapper

    def clear(self) -> None:
        self.incl.clear()
        self.self.clear()
        self.calls.clear()


# (key, depth, what it is) in pipeline order; keys absent from the pipeline at hand are skipped
# (the names of edgeplaid.search._plaid before and after the validate-once rewrite are both here).
PROFILE_LAYOUT = (
    ("Index.search", 0, "total; self: the public method's checks and bundling of the queries"),
    ("PlaidSearcher.search", 1, "self: the loop's glue (output tensors, blocks, old top-k)"),
    ("stage 1 centroid_scores", 2, "self: validation + dispatch"),
    ("kernel centroid_scores", 3, "cpp kernel (GEMM + top n_probe per token)"),
    ("IVF candidates", 2, "self: PlaidSearcher._candidates"),
    ("gather", 3, "_gather_numpy: unique cells, concatenated lists, dedup"),
    ("padding", 3, "_pad / _pad_numpy"),
    ("stage 2 centroid_interaction (pruned)", 2, "self: validation + dispatch"),
    ("kernel stage 2", 3, "cpp kernel"),
    ("stage 3 centroid_interaction", 2, "self: validation + dispatch"),
    ("kernel stage 3", 3, "cpp kernel"),
    ("selection", 2, "_select / _best(ordered=False) after stages 2-3"),
    ("stage 4 fused_decompress_maxsim", 2, "self: validation + dispatch"),
    ("kernel stage 4", 3, "cpp kernel (scoring from the codes)"),
    ("final top-k", 2, "_best(ordered=True)"),
)


def stage_profile(idx: Index, queries: torch.Tensor, repeats: int = 3) -> dict[str, float]:
    """Mean ms per query of each stage of ``Index.search``, one query per call, each query's
    least disturbed of ``repeats`` passes.

    Wraps, for the duration of the call only (no file is edited), the names the pipeline in
    ``edgeplaid.search._plaid`` calls (the ops, the IVF gathering, the selection) and the ``cpp``
    kernels in the dispatch registry, timing each inclusive and exclusive of its wrapped children
    (:class:`_Timer`): an op's self time is its argument validation and dispatch, the searcher's
    self time its glue. Returns ``{key: inclusive ms}``, ``{key + " (self)": ms}``, and per query
    the candidates after the IVF and their tokens (the work of stage 2 grows with them).
    """
    from edgeplaid.ops import dispatch
    from edgeplaid.search import _plaid

    timer = _Timer()
    counts: dict[str, float] = defaultdict(float)
    offsets = np.asarray(idx.doc_offsets if hasattr(idx, "doc_offsets") else idx._searcher.doc_offsets)

    def ci_key(prefix: str) -> Callable[..., str]:
        def key(*args, **kwargs) -> str:
            threshold = kwargs.get("threshold", args[4] if len(args) > 4 else None)
            if prefix == "kernel":
                return "kernel stage 2" if threshold is not None else "kernel stage 3"
            if threshold is not None:
                return "stage 2 centroid_interaction (pruned)"
            return "stage 3 centroid_interaction"

        return key

    def best_key(*args, **kwargs) -> str:
        return "final top-k" if kwargs.get("ordered", args[3] if len(args) > 3 else False) else "selection"

    def count_candidates(fn: Callable) -> Callable:
        # outside the timers: the count reads doc_offsets, which the pipeline does not
        def wrapper(*args, **kwargs):
            out = fn(*args, **kwargs)
            c = out.numpy() if isinstance(out, torch.Tensor) else np.asarray(out)
            c = c[c >= 0]
            counts["candidates after the IVF"] += c.size
            counts["tokens of those candidates"] += int((offsets[c + 1] - offsets[c]).sum())
            return out

        return wrapper

    patches: list[tuple[object, str, object]] = []

    def patch(owner, name: str, make: Callable[[Callable], Callable]) -> None:
        if isinstance(owner, dict):
            if name in owner:
                patches.append((owner, name, owner[name]))
                owner[name] = make(owner[name])
        elif hasattr(owner, name):
            patches.append((owner, name, getattr(owner, name)))
            setattr(owner, name, make(getattr(owner, name)))

    searcher = _plaid.PlaidSearcher
    new_pipeline = hasattr(_plaid, "_pad_numpy")  # candidates padded inside _candidates
    # The staged pipeline, whose stages are what this profiles: a search otherwise runs a block
    # in one C++ call (search/_fused.py), which has no stages to wrap.
    patch(_plaid, "implements", lambda f: lambda *args, **kwargs: False)
    patch(Index, "search", lambda f: timer.wrap("Index.search", f))
    patch(searcher, "search", lambda f: timer.wrap("PlaidSearcher.search", f))
    patch(_plaid, "centroid_scores", lambda f: timer.wrap("stage 1 centroid_scores", f))
    if new_pipeline:
        patch(searcher, "_candidates", lambda f: count_candidates(timer.wrap("IVF candidates", f)))
        patch(_plaid, "_pad_numpy", lambda f: timer.wrap("padding", f))
    else:
        patch(searcher, "_candidates", lambda f: timer.wrap("IVF candidates", f))
        patch(_plaid, "_pad", lambda f: count_candidates(timer.wrap("padding", f)))
    patch(_plaid, "_gather_numpy", lambda f: timer.wrap("gather", f))
    patch(_plaid, "centroid_interaction", lambda f: timer.wrap(ci_key("op"), f))
    patch(_plaid, "_select", lambda f: timer.wrap("selection", f))
    patch(_plaid, "_best", lambda f: timer.wrap(best_key, f))
    patch(_plaid, "fused_decompress_maxsim", lambda f: timer.wrap("stage 4 fused_decompress_maxsim", f))
    registry = dispatch._registry
    patch(registry.get("centroid_scores", {}), "cpp", lambda f: timer.wrap("kernel centroid_scores", f))
    patch(registry.get("centroid_interaction", {}), "cpp", lambda f: timer.wrap(ci_key("kernel"), f))
    for op in ("fused_decompress_maxsim", "fused_decompress_maxsim_codes"):
        patch(registry.get(op, {}), "cpp", lambda f: timer.wrap("kernel stage 4", f))
    nq = queries.shape[0]
    # per pass, per query, per key: (inclusive, self) seconds
    passes: list[list[dict[str, tuple[float, float]]]] = []
    try:
        for i in range(min(8, nq)):  # warm-up, not counted
            idx.search(queries[i : i + 1], K)
        counts.clear()
        for _ in range(repeats):
            per_query = []
            for i in range(nq):
                timer.clear()
                idx.search(queries[i : i + 1], K)
                per_query.append({k: (timer.incl[k], timer.self[k]) for k in timer.incl})
            passes.append(per_query)
    finally:
        for owner, name, original in reversed(patches):
            if isinstance(owner, dict):
                owner[name] = original
            else:
                setattr(owner, name, original)
    # Per query the pass with the least total time (the others were more disturbed by the
    # machine's other tenants), then the mean over queries: the stages still add up.
    best = [min((p[i] for p in passes), key=lambda d: d["Index.search"][0]) for i in range(nq)]
    out: dict[str, float] = {}
    for key, _, _ in PROFILE_LAYOUT:
        if any(key in d for d in best):
            out[key] = sum(d.get(key, (0.0, 0.0))[0] for d in best) * 1e3 / nq
            out[key + " (self)"] = sum(d.get(key, (0.0, 0.0))[1] for d in best) * 1e3 / nq
    for key, v in counts.items():
        out["# " + key] = v / (nq * repeats)
    return out


def print_profile(n_docs: int, prof: dict[str, float]) -> None:
    total = prof.get("Index.search", 0.0)
    print(
        f"  stage profile at {n_docs:,} docs, mean ms per query (one query per call, best pass); incl = with"
    )
    print("  what it calls, self = without the stages listed under it:")
    for key, depth, what in PROFILE_LAYOUT:
        if key not in prof:
            continue
        incl, own = prof[key], prof[key + " (self)"]
        pct = f"{100 * incl / total:5.1f}%" if total else ""
        label = "  " * depth + key
        print(f"    {label:<46} incl {incl:8.3f} ms {pct}  self {own:8.3f} ms  {what}")
    for key, v in prof.items():
        if key.startswith("# "):
            print(f"    {key[2:] + ' per query':<46} {v:>13,.0f}")


# ---------------------------------------------------------------------------- the run


def run(
    sizes: list[int],
    n_queries: int = 200,
    exhaustive_queries: int = 50,
    repeats: int = 3,
    seed: int = 0,
    index_dir: Path | None = None,
    max_build_tokens: int = MAX_BUILD_TOKENS,
    keep_built: Path | None = None,
    profile: bool = False,
    threads: int = 0,
) -> list[dict]:
    if threads:
        edgeplaid.set_num_threads(threads)
    index_dir = Path(index_dir or os.environ.get("EDGEPLAID_SCALE_DIR", "/tmp/edgeplaid_scale"))
    work = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    isa = C.cpu_isa() if C is not None else "none"
    print(
        f"search at scale: sizes {sizes}, {n_queries} queries of 32 tokens, dim {DIM}, k={K}; "
        f"{edgeplaid.get_num_threads()} kernel threads, {isa}, {_harness.cpu_model()}; "
        f"prebuilt indexes from {index_dir}"
    )
    rows: list[dict] = []
    try:
        tiny, _ = build_index(work / "tiny", 200, seed)  # the RSS probe's one-time-cost baseline
        del tiny
        cases = []  # (n_docs, index, queries, sources, build seconds)
        for n_docs in sorted(sizes):
            print(f"\n{n_docs} documents:", flush=True)
            idx = find_index(index_dir, n_docs)
            build_s = float("nan")
            if idx is None:
                est = _synthetic.corpus_tokens(n_docs, dim=DIM, seed=seed)
                if est > max_build_tokens:
                    print(
                        f"  skipped: no prebuilt {index_dir / index_name(n_docs)}, and ~{est / 1e6:.0f}M "
                        f"tokens is past --max-build-tokens={max_build_tokens:,}"
                    )
                    continue
                dest = (keep_built or work) / index_name(n_docs)
                idx, build_s = build_index(dest, n_docs, seed)
                print(
                    f"  built in {build_s:.1f} s ({idx.n_tokens / build_s:,.0f} tokens/s) "
                    f"{getattr(idx, 'build_timings', '')}"
                )
            else:
                print(f"  reusing {idx.path}")
            print(
                f"  {idx.n_docs} docs, {idx.n_tokens:,} tokens, {idx.n_centroids} centroids, "
                f"{idx.nbytes() / idx.n_tokens:.1f} bytes/token ({idx.nbytes() / 1e6:.0f} MB)",
                flush=True,
            )
            cases.append((n_docs, idx, *queries_for(n_docs, n_queries, seed), build_s))
        # Timing passes interleaved across the sizes: the machine's other tenants come and go, and
        # the ratio between sizes is the figure of interest, so every size sees the same spells.
        for _, idx, queries, _, _ in cases:
            for i in range(min(8, n_queries)):  # warm-up: page in the index, first-call setup
                idx.search(queries[i : i + 1], K)
        best = {n: np.full(n_queries, np.inf) for n, *_ in cases}
        batch_best = {n: np.inf for n, *_ in cases}
        single_ids: dict[int, list[list[int]]] = {}
        batch_ids: dict[int, list[list[int]]] = {}
        for _ in range(repeats):
            for n_docs, idx, queries, _, _ in cases:
                lat, single_ids[n_docs] = latency(idx, queries)
                best[n_docs] = np.minimum(best[n_docs], lat)
                t, batch_ids[n_docs] = batched_seconds(idx, queries)
                batch_best[n_docs] = min(batch_best[n_docs], t)
        for n_docs, idx, queries, sources, build_s in cases:
            print(f"\n{n_docs} documents:", flush=True)
            lat = best[n_docs]
            mismatch = sum(a != b for a, b in zip(single_ids[n_docs], batch_ids[n_docs], strict=True))
            n_ex = n_queries if idx.n_tokens <= EXHAUSTIVE_ALL_TOKENS else min(exhaustive_queries, n_queries)
            t = time.perf_counter()
            ex = idx.search_exhaustive(queries[:n_ex], K)
            ex_s = time.perf_counter() - t
            top1, rec = agreement(single_ids[n_docs][:n_ex], ex.ids.tolist())
            # The query's source document ranked first: the one answer the data model defines
            # (beyond the few documents sharing its topics, the exhaustive top 10 holds near ties of
            # unrelated documents at small sizes, which no IVF probe reaches: recall@10 is low there).
            source1 = float(np.mean([r[0] == s for r, s in zip(single_ids[n_docs], sources, strict=True)]))
            rss = rss_probe(idx.path, work / "tiny", queries, work)
            row = dict(
                n_docs=idx.n_docs,
                n_tokens=idx.n_tokens,
                n_centroids=idx.n_centroids,
                bytes_per_token=idx.nbytes() / idx.n_tokens,
                build_s=build_s,
                build_tokens_per_s=idx.n_tokens / build_s if build_s == build_s else float("nan"),
                n_queries=n_queries,
                p50_ms=float(np.percentile(lat, 50)) * 1e3,
                p90_ms=float(np.percentile(lat, 90)) * 1e3,
                qps_single=1.0 / float(lat.mean()),
                qps_batched=n_queries / batch_best[n_docs],
                top1_vs_exhaustive=top1,
                recall10_vs_exhaustive=rec,
                source_top1=source1,
                n_exhaustive_queries=n_ex,
                exhaustive_ms_per_query=ex_s * 1e3 / n_ex,
                rss_single_mb=rss["single"] / 1e6,
                rss_after_batched_mb=(rss["index_mapped"] + rss["anon_growth"]) / 1e6,
                index_mb=idx.nbytes() / 1e6,
                p50_ratio=float("nan"),
                # the machine is shared: the 1-minute load average beside the figures it disturbed
                load_avg=os.getloadavg()[0],
                note="prebuilt" if build_s != build_s else "built here",
            )
            print(
                f"  p50 {row['p50_ms']:.3f} ms, p90 {row['p90_ms']:.3f} ms, "
                f"{row['qps_single']:.0f} QPS single, {row['qps_batched']:.0f} QPS batched "
                f"({mismatch} of {n_queries} batched results differ from single); "
                f"top-1 agreement {top1:.3f}, recall@10 {rec:.4f} vs exhaustive over "
                f"{n_ex} queries ({row['exhaustive_ms_per_query']:.0f} ms/query exhaustive); source document "
                f"first for {source1:.3f}; RSS of a fresh "
                f"process: {row['rss_single_mb']:.0f} MB after the single-query searches, "
                f"{row['rss_after_batched_mb']:.0f} MB after batched, index {row['index_mb']:.0f} MB",
                flush=True,
            )
            if profile:
                prof = stage_profile(idx, queries)
                print_profile(idx.n_docs, prof)
                row["profile"] = prof
            rows.append(row)
        del cases
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if rows:
        base = rows[0]
        for r in rows:
            r["p50_ratio"] = r["p50_ms"] / base["p50_ms"]
        print(f"\nsummary (k={K}, ratio against {base['n_docs']} docs):")
        for r in rows:
            print(
                f"  {r['n_docs']:>8} docs {r['n_tokens']:>11,} tokens: p50 {r['p50_ms']:7.3f} ms "
                f"(x{r['p50_ratio']:.2f}), p90 {r['p90_ms']:7.3f} ms, {r['qps_batched']:6.0f} QPS batched, "
                f"top-1 {r['top1_vs_exhaustive']:.3f}, recall@10 {r['recall10_vs_exhaustive']:.3f} "
                f"({r['n_exhaustive_queries']} q), source@1 {r['source_top1']:.3f}, "
                f"RSS {r['rss_single_mb']:.0f} MB"
            )
        big = rows[-1]
        if base["n_docs"] == 5000 and big["n_docs"] == 500_000:
            ok = big["p50_ratio"] <= GOAL_P50_RATIO and all(
                r["top1_vs_exhaustive"] >= GOAL_TOP1 for r in rows
            )
            print(
                f"issue 14 goal (p50 at 500k <= {GOAL_P50_RATIO:g}x p50 at 5k, top-1 >= {GOAL_TOP1}): "
                f"{'MET' if ok else 'NOT MET'}"
            )
        if not _harness.quick():
            _write(rows, isa)
    return rows


def _write(rows: list[dict], isa: str) -> None:
    RESULTS.parent.mkdir(exist_ok=True)
    fields = [k for k in rows[0] if k != "profile"]
    head = ["date", "commit", "device", "cpu", "isa", "threads", *fields]
    new = not RESULTS.exists()
    with open(RESULTS, "a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(head)
        for r in rows:
            w.writerow(
                [
                    dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                    code_commit(),
                    "cpu",
                    _harness.cpu_model(),
                    isa,
                    edgeplaid.get_num_threads(),
                    *[f"{r[k]:.4g}" if isinstance(r[k], float) else r[k] for k in fields],
                ]
            )


@pytest.mark.benchmark
def test_search_scale(tmp_path: Path) -> None:
    """Quick mode: two small corpora built here, a smoke run of every measurement and the
    profile. Full mode: 5k and 50k documents (prebuilt ones reused)."""
    if _harness.quick():
        rows = run(QUICK_SIZES, n_queries=20, repeats=1, index_dir=tmp_path, profile=True)
    else:
        rows = run([5000, 50_000], profile=True)
    assert len(rows) == 2
    for r in rows:
        # top-1, not recall@10: see the comment on source_top1 in run()
        assert r["top1_vs_exhaustive"] >= 0.9 and r["source_top1"] >= 0.9, r
        assert r["p50_ms"] > 0


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    quick = _harness.quick()  # a smoke run: small corpora built here, few queries, no CSV
    ap.add_argument("--sizes", type=int, nargs="+", default=QUICK_SIZES if quick else FULL_SIZES)
    ap.add_argument("--queries", type=int, default=20 if quick else 200)
    ap.add_argument(
        "--exhaustive-queries",
        type=int,
        default=50,
        help=f"queries checked against exhaustive search above {EXHAUSTIVE_ALL_TOKENS:,} tokens",
    )
    ap.add_argument(
        "--repeats", type=int, default=1 if quick else 3, help="single-query passes (best per query)"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--index-dir", type=Path, default=None, help="prebuilt idx_5k, idx_50k, ...")
    ap.add_argument("--max-build-tokens", type=int, default=MAX_BUILD_TOKENS)
    ap.add_argument("--keep-built", type=Path, default=None, help="keep indexes built here in this folder")
    ap.add_argument("--profile", action="store_true", help="time every stage of the pipeline")
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args()
    run(
        a.sizes,
        n_queries=a.queries,
        exhaustive_queries=a.exhaustive_queries,
        repeats=a.repeats,
        seed=a.seed,
        index_dir=a.index_dir,
        max_build_tokens=a.max_build_tokens,
        keep_built=a.keep_built,
        profile=a.profile,
        threads=a.threads,
    )
