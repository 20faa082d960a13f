"""edgeplaid.Index: build / load roundtrip, on-disk format, atomic writes, errors, ids, batches."""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from _index_tools import copy_index, edit_manifest

from _plaid_data import corpus
from edgeplaid import Index, IndexFormatError
from edgeplaid.index import FORMAT_VERSION, _build, _codec
from edgeplaid.index._codec import num_centroids, pack_buckets
from edgeplaid.index._snapshot import open_snapshot
from edgeplaid.index._storage import read_manifest
from edgeplaid.ops import reference


@pytest.fixture(scope="module")
def data():
    return corpus(n_docs=200)


@pytest.fixture(scope="module")
def built(tmp_path_factory, data):
    tokens, doclens, _ = data
    path = tmp_path_factory.mktemp("idx") / "index"
    ids = [f"doc-{i}" for i in range(doclens.shape[0])]
    return Index.build(path, tokens, doclens, nbits=4, ids=ids, n_centroids=64, progress=False)


def test_num_centroids_as_colbert():
    assert num_centroids(1_230_000) == 16384
    assert num_centroids(10_000) == 1024
    assert num_centroids(1) == 1


def test_pack_buckets_matches_reference_bit_order():
    g = torch.Generator().manual_seed(0)
    for nbits in (1, 2, 4, 8):
        b = torch.randint(0, 1 << nbits, (7, 48), generator=g)
        want = reference.pack_residuals(b, nbits).numpy()
        assert np.array_equal(pack_buckets(b.numpy().astype(np.uint8), nbits), want)


def test_roundtrip(built, data):
    tokens, doclens, _ = data
    idx = Index.load(built.path, mmap=True, verify=True)
    assert (idx.n_docs, idx.n_tokens, idx.dim, idx.nbits, idx.n_centroids) == (
        doclens.shape[0],
        tokens.shape[0],
        48,
        4,
        64,
    )
    assert torch.equal(idx.doclens.long(), doclens)
    assert isinstance(idx.segments[0].residuals_array, np.memmap)
    # on disk: int32 codes, packed residuals, int32 doclens, CSR IVF
    m = json.loads((built.path / "manifest.json").read_text())
    assert m["format_version"] == FORMAT_VERSION and m["manifest_checksum"].startswith("blake2b:")
    assert m["arrays"]["codes"]["dtype"] == "<u2"  # <= 65,536 centroids
    assert m["arrays"]["centroids"]["dtype"] == "<f2"
    assert m["arrays"]["residuals"]["shape"] == [tokens.shape[0], 24]
    assert m["arrays"]["doclens"]["dtype"] == "<i4"
    # decompressed tokens are close to the originals
    dec = reference.decompress_residuals(
        idx.codes, idx.residuals, idx.centroids.float(), idx.bucket_weights, 4
    )
    cos = (dec * tokens).sum(-1)
    assert float(cos.mean()) > 0.97
    # the IVF lists every document in the lists of its tokens' centroids, sorted and unique
    for c in (0, 17, 63):
        docs = idx.ivf_docs[idx.ivf_offsets[c] : idx.ivf_offsets[c + 1]]
        tok_doc = torch.repeat_interleave(torch.arange(idx.n_docs), doclens)
        want = np.unique(tok_doc[idx.codes == c].numpy())
        assert np.array_equal(np.asarray(docs), want)
    mem = Index.load(built.path, mmap=False)
    assert torch.equal(mem.codes, idx.codes) and torch.equal(mem.residuals, idx.residuals)


def test_ids_mapping(built):
    assert built.user_ids[5] == "doc-5"
    assert built.positions(["doc-7", "doc-0"]).tolist() == [7, 0]
    assert built.to_user_ids(torch.tensor([[3, -1]])) == [["doc-3", None]]


def test_int_ids(tmp_path, data):
    tokens, doclens, _ = data
    ids = list(range(1000, 1000 + doclens.shape[0]))
    idx = Index.build(tmp_path / "i", tokens, doclens, ids=ids, n_centroids=32, progress=False)
    assert idx.user_ids.dtype == np.int64 and idx.to_user_ids([[0, 2]]) == [[1000, 1002]]
    with pytest.raises(ValueError, match="duplicate"):
        Index.build(tmp_path / "j", tokens, doclens, ids=[1] * doclens.shape[0], progress=False)
    assert not (tmp_path / "j").exists()


