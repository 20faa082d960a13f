"""ShardedIndex on a local Ray ray_cluster (2 CPUs): exactness against a single index, recall,
changes routed by id, a killed shard actor, streamed builds, errors."""

from __future__ import annotations

import itertools
import os
import signal
import time

import numpy as np
import pytest
import torch

from _plaid_data import corpus, queries

ray = pytest.importorskip("ray")

from edgeplaid.distributed import (  # noqa: E402
    ShardedIndex,
    ShardedIndexError,
    ShardUnavailableError,
    connect,
    is_sharded,
    merge_topk,
    shard_of,
)
from edgeplaid.index import Index  # noqa: E402
from edgeplaid.index._codec import Codec  # noqa: E402

N_DOCS = 400


@pytest.fixture(scope="module")
def data():
    tokens, doclens, topics = corpus(n_docs=N_DOCS, dim=32, n_topics=40, seed=3)
    ids = [f"doc-{i}" for i in range(N_DOCS)]
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(words, 6)) for _ in range(N_DOCS)]
    metadata = [{"year": 2000 + i % 20} for i in range(N_DOCS)]
    q, m = queries(topics, n=24, length=8, seed=5)
    return tokens, doclens, ids, texts, metadata, q, m


@pytest.fixture(scope="module")
def built(ray_cluster, data, tmp_path_factory):
    tokens, doclens, ids, texts, metadata, _, _ = data
    root = tmp_path_factory.mktemp("sharded")
    single = Index.build(
        root / "single", tokens, doclens, nbits=4, ids=ids, metadata=metadata, texts=texts, progress=False
    )
    sharded = ShardedIndex.build(
        root / "sharded",
        tokens,
        doclens,
        nbits=4,
        ids=ids,
        n_shards=3,
        metadata=metadata,
        texts=texts,
        progress=False,
        timeout_s=60,
    )
    yield single, sharded
    sharded.close()


def test_layout_and_shared_codec(built):
    single, sharded = built
    assert is_sharded(sharded.path) and not is_sharded(single.path)
    assert sharded.n_shards == 3 and sharded.n_docs == N_DOCS and len(sharded) == N_DOCS
    codec = Codec.load(sharded.path / "codec")
    # the sharded build samples the whole corpus as a single build does: the same codec
    np.testing.assert_array_equal(codec.centroids.astype(np.float16), single.centroids)
    np.testing.assert_array_equal(codec.bucket_weights, single.bucket_weights)
    for i in range(3):
        shard = Index.load(sharded.path / f"shard-{i:04d}")
        np.testing.assert_array_equal(shard.centroids, single.centroids)
        # every document of the shard is where its id hashes to
        assert set(shard_of(shard.ids(), "str", 3).tolist()) == {i}
    assert sum(info["n_docs"] for info in sharded.shard_info()) == N_DOCS


def test_exhaustive_equals_single_index_exactly(built, data):
    single, sharded = built
    q, m = data[5], data[6]
    a = single.search_exhaustive(q, k=10, queries_mask=m)
    b = sharded.search_exhaustive(q, k=10, queries_mask=m)
    assert b.user_ids == a.user_ids
    assert torch.equal(b.scores, a.scores)
    assert b.shards.shape == (q.shape[0], 10) and int(b.shards.min()) >= 0


def test_plaid_recall_against_single_exhaustive(built, data):
    single, sharded = built
    q, m = data[5], data[6]
    exact = single.search_exhaustive(q, k=10, queries_mask=m).user_ids

    def recall(got):
        return np.mean([len(set(e) & set(g)) / 10 for e, g in zip(exact, got, strict=True)])

    # PLAID's knobs pass through to every shard; this small, tie-heavy corpus needs deeper ones
    deep = {"n_probe": 8, "n_candidates": 400}
    assert recall(sharded.search(q, k=10, queries_mask=m, **deep).user_ids) >= 0.98
    # sharding loses nothing against the single index's own PLAID search at the defaults
    assert recall(sharded.search(q, k=10, queries_mask=m).user_ids) >= recall(
        single.search(q, k=10, queries_mask=m).user_ids
    )


