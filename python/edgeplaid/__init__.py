"""edgeplaid: late-interaction (ColBERT) retrieval built on fused CPU and GPU kernels.

The encoder is :class:`edgeplaid.ColBERT` (:mod:`edgeplaid.model`); the kernels are in
:mod:`edgeplaid.ops`; every op has a pure-PyTorch twin in
:mod:`edgeplaid.ops.reference` and dispatches to C++ (CPU tensors) or Triton (CUDA tensors).
"""

from edgeplaid import ops
from edgeplaid._threads import get_num_threads, set_num_threads
from edgeplaid.index import Index, IndexFormatError
from edgeplaid.model import ColBERT  # cheap: transformers is imported on first from_pretrained
from edgeplaid.ops import available_backends
from edgeplaid.reranking import rerank

__version__ = "0.1.0"
__all__ = [
    "ColBERT",
    "Index",
    "IndexFormatError",
    "__version__",
    "available_backends",
    "get_num_threads",
    "ops",
    "rerank",
    "set_num_threads",
]