def test_batches_equal_one_shot(tmp_path, data, built):
    tokens, doclens, _ = data
    bounds = [0, 13, 14, 90, doclens.shape[0]]
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), doclens.cumsum(0)])

    def batches():
        for a, b in itertools.pairwise(bounds):
            ids = [f"doc-{i}" for i in range(a, b)]
            yield tokens[offsets[a] : offsets[b]].numpy(), doclens[a:b].numpy(), ids

    idx = Index.build(tmp_path / "b", batches(), nbits=4, n_centroids=64, progress=False)
    for name in (
        "centroids",
        "bucket_weights",
        "bucket_cutoffs",
        "codes",
        "residuals",
        "doclens",
        "ivf_docs",
    ):
        assert torch.equal(
            torch.as_tensor(np.asarray(getattr(idx, name))), torch.as_tensor(np.asarray(getattr(built, name)))
        ), name
    assert idx.user_ids == built.user_ids
    assert not any(p.name.startswith("_spool") for p in (tmp_path / "b").iterdir())


def test_atomic_write_leaves_nothing_on_failure(tmp_path, data, monkeypatch):
    tokens, doclens, _ = data

    def boom(*a, **k):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(_build, "build_ivf", boom)
    with pytest.raises(RuntimeError, match="disk on fire"):
        Index.build(tmp_path / "x", tokens, doclens, n_centroids=16, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_existing_path_is_kept_unless_overwrite(tmp_path, data):
    tokens, doclens, _ = data
    Index.build(tmp_path / "i", tokens[:100], torch.tensor([100]), n_centroids=8, progress=False)
    with pytest.raises(FileExistsError):
        Index.build(tmp_path / "i", tokens, doclens, n_centroids=8, progress=False)
    idx = Index.build(tmp_path / "i", tokens, doclens, n_centroids=8, overwrite=True, progress=False)
    assert idx.n_docs == doclens.shape[0]
    assert [p.name for p in tmp_path.iterdir()] == ["i"]


_copy = copy_index


def test_truncated_file_raises(tmp_path, built):
    p = _copy(built.path, tmp_path / "t")
    res = p / "residuals.bin"
    res.write_bytes(res.read_bytes()[:-5])
    with pytest.raises(IndexFormatError, match="truncated"):
        Index.load(p)


def test_missing_file_and_manifest_raise(tmp_path, built):
    p = _copy(built.path, tmp_path / "m")
    os.remove(p / "ivf_docs.bin")
    with pytest.raises(IndexFormatError, match="missing"):
        Index.load(p)
    os.remove(p / "manifest.json")
    with pytest.raises(IndexFormatError, match="manifest"):
        Index.load(p)
    with pytest.raises(IndexFormatError, match="not an index"):
        Index.load(tmp_path / "nowhere")


def test_corrupt_bytes_fail_verification(tmp_path, built):
    p = _copy(built.path, tmp_path / "c")
    raw = bytearray((p / "residuals.bin").read_bytes())
    raw[10] ^= 0xFF
    (p / "residuals.bin").write_bytes(bytes(raw))
    Index.load(p, verify=False)  # sizes and structure are right: loads without checksums
    with pytest.raises(IndexFormatError, match="checksum"):
        Index.load(p, verify=True)
    with pytest.raises(IndexFormatError, match="checksum"):
        Index.load(p)  # a small index: the default load verifies every checksum


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda m: m.update(format_version=99), "format_version"),
        (lambda m: m.update(dim=64), "centroids"),
        (lambda m: m.update(nbits=3), "nbits"),
        (lambda m: m.update(n_tokens=m["n_tokens"] + 1), "tokens"),
        (lambda m: m.update(format="something"), "not an edgeplaid"),
    ],
)
def test_mismatched_manifest_raises(tmp_path, built, edit, match):
    p = _copy(built.path, tmp_path / "mm")
    edit_manifest(p, edit)  # re-signed: the schema must catch it
    with pytest.raises(IndexFormatError, match=match):
        Index.load(p)


def test_compact_codes(tmp_path, data, built):
    # Default: uint16 codes (<= 65,536 centroids), mapped and read by the kernels as stored;
    # compact_codes=False stores int32. Both search alike.
    tokens, doclens, _ = data
    ids = [f"doc-{i}" for i in range(doclens.shape[0])]
    wide = Index.build(
        tmp_path / "w", tokens, doclens, ids=ids, n_centroids=64, compact_codes=False, progress=False
    )
    assert built.manifest["arrays"]["codes"]["dtype"] == "<u2" and built.codes.dtype == torch.uint16
    assert wide.manifest["arrays"]["codes"]["dtype"] == "<i4" and wide.codes.dtype == torch.int32
    assert (built.path / "codes.bin").stat().st_size == 2 * built.n_tokens
    q = torch.nn.functional.normalize(torch.randn(3, 5, tokens.shape[1]), dim=-1)
    a, b = built.search(q, k=5), wide.search(q, k=5)
    assert torch.equal(a.ids, b.ids) and torch.equal(a.scores, b.scores)