def test_filters_and_hybrid_pass_through(built, data):
    single, sharded = built
    q, m = data[5], data[6]
    where, params = "year >= ?", [2015]
    b = sharded.search_exhaustive(q, k=10, queries_mask=m, where=where, params=params)
    a = single.search_exhaustive(q, k=10, queries_mask=m, where=where, params=params)
    assert b.user_ids == a.user_ids
    allowed = set(single.select(where, params))
    assert set(sharded.select(where, params)) == allowed
    got = sharded.search(q, k=10, queries_mask=m, where=where, params=params).user_ids
    assert all(u in allowed for row in got for u in row if u is not None)
    lex = sharded.search(text="alpha beta", k=5)
    assert len(lex.user_ids[0]) == 5 and all(u is not None for u in lex.user_ids[0])
    hyb = sharded.search(q[:2], k=5, queries_mask=m[:2], text=["alpha", "gamma"])
    assert hyb.scores.shape == (2, 5)
    assert sharded.texts(["doc-3", "doc-4"]) == single.texts(["doc-3", "doc-4"])
    assert sharded.metadata(["doc-7"]) == [{"year": 2007}]
    with pytest.raises(ValueError, match="subset"):
        sharded.search(q, k=5, subset=[1, 2])


def test_changes_route_by_id(ray_cluster, data, tmp_path):
    tokens, doclens, *_, q, m = data
    offsets = np.concatenate([[0], np.cumsum(doclens.numpy())])
    n0 = 300
    with ShardedIndex.build(
        tmp_path / "s", tokens[: offsets[n0]], doclens[:n0], nbits=2, n_shards=2, progress=False
    ) as sh:
        assert sh.id_kind == "int" and 5 in sh and n0 not in sh
        new = sh.add(tokens[offsets[n0] :], doclens[n0:])
        assert new == list(range(n0, N_DOCS)) and sh.n_docs == N_DOCS
        full = Index.build(tmp_path / "full", tokens, doclens, nbits=2, progress=False)
        # the added documents are compressed with the shared codec: scored as a full build's
        # would be, up to the codec (trained on the first 300 documents here)
        got = sh.search_exhaustive(q, k=10, queries_mask=m).user_ids
        exact = full.search_exhaustive(q, k=10, queries_mask=m).user_ids
        assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got, exact, strict=True)]) >= 0.9
        with pytest.raises(KeyError):
            sh.delete([1, 2, 10_000])  # one unknown id: nothing deleted
        assert sh.n_docs == N_DOCS
        assert sh.delete([1, 2, 399]) == 3 and sh.n_docs == N_DOCS - 3
        top = sh.search_exhaustive(q, k=50, queries_mask=m).user_ids
        assert not {1, 2, 399} & {u for row in top for u in row}
        # update: same ids, new vectors (document 5 gets document 6's)
        sh.update([5], tokens[offsets[6] : offsets[7]], doclens[6:7])
        s5 = sh.search_exhaustive(q, k=N_DOCS, queries_mask=m)
        scores = {u: float(s) for u, s in zip(s5.user_ids[0], s5.scores[0].tolist(), strict=True)}
        assert scores[5] == scores[6]
        assert sh.upsert([6, 1000], tokens[: offsets[2]], doclens[:2]) == (1, 1)
        assert sh.add(tokens[: offsets[1]], doclens[:1]) == [1001]  # next id after the largest
        assert sh.manifest["next_id"] == 1002


def test_killed_shard_actor_is_restarted(built, data):
    _, sharded = built
    q, m = data[5], data[6]
    before = sharded.search(q, k=10, queries_mask=m)
    actor = sharded._actors[1]
    pid = ray.get(actor.pid.remote())
    os.kill(pid, signal.SIGKILL)
    # the next search waits for Ray to restart the actor from its directory, then is complete
    after = sharded.search(q, k=10, queries_mask=m)
    assert after.user_ids == before.user_ids and torch.equal(after.scores, before.scores)
    assert ray.get(actor.pid.remote()) != pid


def test_shard_that_cannot_come_back_is_a_clear_error(ray_cluster, data, tmp_path):
    tokens, doclens, *_ = data
    q, m = data[5], data[6]
    sh = ShardedIndex.build(tmp_path / "s", tokens, doclens, nbits=2, n_shards=2, progress=False, timeout_s=8)
    try:
        os.rename(tmp_path / "s" / "shard-0001", tmp_path / "gone")
        os.kill(ray.get(sh._actors[1].pid.remote()), signal.SIGKILL)
        t0 = time.monotonic()
        with pytest.raises(
            ShardUnavailableError, match=r"shard 1 .*did not come back within 8 s.*no partial results"
        ):
            sh.search(q, k=10, queries_mask=m)
        assert time.monotonic() - t0 < 30
    finally:
        sh.close()


