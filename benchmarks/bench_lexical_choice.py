"""Which library for the lexical (BM25) side of an index: tantivy, SQLite FTS5 or bm25s, compared on
SciFact and Cranfield (BEIR layout under ../shared/data).

    python benchmarks/bench_lexical_choice.py                       # both collections, 3 repeats
    python benchmarks/bench_lexical_choice.py --only cranfield --repeats 5
    EDGEPLAID_BENCH_QUICK=1 python -m pytest benchmarks/bench_lexical_choice.py -m benchmark -s  # smoke

Documents are ``(title + " " + text).strip()``, queries those present in ``qrels/test.tsv``. Every
library sees the same analysis as far as it allows: lowercase, split on anything not a letter or a
digit, no stopwords, no stemming (tantivy's ``default`` tokenizer; FTS5's ``unicode61``, which also
folds diacritics; a ``[^\\W_]+`` regex for bm25s and for the FTS5 query terms). A query is the
disjunction of its terms (repeats kept). Contenders:

- **tantivy** (Python package): text field with the ``default`` tokenizer, stored, frequencies
  without positions (edgeplaid's lexical setting), an i64 fast ``key`` field; one writer thread;
  BM25 fixed at k1=1.2, b=0.75.
- **fts5**: Python's sqlite3, ``fts5(body, tokenize='unicode61')`` in a database file (default
  ``detail=full``: positions kept, texts stored), ``ORDER BY bm25(docs)``; k1=1.2, b=0.75 fixed,
  but its idf is ``ln((N - n + 0.5) / (n + 0.5))`` floored at 1e-6, not Lucene's ``ln(1 + ...)``.
- **bm25s** (numpy backend): method "lucene", k1=1.2, b=0.75, and k1=0.9, b=0.4 (quality only:
  the Cranfield reference setting). It has no incremental update: a change is a full re-index.

Measured per collection and library:

- quality: nDCG@10 and R@100 (ir-measures, graded qrels) of a top-100 run;
- build time of the whole corpus (median over ``--repeats`` builds, libraries alternated);
- query latency p50 / p95: one query at a time, k=10, from the query's text to the top keys,
  timed query by query in alternating library order after an untimed warm-up pass;
- update cost, from an index of all but the last 1% of the corpus: adding that 1%, then deleting
  one document, each until a new query sees the change (tantivy: the open writer's adds or delete
  + ``commit()`` + ``reload()``; FTS5: INSERT / DELETE + ``commit()``, checked from a second
  connection; bm25s: re-tokenising and re-indexing the whole corpus); median over the repeats;
- on-disk size (tantivy's directory, the SQLite file, and ``BM25.save()``'s files for bm25s).

Rows append to benchmarks/results/lexical_choice.csv (not in quick mode); a table is printed.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import re
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
import _harness

RESULTS = _harness.RESULTS / "lexical_choice.csv"
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
COLLECTIONS = ("scifact", "cranfield")
LIBRARIES = ("tantivy", "fts5", "bm25s")
# The collections' SOURCE.md BM25 sanity figures (nDCG@10, R@100) and their settings.
REFERENCE = {
    "scifact": (0.660, 0.889, "SOURCE.md BM25 title+text"),
    "cranfield": (0.311, 0.686, "SOURCE.md BM25 k1=0.9 b=0.4"),
}
_TOKEN = re.compile(r"[^\W_]+")  # letters and digits: tantivy's SimpleTokenizer
_MAX_TOKEN_BYTES = 40  # tantivy's default analyzer drops tokens of 40 bytes or more
_WRITER_HEAP = 64 << 20


def tokens(text: str) -> list[str]:
    """Lowercased runs of letters and digits, as tantivy's ``default`` tokenizer makes them."""
    return [t for t in _TOKEN.findall(text.lower()) if len(t.encode()) < _MAX_TOKEN_BYTES]


# ---------------------------------------------------------------------------- data


