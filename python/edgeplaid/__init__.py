"""edgeplaid: late-interaction (ColBERT) retrieval built on fused CPU and GPU kernels.

The encoder is :class:`edgeplaid.ColBERT` (:mod:`edgeplaid.model`); the kernels are in
:mod:`edgeplaid.ops`; every op has a pure-PyTorch twin in
:mod:`edgeplaid.ops.reference` and dispatches to C++ (CPU tensors) or Triton (CUDA tensors).
"""

import os as _os
import sys as _sys


def _cpu_multiplies_bf16() -> bool:
    """AVX512-BF16 on this CPU, read through the C++ extension (which does not import torch)."""
    try:
        from edgeplaid import _C

        return bool(_C.cpu_info()["features"].get("avx512_bf16", False))
    except Exception:  # built without the extension: no int8 kernel either
        return False


# torch's OpenMP threads (libgomp) spin for milliseconds after every parallel region, on the cores
# edgeplaid's own kernel threads take next: encoding with precision "int8" (torch ops and C++
# kernels in turn) ran at 28.5 docs/s with the spinning and 37.7 without, on 2 AMD cores, while
# torch's own fp32 encoding did not change (31.5 vs 32.2). On CPUs with native bf16 the encoder's
# default precision is bf16, all torch ops, and there the spinning pays: 17m bf16 133.7 docs/s
# with libgomp's default against 111.1 with PASSIVE on 2 Xeon cores. libgomp reads the policy
# once, when torch is imported: set here only if torch is not imported yet, the user chose no
# policy and the default precision is not bf16.
if (
    "torch" not in _sys.modules
    and not {"OMP_WAIT_POLICY", "GOMP_SPINCOUNT"} & set(_os.environ)
    and not _cpu_multiplies_bf16()
):
    _os.environ["OMP_WAIT_POLICY"] = "PASSIVE"

from edgeplaid import ops  # noqa: E402 (after the OpenMP policy)
from edgeplaid._threads import get_num_threads, set_num_threads  # noqa: E402 (after the OpenMP policy)
from edgeplaid.index import Index, IndexFormatError  # noqa: E402 (after the OpenMP policy)
from edgeplaid.model import ColBERT  # noqa: E402 (cheap: transformers loads on first from_pretrained)
from edgeplaid.ops import available_backends  # noqa: E402 (after the OpenMP policy)
from edgeplaid.reranking import rerank  # noqa: E402 (after the OpenMP policy)

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
