"""Index storage under hostile or unlucky conditions (issue 13): special files, path traversal,
manifest checksum and schema, load-time structural checks, safe overwrite, leftovers of killed
writers, in-place modification (SIGBUS) and refresh."""

from __future__ import annotations

import json
import os
import re
import signal
import threading
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from _index_tools import copy_index, edit_manifest, resign

from _plaid_data import corpus
from edgeplaid import Index, IndexFormatError
from edgeplaid.index import FORMAT_VERSION, _storage
from edgeplaid.index._storage import IndexWriter


@pytest.fixture(scope="module")
def data():
    return corpus(n_docs=60, seed=5)


@pytest.fixture(scope="module")
def built(tmp_path_factory, data):
    tokens, doclens, _ = data
    path = tmp_path_factory.mktemp("st") / "index"
    ids = [f"doc-{i}" for i in range(doclens.shape[0])]
    return Index.build(path, tokens, doclens, nbits=2, ids=ids, n_centroids=16, progress=False)


@pytest.fixture(scope="module")
def query(data):
    _, _, topics = data
    g = torch.Generator().manual_seed(7)
    pick = torch.randint(0, topics.shape[0], (3, 6), generator=g)
    return torch.nn.functional.normalize(topics[pick], dim=-1)


def _answer(index: Index, q: torch.Tensor):
    r = index.search(q, k=5)
    return r.scores.clone(), r.ids.clone(), r.user_ids


def _same(a, b) -> bool:
    return torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[2] == b[2]


@contextmanager
def deadline(seconds: float):
    """Fails the test instead of hanging it (SIGALRM interrupts a blocking open or read)."""

    def boom(*_):
        raise TimeoutError(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, boom)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


# ---------------------------------------------------------------- special files


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda f: os.mkfifo(f), id="fifo"),
        pytest.param(lambda f: os.symlink("/dev/urandom", f), id="urandom"),
        pytest.param(lambda f: os.symlink("/dev/zero", f), id="zero"),
        pytest.param(lambda f: os.mkdir(f), id="directory"),
    ],
)
@pytest.mark.parametrize("target", ["manifest.json", "codes.bin", "ids_str.bin"])
@pytest.mark.parametrize("verify", [None, True, False])
def test_special_files_are_refused_without_hanging(tmp_path, built, make, target, verify):
    p = copy_index(built.path, tmp_path / "s")
    os.remove(p / target)
    make(p / target)
    with deadline(20), pytest.raises(IndexFormatError, match=r"not a regular file|symbolic link"):
        Index.load(p, verify=verify)


def test_symlinked_array_inside_or_outside_is_refused(tmp_path, built):
    p = copy_index(built.path, tmp_path / "l")
    outside = tmp_path / "codes-elsewhere.bin"
    os.rename(p / "codes.bin", outside)
    os.symlink(outside, p / "codes.bin")
    with pytest.raises(IndexFormatError, match="symbolic link"):
        Index.load(p)


def test_huge_manifest_is_refused_unread(tmp_path, built):
    p = copy_index(built.path, tmp_path / "h")
    with open(p / "manifest.json", "r+b") as f:
        f.truncate(_storage.MANIFEST_MAX_BYTES + 1)
    with pytest.raises(IndexFormatError, match="more than a manifest"):
        Index.load(p)


# ---------------------------------------------------------------- manifest: traversal, checksum, schema


