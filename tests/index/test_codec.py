"""The residual codec's bucket fits (issue 18): Lloyd-Max levels against colbert-ai's quantiles,
their int8 grid, and document token pooling through build, add and rebuild."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _index_tools import edit_manifest

from _plaid_data import corpus, queries
from edgeplaid import Index, IndexFormatError
from edgeplaid.index import _codec, pool_tokens
from edgeplaid.ops import reference


def _mse(values: np.ndarray, cutoffs: np.ndarray, weights: np.ndarray) -> float:
    return float(np.mean((weights[np.searchsorted(cutoffs, values)] - values) ** 2))


def test_lloyd_max_of_a_uniform_is_the_uniform_quantiser():
    v = np.sort(np.random.default_rng(0).uniform(0, 1, 400_000))
    w = _codec.lloyd_max(v, np.array([0.02, 0.3, 0.5, 0.99]))
    np.testing.assert_allclose(w, [0.125, 0.375, 0.625, 0.875], atol=5e-3)  # sample noise


def test_lloyd_max_beats_quantiles_on_peaked_residuals():
    r = np.random.default_rng(1).laplace(0, 0.03, size=(20_000, 48)).astype(np.float32)
    _, qc, qw = _codec.fit_buckets(r, 4, "quantile")
    avg, lc, lw = _codec.fit_buckets(r, 4, "lloyd_max")
    assert avg == pytest.approx(float(np.abs(r).mean()), rel=1e-6)
    # colbert-ai's rule: cutoffs the quantiles i/16, weights the quantiles (i + 0.5)/16
    np.testing.assert_allclose(qc, np.quantile(r, np.arange(1, 16) / 16), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(qw, np.quantile(r, (np.arange(16) + 0.5) / 16), rtol=1e-4, atol=1e-6)
    assert np.all(np.diff(lw) > 0) and np.all(np.diff(lc) > 0)
    np.testing.assert_allclose(lc, (lw[1:] + lw[:-1]) / 2, rtol=1e-6)  # nearest weight
    flat = r.ravel()
    assert _mse(flat, lc, lw) < 0.7 * _mse(flat, qc, qw)


@pytest.mark.parametrize("nbits", [1, 2, 4, 8])
def test_lloyd_max_weights_sit_on_the_int8_grid(nbits):
    r = np.random.default_rng(nbits).laplace(0, 0.05, size=(5_000, 16)).astype(np.float32)
    _, cutoffs, weights = _codec.fit_buckets(r, nbits, "lloyd_max")
    assert weights.shape == (1 << nbits,) and cutoffs.shape == ((1 << nbits) - 1,)
    levels, wscale = reference.quantise_bucket_weights(torch.from_numpy(weights))
    np.testing.assert_allclose(levels.numpy() * wscale, weights, rtol=0, atol=1e-7)


def test_degenerate_residuals_fit():
    for method in _codec.BUCKET_FITS:
        avg, cutoffs, weights = _codec.fit_buckets(np.zeros((10, 8), np.float32), 2, method)
        assert avg == 0.0 and not weights.any() and not cutoffs.any()


def test_build_records_and_checks_the_bucket_fit(tmp_path):
    tokens, doclens, topics = corpus(n_docs=200, seed=3)
    with pytest.raises(ValueError, match="buckets: expected one of 'lloyd_max', 'quantile'"):
        Index.build(tmp_path / "bad", tokens, doclens, buckets="kmeans", progress=False)
    errors = {}
    for method in _codec.BUCKET_FITS:
        index = Index.build(tmp_path / method, tokens, doclens, buckets=method, progress=False)
        assert index.manifest["build"]["buckets"] == method
        x = reference.decompress_residuals(
            index.codes, index.residuals, index.centroids.float(), index.bucket_weights, index.nbits
        )
        errors[method] = float(((x - tokens) ** 2).sum(1).mean())
    assert errors["lloyd_max"] < errors["quantile"]
    # int8 scores a Lloyd-Max index as the exact precision does but for the query's rounding to
    # 8 bits, in stage 1's centroid term and stage 4's residual term (the weights sit on the
    # residual grid; the centroids' 12-bit levels add ~1e-5): these 5-token queries measured at
    # most 5.9e-3 a query (1.2e-3 a token) and 1.5e-3 on average (4e-4 a token)
    q, m = queries(topics, n=8, seed=4)
    index = Index.load(tmp_path / "lloyd_max")
    a = index.search(q, k=5, queries_mask=m, precision="int8")
    b = index.search(q, k=5, queries_mask=m, precision="exact")
    torch.testing.assert_close(a.scores, b.scores, atol=8e-3, rtol=0)
    assert float((a.scores - b.scores).abs().mean()) < 2.5e-3


def test_rebuild_keeps_the_bucket_fit(tmp_path):
    tokens, doclens, _ = corpus(n_docs=120, seed=5)
    index = Index.build(tmp_path / "i", tokens, doclens, buckets="quantile", progress=False)
    index.delete([0])
    assert index.rebuild().manifest["build"]["buckets"] == "quantile"


# ---------------------------------------------------------------- pooling


def test_pool_tokens_merges_duplicates_in_order():
    a, b = np.eye(4, dtype=np.float32)[0], np.eye(4, dtype=np.float32)[1]
    doc = np.stack([a, a, b, b, a])
    single = np.eye(4, dtype=np.float32)[2:3]
    tokens, lens = pool_tokens(np.concatenate([doc, single, doc[:2]]), np.array([5, 1, 2]), 2.5)
    np.testing.assert_array_equal(lens, [2, 1, 2])  # ceil(5 / 2.5); 1 and 2 tokens kept
    np.testing.assert_allclose(tokens[:2], np.stack([a, b]), atol=1e-6)  # first-token order
    np.testing.assert_array_equal(tokens[2:], np.concatenate([single, doc[:2]]))


def test_pool_tokens_lengths_and_norms():
    tokens, doclens, _ = corpus(n_docs=60, seed=6)
    for f in (1.5, 2, 3):
        t, d = pool_tokens(tokens.numpy(), doclens.numpy(), f)
        want = [n if n <= 2 else min(n, int(np.ceil(n / f))) for n in doclens.tolist()]
        assert d.tolist() == want and t.shape == (sum(want), tokens.shape[1]) and t.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(t, axis=1), 1.0, atol=1e-5)
        t2, _ = pool_tokens(tokens.numpy(), doclens.numpy(), f)
        np.testing.assert_array_equal(t, t2)  # deterministic
    same, d = pool_tokens(tokens.numpy(), doclens.numpy(), 1)
    np.testing.assert_array_equal(same, tokens.numpy())


@pytest.mark.parametrize("bad", [0.5, float("nan"), float("inf"), True, "2", None, 65])
def test_pool_factor_is_checked(bad):
    with pytest.raises(ValueError, match="pool_factor"):
        pool_tokens(np.zeros((2, 4), np.float32), np.array([2]), bad)


def test_pooling_refuses_non_finite_tokens():
    x = np.ones((4, 4), np.float32)
    x[1, 2] = np.nan
    with pytest.raises(ValueError, match="doc_tokens: NaN"):
        pool_tokens(x, np.array([4]), 2)


def test_pooled_index_pools_its_adds_and_keeps_the_factor(tmp_path):
    tokens, doclens, topics = corpus(n_docs=150, seed=7)
    index = Index.build(tmp_path / "i", tokens, doclens, pool_factor=2, progress=False)
    _, pooled = pool_tokens(tokens.numpy(), doclens.numpy(), 2)
    assert index.pool_factor == 2.0 and index.manifest["build"]["pool_factor"] == 2.0
    assert index.n_tokens == int(pooled.sum()) < tokens.shape[0]
    new, new_lens, _ = corpus(n_docs=10, seed=8)
    index.add(new, new_lens)
    assert index.n_tokens == int(pooled.sum()) + int(pool_tokens(new.numpy(), new_lens.numpy(), 2)[1].sum())
    n = index.n_tokens
    index.rebuild()  # the decompressed tokens are pooled already: not pooled again
    assert index.n_tokens == n and index.pool_factor == 2.0
    q, m = queries(topics, n=4, seed=9)
    assert index.search(q, k=3, queries_mask=m).ids.shape == (4, 3)


def test_pool_factor_of_an_older_index_is_one_and_a_bad_one_is_refused(tmp_path):
    tokens, doclens, _ = corpus(n_docs=40, seed=10)
    Index.build(tmp_path / "i", tokens, doclens, progress=False)
    edit_manifest(tmp_path / "i", lambda m: m["build"].pop("pool_factor"))
    index = Index.load(tmp_path / "i")
    assert index.pool_factor == 1.0
    edit_manifest(tmp_path / "i", lambda m: m["build"].update(pool_factor="x"))
    with pytest.raises(IndexFormatError, match=r"build\.pool_factor"):
        Index.load(tmp_path / "i").add(tokens[:3], torch.tensor([3]))
