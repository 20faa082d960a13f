"""A living index (issue 16): add, delete, update and compact under stable ids; search over several
segments and tombstones equals search over one segment holding the same live documents; readers
keep a consistent version while a writer works; metadata filters."""

from __future__ import annotations

import json
import random
import threading
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from _plaid_data import corpus, queries
from edgeplaid import Index
from edgeplaid.index import _codec, _mutate
from edgeplaid.ops import bundles, reference

DIM = 32
# Tiny codecs (a few centroids from a few dozen documents) see new documents as drifting; the
# warning itself is tested in test_drift_is_reported.
pytestmark = pytest.mark.filterwarnings("ignore:edgeplaid. the .* drift")


def _docs(n: int, seed: int) -> list[torch.Tensor]:
    tokens, doclens, _ = corpus(n_docs=n, dim=DIM, seed=seed)
    return list(torch.split(tokens, doclens.tolist()))


def _pack(docs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.cat(docs), torch.tensor([d.shape[0] for d in docs])


def _decoded(index: Index, doc: torch.Tensor) -> torch.Tensor:
    """The vectors the index holds for ``doc``: compressed with its codec, decompressed by the
    reference twin (from scratch, not through the index)."""
    cents = index.centroids.float().numpy()
    codes, res, _ = _codec.compress(
        doc.numpy(), cents, index.bucket_cutoffs.numpy(), index.bucket_weights.numpy(), index.nbits
    )
    return reference.decompress_residuals(
        torch.from_numpy(codes),
        torch.from_numpy(res),
        torch.from_numpy(cents),
        index.bucket_weights,
        index.nbits,
    )


def _exact(index: Index, live: dict, q: torch.Tensor, k: int) -> tuple[list[list], torch.Tensor]:
    """Exact MaxSim top-k (ids, scores) over the live documents ``{id: tokens}``."""
    ids = list(live)
    scores = torch.stack([(q @ _decoded(index, live[i]).T).max(dim=-1).values.sum(-1) for i in ids], dim=1)
    vals, pos = scores.topk(min(k, len(ids)), dim=1)
    return [[ids[p] for p in row] for row in pos.tolist()], vals


def _check(index: Index, live: dict, q: torch.Tensor, k: int = 6) -> None:
    assert index.n_docs == len(live) == len(index)
    assert sorted(index.ids(), key=str) == sorted(live, key=str)
    got = index.search_exhaustive(q, k=k)
    want_ids, want_scores = _exact(index, live, q, k)
    kk = want_scores.shape[1]
    torch.testing.assert_close(got.scores[:, :kk], want_scores, atol=2e-5, rtol=0)
    for g, w, s in zip(got.user_ids, want_ids, want_scores.tolist(), strict=True):
        ties = {i for i in range(kk) if any(abs(s[i] - s[j]) < 1e-5 for j in range(kk) if j != i)}
        assert [x for i, x in enumerate(g[:kk]) if i not in ties] == [
            x for i, x in enumerate(w) if i not in ties
        ]
    assert all(x is None for row in got.user_ids for x in row[kk:])


@pytest.fixture(scope="module")
def pool():
    return _docs(700, seed=11)


@pytest.fixture(scope="module")
def q():
    _, _, topics = corpus(n_docs=700, dim=DIM, seed=11)
    return queries(topics, n=5, length=6, seed=3)[0]


@pytest.mark.parametrize("merge_factor", [0, 4])
def test_75_rounds_of_add_delete_update(tmp_path, pool, q, merge_factor, monkeypatch):
    """NextPlaid's 75 cycles: after each random change the live ids are exact and exhaustive search
    equals exact MaxSim over the live documents; the same after compaction. Without merging
    (factor 0) every add leaves its own segment; with the default tiered merging few remain."""
    monkeypatch.setattr(_mutate, "MERGE_FACTOR", merge_factor)
    rng = random.Random(0)
    unused = iter(pool[60:])  # every document distinct: no exact ties at the k-th place
    start = pool[:60]
    index = Index.build(
        tmp_path / "ix", *_pack(start), ids=[f"d{i}" for i in range(60)], n_centroids=16, progress=False
    )
    live = {f"d{i}": d for i, d in enumerate(start)}
    fresh = 60
    for rnd in range(75):
        op = rng.choice(["add", "delete", "update"])
        if op == "add" or len(live) < 5:
            n = rng.randint(1, 6)
            docs = [next(unused) for _ in range(n)]
            ids = [f"d{fresh + i}" for i in range(n)]
            fresh += n
            assert index.add(*_pack(docs), ids=ids) == ids
            live.update(zip(ids, docs, strict=True))
        elif op == "delete":
            gone = rng.sample(sorted(live), rng.randint(1, 4))
            assert index.delete(gone) == len(gone)
            for g in gone:
                del live[g]
        else:
            which = rng.sample(sorted(live), rng.randint(1, 3))
            docs = [next(unused) for _ in which]
            index.update(which, *_pack(docs))
            live.update(zip(which, docs, strict=True))
        if rnd % 5 == 4 or rnd == 74:
            _check(index, live, q)
            # the writer's own snapshot (opened without the load scan, ids reused) is the load's
            assert index.user_ids == Index.load(index.path).user_ids
        else:
            assert sorted(index.ids()) == sorted(live)
    assert len(index.segments) > 20 if merge_factor == 0 else len(index.segments) <= 6
    before = index.search(q, k=5)
    reopened = Index.load(index.path)
    assert reopened.search(q, k=5).user_ids == before.user_ids
    assert index.compact() is True
    assert len(index.segments) == 1 and index.n_positions == len(live)
    _check(index, live, q)
    after = index.search(q, k=5)
    torch.testing.assert_close(after.scores, before.scores)
    assert after.user_ids == before.user_ids
    assert index.compact() is False  # nothing left to compact: nothing written
    index.verify()


def test_segments_search_like_one_segment(tmp_path, pool, q, monkeypatch):
    """PLAID search over three segments with tombstones returns what a one-segment index of the
    same live documents (the same codec) returns, for every stage's selection."""
    monkeypatch.setattr(_mutate, "MERGE_FACTOR", 0)
    index = Index.build(tmp_path / "ix", *_pack(pool[:200]), n_centroids=32, progress=False)
    index.add(*_pack(pool[200:300]))
    index.add(*_pack(pool[300:400]))
    index.delete(list(range(0, 400, 7)))
    assert len(index.segments) == 3
    one = Index.load(index.path)
    one.compact()
    assert len(one.segments) == 1
    for knobs in (
        {},
        {"n_candidates": 20, "n_rerank": 8},
        {"n_probe": 1, "threshold": 0.3},
        {"precision": "exact"},
    ):
        a, b = index.search(q, k=10, **knobs), one.search(q, k=10, **knobs)
        torch.testing.assert_close(a.scores, b.scores)
        assert a.user_ids == b.user_ids, knobs
    deleted = set(range(0, 400, 7))
    assert not {x for row in index.search(q, k=50).user_ids for x in row} & deleted
    # The device glue (torch) forms the rows the CPU glue forms: sorted live global positions.
    from edgeplaid.search._plaid import _gather_torch

    s = index._searcher
    top = torch.randint(-1, index.n_centroids, (5, 6, 3), generator=torch.Generator().manual_seed(1))
    valid = torch.ones(5, 6, dtype=torch.bool)
    got = _gather_torch(top, valid, s.parts)
    want = s._candidates(bundles.queries(q[:, :6].contiguous(), None), top, None, 0, None, False)
    assert torch.equal(got[:, : want.shape[1]], want) and bool((got[:, want.shape[1] :] == -1).all())
    a, b = (x.search(q[:2], k=10, backend="triton", n_candidates=40) for x in (index, one))
    torch.testing.assert_close(a.scores, b.scores)
    assert a.user_ids == b.user_ids


def test_ids_are_stable_and_never_reused(tmp_path, pool):
    index = Index.build(tmp_path / "ix", *_pack(pool[:10]), n_centroids=4, progress=False)
    assert index.ids() == list(range(10))
    assert index.add(*_pack(pool[10:13])) == [10, 11, 12]
    index.delete([11, 12])
    assert index.add(*_pack(pool[13:14])) == [13]  # 11 and 12 are not given out again
    index.delete([0])
    index.compact()
    assert index.ids() == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 13]
    r = index.search_exhaustive(pool[13][None], k=1)
    assert r.user_ids == [[13]]
    with pytest.raises(ValueError, match="already in the index"):
        index.add(*_pack(pool[:1]), ids=[5])
    with pytest.raises(ValueError, match="ids are int"):
        index.add(*_pack(pool[:1]), ids=["x"])
    with pytest.raises(KeyError, match="0"):
        index.delete([0])  # already deleted
    with pytest.raises(KeyError, match="99"):
        index.update([99], *_pack(pool[:1]))
    assert index.n_docs == 11  # the refused changes wrote nothing
    # The largest ids deleted and compacted away (a merge drops them too): still never reused.
    index.delete([10, 13])
    index.compact()
    assert index.manifest["next_id"] == 14
    assert index.add(*_pack(pool[14:15])) == [14]
    index.delete([14])
    assert index.add(*_pack(pool[15:16])) == [15]  # the add merged 14's segment away
    assert 14 not in index and Index.load(index.path).add(*_pack(pool[16:17])) == [16]