def test_garbage_manifest_and_corrupt_codes(tmp_path, built):
    p = _copy(built.path, tmp_path / "g")
    codes = np.fromfile(p / "codes.bin", dtype=built.manifest["arrays"]["codes"]["dtype"])
    codes[3] = 60000
    codes.tofile(p / "codes.bin")
    with pytest.raises(IndexFormatError, match=r"codes outside|checksum"):
        Index.load(p, verify=True)
    with pytest.raises(IndexFormatError, match="codes outside"):  # the load-time scan
        Index.load(p, verify=False)
    (p / "manifest.json").write_text("{not json")
    with pytest.raises(IndexFormatError, match="unreadable"):
        Index.load(p)


def test_bad_build_input(tmp_path, data):
    tokens, doclens, _ = data
    with pytest.raises(ValueError, match="doclens"):
        Index.build(tmp_path / "a", tokens, doclens + 1, progress=False)
    with pytest.raises(ValueError, match="nbits"):
        Index.build(tmp_path / "b", tokens, doclens, nbits=3, progress=False)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- inv_norm (format_version 2)


def _as_version_1(path: Path) -> None:
    """Rewrites an index as edgeplaid's format_version 1 wrote it: no inv_norm."""
    m = json.loads((path / "manifest.json").read_text())
    del m["arrays"]["inv_norm"], m["manifest_checksum"]
    m["format_version"] = 1
    m.pop("segments", None)  # written before segments existed
    (path / "manifest.json").write_text(json.dumps(m))
    os.remove(path / "inv_norm.bin")


def test_inv_norm_is_stored_and_right(built):
    m = json.loads((built.path / "manifest.json").read_text())
    assert m["arrays"]["inv_norm"]["dtype"] == "<f4"
    # Bit for bit the norm in compress_residuals' fixed summation order, recomputed from the codes ...
    want = _codec.inv_norms(
        built.codes.numpy(),
        built.residuals.numpy(),
        built.centroids.float().numpy(),
        built.bucket_weights.numpy(),
        4,
    )
    assert np.array_equal(built.inv_norm.numpy(), want)
    # ... and within fp32 rounding of residual_inv_norms (which sums in torch's order).
    loose = reference.residual_inv_norms(
        built.codes, built.residuals, built.centroids.float(), built.bucket_weights, 4
    )
    torch.testing.assert_close(built.inv_norm, loose, rtol=4e-7, atol=0)


def test_version_1_index_loads_searches_identically_and_upgrades(tmp_path, built, data):
    _, _, topics = data
    g = torch.Generator().manual_seed(3)
    q = torch.nn.functional.normalize(topics[torch.randint(0, topics.shape[0], (5, 8), generator=g)], dim=-1)
    p = _copy(built.path, tmp_path / "v1")
    _as_version_1(p)
    with pytest.warns(UserWarning, match="format_version 1"):
        old = Index.load(p)
    assert torch.equal(old.inv_norm, built.inv_norm)  # computed on load, bit for bit
    for precision in ("int8", "exact"):
        a, b = old.search(q, k=5, precision=precision), built.search(q, k=5, precision=precision)
        assert torch.equal(a.ids, b.ids) and torch.equal(a.scores, b.scores)
    assert old.upgrade() is True and old.upgrade() is False
    m = json.loads((p / "manifest.json").read_text())
    assert m["format_version"] == FORMAT_VERSION and "inv_norm" in m["arrays"]
    new = Index.load(p, verify=True)  # no warning, checksums hold
    assert torch.equal(new.inv_norm, built.inv_norm)
    assert torch.equal(new.search(q, k=5).ids, built.search(q, k=5).ids)


