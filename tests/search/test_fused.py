"""One C++ call per query block (search/_fused.py, ``edgeplaid._C.plaid_search``) returns what the
staged pipeline (three op calls, numpy selections) returns: the same ids and the same scores."""

from __future__ import annotations

import pytest
import torch

import edgeplaid
from _plaid_data import corpus, queries
from edgeplaid import Index
from edgeplaid._native import C
from edgeplaid.ops import dispatch
from edgeplaid.search import STAGE_TIMES, _plaid

pytestmark = pytest.mark.skipif(C is None, reason="edgeplaid._C is not built")


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    tokens, doclens, topics = corpus(n_docs=300, n_topics=20, seed=5)
    idx = Index.build(tmp_path_factory.mktemp("f") / "i", tokens, doclens, n_centroids=64, progress=False)
    return idx, topics


@pytest.fixture
def fused_calls(monkeypatch):
    """Counts the fused op's calls (the search must take it where it can)."""
    calls = []
    fn = dispatch._registry["plaid_search"]["cpp"]

    def counted(*args, **kwargs):
        calls.append(1)
        return fn(*args, **kwargs)

    monkeypatch.setitem(dispatch._registry["plaid_search"], "cpp", counted)
    return calls


def _staged(monkeypatch, search):
    with monkeypatch.context() as m:
        m.setattr(_plaid, "implements", lambda *a, **k: False)
        return search()


@pytest.mark.parametrize("precision", ["int8", "exact"])
@pytest.mark.parametrize("k", [1, 10, 400])  # 400 > the documents: -inf / -1 past them
@pytest.mark.parametrize(("n_candidates", "threshold"), [(8, 0.3), (64, None), (300, 0.9)])
def test_fused_equals_staged(index, monkeypatch, fused_calls, precision, k, n_candidates, threshold):
    idx, topics = index
    q, m = queries(topics, n=9, length=12, seed=1)
    m[3] = False  # a query with no valid token
    m[4, 5:] = False
    knobs = dict(precision=precision, n_probe=2, n_candidates=n_candidates, n_rerank=n_candidates)
    if threshold is not None:
        knobs["threshold"] = threshold

    def search():
        return idx.search(q, k=k, queries_mask=m, **knobs)

    got = search()
    assert len(fused_calls) == 1
    want = _staged(monkeypatch, search)
    assert len(fused_calls) == 1
    assert torch.equal(got.ids, want.ids)
    assert torch.equal(got.scores, want.scores)
    # no token: no results (all -1 today; the alternative, scores of 0, is what MaxSim over no token gives)
    assert (got.ids[3] == -1).all() or (got.scores[3] == 0).any()


def test_fused_skips_deleted_documents(index, tmp_path, monkeypatch, fused_calls):
    _, topics = index
    tokens, doclens, _ = corpus(n_docs=300, n_topics=20, seed=5)
    idx = Index.build(tmp_path / "i", tokens, doclens, n_centroids=64, progress=False)
    q, m = queries(topics, n=6, length=10, seed=4)
    before = idx.search(q, k=5, queries_mask=m)
    gone = sorted(set(before.ids[:, 0].tolist()))
    idx.delete(gone)
    if len(idx._searcher.parts) != 1:
        pytest.skip("a deletion made a multi-part index here (the staged path)")
    n = len(fused_calls)
    got = idx.search(q, k=5, queries_mask=m)
    assert len(fused_calls) == n + 1
    want = _staged(monkeypatch, lambda: idx.search(q, k=5, queries_mask=m))
    assert torch.equal(got.ids, want.ids) and torch.equal(got.scores, want.scores)
    assert not set(gone) & set(got.ids.flatten().tolist())


def test_staged_where_the_fused_call_cannot(index, fused_calls):
    idx, topics = index
    q, m = queries(topics, n=4, length=8, seed=2)
    idx.search(q, k=5, queries_mask=m, n_candidates=32, n_rerank=8)  # a stage 3
    idx.search(q, k=5, queries_mask=m, subset=[[0, 1, 2, 3]] * 4)  # a filter
    STAGE_TIMES.enabled = True
    try:
        idx.search(q, k=5, queries_mask=m)  # the per-stage timer
    finally:
        STAGE_TIMES.enabled = False
    assert fused_calls == []
    idx.search(q, k=5, queries_mask=m)
    assert fused_calls == [1]


