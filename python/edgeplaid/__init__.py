"""edgeplaid: late-interaction (ColBERT) retrieval built on fused CPU and GPU kernels.

The encoder is :class:`edgeplaid.ColBERT` (:mod:`edgeplaid.model`); the kernels are in
:mod:`edgeplaid.ops`; every op has a pure-PyTorch twin in
:mod:`edgeplaid.ops.reference` and dispatches to C++ (CPU tensors) or Triton (CUDA tensors).
"""

import os as _os
import sys as _sys

# torch's OpenMP threads (libgomp) spin for milliseconds after every parallel region, on the cores
# edgeplaid's own kernel threads take next: encoding with precision "int8" (torch ops and C++
# kernels in turn) ran at 28.5 docs/s with the spinning and 37.7 without, on 2 cores, while
# torch's own fp32 encoding did not change (31.5 vs 32.2). libgomp reads the policy once, when
# torch is imported: set here only if torch is not imported yet and the user chose no policy.
if "torch" not in _sys.modules and not {"OMP_WAIT_POLICY", "GOMP_SPINCOUNT"} & set(_os.environ):
    _os.environ["OMP_WAIT_POLICY"] = "PASSIVE"

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
