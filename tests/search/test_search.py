"""PLAID search against exhaustive MaxSim on clustered synthetic data; filtering; parameters."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from _plaid_data import corpus, queries
from edgeplaid import Index
from edgeplaid.ops import reference
from edgeplaid.search import default_params, resolve_params


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    tokens, doclens, topics = corpus(n_docs=600, n_topics=60, seed=5)
    idx = Index.build(tmp_path_factory.mktemp("s") / "i", tokens, doclens, nbits=4, progress=False)
    return idx, topics


def _recall(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(
        np.mean([len(set(x) & set(y)) / len(y) for x, y in zip(a.tolist(), b.tolist(), strict=True)])
    )


def test_search_recall_vs_exhaustive(index):
    idx, topics = index
    q, m = queries(topics, n=32, length=12)
    exact = idx.search_exhaustive(q, k=10, queries_mask=m)
    got = idx.search(q, k=10, queries_mask=m)
    assert got.scores.dtype == torch.float32 and got.ids.dtype == torch.int64
    assert got.scores.shape == got.ids.shape == (32, 10)
    assert _recall(got.ids, exact.ids) >= 0.9
    assert bool((got.scores[:, :-1] >= got.scores[:, 1:]).all())
    docs = reference.decompress_residuals(
        idx.codes, idx.residuals, idx.centroids.float(), idx.bucket_weights, 4
    )
    # int8 (the default): MaxSim over the decompressed documents up to the residual term's
    # quantisation; exact: within fp32 rounding
    want = reference.maxsim_packed(q, docs, idx.doc_offsets, got.ids, m)
    assert (got.scores - want).abs().max() < 1e-2
    got = idx.search(q, k=10, queries_mask=m, precision="exact")
    assert _recall(got.ids, exact.ids) >= 0.9
    want = reference.maxsim_packed(q, docs, idx.doc_offsets, got.ids, m)
    assert torch.allclose(got.scores, want, atol=1e-4)


def test_probing_everything_is_exhaustive(index):
    idx, topics = index
    q, m = queries(topics, n=6, length=8, seed=9)
    exact = idx.search_exhaustive(q, k=7, queries_mask=m)
    n = idx.n_docs
    got = idx.search(
        q,
        k=7,
        queries_mask=m,
        n_probe=idx.n_centroids,
        threshold=None,
        n_candidates=n,
        n_rerank=n,
        precision="exact",
    )
    assert torch.equal(got.ids, exact.ids)
    assert torch.allclose(got.scores, exact.scores)


def test_exhaustive_matches_reference(index):
    idx, topics = index
    q, m = queries(topics, n=3, length=5, seed=4)
    docs = reference.decompress_residuals(
        idx.codes, idx.residuals, idx.centroids.float(), idx.bucket_weights, 4
    )
    want = reference.maxsim_packed(q, docs, idx.doc_offsets, None, m)
    got = idx.search_exhaustive(q, k=4, queries_mask=m)
    assert torch.allclose(got.scores, want.topk(4, dim=1).values, atol=1e-4)


def test_subset_filtering(index):
    idx, topics = index
    q, m = queries(topics, n=4, length=8, seed=11)
    allowed = np.arange(0, idx.n_docs, 7)
    got = idx.search(q, k=10, queries_mask=m, subset=allowed)
    assert np.isin(got.ids.numpy(), allowed).all()
    # a small allowed set is scored whole: exact top-k within it
    few = [np.array([1, 5, 9]), None, np.array([2]), np.arange(100)]
    got = idx.search(q, k=3, queries_mask=m, subset=few, precision="exact")
    assert sorted(got.ids[0].tolist()) == [1, 5, 9]
    assert got.ids[2].tolist() == [2, -1, -1] and torch.isneginf(got.scores[2, 1:]).all()
    assert np.isin(got.ids[3].numpy(), np.arange(100)).all()
    docs = reference.decompress_residuals(
        idx.codes, idx.residuals, idx.centroids.float(), idx.bucket_weights, 4
    )
    s = reference.maxsim_packed(q[:1], docs, idx.doc_offsets, torch.tensor([[1, 5, 9]]), m[:1])
    assert torch.allclose(got.scores[0], s[0].sort(descending=True).values, atol=1e-4)
    with pytest.raises(ValueError, match="subset"):
        idx.search(q, subset=[np.array([idx.n_docs])] * 4)


def test_k_larger_than_corpus_pads(tmp_path):
    tokens, doclens, topics = corpus(n_docs=5, seed=2)
    idx = Index.build(tmp_path / "i", tokens, doclens, n_centroids=8, ids=list("abcde"), progress=False)
    q, m = queries(topics, n=2, length=4)
    r = idx.search(q, k=8, queries_mask=m, n_probe=8, threshold=None)
    assert r.ids.shape == (2, 8) and (r.ids[:, 5:] == -1).all()
    assert r.user_ids[0][5:] == [None] * 3 and set(r.user_ids[0][:5]) == set("abcde")
    _scores, ids = r  # unpacks as a pair
    assert torch.equal(ids, r.ids)


def test_params_and_bad_input(index):
    idx, _topics = index
    assert (
        default_params(10).n_candidates
        < default_params(100).n_candidates
        <= default_params(1000).n_candidates
    )
    p = resolve_params(10, n_candidates=400)
    assert p.n_rerank == 100
    with pytest.raises(TypeError, match="unknown"):
        idx.search(torch.zeros(1, 4, 48), ncells=3)
    with pytest.raises(ValueError, match="queries"):
        idx.search(torch.zeros(1, 4, 32))
    with pytest.raises(ValueError, match="k"):
        idx.search(torch.zeros(1, 4, 48), k=0)
    single = idx.search(torch.nn.functional.normalize(torch.randn(5, 48), dim=-1), k=3)
    assert single.ids.shape == (1, 3)
