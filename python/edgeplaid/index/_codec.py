"""PLAID's k-means and residual codec (ColBERT's vocabulary: centroids, avg_residual,
bucket_cutoffs, bucket_weights, codes, residuals)."""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

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


@dataclass(frozen=True)
class Codec:
    """A trained PLAID codec: what compresses a token (nearest centroid, residual buckets) and what
    decompresses it. A build trains one (:func:`train_codec`); the shards of a sharded index
    (:mod:`edgeplaid.distributed`) share one, trained once on a sample of the whole corpus, so
    that a document compresses to the same codes and residuals in whichever shard it lives and
    the shards' scores are comparable.

    Attributes:
        centroids: (n_centroids, dim) float32 unit rows, exactly representable in fp16 (the index
            stores them as fp16; residuals are taken against these values).
        avg_residual: mean |residual| of the held-out tokens (float).
        bucket_cutoffs: (2**nbits - 1,) float32 ascending; bucket_weights: (2**nbits,) float32.
        nbits: residual bits per dimension; buckets: the fit that made them (BUCKET_FITS).
        kmeans_iters, kmeans_sample, seed: how the centroids were trained (recorded).
        n_probe, recall: the nearest-centroid search's probes (:meth:`Assigner.tune`) and the
            recall it measured (1.0 when exhaustive).
    """

    centroids: np.ndarray
    avg_residual: float
    bucket_cutoffs: np.ndarray
    bucket_weights: np.ndarray
    nbits: int
    buckets: str
    kmeans_iters: int
    kmeans_sample: int
    seed: int
    n_probe: int
    recall: float | None

    @property
    def dim(self) -> int:
        return int(self.centroids.shape[1])

    @property
    def n_centroids(self) -> int:
        return int(self.centroids.shape[0])

    def assigner(self) -> Assigner:
        """The nearest-centroid search the codec was tuned with (same groups, same probes: the
        grouping is deterministic for given centroids and seed)."""
        a = Assigner(self.centroids, seed=self.seed)
        if not a.exact:
            a.n_probe = min(self.n_probe, a.groups.n_groups)
        a.recall = self.recall
        return a

    def save(self, directory: str | os.PathLike) -> None:
        """Writes ``codec.npz`` and ``codec.json`` into ``directory`` (each written aside and
        renamed into place)."""
        d = Path(directory)
        arrays = {
            "centroids": self.centroids.astype(np.float16),
            "bucket_cutoffs": self.bucket_cutoffs.astype(np.float32),
            "bucket_weights": self.bucket_weights.astype(np.float32),
        }
        tmp = d / "codec.npz.tmp"
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, d / "codec.npz")
        info = {
            "avg_residual": self.avg_residual,
            "nbits": self.nbits,
            "buckets": self.buckets,
            "kmeans_iters": self.kmeans_iters,
            "kmeans_sample": self.kmeans_sample,
            "seed": self.seed,
            "n_probe": self.n_probe,
            "recall": self.recall,
        }
        (d / "codec.json.tmp").write_text(json.dumps(info, indent=1))
        os.replace(d / "codec.json.tmp", d / "codec.json")

    @classmethod
    def load(cls, directory: str | os.PathLike) -> Codec:
        """Reads what :meth:`save` wrote; ValueError naming the file and field on anything
        malformed."""
        d = Path(directory)
        try:
            info = json.loads((d / "codec.json").read_text())
            with np.load(d / "codec.npz", allow_pickle=False) as z:
                cents = z["centroids"].astype(np.float32)
                cutoffs, weights = z["bucket_cutoffs"], z["bucket_weights"]
        except (OSError, ValueError, KeyError) as e:
            raise ValueError(f"{d}: unreadable codec ({e})") from e
        nbits = info.get("nbits")
        if nbits not in (1, 2, 4, 8):
            raise ValueError(f"{d / 'codec.json'}: nbits: expected 1, 2, 4 or 8, got {nbits!r}")
        b = 1 << nbits
        if cents.ndim != 2 or cents.shape[0] < 1 or not np.isfinite(cents).all():
            raise ValueError(f"{d / 'codec.npz'}: centroids: expected finite (n_centroids, dim)")
        if cutoffs.shape != (b - 1,) or weights.shape != (b,):
            raise ValueError(f"{d / 'codec.npz'}: buckets: expected {b - 1} cutoffs and {b} weights")
        if not (np.isfinite(cutoffs).all() and np.isfinite(weights).all()):
            raise ValueError(f"{d / 'codec.npz'}: buckets: non-finite values")
        check_bucket_fit(info.get("buckets"))
        return cls(
            centroids=np.ascontiguousarray(cents),
            avg_residual=float(info["avg_residual"]),
            bucket_cutoffs=cutoffs.astype(np.float32),
            bucket_weights=weights.astype(np.float32),
            nbits=int(nbits),
            buckets=str(info["buckets"]),
            kmeans_iters=int(info["kmeans_iters"]),
            kmeans_sample=int(info["kmeans_sample"]),
            seed=int(info["seed"]),
            n_probe=int(info["n_probe"]),
            recall=None if info.get("recall") is None else float(info["recall"]),
        )