@dataclass
class Collection:
    name: str
    doc_ids: list[str]
    texts: list[str]
    query_ids: list[str]
    queries: list[str]
    qrels: dict[str, dict[str, int]]


def load(name: str, data: Path = DATA, max_docs: int | None = None, max_queries: int | None = None):
    root = data / name
    doc_ids, texts = [], []
    with open(root / "corpus.jsonl", encoding="utf-8") as f:
        for line in f:
            d = json.loads(line)
            doc_ids.append(str(d["_id"]))
            texts.append((d.get("title", "") + " " + d.get("text", "")).strip())
    qrels: dict[str, dict[str, int]] = {}
    with open(root / "qrels" / "test.tsv", encoding="utf-8") as f:
        next(f)  # header: query-id corpus-id score
        for line in f:
            qid, did, score = line.rstrip("\n").split("\t")
            qrels.setdefault(qid, {})[did] = int(score)
    qfile = root / "queries_test.jsonl"
    if not qfile.exists():
        qfile = root / "queries.jsonl"
    query_ids, queries = [], []
    with open(qfile, encoding="utf-8") as f:
        for line in f:
            q = json.loads(line)
            if str(q["_id"]) in qrels:
                query_ids.append(str(q["_id"]))
                queries.append(q["text"])
    if max_docs is not None:
        doc_ids, texts = doc_ids[:max_docs], texts[:max_docs]
    if max_queries is not None:
        query_ids, queries = query_ids[:max_queries], queries[:max_queries]
    return Collection(name, doc_ids, texts, query_ids, queries, qrels)


def _dir_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# ---------------------------------------------------------------------------- contenders
# Each: build(texts, keys) indexes from scratch in its own directory; search(text, k) returns
# [(key, score)] best first (score: higher is better); add(texts, keys) and delete(key) return
# once a new query sees the change; nbytes() is the size on disk.


class Tantivy:
    name = "tantivy"

    def __init__(self, root: Path) -> None:
        import tantivy

        self.t = tantivy
        self.root = root
        self.analyzer = (
            tantivy.TextAnalyzerBuilder(tantivy.Tokenizer.simple())
            .filter(tantivy.Filter.remove_long(_MAX_TOKEN_BYTES))
            .filter(tantivy.Filter.lowercase())
            .build()
        )

    def build(self, texts: list[str], keys: list[int]) -> None:
        t = self.t
        self.path = self.root / "tantivy"
        shutil.rmtree(self.path, ignore_errors=True)
        self.path.mkdir(parents=True)
        sb = t.SchemaBuilder()
        sb.add_text_field("body", stored=True, tokenizer_name="default", index_option="freq")
        sb.add_integer_field("key", stored=False, indexed=True, fast=True)
        self.schema = sb.build()
        self.index = t.Index(self.schema, path=str(self.path))
        self.writer = self.index.writer(heap_size=_WRITER_HEAP, num_threads=1)
        for k, text in zip(keys, texts, strict=True):
            self.writer.add_document(t.Document(key=k, body=text))
        self._commit()

    def _commit(self) -> None:
        self.writer.commit()
        self.index.reload()
        self.searcher = self.index.searcher()

    def search(self, text: str, k: int) -> list[tuple[int, float]]:
        t = self.t
        terms = self.analyzer.analyze(text)
        if not terms:
            return []
        q = t.Query.boolean_query(
            [(t.Occur.Should, t.Query.term_query(self.schema, "body", w)) for w in terms]
        )
        hits = self.searcher.search(q, k, count=False).hits
        keys = self.searcher.fast_field_values("key", [a for _, a in hits])
        return [(int(key), float(s)) for key, (s, _) in zip(keys, hits, strict=True)]

    def add(self, texts: list[str], keys: list[int]) -> None:
        for k, text in zip(keys, texts, strict=True):
            self.writer.add_document(self.t.Document(key=k, body=text))
        self._commit()

    def delete(self, key: int) -> None:
        self.writer.delete_documents_by_term("key", key)
        self._commit()

    def nbytes(self) -> int:
        self.writer.wait_merging_threads()  # merges started by the commits land on disk first
        self.writer = self.index.writer(heap_size=_WRITER_HEAP, num_threads=1)
        self.writer.garbage_collect_files()
        return _dir_bytes(self.path)

    def close(self) -> None:
        self.writer = self.searcher = self.index = None


