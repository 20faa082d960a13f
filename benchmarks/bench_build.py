"""PLAID index build at scale (issue 14): tokens/s, stage timings, memory and assignment recall.

Data: ``_synthetic.synthetic_corpus(n_docs, dim=48, seed=--seed)`` (60-200 tokens a document,
~130 on average), handed to ``Index.build`` as an iterator of batches, so the corpus is never in
memory at once (the build spools it to disk).

Run: ``python benchmarks/bench_build.py 5000 50000 [500000] [--out-dir /tmp/edgeplaid_scale]
[--old-tree DIR]`` (or through pytest with ``-m benchmark``; ``EDGEPLAID_BENCH_QUICK=1`` is a
smoke run of 1,000 documents that writes no CSV). Each size builds in a fresh child process
(peak RSS is the build's own) and reports:

- tokens/s of the whole build, and of the build alone (the time spent inside the generator is
  measured and taken out: a user's encoder or loader is not the build);
- the build's stage timings (read = pass 1 incl. spooling, kmeans, groups = the nearest-centroid
  search structure, compress = pass 2, ivf);
- assignment recall: of ``--recall-tokens`` tokens (the corpus' first), the fraction whose stored
  code is their exact nearest centroid (max inner product), and the same with ties counted as
  right (score within 1e-6 of the best);
- peak RSS of the child, the build's CPU seconds (all threads; the generator's included) and the
  1-minute load average at its end (the machine is shared: a busy machine slows a build).

Size 0 is SciFact's cached MiniLM-48 tokens (benchmarks/_scifact.py; 1.24M tokens, one array)
instead of synthetic data, with nDCG@10 of the built index's search (int8 and exact last stage)
and of exhaustive fp32 MaxSim in the note: search quality before/after a build change.

``--out-dir`` keeps the index at ``DIR/idx_5k`` etc. (bench_search_scale.py searches them);
otherwise it is built in a temporary directory and removed. ``--old-tree DIR`` also builds every
size with the edgeplaid package of another checkout (``DIR/python``, e.g. a ``git worktree`` of
an older commit) in the same run, for a before/after comparison. Rows append to
``benchmarks/results/build.csv``.
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
from pathlib import Path

HERE = Path(__file__).parent
RESULTS = HERE / "results" / "build.csv"
DIM = 48
COLUMNS = [
    "date",
    "commit",
    "contender",
    "cpu",
    "threads",
    "n_docs",
    "n_tokens",
    "n_centroids",
    "nbits",
    "build_s",
    "generator_s",
    "tokens_per_s",
    "tokens_per_s_without_generator",
    "read_s",
    "kmeans_s",
    "groups_s",
    "compress_s",
    "ivf_s",
    "recall",
    "recall_ties",
    "peak_rss_gb",
    "build_cpu_s",
    "load1",
    "note",
]


def index_name(n_docs: int) -> str:
    if n_docs == 0:
        return "idx_scifact"
    return f"idx_{n_docs // 1000}k" if n_docs % 1000 == 0 else f"idx_{n_docs}"


class _Timed:
    """Wraps an iterator; ``seconds`` is the time spent inside its ``__next__``."""

    def __init__(self, it):
        self.it, self.seconds = iter(it), 0.0

    def __iter__(self):
        return self

    def __next__(self):
        t = time.perf_counter()
        try:
            return next(self.it)
        finally:
            self.seconds += time.perf_counter() - t


def _recall(path: Path, n_docs: int, seed: int, n_tokens: int) -> tuple[float, float]:
    """Fraction of the corpus' first n_tokens tokens coded with their exact nearest centroid."""
    import numpy as np

    import _synthetic
    from edgeplaid import Index

    idx = Index.load(path)
    rows = []
    for t, _ in _synthetic.synthetic_corpus(n_docs, dim=DIM, seed=seed, batch_docs=256):
        rows.append(t)
        if sum(r.shape[0] for r in rows) >= n_tokens:
            break
    x = np.concatenate(rows)[:n_tokens].astype(np.float64)
    cents = idx.centroids.float().numpy().astype(np.float64)
    codes = np.asarray(idx.codes[: x.shape[0]]).astype(np.int64)
    best = np.empty(x.shape[0], dtype=np.int64)
    best_s = np.empty(x.shape[0])
    for s in range(0, x.shape[0], 2048):
        sc = x[s : s + 2048] @ cents.T
        best[s : s + 2048] = sc.argmax(1)
        best_s[s : s + 2048] = sc.max(1)
    code_s = np.einsum("nd,nd->n", x, cents[codes])
    return float(np.mean(codes == best)), float(np.mean(code_s >= best_s - 1e-6))


