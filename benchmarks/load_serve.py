"""Load test of `edgeplaid serve`: 32 concurrent clients reranking 100 documents each.

    python benchmarks/load_serve.py [--seconds 30] [--clients 32] [--pool 400]

Starts the server twice on 127.0.0.1 with the offline MiniLM stand-in encoder (48 dims): with
micro-batching (2 ms window, up to 32 requests a batch) and without (one request a batch), and
drives each for the same time. Documents are SciFact abstracts cut to ~200 tokens, each request
drawing 100 of them from a pool of `--pool` (a reranking service sees popular documents again;
a batch encodes a document text that several of its requests carry once). Reports throughput,
p50/p99 latency, errors (must be 0) and mismatches against the offline `edgeplaid.rerank` of the
same request (on a sample of responses), and appends to benchmarks/results/serve.csv.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import datetime as dt
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

SCIFACT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "scifact"
RESULTS = Path(__file__).parent / "results" / "serve.csv"


def texts(pool: int) -> tuple[list[str], list[str]]:
    docs, queries = [], []
    with (SCIFACT / "corpus.jsonl").open() as f:
        for line in f:
            words = json.loads(line)["text"].split()
            if len(words) >= 150:
                docs.append(" ".join(words[:150]))  # ~200 word pieces
            if len(docs) == pool:
                break
    with (SCIFACT / "queries.jsonl").open() as f:
        queries = [json.loads(line)["text"] for line in f][:500]
    return docs, queries


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(port: int, batched: bool) -> subprocess.Popen:
    window, batch = ("2", "32") if batched else ("0", "1")
    cmd = [
        sys.executable,
        "-m",
        "edgeplaid.cli",
        "serve",
        "--model",
        "minilm",
        "--port",
        str(port),
        "--quiet",
    ]
    cmd += ["--batch-window-ms", window, "--max-batch", batch, "--max-queue", "1024"]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.Popen(cmd, env=env)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.5)
        if proc.poll() is not None:
            raise RuntimeError("the server exited during start-up")
    proc.terminate()
    raise RuntimeError("the server did not start in 180 s")


async def drive(url: str, seconds: float, clients: int, docs: list[str], queries: list[str]) -> dict:
    latencies: list[float] = []
    errors = 0
    samples: list[tuple[dict, list]] = []
    stop = time.monotonic() + seconds

    async def client(c: int) -> None:
        nonlocal errors
        rng = random.Random(c)
        async with httpx.AsyncClient(base_url=url, timeout=600) as http:
            while time.monotonic() < stop:
                body = {"query": rng.choice(queries), "documents": rng.sample(docs, 100), "top_n": 10}
                t0 = time.perf_counter()
                try:
                    r = await http.post("/v1/rerank", json=body)
                    ok = r.status_code == 200
                except httpx.HTTPError:
                    ok = False
                if not ok:
                    errors += 1
                    continue
                latencies.append(time.perf_counter() - t0)
                if len(samples) < 8 and rng.random() < 0.5:
                    samples.append((body, r.json()["results"]))

    t0 = time.perf_counter()
    await asyncio.gather(*(client(c) for c in range(clients)))
    wall = time.perf_counter() - t0  # includes the requests still in flight at the deadline
    lat = sorted(latencies)
    return {
        "requests": len(lat),
        "errors": errors,
        "throughput_rps": len(lat) / wall,
        "p50_ms": 1e3 * statistics.median(lat) if lat else float("nan"),
        "p99_ms": 1e3 * lat[min(len(lat) - 1, int(0.99 * len(lat)))] if lat else float("nan"),
        "samples": samples,
    }


def mismatches(samples: list[tuple[dict, list]]) -> int:
    """Responses whose ranking or scores differ from the offline edgeplaid.rerank."""
    from edgeplaid import rerank
    from edgeplaid.model import load_model

    model = load_model("minilm")
    bad = 0
    for body, results in samples:
        scores, order = rerank(body["query"], body["documents"], k=body["top_n"], model=model)
        got = [(r["index"], r["relevance_score"]) for r in results]
        want = list(zip(order.tolist(), scores.tolist(), strict=True))
        same = len(got) == len(want) and all(
            abs(gs - ws) < 1e-4 and (gi == wi or abs(gs - ws) < 1e-4)
            for (gi, gs), (wi, ws) in zip(got, want, strict=True)
        )
        bad += not same
    return bad


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--pool", type=int, default=400)
    args = parser.parse_args()
    docs, queries = texts(args.pool)
    rows = []
    for batched in (True, False):
        port = free_port()
        proc = start_server(port, batched)
        try:
            result = asyncio.run(drive(f"http://127.0.0.1:{port}", args.seconds, args.clients, docs, queries))
        finally:
            proc.terminate()
            proc.wait(timeout=60)
        result["mismatches"] = mismatches(result.pop("samples"))
        result["mode"] = "batched (2 ms, <= 32)" if batched else "unbatched"
        rows.append(result)
        print(
            f"{result['mode']:<24} {result['requests']:>5} requests  {result['throughput_rps']:7.2f} req/s  "
            f"p50 {result['p50_ms']:8.0f} ms  p99 {result['p99_ms']:8.0f} ms  errors {result['errors']}  "
            f"mismatches {result['mismatches']}",
            flush=True,
        )
    ratio = rows[0]["throughput_rps"] / max(rows[1]["throughput_rps"], 1e-9)
    print(f"batched / unbatched throughput: x{ratio:.2f} (goal >= 2, with 0 errors and 0 mismatches)")
    RESULTS.parent.mkdir(exist_ok=True)
    new = not RESULTS.exists()
    with RESULTS.open("a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(
                [
                    "date",
                    "mode",
                    "clients",
                    "seconds",
                    "pool",
                    "requests",
                    "throughput_rps",
                    "p50_ms",
                    "p99_ms",
                    "errors",
                    "mismatches",
                ]
            )
        for r in rows:
            w.writerow(
                [
                    dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                    r["mode"],
                    args.clients,
                    args.seconds,
                    args.pool,
                    r["requests"],
                    round(r["throughput_rps"], 3),
                    round(r["p50_ms"], 1),
                    round(r["p99_ms"], 1),
                    r["errors"],
                    r["mismatches"],
                ]
            )


if __name__ == "__main__":
    main()