def test_old_indexes_load_and_change(tmp_path, pool):
    """An index written before segments (format 3) loads as one segment and can be changed."""
    path = tmp_path / "ix"
    Index.build(path, *_pack(pool[:20]), n_centroids=4, progress=False)
    m = json.loads((path / "manifest.json").read_text())
    del m["segments"]
    m["format_version"] = 3
    from edgeplaid.index._storage import manifest_checksum

    m["manifest_checksum"] = manifest_checksum(m)
    (path / "manifest.json").write_text(json.dumps(m))
    old = Index.load(path)
    assert old.manifest["format_version"] == 3 and old.n_docs == 20
    old.add(*_pack(pool[20:22]))
    assert old.manifest["format_version"] == 4 and old.ids() == list(range(22))


def test_readers_keep_one_version_while_a_writer_works(tmp_path, pool, q):
    """A reader thread searching in a loop (refreshing each time, and another on the writer's own
    Index object) while a writer adds and deletes: no error, every result is the exact answer of
    the one version it was computed on."""
    path = tmp_path / "ix"
    Index.build(path, *_pack(pool[:50]), n_centroids=8, progress=False)
    writer = Index.load(path)
    docs = dict(enumerate(pool))
    exact_cache: dict = {}
    errors: list[BaseException] = []
    stop = threading.Event()
    checked = [0]

    def reader(index: Index, refresh: bool) -> None:
        try:
            while not stop.is_set():
                if refresh:
                    index.refresh()
                r = index.search_exhaustive(q, k=4)
                state = r.__dict__["_state"]
                live = tuple(sorted(state.live_ids()))
                if live not in exact_cache:
                    exact_cache[live] = _exact(index, {i: docs[i] for i in live}, q, 4)[1]
                torch.testing.assert_close(r.scores, exact_cache[live], atol=2e-5, rtol=0)
                assert {x for row in r.user_ids for x in row} <= set(live)
                checked[0] += 1
        except BaseException as e:  # reported in the main thread
            errors.append(e)

    threads = [
        threading.Thread(target=reader, args=(Index.load(path), True)),
        threading.Thread(target=reader, args=(writer, False)),
    ]
    for t in threads:
        t.start()
    try:
        nxt = 50
        for i in range(12):
            writer.add(*_pack(pool[nxt : nxt + 3]), ids=[nxt, nxt + 1, nxt + 2])
            nxt += 3
            writer.delete([i * 2])
        deadline = time.monotonic() + 60
        while checked[0] < 6 and not errors and time.monotonic() < deadline:
            time.sleep(0.05)  # readers also check the last version
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors, errors[0]
    assert checked[0] >= 6


