"""What every op's ``triton`` adapter shares: lazy entry into ``edgeplaid.triton_kernels``.

Nothing here imports triton until an op runs on this backend, so ``import edgeplaid`` works
on CPU-only installs without the ``gpu`` extra (dispatch reports triton as unavailable
there). Each op's adapter lives beside the op (``ops/<op>.py``, ``_triton``) and hands its
launcher tensors already checked by the op; this layer only makes the tensors' GPU the current
device (Triton launches on the current one).
"""

from __future__ import annotations

import contextlib
import importlib
from typing import Any

import torch


def call(op: str, *args: Any) -> Any:
    """``edgeplaid.triton_kernels.<op>.<op>(*args)`` on the device of ``args[0]``."""
    launcher = getattr(importlib.import_module(f"edgeplaid.triton_kernels.{op}"), op)
    device = args[0].device
    if device.type != "cuda":  # CPU tensors: the Triton interpreter (TRITON_INTERPRET=1)
        return launcher(*args)
    with torch.cuda.device(device) if device.index is not None else contextlib.nullcontext():
        return launcher(*args)