def test_missing_or_corrupt_inv_norm_is_an_error(tmp_path, built):
    p = _copy(built.path, tmp_path / "inv")
    os.remove(p / "inv_norm.bin")
    with pytest.raises(IndexFormatError, match=r"missing file inv_norm\.bin"):
        Index.load(p)
    edit_manifest(p, lambda m: m["arrays"].pop("inv_norm"))
    with pytest.raises(IndexFormatError, match="lacks inv_norm"):
        Index.load(p)
    # corrupt values: a NaN / zero / negative inv_norm is rejected at load (and by the kernels)
    q = torch.nn.functional.normalize(torch.randn(2, 6, 48), dim=-1)
    for bad in (float("nan"), 0.0, -1.0):
        c = _copy(built.path, tmp_path / f"bad{bad}")
        raw = np.fromfile(c / "inv_norm.bin", dtype="<f4")
        raw[:] = bad
        raw.tofile(c / "inv_norm.bin")
        with pytest.raises(IndexFormatError, match=r"inv_norm values|checksum"):
            Index.load(c, verify=True)
        with pytest.raises(IndexFormatError, match="inv_norm values are not positive"):
            Index.load(c, verify=False)
        idx = Index(c, open_snapshot(c, read_manifest(c), True))  # no load-time checks
        for precision in ("int8", "exact"):
            with pytest.raises(ValueError, match="inv_norm: token"):
                idx.search(q, k=3, precision=precision)


def test_search_precision_argument(built):
    q = torch.nn.functional.normalize(torch.randn(2, 6, 48), dim=-1)
    with pytest.raises(ValueError, match="precision"):
        built.search(q, precision="fp8")


# ---------------------------------------------------------------- build at scale (issue 14)


def test_coarse_to_fine_build_assigns_nearly_exactly(tmp_path, data, monkeypatch):
    """Above EXACT_MAX_CENTROIDS the build searches centroids coarse to fine (groups, then the
    members of the best groups): the stored codes are the exact nearest centroids but for a few
    near-ties, the residuals and inv_norm are those of compress_residuals for these codes, and
    the build is deterministic."""
    tokens, doclens, _ = data
    monkeypatch.setattr(_codec, "EXACT_MAX_CENTROIDS", 32)
    a = Index.build(tmp_path / "a", tokens, doclens, nbits=2, n_centroids=256, progress=False)
    b = Index.build(tmp_path / "b", tokens, doclens, nbits=2, n_centroids=256, progress=False)
    for name in ("centroids", "codes", "residuals", "inv_norm", "ivf_docs", "bucket_cutoffs"):
        assert torch.equal(
            torch.as_tensor(np.asarray(getattr(a, name))), torch.as_tensor(np.asarray(getattr(b, name)))
        )
    cents = a.centroids.float()
    exact = torch.from_numpy(_codec.assign(tokens.numpy(), cents.numpy()))
    codes = a.codes.long()
    best = (tokens @ cents.T).max(dim=1).values
    got = (tokens * cents[codes]).sum(-1)
    assert float((codes == exact).float().mean()) >= 0.99
    assert float((best - got).max()) < 0.05  # a miss is a near-tie
    res, inv = reference.compress_residuals(tokens, codes, cents, a.bucket_cutoffs, a.bucket_weights, 2)
    assert torch.equal(a.residuals, res) and torch.equal(a.inv_norm, inv)
    info = json.loads((tmp_path / "a" / "manifest.json").read_text())["build"]["assignment"]
    assert info["n_groups"] > 1 and info["heldout_recall"] >= _codec.RECALL_TARGET


def test_assigner_exact_below_threshold_and_kmeans_scales(monkeypatch):
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(3000, 48, generator=g), dim=-1).numpy()
    cents = _codec.kmeans(x, 64, iters=2, seed=1)
    assert cents.shape == (64, 48) and np.allclose(np.linalg.norm(cents, axis=1), 1, atol=1e-5)
    assert _codec.Assigner(cents).exact
    monkeypatch.setattr(_codec, "EXACT_MAX_CENTROIDS", 16)
    approx = _codec.Assigner(cents)
    assert not approx.exact and approx.groups.n_groups > 1
    # tune() picks the fewest probes reaching the recall target on the rows it is given
    recall = approx.tune(x)
    assert recall >= _codec.RECALL_TARGET
    assert float(np.mean(approx(x) == _codec.assign(x, cents))) == recall
    if approx.n_probe > _codec.PROBE_LADDER[0]:
        fewer = _codec.Assigner(
            cents, n_probe=_codec.PROBE_LADDER[_codec.PROBE_LADDER.index(approx.n_probe) - 1]
        )
        assert float(np.mean(fewer(x) == _codec.assign(x, cents))) < _codec.RECALL_TARGET
    # k-means through the coarse-to-fine path still converges to unit centroids
    c2 = _codec.kmeans(x, 64, iters=2, seed=1)
    assert c2.shape == (64, 48) and np.allclose(np.linalg.norm(c2, axis=1), 1, atol=1e-5)
