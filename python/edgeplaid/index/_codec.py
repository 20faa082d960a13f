"""PLAID's k-means and residual codec (ColBERT's vocabulary: centroids, avg_residual,
bucket_cutoffs, bucket_weights, codes, residuals)."""

from __future__ import annotations

import math

import numpy as np
import torch

from edgeplaid.ops import reference
from edgeplaid.ops.compress_residuals import compress_residuals
from edgeplaid.ops.nearest_centroids import centroid_groups, default_n_groups, exhaustive, nearest_centroids

# Nearest-centroid search (edgeplaid.ops.nearest_centroids). Up to EXACT_MAX_CENTROIDS centroids
# every token is scored against every centroid; above, coarse to fine: the centroids are grouped
# into sqrt(8 C) groups (nearest_centroids.default_n_groups), a token scores the group centroids,
# then the members of its n_probe best groups. n_probe is tuned per index (Assigner.tune): the
# fewest probes of PROBE_LADDER whose recall of the exact nearest centroid on held-out sample
# tokens reaches RECALL_TARGET. Recall at 24 probes (k-means centroids, 20,000 held-out tokens):
# SciFact's MiniLM-48 tokens, 2^14 centroids, 0.9967; synthetic (benchmarks/_synthetic.py) 2^15
# 0.9978, 2^16 0.9990; 16 probes: 0.9956, -, 0.9972. The op's neighbour-graph walk reached the
# same recall with fewer probes but cost more than the probes it saved (scalar-chain dot products
# of gathered rows) plus an O(C^2) graph: the build does not walk. k-means iterations probe
# KMEANS_PROBE groups (Lloyd's means barely move for a near-nearest centroid).
EXACT_MAX_CENTROIDS = 4096
RECALL_TARGET = 0.995
PROBE_LADDER = (8, 12, 16, 24, 32, 48, 64, 96, 128)
TUNE_TOKENS = 10_000
KMEANS_PROBE = 8


def num_centroids(n_tokens: int) -> int:
    """ColBERT's choice: 2 ** floor(log2(16 * sqrt(n_tokens))), at most n_tokens."""
    if n_tokens <= 0:
        return 1
    c = int(2 ** math.floor(math.log2(16 * math.sqrt(n_tokens))))
    return max(1, min(c, n_tokens))


class Assigner:
    """Nearest centroid (max inner product, ties to the lower id) of token rows, for fixed centroids.

    Exhaustive up to EXACT_MAX_CENTROIDS centroids or with ``exact=True``, otherwise coarse to
    fine (see above) with ``n_probe`` probes (:meth:`tune` picks them).

    Args:
        centroids: (C, dim) float32 unit rows.
        n_probe: groups probed per token.
        seed: seed of the grouping's k-means.
    """

    def __init__(
        self, centroids: np.ndarray, *, exact: bool = False, n_probe: int = KMEANS_PROBE, seed: int = 0
    ) -> None:
        self.centroids = np.ascontiguousarray(centroids, dtype=np.float32)
        c = self.centroids.shape[0]
        self.exact = exact or c <= EXACT_MAX_CENTROIDS
        self.recall: float | None = None  # measured by tune()
        if self.exact:
            self.groups, self.n_probe = exhaustive(self.centroids), 1
        else:
            self.groups = centroid_groups(self.centroids, default_n_groups(c), degree=0, seed=seed)
            self.n_probe = min(n_probe, self.groups.n_groups)

    def tune(self, x: np.ndarray, target: float = RECALL_TARGET) -> float:
        """Sets n_probe to the fewest of PROBE_LADDER (then every group) whose recall of the exact
        nearest centroid on rows x (n, dim) float32 (the first TUNE_TOKENS) reaches ``target``;
        returns that recall. Exhaustive: 1.0."""
        if self.exact or x.shape[0] == 0:
            self.recall = 1.0
            return 1.0
        x = np.ascontiguousarray(x[:TUNE_TOKENS], dtype=np.float32)
        exact = nearest_centroids(x, exhaustive(self.centroids), 1)[1][:, 0].numpy()
        g = self.groups.n_groups
        for p in [q for q in PROBE_LADDER if q < g] + [g]:
            got = nearest_centroids(x, self.groups, p, max_steps=0)[1][:, 0].numpy()
            self.n_probe, self.recall = p, float(np.mean(got == exact))
            if self.recall >= target:
                break
        return self.recall

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """(n,) int64 centroid ids of rows x (n, dim) float32/float16."""
        if x.shape[0] == 0:
            return np.empty(0, dtype=np.int64)
        return nearest_centroids(x, self.groups, self.n_probe, max_steps=0)[1][:, 0].numpy()


