"""PLAID index: k-means, residual codec, on-disk format (mmap), build, load, colbert-ai import."""

from edgeplaid.index._colbert import ColbertImportError
from edgeplaid.index._index import Index, SearchResult
from edgeplaid.index._metadata import WhereError
from edgeplaid.index._pooling import pool_tokens
from edgeplaid.index._storage import FORMAT_VERSION, IndexFormatError, IndexLockedError

__all__ = [
    "FORMAT_VERSION",
    "ColbertImportError",
    "Index",
    "IndexFormatError",
    "IndexLockedError",
    "SearchResult",
    "WhereError",
    "pool_tokens",
]