@pytest.mark.parametrize("file", ["../evil.bin", "/tmp/evil.bin", "sub/ids_str.bin", "..", "ids_str"])
def test_array_file_must_be_a_plain_name(tmp_path, built, file):
    p = copy_index(built.path, tmp_path / "t")
    raw = (p / "ids_str.bin").read_bytes()
    (tmp_path / "evil.bin").write_bytes(b"X" * len(raw))  # same size: only the name can stop it
    edit_manifest(p, lambda m: m["arrays"]["ids_str"].update(file=file))
    with pytest.raises(IndexFormatError, match="plain file name"):
        Index.load(p)


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda m: m.update(ids="none"), "arrays do not match"),
        (lambda m: m.update(ids="int"), "arrays do not match"),
        (lambda m: m.update(ids=None), "ids kind"),
        (lambda m: m.update(dim="48"), "dim must be an integer"),
        (lambda m: m.update(nbits=True), "nbits must be an integer"),
        (lambda m: m.update(n_docs=-1), "n_docs must be"),
        (lambda m: m.update(n_centroids=0), "n_centroids must be"),
        (lambda m: m.update(surprise=1), "unknown manifest keys"),
        (lambda m: m.update(build=[]), "build must be an object"),
        (lambda m: m.update(arrays=[]), "arrays must be an object"),
        (lambda m: m["arrays"]["codes"].pop("checksum"), "entry must have exactly"),
        (lambda m: m["arrays"]["codes"].update(extra=1), "entry must have exactly"),
        (lambda m: m["arrays"]["codes"].update(nbytes=3), "nbytes"),
        (lambda m: m["arrays"]["codes"].update(checksum="md5:00"), "bad checksum"),
        (lambda m: m["arrays"]["codes"].update(dtype=">u2"), "codes is"),
        (lambda m: m["arrays"]["codes"].update(shape=[1, 2]), "bad shape"),
        (lambda m: m["arrays"]["codes"].update(shape=[-3]), "bad shape"),
        (lambda m: m["arrays"]["ivf_docs"].update(shape=[10**9]), "ivf_docs has"),
        (lambda m: m["arrays"]["doclens"].update(file="codes.bin"), "listed twice"),
        (lambda m: m["arrays"].update(other=m["arrays"]["codes"]), "unexpected"),
        (lambda m: m.pop("ids"), "lacks 'ids'"),
        (lambda m: m.update(format_version=2.0), "format_version"),
    ],
)
def test_manifest_schema(tmp_path, built, edit, match):
    p = copy_index(built.path, tmp_path / "m")
    edit_manifest(p, edit)  # re-signed: the schema is what must catch it
    with pytest.raises(IndexFormatError, match=match):
        Index.load(p, verify=False)


@pytest.mark.parametrize(
    "edit",
    [
        lambda m: m.update(ids="none"),
        lambda m: m["build"].update(seed=1),
        lambda m: m["arrays"]["codes"].update(checksum="xxh64:" + "0" * 16),
        lambda m: m.update(format_version=2),
    ],
)
def test_manifest_covers_itself(tmp_path, built, edit):
    p = copy_index(built.path, tmp_path / "c")
    edit_manifest(p, edit, sign=False)
    with pytest.raises(IndexFormatError, match="manifest checksum mismatch"):
        Index.load(p, verify=False)
    edit_manifest(p, lambda m: m.pop("manifest_checksum"), sign=False)
    if json.loads((p / "manifest.json").read_text())["format_version"] >= 3:
        with pytest.raises(IndexFormatError, match="lacks its manifest_checksum"):
            Index.load(p, verify=False)
    # else: a version 2 manifest without a checksum is legacy by definition; dropping the
    # checksum and downgrading the version together is an edit, not corruption (README)


def test_manifest_json_oddities(tmp_path, built):
    p = copy_index(built.path, tmp_path / "j")
    text = (p / "manifest.json").read_text()
    duplicate_key = text.replace('"nbits"', '"nbits": 4, "nbits"', 1)
    nan = re.sub(r'"nbits": *\d+', '"nbits": NaN', text, count=1)
    assert nan != text
    for bad in (duplicate_key, nan, "[]", "\xff"):
        (p / "manifest.json").write_text(bad, encoding="latin-1")
        with pytest.raises(IndexFormatError, match=r"unreadable|not an edgeplaid"):
            Index.load(p)


