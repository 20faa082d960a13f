"""edgeplaid: late-interaction (ColBERT) retrieval built on fused CPU and GPU kernels.

The kernels are in :mod:`edgeplaid.ops`; every op has a pure-PyTorch twin in
:mod:`edgeplaid.ops.reference` and dispatches to C++ (CPU tensors) or Triton (CUDA tensors).
"""

from edgeplaid import ops
from edgeplaid._threads import get_num_threads, set_num_threads
from edgeplaid.ops import available_backends

__version__ = "0.1.0"
__all__ = ["__version__", "available_backends", "get_num_threads", "ops", "set_num_threads"]
