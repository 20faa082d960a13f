"""PLAID search over an index's bundles, on the index's device, every heavy step in edgeplaid's kernels.

Stages (Santhanam et al., PLAID, 2022), for each block of queries:

1. ``centroid_scores``: every query token against every centroid, and each token's top
   ``n_probe`` centroids; their IVF lists, merged, are the candidate documents.
2. ``centroid_interaction`` with ``threshold``: each candidate's tokens replaced by their
   centroid's score, tokens whose centroid no query token scores >= threshold pruned; the best
   ``n_candidates`` survive. On CPU without a filter, 1-2 are two kernel calls: stage 1 also
   returns each centroid's best score over the query (the pruning test, from its tiles), and
   ``centroid_interaction_topk`` gathers the probed IVF lists, scores the ragged candidate list
   and keeps the best ``n_candidates`` itself (no padded matrix, no selection in numpy).
3. ``centroid_interaction`` without pruning on those; the best ``n_rerank`` survive.
4. ``fused_decompress_maxsim``: MaxSim over the survivors. On CPU from the codes (each token
   scored as (stage 1's centroid score + the residual term) * inv_norm, in int8 by default or
   fp32); on a GPU by decoding in the Triton kernel (fp32, "exact") -> top k.

The glue between the stages (IVF candidate lists, padding, selection, top-k) is written once in
torch and runs on the index's device, so CUDA tensors reach the Triton kernels and CPU tensors the
C++ kernels. On CPU, numpy replaces torch where it measured faster (candidate gathering with a
marker array, argpartition selection) and keeps torch's own thread pool idle beside the kernels'.
Every op receives the index's bundles (:mod:`edgeplaid.ops.bundles`), checked once at load: no
per-query O(n_docs) validation. On a GPU the glue synchronises with the host only where a ragged
size is needed (the number of IVF entries to gather, the widest candidate list), O(1) values.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from edgeplaid.ops import bundles as b
from edgeplaid.ops import centroid_interaction, centroid_scores, fused_decompress_maxsim
from edgeplaid.ops.centroid_interaction import centroid_interaction_topk
from edgeplaid.ops.centroid_scores import stage1_precision
from edgeplaid.ops.dispatch import implements, resolve
from edgeplaid.search import _fused  # noqa: F401  (registers the plaid_search op)

NEG_INF = float("-inf")
# The last stage's precision on CPU: int8 changed nDCG@10 on SciFact by <= 0.002 and recall@10
# against exhaustive search by <= 0.005 at lower latency (benchmarks/bench_search.py, README).
# Stage 1 follows it where its int8 products are faster (stage1_precision: VNNI CPUs).
# The Triton backend scores by decoding (fp32): "exact" there.
DEFAULT_PRECISION = "int8"
# Queries scored together: bounds the (queries, query_len, n_centroids) fp32 centroid-score block.
# On CPU 16 MiB (eight 32-token queries at 16K centroids): batched SciFact on 2 Zen 2 threads
# measured 271 / 296 / 319 / 333 / 323 queries/s with blocks of 1 / 2 / 4 / 8 / 16 queries (the
# centroid tiles serve every query of a block; stage 2 runs one query per thread). On a GPU
# 256 MiB: whole batches in one launch.
_MAX_SCORE_BLOCK = {"cpu": 1 << 22, "cuda": 1 << 26}
# Queries a plaid_search call takes (search/_fused.py): one query a pool thread at a time.
_FUSED_BLOCK = 256


class StageTimes:
    """Wall seconds spent in each stage of :meth:`PlaidSearcher.search`, summed over calls while
    ``enabled`` (off by default; benchmarks/bench_search.py turns it on for its per-stage table).
    Stages: "1 centroid_scores", "1b-2 candidates" (gathering, and on CPU the ragged stage 2),
    "2 centroid_interaction" (padded path), "3 centroid_interaction", "selection", "4 scoring".
    Like FAISS's per-index statistics, global: concurrent searches add to the same counters."""

    def __init__(self) -> None:
        self.enabled = False
        self.seconds: dict[str, float] = {}
        self.calls = 0

    def reset(self) -> None:
        self.seconds.clear()
        self.calls = 0

    def lap(self, stage: str, since: float) -> float:
        """Adds the time since ``since`` to ``stage``; returns now."""
        now = time.perf_counter()
        if self.enabled:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + now - since
        return now