class Fts5:
    name = "fts5"

    def __init__(self, root: Path) -> None:
        self.root = root
        self.con = self.reader = None

    def build(self, texts: list[str], keys: list[int]) -> None:
        self.close()
        self.root.mkdir(parents=True, exist_ok=True)
        self.path = self.root / "fts5.sqlite"
        self.path.unlink(missing_ok=True)
        self.con = sqlite3.connect(self.path)
        self.con.execute("CREATE VIRTUAL TABLE docs USING fts5(body, tokenize='unicode61')")
        self.con.executemany("INSERT INTO docs(rowid, body) VALUES (?, ?)", zip(keys, texts, strict=True))
        self.con.commit()
        self.reader = sqlite3.connect(self.path)  # a second connection: proves commits are visible

    @staticmethod
    def match(text: str) -> str:
        return " OR ".join(f'"{w}"' for w in tokens(text))

    def search(self, text: str, k: int, con: sqlite3.Connection | None = None) -> list[tuple[int, float]]:
        q = self.match(text)
        if not q:
            return []
        rows = (con or self.con).execute(
            "SELECT rowid, bm25(docs) FROM docs WHERE docs MATCH ? ORDER BY bm25(docs) LIMIT ?", (q, k)
        )
        return [(int(r), -float(s)) for r, s in rows.fetchall()]  # bm25() is negative: lower is better

    def add(self, texts: list[str], keys: list[int]) -> None:
        self.con.executemany("INSERT INTO docs(rowid, body) VALUES (?, ?)", zip(keys, texts, strict=True))
        self.con.commit()

    def delete(self, key: int) -> None:
        self.con.execute("DELETE FROM docs WHERE rowid = ?", (key,))
        self.con.commit()

    def nbytes(self) -> int:
        return _dir_bytes(self.path)

    def close(self) -> None:
        for c in (self.con, self.reader):
            if c is not None:
                c.close()
        self.con = self.reader = None


class Bm25s:
    def __init__(self, root: Path, k1: float = 1.2, b: float = 0.75) -> None:
        import bm25s

        self.bm25s = bm25s
        self.root = root
        self.k1, self.b = k1, b
        self.name = "bm25s" if (k1, b) == (1.2, 0.75) else f"bm25s k1={k1} b={b}"

    def build(self, texts: list[str], keys: list[int]) -> None:
        self.texts, self.keys = list(texts), list(keys)
        self._reindex()

    def _reindex(self) -> None:
        self.retriever = self.bm25s.BM25(k1=self.k1, b=self.b, method="lucene")
        self.retriever.index([tokens(t) for t in self.texts], show_progress=False)
        self.key_of = np.asarray(self.keys, dtype=np.int64)

    def search(self, text: str, k: int) -> list[tuple[int, float]]:
        q = tokens(text)
        if not q:
            return []
        k = min(k, len(self.keys))
        res = self.retriever.retrieve([q], k=k, show_progress=False, n_threads=0)
        docs, scores = res.documents[0], res.scores[0]
        return [(int(self.key_of[d]), float(s)) for d, s in zip(docs, scores, strict=True) if s > 0]

    def add(self, texts: list[str], keys: list[int]) -> None:
        self.texts += texts
        self.keys += keys
        self._reindex()

    def delete(self, key: int) -> None:
        at = self.keys.index(key)
        del self.texts[at], self.keys[at]
        self._reindex()

    def nbytes(self) -> int:
        path = self.root / f"bm25s-{self.k1}-{self.b}"
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        self.retriever.save(str(path), show_progress=False)
        return _dir_bytes(path)

    def close(self) -> None:
        self.retriever = None


