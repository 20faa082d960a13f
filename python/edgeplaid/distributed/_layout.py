"""A sharded index on disk: where each document lives, and the directory that holds the shards.

Layout of a sharded index directory::

    sharded.json       this file's manifest (written last, replaced atomically)
    codec/             the shared codec (edgeplaid.index._codec.Codec.save): trained once on a
                       sample of the whole corpus, so a document compresses alike in any shard
    shard-0000/ ...    one ordinary edgeplaid index directory per shard (Index.load opens one)

A document's shard is a stable hash of its id modulo the shard count (:func:`shard_of`):
splitmix64 of an int id, the first 8 bytes of the blake2b digest of a str id (the lexical side's
key, edgeplaid.index._lexical.str_key). Stable across processes, machines and versions, so
``add``/``delete``/``update`` route by id alone, and an id can live in one shard only.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgeplaid.index._build import mix64
from edgeplaid.index._lexical import keys_of_ids

MANIFEST = "sharded.json"
CODEC_DIR = "codec"
FORMAT = "edgeplaid-sharded"
VERSION = 1
MAX_SHARDS = 512  # a build keeps two spool files open per shard (within a 1,024-file ulimit)


class ShardedIndexError(ValueError):
    """A sharded index directory that is missing, incomplete or malformed."""


def shard_name(i: int) -> str:
    return f"shard-{i:04d}"


def is_sharded(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a sharded index directory (holds ``sharded.json``)."""
    return (Path(path) / MANIFEST).is_file()


def check_n_shards(n_shards: Any) -> int:
    if isinstance(n_shards, bool) or not isinstance(n_shards, (int, np.integer)):
        raise ValueError(f"n_shards: expected an int in [1, {MAX_SHARDS}], got {n_shards!r}")
    if not 1 <= int(n_shards) <= MAX_SHARDS:
        raise ValueError(f"n_shards: expected an int in [1, {MAX_SHARDS}], got {n_shards!r}")
    return int(n_shards)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 (one step of its generator from state x): the placement hash of int ids."""
    with np.errstate(over="ignore"):
        return mix64(x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15))


def shard_of(ids: Sequence[Any] | np.ndarray, id_kind: str, n_shards: int) -> np.ndarray:
    """(n,) int64 shard of each user id: a stable hash of the id modulo ``n_shards``.

    Args:
        ids: n user ids, all int (``id_kind="int"``) or all str (``"str"``).
    """
    ids = ids.tolist() if isinstance(ids, np.ndarray) else list(ids)
    if id_kind == "str":
        bad = next((i for i in ids if not isinstance(i, str)), None)
        if bad is not None:
            raise ValueError(f"ids: this index's ids are str, got {bad!r}")
        h = keys_of_ids(ids, "str").astype(np.uint64)  # blake2b, already mixed
    else:
        bad = next((i for i in ids if isinstance(i, bool) or not isinstance(i, (int, np.integer))), None)
        if bad is not None:
            raise ValueError(f"ids: this index's ids are int, got {bad!r}")
        h = _splitmix64(np.asarray(ids, dtype=np.int64).reshape(-1).view(np.uint64))
    return (h % np.uint64(n_shards)).astype(np.int64)


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The checked ``sharded.json`` of the sharded index at ``path``; ShardedIndexError naming
    the field otherwise."""
    p = Path(path) / MANIFEST
    try:
        m = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ShardedIndexError(f"{path}: not a sharded index (no {MANIFEST})") from None
    except (OSError, ValueError) as e:
        raise ShardedIndexError(f"{p}: unreadable ({e})") from e
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise ShardedIndexError(f"{p}: format: expected {FORMAT!r}")
    if m.get("version") != VERSION:
        raise ShardedIndexError(f"{p}: version: expected {VERSION}, got {m.get('version')!r}")
    try:
        n = check_n_shards(m.get("n_shards"))
    except ValueError as e:
        raise ShardedIndexError(f"{p}: {e}") from None
    if m.get("shards") != [shard_name(i) for i in range(n)]:
        raise ShardedIndexError(f"{p}: shards: expected {n} names shard-0000 ...")
    if m.get("id_kind") not in ("int", "str"):
        raise ShardedIndexError(f"{p}: id_kind: expected 'int' or 'str', got {m.get('id_kind')!r}")
    for key in ("dim", "nbits", "next_id"):
        v = m.get(key)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ShardedIndexError(f"{p}: {key}: expected a non-negative int, got {v!r}")
    for i in range(n):
        if not (Path(path) / shard_name(i)).is_dir():
            raise ShardedIndexError(f"{path}: {shard_name(i)}: missing shard directory")
    return m


def write_manifest(path: str | os.PathLike, m: dict[str, Any]) -> None:
    """Writes ``sharded.json`` aside, syncs it and renames it into place (atomic)."""
    p = Path(path) / MANIFEST
    tmp = p.with_name(f".{MANIFEST}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(m, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, p)


def new_manifest(
    n_shards: int, id_kind: str, dim: int, nbits: int, next_id: int, **more: Any
) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "version": VERSION,
        "n_shards": n_shards,
        "shards": [shard_name(i) for i in range(n_shards)],
        "placement": "int ids: splitmix64(id) mod n_shards; str ids: blake2b-8(utf-8)>>1 mod n_shards",
        "id_kind": id_kind,
        "dim": dim,
        "nbits": nbits,
        "next_id": next_id,
        **more,
    }
