"""Soak test of `edgeplaid serve`: 32 clients for N minutes, answers checked, memory watched.

    python benchmarks/soak_serve.py [--minutes 30] [--clients 32] [--model minilm]

Starts `edgeplaid serve --model minilm --index <Cranfield index>` on 127.0.0.1 and drives it
with a mix that meets the encoder with ever different batch shapes (what made its memory
grow): rerank of 5-40 SciFact abstracts (a pool of 400, cut to random lengths) for a SciFact
query, search of 1-4 Cranfield queries at k in {5, 10, 50, 100}, and encode of 1-8 texts
(queries or documents). Samples the server's RSS every 10 s; after the run, compares a sample
of the answers (up to --max-checks) with the offline answers (`edgeplaid.rerank`,
`Index.search` with the same k, `encode_*`).

Reports requests, errors (any answer but 200, or a failed connection: must be 0), mismatches
(must be 0), and RSS at the start, every 10 minutes and at the end, with the growth over the
last 10 minutes against the 10 before (by the windows' peaks and by medians: RSS swings by the
batch in flight; the plateau criterion is <= 5%). Appends a row to benchmarks/results/soak_serve.csv
and writes the RSS samples as JSON lines beside the log (--rss-log).
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import datetime as dt
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from load_serve import free_port

SCIFACT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "scifact"
RESULTS = Path(__file__).parent / "results" / "soak_serve.csv"
INDEX_CACHE = Path("/tmp/edgeplaid_soak")


def scifact_texts(pool: int) -> tuple[list[str], list[str]]:
    docs = []
    with (SCIFACT / "corpus.jsonl").open() as f:
        for line in f:
            words = json.loads(line)["text"].split()
            if len(words) >= 150:
                docs.append(" ".join(words[:150]))
            if len(docs) == pool:
                break
    with (SCIFACT / "queries.jsonl").open() as f:
        queries = [json.loads(line)["text"] for line in f][:500]
    return docs, queries


def cranfield_index(model_spec: str) -> tuple[Path, list[str]]:
    """A Cranfield index encoded by the model (built once, kept in /tmp), and the queries."""
    from edgeplaid.data import CRANFIELD
    from edgeplaid.eval import load_beir

    collection = load_beir(CRANFIELD)
    path = INDEX_CACHE / f"cranfield-{model_spec.replace('/', '_')}"
    if not (path / "manifest.json").exists():
        from edgeplaid.index import Index
        from edgeplaid.model import load_model

        model = load_model(model_spec)
        tokens, doclens = model.encode_documents(collection.doc_texts)
        Index.build(path, tokens, doclens, ids=collection.doc_ids, progress=False, overwrite=path.exists())
        (path / "encoder.json").write_text(json.dumps({"model": model_spec, "dim": int(tokens.shape[1])}))
    return path, collection.query_texts


def start_server(port: int, model: str, index: Path, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "edgeplaid.cli", "serve", "--model", model, "--index", str(index)]
    cmd += ["--port", str(port), "--max-queue", "4096", "--quiet"]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.Popen(cmd, env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.5)
        if proc.poll() is not None:
            raise RuntimeError("the server exited during start-up")
    proc.terminate()
    raise RuntimeError("the server did not start in 300 s")


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def make_request(rng: random.Random, docs: list[str], sq: list[str], cq: list[str]) -> tuple[str, dict]:
    r = rng.random()
    if r < 0.5:
        picked = rng.sample(docs, rng.randint(5, 40))
        # Random lengths: every batch a new token width, as real traffic brings.
        picked = [" ".join(d.split()[: rng.randint(10, 150)]) for d in picked]
        return "/v1/rerank", {"query": rng.choice(sq), "documents": picked, "top_n": rng.choice([None, 10])}
    if r < 0.8:
        return "/v1/search", {"queries": rng.sample(cq, rng.randint(1, 4)), "k": rng.choice([5, 10, 50, 100])}
    kind = rng.choice(["query", "document"])
    pool = sq if kind == "query" else docs
    texts = [" ".join(t.split()[: rng.randint(3, 150)]) for t in rng.sample(pool, rng.randint(1, 8))]
    return "/v1/encode", {"texts": texts, "kind": kind}


async def drive(
    url: str, pid: int, minutes: float, clients: int, texts: tuple, sample_every: int, rss_log: Path
) -> dict:
    docs, sq, cq = texts
    stop = time.monotonic() + 60 * minutes
    t_start = time.monotonic()
    counts = {"requests": 0, "errors": 0}
    error_kinds: dict[str, int] = {}
    samples: list[tuple[str, dict, dict]] = []
    rss: list[tuple[float, float, int]] = []

    async def client(c: int) -> None:
        rng = random.Random(c)
        async with httpx.AsyncClient(base_url=url, timeout=600) as http:
            while time.monotonic() < stop:
                path, body = make_request(rng, docs, sq, cq)
                try:
                    r = await http.post(path, json=body)
                    ok = r.status_code == 200
                    why = f"{path} {r.status_code}"
                except httpx.HTTPError as e:
                    ok, why = False, f"{path} {type(e).__name__}"
                counts["requests"] += 1
                if not ok:
                    counts["errors"] += 1
                    error_kinds[why] = error_kinds.get(why, 0) + 1
                elif counts["requests"] % sample_every == 0:
                    samples.append((path, body, r.json()))

    async def sampler() -> None:
        with rss_log.open("a") as f:
            while time.monotonic() < stop:
                t = time.monotonic() - t_start
                row = (t, rss_mb(pid), counts["requests"])
                rss.append(row)
                line = {"t_s": round(t, 1), "rss_mb": round(row[1], 1), "requests": row[2]}
                f.write(json.dumps(line) + "\n")
                f.flush()
                await asyncio.sleep(10)

    await asyncio.gather(sampler(), *(client(c) for c in range(clients)))
    wall = time.monotonic() - t_start
    rss.append((wall, rss_mb(pid), counts["requests"]))
    return {**counts, "error_kinds": error_kinds, "wall_s": wall, "samples": samples, "rss": rss}


def check_samples(
    samples: list[tuple[str, dict, dict]], model_spec: str, index_path: Path, report: Path
) -> tuple[int, int]:
    """(checked, mismatched): each sampled answer against the offline computation; the
    mismatched ones (request, answer, offline answer) are written to ``report``."""
    import torch

    from edgeplaid import rerank
    from edgeplaid.index import Index
    from edgeplaid.model import load_model

    model = load_model(model_spec)
    index = Index.load(index_path)
    bad = 0
    report.write_text("")
    for path, body, answer in samples:
        if path == "/v1/rerank":
            scores, order = rerank(body["query"], body["documents"], k=body["top_n"], model=model)
            got = [(r["index"], r["relevance_score"]) for r in answer["results"]]
            want = list(zip(order.tolist(), scores.tolist(), strict=True))
        elif path == "/v1/search":
            q, m = model.encode_queries(body["queries"])
            result = index.search(q, k=body["k"], queries_mask=m)
            got = [
                (i, float("-inf") if s is None else s)
                for ids, ss in zip(answer["ids"], answer["scores"], strict=True)
                for i, s in zip(ids, ss, strict=True)
            ]
            want = list(zip(result.ids.flatten().tolist(), result.scores.flatten().tolist(), strict=True))
        else:
            if body["kind"] == "query":
                e, m = model.encode_queries(body["texts"])
                want_rows = [x[k] for x, k in zip(e, m, strict=True)]
            else:
                tokens, doclens = model.encode_documents(body["texts"])
                want_rows = list(torch.split(tokens, doclens.tolist()))
            same = len(want_rows) == len(answer["embeddings"]) and all(
                torch.tensor(g).shape == w.shape and torch.allclose(torch.tensor(g), w, atol=1e-4)
                for g, w in zip(answer["embeddings"], want_rows, strict=True)
            )
            if not same:
                bad += 1
                with report.open("a") as f:
                    f.write(
                        json.dumps(
                            {
                                "path": path,
                                "body": body,
                                "shapes": [len(g) for g in answer["embeddings"]],
                                "want": [list(w.shape) for w in want_rows],
                            }
                        )
                        + "\n"
                    )
            continue
        # Positions may differ only between scores equal within the tolerance.
        same = len(got) == len(want) and all(
            (gs == ws or abs(gs - ws) < 1e-4) and (gi == wi or abs(gs - ws) < 1e-4)
            for (gi, gs), (wi, ws) in zip(got, want, strict=True)
        )
        if not same:
            bad += 1
            with report.open("a") as f:
                f.write(json.dumps({"path": path, "body": body, "got": got, "want": want}) + "\n")
    return len(samples), bad


def rss_at(rss: list[tuple[float, float, int]], t: float) -> float:
    """The sample nearest to t seconds."""
    return min(rss, key=lambda row: abs(row[0] - t))[1]


def rss_window(rss: list[tuple[float, float, int]], t0: float, t1: float, how: str) -> float:
    """max or median of the samples in [t0, t1] seconds: a single sample says little, as RSS
    swings by the batch in flight (and falls after each heap trim)."""
    values = sorted(r[1] for r in rss if t0 <= r[0] <= t1) or [float("nan")]
    return values[-1] if how == "max" else values[len(values) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--pool", type=int, default=400)
    parser.add_argument("--sample-every", type=int, default=25, help="check one answer in N offline")
    parser.add_argument("--max-checks", type=int, default=400)
    parser.add_argument("--rss-log", default="/tmp/edgeplaid_soak/rss.jsonl")
    parser.add_argument("--server-log", default="/tmp/edgeplaid_soak/server.log")
    parser.add_argument("--mismatch-log", default="/tmp/edgeplaid_soak/mismatches.jsonl")
    args = parser.parse_args()
    INDEX_CACHE.mkdir(parents=True, exist_ok=True)
    index_path, cranfield_queries = cranfield_index(args.model)
    docs, scifact_queries = scifact_texts(args.pool)
    port = free_port()
    proc = start_server(port, args.model, index_path, Path(args.server_log))
    rss_log = Path(args.rss_log)
    rss_log.write_text("")
    try:
        result = asyncio.run(
            drive(
                f"http://127.0.0.1:{port}",
                proc.pid,
                args.minutes,
                args.clients,
                (docs, scifact_queries, cranfield_queries),
                args.sample_every,
                rss_log,
            )
        )
        healthy = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10).status_code == 200
    finally:
        proc.terminate()
        proc.wait(timeout=120)
    rng = random.Random(0)
    samples = result.pop("samples")
    samples = rng.sample(samples, min(len(samples), args.max_checks))
    checked, mismatched = check_samples(samples, args.model, index_path, Path(args.mismatch_log))
    rss = result.pop("rss")
    end = rss[-1][0]
    marks = {}
    for m in (1, 10, 20, 30):
        if 60 * m <= end + 5:
            marks[f"rss_{m}min_mb"] = round(rss_at(rss, 60 * m), 1)
            marks[f"rss_{m}min_peak_mb"] = round(rss_window(rss, 60 * (m - 1), 60 * m, "max"), 1)
    # The plateau: the last 10 minutes against the 10 before, by their peaks and by the medians
    # of their last 2 minutes.
    peak_last = rss_window(rss, end - 600, end, "max")
    peak_before = rss_window(rss, end - 1200, end - 600, "max")
    median_last = rss_window(rss, end - 120, end, "median")
    median_before = rss_window(rss, end - 720, end - 600, "median")
    summary = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "minutes": args.minutes,
        "clients": args.clients,
        "model": args.model,
        "requests": result["requests"],
        "errors": result["errors"],
        "error_kinds": result["error_kinds"],
        "throughput_rps": round(result["requests"] / result["wall_s"], 2),
        "checked": checked,
        "mismatches": mismatched,
        "healthy_after": healthy,
        "rss_start_mb": round(rss[0][1], 1),
        **marks,
        "rss_end_mb": round(rss[-1][1], 1),
        "rss_max_mb": round(max(r[1] for r in rss), 1),
        "peak_growth_last_10min_pct": round(100 * (peak_last / peak_before - 1), 2),
        "median_growth_last_10min_pct": round(100 * (median_last / median_before - 1), 2),
    }
    print(json.dumps(summary, indent=1), flush=True)
    RESULTS.parent.mkdir(exist_ok=True)
    fields = [
        "date",
        "minutes",
        "clients",
        "model",
        "requests",
        "errors",
        "throughput_rps",
        "checked",
        "mismatches",
        "rss_start_mb",
        "rss_10min_mb",
        "rss_20min_mb",
        "rss_30min_mb",
        "rss_20min_peak_mb",
        "rss_30min_peak_mb",
        "rss_end_mb",
        "rss_max_mb",
        "peak_growth_last_10min_pct",
        "median_growth_last_10min_pct",
    ]
    new = not RESULTS.exists()
    with RESULTS.open("a", newline="") as f:
        w = csv.DictWriter(f, fields, extrasaction="ignore")
        if new:
            w.writeheader()
        w.writerow(summary)


if __name__ == "__main__":
    main()