def available() -> list[str]:
    """The contenders that can run here (a library that is not installed is left out)."""
    out = []
    if importlib.util.find_spec("tantivy") is not None:
        out.append("tantivy")
    try:
        sqlite3.connect(":memory:").execute("CREATE VIRTUAL TABLE t USING fts5(x)")
        out.append("fts5")
    except sqlite3.OperationalError:
        pass
    if importlib.util.find_spec("bm25s") is not None:
        out.append("bm25s")
    return out


def _make(lib: str, root: Path):
    return {"tantivy": Tantivy, "fts5": Fts5, "bm25s": Bm25s}[lib](root)


def versions() -> dict[str, str]:
    out = {"fts5": f"sqlite {sqlite3.sqlite_version}"}
    for lib in ("tantivy", "bm25s"):
        try:
            out[lib] = importlib.metadata.version(lib)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


# ---------------------------------------------------------------------------- measures


def quality(c: Collection, search: Callable[[str, int], list[tuple[int, float]]]) -> dict[str, float]:
    import ir_measures
    from ir_measures import R, nDCG

    run = {}
    for qid, q in zip(c.query_ids, c.queries, strict=True):
        run[qid] = {c.doc_ids[key]: score for key, score in search(q, 100)}
    qrels = {q: c.qrels[q] for q in c.query_ids}
    m = ir_measures.calc_aggregate([nDCG @ 10, R @ 100], qrels, run)
    return {"nDCG@10": float(m[nDCG @ 10]), "R@100": float(m[R @ 100])}


def interleaved(calls: dict[str, Callable[[int], object]], n: int, repeats: int) -> dict[str, np.ndarray]:
    """Seconds of each call per query, timed query by query with the library order alternating,
    after an untimed warm-up pass (rep 0)."""
    lat: dict[str, list[float]] = {k: [] for k in calls}
    items = list(calls.items())
    for rep in range(repeats + 1):
        for i in range(n):
            order = items if (i + rep) % 2 else items[::-1]
            for name, fn in order:
                t = time.perf_counter()
                fn(i)
                if rep:
                    lat[name].append(time.perf_counter() - t)
    return {k: np.asarray(v) for k, v in lat.items()}


def _rotations(libs: list[str], repeats: int) -> list[list[str]]:
    """Library order per repeat: rotated, so no library always runs first or last."""
    return [libs[r % len(libs) :] + libs[: r % len(libs)] for r in range(repeats)]


def _visible(x, c: Collection, key: int, text: str) -> bool:
    """Whether a new query (the document's own text, top 100) finds document ``key``; FTS5 asks
    through its second connection."""
    if isinstance(x, Fts5):
        hits = x.search(text, 100, con=x.reader)
    else:
        hits = x.search(text, 100)
    return any(k == key for k, _ in hits)


