"""Metadata files and filters (edgeplaid.index._metadata): the where grammar against a plain-Python
evaluation of SQL semantics, hostile filters, JSON validation, unicode round trips, copy-on-write
of the file (drop / renumber / add) and concurrent readers."""

from __future__ import annotations

import json
import math
import os
import random
import re
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgeplaid.index._metadata import (
    MAX_DEPTH,
    MAX_TERMS,
    MAX_WHERE_CHARS,
    METADATA_FILE,
    MetadataReader,
    WhereError,
    check_metadata,
    compile_where,
    write_metadata,
)
from edgeplaid.index._storage import IndexFormatError

# ------------------------------------------------------------------ helpers

SMALL = [
    {"year": 1999, "source": "pubmed", "score": 0.5, "flag": True, "a": {"b": 1, "c": "x"}},
    {"year": 2005, "source": "arxiv", "score": 2.25, "flag": False, "a": {"b": 2}},
    None,  # no row at all: never matches, not even IS NULL
    {"year": 2010, "source": "O'Brien", "flag": True, "a": 7},
    {"year": None, "source": "PubMed Central", "score": -1.0},
    {},
    {"year": "2005", "source": "wiki", "a": {"b": 2, "c": "y"}},
    {"year": 2020, "source": "a%b", "tags": ["x", "y"], "flag": False},
]


def _write(path: Path, metas: list[dict[str, Any] | None]) -> Path:
    rows = [(i, m) for i, m in enumerate(check_metadata(metas, len(metas))) if m is not None]
    write_metadata(path, None, add=rows)
    return path


@pytest.fixture
def small(tmp_path: Path):
    with MetadataReader(_write(tmp_path / METADATA_FILE, SMALL)) as r:
        yield r


def _sel(r: MetadataReader, where: str, params: Any = None) -> list[int]:
    out = r.select(where, params)
    assert out.dtype == np.int64
    assert np.all(np.diff(out) > 0)  # sorted, unique
    return out.tolist()


# ------------------------------------------------------------------ the grammar on a small table


@pytest.mark.parametrize(
    "where, params, expected",
    [
        ("year = 2005", None, [1]),
        ("year == 2005", None, [1]),
        ("year = '2005'", None, [6]),  # a string never equals a number
        ("year != 2005", None, [0, 3, 6, 7]),  # NULL and missing years match neither = nor !=
        ("year <> 2005", None, [0, 3, 6, 7]),
        ("year > 2005", None, [3, 6, 7]),  # strings sort after numbers
        ("year >= 2005", None, [1, 3, 6, 7]),
        ("year < 2005", None, [0]),
        ("year <= 2005.0", None, [0, 1]),
        ("score > -1.5", None, [0, 1, 4]),
        ("score < 1e1", None, [0, 1, 4]),
        ("year >= 2000 AND year < 2015", None, [1, 3]),
        ("year = 1999 OR year = 2020 AND flag = TRUE", None, [0]),  # AND binds tighter
        ("(year = 1999 OR year = 2020) AND flag = FALSE", None, [7]),
        ("NOT year = 2005", None, [0, 3, 6, 7]),
        ("NOT (year = 2005 OR year = 1999)", None, [3, 6, 7]),
        ("NOT NOT year = 2005", None, [1]),
        ("not year = 2005 and flag = true", None, [0, 3]),  # keywords in any case
        ("year IN (1999, 2010, '2005')", None, [0, 3, 6]),
        ("year NOT IN (1999, 2010)", None, [1, 6, 7]),
        ("source LIKE 'pub%'", None, [0, 4]),  # ASCII case folded
        ("source NOT LIKE '%b%'", None, [1, 6]),
        ("source LIKE 'a_b'", None, [7]),
        ("year BETWEEN 2000 AND 2010", None, [1, 3]),
        ("year NOT BETWEEN 2000 AND 2010", None, [0, 6, 7]),
        ("year IS NULL", None, [4, 5]),
        ("year IS NOT NULL", None, [0, 1, 3, 6, 7]),
        ("a.b = 2", None, [1, 6]),
        ("a.c IS NOT NULL", None, [0, 6]),
        ("a.b IS NULL", None, [3, 4, 5, 7]),  # a is 7 in doc 3: a.b is NULL there
        ("a = 7", None, [3]),
        ("flag = TRUE", None, [0, 3]),
        ("flag = FALSE", None, [1, 7]),
        ("flag = 1", None, [0, 3]),  # JSON true is 1 to SQLite
        ("flag = ?", [True], [0, 3]),
        ("year >= ? AND source = ?", [2000, "arxiv"], [1]),
        ("year IN (?, ?)", (1999, 2020), [0, 7]),
        ("year BETWEEN ? AND ?", [np.int64(2000), np.float32(2015)], [1, 3]),
        ("source = 'O''Brien'", None, [3]),
        ("source = ?", ["O'Brien"], [3]),
        ("source LIKE ?", ["%'%"], [3]),
        ("year = ?", [None], []),  # = NULL is never true
        ("tags IS NOT NULL", None, [7]),
        ("nothing IS NULL", None, [0, 1, 3, 4, 5, 6, 7]),
        ("  year\t=\n2005  ", None, [1]),
    ],
)
def test_select_small(small: MetadataReader, where: str, params: Any, expected: list[int]) -> None:
    assert _sel(small, where, params) == expected


