"""Retrieval metrics through ir-measures (trec_eval's definitions), and TREC run files."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

Run = dict[str, dict[str, float]]

# The measures edgeplaid reports, by their ir-measures names.
DEFAULT_MEASURES = ("nDCG@10", "RR@10", "R@100")


def to_run(query_ids: Sequence[str], doc_ids: Sequence[Sequence[str | None]], scores: np.ndarray) -> Run:
    """run[query_id][doc_id] = score from ranked lists; None ids (padding) are left out.

    Args:
        query_ids: nq query ids.
        doc_ids: nq lists of k document ids (user ids), best first.
        scores: (nq, k) float32, matching doc_ids.
    """
    run: Run = {}
    for qid, ids, row in zip(query_ids, doc_ids, np.asarray(scores), strict=True):
        run[qid] = {d: float(s) for d, s in zip(ids, row, strict=True) if d is not None and np.isfinite(s)}
    return run


def evaluate(
    run: Run, qrels: dict[str, dict[str, int]], measures: Sequence[str] = DEFAULT_MEASURES
) -> dict[str, float]:
    """Mean of each measure over the judged queries (a judged query missing from run scores 0)."""
    import ir_measures

    parsed = [ir_measures.parse_measure(m) for m in measures]
    full_run = {q: run.get(q, {}) for q in qrels}
    result = ir_measures.calc_aggregate(parsed, qrels, full_run)
    return {m: float(result[p]) for m, p in zip(measures, parsed, strict=True)}


def write_trec(path: str | Path, run: Run, tag: str = "edgeplaid") -> None:
    """Writes a TREC run file ('qid Q0 docid rank score tag'), atomically (write aside, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for qid, docs in run.items():
                ranked = sorted(docs.items(), key=lambda item: -item[1])
                for rank, (doc, score) in enumerate(ranked, 1):
                    f.write(f"{qid} Q0 {doc} {rank} {score:.6f} {tag}\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