def assign(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Exact nearest centroid (max inner product, ties to the lower id) of every row.

    Args:
        x: (n, dim) float32.
        centroids: (C, dim) float32.

    Returns:
        (n,) int64 centroid ids.
    """
    return Assigner(centroids, exact=True)(np.ascontiguousarray(x, dtype=np.float32))


def kmeans(sample: np.ndarray, k: int, iters: int = 4, seed: int = 0) -> np.ndarray:
    """Spherical k-means (inner-product assignment, normalised means), as ColBERT's centroids.

    Assignment is coarse to fine above EXACT_MAX_CENTROIDS centroids (Assigner, KMEANS_PROBE probes).

    Args:
        sample: (n, dim) float32 unit rows, n >= k.
        k: number of centroids.
        iters: Lloyd iterations after the initialisation (k distinct sample rows).
        seed: initialisation seed.

    Returns:
        (k, dim) float32 unit rows. An empty cluster keeps its previous centroid.
    """
    n, dim = sample.shape
    rng = np.random.default_rng(seed)
    cents = np.ascontiguousarray(sample[np.sort(rng.choice(n, size=k, replace=False))], dtype=np.float32)
    xs = torch.from_numpy(np.ascontiguousarray(sample, dtype=np.float32))
    for _ in range(iters):
        ids = torch.from_numpy(Assigner(cents, n_probe=KMEANS_PROBE, seed=seed)(xs.numpy()))
        sums = torch.zeros(k, dim, dtype=torch.float32).index_add_(0, ids, xs)
        counts = torch.bincount(ids, minlength=k)
        norms = sums.norm(dim=1, keepdim=True)
        new = sums / norms.clamp_min(1e-12)
        keep = (counts == 0) | (norms[:, 0] == 0)
        new[keep] = torch.from_numpy(cents)[keep]
        cents = new.numpy().astype(np.float32, copy=False)
    return np.ascontiguousarray(cents)


# How the residual buckets are fitted (Index.build's ``buckets``). "quantile" is colbert-ai's rule:
# 2**nbits equal-mass bins of the pooled residual values, each represented by its bin's median.
# Residuals peak sharply at 0 with long tails, so equal-mass bins spend most levels near 0 and
# leave the tails coarse. "lloyd_max" starts there and runs Lloyd's algorithm in one dimension
# (every value to its nearest level, each level to its values' mean) to the levels of least mean
# squared error. Same format, same kernels, same bytes; only the values of bucket_cutoffs and
# bucket_weights differ. SciFact (MiniLM-48, 2^14 centroids, nbits 4, held-out residuals): squared
# error per value 2.2e-4 -> 5.6e-5 (nbits 2: 9.1e-4 -> 6.4e-4); recall@10 against exact fp32 MaxSim
# 0.954 -> 0.974 for search_exhaustive, 0.950 -> 0.966 for PLAID search (benchmarks/bench_codec.py).
BUCKET_FITS = ("lloyd_max", "quantile")
DEFAULT_BUCKET_FIT = "lloyd_max"
LLOYD_MAX_ITERS = 1000
_FIT_MAX_VALUES = 8_000_000  # torch.quantile's input limit is 16M; a strided subsample is plenty


def check_bucket_fit(buckets: object) -> str:
    if buckets not in BUCKET_FITS:
        raise ValueError(f"buckets: expected one of {', '.join(map(repr, BUCKET_FITS))}, got {buckets!r}")
    return str(buckets)


def recorded_bucket_fit(manifest: dict) -> str | None:
    """The bucket fit an index's manifest records (``build.buckets``); None when it records none
    (an index from before the choice existed, or a colbert-ai import: both colbert-ai's quantiles)."""
    build = manifest.get("build")
    fit = build.get("buckets") if isinstance(build, dict) else None
    return fit if fit in BUCKET_FITS else None


def lloyd_max(values: np.ndarray, levels: np.ndarray, iters: int = LLOYD_MAX_ITERS) -> np.ndarray:
    """Scalar quantiser levels of least mean squared error (Lloyd's algorithm in one dimension).

    Each iteration puts every value in the cell of its nearest level (cutoffs at the midpoints of
    adjacent levels) and moves each level to its cell's mean; a cell left empty keeps its level.
    On sorted values a cell is a slice, so an iteration costs O(levels * log n) (prefix sums).

    Args:
        values: (n,) float, sorted ascending.
        levels: (b,) float, sorted ascending: the starting levels.
        iters: most iterations (it stops earlier once no level moves by more than 1e-9).

    Returns:
        (b,) float64 levels, sorted ascending.
    """
    v = np.asarray(values, dtype=np.float64)
    prefix = np.concatenate([[0.0], np.cumsum(v)])
    w = np.asarray(levels, dtype=np.float64).copy()
    for _ in range(iters):
        edges = np.concatenate([[0], np.searchsorted(v, (w[1:] + w[:-1]) / 2), [v.size]])
        count = np.diff(edges)
        mean = np.diff(prefix[edges]) / np.maximum(count, 1)
        new = np.where(count > 0, mean, w)
        new = np.maximum.accumulate(new)  # means of ordered cells are ordered; this guards rounding
        moved = float(np.max(np.abs(new - w))) if w.size else 0.0
        w = new
        if moved <= 1e-9:
            break
    return w


def fit_buckets(
    residuals: np.ndarray, nbits: int, method: str = DEFAULT_BUCKET_FIT
) -> tuple[float, np.ndarray, np.ndarray]:
    """The residual codec's buckets from held-out residuals (x - centroid[code]).

    ``"quantile"`` (colbert-ai's): bucket_cutoffs the quantiles i / 2**nbits of the pooled values,
    bucket_weights the quantiles (i + 0.5) / 2**nbits. ``"lloyd_max"``: weights refined from
    those by :func:`lloyd_max` to the least squared error, cutoffs the midpoints between adjacent
    weights (every value goes to its nearest weight).

    Args:
        residuals: (n, dim) float32.
        nbits: bits per dimension.
        method: one of BUCKET_FITS.

    Returns:
        avg_residual (float: mean |residual|), bucket_cutoffs (2**nbits - 1,) float32 and
        bucket_weights (2**nbits,) float32, both sorted ascending.
    """
    check_bucket_fit(method)
    r = torch.from_numpy(np.ascontiguousarray(residuals, dtype=np.float32)).flatten()
    if r.numel() > _FIT_MAX_VALUES:
        r = r[:: math.ceil(r.numel() / _FIT_MAX_VALUES)]
    if r.numel() == 0:
        r = torch.zeros(1)
    b = 1 << nbits
    q = torch.arange(b, dtype=torch.float32) / b
    cutoffs = torch.quantile(r, q[1:]).numpy().astype(np.float32)
    weights = torch.quantile(r, q + 0.5 / b).numpy().astype(np.float32)
    if method == "lloyd_max":
        w = snap_to_int8_levels(lloyd_max(np.sort(r.numpy()), weights))
        weights = w.astype(np.float32)
        cutoffs = ((w[1:] + w[:-1]) / 2).astype(np.float32)
    return float(r.abs().mean()), cutoffs, weights


def snap_to_int8_levels(weights: np.ndarray) -> np.ndarray:
    """Weights (b,) float64 moved to the nearest multiple of max |w| / LEVEL_RANGE: the grid on
    which fused_decompress_maxsim's int8 precision represents them (reference.
    quantise_bucket_weights), so int8 scoring uses the very weights the codes were chosen for.
    Lloyd-Max levels span twice colbert-ai's range (the tails get levels), which doubled the
    int8 rounding of each weight (up to 1.9e-3 on SciFact) and lowered PLAID search's recall@10
    against the index's exhaustive search from 0.988 to 0.984 (int8 last stage); snapped, the int8
    and exact scores agree on the residual term. The snap moves a weight by at most half a grid
    step (squared error +1.8% at nbits 4 on SciFact, +0.03% at nbits 2)."""
    amax = float(np.max(np.abs(weights))) if weights.size else 0.0
    if amax == 0.0:
        return weights
    step = amax / reference.LEVEL_RANGE
    return np.round(weights / step) * step


def pack_buckets(buckets: np.ndarray, nbits: int) -> np.ndarray:
    """Bucket indices (n, dim) uint8 -> packed residuals (n, dim * nbits / 8) uint8.

    Bit order of edgeplaid.ops (reference.pack_residuals): dimension d's index occupies bits
    [d * nbits, (d + 1) * nbits) of the row read as a little-endian bit string.
    """
    n, dim = buckets.shape
    per = 8 // nbits
    g = buckets.astype(np.uint8, copy=False).reshape(n, dim // per, per)
    out = np.zeros((n, dim // per), dtype=np.uint8)
    for j in range(per):
        out |= g[:, :, j] << np.uint8(j * nbits)
    return out


def compress(
    x: np.ndarray,
    centroids: np.ndarray,
    bucket_cutoffs: np.ndarray,
    bucket_weights: np.ndarray,
    nbits: int,
    assigner: Assigner | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """codes (n,) int64, packed residuals (n, dim * nbits / 8) uint8 and inv_norm (n,) float32 of
    rows x (n, dim) float32 (edgeplaid.ops.compress_residuals after the nearest centroid)."""
    codes = (assigner or Assigner(centroids))(x)
    res, inv = compress_residuals(
        torch.from_numpy(x),
        torch.from_numpy(codes),
        torch.from_numpy(np.ascontiguousarray(centroids, dtype=np.float32)),
        torch.from_numpy(np.ascontiguousarray(bucket_cutoffs, dtype=np.float32)),
        torch.from_numpy(np.ascontiguousarray(bucket_weights, dtype=np.float32)),
        nbits,
    )
    return codes, res.numpy(), inv.numpy()


def inv_norms(
    codes: np.ndarray, residuals: np.ndarray, centroids: np.ndarray, weights: np.ndarray, nbits: int
) -> np.ndarray:
    """(n,) float32 1 / ||centroids[code] + bucket_weights[residual buckets]||: stored per token for
    scoring from the codes (edgeplaid.ops.fused_decompress_maxsim). centroids as stored (fp16)
    widened to fp32, so the norm is that of the vector the kernels decompress; summed in the order
    of compress_residuals (what a build stores), in blocks of 2**16 tokens."""
    cents = torch.from_numpy(np.ascontiguousarray(centroids, dtype=np.float32))
    w = torch.from_numpy(np.ascontiguousarray(weights, dtype=np.float32))
    c = torch.from_numpy(np.ascontiguousarray(codes))
    r = torch.from_numpy(np.ascontiguousarray(residuals))
    reference.check_codes(c, cents.shape[0])
    out = np.empty(c.shape[0], dtype=np.float32)
    for b in range(0, c.shape[0], 1 << 16):
        v = cents[c[b : b + (1 << 16)].long()] + w[reference.unpack_residuals(r[b : b + (1 << 16)], nbits)]
        norm = reference._sum_squares16(v).double().sqrt().float().clamp_min(1e-12)
        out[b : b + v.shape[0]] = (1.0 / norm.double()).float().numpy()
    return out