def test_racing_refreshes_never_go_back(tmp_path, pool, monkeypatch):
    """A slow refresh (loading an older version) finishing after a change made through the same
    object never leaves that object on the older version."""
    path = tmp_path / "ix"
    index = Index.build(path, *_pack(pool[:20]), n_centroids=4, progress=False)
    Index.load(path).add(*_pack(pool[20:22]))  # v2, by another writer
    real_load = Index.load.__func__
    loaded = threading.Event()

    def slow_load(cls, *a, **k):
        out = real_load(cls, *a, **k)
        if threading.current_thread().name == "slow-reader":
            loaded.set()
            time.sleep(0.5)  # holds v2 while the writer below switches v3 in
        return out

    monkeypatch.setattr(Index, "load", classmethod(slow_load))
    reader = threading.Thread(target=index.refresh, name="slow-reader")
    reader.start()
    loaded.wait()
    index.add(*_pack(pool[22:25]))  # v3 through the same object
    reader.join()
    assert index.n_docs == 25 and index.refresh() is False


def test_second_writer_waits_then_errors(tmp_path, pool, monkeypatch):
    from edgeplaid.index import _mutate
    from edgeplaid.index._storage import _Lock

    path = tmp_path / "ix"
    index = Index.build(path, *_pack(pool[:10]), n_centroids=4, progress=False)
    lock = _Lock(path)
    assert lock.acquire()
    monkeypatch.setattr(_mutate, "LOCK_WAIT_S", 0.2)
    try:
        with pytest.raises(RuntimeError, match="another edgeplaid writer"):
            index.delete([1])
    finally:
        lock.release()
    assert index.delete([1]) == 1


