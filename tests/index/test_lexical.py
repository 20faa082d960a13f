"""The lexical (BM25) side of an index (issue 19): scores against a hand-computed BM25, kept
consistent with the late side through every change, filters on both sides, files checked at
load, and lexical / hybrid search through ``Index.search``."""

from __future__ import annotations

import gc
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from _plaid_data import corpus, queries
from edgeplaid import Index
from edgeplaid.index import _lexical
from edgeplaid.index._storage import IndexFormatError

DIM = 32
pytestmark = pytest.mark.filterwarnings("ignore:edgeplaid. the .* drift")

WORDS = "alpha beta gamma delta omega zeta kappa sigma tau phi rho mu".split()


def _texts(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, int(rng.integers(3, 12)))) for _ in range(n)]


def _build(
    path, n: int = 120, seed: int = 0, ids=None, texts=None, **kw
) -> tuple[Index, torch.Tensor, torch.Tensor]:
    tokens, doclens, topics = corpus(n_docs=n, dim=DIM, seed=seed)
    q, m = queries(topics, n=4)
    texts = _texts(n, seed) if texts is None else texts
    index = Index.build(path, tokens, doclens, ids=ids, texts=texts, progress=False, **kw)
    return index, q, m


def _vectors(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    tokens, doclens, _ = corpus(n_docs=n, dim=DIM, seed=seed)
    return tokens, doclens


def _bm25(docs: list[list[str]], live: list[bool], query: list[str]) -> np.ndarray:
    """tantivy's BM25 (k1 1.2, b 0.75), by hand: N, n_t and the mean length count every document
    tantivy still holds (deleted ones too, until a merge), scores only for live ones."""
    k1, b = 1.2, 0.75
    n = len(docs)
    avg = sum(len(d) for d in docs) / n
    out = np.zeros(n)
    for t in query:
        nt = sum(t in d for d in docs)
        idf = math.log(1 + (n - nt + 0.5) / (nt + 0.5))
        for i, d in enumerate(docs):
            tf = d.count(t)
            if tf and live[i]:
                out[i] += idf * tf * (k1 + 1) / (tf + k1 * (1 - b + b * len(d) / avg))
    return out


def test_bm25_matches_hand_computed(tmp_path):
    texts = ["the cat sat", "the dog sat on the cat", "a bird", "Cat, cat; CAT dog!", "cat and mouse"]
    index, _, _ = _build(tmp_path / "i", n=5, texts=texts, ids=[10, 20, 30, 40, 50])
    docs = [t.lower().replace(",", " ").replace(";", " ").replace("!", " ").split() for t in texts]
    for query, terms in (("cat", ["cat"]), ("sat dog", ["sat", "dog"]), ("cat cat", ["cat", "cat"])):
        want = _bm25(docs, [True] * 5, terms)
        r = index.search(text=query, k=5)
        got = {u: float(s) for u, s in zip(r.user_ids[0], r.scores[0].tolist(), strict=True) if u is not None}
        expect = {10 * (i + 1): float(w) for i, w in enumerate(want) if w > 0}
        assert got.keys() == expect.keys()
        for u in got:
            assert got[u] == pytest.approx(expect[u], rel=1e-5)
    # A deleted document leaves the results; tantivy's statistics still count it (as Lucene's).
    index.delete([20])
    want = _bm25(docs, [True, False, True, True, True], ["cat"])
    r = index.search(text="cat", k=5)
    got = {u: float(s) for u, s in zip(r.user_ids[0], r.scores[0].tolist(), strict=True) if u is not None}
    assert got.keys() == {10, 40, 50}
    for u in got:
        assert got[u] == pytest.approx(want[u // 10 - 1], rel=1e-5)
    # Query syntax is not interpreted: quotes, minus signs and colons are separators.
    a = index.search(text='-cat "text:sat"', k=5)
    b = index.search(text="cat text sat", k=5)
    assert a.user_ids == b.user_ids


@pytest.mark.parametrize("kind", ["str", "int", "none"])
def test_changes_keep_both_sides_consistent(tmp_path, kind):
    n = 60
    ids = (
        [f"d{i}" for i in range(n)] if kind == "str" else list(range(100, 100 + n)) if kind == "int" else None
    )
    texts = _texts(n, 0)
    texts[3] = "unique needle words"
    index, q, m = _build(tmp_path / "i", n=n, ids=ids, texts=texts)
    uid = index.ids()
    assert index.search(text="needle", k=3).user_ids[0][0] == uid[3]
    # delete: gone from both sides
    index.delete([uid[3]])
    assert index.search(text="needle", k=3).user_ids == [[None, None, None]]
    assert uid[3] not in {u for row in index.search(q, k=n, queries_mask=m).user_ids for u in row}
    # add with texts, then update one of them to a new text: the old text no longer finds it
    t_new, dl_new = _vectors(3, 5)
    new = index.add(
        t_new,
        dl_new,
        ids=["x0", "x1", "x2"] if kind == "str" else None,
        texts=["red fox", "blue fox", "green fox"],
    )
    got = index.search(text="fox", k=5).user_ids[0]
    assert set(got[:3]) == set(new) and got[3:] == [None, None]
    t_up, dl_up = _vectors(1, 6)
    index.update([new[0]], t_up, dl_up, texts=["purple owl"])
    assert index.search(text="red", k=3).user_ids[0] == [None] * 3
    assert index.search(text="owl", k=3).user_ids[0][0] == new[0]
    assert index.texts([new[0], new[1], uid[3]]) == ["purple owl", "blue fox", None]
    # upsert: one new, one existing
    t_u, dl_u = _vectors(2, 7)
    up_ids = [new[1], "y0" if kind == "str" else 10_000]
    assert index.upsert(up_ids, t_u, dl_u, texts=["grey cat", "black swan"]) == (1, 1)
    assert index.search(text="swan", k=2).user_ids[0][0] == up_ids[1]
    assert index.search(text="blue", k=2).user_ids[0] == [None, None]
    # compact and rebuild keep the lexical side (the keys are ids, which do not move)
    before = index.search(text="fox owl swan alpha", k=10)
    assert index.compact()
    after = index.search(text="fox owl swan alpha", k=10)
    assert before.user_ids == after.user_ids
    torch.testing.assert_close(before.scores, after.scores)
    index.rebuild()
    assert index.search(text="fox owl swan alpha", k=10).user_ids == before.user_ids
    # every live document is on both sides; a fresh load (checksums verified) agrees
    again = Index.load(tmp_path / "i", verify=True)
    assert again.search(text="fox owl swan alpha", k=10).user_ids == before.user_ids
    st = again._state
    assert st.lexical.n_docs == st.n_docs == len(again)
    pos = st.key_positions(st.keys_of(st.live_positions()))
    np.testing.assert_array_equal(pos, st.live_positions())


def test_texts_are_required_and_refused_without_a_lexical_side(tmp_path):
    index, _, _ = _build(tmp_path / "i", n=30)
    t, dl = _vectors(2, 3)
    version = (tmp_path / "i" / "manifest.json").read_bytes()
    with pytest.raises(ValueError, match="texts: this index has a lexical side"):
        index.add(t, dl)
    with pytest.raises(ValueError, match="texts: expected one text per document"):
        index.add(t, dl, texts=["one"])
    assert (tmp_path / "i" / "manifest.json").read_bytes() == version  # nothing written
    tokens, doclens, _ = corpus(n_docs=30, dim=DIM, seed=0)
    plain = Index.build(tmp_path / "p", tokens, doclens, progress=False)
    assert not plain.has_lexical
    with pytest.raises(ValueError, match="texts: this index has no lexical side"):
        plain.add(t, dl, texts=["a", "b"])
    with pytest.raises(ValueError, match="mode: 'lexical' needs a lexical side"):
        plain.search(text="alpha")
    with pytest.raises(ValueError, match="texts"):
        Index.build(tmp_path / "q", tokens, doclens, texts="not a list", progress=False)
    with pytest.raises(ValueError, match="analyzer"):
        Index.build(tmp_path / "q", tokens, doclens, texts=_texts(30, 0), analyzer="klingon", progress=False)


def test_store_texts_false_indexes_only(tmp_path):
    index, _, _ = _build(tmp_path / "i", n=20, store_texts=False)
    assert index.search(text="alpha beta", k=3).user_ids[0][0] is not None
    with pytest.raises(ValueError, match="store_texts=False"):
        index.texts([0])


def test_english_analyzer_stems(tmp_path):
    texts = ["running runners run", "the cats", "a bird"]
    plain, _, _ = _build(tmp_path / "p", n=3, texts=texts)
    english, _, _ = _build(tmp_path / "e", n=3, texts=texts, analyzer="english")
    assert plain.search(text="cat", k=1).user_ids == [[None]]
    assert english.search(text="cat", k=1).user_ids == [[1]]


def test_filters_apply_to_both_sides(tmp_path):
    n = 120
    tokens, doclens, topics = corpus(n_docs=n, dim=DIM, seed=0)
    q, m = queries(topics, n=4)
    index = Index.build(
        tmp_path / "i",
        tokens,
        doclens,
        texts=_texts(n, 0),
        metadata=[{"g": i % 4} for i in range(n)],
        progress=False,
    )
    allowed = {i for i in range(n) if i % 4 == 1}
    for mode in ("lexical", "hybrid"):
        kw = {} if mode == "lexical" else {"queries": q, "queries_mask": m}
        r = index.search(k=10, text=["alpha beta gamma"] * 4, mode=mode, where="g = ?", params=[1], **kw)
        got = [u for row in r.user_ids for u in row if u is not None]
        assert got and set(got) <= allowed
        sub = index.search(k=10, text=["alpha beta gamma"] * 4, mode=mode, subset=[5, 9, 13], **kw)
        assert {u for row in sub.user_ids for u in row if u is not None} <= {5, 9, 13}
    # a large allowed set goes through the over-fetch path: same results as the term set
    from edgeplaid.search import _lexical as lex

    st = index._state
    keys = np.array(sorted(allowed), dtype=np.int64)
    exact = st.lexical.search("alpha beta gamma", 10, keys)
    old = lex.TERM_SET_MAX
    lex.TERM_SET_MAX = 4
    try:
        fetched = st.lexical.search("alpha beta gamma", 10, keys)
    finally:
        lex.TERM_SET_MAX = old
    np.testing.assert_array_equal(exact[0], fetched[0])
    np.testing.assert_allclose(exact[1], fetched[1])
    # a few keys restrict by a disjunction of terms, more by tantivy's term set: the same
    few = st.lexical.search("alpha beta gamma", 10, keys), st.lexical.score("alpha", keys)
    old = lex.FEW_KEYS
    lex.FEW_KEYS = 0
    try:
        many = st.lexical.search("alpha beta gamma", 10, keys), st.lexical.score("alpha", keys)
    finally:
        lex.FEW_KEYS = old
    np.testing.assert_array_equal(few[0][0], many[0][0])
    np.testing.assert_allclose(few[1], many[1])
    assert (few[1] > 0).any() and (few[1] == 0).any()


def test_hybrid_extremes_and_mode_errors(tmp_path):
    index, q, m = _build(tmp_path / "i", n=80)
    text = ["alpha beta"] * q.shape[0]
    # exact last stage, a corpus small enough for PLAID to see every document: alpha=1 is the
    # late ranking, alpha=0 the lexical one (every text here matches)
    late = index.search(q, k=5, queries_mask=m, precision="exact", n_candidates=80)
    hyb1 = index.search(q, k=5, queries_mask=m, text=text, alpha=1.0, precision="exact", n_candidates=80)
    assert hyb1.user_ids == late.user_ids
    lexical = index.search(text=text, k=5)
    hyb0 = index.search(q, k=5, queries_mask=m, text=text, alpha=0.0, n_candidates=80)
    assert [row[:3] for row in hyb0.user_ids] == [row[:3] for row in lexical.user_ids]
    rrf = index.search(q, k=5, queries_mask=m, text=text, fusion="rrf")
    assert all(u is not None for row in rrf.user_ids for u in row)
    with pytest.raises(ValueError, match="text: given with mode='late'"):
        index.search(q, text="alpha", mode="late")
    with pytest.raises(ValueError, match="queries: mode='hybrid'"):
        index.search(text="alpha", mode="hybrid")
    with pytest.raises(ValueError, match="alpha"):
        index.search(q, text=text, alpha=1.5)
    with pytest.raises(ValueError, match="fusion"):
        index.search(q, text=text, fusion="max")
    with pytest.raises(ValueError, match="one text per query"):
        index.search(q, text=["a", "b"])
    with pytest.raises(ValueError, match="mode"):
        index.search(q, text="alpha", mode="dense")
    with pytest.raises(ValueError, match="not for mode='lexical'"):
        index.search(text="alpha", n_probe=4)


def test_hybrid_on_the_torch_glue_matches_the_cpu_glue(tmp_path):
    index, q, m = _build(tmp_path / "i", n=60)
    text = ["alpha omega"] * 2
    a = index.search(q[:2], k=5, queries_mask=m[:2], text=text, precision="exact")
    b = index.search(q[:2], k=5, queries_mask=m[:2], text=text, precision="exact", backend="triton")
    assert a.user_ids == b.user_ids
    torch.testing.assert_close(a.scores, b.scores, atol=1e-4, rtol=1e-4)


def test_readers_keep_their_version(tmp_path):
    index, _, _ = _build(tmp_path / "i", n=40)
    old = index._state
    before = old.lexical.search("alpha", 10)
    t, dl = _vectors(2, 9)
    index.add(t, dl, texts=["alpha alpha alpha", "alpha"])
    index.delete([0, 1, 2])
    again = old.lexical.search("alpha", 10)  # the old version's files, still mapped
    np.testing.assert_array_equal(before[0], again[0])
    assert index.search(text="alpha alpha", k=1).user_ids[0][0] == 40


def _replace_bytes(path: Path, data: bytes) -> None:
    """Puts ``data`` at ``path`` as a new file (write aside, rename over). Never in place: tantivy
    maps its files and reads them from its own threads, so truncating a file that a reader still
    maps (an index not yet collected, a load that raised) kills the process with SIGBUS."""
    aside = path.with_name(path.name + ".new")
    aside.write_bytes(data)
    os.replace(aside, path)


def test_lexical_files_are_checked_at_load(tmp_path):
    _build(tmp_path / "i", n=30)
    gc.collect()
    lex = tmp_path / "i" / "lexical"
    victim = next(p for p in sorted(lex.iterdir()) if p.suffix == ".term")
    data = victim.read_bytes()
    _replace_bytes(victim, data[:-1] + bytes([data[-1] ^ 1]))  # same size, one bit flipped
    with pytest.raises(IndexFormatError, match="checksum mismatch in lexical/"):
        Index.load(tmp_path / "i", verify=True)
    _replace_bytes(victim, data + b"x")
    with pytest.raises(IndexFormatError, match="lexical/"):
        Index.load(tmp_path / "i", verify=False)
    victim.unlink()
    os.symlink("/etc/hostname", victim)
    with pytest.raises(IndexFormatError, match="lexical/"):
        Index.load(tmp_path / "i", verify=False)


def test_str_key_collisions_are_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(_lexical, "str_key", lambda s: 7)
    tokens, doclens, _ = corpus(n_docs=3, dim=DIM, seed=0)
    with pytest.raises(ValueError, match="share a lexical key"):
        Index.build(
            tmp_path / "i", tokens, doclens, ids=["a", "b", "c"], texts=["x", "y", "z"], progress=False
        )
    monkeypatch.undo()
    index = Index.build(
        tmp_path / "j", tokens, doclens, ids=["a", "b", "c"], texts=["x", "y", "z"], progress=False
    )
    key_a, real = _lexical.str_key("a"), _lexical.str_key
    monkeypatch.setattr(_lexical, "str_key", lambda s: key_a if s == "d" else real(s))
    t, dl = _vectors(1, 4)
    with pytest.raises(ValueError, match="shares a lexical key"):
        index.add(t, dl, ids=["d"], texts=["w"])


def test_no_stranger_in_the_lexical_directory(tmp_path):
    _build(tmp_path / "i", n=20)
    lex = tmp_path / "i" / "lexical"
    (lex / "planted.store").write_bytes(b"x")  # tantivy would open whatever meta.json names
    with pytest.raises(IndexFormatError, match=r"lexical/planted\.store: not a file of this version"):
        Index.load(tmp_path / "i", verify=False)
    (lex / "planted.store").unlink()
    (lex / ".tantivy-meta.lock").unlink()
    os.symlink(tmp_path / "elsewhere", lex / ".tantivy-meta.lock")  # opened for writing by tantivy
    with pytest.raises(IndexFormatError, match=r"lexical/\.tantivy-meta\.lock"):
        Index.load(tmp_path / "i", verify=True)
    assert not (tmp_path / "elsewhere").exists()


def test_edge_cases(tmp_path):
    index, q, m = _build(tmp_path / "i", n=20, ids=[f"d{i}" for i in range(20)])
    empty = index.search(q[:0], k=3, text="alpha")  # no query: no row, as a late search
    assert tuple(empty.scores.shape) == (0, 3)
    assert index.search(text="!!! ...", k=2).user_ids == [[None, None]]  # no term at all
    assert index.search(q[:1], k=2, queries_mask=m[:1], text="!!!").user_ids[0][0] is not None  # late only
    with pytest.raises(ValueError, match=r"text: not valid UTF-8"):
        index.search(text="bad \udcff")
    t, dl = _vectors(1, 3)
    with pytest.raises(ValueError, match=r"texts\[0\]: not valid UTF-8"):
        index.add(t, dl, ids=["x"], texts=["bad \udcff"])
    index.add(t, dl, ids=["x"], texts=np.array(["from numpy"]))  # arrays of str are texts too
    assert index.texts(["x"]) == ["from numpy"]
    index.delete(index.ids())
    index.compact()
    assert index.texts(["d1"]) == [None] and len(index) == 0
