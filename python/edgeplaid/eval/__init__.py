"""Evaluation: BEIR-format collections, metrics (ir-measures) and TREC runs."""

from edgeplaid.eval.beir import Collection, DataError, drop_empty, load_beir, read_qrels, read_texts
from edgeplaid.eval.metrics import DEFAULT_MEASURES, evaluate, to_run, write_trec

__all__ = [
    "DEFAULT_MEASURES",
    "Collection",
    "DataError",
    "drop_empty",
    "evaluate",
    "load_beir",
    "read_qrels",
    "read_texts",
    "to_run",
    "write_trec",
]