def test_metadata_filters(tmp_path, pool, q):
    """A filter keeping 1% of the documents returns only allowed ones, exactly the top-k of exact
    MaxSim among them; metadata follow add, update, delete and compaction."""
    n = 400
    meta = [
        {"year": 2000 + i % 25, "src": ["pubmed", "arxiv", "wiki"][i % 3], "name": f"é{i}✓"} for i in range(n)
    ]
    meta[7] = None
    index = Index.build(tmp_path / "ix", *_pack(pool[:n]), metadata=meta, n_centroids=32, progress=False)
    where, params = "year = ? AND src = ?", [2004, "arxiv"]  # i % 25 == 4 and i % 3 == 1: 1%
    allowed = [i for i, m in enumerate(meta) if m and m["year"] == 2004 and m["src"] == "arxiv"]
    assert 2 <= len(allowed) <= 8 and index.select(where, params) == allowed
    live = {i: pool[i] for i in allowed}
    r = index.search(q, k=3, where=where, params=params, precision="exact")
    want_ids, want = _exact(index, live, q, 3)
    torch.testing.assert_close(r.scores, want, atol=2e-5, rtol=0)
    assert r.user_ids == want_ids
    e = index.search_exhaustive(q, k=3, where=where, params=params)
    assert e.user_ids == want_ids
    assert index.metadata([7, 8]) == [None, meta[8]]
    # deletes by filter, one write; metadata and ids follow compaction
    assert index.delete(where="src = 'wiki' AND year < 2010") == sum(
        1 for m in meta if m and m["src"] == "wiki" and m["year"] < 2010
    )
    assert 8 not in index  # src wiki, 2008
    index.update([9], *_pack(pool[:1]), metadata=[{"year": 1999, "src": "x", "nul": None}])
    index.compact()
    assert index.metadata([9, 10]) == [{"year": 1999, "src": "x", "nul": None}, meta[10]]
    assert index.select("year = 1999") == [9]
    for hostile in (
        "year = 1; DROP TABLE docs",
        "lower(src) = 'a'",
        "year IN (SELECT pos FROM docs)",
        '"year" = 1',
    ):
        with pytest.raises(ValueError, match="where"):
            index.search(q, k=3, where=hostile)
    assert index.select("src = ?", ["x' OR 1=1 --"]) == []
    index.verify()


