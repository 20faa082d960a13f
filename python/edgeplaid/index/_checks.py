"""Load-time checks of an index's arrays: structure always, checksums by policy, one pass.

Every load reads each array but the residuals once, in 16 MiB blocks (never a whole array in
memory, never per query), and checks what a search relies on: finite centroids, bucket weights,
cutoffs (sorted) and average residual; codes below the centroid count; inv_norm positive and
finite; doclens non-negative and summing to n_tokens; the IVF a CSR over document positions
below n_docs, sorted and unique within each list; int ids unique; string ids valid UTF-8 cut at
character boundaries. The checksums of the arrays it reads are computed in the same pass, so
verifying them costs no extra read. The residuals (most of an index's bytes, any bit pattern
valid) are read only to verify their checksum: always with ``mmap=False`` (read whole anyway)
or ``verify=True``, by default while the index is at most :data:`AUTO_VERIFY_BYTES`, never with
``verify=False``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from edgeplaid.index._lexical import check_lexical_files, lexical_bytes
from edgeplaid.index._storage import (
    IndexFormatError,
    Manifest,
    _hasher,
    check_metadata_file,
    checksum_of,
    iter_array,
    read_manifest,
    recover,
    segments_of,
    tombstones_ok,
)

# Default verification hashes every array of an index up to this size (xxh64 runs at several
# GB/s: well under a second from the page cache); above it the residuals are left to verify=True,
# so that opening a memory-mapped index does not read all of it.
AUTO_VERIFY_BYTES = int(os.environ.get("EDGEPLAID_AUTO_VERIFY_BYTES", 1 << 30))

T = TypeVar("T")


def arrays_to_hash(manifest: dict[str, Any], mmap: bool, verify: bool | None) -> set[str]:
    """Names of the arrays whose checksums a load verifies (see the module docstring)."""
    names = set(manifest["arrays"])
    if verify is False:
        return set()
    total = sum(int(e["nbytes"]) for e in manifest["arrays"].values())
    total += int((manifest.get("metadata") or {}).get("nbytes", 0)) + lexical_bytes(manifest)
    if verify is True or not mmap or total <= AUTO_VERIFY_BYTES:
        return names
    return {n for n in names if not n.endswith("residuals")}


def check_arrays(path: Path, manifest: dict[str, Any], hash_names: set[str]) -> None:
    """Structural checks of every array (residuals: checksum only), checksums of ``hash_names``
    in the same pass; IndexFormatError naming the first problem."""
    m = manifest

    def scan(name: str, check: Callable[[int, np.ndarray], None] | None = None) -> None:
        h = None
        if name in hash_names:
            algo, digest = checksum_of(m, name)
            h = _hasher(algo)
        if h is None and check is None:
            return
        for start, raw, block in iter_array(path, m, name):
            if h is not None:
                h.update(raw)
            if check is not None:
                check(start, block)
        if h is not None and h.hexdigest() != digest:
            raise IndexFormatError(
                f"{path}: checksum mismatch in {m['arrays'][name]['file']} ({name}): the index is corrupt"
            )

    def bad(what: str) -> IndexFormatError:
        return IndexFormatError(f"{path}: {what}: the index is corrupt")

    def finite(name: str) -> Callable[[int, np.ndarray], None]:
        def check(_: int, b: np.ndarray) -> None:
            if not np.isfinite(b).all():
                raise bad(f"{name} holds NaN or infinite values")

        return check

    for name in ("centroids", "avg_residual", "bucket_weights"):
        scan(name, finite(name))

    def cutoffs(_: int, b: np.ndarray) -> None:
        finite("bucket_cutoffs")(0, b)
        if b.shape[0] > 1 and bool((b[1:] < b[:-1]).any()):
            raise bad("bucket_cutoffs are not sorted")

    scan("bucket_cutoffs", cutoffs)

    for seg in segments_of(m):
        _check_segment(path, m, seg, scan, bad)
    if m.get("n_deleted", 0):
        dele: list[np.ndarray] = []
        scan("deleted", lambda _, b: dele.append(b.copy()))
        d = np.concatenate(dele)
        if not tombstones_ok(d, m["n_docs"]):
            raise bad(f"deleted positions are not sorted, unique and below n_docs={m['n_docs']}")
    # The metadata file with the arrays: hashed when every array is (small, or verify=True).
    every = bool(hash_names) and hash_names == set(m["arrays"])
    check_metadata_file(path, m, hash=every)
    check_lexical_files(path, m, hash=every)  # type: ignore[arg-type]


def _check_segment(path: Path, m: dict[str, Any], seg: dict[str, Any], scan: Any, bad: Any) -> None:
    """One segment's arrays (see check_arrays); its IVF and ids are local to it."""
    p, nc = seg["prefix"], m["n_centroids"]
    n_docs, n_tokens = seg["n_docs"], seg["n_tokens"]

    def codes(_: int, b: np.ndarray) -> None:
        if b.shape[0] and (int(b.max()) >= nc or int(b.min()) < 0):
            raise bad(f"{p}codes outside [0, {nc})")

    scan(p + "codes", codes)
    if p + "inv_norm" in m["arrays"]:

        def inv_norm(_: int, b: np.ndarray) -> None:
            # NaN fails `> 0`; +inf is caught by isfinite
            if not ((b > 0).all() and np.isfinite(b).all()):
                raise bad("inv_norm values are not positive and finite")

        scan(p + "inv_norm", inv_norm)
    scan(p + "residuals")  # any bit pattern is a valid residual: checksum only (when asked)

    total = [0]

    def doclens(_: int, b: np.ndarray) -> None:
        if b.shape[0] and int(b.min()) < 0:
            raise bad("negative document length")
        total[0] += int(b.sum(dtype=np.int64))

    scan(p + "doclens", doclens)
    if total[0] != n_tokens:
        raise bad(f"{p}doclens sum to {total[0]}, not n_tokens={n_tokens}")

    offs: list[np.ndarray] = []
    scan(p + "ivf_offsets", lambda _, b: offs.append(b.copy()))
    io = np.concatenate(offs) if offs else np.zeros(0, np.int64)
    n_ivf = int(m["arrays"][p + "ivf_docs"]["shape"][0])
    if io[0] != 0 or io[-1] != n_ivf or bool((io[1:] < io[:-1]).any()):
        raise bad(f"IVF offsets are not a CSR over {n_ivf} entries")
    # positions where a new (non-empty) list starts: no order required across that boundary
    starts = np.unique(io[:-1][io[1:] > io[:-1]])
    prev = [None]

    def ivf_docs(s: int, b: np.ndarray) -> None:
        if not b.shape[0]:
            return
        if int(b.min()) < 0 or int(b.max()) >= n_docs:
            raise bad(f"IVF document positions outside [0, {n_docs})")
        v = b.astype(np.int64)
        if prev[0] is not None:
            v = np.concatenate([[prev[0]], v])
            first = s - 1
        else:
            first = s
        ok = v[1:] > v[:-1]  # ok[i]: element first + i + 1 follows its predecessor
        lo, hi = np.searchsorted(starts, [first + 1, first + v.shape[0]])
        ok[starts[lo:hi] - first - 1] = True
        if not ok.all():
            raise bad("IVF lists are not sorted and unique")
        prev[0] = int(b[-1])

    scan(p + "ivf_docs", ivf_docs)

    kind = m.get("ids", "none")
    if kind == "int":
        ids: list[np.ndarray] = []
        scan(p + "ids", lambda _, b: ids.append(b.copy()))
        a = np.concatenate(ids) if ids else np.zeros(0, np.int64)
        if np.unique(a).shape[0] != a.shape[0]:
            raise bad("duplicate document ids")
    elif kind == "str":
        so_parts: list[np.ndarray] = []
        scan(p + "ids_str_offsets", lambda _, b: so_parts.append(b.copy()))
        so = np.concatenate(so_parts)
        raw_parts: list[bytes] = []
        scan(p + "ids_str", lambda _, b: raw_parts.append(b.tobytes()))
        raw = b"".join(raw_parts)
        if so[0] != 0 or so[-1] != len(raw) or bool((so[1:] < so[:-1]).any()):
            raise bad("string id offsets are not monotone over the id bytes")
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise bad(f"string ids are not UTF-8 ({e.reason})") from e
        cut = so[(so > 0) & (so < len(raw))]
        if cut.shape[0] and bool(((np.frombuffer(raw, np.uint8)[cut] & 0xC0) == 0x80).any()):
            raise bad("string id offsets cut a UTF-8 character")


def open_checked(path: Path, mmap: bool, verify: bool | None, make: Callable[[Manifest], T]) -> T:
    """Reads the manifest of ``path``, checks the arrays, builds ``make(manifest)``.

    Finishes a killed writer's leftovers first (:func:`recover`). A load that races a writer
    replacing the index (its directory unlinked under it) starts again on the new version.
    """
    recover(path)
    for attempt in range(3):
        manifest = read_manifest(path)
        try:
            check_arrays(path, manifest, arrays_to_hash(manifest, mmap, verify))
            return make(manifest)
        except IndexFormatError:
            if attempt < 2 and manifest.dir.removed():
                continue
            raise
    raise AssertionError("unreachable")  # pragma: no cover