STAGE_TIMES = StageTimes()


@dataclass(frozen=True)
class Ivf:
    """The inverted file in CSR form: the sorted unique documents having a token in centroid c
    are docs[offsets[c] : offsets[c + 1]]. offsets (C + 1,) int64, docs (n_ivf,) int32, on the
    index's device (CPU: views of the memory-mapped files)."""

    offsets: torch.Tensor
    docs: torch.Tensor


@dataclass(frozen=True)
class SearchParams:
    """PLAID's knobs (colbert-ai's ncells, centroid_score_threshold, ndocs, ndocs // 4) and the
    precision of the last stage (and of stage 1 where ``stage1_precision`` says so)."""

    n_probe: int
    threshold: float | None
    n_candidates: int
    n_rerank: int
    precision: str | None = None  # None: int8 where the codes are scored on CPU, else exact


def default_params(k: int) -> SearchParams:
    """Defaults scaled with k in colbert-ai's three tiers (k <= 10, <= 100, more), tuned on 48-dim
    SciFact (benchmarks/bench_search.py) for recall@10 >= 0.97 against exhaustive search at the
    least time. colbert-ai's k <= 10 tier (1 cell, threshold 0.5, 256 documents, 64 scored) gives
    0.976 there; 2 cells with threshold 0.6 give 0.989 in less time (the threshold prunes more
    tokens in stage 2, the costliest stage). For k <= 10 stage 2's 160 best go straight to exact
    scoring (n_rerank = n_candidates skips stage 3): exact scoring of 160 documents cost less
    than stage 3 on 256 plus exact scoring of 64, at higher recall. 160 rather than 128: with the
    int8 last stage and the build's tuned probes, 128 gave 0.9847 on SciFact (Xeon, 2026-12-05),
    160 gives 0.9867 for +0.05 ms (p50 2.80 -> 2.85 ms); 192 gives 0.9873 for +0.2 ms."""
    if k <= 10:
        return SearchParams(n_probe=2, threshold=0.6, n_candidates=160, n_rerank=160)
    if k <= 100:
        return SearchParams(n_probe=2, threshold=0.55, n_candidates=1024, n_rerank=max(256, 4 * k))
    return SearchParams(n_probe=4, threshold=0.5, n_candidates=max(4 * k, 4096), n_rerank=max(1024, 4 * k))


