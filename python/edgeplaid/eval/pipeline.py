"""End-to-end evaluation: encode a collection, index it, search its queries, score the run."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgeplaid.eval.beir import Collection
from edgeplaid.eval.metrics import DEFAULT_MEASURES, Run, evaluate, to_run


@dataclass
class EvalReport:
    """What one evaluation measured. Timings in seconds; metrics by ir-measures name."""

    dataset: str
    model: str
    n_docs: int
    n_tokens: int
    n_queries: int
    k: int
    timings: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    exhaustive_metrics: dict[str, float] | None = None
    recall_vs_exhaustive: float | None = None
    index_bytes: int = 0
    run: Run = field(default_factory=dict, repr=False)
    # Every search mode evaluated (late, lexical, hybrid): its metrics; ``metrics`` and ``run``
    # are those of the first mode asked for.
    modes: dict[str, dict[str, float]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k != "run"}
        out["bytes_per_token"] = self.index_bytes / max(self.n_tokens, 1)
        return out


def evaluate_collection(
    collection: Collection,
    model: Any,
    *,
    model_name: str = "",
    k: int = 100,
    nbits: int = 4,
    index_dir: str | Path | None = None,
    exhaustive: bool = False,
    progress: bool = True,
    device: str | torch.device | None = None,
    modes: Sequence[str] = ("late",),
    fusion: str | None = None,
    alpha: float | None = None,
    analyzer: str = "plain",
    buckets: str = "lloyd_max",
    pool_factor: float = 1.0,
) -> EvalReport:
    """Encodes the corpus with ``model`` (an :class:`edgeplaid.ColBERT`), builds a PLAID index
    (in ``index_dir``, or a temporary directory removed afterwards), searches every query
    for its top ``k`` and scores the run against the collection's judgements.

    ``modes``: the search modes to evaluate, each on the same index (``"late"``: PLAID,
    ``"lexical"``: BM25 of the query texts, ``"hybrid"``: both fused with ``fusion`` / ``alpha``;
    see :meth:`edgeplaid.Index.search`); with a lexical or hybrid mode the index is built with
    the documents' texts (``analyzer``). ``report.metrics`` / ``report.run`` are the first mode's,
    ``report.modes`` every mode's metrics.

    With ``exhaustive=True`` the same queries also go through exact MaxSim over every document
    of the index, and the report gives those metrics and PLAID's recall@10 against them.

    ``device``: where the index is searched (default: the model's device, where the queries are).
    ``nbits``, ``buckets``, ``pool_factor``: the index's codec (see :meth:`edgeplaid.Index.build`).
    """
    from edgeplaid.index import Index
    from edgeplaid.search._hybrid import MODES

    modes = list(dict.fromkeys(modes))
    if not modes or any(m not in MODES for m in modes):
        raise ValueError(f"modes: expected some of {', '.join(MODES)}, got {modes!r}")
    lexical = any(m != "late" for m in modes)
    device = torch.device(device) if device is not None else getattr(model, "device", torch.device("cpu"))
    report = EvalReport(collection.name, model_name, len(collection.doc_ids), 0, len(collection.query_ids), k)
    t0 = time.perf_counter()
    tokens, doclens = model.encode_documents(collection.doc_texts, show_progress_bar=progress)
    report.timings["encode_documents"] = time.perf_counter() - t0
    report.n_tokens = int(tokens.shape[0])

    with tempfile.TemporaryDirectory(prefix="edgeplaid-eval-") as scratch:
        path = Path(index_dir) if index_dir is not None else Path(scratch) / "index"
        t0 = time.perf_counter()
        index = Index.build(
            path,
            tokens,
            doclens,
            nbits=nbits,
            ids=collection.doc_ids,
            progress=progress,
            texts=collection.doc_texts if lexical else None,
            analyzer=analyzer,
            buckets=buckets,
            pool_factor=pool_factor,
        )
        report.timings["build_index"] = time.perf_counter() - t0
        report.index_bytes = index.nbytes()
        index = index.to(device)  # built and loaded on the host; searched beside the queries

        queries = mask = late = None
        if modes != ["lexical"] or exhaustive:
            t0 = time.perf_counter()
            queries, mask = model.encode_queries(collection.query_texts, show_progress_bar=progress)
            report.timings["encode_queries"] = time.perf_counter() - t0
        for mode in modes:
            t0 = time.perf_counter()
            if mode == "late":
                result = late = index.search(queries, k=k, queries_mask=mask)
            elif mode == "lexical":
                result = index.search(text=collection.query_texts, k=k)
            else:
                result = index.search(
                    queries, k=k, queries_mask=mask, text=collection.query_texts, fusion=fusion, alpha=alpha
                )
            report.timings["search" if len(modes) == 1 else f"search_{mode}"] = time.perf_counter() - t0
            run = to_run(collection.query_ids, result.user_ids, result.scores.cpu().numpy())
            report.modes[mode] = evaluate(run, collection.qrels, DEFAULT_MEASURES)
            if mode == modes[0]:
                report.run, report.metrics = run, report.modes[mode]

        if exhaustive:
            t0 = time.perf_counter()
            exact = index.search_exhaustive(queries, k=k, queries_mask=mask)
            report.timings["search_exhaustive"] = time.perf_counter() - t0
            exact_run = to_run(collection.query_ids, exact.user_ids, exact.scores.cpu().numpy())
            report.exhaustive_metrics = evaluate(exact_run, collection.qrels, DEFAULT_MEASURES)
            if late is not None:  # PLAID's recall against it
                report.recall_vs_exhaustive = recall_at(late.ids.cpu().numpy(), exact.ids.cpu().numpy(), 10)
        del index  # release the memory maps before the scratch directory goes
    return report


def recall_at(found: np.ndarray, reference: np.ndarray, depth: int) -> float:
    """Mean fraction of each query's reference top-``depth`` ids present in its found top-``depth``.

    Args:
        found, reference: (nq, >= depth) int64 document positions, -1 for none.
    """
    hits = []
    for f, r in zip(found[:, :depth], reference[:, :depth], strict=True):
        want = {int(x) for x in r if x >= 0}
        if want:
            hits.append(len(want & {int(x) for x in f}) / len(want))
    return float(np.mean(hits)) if hits else 1.0