def _scifact_build(path: Path, args: argparse.Namespace) -> tuple[object, float, dict]:
    """Builds SciFact's cached MiniLM-48 tokens (benchmarks/_scifact.py) and scores the index:
    nDCG@10 of Index.search (both precisions of its last stage) and of exhaustive fp32 MaxSim."""
    import numpy as np
    import torch

    import _scifact
    from bench_search import ndcg_at_k
    from edgeplaid import Index
    from edgeplaid.ops import maxsim_packed

    data = _scifact.embeddings(DIM)
    tokens, doclens = torch.from_numpy(data["doc_tokens"]), torch.from_numpy(data["doclens"])
    t = time.perf_counter()
    idx = Index.build(
        path, tokens, doclens, nbits=args.nbits, ids=data["doc_ids"], overwrite=True, progress=False
    )
    build_s = time.perf_counter() - t
    q, qmask = torch.from_numpy(data["queries"]), torch.from_numpy(data["queries_mask"])
    qids, qrels, doc_ids = data["query_ids"], data["qrels"], data["doc_ids"]
    extra = {}
    for precision in ("int8", "exact"):
        try:
            r = idx.search(q, 10, qmask, precision=precision)
        except TypeError:  # an older tree without the precision argument
            r = idx.search(q, 10, qmask)
        ranked = [[doc_ids[i] for i in row if i >= 0] for row in r.ids.tolist()]  # positions -> ids
        extra[f"ndcg10_{precision}"] = ndcg_at_k(ranked, qids, qrels)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), doclens.cumsum(0)])
    exact = maxsim_packed(q, tokens, offsets, None, qmask).topk(10, dim=1).indices.tolist()
    extra["ndcg10_exhaustive_fp32"] = ndcg_at_k([[doc_ids[i] for i in row] for row in exact], qids, qrels)
    # assignment recall on the corpus' first tokens
    x = data["doc_tokens"][: args.recall_tokens].astype(np.float64)
    cents = idx.centroids.float().numpy().astype(np.float64)
    codes = np.asarray(idx.codes[: x.shape[0]]).astype(np.int64)
    sc = x @ cents.T
    extra["recall"] = float(np.mean(codes == sc.argmax(1)))
    extra["recall_ties"] = float(np.mean(sc[np.arange(x.shape[0]), codes] >= sc.max(1) - 1e-6))
    return idx, build_s, extra


def child(args: argparse.Namespace) -> None:
    """One build in this process; prints one JSON line."""
    import resource

    import _synthetic
    import edgeplaid
    from edgeplaid import Index

    if args.threads:
        edgeplaid.set_num_threads(args.threads)
    path = Path(args.path)

    def cpu() -> float:  # CPU seconds of every thread of this process
        ru = resource.getrusage(resource.RUSAGE_SELF)
        return ru.ru_utime + ru.ru_stime

    cpu0 = cpu()
    if args.n_docs == 0:  # SciFact
        idx, build_s, extra = _scifact_build(path, args)
        gen = _Timed(iter(()))
        recall, recall_ties = extra.pop("recall"), extra.pop("recall_ties")
    else:
        gen = _Timed(_synthetic.synthetic_corpus(args.n_docs, dim=DIM, seed=args.seed))
        t = time.perf_counter()
        idx = Index.build(path, gen, None, nbits=args.nbits, overwrite=True, progress=False)
        build_s = time.perf_counter() - t
        extra = {}
    build_cpu_s = cpu() - cpu0  # SciFact: includes its searches
    if args.n_docs:
        recall, recall_ties = _recall(path, args.n_docs, args.seed, args.recall_tokens)
    timings = dict(getattr(idx, "build_timings", {}) or {})
    assignment = json.loads((path / "manifest.json").read_text()).get("build", {}).get("assignment")
    if assignment:  # the probes the build tuned (absent in older trees)
        extra["search"] = f"{assignment['n_probe']} of {assignment['n_groups']} groups probed"
    out = {
        **extra,
        "n_docs": idx.n_docs,
        "n_tokens": idx.n_tokens,
        "n_centroids": idx.n_centroids,
        "build_s": build_s,
        "generator_s": gen.seconds,
        "timings": timings,
        "recall": recall,
        "recall_ties": recall_ties,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "build_cpu_s": build_cpu_s,
        "threads": edgeplaid.get_num_threads(),
    }
    print("RESULT " + json.dumps(out), flush=True)


def run_one(n_docs: int, path: Path, args: argparse.Namespace, tree: str | None) -> dict:
    env = dict(os.environ)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if tree:
        env["PYTHONPATH"] = str(Path(tree) / "python") + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        "--path",
        str(path),
        "--n-docs",
        str(n_docs),
        "--seed",
        str(args.seed),
        "--nbits",
        str(args.nbits),
        "--threads",
        str(args.threads),
        "--recall-tokens",
        str(args.recall_tokens),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=HERE)
    if proc.returncode != 0:
        raise RuntimeError(f"build of {n_docs} documents failed:\n{proc.stdout}\n{proc.stderr}")
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
    out = json.loads(line[len("RESULT ") :])
    out["load"] = os.getloadavg()[0]  # the machine is shared: how busy it was, over the last minute
    return out


