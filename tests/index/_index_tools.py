"""Helpers for the storage tests: copy an index, edit its manifest, re-sign its checksums."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgeplaid.index._storage import _hasher, manifest_checksum


def copy_index(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def resign(path: Path, arrays: bool = True) -> None:
    """Recomputes the checksums (every array's, then the manifest's) as a writer would: what a
    deliberate edit looks like, so the schema and the structural checks are what must catch it."""
    m = json.loads((path / "manifest.json").read_text())
    if arrays:
        for e in m["arrays"].values():
            if not isinstance(e, dict) or not isinstance(e.get("file"), str):
                continue
            f = path / e["file"]
            if f.is_file() and not f.is_symlink():
                algo = str(e.get("checksum", "xxh64:")).partition(":")[0]
                h = _hasher(algo if algo in ("xxh64", "blake2b") else "xxh64")
                h.update(f.read_bytes())
                e["checksum"] = f"{algo}:{h.hexdigest()}"
    if "manifest_checksum" in m:
        m["manifest_checksum"] = manifest_checksum(m)
    (path / "manifest.json").write_text(json.dumps(m, indent=1))


def edit_manifest(path: Path, edit: Callable[[dict[str, Any]], Any], sign: bool = True) -> None:
    m = json.loads((path / "manifest.json").read_text())
    edit(m)
    if sign and "manifest_checksum" in m:
        m["manifest_checksum"] = manifest_checksum(m)
    (path / "manifest.json").write_text(json.dumps(m, indent=1))
