"""The Ray actor that serves one shard: an ordinary :class:`edgeplaid.Index`, memory-mapped from
the shard's directory, searched and changed in the actor's process.

Results cross the process boundary as numpy arrays and lists (no torch tensors): scores
(nq, k) float32 and the user ids of each row. Everything else is ``Index``'s own code: a shard
checks its arguments as an index does, and its errors (ValueError, KeyError) reach the caller.
"""

from __future__ import annotations

import os
from typing import Any


class ShardActor:
    """One shard of a :class:`edgeplaid.distributed.ShardedIndex` (wrapped by ``ray.remote``).

    Args:
        directory: the shard's index directory.
        device: where it searches ("cpu", "cuda", ...; see ``Index.load``).
        threads: CPU kernel and torch threads of this process (None: leave the defaults).
    """

    def __init__(self, directory: str, device: str = "cpu", threads: int | None = None) -> None:
        import torch

        from edgeplaid import set_num_threads
        from edgeplaid.index import Index

        if threads is not None:
            set_num_threads(threads)
            torch.set_num_threads(threads)
        self.index = Index.load(directory, device=device)

    def pid(self) -> int:
        """The actor's process id (tests kill it; a restart gets a new one)."""
        return os.getpid()

    def info(self) -> dict[str, Any]:
        ix = self.index
        return {
            "n_docs": ix.n_docs,
            "n_tokens": ix.n_tokens,
            "n_centroids": ix.n_centroids,
            "dim": ix.dim,
            "nbits": ix.nbits,
            "has_lexical": ix.has_lexical,
            "has_metadata": ix.manifest.get("metadata") is not None,
            "segments": len(ix.segments),
            "nbytes": ix.nbytes(),
            "lexical_nbytes": ix.lexical_nbytes(),
            "device": str(ix.device),
            "rss_bytes": _rss_bytes(),
        }

    def search(
        self, exhaustive: bool, queries: Any, k: int, kwargs: dict[str, Any]
    ) -> tuple[Any, list[list[Any]]]:
        """(scores (nq, k) float32 numpy, user ids per row) of ``Index.search`` (or
        ``search_exhaustive``); rows shorter than k where the shard has fewer documents."""
        fn = self.index.search_exhaustive if exhaustive else self.index.search
        queries, kwargs = _writable(queries, kwargs)
        result = fn(queries, k, **kwargs)
        return result.scores.cpu().numpy(), result.user_ids

    def hybrid(self, queries: Any, k: int, kwargs: dict[str, Any]) -> list[tuple[list[Any], Any, Any]]:
        """``Index.hybrid_candidates``: each query's union with both sides' scores, unfused."""
        queries, kwargs = _writable(queries, kwargs)
        return self.index.hybrid_candidates(queries, k, **kwargs)

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """``Index.<method>(*args, **kwargs)`` for the changes and lookups (add, delete, update,
        upsert, set_metadata, compact, metadata, texts, select)."""
        if method not in _CALLS:
            raise ValueError(f"method: expected one of {sorted(_CALLS)}, got {method!r}")
        return getattr(self.index, method)(*args, **kwargs)

    def contains(self, ids: list[Any]) -> list[bool]:
        return [i in self.index for i in ids]


def _writable(queries: Any, kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """Arrays read from Ray's object store are read-only, which torch warns about: copies."""
    import numpy as np

    if isinstance(queries, np.ndarray) and not queries.flags.writeable:
        queries = queries.copy()
    mask = kwargs.get("queries_mask")
    if isinstance(mask, np.ndarray) and not mask.flags.writeable:
        kwargs = {**kwargs, "queries_mask": mask.copy()}
    return queries, kwargs


def _rss_bytes() -> int:
    """This process's resident memory now (VmRSS), 0 where /proc is absent."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


_CALLS = frozenset(
    {
        "add",
        "delete",
        "update",
        "upsert",
        "set_metadata",
        "compact",
        "metadata",
        "texts",
        "select",
    }
)
