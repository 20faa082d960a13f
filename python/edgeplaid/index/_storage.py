"""edgeplaid's on-disk index format: a versioned JSON manifest + flat little-endian arrays.

Layout of an index directory::

    manifest.json        {"format": "edgeplaid-plaid", "format_version": 3, "dim", "nbits", counts,
                          "ids", "build", "arrays": {name: {"file", "dtype", "shape", "nbytes",
                          "checksum"}}, "manifest_checksum": "blake2b:..."}
    centroids.bin        (n_centroids, dim) <f2 (fp16, as colbert-ai; widened to fp32 on load)
    avg_residual.bin     (1,) <f4
    bucket_cutoffs.bin   (2**nbits - 1,) <f4
    bucket_weights.bin   (2**nbits,) <f4
    codes.bin            (n_tokens,) <u2 when n_centroids <= 65536, else <i4 (mapped as is)
    inv_norm.bin         (n_tokens,) <f4                1 / ||centroid + residual|| (format_version 2)
    residuals.bin        (n_tokens, dim * nbits / 8) |u1, bit order of edgeplaid.ops (README)
    doclens.bin          (n_docs,) <i4
    ivf_offsets.bin      (n_centroids + 1,) <i8     CSR: centroid c -> ivf_docs[off[c]:off[c+1]]
    ivf_docs.bin         (n_ivf,) <i4               sorted unique document positions per centroid
    ids.bin              (n_docs,) <i8              only when the user gave int ids
    ids_str.bin, ids_str_offsets.bin                utf-8 bytes + (n_docs + 1,) <i8, for str ids

Every array file is raw little-endian data, nothing else, so it maps with ``numpy.memmap``.

Reading. The manifest is bounded in size, covered by its own checksum (format_version 3; older
manifests have none and are read as legacy) and validated by a schema (:func:`validate_manifest`:
known keys, types, ranges, the arrays each version and ids kind needs, their dtypes, shapes,
sizes, plain file names). Every file is opened relative to one open descriptor of the index
directory (so a concurrent replacement of the directory cannot mix two versions), with
``O_NOFOLLOW | O_NONBLOCK`` and then ``fstat``: only regular files are read or mapped, never a
symlink, FIFO or device, and a file's size is checked before any byte of it is read.

Writing. Files of an index are never modified in place (a process mapping them would die of
SIGBUS): every write (build, import, overwrite, :meth:`Index.upgrade`) makes a new directory
``.<name>.tmp-<hex>`` beside the destination (arrays an upgrade keeps are hard links, never
rewritten), fsyncs it and switches it in with one atomic ``renameat2(RENAME_EXCHANGE)`` of the
two directories, so the path is at every moment the old or the new index; the old one is then
removed (its files live on for whoever still maps them). Where the exchange is unavailable the
old directory is renamed to ``.<name>.old-<hex>`` first and an index missing at its path is
restored from it at the next open or write. One writer at a time holds ``flock`` on
``.<name>.lock``; leftovers of killed writers are removed under that lock (see :func:`recover`).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import stat
import time
import uuid
import warnings
import weakref
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = "edgeplaid-plaid"
# 2 adds inv_norm (n_tokens,) <f4; 3 adds manifest_checksum (the manifest covers itself); 4 makes an
# index a list of segments sharing one codec, plus tombstones (``deleted``) and an optional SQLite
# metadata file (a living index: edgeplaid.index._mutate). Versions 1-3 still load as one segment
# (inv_norm computed on load for 1); Index.upgrade() moves them to the current one.
FORMAT_VERSION = 4
READABLE_VERSIONS = (1, 2, 3, 4)
MANIFEST = "manifest.json"
# A manifest holds counts, shapes and checksums, never per-document data: a few kB. The bound
# keeps a hostile or corrupt one from being read into memory whole.
MANIFEST_MAX_BYTES = 1 << 20
# The manifest's own checksum: blake2b from the standard library, so it is always checkable.
MANIFEST_CHECKSUM_ALGO = "blake2b"
_MARKER = ".edgeplaid-partial"  # inside a directory being written: ours, and not finished
WRITER_WAIT_S = 2.0  # how long a writer waits for the lock before IndexLockedError

try:  # xxh64 is ~10x faster than blake2b; both are stable across platforms
    import xxhash

    CHECKSUM_ALGO = "xxh64"
except ImportError:  # pragma: no cover - depends on the environment
    xxhash = None
    CHECKSUM_ALGO = "blake2b"

_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
_FILE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}\.bin")
_OTHER_FILES = {"metadata.sqlite"}  # the only non-array file an index holds


class IndexFormatError(ValueError):
    """A truncated, corrupt, mismatched or unsupported index directory."""


class IndexLockedError(RuntimeError):
    """Another writer holds the index (one writer at a time)."""


def _hasher(algo: str):
    if algo == "xxh64":
        if xxhash is None:
            raise IndexFormatError("the index was checksummed with xxh64 but xxhash is not installed")
        return xxhash.xxh64()
    if algo == "blake2b":
        return hashlib.blake2b(digest_size=16)
    raise IndexFormatError(f"unknown checksum algorithm {algo!r}")


_DIGEST_HEX = {"xxh64": 16, "blake2b": 32}


# ---------------------------------------------------------------------------- safe reading


class IndexDir:
    """An open index directory: every file of one load is opened relative to this descriptor.

    A writer replacing the directory at the path meanwhile cannot make one load read files of
    two versions; a file is opened only if it is a regular file (no symlink, FIFO, device or
    directory) named by a plain file name.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        try:
            fd = os.open(self.path, os.O_RDONLY | _O_DIRECTORY | _O_NONBLOCK | _O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError) as e:
            raise IndexFormatError(f"{self.path}: not an index directory") from e
        except OSError as e:
            raise IndexFormatError(f"{self.path}: cannot open the index directory ({e.strerror})") from e
        self.fd = fd
        self._close = weakref.finalize(self, os.close, fd)
        st = os.fstat(fd)
        if not stat.S_ISDIR(st.st_mode):  # pragma: no cover - O_DIRECTORY already refuses
            raise IndexFormatError(f"{self.path}: not an index directory")
        self.identity = (st.st_dev, st.st_ino)

    def close(self) -> None:
        self._close()

    def removed(self) -> bool:
        """Whether the directory was replaced since it was opened: unlinked, or no longer the one
        at its path (a writer exchanged it and may be deleting its files right now)."""
        try:
            mine = os.fstat(self.fd)
            if mine.st_nlink == 0:
                return True
            now = os.stat(self.path, follow_symlinks=True)
            return (now.st_dev, now.st_ino) != (mine.st_dev, mine.st_ino)
        except OSError:
            return True

    def open_file(self, name: str, what: str | None = None) -> tuple[int, os.stat_result]:
        """(descriptor, fstat) of the regular file ``name`` of this directory; IndexFormatError for
        anything else. The caller closes the descriptor."""
        label = f"{name} ({what})" if what and what != name else name
        if name != MANIFEST and name not in _OTHER_FILES and not _FILE_NAME.fullmatch(name):
            raise IndexFormatError(f"{self.path}: {label}: not a plain file name inside the index")
        try:
            # O_NONBLOCK: opening a FIFO must not wait for a writer; O_NOFOLLOW: no symlink, so
            # nothing outside the directory (and no /dev/zero) is ever opened.
            fd = os.open(name, os.O_RDONLY | _O_NOFOLLOW | _O_NONBLOCK | _O_CLOEXEC, dir_fd=self.fd)
        except FileNotFoundError as e:
            raise IndexFormatError(f"{self.path}: missing file {label}") from e
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise IndexFormatError(f"{self.path}: {label} is a symbolic link (refused)") from e
            raise IndexFormatError(f"{self.path}: cannot open {label} ({e.strerror})") from e
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise IndexFormatError(f"{self.path}: {label} is not a regular file (refused)")
        return fd, st

    def stat_file(self, name: str) -> tuple[int, int, int] | None:
        """(inode, size, mtime_ns) of ``name`` as the directory holds it now; None when absent."""
        try:
            st = os.stat(name, dir_fd=self.fd, follow_symlinks=False)
        except OSError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)


