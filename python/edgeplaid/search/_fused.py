"""PLAID's CPU pipeline for a batch of queries in one C++ call (``edgeplaid._C.plaid_search``).

The staged pipeline of :meth:`PlaidSearcher.search` calls three ops (``centroid_scores``,
``centroid_interaction_topk``, ``fused_decompress_maxsim``) and selects the top k in numpy; on
SciFact one query at a time, their Python (conversions, checks, bundles, selections) was ~0.1-0.2
ms of a ~1 ms query on 2 cores. This op runs the same three kernels and the same selection in one
crossing: one query alone with each stage spread over the kernel threads, several queries one a
thread (every stage inline on it, its table in that core's cache; batched SciFact on the Zen 4
+28-45% against blocks of 8 with each stage spread, README). Its twin is the staged pipeline
itself, which every other backend runs (this op has a ``cpp`` implementation only;
:func:`edgeplaid.ops.dispatch.implements` asks for it by capability) and which the tests compare
it with, result for result.
"""

from __future__ import annotations

import weakref
from typing import Any

import numpy as np
import torch

from edgeplaid.ops import bundles as b
from edgeplaid.ops import cpp_backend as cpp
from edgeplaid.ops.centroid_scores import quantise_centroids, stage1_precision
from edgeplaid.ops.dispatch import register

# The index's arrays as numpy views, made once per bundle: torch's .numpy() on the ten of them
# cost ~16 us of a ~1 ms one-query search (the Python around the call was ~110 us in all).
_HOST: weakref.WeakKeyDictionary[Any, tuple[tuple, tuple]] = weakref.WeakKeyDictionary()


def _host_views(owner: Any, *tensors: torch.Tensor | None) -> tuple[np.ndarray | None, ...]:
    """cpp.host of each tensor, kept with ``owner`` (a bundle) while it holds the same tensors."""
    got = _HOST.get(owner)
    if got is None or any(a is not t for a, t in zip(got[0], tensors, strict=True)):
        got = _HOST[owner] = (tensors, tuple(cpp.host(t) for t in tensors))
    return got[1]


def _cpp(
    q: b.Queries,
    codec: b.Codec,
    docs: b.CompressedDocs,
    ivf_offsets: torch.Tensor,
    ivf_docs: torch.Tensor,
    live: torch.Tensor | None,
    n_probe: int,
    threshold: float | None,
    n_candidates: int,
    precision: str,
    k: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q: (nq, Lq, dim) queries with their mask; the index's codec, documents (one part: global
    positions are local ones), IVF (offsets (C + 1,) int64, docs (n_entries,) int32) and live
    documents ((nd,) bool or None) -> scores (nq, k) float32 best first, ids (nq, k) int64 document
    positions (-inf / -1 past each query's scored documents). precision: stage 4's; stage 1's
    follows (stage1_precision: the int8 centroids are passed where it is int8)."""
    int8_stage1 = stage1_precision(precision, codec.centroids.device) == "int8"
    levels, scales = quantise_centroids(codec) if int8_stage1 else (None, None)
    centroids, weights, c_levels, c_scales = _host_views(
        codec, codec.centroids, codec.bucket_weights, levels, scales
    )
    codes, offsets, residuals, inv_norm, ivf_o, ivf_d = _host_views(
        docs, docs.codes, docs.offsets, docs.residuals, docs.inv_norm, ivf_offsets, ivf_docs
    )
    scores, ids = cpp.C.plaid_search(
        cpp.host_queries(q.data),
        cpp.host(q.mask),
        centroids,
        cpp.dtype_name(codec.centroids),
        n_probe,
        codes,
        offsets,
        residuals,
        inv_norm,
        ivf_o,
        ivf_d,
        cpp.host(live),
        weights,
        codec.nbits,
        threshold,
        n_candidates,
        precision,
        k,
        centroid_levels=c_levels,
        centroid_scales=c_scales,
    )
    return torch.from_numpy(scores), torch.from_numpy(ids)


register("plaid_search", "cpp", _cpp)