def _row(r: dict, contender: str, nbits: int) -> dict:
    import _harness

    tm = r["timings"]
    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": _harness.commit(),
        "contender": contender,
        "cpu": _harness.cpu_model(),
        "threads": r["threads"],
        "n_docs": r["n_docs"],
        "n_tokens": r["n_tokens"],
        "n_centroids": r["n_centroids"],
        "nbits": nbits,
        "build_s": round(r["build_s"], 2),
        "generator_s": round(r["generator_s"], 2),
        "tokens_per_s": round(r["n_tokens"] / r["build_s"]),
        "tokens_per_s_without_generator": round(r["n_tokens"] / (r["build_s"] - r["generator_s"])),
        "read_s": round(tm.get("read", 0.0), 2),
        "kmeans_s": round(tm.get("kmeans", 0.0), 2),
        "groups_s": round(tm.get("groups", 0.0), 2),
        "compress_s": round(tm.get("compress", 0.0), 2),
        "ivf_s": round(tm.get("ivf", 0.0), 2),
        "recall": round(r["recall"], 5),
        "recall_ties": round(r["recall_ties"], 5),
        "peak_rss_gb": round(r["peak_rss_gb"], 2),
        "build_cpu_s": round(r["build_cpu_s"], 1),
        "load1": round(r["load"], 2),
        "note": "; ".join(
            ([r["search"]] if "search" in r else [])
            + [f"{k} {v:.4f}" for k, v in r.items() if k.startswith("ndcg10")]
        ),
    }


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "sizes", nargs="*", type=int, default=[5000, 50000], help="corpus sizes in documents (0: SciFact)"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--nbits", type=int, default=4)
    ap.add_argument("--threads", type=int, default=0, help="kernel threads (0: one per core)")
    ap.add_argument("--out-dir", default=None, help="keep each index at DIR/idx_<n>k")
    ap.add_argument("--old-tree", default=None, help="also build with DIR/python's edgeplaid")
    ap.add_argument("--recall-tokens", type=int, default=20000)
    ap.add_argument("--no-csv", action="store_true")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--path", help=argparse.SUPPRESS)
    ap.add_argument("--n-docs", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args)
        return []
    rows = []
    contenders = [("edgeplaid", None)] + ([("edgeplaid@old-tree", args.old_tree)] if args.old_tree else [])
    for n_docs in args.sizes:
        for label, tree in contenders:
            keep = args.out_dir is not None and tree is None
            base = Path(args.out_dir) if keep else Path(tempfile.mkdtemp(prefix="bench-build-"))
            base.mkdir(parents=True, exist_ok=True)
            path = base / index_name(n_docs)
            try:
                r = run_one(n_docs, path, args, tree)
            finally:
                if not keep:
                    shutil.rmtree(base, ignore_errors=True)
            row = _row(r, label, args.nbits)
            rows.append(row)
            print(
                f"{label}: {row['n_docs']} docs, {row['n_tokens']} tokens, {row['n_centroids']} centroids: "
                f"build {row['build_s']} s ({row['tokens_per_s']} tok/s; "
                f"{row['tokens_per_s_without_generator']} tok/s without the generator's "
                f"{row['generator_s']} s); read {row['read_s']} s, kmeans {row['kmeans_s']} s, groups "
                f"{row['groups_s']} s, compress {row['compress_s']} s, ivf {row['ivf_s']} s; recall "
                f"{row['recall']} ({row['recall_ties']} ties aside); peak RSS {row['peak_rss_gb']} GB; "
                f"{row['build_cpu_s']} CPU-s; load {row['load1']}"
                + (f"; {row['note']}" if row["note"] else "")
                + (f"; kept at {path}" if keep else ""),
                flush=True,
            )
    if not args.no_csv and os.environ.get("EDGEPLAID_BENCH_QUICK") != "1":
        RESULTS.parent.mkdir(exist_ok=True)
        new = not RESULTS.exists()
        with open(RESULTS, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS)
            if new:
                w.writeheader()
            w.writerows(rows)
    return rows


def test_build_scale():
    """Benchmark entry for pytest -m benchmark: 5,000 documents (1,000 in quick mode)."""
    quick = os.environ.get("EDGEPLAID_BENCH_QUICK") == "1"
    rows = main(["1000" if quick else "5000"])
    assert rows and rows[0]["recall_ties"] >= 0.99


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    main()
