"""Hybrid search (issue 19): BM25 (tantivy) and late interaction (PLAID) fused, on SciFact and
Cranfield, and the lexical side's costs at scale.

    python benchmarks/bench_hybrid.py                 # SciFact + Cranfield, MiniLM stand-in
    python benchmarks/bench_hybrid.py --scale 5000 50000 500000

Collections: documents and queries encoded as ``edgeplaid eval --model minilm`` encodes them
(cached in benchmarks/.cache/), one index per analyzer built with the texts. Measured:

- **quality** (nDCG@10, RR@10, R@100 by ir-measures) of late, lexical and hybrid search at k=10
  and k=100, for both fusions over an alpha grid, and the depth of each side's list;
- **latency** on SciFact, one query at a time, k=10, late / lexical / hybrid timed interleaved
  query by query (p50, p95), the same index and the same encoded queries.

Scale (synthetic: 8 tokens of 48 dims per document, so that the vectors cost little, and texts
of 60-140 words drawn from a Zipf law over SciFact's vocabulary, with str ids): the lexical
side's build rate, a lexical query's p50, hybrid minus late p50, and what the lexical side adds
to ``add`` (1%) and ``delete`` (one id), against the same changes to an index without texts,
and the first lexical query of a new version (the str-id key table).

Rows append to benchmarks/results/hybrid.csv.
"""

from __future__ import annotations

import os
import re
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
from edgeplaid import Index
from edgeplaid.eval.beir import load_beir
from edgeplaid.eval.metrics import evaluate, to_run
from edgeplaid.search import _hybrid

RESULTS = _harness.RESULTS / "hybrid.csv"
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CACHE = Path(__file__).parent / ".cache"
ALPHAS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)


def _encoded(name: str) -> dict:
    """The collection's vectors as `edgeplaid eval --model minilm` makes them (cached)."""
    CACHE.mkdir(exist_ok=True)
    path = CACHE / f"{name}_minilm_eval.npz"
    c = load_beir(DATA / name)
    if not path.exists():
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from edgeplaid.model import load_model

        model = load_model("minilm")
        print(f"encoding {name} ({len(c.doc_texts)} documents; cached in {CACHE})", flush=True)
        tok, dl = model.encode_documents(c.doc_texts, show_progress_bar=False)
        q, qm = model.encode_queries(c.query_texts, show_progress_bar=False)
        np.savez(path, tok=tok.numpy().astype(np.float16), dl=dl.numpy(), q=q.numpy(), qm=qm.numpy())
    z = np.load(path)
    return {
        "c": c,
        "tok": z["tok"].astype(np.float32),
        "dl": z["dl"],
        "q": torch.from_numpy(z["q"]),
        "qm": torch.from_numpy(z["qm"]),
    }


def _metrics(c, result) -> dict[str, float]:
    return evaluate(to_run(c.query_ids, result.user_ids, result.scores.numpy()), c.qrels)


def _row(case: str, value: float, unit: str, baseline: str = "") -> dict:
    print(f"  {case:<64} {value:10.4f} {unit} {baseline}", flush=True)
    return {"case": case, "value": value, "unit": unit, "baseline": baseline}


def quality(name: str, e: dict, root: Path) -> list[dict]:
    c, q, qm = e["c"], e["q"], e["qm"]
    rows: list[dict] = []
    for analyzer in ("plain", "english"):
        idx = Index.build(
            root / f"{name}-{analyzer}",
            e["tok"],
            e["dl"],
            ids=c.doc_ids,
            texts=c.doc_texts,
            analyzer=analyzer,
            progress=False,
        )
        for k in (10, 100):
            tag = f"{name} {analyzer} k={k}"
            late = _metrics(c, idx.search(q, k=k, queries_mask=qm))
            lex = _metrics(c, idx.search(text=c.query_texts, k=k))
            hyb = _metrics(c, idx.search(q, k=k, queries_mask=qm, text=c.query_texts))
            for mode, m in (("late", late), ("lexical", lex), ("hybrid (defaults)", hyb)):
                for measure in ("nDCG@10", "RR@10", "R@100"):
                    rows.append(
                        _row(f"{tag} {mode} {measure}", m[measure], "", "late" if mode != "late" else "")
                    )
            for fusion in ("relative_score", "rrf"):
                for a in ALPHAS:
                    m = _metrics(
                        c, idx.search(q, k=k, queries_mask=qm, text=c.query_texts, fusion=fusion, alpha=a)
                    )
                    rows.append(_row(f"{tag} hybrid {fusion} alpha={a} nDCG@10", m["nDCG@10"], ""))
        # each side's list depth (k=10): DEPTH_PER_K * k documents
        old = _hybrid.DEPTH_PER_K
        try:
            for per_k in (2, 4, 10):
                _hybrid.DEPTH_PER_K = per_k
                m = _metrics(c, idx.search(q, k=10, queries_mask=qm, text=c.query_texts))
                rows.append(
                    _row(f"{name} {analyzer} k=10 hybrid depth={per_k * 10} nDCG@10", m["nDCG@10"], "")
                )
        finally:
            _hybrid.DEPTH_PER_K = old
        del idx
    return rows