def bench_collection(c: Collection, libs: list[str], root: Path, repeats: int) -> dict[str, dict]:
    n = len(c.texts)
    keys = list(range(n))
    out: dict[str, dict] = {lib: {} for lib in libs}
    print(f"\n{c.name}: {n} documents, {len(c.queries)} queries", flush=True)

    # full builds, then quality, size, latency on the last build of each library
    build_s: dict[str, list[float]] = {lib: [] for lib in libs}
    inst = {lib: _make(lib, root / lib) for lib in libs}
    for order in _rotations(libs, repeats):
        for lib in order:
            t = time.perf_counter()
            inst[lib].build(c.texts, keys)
            build_s[lib].append(time.perf_counter() - t)
    for lib in libs:
        out[lib]["build"] = statistics.median(build_s[lib])
        out[lib].update(quality(c, inst[lib].search))
        out[lib]["size"] = inst[lib].nbytes()
        print(f"  {lib}: built, nDCG@10 {out[lib]['nDCG@10']:.4f}", flush=True)
    if "bm25s" in libs:  # the Cranfield reference setting, quality only
        alt = Bm25s(root / "bm25s-alt", k1=0.9, b=0.4)
        alt.build(c.texts, keys)
        out[alt.name] = quality(c, alt.search)
    lat = interleaved(
        {lib: (lambda i, x=inst[lib]: x.search(c.queries[i], 10)) for lib in libs},
        len(c.queries),
        repeats,
    )
    for lib in libs:
        out[lib]["p50"] = float(np.median(lat[lib]))
        out[lib]["p95"] = float(np.percentile(lat[lib], 95))
        inst[lib].close()

    # changes: build all but the last 1% (untimed), add that 1%, delete one document
    n_add = max(1, round(n * 0.01))
    n_init = n - n_add
    gone = n_init // 2
    add_s: dict[str, list[float]] = {lib: [] for lib in libs}
    del_s: dict[str, list[float]] = {lib: [] for lib in libs}
    for order in _rotations(libs, repeats):
        for lib in order:
            x = _make(lib, root / f"{lib}-changes")
            x.build(c.texts[:n_init], keys[:n_init])
            assert not _visible(x, c, n_init, c.texts[n_init])
            t = time.perf_counter()
            x.add(c.texts[n_init:], keys[n_init:])
            add_s[lib].append(time.perf_counter() - t)
            assert _visible(x, c, n_init, c.texts[n_init]), f"{lib}: added document not found"
            assert _visible(x, c, gone, c.texts[gone])
            t = time.perf_counter()
            x.delete(gone)
            del_s[lib].append(time.perf_counter() - t)
            assert not _visible(x, c, gone, c.texts[gone]), f"{lib}: deleted document still found"
            x.close()
    for lib in libs:
        out[lib]["add"] = statistics.median(add_s[lib])
        out[lib]["delete"] = statistics.median(del_s[lib])
        out[lib]["spread"] = {"build": build_s[lib], "add": add_s[lib], "delete": del_s[lib]}
    out["_meta"] = {"n": n, "n_add": n_add, "text_bytes": sum(len(t.encode()) for t in c.texts)}
    return out


# ---------------------------------------------------------------------------- report

_MEASURES = (  # key, CSV label, table header, unit, scale, format
    ("nDCG@10", "nDCG@10", "nDCG@10", "", 1.0, "{:.4f}"),
    ("R@100", "R@100", "R@100", "", 1.0, "{:.4f}"),
    ("build", "build (whole corpus)", "build s", "s", 1.0, "{:.3f}"),
    ("p50", "p50 query (one query, k=10)", "p50 ms", "ms", 1e3, "{:.3f}"),
    ("p95", "p95 query (one query, k=10)", "p95 ms", "ms", 1e3, "{:.3f}"),
    ("add", "add 1% until visible", "add 1% ms", "ms", 1e3, "{:.1f}"),
    ("delete", "delete 1 until visible", "delete 1 ms", "ms", 1e3, "{:.1f}"),
    ("size", "size on disk", "size MiB", "MiB", 1 / 2**20, "{:.2f}"),
)


def rows_of(name: str, res: dict[str, dict], vers: dict[str, str]) -> list[dict]:
    ref_ndcg, ref_r, ref_note = REFERENCE.get(name, (None, None, ""))
    meta = res["_meta"]
    rows = [
        {
            "case": f"{name} corpus text ({meta['n']} docs)",
            "value": meta["text_bytes"] / 2**20,
            "unit": "MiB",
            "baseline": "",
        }
    ]
    base = res.get("tantivy", {})
    for lib, m in res.items():
        if lib == "_meta":
            continue
        lib_name, _, setting = lib.partition(" ")
        label = " ".join(x for x in (lib_name, vers.get(lib_name, ""), setting) if x)
        for key, what, _, unit, scale, _ in _MEASURES:
            if key not in m:
                continue
            case = f"{name} {label} {what}"
            if key == "add":
                case = f"{name} {label} add 1% ({meta['n_add']} docs) until visible"
            if lib.startswith("bm25s") and key in ("add", "delete"):
                case += " (full re-index: no incremental update)"
            if lib.startswith("bm25s") and key == "size":
                case += " (BM25.save files)"
            if lib == "tantivy":
                refs = {"nDCG@10": ref_ndcg, "R@100": ref_r}
                baseline = f"{ref_note} {refs[key]}" if refs.get(key) is not None else ""
            else:
                baseline = f"tantivy {base[key] * scale:.4g}" if key in base else ""
            rows.append({"case": case, "value": m[key] * scale, "unit": unit, "baseline": baseline})
    return rows