def test_get_and_count(small: MetadataReader) -> None:
    assert small.count() == 7
    assert small.get([3, 2, 0, 3, -1, 99]) == [SMALL[3], None, SMALL[0], SMALL[3], None, None]
    assert small.get(np.array([5, 7], dtype=np.uint32)) == [{}, SMALL[7]]
    assert small.get([]) == []
    a, b = small.get([0, 0])
    a["year"] = 0  # every call parses afresh: no dict is shared
    assert b["year"] == 1999 and small.get([0])[0]["year"] == 1999
    with pytest.raises(ValueError, match="positions"):
        small.get([1.5])


def test_select_cache(small: MetadataReader, monkeypatch) -> None:
    """A repeated filter is answered from the reader's cache (the file never changes): the same
    read-only result; distinct params and value types are distinct filters; the cache is bounded."""
    from edgeplaid.index import _metadata

    monkeypatch.setattr(_metadata, "CACHE_FILTERS", 2)
    a = small.select("year >= ?", [2000])
    assert small.select("year >= ?", [2000]) is a and not a.flags.writeable
    with pytest.raises(ValueError):
        a[0] = 1
    assert small.select("year >= ?", [2010]).tolist() == [3, 6, 7]  # other params: another filter
    assert small.select("flag = ?", [True]).tolist() == small.select("flag = ?", [1]).tolist() != []
    assert len(small._cache) == 2 and small._cached == sum(x.shape[0] for x in small._cache.values())
    assert (
        small.select("year >= ?", [2000]) is not a
        and small.select("year >= ?", [2000]).tolist() == a.tolist()
    )
    monkeypatch.setattr(_metadata, "CACHE_POSITIONS", 1)
    big = small.select("year IS NOT NULL")
    assert big.shape[0] > 1 and small.select("year IS NOT NULL") is not big  # too large to keep


def test_closed_reader(tmp_path: Path) -> None:
    r = MetadataReader(_write(tmp_path / "m.sqlite", SMALL))
    r.close()
    r.close()  # idempotent
    for call in (lambda: r.count(), lambda: r.select("year = 1"), lambda: r.get([0])):
        with pytest.raises(ValueError, match="closed"):
            call()


# ------------------------------------------------------------------ against a Python evaluation

_FIELDS_CMP = ["year", "score", "source", "flag", "a.b", "a.c", "year", "score"]
_FIELDS_NULL = ["year", "score", "source", "a", "a.b", "tags", "missing", "a.c.d"]
_SOURCES = ["pubmed", "arxiv", "PubMed", "O'Brien", "Ünïcode", "ünïcode", "日本語", "e\u0301", "\u00e9",
            "😀 emoji", "a%b", "a_b", "", "pub"]  # fmt: skip
_PATTERNS = ["pub%", "%med", "%", "a_b", "a%b", "_", "O'%", "%日%", "e%", "P%", "%😀%", "%\u0301", "",
             "__", "%Ü%", "%ü%", "_ub%"]  # fmt: skip


def _random_doc(rng: random.Random) -> dict[str, Any] | None:
    if rng.random() < 0.08:
        return None
    d: dict[str, Any] = {}
    r = rng.random()
    if r < 0.7:
        d["year"] = rng.randint(1990, 2010)
    elif r < 0.8:
        d["year"] = None
    elif r < 0.85:
        d["year"] = str(rng.randint(1990, 2010))
    elif r < 0.9:
        d["year"] = rng.randint(1990, 2010) + 0.5
    if rng.random() < 0.8:
        d["score"] = rng.randint(-20, 20) / 4  # exact in binary: SQLite parses the same double
    if rng.random() < 0.85:
        d["source"] = rng.choice(_SOURCES) if rng.random() < 0.9 else None
    if rng.random() < 0.7:
        d["flag"] = rng.random() < 0.5
    r = rng.random()
    if r < 0.6:
        d["a"] = {"c": rng.choice(_SOURCES)}
        if rng.random() < 0.8:
            d["a"]["b"] = rng.randint(0, 5)
    elif r < 0.8:
        d["a"] = rng.randint(0, 5)
    if rng.random() < 0.3:
        d["tags"] = [rng.choice(_SOURCES) for _ in range(rng.randint(0, 3))]
    return d


def _random_value(rng: random.Random, field: str) -> Any:
    r = rng.random()
    if r < 0.05:  # across types: numbers sort before strings
        return rng.choice(["2000", "abc", 3, 1.5, True])
    if field == "year":
        return rng.randint(1988, 2012) + (0.5 if rng.random() < 0.2 else 0)
    if field == "score":
        return rng.randint(-22, 22) / 4
    if field in ("source", "a.c"):
        return rng.choice(_SOURCES)
    if field == "flag":
        return rng.random() < 0.5
    return rng.randint(-1, 6)


