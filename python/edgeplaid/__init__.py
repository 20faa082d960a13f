"""edgeplaid: late-interaction (ColBERT) retrieval built on fused CPU and GPU kernels.

The encoder is :class:`edgeplaid.ColBERT` (:mod:`edgeplaid.model`); the kernels are in
:mod:`edgeplaid.ops`; every op has a pure-PyTorch twin in
:mod:`edgeplaid.ops.reference` and dispatches to C++ (CPU tensors) or Triton (CUDA tensors).
"""

import os as _os
import sys as _sys

from edgeplaid._native import cpu_has_bf16 as _cpu_has_bf16  # no torch import

# torch's OpenMP threads (libgomp) spin after every parallel region, on the cores edgeplaid's own
# kernel threads take next (its C++ kernels run on their own thread pool). libgomp reads its policy
# once, when torch is imported: set here only if torch is not imported yet and the user chose no
# policy. Measured, encoding 200 SciFact abstracts with the default precision on 2 cores:
# * CPUs without native bf16 (default int8: torch ops and C++ kernels in turn): spinning stole
#   the int8 kernel's cores, PASSIVE (no spinning) 28.5 -> 37.7 docs/s on AMD; torch's own float32
#   encoding did not change (31.5 vs 32.2).
# * CPUs with native bf16 (default bf16: torch's matrix products, edgeplaid's attention and rotary
#   kernels): a short spin (GOMP_SPINCOUNT=20000) keeps the wake-ups between torch ops cheap and
#   frees the cores soon enough: 17m 150 docs/s with libgomp's default spin, 171 with PASSIVE,
#   175-197 with 20,000 (Xeon with AMX; 10,000-50,000 measured alike). On a Zen 4 (default int8
#   on a bf16 model) 20,000 and PASSIVE measured alike: 83-102 against 87-100 docs/s.
if "torch" not in _sys.modules and not {"OMP_WAIT_POLICY", "GOMP_SPINCOUNT"} & set(_os.environ):
    if _cpu_has_bf16():
        _os.environ["GOMP_SPINCOUNT"] = "20000"
    else:
        _os.environ["OMP_WAIT_POLICY"] = "PASSIVE"

# Only now what imports torch.
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
