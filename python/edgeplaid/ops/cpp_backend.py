"""What every op's ``cpp`` adapter shares: CPU tensors handed to ``edgeplaid._C`` as zero-copy
numpy views.

Each op's adapter lives beside the op (``ops/<op>.py``, ``_cpp``), so adding an op touches no
backend file. Queries (small) are widened to fp32 here; documents, centroids and codes cross in
their own dtype (bf16 as a uint16 view, named by :func:`dtype_name`) and are widened in registers
by the kernels.
"""

from __future__ import annotations

import numpy as np
import torch

from edgeplaid._native import C  # noqa: F401  (the adapters call C through this module)

_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def host(t: torch.Tensor | None) -> np.ndarray | None:
    """A CPU tensor as a numpy view (bf16 as its uint16 bit patterns); None stays None."""
    if t is None:
        return None
    if t.dtype == torch.bfloat16:
        return t.view(torch.uint16).numpy()
    return t.numpy()


def host_queries(queries: torch.Tensor) -> np.ndarray:
    """Queries as C-contiguous fp32 (a copy only when they are half precision or strided)."""
    return queries.float().contiguous().numpy()


def dtype_name(t: torch.Tensor) -> str:
    """The binding's name of a float tensor's dtype: "float32", "float16" or "bfloat16"."""
    return _DTYPE_NAMES[t.dtype]
