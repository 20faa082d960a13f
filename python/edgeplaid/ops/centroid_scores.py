"""centroid_scores: PLAID stage 1, every query token against every centroid, with top-n_probe."""

from __future__ import annotations

import weakref
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
Int8Centroids = tuple[torch.Tensor, torch.Tensor]  # levels (2, C, dim4) int8, scales (C,) float32

# The int8 centroids' levels: 12 bits, L in [-LEVEL_RANGE, LEVEL_RANGE], split as L = 64 * hi + lo
# into two 7-bit halves, the residual levels' range in code_scoring.h (every ISA's integer tile:
# vpdpbusd, vpmaddubsw's pair sums, AVX2's sign trick, holds its sums exactly). 7-bit levels alone
# cost SciFact 0.009 of recall@10 against exhaustive search (stage 4 reads their scores); 12 bits
# leave recall and nDCG@10 where fp32 centroid scores put them (README).
LEVEL_SHIFT = 6
LEVEL_RANGE = 63 << LEVEL_SHIFT  # 4,032

# A Codec's int8 centroids, made once per codec (an index keeps its codec for its lifetime).
_QUANTISED: weakref.WeakKeyDictionary[b.Codec, Int8Centroids] = weakref.WeakKeyDictionary()


def quantise_centroids(centroids: Any) -> Int8Centroids:
    """Centroids -> stage 1's int8 form (``centroid_scores(..., precision="int8")``).

    scale_c = max_d |c_d| / 4032 (float32), L_cd = round(c_d / scale_c) (ties to even; 0 for a
    zero row), so c ~ L * scale to within scale / 2 an element; L = 64 * hi + lo with
    hi = round(L / 64) in [-63, 63] and lo in [-32, 32].

    Args:
        centroids: (C, dim) float32, float16 or bfloat16, or a ``Codec`` (then computed once and
            kept with it).

    Returns:
        levels (2, C, dim rounded up to 4) int8: hi then lo, zero past dim; scales (C,) float32.
    """
    if isinstance(centroids, b.Codec):
        cached = _QUANTISED.get(centroids)
        if cached is None:
            cached = _QUANTISED[centroids] = quantise_centroids(centroids.centroids)
        return cached
    cents = v.float_tensor(centroids, "centroids", 2, "(n_centroids, dim)")
    v.check_finite(cents, "centroids")
    n, dim = cents.shape
    levels = torch.zeros((2, n, (dim + 3) // 4 * 4), dtype=torch.int8, device=cents.device)
    scales = torch.zeros(n, dtype=torch.float32, device=cents.device)
    # In row chunks: fp32 temporaries of the whole (C, dim) matrix, several at once, stayed in the
    # process's resident memory after the call (+10 to +45 MB at 8,192 to 32,768 centroids).
    for r0 in range(0, n, 4096):
        c = cents[r0 : r0 + 4096].to(torch.float32, copy=True)  # worked on in place below
        sc = c.abs().amax(dim=1) / LEVEL_RANGE if dim else c.new_zeros(c.shape[0])
        level = c.div_(torch.where(sc > 0, sc, torch.ones_like(sc))[:, None]).round_()
        level.clamp_(-LEVEL_RANGE, LEVEL_RANGE)
        hi = torch.round(level / (1 << LEVEL_SHIFT))
        levels[0, r0 : r0 + 4096, :dim] = hi.to(torch.int8)
        levels[1, r0 : r0 + 4096, :dim] = level.sub_(hi.mul_(1 << LEVEL_SHIFT)).to(torch.int8)
        scales[r0 : r0 + 4096] = sc
    return levels, scales


def stage1_precision(precision: str, device: torch.device) -> str:
    """Stage 1's precision in a PLAID search at ``precision`` (stage 4's): "int8" where the int8
    products are the faster ones, on CPUs whose int8 kernels run AVX-512 VNNI (on the Zen 4,
    SciFact's stage 1 took 0.41 against 0.55 ms a query), else "exact": AVX2's and AVX-512BW's
    integer multiplies ran the two passes of 7-bit levels slower than fp32 FMAs (0.73-1.04 against
    0.66-0.78 ms, AVX2 forced on the Zen 4; README, "Which ISA each op runs")."""
    if precision != "int8" or device.type != "cpu" or cpp.C is None:
        return "exact"
    return "int8" if cpp.C.cpu_int8_isa() == "avx512vnni" else "exact"


def centroid_scores(
    queries: Any,
    centroids: Any,
    n_probe: int,
    queries_mask: Any = None,
    backend: str | None = None,
    layout: str = "token",
    with_max: bool = False,
    precision: str = "exact",
) -> tuple[torch.Tensor, ...]:
    """scores[q, i, c] = ⟨queries[q, i], centroids[c]⟩, and each token's n_probe best centroids.

    ``precision="exact"`` computes the products in fp32 (the AMX tiles' split bf16 products equal
    them to a few ulp). ``precision="int8"`` (cpp and reference backends: CPU) computes them in
    integers, each query token quantised as stage 4's int8 precision quantises it and the centroids
    to 12-bit levels by :func:`quantise_centroids` (once per ``Codec``)::

        qscale_i = max_d |q_id| / 127,  qq_id = round(q_id / qscale_i)
        scores[q, i, c] = float(Σ_d qq_id · L_cd) · (qscale_i · scale_c)

    The integer sum is exact, so every ISA (AVX-512 VNNI, AVX-512BW, AVX2, scalar) and the
    reference return the same scores bit for bit; they differ from the exact ones by ~1e-3 of a
    query token's norm times the centroid's (the query's 8 bits; SciFact's recall@10 and nDCG@10
    are those of exact scores: README).

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
        precision: "exact" or "int8" (above).

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
    b.precision(precision)
    int8 = None
    if precision == "int8":
        int8 = quantise_centroids(centroids if isinstance(centroids, b.Codec) else cents)
    fn = resolve("centroid_scores", q.device, backend)
    scores, ids, cmax = fn(q, cents, n_probe, layout == "centroid", with_max, int8)
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
        q: b.Queries,
        centroids: torch.Tensor,
        n_probe: int,
        centroid_major: bool,
        with_max: bool,
        int8: Int8Centroids | None,
    ) -> Triple:
        scores, ids = fn(q, centroids, n_probe, int8)
        cmax = centroid_max(scores, q.mask) if with_max else None
        return (b.centroid_major(scores, q.mask) if centroid_major else scores), ids, cmax

    return run


def _reference(q: b.Queries, centroids: torch.Tensor, n_probe: int, int8: Int8Centroids | None) -> Pair:
    if int8 is not None:
        return reference.centroid_scores_int8(q.data, *int8, n_probe, q.mask)
    return reference.centroid_scores(q.data, centroids, n_probe, q.mask)


def _cpp(
    q: b.Queries,
    centroids: torch.Tensor,
    n_probe: int,
    centroid_major: bool,
    with_max: bool,
    int8: Int8Centroids | None,
) -> Triple:
    out = cpp.C.centroid_scores(
        cpp.host_queries(q.data),
        cpp.host(q.mask),
        cpp.host(centroids),
        cpp.dtype_name(centroids),
        int(n_probe),
        centroid_major=centroid_major,
        with_max=with_max and centroid_major,
        precision="exact" if int8 is None else "int8",
        centroid_levels=None if int8 is None else cpp.host(int8[0]),
        centroid_scales=None if int8 is None else cpp.host(int8[1]),
    )
    scores, ids = torch.from_numpy(out[0]), torch.from_numpy(out[1])
    if not with_max:
        return scores, ids, None
    # the kernel gives the maxima with the centroid-major layout; the token-major one reduces here
    return scores, ids, torch.from_numpy(out[2]) if centroid_major else centroid_max(scores, q.mask)


def _triton(q: b.Queries, centroids: torch.Tensor, n_probe: int, int8: Int8Centroids | None) -> Pair:
    if int8 is not None:
        raise ValueError(
            "precision: 'int8' runs on the cpp and reference backends (CPU); use 'exact' on GPUs"
        )
    return triton_backend.call("centroid_scores", q.data, centroids, n_probe, q.mask)


register("centroid_scores", "reference", _transposing(_reference))
register("centroid_scores", "cpp", _cpp)
register("centroid_scores", "triton", _transposing(_triton))
