"""End-to-end PLAID search on SciFact (5,183 docs, ~1.2M tokens of 48-dim MiniLM vectors).

Run: ``python benchmarks/bench_search.py [--peers] [--threads N]`` (or through pytest with
``-m benchmark``). Reports build time, bytes per token (every index file), one-query-at-a-time
latency (p50/p95) and QPS, batched QPS, recall@10 against exhaustive MaxSim (over the original
fp32 vectors, and over the index's decompressed vectors), nDCG@10 with the qrels, and the RSS
growth of a fresh process searching a ``load(mmap=True)`` index. With ``--peers`` (and
``benchmarks/.peers-venv`` holding fast-plaid and xtr-warp-rs, which pin torch 2.11) the peers
run on the same embeddings in the same run, each in a subprocess. A row per contender appends
to ``benchmarks/results/search.csv``.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import _scifact
import edgeplaid
from edgeplaid import Index
from edgeplaid.ops import maxsim_packed

HERE = Path(__file__).parent
PEERS_PY = HERE / ".peers-venv" / "bin" / "python"
RESULTS = HERE / "results" / "search.csv"
K = 10


def ndcg_at_k(
    ranked: list[list[str]], qids: list[str], qrels: dict[str, dict[str, int]], k: int = K
) -> float:
    """Mean nDCG@k (graded gains, log2 discount, as pytrec_eval's ndcg_cut)."""
    vals = []
    for qid, docs in zip(qids, ranked, strict=True):
        rel = qrels.get(qid, {})
        dcg = sum(rel.get(d, 0) / math.log2(i + 2) for i, d in enumerate(docs[:k]))
        ideal = sorted(rel.values(), reverse=True)[:k]
        idcg = sum(g / math.log2(i + 2) for i, g in enumerate(ideal))
        vals.append(dcg / idcg if idcg > 0 else 0.0)
    return float(np.mean(vals))


def recall(got: list[list[int]], want: list[list[int]], k: int = K) -> float:
    return float(np.mean([len(set(g[:k]) & set(w[:k])) / k for g, w in zip(got, want, strict=True)]))


def _rss_probe(index_path: str, queries_npz: str, tiny_path: str) -> dict[str, float]:
    """In a fresh process: RSS before load, after load(mmap=True) and after every search.

    The baseline is taken after a search on a tiny index, so one-time costs of the process
    (imports, the kernels' thread pool, first-call initialisation) are not charged to the index.
    """
    code = f"""
import json, numpy as np, torch, edgeplaid
def rss(key):
    f = dict(l.split(':', 1) for l in open('/proc/self/status') if ':' in l)
    return int(f[key].split()[0]) * 1024
def mapped(prefix):  # resident bytes of the files mapped from the index directory
    total, cur = 0, ''
    for line in open('/proc/self/smaps'):
        parts = line.split()
        if len(parts) >= 5 and '-' in parts[0] and ':' not in parts[0]:
            cur = parts[5] if len(parts) > 5 else ''
        elif parts[0] == 'Rss:' and cur.startswith(prefix):
            total += int(parts[1]) * 1024
    return total
q = np.load({queries_npz!r})
qs, qm = torch.from_numpy(q['queries']), torch.from_numpy(q['queries_mask'])
tiny = edgeplaid.Index.load({tiny_path!r})
for i in range(4):
    tiny.search(qs[i:i+1], k=10, queries_mask=qm[i:i+1], n_candidates=8, n_rerank=4)
tiny.search(qs, k=10, queries_mask=qm, n_candidates=8, n_rerank=4)
del tiny
base, anon = rss('VmRSS'), rss('RssAnon')
idx = edgeplaid.Index.load({index_path!r}, mmap=True)
loaded = rss('VmRSS')
for i in range(qs.shape[0]):
    idx.search(qs[i:i+1], k=10, queries_mask=qm[i:i+1])
single = mapped({index_path!r}) + rss('RssAnon') - anon
idx.search(qs, k=10, queries_mask=qm)
print(json.dumps({{'base': base, 'loaded': loaded, 'searched': rss('VmRSS'), 'single': single,
                   'anon_growth': rss('RssAnon') - anon, 'index_mapped': mapped({index_path!r})}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _read_rate_gbs() -> float:
    """Streaming read rate of memory (GB/s) on the kernels' threads: a 512 MB fp32 sum, best of 3."""
    x = torch.ones(1 << 27)
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return x.numel() * 4 / best / 1e9


def stage_table(idx: Index, queries: torch.Tensor, qmask: torch.Tensor, precision: str) -> list[dict]:
    """Each stage's mean time per query (one query at a time, ``edgeplaid.search.STAGE_TIMES``)
    against its own bound, measured on this machine now:

    * stage 1: 2 * valid tokens * centroids * dim FLOPs at the fp32 FMA peak of the ISA it runs
      (int8 stage 1, ``stage1_precision``: twice that many int8 ops, two passes of 7-bit levels,
      at the int8 peak), or, when longer, the bytes it must move at the read rate: the centroids
      once (fp16, or the int8 levels' 2 B an element) and the centroid-major table it writes
      (centroids * stride * 4 B). With AMX tiles (whose products run ~8x the fp32 peak) the
      table's bytes are the bound;
    * stages 1b-2: the bytes they must read at least once (each candidate's codes, 2 B a token,
      the IVF entries, 4 B each, and a score-table row, 4 B a lane, for every token not pruned)
      at the streaming memory read rate;
    * stage 4: the multiply-adds of the survivors' tokens against the query's (2 ops each) at the
      int8 peak (``peak_int8_gops``) or the fp32 peak (exact);
    * selection and glue: Python and numpy between the kernels (bound 0).

    With the timer on, search runs the staged pipeline (three op calls), so the glue is the
    staged pipeline's; the p50 and batched figures are the one-call path's (search/_fused.py).
    """
    from edgeplaid import ops
    from edgeplaid._native import C
    from edgeplaid.ops.bundles import CentroidScores
    from edgeplaid.ops.centroid_interaction import centroid_interaction_topk
    from edgeplaid.ops.centroid_scores import stage1_precision
    from edgeplaid.search import STAGE_TIMES, resolve_params

    st = idx._state
    searcher = st.searcher
    p = resolve_params(K)
    peak = C.peak_gflops(0.3)
    peak8 = C.peak_int8_gops(0.3)
    rate = _read_rate_gbs()
    nq = queries.shape[0]
    # The work of each stage, counted from the index's arrays (the kernels do not report it).
    offs, docs = (t.numpy() for t in (searcher.ivf.offsets, searcher.ivf.docs))
    codes = searcher.docs.codes.numpy().astype(np.int64)
    doc_off = searcher.docs.offsets.numpy()
    int8_stage1 = stage1_precision(precision, idx.centroids.device) == "int8"
    flops1 = bytes1 = bytes2 = macs4 = 0.0
    for i in range(nq):
        q, m = queries[i : i + 1], qmask[i : i + 1]
        scores, top, cmax = ops.centroid_scores(
            q, idx.centroids, p.n_probe, m, layout="centroid", with_max=True
        )
        n_valid = int(m.sum())
        flops1 += (4.0 if int8_stage1 else 2.0) * n_valid * idx.n_centroids * idx.dim
        elem = 2 if int8_stage1 else idx.centroids.element_size()
        bytes1 += elem * idx.centroids.numel() + 4.0 * scores.numel()
        cells = np.unique(top.numpy().ravel())
        cells = cells[cells >= 0]
        entries = np.concatenate([docs[offs[c] : offs[c + 1]] for c in cells])
        cand = np.unique(entries)
        tok = np.concatenate([np.arange(doc_off[d], doc_off[d + 1]) for d in cand])
        kept = int((cmax[0].numpy()[codes[tok]] >= p.threshold).sum())
        bytes2 += 4.0 * entries.shape[0] + 2.0 * tok.shape[0] + 4.0 * n_valid * kept
        survivors, _ = centroid_interaction_topk(
            CentroidScores(scores, query_len=q.shape[1]),
            searcher.docs,
            searcher.ivf,
            top.reshape(1, -1),
            p.n_candidates,
            p.threshold,
            m,
            centroid_max=cmax,
        )
        surv = survivors[0][survivors[0] >= 0].numpy()
        macs4 += float(np.diff(doc_off)[surv].sum()) * n_valid * idx.dim
    STAGE_TIMES.reset()
    STAGE_TIMES.enabled = True
    lat = []
    try:
        for i in range(nq):
            t = time.perf_counter()
            idx.search(queries[i : i + 1], K, qmask[i : i + 1], precision=precision)
            lat.append(time.perf_counter() - t)
    finally:
        STAGE_TIMES.enabled = False
    per = {k: v / nq * 1e3 for k, v in STAGE_TIMES.seconds.items()}
    total = float(np.mean(lat)) * 1e3
    bounds = {
        "1 centroid_scores": max(flops1 / ((peak8 if int8_stage1 else peak) * 1e9), bytes1 / (rate * 1e9))
        / nq
        * 1e3,
        "1b-2 candidates": bytes2 / nq / (rate * 1e9) * 1e3,
        "4 scoring": macs4 / nq * 2 / ((peak8 if precision == "int8" else peak) * 1e9) * 1e3,
    }
    rows = []
    for stage in sorted(per):
        b_ms = bounds.get(stage, 0.0)
        rows.append(dict(stage=stage, ms=per[stage], bound_ms=b_ms))
    rows.append(dict(stage="glue (Python, checks)", ms=total - sum(per.values()), bound_ms=0.0))
    rows.append(dict(stage="total", ms=total, bound_ms=sum(bounds.values())))
    print(
        f"per stage, one query at a time ({precision}; fp32 peak {peak:.0f} GFLOP/s, int8 peak "
        f"{peak8:.0f} Gop/s, memory read {rate:.1f} GB/s; bounds: stage 1 FLOPs at the fp32 peak "
        f"(int8 stage 1 here: {'yes, int8 ops at the int8 peak' if int8_stage1 else 'no'}) or its "
        "centroids and table at the read rate, whichever is longer, "
        "stages 1b-2 bytes at the read rate, stage 4 multiply-adds at the int8/fp32 peak; "
        "the staged pipeline, whose glue the one-call path of the p50 above does not have):"
    )
    for r in rows:
        frac = f"{r['bound_ms'] / r['ms'] * 100:5.0f}%" if r["bound_ms"] > 0 and r["ms"] > 0 else "     -"
        print(f"  {r['stage']:26s} {r['ms']:7.3f} ms   bound {r['bound_ms']:6.3f} ms   {frac} of bound")
    return rows


def _peer(engine: str, npz: str) -> dict | None:
    if not PEERS_PY.exists():
        return None
    out = tempfile.mktemp(suffix=".json")
    proc = subprocess.run(
        [str(PEERS_PY), str(HERE / "_peers.py"), engine, npz, out], capture_output=True, text=True
    )
    if proc.returncode != 0:
        print(f"  {engine} failed:\n{proc.stderr[-2000:]}")
        return None
    with open(out) as f:
        return json.load(f)


def run(peers: bool = False, threads: int = 0, nbits: int = 4, repeats: int = 3) -> list[dict]:
    if threads:
        edgeplaid.set_num_threads(threads)
    data = _scifact.embeddings(48)
    tokens = torch.from_numpy(data["doc_tokens"])
    doclens = torch.from_numpy(data["doclens"])
    queries = torch.from_numpy(data["queries"])
    qmask = torch.from_numpy(data["queries_mask"])
    doc_ids, qids, qrels = data["doc_ids"], data["query_ids"], data["qrels"]
    nq = queries.shape[0]
    print(
        f"SciFact: {doclens.shape[0]} docs, {tokens.shape[0]} tokens, dim {tokens.shape[1]}, "
        f"{nq} test queries; "
        f"{edgeplaid.get_num_threads()} kernel threads"
    )

    # exact MaxSim over the original fp32 vectors: the quality reference
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), doclens.cumsum(0)])
    t = time.perf_counter()
    exact_scores = maxsim_packed(queries, tokens, offsets, None, qmask)
    exact_s = time.perf_counter() - t
    exact = exact_scores.topk(K, dim=1).indices.tolist()
    ndcg_exact = ndcg_at_k([[doc_ids[i] for i in row] for row in exact], qids, qrels)
    print(f"exhaustive fp32 MaxSim: {exact_s:.2f} s for all queries, nDCG@10 {ndcg_exact:.4f}")

    work = Path(tempfile.mkdtemp(prefix="bench-search-"))
    rows = []
    try:
        t = time.perf_counter()
        idx = Index.build(work / "idx", tokens, doclens, nbits=nbits, ids=doc_ids, progress=False)
        build_s = time.perf_counter() - t
        bpt = idx.nbytes() / idx.n_tokens
        print(
            f"edgeplaid build: {build_s:.1f} s {idx.build_timings}, {idx.n_centroids} centroids, "
            f"{bpt:.2f} bytes/token ({idx.nbytes() / 1e6:.1f} MB)"
        )
        ex_idx = idx.search_exhaustive(queries, K, qmask).ids.tolist()
        ndcg_ex_idx = ndcg_at_k([[doc_ids[i] for i in row] for row in ex_idx], qids, qrels)

        # The last stage's two precisions, interleaved in every repeat (a shared machine drifts).
        precisions = ("int8", "exact")
        for prec in precisions:
            idx.search(queries[:4], K, qmask[:4], precision=prec)  # warm-up
        lat_runs: dict[str, list] = {p: [] for p in precisions}
        batch_runs: dict[str, list] = {p: [] for p in precisions}
        single: dict[str, list] = {}
        for _ in range(repeats):
            for prec in precisions:
                lat = []
                res = []
                for i in range(nq):
                    t = time.perf_counter()
                    r = idx.search(queries[i : i + 1], K, qmask[i : i + 1], precision=prec)
                    lat.append(time.perf_counter() - t)
                    res.append(r.ids[0].tolist())
                lat_runs[prec].append(lat)
                single[prec] = res
                t = time.perf_counter()
                batched = idx.search(queries, K, qmask, precision=prec)
                batch_runs[prec].append(time.perf_counter() - t)
                assert batched.ids.tolist() == res, "batched and single-query results differ"
        stats = {}
        for prec in precisions:
            lat_all = np.array(lat_runs[prec]).min(axis=0)  # per query, best of the repeats (shared machine)
            stats[prec] = dict(
                p50=float(np.percentile(lat_all, 50)) * 1e3,
                p95=float(np.percentile(lat_all, 95)) * 1e3,
                qps_single=1e3 / float(np.mean(lat_all * 1e3)),
                qps_batched=nq / min(batch_runs[prec]),
                rec=recall(single[prec], exact),
                rec_idx=recall(single[prec], ex_idx),
                ndcg=ndcg_at_k([[doc_ids[i] for i in row] for row in single[prec]], qids, qrels),
            )
            st = stats[prec]
            print(
                f"edgeplaid search ({prec}): p50 {st['p50']:.2f} ms, p95 {st['p95']:.2f} ms, "
                f"{st['qps_single']:.0f} QPS single, {st['qps_batched']:.0f} QPS batched; recall@10 "
                f"{st['rec']:.4f} vs exact fp32, {st['rec_idx']:.4f} vs the index's exhaustive; nDCG@10 "
                f"{st['ndcg']:.4f} (exhaustive fp32 {ndcg_exact:.4f}, index exhaustive {ndcg_ex_idx:.4f})"
            )
        i8, ex = stats["int8"], stats["exact"]
        print(
            f"int8 vs exact last stage: p50 x{ex['p50'] / i8['p50']:.2f} faster, batched QPS "
            f"x{i8['qps_batched'] / ex['qps_batched']:.2f}; nDCG@10 {i8['ndcg'] - ex['ndcg']:+.4f}, "
            f"recall@10 vs index exhaustive {i8['rec_idx'] - ex['rec_idx']:+.4f} "
            "(issue 9 bar: |dnDCG| <= 0.002, |drecall| <= 0.005)"
        )
        stages = stage_table(idx, queries, qmask, "int8")
        _write_stages(stages)
        qnpz = str(work / "q.npz")
        np.savez(qnpz, queries=data["queries"], queries_mask=data["queries_mask"])
        tiny_docs = int(doclens[:50].sum())
        Index.build(
            work / "tiny", tokens[:tiny_docs], doclens[:50], nbits=nbits, n_centroids=64, progress=False
        )
        rss = _rss_probe(str(work / "idx"), qnpz, str(work / "tiny"))
        growth = rss["index_mapped"] + rss["anon_growth"]
        print(
            "RSS of a fresh process after load(mmap) + all 300 searches (single, then batched): "
            f"index files mapped {rss['index_mapped'] / 1e6:.1f} MB + anonymous growth "
            f"{rss['anon_growth'] / 1e6:.1f} MB = {growth / 1e6:.1f} MB for an index of "
            f"{idx.nbytes() / 1e6:.1f} MB ({growth / idx.nbytes():.2f}x); VmRSS growth "
            f"{(rss['searched'] - rss['base']) / 1e6:.1f} MB (includes shared-library code pages first "
            f"touched), after load alone +{(rss['loaded'] - rss['base']) / 1e6:.1f} MB, after the "
            f"single-query searches {rss['single'] / 1e6:.1f} MB ({rss['single'] / idx.nbytes():.2f}x)"
        )
        for prec in precisions:
            st = stats[prec]
            rows.append(
                dict(
                    contender=f"edgeplaid ({prec})",
                    build_s=build_s,
                    bytes_per_token=bpt,
                    p50_ms=st["p50"],
                    p95_ms=st["p95"],
                    qps_single=st["qps_single"],
                    qps_batched=st["qps_batched"],
                    recall10=st["rec"],
                    recall10_vs_index_exhaustive=st["rec_idx"],
                    ndcg10=st["ndcg"],
                    ndcg10_exhaustive=ndcg_exact,
                    rss_over_index=growth / idx.nbytes(),
                    note="measured",
                )
            )
        if peers:
            npz = str(work / "peers.npz")
            np.savez(
                npz,
                doc_tokens=data["doc_tokens"],
                doclens=data["doclens"],
                queries=data["queries"],
                queries_mask=data["queries_mask"],
            )
            for engine in ("fast-plaid", "warp"):
                print(f"running {engine} in {PEERS_PY.parent.parent.name} (minutes)...", flush=True)
                r = _peer(engine, npz)
                if r is None:
                    continue
                lat = np.array(r["latencies_s"]) * 1e3
                rec_p = recall(r["ids"], exact)
                nd = ndcg_at_k([[doc_ids[i] for i in row if i >= 0] for row in r["ids"]], qids, qrels)
                row = dict(
                    contender=engine,
                    build_s=r["build_s"],
                    bytes_per_token=r["index_bytes"] / r["n_tokens"],
                    p50_ms=float(np.percentile(lat, 50)),
                    p95_ms=float(np.percentile(lat, 95)),
                    qps_single=1e3 / float(lat.mean()),
                    qps_batched=nq / r["batched_s"],
                    recall10=rec_p,
                    recall10_vs_index_exhaustive=float("nan"),
                    ndcg10=nd,
                    ndcg10_exhaustive=ndcg_exact,
                    rss_over_index=float("nan"),
                    note="measured",
                )
                rows.append(row)
                print(
                    f"  {engine}: build {row['build_s']:.0f} s, {row['bytes_per_token']:.1f} B/token, "
                    f"p50 {row['p50_ms']:.1f} ms, {row['qps_batched']:.1f} QPS batched, "
                    f"recall@10 {rec_p:.3f}, "
                    f"nDCG@10 {nd:.4f}"
                )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    _write(rows)
    return rows


