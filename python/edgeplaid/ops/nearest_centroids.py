"""nearest_centroids: each token's best centroids, searched coarse to fine (index building).

Scoring every token against every centroid costs O(n_tokens × n_centroids): at 65M tokens and
2^17 centroids, hours. Here the centroids are clustered once into groups (:func:`centroid_groups`);
a token is scored against the group centroids, then against the members of its ``n_probe`` best
groups, then (optionally) walks a neighbour graph of the centroids from its best ones (each step
scores one candidate's neighbours). Cost per token: n_groups + n_probe × n_centroids / n_groups
+ steps × degree dot products instead of n_centroids. One group probed (``n_groups=1``) is the
exhaustive search.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from edgeplaid.ops import _validate as v
from edgeplaid.ops import cpp_backend as cpp
from edgeplaid.ops import reference
from edgeplaid.ops.dispatch import register, resolve

LANES = reference.BLOCK_LANES  # centroids per block, dimension-major (kBlockLanes in csrc/cpu/ops.h)


@dataclass(frozen=True, eq=False)
class CentroidGroups:
    """Centroids laid out for :func:`nearest_centroids` (build with :func:`centroid_groups`).

    A *block* holds 16 rows dimension-major: ``blocks[b, d, l]`` is element d of row
    ``block_ids[b, l]``; a set of rows that is not a whole number of blocks is padded with lanes of
    id -1 (zero rows, never returned).

    Attributes:
        group_blocks: (ceil(n_groups / 16), dim, 16) float32, the group centroids.
        group_block_ids: (ceil(n_groups / 16), 16) int32 group ids.
        member_blocks: (n_blocks, dim, 16) float32, every centroid, group by group.
        member_block_ids: (n_blocks, 16) int32 centroid ids, ascending within a group.
        group_offsets: (n_groups + 1,) int64: group g is member blocks
            ``group_offsets[g] : group_offsets[g + 1]``.
        centroids: (n_centroids, dim) float32 rows, read by the walk.
        graph: (n_centroids, degree) int32 neighbour ids, best first, -1 = none; or None (no walk).
    """

    group_blocks: torch.Tensor
    group_block_ids: torch.Tensor
    member_blocks: torch.Tensor
    member_block_ids: torch.Tensor
    group_offsets: torch.Tensor
    centroids: torch.Tensor
    graph: torch.Tensor | None = None

    @property
    def n_groups(self) -> int:
        return self.group_offsets.shape[0] - 1

    @property
    def n_centroids(self) -> int:
        return self.centroids.shape[0]

    @property
    def dim(self) -> int:
        return self.centroids.shape[1]


def to_blocks(rows: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """rows (m, dim) float32 with ids (m,) -> blocks (ceil(m / 16), dim, 16) float32 and block ids
    (ceil(m / 16), 16) int32, the last block padded with id -1 lanes (zero rows)."""
    m, dim = rows.shape
    nb = -(-m // LANES)
    padded = np.zeros((nb * LANES, dim), dtype=np.float32)
    padded[:m] = rows
    pid = np.full(nb * LANES, -1, dtype=np.int32)
    pid[:m] = ids
    blocks = np.ascontiguousarray(padded.reshape(nb, LANES, dim).transpose(0, 2, 1))
    return blocks, pid.reshape(nb, LANES)


def grouped_layout(
    centroids: np.ndarray, group_of: np.ndarray, n_groups: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Member blocks (n_blocks, dim, 16) float32, their ids (n_blocks, 16) int32 and group_offsets
    (n_groups + 1,) int64 of centroids (C, dim) float32 in groups group_of (C,) or (C, s) in
    [0, n_groups) (a centroid in s groups): each group's ids ascending, padded to whole blocks with
    id -1 lanes (zero rows)."""
    if group_of.ndim == 2:  # centroid i in groups group_of[i, :]
        s = group_of.shape[1]
        member = np.repeat(np.arange(group_of.shape[0]), s)
        flat = group_of.reshape(-1)
        order = member[np.lexsort((member, flat))]
        group_of = flat
    else:
        order = np.argsort(group_of, kind="stable")
    count = np.bincount(group_of, minlength=n_groups).astype(np.int64)
    n_blocks = -(-count // LANES)
    offsets = np.zeros(n_groups + 1, dtype=np.int64)
    np.cumsum(n_blocks, out=offsets[1:])
    start = np.zeros(n_groups, dtype=np.int64)
    np.cumsum(count[:-1], out=start[1:])
    slot_group = np.repeat(np.arange(n_groups), n_blocks * LANES)
    j = np.arange(slot_group.shape[0]) - offsets[slot_group] * LANES
    real = j < count[slot_group]
    ids = np.where(real, order[start[slot_group] + np.minimum(j, count[slot_group] - 1)], -1)
    dim = centroids.shape[1]
    rows = np.where(real[:, None], centroids[np.maximum(ids, 0)], 0.0).astype(np.float32)
    blocks = rows.reshape(-1, LANES, dim).transpose(0, 2, 1)
    return (
        np.ascontiguousarray(blocks, dtype=np.float32),
        np.ascontiguousarray(ids.reshape(-1, LANES), dtype=np.int32),
        offsets,
    )


def exhaustive(rows: np.ndarray) -> CentroidGroups:
    """One group holding every row: nearest_centroids(..., n_probe=1) is then the exact search."""
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    m = rows.shape[0]
    gb, gi = to_blocks(rows[:1], np.zeros(1, dtype=np.int64))
    mb, mi, off = grouped_layout(rows, np.zeros(m, dtype=np.int64), 1)
    t = torch.from_numpy
    return CentroidGroups(t(gb), t(gi), t(mb), t(mi), t(off), t(rows))


def _spherical_kmeans(rows: np.ndarray, k: int, iters: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """k unit means of unit rows (m, dim) and the exact assignment (m,) int64 of rows to them."""
    rng = np.random.default_rng(seed)
    means = np.ascontiguousarray(rows[np.sort(rng.choice(rows.shape[0], size=k, replace=False))])
    x = torch.from_numpy(rows)
    for step in range(iters + 1):
        of = nearest_centroids(rows, exhaustive(means), 1)[1][:, 0].numpy()
        if step == iters:
            return means, of
        sums = torch.zeros(k, rows.shape[1]).index_add_(0, torch.from_numpy(of), x)
        norms = sums.norm(dim=1, keepdim=True)
        keep = (norms[:, 0] == 0).numpy()  # an empty group keeps its mean
        new = (sums / norms.clamp_min(1e-12)).numpy()
        new[keep] = means[keep]
        means = np.ascontiguousarray(new, dtype=np.float32)
    raise AssertionError  # pragma: no cover


def centroid_groups(
    centroids: Any,
    n_groups: int,
    *,
    degree: int = 32,
    graph_probe: int | None = None,
    iters: int = 4,
    seed: int = 0,
    spill: int = 1,
) -> CentroidGroups:
    """Clusters centroids (C, dim) float into ``n_groups`` groups for :func:`nearest_centroids`.

    The groups are spherical k-means of the centroids (``iters`` Lloyd iterations from
    ``n_groups`` distinct centroids picked by ``seed``, exact assignment; an empty group keeps
    its mean). With ``degree > 0`` each centroid also gets its ``degree`` nearest other centroids
    as graph neighbours: exact (O(C^2) dot products) unless ``graph_probe`` is given, then found by
    this same search with that many groups probed (cheaper, but a walk on an approximate graph
    measured a third less recall gain). ``spill > 1`` puts each centroid in its ``spill`` nearest
    groups (larger groups, better recall per probe). Deterministic for given inputs. Cost
    O(C × n_groups × iters) dot products, plus the graph's.
    """
    cents = v.float_tensor(centroids, "centroids", 2, "(n_centroids, dim)").float().contiguous().numpy()
    c = cents.shape[0]
    if isinstance(n_groups, bool) or not isinstance(n_groups, int) or not 1 <= n_groups <= max(c, 1):
        raise ValueError(f"n_groups: expected an int in [1, n_centroids={c}], got {n_groups!r}")
    if degree < 0:
        raise ValueError(f"degree: expected >= 0, got {degree}")
    if n_groups == 1:
        means, of = cents.mean(0, keepdims=True), np.zeros(c, dtype=np.int64)
    else:
        means, of = _spherical_kmeans(cents, n_groups, iters, seed)
    gb, gi = to_blocks(means.astype(np.float32), np.arange(n_groups))
    if spill > 1 and n_groups > 1:  # each centroid also joins its next best groups
        of = nearest_centroids(cents, exhaustive(means), 1, k=min(spill, n_groups))[1].numpy()
    mb, mi, off = grouped_layout(cents, of, n_groups)
    t = torch.from_numpy
    groups = CentroidGroups(t(gb), t(gi), t(mb), t(mi), t(off), t(cents))
    if degree == 0 or c < 2:
        return groups
    deg = min(degree, c - 1)
    if graph_probe is None:
        ids = nearest_centroids(cents, exhaustive(cents), 1, k=deg + 1)[1].numpy()
    else:
        ids = nearest_centroids(cents, groups, min(graph_probe, n_groups), k=deg + 1)[1].numpy()
    self_at = ids == np.arange(c)[:, None]
    self_at[~self_at.any(1), -1] = True  # a centroid that did not find itself drops its last
    graph = ids[~self_at].reshape(c, deg).astype(np.int32)
    return CentroidGroups(t(gb), t(gi), t(mb), t(mi), t(off), t(cents), t(np.ascontiguousarray(graph)))


def default_n_groups(n_centroids: int) -> int:
    """round(sqrt(8 × n_centroids)) groups (of sqrt(n_centroids / 8) centroids on average).

    Measured best for 16 to 32 probes at 2^14 to 2^16 k-means centroids: fewer, larger groups
    than the sqrt(n_probe × n_centroids) that balances the dot products of the two stages, because
    a large group is scored at a higher rate (its blocks serve more tokens per load) and loses less
    recall at its borders.
    """
    return max(1, min(n_centroids, round(math.sqrt(8 * n_centroids))))


def nearest_centroids(
    tokens: Any,
    groups: CentroidGroups,
    n_probe: int,
    k: int = 1,
    max_steps: int = 8,
    width: int = 1,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's k best centroids by inner product: ⟨tokens[t], centroids[c]⟩, score
    descending, ties to the lower id; searched in ``groups`` (see the module docstring).

    Steps: the token's ``n_probe`` best groups (by their centroids); the k best members of those
    groups; then, when ``groups.graph`` is set, a best-first walk of up to ``max_steps`` steps:
    each step scores the neighbours of the best-ranked of the first ``width`` candidates not
    expanded yet (they enter the list), until the first ``width`` are all expanded. Exact when
    every group is probed.
    Every score is a sequential fp32 FMA chain over the dimensions on every ISA.

    Args:
        tokens: (n, dim) float32, float16 or bfloat16 (CPU).
        groups: a :class:`CentroidGroups` of dim-wide centroids (trusted as built).
        n_probe: groups probed, 1 <= n_probe <= groups.n_groups.
        k: centroids returned per token (k >= 1).
        max_steps: walk steps at most (>= 0).
        width: candidates the walk expands from (>= 1; 1: from the best until it stays put).
        backend: "cpp" or "reference"; None picks by device.

    Returns:
        scores (n, k) float32 and ids (n, k) int64, best first; -inf / -1 past the distinct
        centroids scored.
    """
    x = v.float_tensor(tokens, "tokens", 2, "(n_tokens, dim)")
    v.check_size(x, "tokens", 1, groups.dim, "dim of the centroids")
    for name, val, low in (
        ("n_probe", n_probe, 1),
        ("k", k, 1),
        ("max_steps", max_steps, 0),
        ("width", width, 1),
    ):
        if isinstance(val, bool) or not isinstance(val, int) or val < low:
            raise ValueError(f"{name}: expected an int >= {low}, got {val!r}")
    if n_probe > groups.n_groups:
        raise ValueError(f"n_probe: expected <= n_groups={groups.n_groups}, got {n_probe}")
    return resolve("nearest_centroids", x.device, backend)(x, groups, n_probe, k, max_steps, width)


def _cpp(x: torch.Tensor, g: CentroidGroups, n_probe: int, k: int, max_steps: int, width: int):
    walk = g.graph is not None
    scores, ids = cpp.C.nearest_centroids(
        cpp.host(x),
        cpp.dtype_name(x),
        g.group_blocks.numpy(),
        g.group_block_ids.numpy(),
        g.member_blocks.numpy(),
        g.member_block_ids.numpy(),
        g.group_offsets.numpy(),
        g.centroids.numpy() if walk else None,
        g.graph.numpy() if walk else None,
        n_probe,
        k,
        max_steps,
        width,
    )
    return torch.from_numpy(scores), torch.from_numpy(ids)


def _reference(x: torch.Tensor, g: CentroidGroups, n_probe: int, k: int, max_steps: int, width: int):
    return reference.nearest_centroids(
        x,
        g.group_blocks,
        g.group_block_ids,
        g.member_blocks,
        g.member_block_ids,
        g.group_offsets,
        g.centroids,
        g.graph,
        n_probe,
        k,
        max_steps,
        width,
    )


register("nearest_centroids", "reference", _reference)
register("nearest_centroids", "cpp", _cpp)