def _restamp_metadata(path) -> None:
    """Records the metadata file's current size and checksum in the manifest (a consistent but
    hand-made index, as a buggy or hostile writer would leave)."""
    from edgeplaid.index._storage import file_checksum, manifest_checksum

    m = json.loads((path / "manifest.json").read_text())
    with open(path / "metadata.sqlite", "rb") as f:
        m["metadata"]["checksum"] = file_checksum(f)
    m["metadata"]["nbytes"] = (path / "metadata.sqlite").stat().st_size
    m["manifest_checksum"] = manifest_checksum(m)
    (path / "manifest.json").write_text(json.dumps(m))


def test_metadata_file_is_checked_at_load(tmp_path, pool, monkeypatch):
    """The metadata file is held to what the arrays are: a regular file of the recorded size
    (even with verify=False), no symlink, a docs table whose positions are in range; and a load
    never reads another version's metadata file."""
    import shutil
    import sqlite3

    from edgeplaid.index import IndexFormatError
    from edgeplaid.index._storage import IndexDir

    path = tmp_path / "ix"
    Index.build(
        path, *_pack(pool[:20]), metadata=[{"a": i} for i in range(20)], n_centroids=4, progress=False
    )
    good = tmp_path / "good"
    shutil.copytree(path, good)

    def broken(edit) -> Index:
        shutil.rmtree(path)
        shutil.copytree(good, path)
        con = sqlite3.connect(path / "metadata.sqlite")
        edit(con)
        con.commit()
        con.close()
        _restamp_metadata(path)
        return Index.load(path, verify=False)

    with pytest.raises(IndexFormatError, match=r"outside the index's \[0, 20\)"):
        broken(lambda c: c.execute("INSERT INTO docs VALUES (20, '{}')"))
    with pytest.raises(IndexFormatError, match="outside"):
        broken(lambda c: c.execute("UPDATE docs SET pos = -1 WHERE pos = 0"))

    def view(c) -> None:
        c.execute("ALTER TABLE docs RENAME TO t")
        c.execute("CREATE VIEW docs AS SELECT pos + 100 AS pos, meta FROM t")

    with pytest.raises(IndexFormatError, match="no table docs"):
        broken(view)
    with pytest.raises(IndexFormatError, match="INTEGER PRIMARY KEY"):
        broken(
            lambda c: c.executescript(
                "ALTER TABLE docs RENAME TO t; CREATE TABLE docs (pos INT, meta TEXT);"
                "INSERT INTO docs SELECT * FROM t; INSERT INTO docs SELECT * FROM t; DROP TABLE t;"
            )
        )
    broken(lambda c: None).verify()  # the helper itself leaves a loadable index
    (path / "metadata.sqlite").rename(tmp_path / "elsewhere.sqlite")
    (path / "metadata.sqlite").symlink_to(tmp_path / "elsewhere.sqlite")
    with pytest.raises(IndexFormatError, match="symbolic link"):
        Index.load(path, verify=False)
    (path / "metadata.sqlite").unlink()
    (tmp_path / "elsewhere.sqlite").rename(path / "metadata.sqlite")
    with open(path / "metadata.sqlite", "ab") as f:
        f.write(b"\0" * 4096)
    with pytest.raises(IndexFormatError, match="bytes, the manifest says"):
        Index.load(path, verify=False)
    shutil.rmtree(path)
    shutil.copytree(good, path)
    # A version replaced while its metadata was being opened: refused, never read by path.
    monkeypatch.setattr(IndexDir, "removed", lambda self: True)
    with pytest.raises(IndexFormatError, match="replaced while its metadata"):
        Index.load(path)


def test_drift_is_reported(tmp_path, pool):
    index = Index.build(tmp_path / "ix", *_pack(pool[:100]), n_centroids=16, progress=False)
    far = F.normalize(torch.randn(200, DIM, generator=torch.Generator().manual_seed(9)), dim=-1)
    with pytest.warns(UserWarning, match="drift"):
        index.add(far, torch.tensor([50, 50, 100]))
    assert index.segments[-1].residual_error > index.avg_residual
    index.rebuild()
    assert len(index.segments) == 1 and index.n_docs == 103
    assert index.ids() == list(range(103))