def _stamp(st: os.stat_result) -> tuple[int, int, int]:
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def read_exactly(fd: int, n: int) -> bytes:
    """``n`` bytes from ``fd``'s current position; IndexFormatError when the file ends first."""
    parts, got = [], 0
    while got < n:
        b = os.read(fd, min(n - got, 1 << 24))
        if not b:
            raise IndexFormatError(f"file shrank while being read ({got} of {n} bytes)")
        parts.append(b)
        got += len(b)
    return b"".join(parts)


class Manifest(dict):
    """A parsed, validated manifest, bound to the open directory it was read from.

    ``dir`` opens the arrays of the same directory version; ``stamp`` and ``files`` record the
    (inode, size, mtime) of the manifest and of every array opened, for :func:`changed`.
    """

    dir: IndexDir
    stamp: tuple[int, int, int]
    files: dict[str, tuple[int, int, int]]


def manifest_checksum(body: dict[str, Any]) -> str:
    """Checksum of a manifest's canonical JSON, without its own ``manifest_checksum`` key."""
    rest = {k: v for k, v in body.items() if k != "manifest_checksum"}
    canon = json.dumps(rest, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    h = _hasher(MANIFEST_CHECKSUM_ALGO)
    h.update(canon.encode("ascii"))
    return f"{MANIFEST_CHECKSUM_ALGO}:{h.hexdigest()}"


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("duplicate key in an object")
    return out


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def read_manifest(path: Path) -> Manifest:
    """The parsed and validated manifest of the index at ``path`` (see :func:`validate_manifest`);
    IndexFormatError when absent, not a regular file, too large, unreadable or invalid."""
    d = IndexDir(path)
    mpath = d.path / MANIFEST
    try:
        fd, st = d.open_file(MANIFEST)
    except IndexFormatError as e:
        if "missing file" in str(e):
            raise IndexFormatError(
                f"{d.path}: no {MANIFEST} (not an edgeplaid index, or an interrupted write)"
            ) from e
        raise
    try:
        if st.st_size > MANIFEST_MAX_BYTES:
            raise IndexFormatError(
                f"{mpath}: {st.st_size} bytes, more than a manifest ever holds ({MANIFEST_MAX_BYTES})"
            )
        raw = read_exactly(fd, st.st_size)
    finally:
        os.close(fd)
    try:
        body = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise IndexFormatError(f"{mpath}: unreadable manifest ({e})") from e
    validate_manifest(body, str(mpath))
    m = Manifest(body)
    m.dir, m.stamp, m.files = d, _stamp(st), {}
    return m


# ---------------------------------------------------------------------------- the schema

_TOP_KEYS = {
    "format",
    "format_version",
    "dim",
    "nbits",
    "n_docs",
    "n_tokens",
    "n_centroids",
    "ids",
    "build",
    "arrays",
    "manifest_checksum",
    "segments",
    "n_deleted",
    "metadata",
    "next_id",
    "lexical",
}
_SEGMENT_KEYS = {"prefix", "n_docs", "n_tokens", "residual_error"}
# Segment j >= 1 stores its arrays as "s<j>.codes" etc.; the first segment of a build keeps the
# unprefixed names of format_version <= 3, so an old index is a one-segment index as it stands.
_PREFIX = re.compile(r"(s[0-9]{1,9}\.)?")
_FILE_KEYS = {"file", "nbytes", "checksum"}
METADATA_FILE = "metadata.sqlite"
_ENTRY_KEYS = {"file", "dtype", "shape", "nbytes", "checksum"}
_MAX_COUNT = 1 << 48  # tokens, bytes: far beyond any index, small enough to never overflow int64
_MAX_INT32 = (1 << 31) - 1  # document positions and ivf entries are int32


def _int(m: dict[str, Any], key: str, lo: int, hi: int, where: str) -> int:
    v = m.get(key)
    if type(v) is not int or not lo <= v <= hi:  # bool is not a count
        raise IndexFormatError(f"{where}: {key} must be an integer in [{lo}, {hi}], got {v!r}")
    return v


def segments_of(m: dict[str, Any]) -> list[dict[str, Any]]:
    """The manifest's segments (prefix, n_docs, n_tokens, ...); an index written before format 4
    is one unprefixed segment holding everything."""
    segs = m.get("segments")
    if segs is None:
        return [{"prefix": "", "n_docs": m["n_docs"], "n_tokens": m["n_tokens"]}]
    return segs


def expected_arrays(m: dict[str, Any]) -> dict[str, tuple[tuple[str, ...], tuple[int | None, ...]]]:
    """name -> (allowed dtypes, shape; None where the manifest's own value is taken) of the arrays
    a valid manifest ``m`` (counts already checked) must list, exactly."""
    dim, nbits, nc = m["dim"], m["nbits"], m["n_centroids"]
    nb = 1 << nbits
    want: dict[str, tuple[tuple[str, ...], tuple[int | None, ...]]] = {
        "centroids": (("<f2", "<f4"), (nc, dim)),
        "avg_residual": (("<f4",), (1,)),
        "bucket_cutoffs": (("<f4",), (nb - 1,)),
        "bucket_weights": (("<f4",), (nb,)),
    }
    kind = m.get("ids", "none")
    for seg in segments_of(m):
        p, n_docs, n_tokens = seg["prefix"], seg["n_docs"], seg["n_tokens"]
        want[p + "codes"] = (("<u2", "<i4") if nc <= 1 << 16 else ("<i4",), (n_tokens,))
        want[p + "residuals"] = (("|u1",), (n_tokens, dim * nbits // 8))
        want[p + "doclens"] = (("<i4",), (n_docs,))
        want[p + "ivf_offsets"] = (("<i8",), (nc + 1,))
        want[p + "ivf_docs"] = (("<i4",), (None,))
        if m["format_version"] >= 2:
            want[p + "inv_norm"] = (("<f4",), (n_tokens,))
        if kind == "int":
            want[p + "ids"] = (("<i8",), (n_docs,))
        elif kind == "str":
            want[p + "ids_str"] = (("|u1",), (None,))
            want[p + "ids_str_offsets"] = (("<i8",), (n_docs + 1,))
    if m.get("n_deleted", 0):
        want["deleted"] = (("<i8",), (m["n_deleted"],))
    return want


def _validate_segments(m: dict[str, Any], where: str) -> None:
    """Format 4: a non-empty list of segments with distinct prefixes whose counts sum to the
    manifest's n_docs / n_tokens; tombstones fewer than the documents."""
    segs = m.get("segments")
    if m["format_version"] < 4:
        if segs is not None or {"n_deleted", "metadata", "next_id", "lexical"} & set(m):
            raise IndexFormatError(
                f"{where}: segments, n_deleted, metadata, next_id and lexical need format_version 4"
            )
        return
    if not isinstance(segs, list) or not segs or len(segs) > 10_000:
        raise IndexFormatError(f"{where}: segments must be a non-empty list")
    seen: set[str] = set()
    docs = tokens = 0
    for i, seg in enumerate(segs):
        if not isinstance(seg, dict) or not {"prefix", "n_docs", "n_tokens"} <= set(seg) <= _SEGMENT_KEYS:
            raise IndexFormatError(f"{where}: segment {i}: expected keys {sorted(_SEGMENT_KEYS)}")
        p = seg["prefix"]
        if not isinstance(p, str) or not _PREFIX.fullmatch(p) or p in seen:
            raise IndexFormatError(f"{where}: segment {i}: bad or repeated prefix {p!r}")
        seen.add(p)
        docs += _int(seg, "n_docs", 0, _MAX_INT32, f"{where}: segment {i}")
        tokens += _int(seg, "n_tokens", 0, _MAX_COUNT, f"{where}: segment {i}")
        err = seg.get("residual_error")
        if err is not None and (type(err) not in (int, float) or not 0 <= err < 1e6):
            raise IndexFormatError(f"{where}: segment {i}: bad residual_error {err!r}")
    if docs != m["n_docs"] or tokens != m["n_tokens"]:
        raise IndexFormatError(
            f"{where}: segments hold {docs} documents / {tokens} tokens, the manifest says "
            f"{m['n_docs']} / {m['n_tokens']}"
        )
    if "n_deleted" in m:
        _int(m, "n_deleted", 0, m["n_docs"], where)
    if "next_id" in m:  # the smallest auto id never given (int ids; see _mutate._next_id)
        _int(m, "next_id", 0, (1 << 63) - 1, where)
    meta = m.get("metadata")
    if meta is not None:
        if not isinstance(meta, dict) or set(meta) != _FILE_KEYS or meta["file"] != METADATA_FILE:
            raise IndexFormatError(f"{where}: metadata must be {{file: {METADATA_FILE!r}, nbytes, checksum}}")
        if type(meta["nbytes"]) is not int or not 0 <= meta["nbytes"] <= _MAX_COUNT:
            raise IndexFormatError(f"{where}: metadata: bad nbytes {meta['nbytes']!r}")
        _check_digest(meta["checksum"], f"{where}: metadata")
    if "lexical" in m:
        from edgeplaid.index._lexical import validate_entry

        validate_entry(m["lexical"], where, m["n_docs"] - m.get("n_deleted", 0), m.get("ids", "none"))
        for name, f in m["lexical"]["files"].items():
            _check_digest(f["checksum"], f"{where}: lexical/{name}")


def tombstones_ok(deleted: np.ndarray, n_positions: int) -> bool:
    """Whether ``deleted`` (n,) int is what an index stores: sorted, unique, in [0, n_positions)."""
    d = deleted
    return not d.shape[0] or (
        int(d[0]) >= 0 and int(d[-1]) < n_positions and not bool((d[1:] <= d[:-1]).any())
    )


def _check_digest(value: Any, where: str) -> None:
    algo, _, digest = value.partition(":") if isinstance(value, str) else ("", "", "")
    if algo not in _DIGEST_HEX or not re.fullmatch(f"[0-9a-f]{{{_DIGEST_HEX[algo]}}}", digest):
        raise IndexFormatError(f"{where}: bad checksum {value!r}")


def validate_manifest(m: Any, where: str) -> None:
    """Checks a parsed manifest against the schema of its format version; IndexFormatError naming
    the first problem. Cheap (no file is read): format, version, the manifest's own checksum
    (required from version 3; a legacy manifest without one is accepted), known keys only, types
    and ranges of the counts, the ids kind, and the exact set of arrays with their plain, distinct
    file names, dtypes, shapes, byte sizes and checksum syntax."""
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        got = m.get("format") if isinstance(m, dict) else type(m).__name__
        raise IndexFormatError(f"{where}: not an edgeplaid index manifest (format {got!r})")
    version = m.get("format_version")
    if type(version) is not int or version not in READABLE_VERSIONS:
        raise IndexFormatError(
            f"{where}: format_version {version!r} is not supported (this edgeplaid reads "
            f"{', '.join(map(str, READABLE_VERSIONS))})"
        )
    if "manifest_checksum" in m:  # present: it must hold, whatever the version says
        if m["manifest_checksum"] != manifest_checksum(m):
            raise IndexFormatError(f"{where}: manifest checksum mismatch: the manifest is corrupt")
    elif version >= 3:
        raise IndexFormatError(f"{where}: the manifest lacks its manifest_checksum")
    unknown = sorted(set(m) - _TOP_KEYS)
    if unknown:
        raise IndexFormatError(f"{where}: unknown manifest keys {unknown}")
    for key in ("dim", "nbits", "n_docs", "n_tokens", "n_centroids", "arrays"):
        if key not in m:
            raise IndexFormatError(f"{where}: manifest lacks {key!r}")
    dim = _int(m, "dim", 1, 1 << 16, where)
    nbits = _int(m, "nbits", 1, 8, where)
    if nbits not in (1, 2, 4, 8) or dim * nbits % 8:
        raise IndexFormatError(f"{where}: bad dim={dim} / nbits={nbits} in the manifest")
    n_docs = _int(m, "n_docs", 0, _MAX_INT32, where)
    n_tokens = _int(m, "n_tokens", 0, _MAX_COUNT, where)
    _int(m, "n_centroids", 1, _MAX_INT32, where)
    if "ids" not in m and version >= 3:
        raise IndexFormatError(f"{where}: manifest lacks 'ids'")
    kind = m.get("ids", "none")
    if kind not in ("none", "int", "str"):
        raise IndexFormatError(f"{where}: unknown ids kind {kind!r} (expected none, int or str)")
    if "build" in m and not isinstance(m["build"], dict):
        raise IndexFormatError(f"{where}: build must be an object")
    _validate_segments(m, where)
    arrays = m["arrays"]
    if not isinstance(arrays, dict):
        raise IndexFormatError(f"{where}: arrays must be an object")
    want = expected_arrays(m)
    if set(arrays) != set(want):
        missing, extra = sorted(set(want) - set(arrays)), sorted(set(arrays) - set(want))
        if "inv_norm" in missing and version >= 2:
            raise IndexFormatError(f"{where}: the manifest lacks inv_norm (format_version {version})")
        raise IndexFormatError(
            f"{where}: arrays do not match the format (ids={kind!r}): missing {missing}, unexpected {extra}"
        )
    files: set[str] = set()
    for name, (dtypes, shape) in want.items():
        e = arrays[name]
        if not isinstance(e, dict) or set(e) != _ENTRY_KEYS:
            raise IndexFormatError(f"{where}: array {name}: entry must have exactly {sorted(_ENTRY_KEYS)}")
        file = e["file"]
        if not isinstance(file, str) or not _FILE_NAME.fullmatch(file):
            raise IndexFormatError(f"{where}: array {name}: file {file!r} is not a plain file name")
        if file in files:
            raise IndexFormatError(f"{where}: array {name}: file {file!r} is listed twice")
        files.add(file)
        if e["dtype"] not in dtypes:
            raise IndexFormatError(f"{where}: {name} is {e['dtype']!r}, expected {'/'.join(dtypes)}")
        got = e["shape"]
        if (
            not isinstance(got, list)
            or len(got) != len(shape)
            or any(type(s) is not int or not 0 <= s <= _MAX_COUNT for s in got)
        ):
            raise IndexFormatError(f"{where}: {name}: bad shape {got!r}")
        free = [g for g, s in zip(got, shape, strict=True) if s is None]
        if any(s is not None and g != s for g, s in zip(got, shape, strict=True)):
            raise IndexFormatError(
                f"{where}: {name} is {e['dtype']} {tuple(got)}, expected {tuple(shape)} "
                f"(dim={dim}, nbits={nbits}, n_docs={n_docs}, n_tokens={n_tokens}, "
                f"n_centroids={m['n_centroids']})"
            )
        if name.endswith("ivf_docs") and free[0] > n_tokens:
            raise IndexFormatError(f"{where}: {name} has {free[0]} entries for {n_tokens} tokens")
        nbytes = np.dtype(e["dtype"]).itemsize * int(np.prod(got, dtype=object))
        if type(e["nbytes"]) is not int or e["nbytes"] != nbytes:
            raise IndexFormatError(f"{where}: {name}: nbytes {e['nbytes']!r} != {nbytes}")
        _check_digest(e["checksum"], f"{where}: {name}")


# ---------------------------------------------------------------------------- arrays


def _index_dir(path: Path, manifest: dict[str, Any]) -> IndexDir:
    d = getattr(manifest, "dir", None)
    return d if d is not None else IndexDir(path)


def open_array_fd(path: Path, manifest: dict[str, Any], name: str) -> tuple[int, np.dtype, tuple[int, ...]]:
    """(descriptor, dtype, shape) of array ``name``, its file checked to be a regular file of
    exactly the manifest's size before anything is read. The caller closes the descriptor."""
    meta = manifest["arrays"].get(name)
    if meta is None:
        raise IndexFormatError(f"{path}: manifest has no array {name!r}")
    try:
        dt = np.dtype(meta["dtype"])
        shape = tuple(int(s) for s in meta["shape"])
        file = meta["file"]
    except (KeyError, TypeError, ValueError) as e:
        raise IndexFormatError(f"{path}: bad manifest entry for {name!r} ({e})") from e
    if dt.byteorder == ">" or (dt.byteorder == "=" and np.little_endian is False):
        raise IndexFormatError(f"{path}: {name} is not little-endian ({meta['dtype']})")
    d = _index_dir(path, manifest)
    fd, st = d.open_file(file, name)
    want = dt.itemsize * int(np.prod(shape))
    if st.st_size != want or int(meta.get("nbytes", want)) != want:
        os.close(fd)
        raise IndexFormatError(
            f"{path}: {file} has {st.st_size} bytes, expected {want} ({name} {meta['dtype']} {shape}); "
            "the index is truncated or corrupt"
        )
    files = getattr(manifest, "files", None)
    if files is not None:
        files[name] = _stamp(st)
    return fd, dt, shape


def open_array(path: Path, manifest: dict[str, Any], name: str, mmap: bool) -> np.ndarray:
    """Array ``name`` of the index, memory-mapped read-only (or read into memory).

    Opens only a regular file of the index directory (see :class:`IndexDir`) whose size matches
    the manifest; IndexFormatError otherwise.
    """
    fd, dt, shape = open_array_fd(path, manifest, name)
    with os.fdopen(fd, "rb") as f:
        n = dt.itemsize * int(np.prod(shape))
        if n == 0:
            return np.zeros(shape, dtype=dt)
        if mmap:
            # copy-on-write: read-only in practice, writable for torch.from_numpy (no warning)
            return np.memmap(f, dtype=dt, mode="c", shape=shape)
        out = np.empty(shape, dtype=dt)
        view = memoryview(out).cast("B")
        got = 0
        while got < n:
            k = f.readinto(view[got:])
            if not k:
                raise IndexFormatError(f"{path}: {name}: file shrank while being read")
            got += k
        return out


def iter_array(path: Path, manifest: dict[str, Any], name: str, chunk_bytes: int = 1 << 24) -> Any:
    """Yields (first row, raw bytes, block (rows, ...)) over array ``name``, read in ~16 MiB
    blocks of whole rows after the file's type and size are checked: bounded memory, one
    sequential read (no map), for the load-time checks and the checksums."""
    fd, dt, shape = open_array_fd(path, manifest, name)
    try:
        row = dt.itemsize * int(np.prod(shape[1:])) if len(shape) > 1 else dt.itemsize
        rows = max(1, chunk_bytes // max(row, 1))
        n = shape[0] if shape else 1
        for s in range(0, n, rows):
            k = min(rows, n - s)
            raw = read_exactly(fd, k * row)
            yield s, raw, np.frombuffer(raw, dtype=dt).reshape((k, *shape[1:]))
    finally:
        os.close(fd)


def checksum_of(manifest: dict[str, Any], name: str) -> tuple[str, str]:
    """(algorithm, hex digest) recorded for array ``name``."""
    algo, _, digest = str(manifest["arrays"][name].get("checksum", "")).partition(":")
    return algo, digest


def verify_checksums(path: Path, manifest: dict[str, Any], names: Any = None) -> None:
    """Hashes the array files (all, or ``names``) and compares with the manifest; every file's
    type and size are checked before it is read. IndexFormatError on a mismatch."""
    for name in manifest["arrays"] if names is None else names:
        algo, digest = checksum_of(manifest, name)
        h = _hasher(algo)
        for _, raw, _ in iter_array(path, manifest, name):
            h.update(raw)
        if h.hexdigest() != digest:
            raise IndexFormatError(
                f"{path}: checksum mismatch in {manifest['arrays'][name]['file']} ({name}): "
                "the index is corrupt"
            )
    if names is None:
        from edgeplaid.index._lexical import check_lexical_files

        check_metadata_file(path, manifest, hash=True)
        check_lexical_files(path, manifest, hash=True)  # type: ignore[arg-type]


def check_metadata_file(path: Path, manifest: dict[str, Any], hash: bool) -> None:
    """The manifest's metadata file (if any) is a regular file of the directory (no symlink) of
    the recorded size, and with ``hash`` of the recorded checksum; IndexFormatError otherwise."""
    meta = manifest.get("metadata")
    if meta is None:
        return
    fd, st = _index_dir(path, manifest).open_file(meta["file"], "metadata")
    with os.fdopen(fd, "rb") as f:
        if st.st_size != meta["nbytes"]:
            raise IndexFormatError(
                f"{path}: {meta['file']} has {st.st_size} bytes, the manifest says {meta['nbytes']}: "
                "the index is corrupt"
            )
        if hash and file_checksum(f, meta["checksum"].partition(":")[0]) != meta["checksum"]:
            raise IndexFormatError(f"{path}: checksum mismatch in {meta['file']}: the index is corrupt")


def file_checksum(f: Any, algo: str = CHECKSUM_ALGO) -> str:
    """``algo:hexdigest`` of an open binary file read from its current position to the end."""
    h = _hasher(algo)
    while chunk := f.read(1 << 24):
        h.update(chunk)
    return f"{algo}:{h.hexdigest()}"


def changed(path: Path, manifest: dict[str, Any]) -> bool:
    """Whether the index at ``path`` is no longer the one ``manifest`` was read from: its manifest
    file or directory was replaced, or a file this load opened has another inode, size or mtime
    (modified in place by someone else: its map would fault)."""
    d = getattr(manifest, "dir", None)
    if d is None:
        return True
    try:
        st = os.stat(Path(path) / MANIFEST, follow_symlinks=False)
    except OSError:
        return True
    if _stamp(st) != manifest.stamp or d.removed():
        return True
    try:
        here = os.stat(path)
    except OSError:
        return True
    if (here.st_dev, here.st_ino) != d.identity:
        return True
    arrays = manifest["arrays"]
    return any(d.stat_file(arrays[name]["file"]) != s for name, s in manifest.files.items())


# ---------------------------------------------------------------------------- writing


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | _O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _Lock:
    """``flock`` on ``.<name>.lock`` beside an index: one writer (or cleaner) at a time.

    The lock file is removed on release; a locker checks, once it holds the lock, that the path
    still names the file it locked (else another process removed it meanwhile) and retries.
    """

    def __init__(self, dst: Path) -> None:
        self.path = dst.parent / f".{dst.name}.lock"
        self.fd: int | None = None

    def acquire(self, blocking: bool = False, wait: float = 0.0) -> bool:
        """Takes the lock; False when another holds it (after polling up to ``wait`` seconds)."""
        deadline = time.monotonic() + wait
        while True:
            if self._try(blocking):
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)

    def _try(self, blocking: bool) -> bool:
        for _ in range(100):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | _O_NOFOLLOW | _O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            except BlockingIOError:
                os.close(fd)
                return False
            try:
                same = os.stat(self.path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self.fd = fd
                return True
            os.close(fd)
        raise OSError(f"{self.path}: could not take the lock")  # pragma: no cover

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.unlink(self.path)
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None


def _leftovers(dst: Path) -> list[Path]:
    """``.<name>.tmp-<hex>`` / ``.<name>.old-<hex>`` entries beside ``dst`` (our naming only)."""
    pat = re.compile(rf"\.{re.escape(dst.name)}\.(tmp|old)-[0-9a-f]{{12}}")
    try:
        names = os.listdir(dst.parent)
    except OSError:
        return []
    return [dst.parent / n for n in names if pat.fullmatch(n)]


def _is_ours(d: Path) -> bool:
    """A leftover directory is provably edgeplaid's when it is empty, carries the writer's marker,
    or holds an edgeplaid manifest; anything else is left alone."""
    try:
        st = os.lstat(d)
        if not stat.S_ISDIR(st.st_mode):
            return False
        names = os.listdir(d)
    except OSError:
        return False
    if not names or _MARKER in names:
        return True
    return _looks_like_index(d)


def _looks_like_index(d: Path) -> bool:
    """Whether ``d`` holds a manifest.json naming edgeplaid's format (parsed, not validated: a
    corrupt index is still ours to replace)."""
    try:
        idir = IndexDir(d)
        try:
            fd, st = idir.open_file(MANIFEST)
        finally:
            idir.close()
        try:
            if st.st_size > MANIFEST_MAX_BYTES:
                return False
            body = json.loads(read_exactly(fd, st.st_size).decode("utf-8"))
        finally:
            os.close(fd)
    except (IndexFormatError, OSError, ValueError, RecursionError):
        return False
    return isinstance(body, dict) and body.get("format") == FORMAT


def _recover_locked(dst: Path) -> None:
    leftovers = _leftovers(dst)
    if not os.path.lexists(dst):
        # An overwrite without the atomic exchange was killed between its two renames: the old
        # index waits under .old-; put it back (the newest if several).
        olds = [p for p in leftovers if ".old-" in p.name and _looks_like_index(p)]
        if olds:
            best = max(olds, key=lambda p: os.lstat(p).st_mtime_ns)
            os.rename(best, dst)
            _fsync_dir(dst.parent)
            leftovers.remove(best)
    for p in leftovers:
        if _is_ours(p):
            shutil.rmtree(p, ignore_errors=True)
        else:
            warnings.warn(f"edgeplaid: {p} is not an edgeplaid directory: left as it is", stacklevel=3)


def recover(dst: str | os.PathLike) -> None:
    """Finishes what a killed writer left beside ``dst``: restores an index missing at its path
    from its ``.old-`` copy, removes ``.tmp-`` / ``.old-`` directories that are provably ours.

    Runs only when no writer holds the lock (so nothing in use is touched); silent and harmless
    where the directory is read-only. Called by every write and every load.
    """
    dst = Path(dst)
    if dst.is_symlink():  # writers name their leftovers after the real directory
        dst = Path(os.path.realpath(dst))
    lock = _Lock(dst)
    if not _leftovers(dst) and not os.path.lexists(lock.path):
        return
    try:
        if not lock.acquire():
            return  # a writer is at work: its files are in use
    except OSError:
        return  # read-only place: leave it to the next writer
    try:
        _recover_locked(dst)
    except OSError:
        pass
    finally:
        lock.release()


def check_replaceable(dst: str | os.PathLike) -> None:
    """FileExistsError unless ``dst`` is absent, an empty directory or an edgeplaid index: an
    overwrite replaces nothing else."""
    dst = Path(dst)
    if not os.path.lexists(dst):
        return
    real = Path(os.path.realpath(dst))
    if not real.is_dir():
        raise FileExistsError(f"{dst}: exists and is not a directory; refusing to overwrite it")
    try:
        empty = not os.listdir(real)
    except OSError as e:
        raise FileExistsError(f"{dst}: cannot be read ({e.strerror}); refusing to overwrite it") from e
    if not empty and not _looks_like_index(real):
        raise FileExistsError(
            f"{dst}: not an edgeplaid index (no edgeplaid manifest.json); refusing to overwrite it"
        )


_RENAME_EXCHANGE = 2
_libc: Any = None


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swaps the directory entries ``a`` and ``b`` (Linux renameat2 RENAME_EXCHANGE);
    False where the platform or file system cannot."""
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL(None, use_errno=True)
        except OSError:  # pragma: no cover
            _libc = False
    fn = getattr(_libc, "renameat2", None) if _libc else None
    if fn is None or os.environ.get("EDGEPLAID_NO_RENAME_EXCHANGE"):
        return False
    at_fdcwd = -100
    rc = fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a))


class IndexWriter:
    """Writes one index directory aside (``.<name>.tmp-<hex>``) and switches it in atomically.

    Use as a context manager: on an exception the partial directory is removed and the
    destination is left as it was. ``overwrite=True`` replaces only an edgeplaid index or an
    empty directory (FileExistsError for anything else). One writer per path at a time
    (IndexLockedError, a RuntimeError, when another holds it for more than ``wait`` seconds: a
    load cleaning up a killed writer's leftovers holds it for milliseconds, and a writer must not
    fail for that).
    """

    def __init__(self, dst: str | os.PathLike, overwrite: bool = False, wait: float | None = None) -> None:
        dst = Path(dst)
        if dst.is_symlink():  # the user's own link: replace what it points at, keep the link
            dst = Path(os.path.realpath(dst))
        self.dst = dst
        self.dst.parent.mkdir(parents=True, exist_ok=True)
        self._lock = _Lock(self.dst)
        if not self._lock.acquire(wait=WRITER_WAIT_S if wait is None else wait):
            raise IndexLockedError(f"{self.dst}: another edgeplaid process is writing this index")
        try:
            _recover_locked(self.dst)
            if os.path.lexists(self.dst):
                if not overwrite:
                    raise FileExistsError(f"{self.dst} exists (pass overwrite=True to replace it)")
                check_replaceable(self.dst)
            self.tmp = self.dst.parent / f".{self.dst.name}.tmp-{uuid.uuid4().hex[:12]}"
            self.tmp.mkdir()
            # Marks the directory as ours and unfinished, for the cleanup after a kill.
            (self.tmp / _MARKER).write_text(f"{os.getpid()}\n")
        except BaseException:
            self._lock.release()
            raise
        self.arrays: dict[str, dict[str, Any]] = {}
        self._open: dict[str, Any] = {}

    def __enter__(self) -> IndexWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        for f in self._open.values():
            f.close()
        try:
            if exc_type is not None or self.tmp.exists():
                shutil.rmtree(self.tmp, ignore_errors=True)
        finally:
            self._lock.release()

    def path(self, name: str) -> Path:
        return self.tmp / name

    def write_array(self, name: str, array: np.ndarray) -> None:
        """Writes a whole array as ``<name>.bin`` (little-endian, C order)."""
        a = np.ascontiguousarray(array)
        a = a.astype(a.dtype.newbyteorder("<"), copy=False)
        self.begin_array(name, a.dtype, a.shape[1:])
        self.append(name, a)
        self.end_array(name)

    def begin_array(self, name: str, dtype: np.dtype, row_shape: tuple[int, ...] = ()) -> None:
        """Starts an array written in row blocks with :meth:`append` (bounded memory)."""
        dt = np.dtype(dtype).newbyteorder("<")
        self.arrays[name] = {"file": f"{name}.bin", "dtype": dt.str, "shape": [0, *row_shape], "h": None}
        self.arrays[name]["h"] = _hasher(CHECKSUM_ALGO)
        self._open[name] = open(self.tmp / f"{name}.bin", "wb")

    def append(self, name: str, block: np.ndarray) -> None:
        meta = self.arrays[name]
        dt = np.dtype(meta["dtype"])
        b = np.ascontiguousarray(block, dtype=dt)
        if list(b.shape[1:]) != meta["shape"][1:]:
            raise ValueError(
                f"{name}: block rows of shape {b.shape[1:]}, expected {tuple(meta['shape'][1:])}"
            )
        data = b.tobytes()
        self._open[name].write(data)
        meta["h"].update(data)
        meta["shape"][0] += b.shape[0]

    def end_array(self, name: str) -> None:
        f = self._open.pop(name)
        f.flush()
        os.fsync(f.fileno())
        f.close()
        meta = self.arrays[name]
        meta["checksum"] = f"{CHECKSUM_ALGO}:{meta.pop('h').hexdigest()}"
        meta["nbytes"] = int(np.dtype(meta["dtype"]).itemsize * int(np.prod(meta["shape"])))

    def link_array(self, src: IndexDir, name: str, meta: dict[str, Any]) -> None:
        """Takes array ``name`` unchanged from the index open at ``src`` (see :meth:`link_file`)."""
        self.link_file(src, meta["file"])
        self.arrays[name] = {k: meta[k] for k in _ENTRY_KEYS}

    def link_file(self, src: IndexDir, file: str) -> None:
        """Takes the non-array file ``file`` unchanged from the index open at ``src`` (hard link,
        else a copy): nothing in an index is modified in place, so sharing it is safe."""
        try:
            os.link(file, self.tmp / file, src_dir_fd=src.fd, follow_symlinks=False)
        except OSError:
            fd = os.open(file, os.O_RDONLY | _O_NOFOLLOW | _O_NONBLOCK | _O_CLOEXEC, dir_fd=src.fd)
            with os.fdopen(fd, "rb") as fin, open(self.tmp / file, "wb") as fout:
                shutil.copyfileobj(fin, fout, 1 << 24)
                fout.flush()
                os.fsync(fout.fileno())

    def carry_foreign(self, src: IndexDir, manifest: dict[str, Any]) -> list[str]:
        """Hard-links into the new version the regular files of ``src`` that are not the index's
        own (the manifest, its arrays, its metadata): what a user or a tool keeps beside the index
        (the command line's ``encoder.json``) survives every change. Returns their names."""
        own = {MANIFEST, _MARKER, METADATA_FILE} | {e["file"] for e in manifest["arrays"].values()}
        carried = []
        for name in os.listdir(src.fd):
            if name in own or os.path.lexists(self.tmp / name):
                continue
            try:
                st = os.stat(name, dir_fd=src.fd, follow_symlinks=False)
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                self.link_file(src, name)
                carried.append(name)
        return carried

    def file_entry(self, file: str) -> dict[str, Any]:
        """{file, nbytes, checksum} of a finished non-array file of the directory being written."""
        with open(self.tmp / file, "rb") as f:
            digest = file_checksum(f)
        return {"file": file, "nbytes": os.stat(self.tmp / file).st_size, "checksum": digest}

    def commit(self, manifest: dict[str, Any]) -> Path:
        """Writes the manifest, fsyncs, switches the directory in; returns its path."""
        if self._open:
            raise RuntimeError(f"arrays still open: {sorted(self._open)}")
        body = {"format": FORMAT, "format_version": FORMAT_VERSION, **manifest, "arrays": self.arrays}
        body.pop("manifest_checksum", None)
        # A writer of one whole index (build, import) need not spell its single segment out.
        body.setdefault(
            "segments", [{"prefix": "", "n_docs": body.get("n_docs"), "n_tokens": body.get("n_tokens")}]
        )
        body["manifest_checksum"] = manifest_checksum(body)
        validate_manifest(body, str(self.dst / MANIFEST))  # never write what load would refuse
        with open(self.tmp / MANIFEST, "w") as f:
            json.dump(body, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.unlink(self.tmp / _MARKER)
        _fsync_dir(self.tmp)
        if not os.path.lexists(self.dst):
            os.rename(self.tmp, self.dst)
            _fsync_dir(self.dst.parent)
            return self.dst
        # Overwrite: one atomic exchange; the old index then sits at the tmp name until removed.
        if _exchange(self.tmp, self.dst):
            _fsync_dir(self.dst.parent)
            shutil.rmtree(self.tmp, ignore_errors=True)
            return self.dst
        # Fallback: two renames; a kill between them is repaired by recover() (.old- restored).
        old = self.dst.parent / f".{self.dst.name}.old-{uuid.uuid4().hex[:12]}"
        os.rename(self.dst, old)
        os.rename(self.tmp, self.dst)
        _fsync_dir(self.dst.parent)
        shutil.rmtree(old, ignore_errors=True)
        return self.dst


def rewrite_index(path: Path, manifest: Manifest, add: dict[str, np.ndarray] | None = None) -> Path:
    """A new version of the index at ``path`` in the current format: its arrays hard-linked from
    the open directory of ``manifest`` (nothing rewritten in place), ``add`` written beside them,
    a new checksummed manifest, switched in atomically like any write."""
    add = add or {}
    with IndexWriter(path, overwrite=True) as w:
        for name, meta in manifest["arrays"].items():
            if name not in add:
                w.link_array(manifest.dir, name, meta)
        for name, a in add.items():
            w.write_array(name, a)
        rest = {
            k: v
            for k, v in manifest.items()
            if k not in ("format", "format_version", "arrays", "manifest_checksum")
        }
        rest.setdefault("ids", "none")
        rest.setdefault("segments", segments_of(manifest))
        if manifest.get("metadata") is not None:
            w.link_file(manifest.dir, manifest["metadata"]["file"])
        w.carry_foreign(manifest.dir, manifest)
        return w.commit(rest)