def _random_pred(rng: random.Random, depth: int) -> tuple:
    r = rng.random()
    if depth > 0 and r < 0.45:
        op = rng.choice(["AND", "OR"])
        return (op, [_random_pred(rng, depth - 1) for _ in range(rng.randint(2, 3))])
    if depth > 0 and r < 0.55:
        return ("NOT", _random_pred(rng, depth - 1))
    kind = rng.choice(["cmp", "cmp", "cmp", "in", "like", "between", "null"])
    neg = rng.random() < 0.4
    if kind == "null":
        return ("null", rng.choice(_FIELDS_NULL), neg)
    if kind == "like":
        return ("like", rng.choice(["source", "a.c"]), neg, rng.choice(_PATTERNS))
    field = rng.choice(_FIELDS_CMP)
    if kind == "cmp":
        return (
            "cmp",
            field,
            rng.choice(["=", "==", "!=", "<>", "<", "<=", ">", ">="]),
            _random_value(rng, field),
        )
    if kind == "in":
        return ("in", field, neg, [_random_value(rng, field) for _ in range(rng.randint(1, 4))])
    lo, hi = sorted([_random_value(rng, field), _random_value(rng, field)], key=_sql_key)
    return ("between", field, neg, lo, hi)


def _kw(rng: random.Random, word: str) -> str:
    return rng.choice([word, word.lower(), word.capitalize()])


def _render_value(rng: random.Random, v: Any, params: list[Any]) -> str:
    if rng.random() < 0.4:
        params.append(v)
        return "?"
    if isinstance(v, bool):
        return _kw(rng, "TRUE" if v else "FALSE")
    if isinstance(v, str):
        return "'" + v.replace("'", "''") + "'"
    return repr(v)


def _render(rng: random.Random, p: tuple, params: list[Any]) -> str:
    """The predicate as filter text (the inverse of the parser, written independently of it)."""
    kind = p[0]
    if kind in ("AND", "OR"):
        return f" {_kw(rng, kind)} ".join(f"({_render(rng, c, params)})" for c in p[1])
    if kind == "NOT":
        return f"{_kw(rng, 'NOT')} ({_render(rng, p[1], params)})"
    field = p[1]
    if kind == "cmp":
        return f"{field} {p[2]} {_render_value(rng, p[3], params)}"
    no = _kw(rng, "NOT") + " " if p[2] else ""
    if kind == "null":
        return f"{field} {_kw(rng, 'IS')} {no}{_kw(rng, 'NULL')}"
    if kind == "like":
        return f"{field} {no}{_kw(rng, 'LIKE')} {_render_value(rng, p[3], params)}"
    if kind == "in":
        return f"{field} {no}{_kw(rng, 'IN')} ({', '.join(_render_value(rng, v, params) for v in p[3])})"
    lo, hi = (_render_value(rng, v, params) for v in p[3:])
    return f"{field} {no}{_kw(rng, 'BETWEEN')} {lo} {_kw(rng, 'AND')} {hi}"


_MISSING = object()


def _extract(doc: dict[str, Any], field: str) -> Any:
    """json_extract(meta, '$.a.b'): None for a missing key or a non-object on the way; JSON
    true / false as 1 / 0; an object or array as (non-NULL) JSON text."""
    v: Any = doc
    for part in field.split("."):
        if not isinstance(v, dict) or part not in v:
            return None
        v = v[part]
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, (dict, list)):
        return json.dumps(v)
    return v


def _sql_key(v: Any) -> tuple[int, Any]:
    # SQLite's order across storage classes: numbers before text (no NULL here).
    return (1, v) if isinstance(v, str) else (0, int(v) if isinstance(v, bool) else v)


def _cmp(x: Any, op: str, v: Any) -> bool | None:
    if x is None or v is None:
        return None
    a, b = _sql_key(x), _sql_key(v)
    if op in ("=", "=="):
        return a == b
    if op in ("!=", "<>"):
        return a != b
    return {"<": a < b, "<=": a <= b, ">": a > b, ">=": a >= b}[op]


def _not(t: bool | None) -> bool | None:
    return None if t is None else not t


def _and(ts: list[bool | None]) -> bool | None:
    return False if False in ts else (None if None in ts else True)


def _or(ts: list[bool | None]) -> bool | None:
    return True if True in ts else (None if None in ts else False)


def _like(x: Any, pattern: str) -> bool | None:
    if x is None:
        return None
    assert isinstance(x, str)  # the generator only LIKEs string fields
    rx = "".join(".*" if c == "%" else "." if c == "_" else re.escape(c) for c in pattern)
    # SQLite's LIKE folds ASCII letters only.
    return re.fullmatch(rx, x, re.DOTALL | re.IGNORECASE | re.ASCII) is not None