def _interleaved(calls: dict, n: int, repeats: int = 3) -> dict[str, np.ndarray]:
    """Seconds of each call per query, timed query by query in alternating order after an
    untimed pass (p50s of runs one after the other differed by up to 40% on this machine)."""
    lat: dict[str, list[float]] = {k: [] for k in calls}
    items = list(calls.items())
    for rep in range(repeats + 1):
        for i in range(n):
            for name, fn in items if (i + rep) % 2 else items[::-1]:
                t = time.perf_counter()
                fn(i)
                if rep:
                    lat[name].append(time.perf_counter() - t)
    return {k: np.asarray(v) for k, v in lat.items()}


def latency(name: str, e: dict, root: Path) -> list[dict]:
    c, q, qm = e["c"], e["q"], e["qm"]
    idx = Index.load(root / f"{name}-plain")
    texts = c.query_texts
    lat = _interleaved(
        {
            "late": lambda i: idx.search(q[i : i + 1], 10, qm[i : i + 1]),
            "lexical": lambda i: idx.search(text=texts[i], k=10),
            "hybrid": lambda i: idx.search(q[i : i + 1], 10, qm[i : i + 1], text=texts[i]),
        },
        q.shape[0],
    )
    rows = []
    for mode, v in lat.items():
        rows.append(_row(f"{name} p50 {mode} (one query, k=10)", float(np.median(v)) * 1e3, "ms", "late"))
        rows.append(
            _row(f"{name} p95 {mode} (one query, k=10)", float(np.percentile(v, 95)) * 1e3, "ms", "late")
        )
    over = float(np.median(lat["hybrid"]) - np.median(lat["late"])) * 1e3
    rows.append(_row(f"{name} hybrid p50 minus late p50", over, "ms", "goal <= 1"))
    return rows