def resolve_params(k: int, **overrides: Any) -> SearchParams:
    base = default_params(k)
    known = {"n_probe", "threshold", "n_candidates", "n_rerank", "precision"}
    unknown = set(overrides) - known
    if unknown:
        raise TypeError(f"unknown search parameter(s) {sorted(unknown)}; expected some of {sorted(known)}")
    values = {f: overrides.get(f, getattr(base, f)) for f in known}
    if "n_candidates" in overrides and "n_rerank" not in overrides:
        values["n_rerank"] = max(k, values["n_candidates"] // 4)
    if values["precision"] is not None:
        b.precision(values["precision"])
    for f in ("n_probe", "n_candidates", "n_rerank"):
        if isinstance(values[f], bool) or not isinstance(values[f], int) or values[f] < 1:
            raise ValueError(f"{f}: expected a positive int, got {values[f]!r}")
    return SearchParams(**values)


# ---------------------------------------------------------------------------------- the glue


def _cells(top: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """The sorted unique probed centroids of one query: top (lq, n_probe) int64, valid (lq,) bool."""
    cells = np.unique(top[valid].ravel())
    return cells[cells >= 0]


def _gather_numpy(
    top: np.ndarray,
    valid: np.ndarray,
    ivf_offsets: np.ndarray,
    ivf_docs: np.ndarray,
    marks: np.ndarray,
    cells: np.ndarray | None = None,
) -> np.ndarray:
    """Sorted unique documents in the IVF lists of one query's probed centroids, (n,) int64.

    top (lq, n_probe) int64 centroid ids, valid (lq,) bool (or ``cells``, their
    :func:`_cells`, computed once for every segment). ``marks`` is a zeroed (n_docs,) bool
    scratch, left zeroed: marking then scanning it is O(entries + n_docs / 64) and measured
    faster than sorting the concatenated lists (np.unique) once lists hold thousands of entries.
    """
    if cells is None:
        cells = _cells(top, valid)
    if cells.shape[0] == 0:
        return np.zeros(0, dtype=np.int64)
    starts = ivf_offsets[cells].tolist()
    ends = ivf_offsets[cells + 1].tolist()
    docs = np.concatenate([ivf_docs[s:e] for s, e in zip(starts, ends, strict=True)])
    if docs.shape[0] < 4096:  # short lists: sorting beats scanning the whole marker array
        return np.unique(docs).astype(np.int64)
    marks[docs] = True
    out = np.flatnonzero(marks)
    marks[out] = False
    return out


def _pad_numpy(rows: list[np.ndarray]) -> torch.Tensor:
    """Ragged int arrays -> (len(rows), max_len) int64 padded with -1."""
    width = max((r.shape[0] for r in rows), default=0)
    out = np.full((len(rows), max(width, 1)), -1, dtype=np.int64)
    for i, r in enumerate(rows):
        out[i, : r.shape[0]] = r
    return torch.from_numpy(out)


def _gather_torch(top: torch.Tensor, valid: torch.Tensor, parts: list[Part]) -> torch.Tensor:
    """Every query's candidate documents at once, on the queries' device: (nb, width) int64,
    each row the sorted unique live global positions in its probed cells of every part, padded
    with -1 (the rows a one-segment index holding the same live documents gives, in the same
    order: ties break alike).

    top (nb, lq, n_probe) int64, valid (nb, lq) bool. Deleted documents are dropped before the
    rows are formed (no -1 holes, no width spent on them). Two host synchronisations per part
    and two in all: the number of IVF entries to gather and the widest row (output sizes)."""
    nb = top.shape[0]
    device = top.device
    n_total = sum(p.n_docs for p in parts)
    cells = top.masked_fill(~valid[..., None], -1).reshape(nb, -1).sort(dim=1).values
    keep = cells >= 0
    keep[:, 1:] &= cells[:, 1:] != cells[:, :-1]  # unique cells per query
    owner_q = torch.arange(nb, device=device)[:, None].expand_as(cells)[keep]
    cells = cells[keep]
    keys = []
    for part in parts:
        starts = part.ivf.offsets[cells]
        lens = part.ivf.offsets[cells + 1] - starts
        ends = torch.cumsum(lens, 0)
        total = int(ends[-1]) if ends.numel() else 0
        if total == 0:
            continue
        entry = torch.repeat_interleave(torch.arange(cells.shape[0], device=device), lens, output_size=total)
        doc = part.ivf.docs[torch.arange(total, device=device) - (ends - lens)[entry] + starts[entry]].long()
        q = owner_q[entry]
        if part.live_t is not None:
            alive = part.live_t[doc]
            doc, q = doc[alive], q[alive]
        keys.append(q * n_total + (doc + part.start))
    if not keys:
        return torch.full((nb, 1), -1, dtype=torch.int64, device=device)
    key = torch.unique(torch.cat(keys))  # sorted: by query, then global position
    q_of = key // n_total
    counts = torch.bincount(q_of, minlength=nb)
    width = max(int(counts.max()), 1) if key.numel() else 1
    col = torch.arange(key.shape[0], device=device) - (torch.cumsum(counts, 0) - counts)[q_of]
    out = torch.full((nb, width), -1, dtype=torch.int64, device=device)
    out[q_of, col] = key - q_of * n_total
    return out


def _pad_torch(rows: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    width = max((r.shape[0] for r in rows), default=0)
    out = torch.full((len(rows), max(width, 1)), -1, dtype=torch.int64, device=device)
    for i, r in enumerate(rows):
        out[i, : r.shape[0]] = r
    return out


def _best(
    scores: torch.Tensor, cand: torch.Tensor, n: int, ordered: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """The n best candidates per row: (scores, ids), each (nq, min(n, nc)); padding (-1) never
    outranks a real candidate, and a pruned real one (-inf) stays, last; ids -1 beyond the real
    ones. ``ordered`` sorts each row best first (ties: the lower column first, stable)."""
    n = min(n, cand.shape[1])
    if cand.device.type == "cpu":
        # numpy, not torch: no second thread pool spinning beside the kernels' between the stages;
        # and few calls: on a slow core each numpy call on these small arrays costs microseconds.
        s, c = scores.numpy(), cand.numpy()
        lowest = np.finfo(np.float32).min
        neg = np.isneginf(s)
        if neg.any():
            s = np.where(neg & (c >= 0), lowest, s)  # a pruned real candidate before padding
        if ordered or n >= c.shape[1]:  # a stable sort: ties keep the lower column first
            pos = np.argsort(-s, axis=1, kind="stable")[:, :n]
        else:
            pos = np.argpartition(-s, n - 1, axis=1)[:, :n]
        rows = np.arange(c.shape[0])[:, None]
        vals, ids = s[rows, pos], c[rows, pos]
        dead = np.isneginf(vals)
        if dead.any() or (neg.any() and (vals == lowest).any()):
            ids[dead] = -1
            vals[dead | (vals == lowest)] = NEG_INF
        return torch.from_numpy(vals), torch.from_numpy(ids)
    lowest = torch.finfo(torch.float32).min
    s = torch.where(torch.isneginf(scores) & (cand >= 0), lowest, scores)
    s = s.masked_fill(cand < 0, NEG_INF)
    vals, pos = torch.topk(s, n, dim=1, sorted=ordered)
    ids = torch.gather(cand, 1, pos).masked_fill(torch.isneginf(vals), -1)
    vals = vals.masked_fill(torch.isneginf(vals) | (vals == lowest), NEG_INF)
    return vals, ids


# ---------------------------------------------------------------------------------- the searcher


@dataclass(frozen=True)
class Part:
    """One segment of an index as the searcher sees it: its bundles, its IVF (local document
    positions), the global position of its first document, and which of its documents are live.

    live: (n_docs,) bool on CPU (None: every document is live); live_t the same on the index's
    device (the torch glue's copy)."""

    docs: b.CompressedDocs
    ivf: Ivf
    start: int = 0
    live: np.ndarray | None = None
    live_t: torch.Tensor | None = None

    @property
    def n_docs(self) -> int:
        return self.docs.n_docs


class PlaidSearcher:
    """Runs the PLAID stages over an index's bundles, all on one device.

    Args:
        codec: the index's :class:`~edgeplaid.ops.bundles.Codec` (centroids (C, dim) float16 or
            float32, bucket_weights (2**nbits,) float32).
        docs: its :class:`~edgeplaid.ops.bundles.CompressedDocs` (codes, residuals, offsets and
            inv_norm, checked once at load).
        ivf: its :class:`Ivf`.
        parts: instead of ``docs`` / ``ivf``, the segments of a living index (:class:`Part`, in
            position order, each starting where the previous ends). Search over several parts
            returns what one part holding the same live documents returns: stage 1 runs once
            (one codec); each part gathers its IVF candidates (deleted documents dropped), which
            become one list of global positions; stages 2-3 score that list in one kernel call
            over the parts' codes joined (2 bytes a token, made on the first search: a call per
            part would score every centroid against the query once per part); stage 4 scores
            each part's share of the survivors from its own files, and the best k are taken over
            all of them.
    """

    def __init__(
        self, codec: b.Codec, docs: b.CompressedDocs | None = None, ivf: Ivf | None = None, *, parts=None
    ) -> None:
        if parts is None:
            if docs is None or ivf is None:
                raise ValueError("PlaidSearcher: give docs and ivf, or parts")
            parts = [Part(docs, ivf)]
        self.codec = codec
        self.parts: list[Part] = list(parts)
        self.docs = self.parts[0].docs  # the first part's, for callers of a one-segment index
        self.ivf = self.parts[0].ivf
        self.n_docs = sum(p.n_docs for p in self.parts)  # positions, deleted ones included
        self.device = codec.centroids.device
        self._codes: b.CompressedDocs | b.DocCodes | None = self.docs if len(self.parts) == 1 else None
        self._joined_ivf: Ivf | None = None
        self._live: torch.Tensor | None = None
        self._live_made = False
        if self.device.type == "cpu":
            self._ivf_np = [(p.ivf.offsets.numpy(), p.ivf.docs.numpy()) for p in self.parts]
            self._ivf_offsets, self._ivf_docs = self._ivf_np[0]

    def doc_codes(self) -> b.CompressedDocs | b.DocCodes:
        """The codes and offsets stages 2-3 read: the one part's bundle, or every part's joined
        (global positions), made once (concurrent first searches may both make it: harmless)."""
        if self._codes is None:
            codes = torch.cat([p.docs.codes for p in self.parts])
            lens = torch.cat([p.docs.offsets[1:] - p.docs.offsets[:-1] for p in self.parts])
            offsets = torch.zeros(lens.shape[0] + 1, dtype=torch.int64, device=lens.device)
            torch.cumsum(lens, 0, out=offsets[1:])
            self._codes = b.DocCodes(codes, offsets)
        return self._codes

    def joined_ivf(self) -> tuple[Ivf, torch.Tensor | None]:
        """The IVF over global positions and the live documents, (n_docs,) bool or None (every
        one live), as the ragged stage-2 kernel reads them. The IVF is the one part's own, or
        every part's joined (each cell's lists one after the other, shifted to global
        positions), made once in O(IVF entries) on the first search and shared with the next
        version of a living index when its segments are the same (:meth:`reuse_codes`); the live
        mask is this version's, O(n_docs) bytes once."""
        if self._joined_ivf is None:
            if len(self.parts) == 1:
                self._joined_ivf = self.parts[0].ivf
            else:
                counts = [np.diff(offs) for offs, _ in self._ivf_np]
                offsets = np.zeros(self.codec.n_centroids + 1, np.int64)
                np.cumsum(np.sum(counts, axis=0), out=offsets[1:])
                docs = np.empty(int(offsets[-1]), np.int32)
                at = offsets[:-1].copy()  # where each cell's next part's list goes
                cells = np.arange(self.codec.n_centroids)
                for part, (offs, pdocs), n in zip(self.parts, self._ivf_np, counts, strict=True):
                    cell = np.repeat(cells, n)
                    docs[at[cell] + np.arange(pdocs.shape[0]) - offs[cell]] = pdocs + part.start
                    at += n
                self._joined_ivf = Ivf(torch.from_numpy(offsets), torch.from_numpy(docs))
        if not self._live_made:
            if any(p.live is not None for p in self.parts):
                masks = [np.ones(p.n_docs, bool) if p.live is None else p.live for p in self.parts]
                self._live = torch.from_numpy(np.concatenate(masks))
            self._live_made = True
        return self._joined_ivf, self._live

    def reuse_codes(self, other: PlaidSearcher) -> None:
        """Takes ``other``'s joined codes and joined IVF (made or not yet): the caller checked
        that both searchers' parts hold the same codes (so the same IVF lists)."""
        if len(self.parts) > 1:
            if self._codes is None:
                self._codes = other._codes
            if self._joined_ivf is None:
                self._joined_ivf = other._joined_ivf

    def _torch_glue(self, backend: str | None) -> bool:
        # The GPU's path; on CPU tensors too when the Triton backend is asked for (its
        # interpreter runs the GPU pipeline on the CPU, as the tests do).
        return self.device.type != "cpu" or backend == "triton"

    def _candidates(
        self,
        q: b.Queries,
        top: torch.Tensor,
        subset: list[np.ndarray | None] | None,
        offset: int,
        whole: list[bool] | None,
        torch_glue: bool,
    ) -> torch.Tensor:
        """Stage 1's candidate lists for a block of queries: (nb, width) int64 global positions,
        -1 padded, deleted documents dropped. ``subset`` holds sorted live global positions per
        query; ``whole[i]``: query i's allowed set is small enough to be scored whole (exact)."""
        nb, lq, _ = q.shape
        valid = torch.ones(nb, lq, dtype=torch.bool, device=top.device) if q.mask is None else q.mask
        if torch_glue:
            cand = _gather_torch(top, valid, self.parts)
            if subset is None:
                return cand
            rows = []
            for i in range(nb):
                sub = subset[offset + i]
                row = cand[i][cand[i] >= 0]
                if sub is not None:
                    allowed = torch.from_numpy(sub).to(self.device)
                    row = allowed if whole[offset + i] else row[torch.isin(row, allowed)]
                rows.append(row)
            return _pad_torch(rows, self.device)
        top_np, valid_np = top.numpy(), valid.numpy()
        marks = [np.zeros(p.n_docs, dtype=bool) for p in self.parts]
        rows = []
        for i in range(nb):
            sub = None if subset is None else subset[offset + i]
            if sub is not None and whole[offset + i]:
                rows.append(sub)  # a small allowed set is scored whole: exact filtering
                continue
            cells = _cells(top_np[i], valid_np[i])
            got = []
            for j, part in enumerate(self.parts):
                offs, docs = self._ivf_np[j]
                row = _gather_numpy(top_np[i], valid_np[i], offs, docs, marks[j], cells)
                if part.live is not None:
                    row = row[part.live[row]]
                got.append(row if part.start == 0 else row + part.start)
            row = got[0] if len(got) == 1 else np.concatenate(got)
            if sub is not None:
                row = row[np.isin(row, sub, assume_unique=True)]
            rows.append(row)
        return _pad_numpy(rows)

    def _stage4(
        self, q: b.Queries, cs: b.CentroidScores, cand: torch.Tensor, precision: str, backend: str | None
    ) -> torch.Tensor:
        """MaxSim of the survivors (nb, n) global positions, each part's from its own files:
        (nb, n) float32 aligned with ``cand`` (-inf for padding)."""

        def score(part: Part, ids: torch.Tensor) -> torch.Tensor:
            return fused_decompress_maxsim(
                q,
                part.docs,
                candidates=b.Candidates(ids, part.n_docs),
                centroids=self.codec,
                backend=backend,
                centroid_scores=cs,
                precision=precision,
            )

        if len(self.parts) == 1:
            return score(self.parts[0], cand)
        out = torch.full(cand.shape, NEG_INF, dtype=torch.float32, device=cand.device)
        for part in self.parts:
            inside = (cand >= part.start) & (cand < part.start + part.n_docs)
            if bool(inside.any()):
                local = torch.where(inside, cand - part.start, torch.full_like(cand, -1))
                out = torch.where(inside, score(part, local), out)
        return out

    def search(
        self,
        queries: b.Queries,
        k: int,
        params: SearchParams,
        subset: list[np.ndarray | None] | None = None,
        backend: str | None = None,
        extra: list[np.ndarray] | None = None,
    ) -> tuple[torch.Tensor, ...]:
        """queries on the index's device -> scores (nq, k) float32, ids (nq, k) int64 global
        document positions, there too. ``subset``: per query, None or sorted unique live positions.

        ``extra`` (hybrid search): per query live global positions scored by the last stage
        beside the survivors, whatever the earlier stages kept (the top k is still taken from
        the survivors only); their scores come back as a third tensor (nq, widest) float32,
        aligned with ``extra`` (-inf past each row's end)."""
        nq, lq, _ = queries.shape
        device = self.device
        n_cent = self.codec.n_centroids
        budget = _MAX_SCORE_BLOCK["cpu" if device.type == "cpu" else "cuda"]
        per_block = max(1, budget // max(1, lq * n_cent))
        torch_glue = self._torch_glue(backend)
        if params.precision is None:
            on_cpu = device.type == "cpu" and backend != "triton"
            params = replace(params, precision=DEFAULT_PRECISION if on_cpu else "exact")
        # An allowed set no larger than what stages 2-3 keep (min(n_candidates, n_rerank)) is
        # taken whole: every document survives both selections (a pruned one stays, last) and
        # stage 4 scores it, so its top k is exact. A larger one could be cut by stage 3's
        # centroid-only scores: it filters the IVF candidates instead.
        cap = min(params.n_candidates, params.n_rerank)
        whole = None if subset is None else [s is not None and s.shape[0] <= cap for s in subset]
        out_s = torch.full((nq, k), NEG_INF, dtype=torch.float32, device=device)
        out_i = torch.full((nq, k), -1, dtype=torch.int64, device=device)
        out_e = None
        if extra is not None:
            ext = _pad_numpy(extra).to(device)
            out_e = torch.full(ext.shape, NEG_INF, dtype=torch.float32, device=device)
        n_probe = min(params.n_probe, n_cent)
        codes = self.doc_codes()
        # On CPU without a filter, stages 1b-2 are one kernel call over the ragged IVF lists
        # (centroid_interaction_topk); with a filter, or with the torch glue, the candidates are
        # gathered here and scored as one padded matrix.
        ragged = not torch_glue and subset is None
        clock = STAGE_TIMES
        clock.calls += clock.enabled
        # On CPU a block is one C++ call (search/_fused.py) unless something asks for the staged
        # pipeline: a filter, hybrid search's extra documents, a living index's several parts, a
        # stage 3 (n_rerank < n_candidates), or the per-stage timer.
        fused = (
            ragged
            and out_e is None
            and len(self.parts) == 1
            and params.n_rerank >= params.n_candidates
            and not clock.enabled
            and implements("plaid_search", device, backend, like="centroid_scores")
        )
        if fused:
            # The one-call path holds one query's table per thread, whatever the block: the block
            # only bounds how long a call runs without the GIL's interrupt checks (~0.1-0.3 s).
            per_block = _FUSED_BLOCK
        t = time.perf_counter()
        for start in range(0, nq, per_block):
            q = queries[start : start + per_block]
            if fused:
                ivf, live = self.joined_ivf()
                vals, ids = resolve("plaid_search", device, backend)(
                    q, self.codec, self.parts[0].docs, ivf.offsets, ivf.docs, live, n_probe,
                    params.threshold, params.n_candidates, params.precision, k,
                )  # fmt: skip
                out_s[start : start + q.shape[0]] = vals
                out_i[start : start + q.shape[0]] = ids
                continue
            # On CPU stage 1 writes the centroid-major table that stages 2-4 read in place.
            layout = "token" if torch_glue else "centroid"
            if ragged:
                scores, top, cmax = centroid_scores(
                    q,
                    self.codec,
                    n_probe,
                    backend=backend,
                    layout="centroid",
                    with_max=True,
                    precision=stage1_precision(params.precision, device),
                )
                cs = b.CentroidScores(scores, query_len=lq)
                t = clock.lap("1 centroid_scores", t)
                ivf, live = self.joined_ivf()
                cand, _ = centroid_interaction_topk(
                    cs,
                    codes,
                    ivf,
                    top.reshape(top.shape[0], -1),
                    params.n_candidates,
                    params.threshold,
                    q.mask,
                    centroid_max=cmax,
                    live=live,
                    backend=backend,
                )
                t = clock.lap("1b-2 candidates", t)
            else:
                scores, top = centroid_scores(
                    q,
                    self.codec,
                    n_probe,
                    backend=backend,
                    layout=layout,
                    precision=stage1_precision(params.precision, device),
                )
                # finite: the queries and the codec were checked
                cs = b.CentroidScores(scores, query_len=lq if layout == "centroid" else None)
                t = clock.lap("1 centroid_scores", t)
                cand = self._candidates(q, top, subset, start, whole, torch_glue)
                t = clock.lap("1b-2 candidates", t)
            if not ragged and cand.shape[1] > params.n_candidates:
                s2 = centroid_interaction(
                    cs,
                    codes,
                    None,
                    b.Candidates(cand, self.n_docs),
                    params.threshold,
                    q.mask,
                    backend=backend,
                )
                t = clock.lap("2 centroid_interaction", t)
                _, cand = _best(s2, cand, params.n_candidates, ordered=False)
                t = clock.lap("selection", t)
            if cand.shape[1] > params.n_rerank:
                s3 = centroid_interaction(
                    cs, codes, None, b.Candidates(cand, self.n_docs), None, q.mask, backend=backend
                )
                t = clock.lap("3 centroid_interaction", t)
                _, cand = _best(s3, cand, params.n_rerank, ordered=False)
                t = clock.lap("selection", t)
            if out_e is None:
                s4 = self._stage4(q, cs, cand, params.precision, backend)
            else:  # the extra documents scored in the same call as the survivors
                rows = slice(start, start + q.shape[0])
                both = self._stage4(q, cs, torch.cat([cand, ext[rows]], dim=1), params.precision, backend)
                s4, out_e[rows] = both[:, : cand.shape[1]], both[:, cand.shape[1] :]
            del cs
            t = clock.lap("4 scoring", t)
            vals, ids = _best(s4, cand, k, ordered=True)
            rows = slice(start, start + q.shape[0])
            if device.type == "cpu":  # numpy views of the outputs: fewer calls on small arrays
                v, i = vals.numpy(), ids.numpy()
                i[np.isneginf(v)] = -1  # an empty document is no result
                out_s.numpy()[rows, : v.shape[1]] = v
                out_i.numpy()[rows, : i.shape[1]] = i
            else:
                out_s[rows, : vals.shape[1]] = vals
                out_i[rows, : ids.shape[1]] = ids.masked_fill(torch.isneginf(vals), -1)
            t = clock.lap("selection", t)
        return (out_s, out_i) if out_e is None else (out_s, out_i, out_e)

    def exhaustive(
        self, queries: b.Queries, k: int, backend: str | None = None, allowed: np.ndarray | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact MaxSim of every query against every live (decompressed) document, top k; ids
        are global positions (the parts' positions are consecutive). ``allowed``: sorted global
        positions; only those are scored (the others' scores are -inf)."""
        nq = queries.shape[0]
        out_s = torch.full((nq, k), NEG_INF, dtype=torch.float32, device=self.device)
        out_i = torch.full((nq, k), -1, dtype=torch.int64, device=self.device)
        kk = min(k, self.n_docs)
        if kk == 0:
            return out_s, out_i
        block = max(1, (1 << 26) // max(1, self.n_docs))
        for start in range(0, nq, block):
            q = queries[start : start + block]
            per = []
            for part in self.parts:
                if part.n_docs == 0:
                    continue
                s = fused_decompress_maxsim(q, part.docs, centroids=self.codec, backend=backend)
                if part.live_t is not None:
                    s = s.masked_fill(~part.live_t[None], NEG_INF)
                per.append(s)
            s = per[0] if len(per) == 1 else torch.cat(per, dim=1)
            if allowed is not None:
                keep = torch.zeros(s.shape[1], dtype=torch.bool, device=s.device)
                keep[torch.from_numpy(allowed).to(s.device)] = True
                s = s.masked_fill(~keep[None], NEG_INF)
            vals, ids = torch.topk(s, kk, dim=1)
            ids[torch.isneginf(vals)] = -1
            out_s[start : start + q.shape[0], :kk] = vals
            out_i[start : start + q.shape[0], :kk] = ids
        return out_s, out_i