def test_bad_changes_are_refused(tmp_path, pool):
    index = Index.build(tmp_path / "ix", *_pack(pool[:10]), n_centroids=4, progress=False)
    with pytest.raises(ValueError, match="doc_tokens"):
        index.add(torch.zeros(5, DIM + 1), torch.tensor([5]))
    with pytest.raises(ValueError, match="doclens"):
        index.add(torch.zeros(5, DIM), torch.tensor([4]))
    with pytest.raises(ValueError, match="metadata"):
        index.add(*_pack(pool[:2]), metadata=[{"x": float("nan")}, None])
    with pytest.raises(ValueError, match="give ids or where"):
        index.delete()
    with pytest.raises(ValueError, match="duplicate"):
        index.update([1, 1], *_pack(pool[:2]))
    assert index.n_docs == 10 and len(index.segments) == 1
    assert np.array_equal(index.positions([3]), [3])


def test_tiered_merge_keeps_ids_metadata_and_tombstones(tmp_path, pool, q):
    """An add that absorbs the trailing segments drops their deleted documents and renumbers
    their metadata; segments before them keep their tombstones."""
    meta = {i: {"i": i, "tag": "base"} for i in range(200)}
    index = Index.build(
        tmp_path / "ix",
        *_pack(pool[:200]),
        metadata=[meta[i] for i in range(200)],
        n_centroids=8,
        progress=False,
    )
    live = {i: pool[i] for i in range(200)}
    index.delete([3, 4])  # in the base segment: stays a tombstone
    for batch in range(4):
        new = list(range(200 + 5 * batch, 205 + 5 * batch))
        index.add(
            *_pack([pool[i] for i in new]), ids=new, metadata=[{"i": i, "tag": f"b{batch}"} for i in new]
        )
        meta.update({i: {"i": i, "tag": f"b{batch}"} for i in new})
        live.update({i: pool[i] for i in new})
        index.delete([new[1]])
        del live[new[1]]
    del live[3], live[4]
    assert len(index.segments) == 2  # the base, and one merged tail
    # the last delete leaves one tombstone in the tail
    assert index.n_positions == 200 + len(live) - 198 + 1 and index.n_docs == len(live)
    assert index.metadata(sorted(live)) == [meta[i] for i in sorted(live)]
    assert index.select("tag = 'b3'") == [215, 217, 218, 219]
    _check(index, live, q)


def test_upsert_is_one_version_and_foreign_files_survive(tmp_path, pool, q):
    """upsert adds the new ids and replaces the existing ones in one version; a file the user
    keeps beside the index (the command line's encoder.json) survives every change."""
    path = tmp_path / "ix"
    index = Index.build(
        path, *_pack(pool[:30]), ids=[f"d{i}" for i in range(30)], n_centroids=8, progress=False
    )
    (path / "encoder.json").write_text('{"model": "m"}')
    stamp = (path / "manifest.json").stat().st_mtime_ns
    assert index.upsert(["d3", "new"], *_pack([pool[40], pool[41]]), metadata=[{"v": 2}, None]) == (1, 1)
    assert (path / "manifest.json").stat().st_mtime_ns != stamp
    assert sorted(index.ids()) == sorted([f"d{i}" for i in range(30)] + ["new"])
    assert index.metadata(["d3", "new"]) == [{"v": 2}, None]
    got = index.search_exhaustive(pool[40][None], k=1).user_ids
    assert got == [["d3"]]  # d3 now holds pool[40]
    for change in (lambda: index.delete(["d1"]), index.compact, index.upgrade, index.rebuild):
        change()
        assert (path / "encoder.json").read_text() == '{"model": "m"}'
    index.verify()


