"""Beyond one machine: sharded indexes searched by scatter-gather and batch encoding, on Ray.

Needs the ``distributed`` extra (``pip install -e ".[distributed]"``: Ray).

- :class:`ShardedIndex`: N ordinary index directories sharing one codec, documents placed by a
  stable hash of their id, one Ray actor per shard; same methods as :class:`edgeplaid.Index`.
- :func:`encode`: a corpus encoded by a pool of encoder actors (one model each), streamed in
  order with bounded memory into :meth:`ShardedIndex.build`.
"""

from edgeplaid.distributed._cluster import connect
from edgeplaid.distributed._encode import encode
from edgeplaid.distributed._layout import ShardedIndexError, is_sharded, shard_of
from edgeplaid.distributed._sharded import (
    ShardedIndex,
    ShardedSearchResult,
    ShardUnavailableError,
    merge_topk,
)

__all__ = [
    "ShardUnavailableError",
    "ShardedIndex",
    "ShardedIndexError",
    "ShardedSearchResult",
    "connect",
    "encode",
    "is_sharded",
    "merge_topk",
    "shard_of",
]