def print_table(name: str, res: dict[str, dict]) -> None:
    meta = res["_meta"]
    print(f"\n{name} ({meta['n']} docs; add 1% = {meta['n_add']} docs)")
    print(f"  {'library':<22}" + "".join(f"{m[2]:>13}" for m in _MEASURES))
    for lib, m in res.items():
        if lib != "_meta":
            cells = [fmt.format(m[key] * scale) if key in m else "-" for key, *_, scale, fmt in _MEASURES]
            print(f"  {lib:<22}" + "".join(f"{v:>13}" for v in cells))
    print("  each repeat (build s; add, delete ms), as measured:")
    for lib, m in res.items():
        if "spread" in m:
            sp = m["spread"]
            print(
                f"    {lib:<8} build {' '.join(f'{v:.3f}' for v in sp['build'])}; "
                f"add {' '.join(f'{v * 1e3:.1f}' for v in sp['add'])}; "
                f"delete {' '.join(f'{v * 1e3:.1f}' for v in sp['delete'])}"
            )


def run(
    names: tuple[str, ...] = COLLECTIONS,
    libs: list[str] | None = None,
    repeats: int = 3,
    quick: bool = False,
    data: Path = DATA,
) -> dict[str, dict]:
    libs = [lib for lib in (libs or LIBRARIES) if lib in available()]
    missing = [lib for lib in LIBRARIES if lib not in available()]
    if missing:
        print(f"not installed here, left out: {', '.join(missing)}")
    vers = versions()
    print("contenders: " + ", ".join(f"{lib} {vers.get(lib, '')}" for lib in libs))
    all_res, rows = {}, []
    root = Path(tempfile.mkdtemp(prefix="edgeplaid-lexical-choice-"))
    try:
        for name in names:
            c = load(name, data, max_docs=400 if quick else None, max_queries=20 if quick else None)
            res = bench_collection(c, libs, root / name, 1 if quick else repeats)
            all_res[name] = res
            rows += rows_of(name, res, vers)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    for name, res in all_res.items():
        print_table(name, res)
    print()
    for r in rows:
        print(f"  {r['case']:<100} {r['value']:12.4f} {r['unit']:<4} {r['baseline']}")
    if not quick:
        _harness.append_cases(RESULTS, rows)
        print(f"\nappended {len(rows)} rows to {RESULTS}")
    return all_res


@pytest.mark.benchmark
def test_lexical_choice_smoke():
    if not (DATA / "scifact" / "corpus.jsonl").exists():
        pytest.skip("../shared/data is not here")
    if not available():
        pytest.skip("none of tantivy, FTS5, bm25s is available")
    res = run(quick=_harness.quick())
    for per_lib in res.values():
        for lib, m in per_lib.items():
            if lib != "_meta":
                assert 0.0 <= m["nDCG@10"] <= 1.0


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", default=list(COLLECTIONS), help="collections")
    ap.add_argument("--libs", nargs="*", default=list(LIBRARIES), help="contenders")
    ap.add_argument("--repeats", type=int, default=3, help="builds, changes and timed query passes")
    ap.add_argument("--data", type=Path, default=DATA, help="folder holding the BEIR collections")
    args = ap.parse_args()
    run(tuple(args.only), args.libs, args.repeats, _harness.quick(), args.data)