def _write_stages(rows: list[dict]) -> None:
    path = RESULTS.parent / "search_stages.csv"
    new = not path.exists()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE)
    cpu = next(
        (ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), ""
    )
    from edgeplaid._native import C

    with open(path, "a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(
                ["date", "commit", "cpu", "fp32_isa", "int8_isa", "threads", "stage", "ms", "bound_ms"]
            )
        for r in rows:
            w.writerow(
                [
                    dt.datetime.now().isoformat(timespec="seconds"),
                    commit.stdout.strip(),
                    cpu,
                    C.cpu_isa(),
                    C.cpu_int8_isa(),
                    edgeplaid.get_num_threads(),
                    r["stage"],
                    f"{r['ms']:.4g}",
                    f"{r['bound_ms']:.4g}",
                ]
            )


def _write(rows: list[dict]) -> None:
    RESULTS.parent.mkdir(exist_ok=True)
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE
        ).stdout.strip()
    except OSError:
        commit = ""
    cpu = next(
        (ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), ""
    )
    head = ["date", "commit", "cpu", "threads", *rows[0].keys()] if rows else []
    new = not RESULTS.exists()
    with open(RESULTS, "a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(head)
        for r in rows:
            w.writerow(
                [
                    dt.datetime.now().isoformat(timespec="seconds"),
                    commit,
                    cpu,
                    edgeplaid.get_num_threads(),
                    *[f"{v:.4g}" if isinstance(v, float) else v for v in r.values()],
                ]
            )


@pytest.mark.benchmark
def test_search_scifact():
    if not (_scifact.DATA / "corpus.jsonl").exists():
        pytest.skip("../shared/data/scifact is not here")
    rows = run(peers=PEERS_PY.exists())
    ours = rows[0]
    print(json.dumps(ours, indent=1))
    assert statistics.fmean([ours["recall10"]]) > 0.9


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--peers", action="store_true", help="also run fast-plaid and WARP (benchmarks/.peers-venv)"
    )
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    run(peers=a.peers, threads=a.threads, repeats=a.repeats)