def test_legacy_version_2_manifest_without_checksum_loads_and_upgrades(tmp_path, built, query):
    p = copy_index(built.path, tmp_path / "v2")
    m = json.loads((p / "manifest.json").read_text())
    del m["manifest_checksum"]
    m["format_version"] = 2
    m.pop("segments", None)  # written before segments existed
    (p / "manifest.json").write_text(json.dumps(m))
    old = Index.load(p)
    assert _same(_answer(old, query), _answer(built, query))
    assert old.upgrade() is True and old.manifest["format_version"] == FORMAT_VERSION
    assert "manifest_checksum" in json.loads((p / "manifest.json").read_text())
    assert _same(_answer(Index.load(p, verify=True), query), _answer(built, query))


# ---------------------------------------------------------------- structural checks at load


def _unsort(a: np.ndarray) -> None:
    a[:] = a[::-1].copy() - np.arange(a.shape[0])  # descending


def _poke(path: Path, name: str, dtype: str, fn) -> None:
    a = np.fromfile(path / f"{name}.bin", dtype=dtype)
    fn(a)
    a.tofile(path / f"{name}.bin")


@pytest.mark.parametrize(
    "name, dtype, fn, match",
    [
        ("centroids", "<f2", lambda a: a.__setitem__(5, np.nan), "centroids holds NaN"),
        ("centroids", "<f2", lambda a: a.__setitem__(0, np.inf), "centroids holds NaN"),
        ("bucket_weights", "<f4", lambda a: a.__setitem__(1, np.inf), "bucket_weights holds NaN"),
        ("bucket_weights", "<f4", lambda a: a.__setitem__(0, np.nan), "bucket_weights holds NaN"),
        ("avg_residual", "<f4", lambda a: a.__setitem__(0, np.nan), "avg_residual holds NaN"),
        ("bucket_cutoffs", "<f4", _unsort, "not sorted"),
        ("inv_norm", "<f4", lambda a: a.__setitem__(-1, 0.0), "inv_norm values"),
        ("inv_norm", "<f4", lambda a: a.__setitem__(7, np.inf), "inv_norm values"),
        ("codes", "<u2", lambda a: a.__setitem__(-1, 16), "codes outside"),
        ("doclens", "<i4", lambda a: a.__setitem__(slice(0, 2), [a[0] + a[1] + 1, -1]), "negative"),
        ("doclens", "<i4", lambda a: a.__setitem__(0, a[0] + 1), "doclens sum"),
        ("ivf_docs", "<i4", lambda a: a.__setitem__(-1, 60), r"IVF document positions outside"),
        ("ivf_docs", "<i4", lambda a: a.__setitem__(1, a[0]), "not sorted and unique"),
        ("ivf_offsets", "<i8", lambda a: a.__setitem__(3, a[4] + 1), "not a CSR"),
        ("ids_str_offsets", "<i8", lambda a: a.__setitem__(2, a[3] + 1), "not monotone"),
        ("ids_str", "|u1", lambda a: a.__setitem__(0, 0xFF), "not UTF-8"),
    ],
)
def test_structural_checks_at_every_load(tmp_path, built, name, dtype, fn, match):
    p = copy_index(built.path, tmp_path / "x")
    _poke(p, name, dtype, fn)
    resign(p)  # the checksums agree: only the structural checks can catch it
    for verify in (False, None, True):
        with pytest.raises(IndexFormatError, match=match):
            Index.load(p, verify=verify)
    with pytest.raises(IndexFormatError, match=match):
        Index.load(p, mmap=False)


def test_duplicate_int_ids_and_cut_utf8(tmp_path, data):
    tokens, doclens, _ = data
    idx = Index.build(tmp_path / "i", tokens, doclens, ids=list(range(60)), n_centroids=8, progress=False)
    _poke(idx.path, "ids", "<i8", lambda a: a.__setitem__(1, a[0]))
    resign(idx.path)
    with pytest.raises(IndexFormatError, match="duplicate"):
        Index.load(idx.path)
    ids = [f"é{i}" for i in range(60)]
    s = Index.build(tmp_path / "s", tokens, doclens, ids=ids, n_centroids=8, progress=False)
    _poke(s.path, "ids_str_offsets", "<i8", lambda a: a.__setitem__(1, a[1] - 2))
    resign(s.path)
    with pytest.raises(IndexFormatError, match="cut a UTF-8"):
        Index.load(s.path)


