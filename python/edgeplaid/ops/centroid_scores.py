"""centroid_scores: PLAID stage 1, every query token against every centroid, with top-n_probe."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from edgeplaid.ops import _validate as v
from edgeplaid.ops import bundles as b
from edgeplaid.ops import cpp_backend as cpp
from edgeplaid.ops import reference, triton_backend
from edgeplaid.ops.dispatch import register, resolve

Pair = tuple[torch.Tensor, torch.Tensor]
Triple = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]


def centroid_scores(
    queries: Any,
    centroids: Any,
    n_probe: int,
    queries_mask: Any = None,
    backend: str | None = None,
    layout: str = "token",
    with_max: bool = False,
) -> tuple[torch.Tensor, ...]:
    """scores[q, i, c] = ⟨queries[q, i], centroids[c]⟩, and each token's n_probe best centroids.

    Args:
        queries: (nq, Lq, dim) float32, float16 or bfloat16.
        centroids: (C, dim) float32, float16 or bfloat16.
        n_probe: centroids kept per query token, 1 <= n_probe <= C.
        queries_mask: (nq, Lq) bool; masked tokens get scores 0 and ids -1.
        backend: "cpp", "triton" or "reference"; None picks by device.
        layout: "token" (scores (nq, Lq, C)) or "centroid": scores (nq, C, stride), stride = Lq
            rounded up to 16, lane j of a row the query's j-th valid token, the other lanes 0: the
            layout the C++ stages 2-4 read in place (wrap it as ``CentroidScores(scores,
            query_len=Lq)``). The cpp kernel writes it straight from its centroid-major tiles;
            other backends transpose.
        with_max: also return centroid_max (nq, C) float32, each centroid's best score over the
            query's valid tokens (-inf for a query without any): PLAID's pruning test (stage 2
            keeps centroid c when centroid_max[q, c] >= threshold). The cpp kernel takes it from
            each tile while the tile is in cache, so stage 2 never re-reads the table for it.

    ``queries`` may be a ``Queries`` bundle (mask inside) and ``centroids`` a ``Codec``.

    Returns:
        scores (nq, Lq, C) float32 and top_ids (nq, Lq, n_probe) int64, best first; ties go
        to the lower centroid id, so every backend returns the same ids; with ``with_max``, a
        third tensor, centroid_max.
    """
    q = b.queries(queries, queries_mask)
    dim = q.shape[2]
    if isinstance(centroids, b.Codec):
        cents = b.codec(centroids, dim=dim, device=q.device).centroids
    else:
        cents = v.float_tensor(centroids, "centroids", 2, "(n_centroids, dim)")
        v.check_size(cents, "centroids", 1, dim, "dim of queries")
        v.check_device("centroids", cents, q.device)
        v.check_finite(cents, "centroids")
    if isinstance(n_probe, bool) or not isinstance(n_probe, int) or not 1 <= n_probe <= cents.shape[0]:
        raise ValueError(f"n_probe: expected an int in [1, n_centroids={cents.shape[0]}], got {n_probe!r}")
    if layout not in ("token", "centroid"):
        raise ValueError(f"layout: expected 'token' or 'centroid', got {layout!r}")
    if not isinstance(with_max, bool):
        raise ValueError(f"with_max: expected a bool, got {with_max!r}")
    fn = resolve("centroid_scores", q.device, backend)
    scores, ids, cmax = fn(q, cents, n_probe, layout == "centroid", with_max)
    return (scores, ids, cmax) if with_max else (scores, ids)


def centroid_max(scores: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Token-major scores (nq, Lq, C) -> (nq, C): each centroid's best score over the valid
    tokens (mask (nq, Lq) bool or None), -inf where a query has none."""
    if mask is not None:
        scores = scores.masked_fill(~mask[..., None], float("-inf"))
    if scores.shape[1] == 0:
        return scores.new_full((scores.shape[0], scores.shape[2]), float("-inf"))
    return scores.amax(dim=1)


def _transposing(fn: Callable[..., Pair]) -> Callable[..., Triple]:
    """A backend that writes the token-major layout, giving the centroid-major one on request."""

    def run(
        q: b.Queries, centroids: torch.Tensor, n_probe: int, centroid_major: bool, with_max: bool
    ) -> Triple:
        scores, ids = fn(q, centroids, n_probe)
        cmax = centroid_max(scores, q.mask) if with_max else None
        return (b.centroid_major(scores, q.mask) if centroid_major else scores), ids, cmax

    return run


def _reference(q: b.Queries, centroids: torch.Tensor, n_probe: int) -> tuple[torch.Tensor, torch.Tensor]:
    return reference.centroid_scores(q.data, centroids, n_probe, q.mask)


def _cpp(q: b.Queries, centroids: torch.Tensor, n_probe: int, centroid_major: bool, with_max: bool) -> Triple:
    out = cpp.C.centroid_scores(
        cpp.host_queries(q.data),
        cpp.host(q.mask),
        cpp.host(centroids),
        cpp.dtype_name(centroids),
        int(n_probe),
        centroid_major=centroid_major,
        with_max=with_max and centroid_major,
    )
    scores, ids = torch.from_numpy(out[0]), torch.from_numpy(out[1])
    if not with_max:
        return scores, ids, None
    # the kernel gives the maxima with the centroid-major layout; the token-major one reduces here
    return scores, ids, torch.from_numpy(out[2]) if centroid_major else centroid_max(scores, q.mask)


def _triton(q: b.Queries, centroids: torch.Tensor, n_probe: int) -> Pair:
    return triton_backend.call("centroid_scores", q.data, centroids, n_probe, q.mask)


register("centroid_scores", "reference", _transposing(_reference))
register("centroid_scores", "cpp", _cpp)
register("centroid_scores", "triton", _transposing(_triton))