def test_fused_breaks_ties_as_staged(tmp_path, monkeypatch, fused_calls):
    # Every document twice (positions i and i + 150 hold the same tokens, so the same codes and
    # the same scores): the top k is full of exact ties, which both paths must break the same way
    # (the earlier candidate first).
    tokens, doclens, topics = corpus(n_docs=150, n_topics=20, seed=7)
    idx = Index.build(
        tmp_path / "i",
        torch.cat([tokens, tokens]),
        torch.cat([doclens, doclens]),
        n_centroids=64,
        progress=False,
    )
    q, m = queries(topics, n=6, length=10, seed=3)
    for precision in ("int8", "exact"):
        got = idx.search(q, k=10, queries_mask=m, precision=precision)
        want = _staged(monkeypatch, lambda p=precision: idx.search(q, k=10, queries_mask=m, precision=p))
        pairs = got.scores[:, :-1] == got.scores[:, 1:]
        assert bool(pairs.any())  # ties are there
        assert torch.equal(got.ids, want.ids) and torch.equal(got.scores, want.scores)
    assert len(fused_calls) == 2


@pytest.mark.parametrize("threads", [1, 3])
def test_fused_batch_equals_one_at_a_time(index, fused_calls, threads):
    # A batch runs one query a pool thread, each stage inline on it; one query alone spreads each
    # stage across the pool; one thread runs everything inline. All give the same bits.
    idx, topics = index
    q, m = queries(topics, n=11, length=12, seed=6)
    m[2] = False
    m[7, 3:] = False
    previous = edgeplaid.get_num_threads()
    edgeplaid.set_num_threads(threads)
    try:
        for precision in ("int8", "exact"):
            got = idx.search(q, k=7, queries_mask=m, precision=precision)
            for i in range(q.shape[0]):
                one = idx.search(q[i : i + 1], k=7, queries_mask=m[i : i + 1], precision=precision)
                assert torch.equal(got.ids[i : i + 1], one.ids)
                assert torch.equal(got.scores[i : i + 1], one.scores)
    finally:
        edgeplaid.set_num_threads(previous)
    assert len(fused_calls) == 2 * (1 + q.shape[0])


def test_fused_reports_a_bad_code_from_any_thread(index, fused_calls):
    # A corrupt code met by a pool thread's query raises (naming it) and the searcher's arrays
    # stay as they were.
    idx, topics = index
    docs = idx._searcher.parts[0].docs
    q, m = queries(topics, n=8, length=10, seed=9)
    before = idx.search(q, k=5, queries_mask=m)
    codes = docs.codes
    saved = codes.clone()
    codes[: codes.shape[0] : 7] = idx._searcher.codec.n_centroids + 3  # out of range everywhere
    try:
        with pytest.raises(ValueError, match="code"):
            idx.search(q, k=5, queries_mask=m)
    finally:
        codes.copy_(saved)
    after = idx.search(q, k=5, queries_mask=m)
    assert torch.equal(before.ids, after.ids) and torch.equal(before.scores, after.scores)


def test_stage1_int8_where_given_the_int8_centroids(index, monkeypatch):
    # Stage 1 runs int8 products where the caller gives the codec's int8 centroids
    # (quantise_centroids, made once per codec and kept with it), fp32 otherwise; the search picks
    # by stage1_precision (VNNI CPUs), the staged pipeline and the one-call op alike.
    idx, topics = index
    s = idx._searcher
    codec, docs, ivf = s.codec, s.parts[0].docs, s.parts[0].ivf
    q, m = queries(topics, n=3, length=6, seed=3)
    args = (
        q.numpy(), m.numpy(), codec.centroids.numpy(), "float16" if codec.centroids.dtype == torch.float16
        else "float32", 2, docs.codes.numpy(), docs.offsets.numpy(), docs.residuals.numpy(),
        docs.inv_norm.numpy(), ivf.offsets.numpy(), ivf.docs.numpy(), None, codec.bucket_weights.numpy(),
        codec.nbits, 0.5, 16, "int8", 5,
    )  # fmt: skip
    levels, scales = edgeplaid.ops.quantise_centroids(codec)
    assert edgeplaid.ops.quantise_centroids(codec)[0] is levels  # kept with the codec
    params = dict(k=5, queries_mask=m, n_probe=2, threshold=0.5, n_candidates=16, n_rerank=16)
    for rule in ("int8", "exact"):
        monkeypatch.setattr(_plaid, "stage1_precision", lambda p, d, rule=rule: rule)
        want = _staged(monkeypatch, lambda: idx.search(q, **params))
        if rule == "int8":
            got = C.plaid_search(*args, centroid_levels=levels.numpy(), centroid_scales=scales.numpy())
        else:
            got = C.plaid_search(*args)
        assert torch.equal(torch.from_numpy(got[1]), want.ids), rule
        assert torch.equal(torch.from_numpy(got[0]), want.scores), rule
    with pytest.raises(ValueError, match="centroid_levels, centroid_scales: expected both"):
        C.plaid_search(*args, centroid_levels=levels.numpy())