def test_default_verification_policy(tmp_path, built, monkeypatch):
    from edgeplaid.index import _checks

    p = copy_index(built.path, tmp_path / "r")
    _poke(p, "residuals", "|u1", lambda a: a.__setitem__(3, a[3] ^ 0x10))
    with pytest.raises(IndexFormatError, match="checksum mismatch in residuals"):
        Index.load(p)  # small index: every checksum
    Index.load(p, verify=False)
    monkeypatch.setattr(_checks, "AUTO_VERIFY_BYTES", 0)  # "large" index: residuals not read
    Index.load(p)
    with pytest.raises(IndexFormatError, match="checksum"):
        Index.load(p, mmap=False)  # read whole anyway: verified
    with pytest.raises(IndexFormatError, match="checksum"):
        Index.load(p, verify=True)
    q = copy_index(built.path, tmp_path / "c")
    _poke(q, "codes", "<u2", lambda a: a.__setitem__(3, (a[3] + 1) % 16))
    with pytest.raises(IndexFormatError, match="checksum mismatch in codes"):
        Index.load(q)  # the codes are read by the structural scan: their checksum costs nothing


# ---------------------------------------------------------------- overwrite and leftovers


def _build(path: Path, data, n_docs: int, overwrite: bool = False) -> Index:
    tokens, doclens, _ = data
    n = int(doclens[:n_docs].sum())
    return Index.build(path, tokens[:n], doclens[:n_docs], n_centroids=8, overwrite=overwrite, progress=False)


def test_overwrite_replaces_only_an_index(tmp_path, data):
    d = tmp_path / "d"
    d.mkdir()
    (d / "notes.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not an edgeplaid index"):
        _build(d, data, 20, overwrite=True)
    assert (d / "notes.txt").read_text() == "x"
    f = tmp_path / "f"
    f.write_text("y")
    with pytest.raises(FileExistsError, match="not a directory"):
        _build(f, data, 20, overwrite=True)
    e = tmp_path / "e"
    e.mkdir()  # an empty directory holds nothing to lose
    assert _build(e, data, 20, overwrite=True).n_docs == 20
    assert _build(e, data, 30, overwrite=True).n_docs == 30
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "e", "f"]


def test_overwrite_keeps_a_users_symlink(tmp_path, data):
    real = tmp_path / "v1"
    _build(real, data, 20)
    os.symlink(real, tmp_path / "current")
    assert _build(tmp_path / "current", data, 30, overwrite=True).n_docs == 30
    assert (tmp_path / "current").is_symlink() and Index.load(real).n_docs == 30


def test_one_writer_at_a_time(tmp_path, data, monkeypatch):
    monkeypatch.setattr(_storage, "WRITER_WAIT_S", 0.05)
    with IndexWriter(tmp_path / "w"):
        with pytest.raises(RuntimeError, match="another edgeplaid process"):
            _build(tmp_path / "w", data, 10)
    assert _build(tmp_path / "w", data, 10).n_docs == 10


