"""Peer engines on the same embeddings, run inside their own virtual environment (torch 2.11).

Usage (by bench_search.py, through subprocess): ``<peers-venv>/bin/python _peers.py ENGINE NPZ OUT_JSON``
with ENGINE in {fast-plaid, warp}. NPZ holds doc_tokens (n, dim) float32, doclens (nd,),
queries (nq, Lq, dim) float32, queries_mask (nq, Lq) bool. Writes build seconds, index bytes,
per-query latencies (one query at a time), batched seconds and the top-10 ids as JSON.
This file imports neither edgeplaid nor the project's torch: it runs under the peers' torch.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np
import torch


def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def main(engine: str, npz: str, out: str, k: int = 10) -> None:
    data = np.load(npz)
    tokens = torch.from_numpy(data["doc_tokens"])
    doclens = data["doclens"].tolist()
    docs = list(torch.split(tokens, doclens))
    qs = [torch.from_numpy(q[m]) for q, m in zip(data["queries"], data["queries_mask"], strict=True)]
    work = tempfile.mkdtemp(prefix=f"peer-{engine}-")
    torch.set_num_threads(os.cpu_count() or 1)
    try:
        if engine == "fast-plaid":
            from fast_plaid import search

            t0 = time.perf_counter()
            index = search.FastPlaid(index=os.path.join(work, "idx"), device="cpu")
            index.create(documents_embeddings=docs, nbits=4)
            build = time.perf_counter() - t0

            def run(batch):
                return index.search(queries_embeddings=batch, top_k=k, show_progress=False)
        elif engine == "warp":
            from xtr_warp import XTRWarp

            t0 = time.perf_counter()
            index = XTRWarp(index=os.path.join(work, "idx"), device="cpu")
            index.create(embeddings_source=docs, device="cpu", nbits=4, show_progress=False)
            build = time.perf_counter() - t0
            index.load(device="cpu", mmap=True)
            threads = os.cpu_count() or 1

            def run(batch):
                return index.search(
                    queries_embeddings=batch, top_k=k, num_threads=threads, show_progress=False
                )
        else:
            raise SystemExit(f"unknown engine {engine}")
        run([qs[0]])  # warm-up (loads the index)
        lat = []
        single_ids = []
        for q in qs:
            t = time.perf_counter()
            res = run([q])
            lat.append(time.perf_counter() - t)
            single_ids.append([int(d) for d, _ in res[0]])
        t = time.perf_counter()
        run(qs)
        batched = time.perf_counter() - t
        result = {
            "engine": engine,
            "build_s": build,
            "index_bytes": _dir_bytes(os.path.join(work, "idx")),
            "n_tokens": int(tokens.shape[0]),
            "latencies_s": lat,
            "batched_s": batched,
            "ids": single_ids,
        }
        with open(out, "w") as f:
            json.dump(result, f)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3])