@pytest.mark.parametrize("kind", ["none", "int", "str"])
def test_id_lookup(tmp_path, pool, kind):
    """positions / `in` / to_user_ids for each id kind, deleted documents absent, odd keys absent
    (never an error but KeyError from positions); numpy and Python ints alike."""
    ids = {"none": None, "int": [100 + 3 * i for i in range(12)], "str": [f"d{i}" for i in range(12)]}[kind]
    index = Index.build(tmp_path / "ix", *_pack(pool[:12]), ids=ids, n_centroids=4, progress=False)
    every = list(range(12)) if ids is None else ids
    if kind != "none":
        index.delete([every[4]])
    st = index._state
    odd = [True, 1.0, None, "x", -1, 1 << 70, b"d1", (1,)]
    got = st.lookup([every[0], every[4], every[11], *odd])
    assert got.tolist()[:3] == [0, -1 if kind != "none" else 4, 11] and (got[3:] == -1).all()
    if kind == "int":
        assert st.lookup(np.array(every, dtype=np.int32)).tolist() == [i if i != 4 else -1 for i in range(12)]
        assert st.lookup(np.array(every, dtype=np.uint64)).tolist()[:2] == [0, 1]
        assert np.int64(every[3]) in index
    assert (every[4] in index) is (kind == "none") and every[5] in index and [1] not in index
    with pytest.raises(KeyError, match="x"):
        index.positions([every[0], "x"])
    assert index.to_user_ids(torch.tensor([[11, -1, 0]])) == [[every[11], None, every[0]]]
    assert index.to_user_ids([[5]]) == [[every[5]]] and index.to_user_ids(np.zeros((1, 0), int)) == [[]]


def test_set_metadata(tmp_path, pool):
    """Metadata replaced or removed by id in one version, vectors untouched (arrays linked)."""
    index = Index.build(
        tmp_path / "ix",
        *_pack(pool[:12]),
        ids=[f"d{i}" for i in range(12)],
        n_centroids=4,
        metadata=[{"v": i} for i in range(12)],
        progress=False,
    )
    index.delete(["d0"])
    codes = index.segments[0].codes.clone()
    assert index.set_metadata(["d3", "d4"], [{"v": 30, "tag": "x"}, None]) == 2
    assert index.metadata(["d3", "d4", "d5"]) == [{"v": 30, "tag": "x"}, None, {"v": 5}]
    assert index.select("tag = 'x'") == ["d3"] and index.select("v >= 0") == [
        f"d{i}" for i in range(1, 12) if i != 4
    ]
    assert torch.equal(index.segments[0].codes, codes) and index.n_docs == 11
    with pytest.raises(KeyError, match="d0"):
        index.set_metadata(["d1", "d0"], [{}, {}])  # deleted: nothing changes
    with pytest.raises(ValueError, match="duplicate"):
        index.set_metadata(["d1", "d1"], [{}, {}])
    with pytest.raises(ValueError, match="metadata"):
        index.set_metadata(["d1"], [{}, {}])
    assert index.metadata(["d1"]) == [{"v": 1}]
    index.compact()
    assert index.metadata(["d3", "d4"]) == [{"v": 30, "tag": "x"}, None]
    index.verify()


def test_rebuild_keeps_the_id_high_water_mark(tmp_path, pool):
    index = Index.build(tmp_path / "ix", *_pack(pool[:20]), n_centroids=4, progress=False)
    index.delete([18, 19])
    index.rebuild(n_centroids=4)
    assert index.ids() == list(range(18)) and index.add(*_pack(pool[20:21])) == [20]


def test_odd_inputs_get_clear_errors(tmp_path, pool):
    from edgeplaid.index import IndexLockedError, WhereError
    from edgeplaid.index._storage import _Lock

    index = Index.build(tmp_path / "ix", *_pack(pool[:10]), n_centroids=4, progress=False)
    assert [1] not in index and 3 in index and 99 not in index
    with pytest.raises(ValueError, match="int64"):
        index.add(*_pack(pool[:1]), ids=[2**70])
    with pytest.raises(WhereError, match="surrogate"):
        index.select("name = '\udfff'")
    lock = _Lock(index.path)
    assert lock.acquire()
    try:
        from edgeplaid.index import _mutate

        _mutate.LOCK_WAIT_S, old = 0.05, _mutate.LOCK_WAIT_S
        try:
            with pytest.raises(IndexLockedError):
                index.delete([1])
        finally:
            _mutate.LOCK_WAIT_S = old
    finally:
        lock.release()