def run(names: tuple[str, ...] = ("cranfield", "scifact")) -> list[dict]:
    rows: list[dict] = []
    root = Path(tempfile.mkdtemp(prefix="edgeplaid-hybrid-"))
    try:
        for name in names:
            e = _encoded(name)
            print(f"{name}: {len(e['c'].doc_ids)} documents, {len(e['c'].query_ids)} queries", flush=True)
            rows += quality(name, e, root)
            rows += latency(name, e, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    _write(rows)
    return rows


# ---------------------------------------------------------------------------- scale


def _vocabulary() -> list[str]:
    c = load_beir(DATA / "scifact")
    words: dict[str, int] = {}
    for t in c.doc_texts:
        for w in re.findall(r"[a-z]{3,}", t.lower()):
            words[w] = words.get(w, 0) + 1
    return sorted(words, key=lambda w: -words[w])


def _synthetic(n: int, vocab: list[str], seed: int) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
    rng = np.random.default_rng(seed)
    ranks = np.minimum(rng.zipf(1.15, size=n * 140), len(vocab)) - 1
    lens = rng.integers(60, 141, n)
    starts = np.concatenate([[0], np.cumsum(lens)])
    words = np.asarray(vocab, dtype=object)[ranks]
    texts = [" ".join(words[starts[i] : starts[i + 1]]) for i in range(n)]
    tok = rng.standard_normal((n * 8, 48)).astype(np.float32)
    tok /= np.linalg.norm(tok, axis=1, keepdims=True)
    return tok, np.full(n, 8, np.int64), texts, [f"doc-{seed}-{i}" for i in range(n)]


def _scale_one(root: Path, n: int, vocab: list[str], q: torch.Tensor, q_texts: list[str]) -> list[dict]:
    tok, dl, texts, ids = _synthetic(n, vocab, 0)
    idx = Index.build(root / "lex", tok, dl, ids=ids, texts=texts, progress=False)
    t_lex = idx.build_timings["lexical"]
    plain = Index.build(root / "plain", tok, dl, ids=ids, progress=False)
    words = sum(len(t.split()) for t in texts)
    tag = f"scale {n:,} docs"
    rows = [_row(f"{tag} lexical build", words / t_lex / 1e6, "M words/s", f"{t_lex:.2f} s")]
    lat = _interleaved(
        {
            "late": lambda i: idx.search(q[i : i + 1], 10),
            "lexical": lambda i: idx.search(text=q_texts[i], k=10),
            "hybrid": lambda i: idx.search(q[i : i + 1], 10, text=q_texts[i]),
        },
        q.shape[0],
        repeats=2,
    )
    for mode in ("late", "lexical", "hybrid"):
        rows.append(_row(f"{tag} p50 {mode}", float(np.median(lat[mode])) * 1e3, "ms"))
    # changes: the same add (1%) and one-id delete, with and without the lexical side
    add_tok, add_dl, add_texts, add_ids = _synthetic(max(n // 100, 1), vocab, 1)
    t = time.perf_counter()
    plain.add(add_tok, add_dl, ids=add_ids)
    t_plain = time.perf_counter() - t
    t = time.perf_counter()
    idx.add(add_tok, add_dl, ids=add_ids, texts=add_texts)
    t_add = time.perf_counter() - t
    rows.append(_row(f"{tag} add 1% with texts", t_add, "s", f"without texts {t_plain:.3f} s"))
    t = time.perf_counter()
    plain.delete([ids[n // 2]])
    t_plain = time.perf_counter() - t
    t = time.perf_counter()
    idx.delete([ids[n // 2]])
    t_del = time.perf_counter() - t
    rows.append(
        _row(f"{tag} delete 1 id with texts", t_del * 1e3, "ms", f"without texts {t_plain * 1e3:.1f} ms")
    )
    t = time.perf_counter()
    idx.search(text=q_texts[0], k=10)
    rows.append(_row(f"{tag} first lexical query of a new version", (time.perf_counter() - t) * 1e3, "ms"))
    nbytes = sum(f.stat().st_size for f in (root / "lex" / "lexical").iterdir())
    rows.append(_row(f"{tag} lexical side bytes per word", nbytes / words, "B", "texts stored"))
    return rows


def run_scale(sizes: list[int]) -> list[dict]:
    vocab = _vocabulary()
    rng = np.random.default_rng(7)
    q_texts = [" ".join(rng.choice(vocab[:5000], int(rng.integers(5, 11)))) for _ in range(200)]
    q = torch.nn.functional.normalize(
        torch.randn(200, 32, 48, generator=torch.Generator().manual_seed(7)), dim=-1
    )
    rows: list[dict] = []
    for n in sizes:
        root = Path(tempfile.mkdtemp(prefix="edgeplaid-hybrid-scale-"))
        try:
            rows += _scale_one(root, n, vocab, q, q_texts)
        finally:
            shutil.rmtree(root, ignore_errors=True)
    _write(rows)
    return rows


def _write(rows: list[dict]) -> None:
    if _harness.quick():
        return
    _harness.append_cases(RESULTS, rows)


@pytest.mark.benchmark
def test_hybrid_scifact_cranfield():
    if not (DATA / "scifact" / "corpus.jsonl").exists():
        pytest.skip("../shared/data is not here")
    run()


@pytest.mark.benchmark
def test_hybrid_scale():
    if not (DATA / "scifact" / "corpus.jsonl").exists():
        pytest.skip("../shared/data is not here")
    run_scale([2000] if _harness.quick() else [5000, 50000])


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=int, nargs="*", default=None, help="synthetic corpus sizes (documents)")
    ap.add_argument("--only", nargs="*", default=["cranfield", "scifact"], help="collections")
    args = ap.parse_args()
    if args.scale:
        run_scale(args.scale)
    else:
        run(tuple(args.only))