def _eval(p: tuple, doc: dict[str, Any]) -> bool | None:
    """SQL three-valued logic: True, False or None (unknown, which a WHERE does not keep)."""
    kind = p[0]
    if kind == "AND":
        return _and([_eval(c, doc) for c in p[1]])
    if kind == "OR":
        return _or([_eval(c, doc) for c in p[1]])
    if kind == "NOT":
        return _not(_eval(p[1], doc))
    x = _extract(doc, p[1])
    if kind == "cmp":
        return _cmp(x, p[2], p[3])
    if kind == "null":
        return (x is not None) if p[2] else (x is None)
    if kind == "like":
        t = _like(x, p[3])
    elif kind == "in":
        t = _or([_cmp(x, "=", v) for v in p[3]])
    else:
        t = _and([_cmp(x, ">=", p[3]), _cmp(x, "<=", p[4])])
    return _not(t) if p[2] else t


def test_select_matches_python_evaluation(tmp_path: Path) -> None:
    rng = random.Random(1234)
    docs = [_random_doc(rng) for _ in range(400)]
    with MetadataReader(_write(tmp_path / "m.sqlite", docs)) as r:
        n_nonempty = 0
        for _ in range(400):
            pred = _random_pred(rng, rng.randint(0, 4))
            params: list[Any] = []
            where = _render(rng, pred, params)
            expected = [i for i, d in enumerate(docs) if d is not None and _eval(pred, d) is True]
            got = _sel(r, where, params)
            assert got == expected, (where, params)
            n_nonempty += 0 < len(expected) < len(docs) - 40
        # the predicates are not trivial: most of them select some documents, not all
        assert n_nonempty > 200


def test_compiled_sql_holds_no_user_text() -> None:
    rng = random.Random(7)
    allowed = {"json_extract", "meta", "AND", "OR", "NOT", "IN", "IS", "NULL", "LIKE", "BETWEEN"}
    for _ in range(200):
        params: list[Any] = []
        where = _render(rng, _random_pred(rng, 3), params)
        sql, args = compile_where(where, params)
        assert set(re.findall(r"[A-Za-z_]+", sql)) <= allowed, sql
        assert re.fullmatch(r"[A-Za-z_(), ?=<>!]+", sql), sql  # no quote, digit or dot
        assert sql.count("?") == len(args)
    sql, args = compile_where("a.b_2 = 'x''y' AND c LIKE ?", ["%"])
    assert args == ['$."a"."b_2"', "x'y", '$."c"', "%"]


# ------------------------------------------------------------------ refused filters

HOSTILE = [
    ("year = 1; DROP TABLE docs", "';'"),
    ("year = 1;", "';'"),
    ("DROP TABLE docs", "DROP"),
    ("year IN (SELECT pos FROM docs)", "SELECT"),
    ("(SELECT pos FROM docs)", "SELECT"),
    ("year = (SELECT 1)", "position 7"),
    ("lower(source) = 'a'", "function calls"),
    ("source = lower('A')", "function calls"),
    ("json_extract(meta, '$.year') = 1", "function calls"),
    ("load_extension('/tmp/evil.so') IS NULL", "function calls"),
    ("year = 1 AND load_extension('x') = 1", "function calls"),
    ("EXISTS (SELECT 1)", "function calls"),
    ('"source" = 1', "double-quoted"),
    ("`source` = 1", "backquoted"),
    ("[source] = 1", "bracketed"),
    ("source = 1 UNION SELECT 1", "UNION"),
    ("source = 1 /* hidden */", "comments"),
    ("/**/year = 1", "comments"),
    ("source = 1 -- rest", "comments"),
    ("year --1", "comments"),
    ("year ~ 1", "'~'"),
    ("year & 1 = 1", "'&'"),
    ("source || 'x' = 'ax'", "'|'"),
    ("year + 1 = 2", "'\\+'"),
    ("year => 1", "expected a value"),
    ("year === 1", "expected a value"),
    ("year GLOB 'a*'", "GLOB"),
    ("year REGEXP 'a'", "REGEXP"),
    ("source = 'a' COLLATE NOCASE", "COLLATE"),
    ("year = 1 ORDER BY 1", "ORDER"),
    ("year IS 1", "NULL after IS"),
    ("year = NULL", "IS NULL"),
    ("year IN ()", "IN list"),
    ("year IN (NULL)", "IS NULL"),
    ("year IN 1", "'\\('"),
    ("year BETWEEN 1 OR 2", "AND in BETWEEN"),
    ("year NOT = 1", "IN, LIKE or BETWEEN after NOT"),
    ("source LIKE 5", "must be a string"),
    ("source = 'unterminated", "unterminated string"),
    ("source = 'it''s", "unterminated string"),
    ("year = 1 year = 2", "AND, OR or the end"),
    ("year = 1 )", "AND, OR or the end"),
    ("(year = 1", "'\\)'"),
    ("year = 1 AND", "end of the filter"),
    ("year", "operator after the field"),
    ("= 1", "field name"),
    ("AND = 1", "keyword 'AND'"),
    ("null = 1", "keyword 'NULL'"),
    ("in IN (1)", "keyword 'IN'"),
    ("year = ?1", "AND, OR or the end"),
    ("year = :x", "':'"),
    ("year = @x", "'@'"),
    ("year = $x", "'\\$'"),
    ("year = x'00'", "position 7"),
    ("year = 99999999999999999999", "64-bit"),
    ("score = 1e999", "out of range"),
    ("a..b = 1", "'.'"),
    ("a.1 = 1", "position 1"),
    ("ye\u0430r = 1", "'\u0430'"),  # a Cyrillic letter in a field name
    ("year = 1\x00", "'\\\\x00'"),
    ("", "empty"),
    ("   \n\t", "empty"),
]