def test_stream_build_equals_single_build(ray_cluster, data, tmp_path):
    tokens, doclens, ids, _, metadata, _, _ = data
    offsets = np.concatenate([[0], np.cumsum(doclens.numpy())])
    cuts = [0, 37, 150, 151, 290, N_DOCS]

    def stream():
        for s, e in itertools.pairwise(cuts):
            yield {
                "doc_tokens": tokens[offsets[s] : offsets[e]].numpy(),
                "doclens": doclens[s:e].numpy(),
                "ids": ids[s:e],
                "metadata": metadata[s:e],
            }

    single = Index.build(tmp_path / "single", tokens, doclens, nbits=4, ids=ids, progress=False)
    with ShardedIndex.build(tmp_path / "s", stream(), nbits=4, n_shards=4, progress=False) as sh:
        assert sh.n_docs == N_DOCS
        seen = {}
        for i in range(4):
            shard = Index.load(tmp_path / "s" / f"shard-{i:04d}")
            for j, u in enumerate(shard.ids()):
                a, b = shard.doc_offsets[j], shard.doc_offsets[j + 1]
                seen[u] = (shard.codes[a:b].numpy().copy(), shard.residuals[a:b].numpy().copy())
            assert shard.metadata(shard.ids()[:1])[0]["year"] == 2000 + ids.index(shard.ids()[0]) % 20
        assert sorted(seen) == sorted(ids)
        for j, u in enumerate(single.ids()):
            a, b = single.doc_offsets[j], single.doc_offsets[j + 1]
            np.testing.assert_array_equal(seen[u][0], single.codes[a:b].numpy())
            np.testing.assert_array_equal(seen[u][1], single.residuals[a:b].numpy())


def test_bad_arguments(ray_cluster, data, tmp_path):
    tokens, doclens, *_ = data
    with pytest.raises(ValueError, match="n_shards"):
        ShardedIndex.build(tmp_path / "a", tokens, doclens, n_shards=0, progress=False)
    with pytest.raises(ValueError, match="empty"):
        ShardedIndex.build(tmp_path / "b", tokens[:10], torch.tensor([10]), n_shards=3, progress=False)
    assert not (tmp_path / "b").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".b.")]  # nothing left behind
    with pytest.raises(ValueError, match="ids: duplicate"):
        ShardedIndex.build(tmp_path / "c", tokens[:20], torch.tensor([10, 10]), ids=[7, 7], n_shards=1)
    with pytest.raises(ShardedIndexError, match="not a sharded index"):
        ShardedIndex.load(tmp_path)
    with pytest.raises(ValueError, match="ray_address"):
        connect(ray_address=5)  # type: ignore[arg-type]


def test_merge_topk_orders_and_fills():
    a = (np.array([[0.9, 0.5, -np.inf]], np.float32), [["a", "b", None]])
    b = (np.array([[0.7, 0.5]], np.float32), [["c", "d"]])
    scores, handles, shards, users = merge_topk([a, b], 5)
    assert users == [["a", "c", "b", "d", None]]  # ties keep shard order
    np.testing.assert_array_equal(scores[0, :4], np.float32([0.9, 0.7, 0.5, 0.5]))
    assert scores[0, 4] == -np.inf and handles[0, 4] == -1 and shards[0, 4] == -1
    assert shards[0, :4].tolist() == [0, 1, 0, 1]
    assert handles[0, 1] == (1 << 40) + 0


def test_placement_is_stable():
    # fixed values: placement must never change between versions (documents would be lost)
    assert (
        shard_of([0, 1, 2, 3, 12345678901], "int", 7).tolist()
        == shard_of(np.array([0, 1, 2, 3, 12345678901]), "int", 7).tolist()
    )
    assert shard_of([0, 1, 2, 3, 12345678901], "int", 7).tolist() == PLACED_INT
    assert shard_of(["a", "doc-1", "ß"], "str", 5).tolist() == PLACED_STR


