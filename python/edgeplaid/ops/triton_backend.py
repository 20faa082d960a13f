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

from edgeplaid.ops.bundles import Candidates, Codec, CompressedDocs, PackedDocs, Queries, ids_of


def _call(op: str, args: tuple[Any, ...]) -> Any:
    launcher = getattr(importlib.import_module(f"edgeplaid.triton_kernels.{op}"), op)
    device = args[0].device
    if device.type != "cuda":  # CPU tensors: the Triton interpreter (TRITON_INTERPRET=1)
        return launcher(*args)
    with torch.cuda.device(device) if device.index is not None else contextlib.nullcontext():
        return launcher(*args)


def maxsim(*args: Any) -> Any:
    return _call("maxsim", args)


def maxsim_packed(q: Queries, docs: PackedDocs, cand: Candidates | None) -> Any:
    return _call("maxsim_packed", (q.data, docs.tokens, docs.offsets, ids_of(cand), q.mask))


def centroid_scores(q: Queries, centroids: torch.Tensor, n_probe: int) -> Any:
    return _call("centroid_scores", (q.data, centroids, n_probe, q.mask))


def decompress_residuals(codes: torch.Tensor, residuals: torch.Tensor, codec: Codec) -> Any:
    return _call(
        "decompress_residuals", (codes, residuals, codec.centroids, codec.bucket_weights, codec.nbits)
    )


def fused_decompress_maxsim(q: Queries, docs: CompressedDocs, codec: Codec, cand: Candidates | None) -> Any:
    args = (q.data, docs.codes, docs.residuals, docs.offsets, ids_of(cand))
    return _call(
        "fused_decompress_maxsim", (*args, codec.centroids, codec.bucket_weights, codec.nbits, q.mask)
    )


def centroid_interaction(
    centroid_scores: torch.Tensor,
    codes: torch.Tensor,
    doc_offsets: torch.Tensor,
    cand: Candidates | None,
    threshold: float | None,
    queries_mask: torch.Tensor | None,
) -> Any:
    return _call(
        "centroid_interaction", (centroid_scores, codes, doc_offsets, ids_of(cand), threshold, queries_mask)
    )