def train_codec(
    sample: np.ndarray,
    n_tokens: int,
    nbits: int,
    *,
    n_centroids: int | None = None,
    kmeans_iters: int = 4,
    sample_per_centroid: int = 16,
    seed: int = 0,
    buckets: str = DEFAULT_BUCKET_FIT,
) -> tuple[Codec, Assigner, dict[str, float]]:
    """Trains a codec on a corpus sample: k-means on the first tokens, the nearest-centroid search
    tuned and the residual buckets fitted on a held-out slice after them.

    Args:
        sample: (n, dim) float32 tokens in sampling-key order (the build's ``_Sampler``), at least
            one; ``n_tokens``: the corpus' token count (the default centroid count).
        nbits, n_centroids, kmeans_iters, sample_per_centroid, seed, buckets: as ``Index.build``.

    Returns:
        (codec, its tuned Assigner, timings {"kmeans", "groups"} in seconds).
    """
    timings: dict[str, float] = {}
    t1 = time.perf_counter()
    k = n_centroids if n_centroids is not None else num_centroids(n_tokens)
    if not 1 <= k <= n_tokens:
        raise ValueError(f"n_centroids: expected 1 <= n_centroids <= n_tokens={n_tokens}, got {k}")
    n_heldout = min(max(sample.shape[0] // 20, 1), 50_000) if sample.shape[0] > k else 0
    n_fit = max(min(sample.shape[0] - n_heldout, max(k, sample_per_centroid * k)), k)
    fit, heldout = sample[:n_fit], sample[n_fit : n_fit + n_heldout]
    if heldout.shape[0] == 0:
        heldout = fit
    # Stored as fp16 (as colbert-ai stores them); residuals are taken against the rounded values.
    centroids = kmeans(fit, k, kmeans_iters, seed).astype(np.float16).astype(np.float32)
    timings["kmeans"] = time.perf_counter() - t1
    # Nearest-centroid search for the final centroids: groups of centroids, probes tuned.
    t_groups = time.perf_counter()
    assigner = Assigner(centroids, seed=seed)
    assigner.tune(heldout)  # the fewest probes that find the exact nearest for 99.5% of tokens
    timings["groups"] = time.perf_counter() - t_groups
    avg_residual, cutoffs, weights = fit_buckets(heldout - centroids[assigner(heldout)], nbits, buckets)
    codec = Codec(
        centroids=centroids,
        avg_residual=avg_residual,
        bucket_cutoffs=cutoffs,
        bucket_weights=weights,
        nbits=nbits,
        buckets=buckets,
        kmeans_iters=kmeans_iters,
        kmeans_sample=int(n_fit),
        seed=seed,
        n_probe=int(assigner.n_probe),
        recall=assigner.recall,
    )
    return codec, assigner, timings