# splitmix64 (0 -> 0xE220A8397B1DCDAF) and blake2b-8 >> 1, computed independently in pure Python
PLACED_INT = [2, 2, 4, 2, 3]
PLACED_STR = [4, 2, 2]


def test_hybrid_is_fused_over_all_shards(ray_cluster, data, tmp_path, built):
    tokens, doclens, ids, texts, _, q, m = data
    single, sharded = built
    text = ["alpha beta", "gamma", "delta zeta eta", "theta"] * 6
    # one shard: the driver's fusion over the shard's union is the single index's, exactly
    with ShardedIndex.build(
        tmp_path / "one", tokens, doclens, nbits=4, ids=ids, n_shards=1, texts=texts
    ) as one:
        for fusion in ("relative_score", "rrf"):
            a = single.search(q, k=10, queries_mask=m, text=text, fusion=fusion)
            b = one.search(q, k=10, queries_mask=m, text=text, fusion=fusion)
            assert b.user_ids == a.user_ids
            torch.testing.assert_close(b.scores, a.scores)
    # three shards: one fusion over the union of every shard's lists, not shard-by-shard fusions
    # merged (which, with RRF, would take every shard's first document first). What still
    # differs is each shard's own BM25 statistics: ~133 documents of an 8-word vocabulary each
    # here, so idf and ties move more than on a real corpus.
    for fusion in ("relative_score", "rrf"):
        a = single.search(q, k=10, queries_mask=m, text=text, fusion=fusion).user_ids
        b = sharded.search(q, k=10, queries_mask=m, text=text, fusion=fusion).user_ids
        overlap = np.mean([len(set(x) & set(y)) / 10 for x, y in zip(a, b, strict=True)])
        assert overlap >= 0.7, (fusion, overlap)


def test_arguments_are_checked_before_any_shard_changes(built, data):
    tokens, doclens, _, texts, *_ = data
    _, sharded = built
    n = sharded.n_docs
    one = (tokens[: int(doclens[0])], doclens[:1])
    with pytest.raises(KeyError, match="not in the index"):
        sharded.update(["doc-1", "nope"], tokens[: int(doclens[:2].sum())], doclens[:2], texts=["a", "b"])
    with pytest.raises(ValueError, match="in the index already"):
        sharded.add(tokens[: int(doclens[:2].sum())], doclens[:2], ids=["new-1", "doc-3"], texts=["a", "b"])
    with pytest.raises(ValueError, match="ids are str"):
        sharded.add(*one, ids=[5], texts=["a"])
    with pytest.raises(ValueError, match="lexical side"):
        sharded.add(*one, ids=["new-2"])  # no texts for an index with a lexical side
    with pytest.raises(KeyError, match="not in the index"):
        sharded.set_metadata(["doc-2", "nope"], [{"a": 1}, {"a": 2}])
    assert sharded.n_docs == n and "new-1" not in sharded
    assert sharded.metadata(["doc-2"]) == [{"year": 2002}]
    assert sharded.texts(["doc-1"]) == [texts[1]]


def test_numpy_ids_relative_path_and_overwrite(ray_cluster, data, tmp_path, monkeypatch):
    tokens, doclens, *_ = data
    monkeypatch.chdir(tmp_path)
    ids = np.arange(1000, 1000 + N_DOCS)  # numpy ints, as Index.build takes them
    with ShardedIndex.build("rel", tokens, doclens, nbits=2, ids=ids, n_shards=2, progress=False) as sh:
        assert sh.n_docs == N_DOCS and 1000 in sh and sh.manifest["next_id"] == 1000 + N_DOCS
    with pytest.raises(FileExistsError):
        ShardedIndex.build("rel", tokens, doclens, nbits=2, n_shards=2, progress=False)
    half = int(doclens[:200].sum())
    with ShardedIndex.build(
        "rel", tokens[:half], doclens[:200], nbits=2, n_shards=3, overwrite=True, progress=False
    ) as sh:
        assert sh.n_shards == 3 and sh.n_docs == 200 and 1000 not in sh
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rel"]  # nothing left beside it
    closed = ShardedIndex.load(tmp_path / "rel")
    closed.close()
    with pytest.raises(RuntimeError, match="closed"):
        closed.search(data[5], k=5)