def test_kill_between_the_two_renames_is_recovered(tmp_path, data, monkeypatch):
    # Where the atomic exchange is unavailable, an overwrite renames the old index aside first:
    # a crash right after that leaves no index at the path until the next open restores it.
    path = tmp_path / "i"
    _build(path, data, 20)
    monkeypatch.setenv("EDGEPLAID_NO_RENAME_EXCHANGE", "1")
    real_rename, calls = os.rename, []

    def crash_on_second(a, b, *rest, **kw):
        calls.append((a, b))
        if len(calls) == 2:
            raise KeyboardInterrupt("killed between the renames")
        return real_rename(a, b, *rest, **kw)

    monkeypatch.setattr(_storage.os, "rename", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        _build(path, data, 30, overwrite=True)
    monkeypatch.setattr(_storage.os, "rename", real_rename)
    assert not path.exists()
    assert Index.load(path).n_docs == 20  # restored from .old-
    assert [p.name for p in tmp_path.iterdir()] == ["i"]
    assert _build(path, data, 30, overwrite=True).n_docs == 30  # the fallback path itself works


def test_leftovers_are_cleaned_only_when_ours_and_unused(tmp_path, data, built):
    path = tmp_path / "i"
    _build(path, data, 20)
    killed_build = tmp_path / ".i.tmp-0123456789ab"
    killed_build.mkdir()
    (killed_build / ".edgeplaid-partial").write_text("123\n")
    (killed_build / "residuals.bin").write_bytes(b"\0" * 100)
    empty = tmp_path / ".i.tmp-aaaaaaaaaaaa"
    empty.mkdir()
    old = copy_index(built.path, tmp_path / ".i.old-bbbbbbbbbbbb")
    foreign = tmp_path / ".i.tmp-cccccccccccc"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    other = tmp_path / ".j.tmp-dddddddddddd"  # another index's: not ours to judge here
    other.mkdir()
    # a writer at work holds the lock: nothing it may be using is touched
    lock = _storage._Lock(path)
    assert lock.acquire()
    Index.load(path)
    assert killed_build.exists() and old.exists()
    lock.release()
    with pytest.warns(UserWarning, match="not an edgeplaid directory"):
        Index.load(path)
    assert not killed_build.exists() and not empty.exists() and not old.exists()
    assert (foreign / "notes.txt").read_text() == "mine" and other.exists()


# ---------------------------------------------------------------- never in place; refresh


def test_overwrite_and_upgrade_never_touch_mapped_files(tmp_path, data, query):
    path = tmp_path / "i"
    a = _build(path, data, 40)
    before = _answer(a, query)
    stamps = {f.name: (os.stat(f).st_ino, f.read_bytes()) for f in path.iterdir()}
    b = _build(path, data, 60, overwrite=True)
    assert _same(_answer(a, query), before)  # a's maps still read its own (unlinked) files
    assert a.refresh() is True and a.refresh() is False
    assert _same(_answer(a, query), _answer(b, query)) and a.n_docs == 60
    # an upgrade links the arrays it keeps: same inodes, same bytes
    m = json.loads((path / "manifest.json").read_text())
    del m["manifest_checksum"]
    m["format_version"] = 2
    m.pop("segments", None)  # written before segments existed
    (path / "manifest.json").write_text(json.dumps(m))
    c = Index.load(path)
    inodes = {f.name: os.stat(f).st_ino for f in path.iterdir() if f.suffix == ".bin"}
    assert c.upgrade() is True
    assert {f.name: os.stat(f).st_ino for f in path.iterdir() if f.suffix == ".bin"} == inodes
    assert stamps  # the first version's files were never rewritten either
    assert b.refresh() is True and _same(_answer(b, query), _answer(c, query))


def test_refresh_detects_a_file_changed_in_place(tmp_path, data):
    path = tmp_path / "i"
    a = _build(path, data, 40)
    with open(path / "codes.bin", "r+b") as f:  # what another program might do: SIGBUS territory
        f.truncate(10)
    with pytest.raises(IndexFormatError, match="truncated"):
        a.refresh()


def test_load_racing_writers_reads_one_version(tmp_path, data, query):
    path = tmp_path / "i"
    _build(path, data, 40)
    answers = {40: _answer(Index.load(path), query)}
    stop, seen, errors = threading.Event(), set(), []

    def reader():
        while not stop.is_set():
            try:
                idx = Index.load(path)
                ans = _answer(idx, query)
                if not _same(ans, answers.get(idx.n_docs, ans)):
                    errors.append(f"mixed versions at n_docs={idx.n_docs}")
                seen.add(idx.n_docs)
            except Exception as e:
                errors.append(repr(e))

    t = threading.Thread(target=reader)
    t.start()
    try:
        for i in range(6):
            n = 40 + 20 * (i % 2)
            answers.setdefault(n, _answer(_build(path, data, n, overwrite=True), query))
            _build(path, data, n, overwrite=True)
    finally:
        stop.set()
        t.join()
    assert not errors, errors[:3]
