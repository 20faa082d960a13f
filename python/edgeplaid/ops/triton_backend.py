"""The ``triton`` backend: lazy entry points into ``edgeplaid.triton_kernels``.

Nothing here imports triton until an op runs on this backend, so ``import edgeplaid`` works
on CPU-only installs without the ``gpu`` extra (dispatch reports triton as unavailable
there). The launchers receive tensors already checked by ``edgeplaid.ops._validate``; this
layer only makes the tensors' GPU the current device (Triton launches on the current one).
"""

from __future__ import annotations

import contextlib
import importlib
from typing import Any

import torch


def _call(op: str, args: tuple[Any, ...]) -> Any:
    launcher = getattr(importlib.import_module(f"edgeplaid.triton_kernels.{op}"), op)
    device = args[0].device
    if device.type != "cuda":  # CPU tensors: the Triton interpreter (TRITON_INTERPRET=1)
        return launcher(*args)
    with torch.cuda.device(device) if device.index is not None else contextlib.nullcontext():
        return launcher(*args)


def maxsim(*args: Any) -> Any:
    return _call("maxsim", args)


def maxsim_packed(*args: Any) -> Any:
    return _call("maxsim_packed", args)


def centroid_scores(*args: Any) -> Any:
    return _call("centroid_scores", args)


def decompress_residuals(*args: Any) -> Any:
    return _call("decompress_residuals", args)


def fused_decompress_maxsim(*args: Any) -> Any:
    return _call("fused_decompress_maxsim", args)


def centroid_interaction(*args: Any) -> Any:
    return _call("centroid_interaction", args)