@pytest.mark.parametrize("where, why", HOSTILE)
def test_hostile_filters_refused(tmp_path: Path, where: str, why: str) -> None:
    path = _write(tmp_path / "m.sqlite", SMALL)
    before = path.read_bytes()
    with MetadataReader(path) as r:
        with pytest.raises(WhereError, match=why) as e:
            r.select(where)
        assert str(e.value).startswith("where: ")
        assert r.count() == 7 and _sel(r, "year = 2005") == [1]  # intact
    assert path.read_bytes() == before


@pytest.mark.parametrize(
    "where, params, why",
    [
        (None, None, "must be a str"),
        (b"year = 1", None, "must be a str"),
        (5, None, "must be a str"),
        ("year = ?", None, r"1 '\?' but 0 params"),
        ("year = ?", [1, 2], r"1 '\?' but 2 params"),
        ("year = 1", [1], r"0 '\?' but 1 params"),
        ("year = ?", "1", "sequence"),
        ("year = ?", {"a": 1}, "sequence"),
        ("year = ?", [float("nan")], "finite"),
        ("year = ?", [float("inf")], "finite"),
        ("year = ?", [2**63], "64-bit"),
        ("year = ?", [[1]], "type list"),
        ("year = ?", [b"x"], "type bytes"),
        ("year = ?", [{"a": 1}], "type dict"),
        ("year = ?", ["\ud800"], "surrogate"),
        ("source LIKE ?", [5], "must be a str"),
        ("source LIKE ?", [None], "must be a str"),
    ],
)
def test_bad_where_or_params(where: Any, params: Any, why: str) -> None:
    with pytest.raises(WhereError, match=why) as e:
        compile_where(where, params)
    assert str(e.value).startswith("where: ")
    assert isinstance(e.value, ValueError)


def test_quotes_in_params_are_data(tmp_path: Path) -> None:
    hostile = "x' OR 1=1 --"
    docs = [*SMALL, {"source": hostile}]
    with MetadataReader(_write(tmp_path / "m.sqlite", docs)) as r:
        assert _sel(r, "source = ?", [hostile]) == [8]
        assert _sel(r, "source = ?", ["nothing' OR '1'='1"]) == []
        assert _sel(r, "source = ?", ["'; DROP TABLE docs; --"]) == []
        assert _sel(r, "source = 'x'' OR 1=1 --'") == [8]
        assert r.count() == 8


