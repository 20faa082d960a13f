"""edgeplaid's on-disk index format: a versioned JSON manifest + flat little-endian arrays.

Layout of an index directory::

    manifest.json        {"format": "edgeplaid-plaid", "format_version": 2, "dim", "nbits", counts,
                          "arrays": {name: {"file", "dtype", "shape", "nbytes", "checksum"}}, ...}
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

Every array file is raw little-endian data, nothing else, so it maps with ``numpy.memmap``. Writes
are atomic: the directory is written beside its destination, every file fsynced, then renamed into
place. On load the manifest and every file's size are always checked (cheap); the checksums
(xxh64 when ``xxhash`` is installed, else blake2b) are verified only on request
(``verify=True`` / :meth:`Index.verify`), because hashing a multi-GB memory map on every load
would read all of it and defeat the map.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = "edgeplaid-plaid"
# 2 adds inv_norm (n_tokens,) <f4. Version 1 indexes still load: inv_norm is then computed on load,
# or written once by Index.upgrade().
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
MANIFEST = "manifest.json"

try:  # xxh64 is ~10x faster than blake2b; both are stable across platforms
    import xxhash

    CHECKSUM_ALGO = "xxh64"
except ImportError:  # pragma: no cover - depends on the environment
    xxhash = None
    CHECKSUM_ALGO = "blake2b"


class IndexFormatError(ValueError):
    """A truncated, corrupt, mismatched or unsupported index directory."""


def _hasher(algo: str):
    if algo == "xxh64":
        if xxhash is None:
            raise IndexFormatError("the index was checksummed with xxh64 but xxhash is not installed")
        return xxhash.xxh64()
    if algo == "blake2b":
        return hashlib.blake2b(digest_size=16)
    raise IndexFormatError(f"unknown checksum algorithm {algo!r}")


def checksum_file(path: Path, algo: str = CHECKSUM_ALGO, chunk: int = 1 << 24) -> str:
    """Hex digest of a file's bytes, read in 16 MiB chunks."""
    h = _hasher(algo)
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class IndexWriter:
    """Writes one index directory aside (``<dst>.tmp-<uuid>``) and renames it into place.

    Use as a context manager: on an exception the partial directory is removed and the
    destination is left as it was.
    """

    def __init__(self, dst: str | os.PathLike, overwrite: bool = False) -> None:
        self.dst = Path(dst)
        if self.dst.exists() and not overwrite:
            raise FileExistsError(f"{self.dst} exists (pass overwrite=True to replace it)")
        self.dst.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.dst.parent / f".{self.dst.name}.tmp-{uuid.uuid4().hex[:12]}"
        self.tmp.mkdir()
        self.arrays: dict[str, dict[str, Any]] = {}
        self._open: dict[str, Any] = {}

    def __enter__(self) -> IndexWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        for f in self._open.values():
            f.close()
        if exc_type is not None or self.tmp.exists():
            shutil.rmtree(self.tmp, ignore_errors=True)

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

    def commit(self, manifest: dict[str, Any]) -> Path:
        """Writes the manifest, fsyncs, renames the directory into place; returns its path."""
        if self._open:
            raise RuntimeError(f"arrays still open: {sorted(self._open)}")
        body = {"format": FORMAT, "format_version": FORMAT_VERSION, **manifest, "arrays": self.arrays}
        with open(self.tmp / MANIFEST, "w") as f:
            json.dump(body, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(self.tmp)
        old = None
        if self.dst.exists():  # overwrite: move the old index aside first, drop it after the rename
            old = self.dst.parent / f".{self.dst.name}.old-{uuid.uuid4().hex[:12]}"
            os.rename(self.dst, old)
        os.rename(self.tmp, self.dst)
        _fsync_dir(self.dst.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.dst


def add_array(path: Path, manifest: dict[str, Any], name: str, array: np.ndarray) -> dict[str, Any]:
    """Adds array ``name`` to the index at ``path`` in place and moves its manifest to the current
    format version; returns the new manifest. Crash-safe: the file is written aside, fsynced and
    renamed, then the manifest likewise; until the manifest's rename the index reads as before."""
    a = np.ascontiguousarray(array)
    a = a.astype(a.dtype.newbyteorder("<"), copy=False)
    file = f"{name}.bin"
    tmp = path / f".{file}.tmp-{uuid.uuid4().hex[:12]}"
    h = _hasher(CHECKSUM_ALGO)
    with open(tmp, "wb") as f:
        data = a.tobytes()
        f.write(data)
        h.update(data)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, path / file)
    body = dict(manifest)
    body["arrays"] = {
        **manifest["arrays"],
        name: {
            "file": file,
            "dtype": a.dtype.str,
            "shape": list(a.shape),
            "nbytes": int(a.nbytes),
            "checksum": f"{CHECKSUM_ALGO}:{h.hexdigest()}",
        },
    }
    body["format_version"] = FORMAT_VERSION
    mtmp = path / f".{MANIFEST}.tmp-{uuid.uuid4().hex[:12]}"
    with open(mtmp, "w") as f:
        json.dump(body, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.rename(mtmp, path / MANIFEST)
    _fsync_dir(path)
    return body


def read_manifest(path: Path) -> dict[str, Any]:
    """The parsed manifest of the index at ``path``; IndexFormatError when absent or unreadable."""
    mpath = path / MANIFEST
    if not path.is_dir():
        raise IndexFormatError(f"{path}: not an index directory")
    if not mpath.exists():
        raise IndexFormatError(f"{path}: no {MANIFEST} (not an edgeplaid index, or an interrupted write)")
    try:
        manifest = json.loads(mpath.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise IndexFormatError(f"{mpath}: unreadable manifest ({e})") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise IndexFormatError(
            f"{mpath}: not an edgeplaid index manifest (format {manifest.get('format')!r})"
        )
    version = manifest.get("format_version")
    if version not in READABLE_VERSIONS:
        raise IndexFormatError(
            f"{mpath}: format_version {version!r} is not supported (this edgeplaid reads "
            f"{', '.join(map(str, READABLE_VERSIONS))})"
        )
    for key in ("dim", "nbits", "n_docs", "n_tokens", "n_centroids", "arrays"):
        if key not in manifest:
            raise IndexFormatError(f"{mpath}: manifest lacks {key!r}")
    return manifest


def open_array(path: Path, manifest: dict[str, Any], name: str, mmap: bool) -> np.ndarray:
    """Array ``name`` of the index, memory-mapped read-only (or read into memory).

    Checks the manifest entry against the file's size; IndexFormatError on any mismatch.
    """
    meta = manifest["arrays"].get(name)
    if meta is None:
        raise IndexFormatError(f"{path}: manifest has no array {name!r}")
    try:
        dt = np.dtype(meta["dtype"])
        shape = tuple(int(s) for s in meta["shape"])
        file = path / meta["file"]
    except (KeyError, TypeError, ValueError) as e:
        raise IndexFormatError(f"{path}: bad manifest entry for {name!r} ({e})") from e
    if dt.byteorder == ">" or (dt.byteorder == "=" and np.little_endian is False):
        raise IndexFormatError(f"{path}: {name} is not little-endian ({meta['dtype']})")
    want = dt.itemsize * int(np.prod(shape))
    if not file.exists():
        raise IndexFormatError(f"{path}: missing file {meta['file']} ({name})")
    size = file.stat().st_size
    if size != want or int(meta.get("nbytes", want)) != want:
        raise IndexFormatError(
            f"{path}: {meta['file']} has {size} bytes, expected {want} ({name} {meta['dtype']} {shape}); "
            "the index is truncated or corrupt"
        )
    if want == 0:
        return np.zeros(shape, dtype=dt)
    if mmap:
        # copy-on-write: read-only in practice, writable for torch.from_numpy (no warning)
        return np.memmap(file, dtype=dt, mode="c", shape=shape)
    return np.fromfile(file, dtype=dt).reshape(shape)


def verify_checksums(path: Path, manifest: dict[str, Any]) -> None:
    """Hashes every array file and compares with the manifest; IndexFormatError on a mismatch."""
    for name, meta in manifest["arrays"].items():
        algo, _, digest = str(meta.get("checksum", "")).partition(":")
        got = checksum_file(path / meta["file"], algo)
        if got != digest:
            raise IndexFormatError(
                f"{path}: checksum mismatch in {meta['file']} ({name}): the index is corrupt"
            )