def test_limits(tmp_path: Path) -> None:
    with MetadataReader(_write(tmp_path / "m.sqlite", SMALL)) as r:
        # the largest filters allowed run on SQLite (its parser stack is the binding limit)
        # AND and OR alternating at every level: the deepest SQL the compiler can be asked for
        pred: tuple = ("cmp", "year", "=", 1999)
        for i in range(MAX_DEPTH):
            pred = ("AND" if i % 2 else "OR", [("cmp", "flag", "=", i % 4 < 2), pred])
        params: list[Any] = []
        deep = _render(random.Random(0), pred, params)
        assert deep.count("((") >= MAX_DEPTH - 1
        expected = [i for i, d in enumerate(SMALL) if d is not None and _eval(pred, d) is True]
        assert _sel(r, deep, params) == expected and expected
        nots = "NOT " * MAX_DEPTH + "year = 1999"
        assert _sel(r, nots) == [0]
        parens = "(" * MAX_DEPTH + "year = 1999" + ")" * MAX_DEPTH
        assert _sel(r, parens) == [0]
        mixed = "year = 1999"
        for i in range(MAX_DEPTH // 2):
            mixed = (
                f"NOT (year = {i} {'AND' if i % 2 else 'OR'} {mixed})"
                if i % 3
                else f"(year = {i} OR {mixed})"
            )
        r.select(mixed)
        many = " OR ".join(f"year={1000 + i}" for i in range(MAX_TERMS - 1)) + " OR year=2010"
        assert _sel(r, many) == [3]
        many_in = f"year IN ({','.join(['?'] * 1500)})"
        assert _sel(r, many_in, [2005] * 1499 + [2010]) == [1, 3]
        # one step further is refused
        with pytest.raises(WhereError, match="nested deeper"):
            r.select("NOT " * (MAX_DEPTH + 1) + "year = 1")
        with pytest.raises(WhereError, match="nested deeper"):
            r.select("(" * (MAX_DEPTH + 1) + "year = 1" + ")" * (MAX_DEPTH + 1))
        with pytest.raises(WhereError, match="more than 256 comparisons"):
            r.select(" OR ".join(["a=1"] * (MAX_TERMS + 1)))
        with pytest.raises(WhereError, match="characters"):
            r.select("year = 1" + " " * MAX_WHERE_CHARS)
    # pathological but short inputs fail fast
    t = time.perf_counter()
    for where in (
        "'" + "''" * 2000,
        "(" * 4000,
        "NOT " * 1000,
        "a" * 4096,
        "'" * 4095,
        "x IN (" + "1," * 2000,
    ):
        with pytest.raises(WhereError):
            compile_where(where)
    assert time.perf_counter() - t < 1.0


# ------------------------------------------------------------------ validation and round trips


def test_unicode_and_nulls_round_trip(tmp_path: Path) -> None:
    docs: list[dict[str, Any] | None] = [
        {"title": "😀🎉 emoji", "zh": "中文标题", "ja": "日本語", "nfd": "e\u0301", "nfc": "\u00e9"},
        {"nul": None, "list": [None, 1, "x", [], {}], "obj": {"deep": {"er": [None]}}},
        {
            "keys 😀": 1,
            "": "empty key",
            "quote'\"\\": "back\\slash \"quotes\" 'single'",
            "ctl": "\x00\n\t\x1f",
            "ctl2": "\n\t\x1f",
        },
        {"big": 2**63 - 1, "small": -(2**63), "tiny": 5e-324, "f": 0.1, "neg0": -0.0, "t": True, "fa": False},
        None,
        {},
        {"rtl": "\u202eevil", "zw": "a\u200bb", "bom": "\ufeff", "astral": "\U0010ffff"},
    ]
    path = _write(tmp_path / "m.sqlite", docs)
    with MetadataReader(path) as r:
        got = r.get(range(len(docs)))
        assert got == docs
        assert [type(v) for v in got[3].values()] == [type(v) for v in docs[3].values()]
        assert _sel(r, "title = ?", ["😀🎉 emoji"]) == [0]
        assert _sel(r, "zh LIKE '%标%'") == [0]
        assert _sel(r, "nfd = ?", ["e\u0301"]) == [0]
        assert _sel(r, "nfd = ?", ["\u00e9"]) == []  # no normalization: NFD != NFC
        assert _sel(r, "nul IS NULL AND list IS NOT NULL") == [1]
        assert _sel(r, "obj.deep IS NOT NULL") == [1]
        assert _sel(r, "big = ? AND small = ?", [2**63 - 1, -(2**63)]) == [3]
        assert _sel(r, "f = 0.1 AND t = TRUE AND fa = FALSE") == [3]
        assert _sel(r, "ctl2 = ?", ["\n\t\x1f"]) == [2]
        # SQLite's json_extract (3.40) ends a string at an escaped NUL: get() has it, filters not
        assert _sel(r, "ctl LIKE ?", ["%\n%"]) == []
    # stored as compact UTF-8 JSON, not \u escapes
    with sqlite3.connect(path) as c:
        text = c.execute("SELECT meta FROM docs WHERE pos = 0").fetchone()[0]
        assert "😀" in text and ", " not in text and ": " not in text
        assert c.execute("PRAGMA user_version").fetchone()[0] == 1
        assert [r[1:3] for r in c.execute("PRAGMA table_info(docs)")] == [
            ("pos", "INTEGER"),
            ("meta", "TEXT"),
        ]


@pytest.mark.parametrize(
    "metadata, n, why",
    [
        ([{"x": float("nan")}], 1, r"document 0, at \['x'\]: nan"),
        ([None, {"x": [1, float("inf")]}], 2, r"document 1, at \['x'\]\[1\]: inf"),
        ([{"x": -float("inf")}], 1, "NaN and infinities"),
        ([{1: "a"}], 1, "document 0: the key 1 has type int"),
        ([{"a": {(1, 2): 1}}], 1, r"at \['a'\]: the key \(1, 2\) has type tuple"),
        ([None, None, "x"], 3, "document 2: expected a dict .* got str"),
        ([[("a", 1)]], 1, "document 0: expected a dict .* got list"),
        ([{"a": 1}], 2, "1 items for 2 documents"),
        ([{"a": 1}] * 3, 2, "3 items for 2 documents"),
        ({"a": 1}, 1, "expected None or a sequence"),
        ("abc", 3, "expected None or a sequence"),
        (5, 1, "expected None or a sequence"),
        ([{"x": 2**63}], 1, "64-bit"),
        ([{"x": -(2**63) - 1}], 1, "64-bit"),
        ([{"x": {1, 2}}], 1, "type set is not a JSON value"),
        ([{"x": b"bytes"}], 1, "type bytes"),
        ([{"x": np.int64(3)}], 1, "type int64"),
        ([{"x": object()}], 1, "type object"),
        ([{"x": "\udc80"}], 1, "surrogate"),
        ([{"\ud800": 1}], 1, "surrogate"),
        (np.zeros((2, 2)), 2, "1-d"),
        ([None], -1, "count"),
    ],
)
def test_check_metadata_refuses(metadata: Any, n: int, why: str) -> None:
    with pytest.raises(ValueError, match=why) as e:
        check_metadata(metadata, n)
    assert str(e.value).startswith("metadata: ")


def test_check_metadata_accepts() -> None:
    assert check_metadata(None, 3) == [None, None, None]
    assert check_metadata([], 0) == []
    docs = [{"a": (1, 2)}, None, {"b": np.float64(1.5), "c": True}]
    assert check_metadata(tuple(docs), 3) == docs
    assert check_metadata(np.array(docs, dtype=object), 3) == docs
    deep: dict[str, Any] = {"x": 1}
    for _ in range(60):
        deep = {"x": deep}
    assert check_metadata([deep], 1) == [deep]
    cyclic: dict[str, Any] = {}
    cyclic["self"] = cyclic
    with pytest.raises(ValueError, match="nested deeper"):
        check_metadata([cyclic], 1)


# ------------------------------------------------------------------ writing new versions


def _rows(path: Path) -> dict[int, Any]:
    with MetadataReader(path) as r:
        pos = r.select("x IS NOT NULL OR x IS NULL").tolist()
        return dict(zip(pos, r.get(pos), strict=True))


def _listing(d: Path) -> list[str]:
    return sorted(os.listdir(d))


def test_write_drop_renumber_add(tmp_path: Path) -> None:
    src = tmp_path / "v1.sqlite"
    write_metadata(src, None, add=[(i, {"i": i}) for i in range(10) if i != 4])
    before = src.read_bytes()
    stat_before = os.stat(src)

    write_metadata(tmp_path / "v2.sqlite", src, drop=np.array([2, 4, 5, 100], dtype=np.int64))
    assert _rows(tmp_path / "v2.sqlite") == {i: {"i": i} for i in (0, 1, 3, 6, 7, 8, 9)}

    # compaction: 1, 3, 6 deleted (-1); the rest close up; 8 also dropped; 2 replaced, 5 added
    renumber = np.array([0, -1, 1, -1, 2, 3, -1, 4, 5, 6], dtype=np.int64)
    write_metadata(
        tmp_path / "v3.sqlite",
        src,
        add=[(1, {"new": 1}), (6, {"new": "replaced"}), (7, {"new": 7})],
        drop=np.array([8]),
        renumber=renumber,
    )
    assert _rows(tmp_path / "v3.sqlite") == {
        0: {"i": 0},
        1: {"new": 1},  # old 2
        3: {"i": 5},
        4: {"i": 7},
        6: {"new": "replaced"},  # old 9 replaced by add
        7: {"new": 7},
    }

    # add replaces an existing row; of two adds for one position the later wins
    write_metadata(tmp_path / "v4.sqlite", src, add=[(3, {"r": 1}), (20, {"r": 2}), (3, {"r": 3})])
    rows = _rows(tmp_path / "v4.sqlite")
    assert rows[3] == {"r": 3} and rows[20] == {"r": 2} and len(rows) == 10

    # the source version is never modified, and nothing but the written files exists
    assert src.read_bytes() == before
    assert os.stat(src).st_mtime_ns == stat_before.st_mtime_ns
    assert _listing(tmp_path) == ["v1.sqlite", "v2.sqlite", "v3.sqlite", "v4.sqlite"]


def test_write_from_nothing(tmp_path: Path) -> None:
    write_metadata(tmp_path / "a", None)
    write_metadata(
        tmp_path / "b", None, add=[(np.int64(5), {"x": 1})], drop=np.array([5]), renumber=np.zeros(0)
    )
    assert _rows(tmp_path / "a") == {} and _rows(tmp_path / "b") == {5: {"x": 1}}
    write_metadata(tmp_path / "c", tmp_path / "a", add=[(0, {})])
    assert _rows(tmp_path / "c") == {0: {}}


def test_write_odd_paths(tmp_path: Path) -> None:
    d = tmp_path / "we?ird #dir %20 100%"
    d.mkdir()
    write_metadata(d / "a?b#c.sqlite", None, add=[(0, {"x": 1})])
    write_metadata(d / "v2 %3F.sqlite", d / "a?b#c.sqlite", add=[(1, {"x": 2})])
    assert _rows(d / "v2 %3F.sqlite") == {0: {"x": 1}, 1: {"x": 2}}
    assert _listing(d) == ["a?b#c.sqlite", "v2 %3F.sqlite"]
    # through a directory descriptor, as the index reads its own version
    fd = os.open(d, os.O_RDONLY)
    try:
        via_fd = f"/proc/self/fd/{fd}/v2 %3F.sqlite"
        if os.path.exists(via_fd):
            with MetadataReader(via_fd) as r:
                assert r.count() == 2
            write_metadata(d / "v3", via_fd, drop=np.array([0]))
            assert _rows(d / "v3") == {1: {"x": 2}}
    finally:
        os.close(fd)


def test_write_errors_leave_nothing(tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_metadata(src, None, add=[(0, {"a": 1}), (5, {"a": 2})])
    with pytest.raises(FileExistsError):
        write_metadata(src, None)
    assert _rows(src) == {0: {"a": 1}, 5: {"a": 2}}  # not clobbered
    with pytest.raises(ValueError, match="renumber: 3 old positions"):
        write_metadata(tmp_path / "x", src, renumber=np.array([0, 1, 2]))
    with pytest.raises(ValueError, match="two old positions map to one"):
        write_metadata(tmp_path / "x", src, renumber=np.array([0, 0, 1, 2, 3, 4]))
    with pytest.raises(ValueError, match="1-d integer array"):
        write_metadata(tmp_path / "x", src, drop=np.array([0.5]))
    with pytest.raises(ValueError, match="nan"):
        write_metadata(tmp_path / "x", src, add=[(1, {"a": float("nan")})])
    with pytest.raises(ValueError, match="expected a dict"):
        write_metadata(tmp_path / "x", src, add=[(1, [1])])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="position -1"):
        write_metadata(tmp_path / "x", src, add=[(-1, {})])
    bad = tmp_path / "bad"
    bad.write_bytes(b"not sqlite at all" * 100)
    with pytest.raises(IndexFormatError, match="not a metadata file"):
        write_metadata(tmp_path / "x", bad)
    with sqlite3.connect(tmp_path / "v9") as c:
        c.execute("CREATE TABLE docs (pos INTEGER PRIMARY KEY, meta TEXT NOT NULL)")
        c.execute("PRAGMA user_version = 9")
    c.close()
    with pytest.raises(IndexFormatError, match="format version 9"):
        write_metadata(tmp_path / "x", tmp_path / "v9")
    with pytest.raises(IndexFormatError, match="format version 9"):
        MetadataReader(tmp_path / "v9")
    with pytest.raises(IndexFormatError):
        MetadataReader(bad)
    with pytest.raises(FileNotFoundError):
        MetadataReader(tmp_path / "missing")
    assert _listing(tmp_path) == ["bad", "src", "v9"]


def test_write_100k_rows_fast(tmp_path: Path) -> None:
    n = 100_000
    docs = [
        {"year": 1990 + i % 30, "source": ("pubmed", "arxiv", "wiki")[i % 3], "k": {"i": i}} for i in range(n)
    ]
    t = time.perf_counter()
    write_metadata(tmp_path / "a", None, add=list(enumerate(check_metadata(docs, n))))
    t_build = time.perf_counter() - t
    renumber = np.full(n, -1, dtype=np.int64)
    renumber[1::2] = np.arange(n // 2)
    t = time.perf_counter()
    write_metadata(tmp_path / "b", tmp_path / "a", add=[(n // 2, {"x": 1})], renumber=renumber)
    t_compact = time.perf_counter() - t
    assert t_build < 2.0 and t_compact < 1.0, (t_build, t_compact)  # loose: shared CI machines
    with MetadataReader(tmp_path / "b") as r:
        assert r.count() == n // 2 + 1
        assert r.get([0, n // 2 - 1, n // 2]) == [docs[1], docs[n - 1], {"x": 1}]
        assert r.select("source = 'arxiv' AND year < 1995").shape[0] == sum(
            1 for i in range(1, n, 2) if i % 3 == 1 and 1990 + i % 30 < 1995
        )
    assert _listing(tmp_path) == ["a", "b"]


# ------------------------------------------------------------------ threads


def test_reader_shared_by_threads(tmp_path: Path) -> None:
    rng = random.Random(5)
    docs = [_random_doc(rng) for _ in range(300)]
    preds = [_random_pred(rng, 2) for _ in range(30)]
    cases = []
    for p in preds:
        params: list[Any] = []
        where = _render(rng, p, params)
        cases.append(
            (where, params, [i for i, d in enumerate(docs) if d is not None and _eval(p, d) is True])
        )
    errors: list[BaseException] = []
    start = threading.Barrier(2)
    with MetadataReader(_write(tmp_path / "m.sqlite", docs)) as r:

        def work(seed: int) -> None:
            try:
                start.wait()
                local = random.Random(seed)
                for _ in range(150):
                    where, params, expected = local.choice(cases)
                    assert r.select(where, params).tolist() == expected
                    pos = [local.randrange(-5, 310) for _ in range(20)]
                    assert r.get(pos) == [docs[p] if 0 <= p < len(docs) else None for p in pos]
                    assert r.count() == sum(d is not None for d in docs)
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=work, args=(s,)) for s in (1, 2)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    assert not errors, errors[0]


def test_float_literals_exact() -> None:
    # decimal literals reach SQLite as the double Python parses, not as text
    _, args = compile_where("x = 0.1 OR x = -2.5e-3 OR x = 7 OR x = .5 OR x = 1.")
    assert args[1::2] == [0.1, -2.5e-3, 7, 0.5, 1.0]
    assert isinstance(args[5], int) and not any(isinstance(a, float) and math.isnan(a) for a in args)
