"""Pure-PyTorch twins of every op: the specification, the fallback and the benchmark baseline.

All arithmetic is fp32 whatever the input dtype. Conventions shared by every op:

* A query token is valid where ``queries_mask`` is True (every token when it is None).
* ``max`` over an empty set of document tokens is -inf, a sum over no valid query token is 0:
  an empty document scores -inf, a query with no valid token scores 0 against everything.
* Candidate id -1 is padding and scores -inf.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NEG_INF = float("-inf")
# Bound on the (n_queries, n_docs, query_len, doc_len) similarity block held at once.
_MAX_BLOCK_ELEMENTS = 1 << 26


def maxsim(
    queries: torch.Tensor,
    documents: torch.Tensor,
    queries_mask: torch.Tensor | None = None,
    documents_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """score[q, n] = Σ_{valid i} max_{valid j} ⟨queries[q, i], documents[n, j]⟩.

    queries (nq, Lq, dim), documents (nd, Ld, dim): float32/16/bf16; masks bool (nq, Lq),
    (nd, Ld). Returns (nq, nd) float32. A document with a valid token holding NaN or inf scores
    NaN (the rule the kernels follow; the public ops raise on it).
    """
    nq, lq, _ = queries.shape
    nd, ld, _ = documents.shape
    q = queries.float()
    out = torch.empty(nq, nd, dtype=torch.float32, device=queries.device)
    chunk = max(1, _MAX_BLOCK_ELEMENTS // max(1, nq * lq * max(ld, 1)))
    for start in range(0, nd, chunk):
        d = documents[start : start + chunk].float()
        if ld == 0:
            best = torch.full((nq, d.shape[0], lq), NEG_INF, device=q.device)
        else:
            sim = torch.einsum("qid,njd->qnij", q, d)
            if documents_mask is not None:
                valid = documents_mask[start : start + chunk][None, :, None, :]
                sim = sim.masked_fill(~valid, NEG_INF)
            best = sim.amax(dim=-1)
        if queries_mask is not None:
            best = best.masked_fill(~queries_mask[:, None, :], 0.0)
        out[:, start : start + chunk] = best.sum(dim=-1)
        if ld:
            bad = ~torch.isfinite(d).all(dim=-1)  # (chunk, ld)
            if documents_mask is not None:
                bad &= documents_mask[start : start + chunk]
            out[:, start : start + chunk] = out[:, start : start + chunk].masked_fill(
                bad.any(dim=-1)[None], float("nan")
            )
    return out


def pad_documents(
    doc_tokens: torch.Tensor, doc_offsets: torch.Tensor, doc_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed documents doc_ids (n,) -> padded (n, max_len, dim) float32 and mask (n, max_len)."""
    lengths = (doc_offsets[1:] - doc_offsets[:-1])[doc_ids]
    max_len = int(lengths.max()) if lengths.numel() else 0
    positions = torch.arange(max_len, device=doc_tokens.device)
    mask = positions[None, :] < lengths[:, None]
    index = torch.where(mask, doc_offsets[doc_ids][:, None] + positions[None, :], 0)
    if doc_tokens.shape[0] == 0:
        padded = torch.zeros(*index.shape, doc_tokens.shape[1], device=doc_tokens.device)
    else:
        padded = doc_tokens[index].float()
    return padded, mask


def maxsim_packed(
    queries: torch.Tensor,
    doc_tokens: torch.Tensor,
    doc_offsets: torch.Tensor,
    candidates: torch.Tensor | None = None,
    queries_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """MaxSim against packed documents: document n is doc_tokens[doc_offsets[n]:doc_offsets[n+1]].

    candidates (nq, nc) int64 picks each query's documents (-1: padding, scores -inf); None
    scores every document. Returns (nq, nc) or (nq, nd) float32.
    """
    nd = doc_offsets.shape[0] - 1
    device = queries.device
    if candidates is None:
        docs, mask = pad_documents(doc_tokens, doc_offsets, torch.arange(nd, device=device))
        return maxsim(queries, docs, queries_mask, mask)
    out = torch.full(candidates.shape, NEG_INF, dtype=torch.float32, device=device)
    for qi in range(queries.shape[0]):
        keep = candidates[qi] >= 0
        ids = candidates[qi][keep]
        docs, mask = pad_documents(doc_tokens, doc_offsets, ids)
        qmask = None if queries_mask is None else queries_mask[qi : qi + 1]
        out[qi, keep] = maxsim(queries[qi : qi + 1], docs, qmask, mask)[0]
    return out


def centroid_scores(
    queries: torch.Tensor,
    centroids: torch.Tensor,
    n_probe: int,
    queries_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """scores[q, i, c] = ⟨queries[q, i], centroids[c]⟩ and each token's n_probe best centroids.

    Returns scores (nq, Lq, C) float32 and top_ids (nq, Lq, n_probe) int64, best first, ties
    to the lower centroid id. Masked query tokens get scores 0 and ids -1.
    """
    scores = torch.einsum("qid,cd->qic", queries.float(), centroids.float())
    return _top_centroids(scores, n_probe, queries_mask)


def centroid_scores_int8(
    queries: torch.Tensor,
    levels: torch.Tensor,
    scales: torch.Tensor,
    n_probe: int,
    queries_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """centroid_scores from int8 products (the cpp kernel's twin, bit for bit):

        qscale_i = max_d |q_id| / 127,  qq_id = round(q_id / qscale_i)   (ties to even; 0 if qscale 0)
        scores[q, i, c] = float(Σ_d qq_id · L_cd) · (qscale_i · scales[c]),  L = 64 · levels[0] + levels[1]

    queries (nq, Lq, dim) float; levels (2, C, dim4 >= dim) int8, scales (C,) float32 (as
    ``quantise_centroids`` makes them). Returns as :func:`centroid_scores`.
    """
    q = queries.float()
    dim = q.shape[-1]
    qscale = q.abs().amax(dim=-1, keepdim=True) / 127 if dim else q.new_zeros((*q.shape[:-1], 1))
    safe = torch.where(qscale > 0, qscale, torch.ones_like(qscale))
    qq = torch.where(qscale > 0, torch.round(q / safe), torch.zeros_like(q)).clamp_(-127, 127)
    full = levels[0, :, :dim].double() * 64 + levels[1, :, :dim].double()
    # float64 products of integers below 2**53: the exact integer sums, rounded once to float32
    dots = torch.einsum("qid,cd->qic", qq.double(), full).float()
    scores = dots * (qscale * scales.float())
    return _top_centroids(scores, n_probe, queries_mask)


def _top_centroids(
    scores: torch.Tensor, n_probe: int, queries_mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    top_ids = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :n_probe]
    if queries_mask is not None:
        scores = scores.masked_fill(~queries_mask[..., None], 0.0)
        top_ids = top_ids.masked_fill(~queries_mask[..., None], -1)
    return scores, top_ids


def check_codes(codes: torch.Tensor, n_centroids: int) -> None:
    """ValueError unless every code is a centroid id in [0, n_centroids)."""
    if codes.numel():
        wide = codes.long()  # torch has no min/max for uint16
        low, high = int(wide.min()), int(wide.max())
        if low < 0 or high >= n_centroids:
            raise ValueError(f"codes: centroid ids must be in [0, {n_centroids}), got range [{low}, {high}]")


def unpack_residuals(residuals: torch.Tensor, nbits: int) -> torch.Tensor:
    """Packed residuals (n, dim * nbits / 8) uint8 -> bucket indices (n, dim) int64.

    Bit order: a row is a little-endian bit string; dimension d's bucket index occupies bits
    [d * nbits, (d + 1) * nbits) (byte d * nbits // 8, from the least significant bit).
    """
    shifts = torch.arange(0, 8, nbits, device=residuals.device)
    buckets = (residuals.long()[..., None] >> shifts) & ((1 << nbits) - 1)
    return buckets.reshape(residuals.shape[0], residuals.shape[1] * (8 // nbits))


def pack_residuals(buckets: torch.Tensor, nbits: int) -> torch.Tensor:
    """Inverse of unpack_residuals: bucket indices (n, dim) -> packed (n, dim * nbits / 8) uint8."""
    per_byte = 8 // nbits
    shifts = torch.arange(0, 8, nbits, device=buckets.device)
    grouped = buckets.long().reshape(buckets.shape[0], -1, per_byte)
    return (grouped << shifts).sum(-1).to(torch.uint8)


def decompress_residuals(
    codes: torch.Tensor,
    residuals: torch.Tensor,
    centroids: torch.Tensor,
    bucket_weights: torch.Tensor,
    nbits: int,
) -> torch.Tensor:
    """token[t] = normalize(centroids[codes[t]] + bucket_weights[unpack_residuals(residuals)[t]]).

    normalize(x) = x / max(‖x‖₂, 1e-12), as colbert-ai's ResidualCodec.decompress. Returns
    (n, dim) in the dtype of centroids, computed in fp32.
    """
    check_codes(codes, centroids.shape[0])
    buckets = unpack_residuals(residuals, nbits)
    vectors = centroids.float()[codes.long()] + bucket_weights.float()[buckets]
    return F.normalize(vectors, p=2, dim=-1).to(centroids.dtype)


def fused_decompress_maxsim(
    queries: torch.Tensor,
    codes: torch.Tensor,
    residuals: torch.Tensor,
    doc_offsets: torch.Tensor,
    candidates: torch.Tensor | None,
    centroids: torch.Tensor,
    bucket_weights: torch.Tensor,
    nbits: int,
    queries_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """maxsim_packed over the decompressed tokens (decompressed in fp32, not rounded)."""
    tokens = decompress_residuals(codes, residuals, centroids.float(), bucket_weights, nbits)
    return maxsim_packed(queries, tokens, doc_offsets, candidates, queries_mask)


def residual_inv_norms(
    codes: torch.Tensor,
    residuals: torch.Tensor,
    centroids: torch.Tensor,
    bucket_weights: torch.Tensor,
    nbits: int,
    block: int = 1 << 16,
) -> torch.Tensor:
    """inv_norm[t] = 1 / max(‖centroids[codes[t]] + bucket_weights[b_t]‖₂, 1e-12), (n,) float32,
    computed in fp32 blocks of `block` tokens (the normaliser decompress_residuals divides by)."""
    check_codes(codes, centroids.shape[0])
    out = torch.empty(codes.shape[0], dtype=torch.float32, device=centroids.device)
    cents, weights = centroids.float(), bucket_weights.float()
    for b in range(0, codes.shape[0], block):
        vectors = (
            cents[codes[b : b + block].long()] + weights[unpack_residuals(residuals[b : b + block], nbits)]
        )
        out[b : b + block] = 1.0 / vectors.norm(dim=-1).clamp_min(1e-12)
    return out


# Quantisation of fused_decompress_maxsim's int8 precision (csrc/cpu/code_scoring.h).
LEVEL_RANGE, LEVEL_OFFSET, QUERY_RANGE = 63, 64, 127


def quantise_bucket_weights(bucket_weights: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Bucket weights -> (levels (2**nbits,) int32 in [-63, 63], wscale), w ≈ level * wscale."""
    w = bucket_weights.float()
    amax = w.abs().max()
    wscale = amax / LEVEL_RANGE if amax > 0 else torch.zeros((), dtype=torch.float32)
    levels = torch.round(w / wscale).clamp(-LEVEL_RANGE, LEVEL_RANGE) if amax > 0 else torch.zeros_like(w)
    return levels.to(torch.int32), float(wscale)


def quantise_queries(queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(nq, Lq, dim) float32 -> (values int32 in [-127, 127], qscale (nq, Lq) float32), per token."""
    q = queries.float()
    amax = q.abs().amax(dim=-1)
    qscale = torch.where(amax > 0, amax / QUERY_RANGE, torch.zeros_like(amax))
    safe = torch.where(qscale > 0, qscale, torch.ones_like(qscale))
    values = torch.round(q / safe[..., None]).clamp(-QUERY_RANGE, QUERY_RANGE)
    return torch.where(qscale[..., None] > 0, values, torch.zeros_like(values)).to(torch.int32), qscale


def fused_decompress_maxsim_codes(
    queries: torch.Tensor,
    codes: torch.Tensor,
    residuals: torch.Tensor,
    doc_offsets: torch.Tensor,
    candidates: torch.Tensor | None,
    bucket_weights: torch.Tensor,
    nbits: int,
    queries_mask: torch.Tensor | None,
    centroid_scores: torch.Tensor,
    inv_norm: torch.Tensor,
    precision: str,
) -> torch.Tensor:
    """fused_decompress_maxsim scored from the codes (see its docstring for the algebra):

    s[i, t] = (centroid_scores[q, i, codes[t]] + ⟨queries[q, i], bucket_weights[b_t]⟩) * inv_norm[t]
    (exact), or with the residual term in int8 arithmetic, s = fma(dot_int, qscale_i * wscale,
    centroid score) * inv_norm (int8); score = Σ_valid i max_t s[i, t]. Returns (nq, nc) float32.
    """
    nq, lq, _ = queries.shape
    n_cent = centroid_scores.shape[2]
    check_codes(codes, n_cent)
    buckets = unpack_residuals(residuals, nbits).long()
    if precision == "int8":
        levels, wscale = quantise_bucket_weights(bucket_weights)
        qv, qscale = quantise_queries(queries)
        token_levels = levels[buckets].double()  # (n, dim), exact integers
        scale = (qscale.double() * torch.tensor(wscale, dtype=torch.float32).double()).float().double()
    else:
        token_weights = bucket_weights.float()[buckets]
    nd = doc_offsets.shape[0] - 1
    cand = torch.arange(nd)[None].expand(nq, nd) if candidates is None else candidates
    out = torch.full(cand.shape, NEG_INF, dtype=torch.float32)
    for qi in range(nq):
        valid = torch.ones(lq, dtype=torch.bool) if queries_mask is None else queries_mask[qi]
        for j, doc in enumerate(cand[qi].tolist()):
            if doc < 0:
                continue
            b, e = int(doc_offsets[doc]), int(doc_offsets[doc + 1])
            if not bool(valid.any()):
                out[qi, j] = 0.0
                continue
            if b == e:
                continue
            cs = centroid_scores[qi][valid][:, codes[b:e].long()].float()  # (n_valid, len)
            if precision == "int8":
                dot = qv[qi][valid].double() @ token_levels[b:e].T  # exact: |values| < 2**53
                s = (dot * scale[qi][valid][:, None] + cs.double()).float() * inv_norm[b:e][None]
            else:
                s = (queries[qi][valid].float() @ token_weights[b:e].T + cs) * inv_norm[b:e][None]
            out[qi, j] = s.max(dim=1).values.sum()
    return out


def centroid_interaction(
    centroid_scores: torch.Tensor,
    codes: torch.Tensor,
    doc_offsets: torch.Tensor,
    candidates: torch.Tensor | None = None,
    threshold: float | None = None,
    queries_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """PLAID stages 2-3: approximate scores from centroid scores alone.

    score[q, n] = Σ_{valid i} max_{kept j in doc n} centroid_scores[q, i, codes[j]], where token j
    is kept when threshold is None or max_{valid i} centroid_scores[q, i, codes[j]] >= threshold.
    centroid_scores (nq, Lq, C) float32. Returns (nq, nc) or (nq, nd) float32.
    """
    nq, lq, n_cent = centroid_scores.shape
    check_codes(codes, n_cent)
    nd = doc_offsets.shape[0] - 1
    device = centroid_scores.device
    cand = torch.arange(nd, device=device).expand(nq, nd) if candidates is None else candidates
    out = torch.full(cand.shape, NEG_INF, dtype=torch.float32, device=device)
    for qi in range(nq):
        valid = torch.ones(lq, dtype=torch.bool, device=device) if queries_mask is None else queries_mask[qi]
        scores = centroid_scores[qi][valid].float()  # (n_valid, C)
        table = torch.cat([scores, torch.full((scores.shape[0], 1), NEG_INF, device=device)], dim=1)
        if threshold is not None and scores.shape[0] > 0:
            pruned = scores.amax(dim=0) < threshold
            table[:, :n_cent][:, pruned] = NEG_INF
        keep = cand[qi] >= 0
        ids = cand[qi][keep]
        lengths = (doc_offsets[1:] - doc_offsets[:-1])[ids]
        max_len = int(lengths.max()) if lengths.numel() else 0
        positions = torch.arange(max_len, device=device)
        in_doc = positions[None, :] < lengths[:, None]
        token = torch.where(in_doc, doc_offsets[ids][:, None] + positions[None, :], 0)
        doc_codes = codes.long()[token] if codes.numel() else torch.zeros_like(token)
        doc_codes = torch.where(in_doc, doc_codes, n_cent)  # padding -> the -inf column
        per_token = table[:, doc_codes]  # (n_valid, n, max_len)
        if max_len == 0:
            best = torch.full((scores.shape[0], ids.shape[0]), NEG_INF, device=device)
        else:
            best = per_token.amax(dim=-1)
        out[qi, keep] = best.sum(dim=0)
    return out


def centroid_interaction_topk(
    centroid_scores: torch.Tensor,
    codes: torch.Tensor,
    doc_offsets: torch.Tensor,
    ivf_offsets: torch.Tensor,
    ivf_docs: torch.Tensor,
    probed: torch.Tensor,
    n_keep: int,
    threshold: float | None = None,
    queries_mask: torch.Tensor | None = None,
    live: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PLAID stages 1b-2 in one: each query's candidates are the live documents of its probed IVF
    cells (``ivf_docs[ivf_offsets[c] : ivf_offsets[c + 1]]`` for every c in ``probed[q]`` but -1),
    scored by :func:`centroid_interaction`; the ``n_keep`` best are returned, best first (higher
    score, then lower id; a pruned document, -inf, after every scored one).

    centroid_scores (nq, Lq, C) float32, probed (nq, n_probed) int64, live (nd,) bool or None.
    Returns ids (nq, n_keep) int64 (-1 padding) and scores (nq, n_keep) float32 (-inf padding).
    """
    nq = centroid_scores.shape[0]
    device = centroid_scores.device
    out_ids = torch.full((nq, n_keep), -1, dtype=torch.int64, device=device)
    out_s = torch.full((nq, n_keep), NEG_INF, dtype=torch.float32, device=device)
    for qi in range(nq):
        cells = torch.unique(probed[qi][probed[qi] >= 0])
        lists = [ivf_docs[int(ivf_offsets[c]) : int(ivf_offsets[c + 1])].long() for c in cells.tolist()]
        cand = torch.unique(torch.cat(lists)) if lists else torch.zeros(0, dtype=torch.int64, device=device)
        if live is not None:
            cand = cand[live[cand]]
        if cand.numel() == 0:
            continue
        mask = None if queries_mask is None else queries_mask[qi : qi + 1]
        s = centroid_interaction(
            centroid_scores[qi : qi + 1], codes, doc_offsets, cand[None], threshold, mask
        )[0]
        # cand is ascending (unique): a stable sort by score keeps the lower id first among ties
        order = torch.sort(s, descending=True, stable=True).indices[:n_keep]
        out_ids[qi, : order.shape[0]] = cand[order]
        out_s[qi, : order.shape[0]] = s[order]
    return out_ids, out_s


# ---------------------------------------------------------------- index building (issue 14)

BLOCK_LANES = 16  # centroids per block of nearest_centroids' layout (kBlockLanes in csrc/cpu/ops.h)


def _block_rows(blocks: torch.Tensor, block_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Blocks (nb, dim, 16) + ids (nb, 16) -> distinct ids ascending (m,) and their rows (m, dim);
    lanes of id -1 (padding) are dropped."""
    rows = blocks.float().permute(0, 2, 1).reshape(-1, blocks.shape[1])
    ids = block_ids.reshape(-1).long()
    rows, ids = rows[ids >= 0], ids[ids >= 0]
    uniq, inv = torch.unique(ids, return_inverse=True)
    first = torch.full((uniq.shape[0],), ids.shape[0], dtype=torch.long, device=ids.device)
    first.scatter_reduce_(0, inv, torch.arange(ids.shape[0], device=ids.device), reduce="amin")
    return uniq, rows[first]


def _best(scores: torch.Tensor, ids: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best of (scores (m,), distinct ids (m,) ascending): score descending, ties to the lower id."""
    order = torch.sort(-scores, stable=True).indices[:k]
    return scores[order], ids[order]


def nearest_centroids(
    tokens: torch.Tensor,
    group_blocks: torch.Tensor,
    group_block_ids: torch.Tensor,
    member_blocks: torch.Tensor,
    member_block_ids: torch.Tensor,
    group_offsets: torch.Tensor,
    centroids: torch.Tensor | None,
    graph: torch.Tensor | None,
    n_probe: int,
    k: int,
    max_steps: int,
    width: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's k best centroids by inner product, searched coarse to fine.

    1. groups = the n_probe best group centroids of the token (rows of group_blocks, ids
       group_block_ids); 2. best = the kk = k (max(k, width) with a graph) best members of those
       groups (member blocks group_offsets[g] : group_offsets[g + 1] of member_blocks /
       member_block_ids); 3. with a graph (n_centroids, degree) int32 (-1 = none), up to max_steps
       times: the first of best[:width] not expanded yet is expanded (its neighbours, rows of
       centroids, are scored and enter best); stop when best[:width] are all expanded.
    "Best" is score descending, ties to the lower id; an id met twice is listed once; lanes of id
    -1 are padding.

    tokens (n, dim) float. Returns scores (n, k) float32 and ids (n, k) int64, padded with -inf
    and -1 when fewer than k distinct centroids were scored. Scores here come from torch
    matmuls; the cpp kernel's are sequential FMA chains (equal on integer-valued inputs).
    """
    n = tokens.shape[0]
    x = tokens.float()
    gid, grows = _block_rows(group_blocks, group_block_ids)
    walk = graph is not None and centroids is not None
    kk = max(k, width) if walk else k
    out_s = torch.full((n, k), NEG_INF, dtype=torch.float32)
    out_i = torch.full((n, k), -1, dtype=torch.int64)
    gscores = x @ grows.T  # (n, n_groups)
    cents = None if centroids is None else centroids.float()
    for t in range(n):
        _, groups = _best(gscores[t], gid, n_probe)
        blocks = [torch.arange(int(group_offsets[g]), int(group_offsets[g + 1])) for g in groups.tolist()]
        b = torch.cat(blocks) if blocks else torch.zeros(0, dtype=torch.long)
        ids, rows = _block_rows(member_blocks[b], member_block_ids[b])
        s, i = _best(rows @ x[t], ids, kk)
        expanded: list[int] = []
        for _ in range(max_steps if walk else 0):
            todo = [c for c in i[:width].tolist() if c not in expanded]
            if not todo:
                break
            expanded.append(todo[0])
            nb = graph[todo[0]].long()
            nb = nb[nb >= 0]
            all_i = torch.cat([i, nb])
            all_s = torch.cat([s, cents[nb] @ x[t]])
            uniq, inv = torch.unique(all_i, return_inverse=True)
            first = torch.full((uniq.shape[0],), all_i.shape[0], dtype=torch.long)
            first.scatter_reduce_(0, inv, torch.arange(all_i.shape[0]), reduce="amin")
            s, i = _best(all_s[first], uniq, kk)
        out_s[t, : min(k, s.shape[0])] = s[:k]
        out_i[t, : min(k, i.shape[0])] = i[:k]
    return out_s, out_i


def _sum_squares16(v: torch.Tensor) -> torch.Tensor:
    """Σ_d v[:, d]² in compress_residuals' fixed order: 16 lane sums (lane l adds dims l, l + 16, …,
    each square rounded, then added), folded in halves. v (n, dim) float32 -> (n,) float32."""
    n, dim = v.shape
    acc = torch.zeros(n, 16, dtype=torch.float32, device=v.device)
    for d0 in range(0, dim, 16):
        part = v[:, d0 : d0 + 16]
        sq = part * part
        acc[:, : part.shape[1]] = acc[:, : part.shape[1]] + sq
    h = 8
    while h >= 1:
        acc = acc[:, :h] + acc[:, h : 2 * h]
        h //= 2
    return acc[:, 0]


def compress_residuals(
    tokens: torch.Tensor,
    codes: torch.Tensor,
    centroids: torch.Tensor,
    bucket_cutoffs: torch.Tensor,
    bucket_weights: torch.Tensor,
    nbits: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of decompress_residuals, for tokens (n, dim) and their codes (n,).

    r = tokens - centroids[codes] (fp32); bucket b[d] = #{j : bucket_cutoffs[j] < r[d]}
    (torch.bucketize; cutoffs non-decreasing); residuals = pack_residuals(b, nbits) (n, dim * nbits / 8)
    uint8; inv_norm (n,) float32 = 1 / max(‖centroids[codes] + bucket_weights[b]‖₂, 1e-12), the
    squared norm summed in the order of :func:`_sum_squares16`.
    """
    check_codes(codes, centroids.shape[0])
    if codes.shape[0] == 0:
        row_bytes = tokens.shape[1] * nbits // 8
        return torch.zeros(0, row_bytes, dtype=torch.uint8), torch.zeros(0, dtype=torch.float32)
    cents = centroids.float()[codes.long()]
    r = tokens.float() - cents
    buckets = torch.bucketize(r, bucket_cutoffs.float())
    vectors = cents + bucket_weights.float()[buckets]
    # sqrt and 1/x correctly rounded (as the kernels' sqrtss / divss): in fp64, then rounded once
    # to fp32 (exact for these two ops, fp64 having more than 2 * 24 + 2 bits); torch's fp32 sqrt
    # may be off by an ulp.
    norm = _sum_squares16(vectors).double().sqrt().float().clamp_min(1e-12)
    inv = (1.0 / norm.double()).float()
    return pack_residuals(buckets, nbits), inv


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 quantisation of each row: ``q = round(x * (127 / amax))``, ``scale = amax / 127``.

    x (rows, k) float32 -> q (rows, k) int8 (|q| <= 127; round half to even) and scale (rows,)
    float32 with ``x ~ q * scale``; a row of zeros gets q = 0 and scale 0.
    """
    amax = x.abs().amax(dim=1)
    safe = amax.clamp_min(torch.finfo(torch.float32).tiny)
    # A true division, as the kernels' 127.0f / amax: torch's ``127.0 / t`` multiplies by t's
    # reciprocal, a rounding apart, which moved some bf16-valued rows' elements across a .5.
    inv = torch.where(amax > 0, torch.full_like(safe, 127.0).div(safe), torch.zeros_like(amax))
    q = torch.round(x * inv[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, amax / 127.0


def geglu(y: torch.Tensor) -> torch.Tensor:
    """``GELU(y[..., :N/2]) · y[..., N/2:]`` (the erf GELU), float32: ModernBERT's MLP input."""
    a, b = y.float().chunk(2, dim=-1)
    return torch.nn.functional.gelu(a) * b


def int8_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor,
    post: str = "none",
    other: torch.Tensor | None = None,
    inv_smooth: torch.Tensor | None = None,
    norm: tuple[torch.Tensor, torch.Tensor | None, float] | None = None,
    rotate: int = 0,
) -> torch.Tensor:
    """y[m, n] = float32(Σ_k qx[m, k] · qweight[n, k]) · (sx[m] · scale[n]) + bias[n], then ``+ other``
    (post "add") or ``· other`` (post "mul"), or ``GELU(y[:, :N/2]) · y[:, N/2:]`` (post "geglu",
    the erf GELU); ``qx, sx = quantize_rows(LN(x) · inv_smooth)`` (no factor when ``inv_smooth`` is
    None; ``LN(x) = x`` without ``norm``, else ``F.layer_norm(x, (K,), *norm)`` in float32), then
    rotated by :func:`hadamard_blocks` of ``rotate`` (when > 0) before quantising.

    x (M, K) float32, qweight (N, K) int8, scale (N,) float32, bias (N,) float32, other (M, N)
    float32, inv_smooth (K,) float32, norm (weight (K,), bias (K,) or None, eps). Returns (M, N)
    float32. The integer sums are exact (float64 holds them).
    """
    x = x.float()
    if norm is not None:
        nw, nb, eps = norm
        x = F.layer_norm(x, (x.shape[1],), nw.float(), None if nb is None else nb.float(), eps)
    if inv_smooth is not None:
        x = x * inv_smooth[None, :]
    if rotate:
        x = hadamard_blocks(x, rotate)
    qx, sx = quantize_rows(x)
    acc = (qx.double() @ qweight.double().T).float()
    y = acc * (sx[:, None] * scale[None, :]) + bias[None, :]
    if post == "geglu":
        return geglu(y)
    if post == "add":
        return y + other
    if post == "mul":
        return y * other
    return y


def hadamard_blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """``x H``: each row's consecutive blocks of ``block`` elements (a power of two dividing the
    last axis) times the unnormalised Hadamard matrix of that size (Sylvester's: ``H_1 = [1]``,
    ``H_2n = [[H_n, H_n], [H_n, -H_n]]``; symmetric, ``H H = block · I``).

    x (..., K) float32. Returns (..., K) float32.
    """
    h = torch.ones(1, 1, dtype=torch.float32, device=x.device)
    while h.shape[0] < block:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    shape = x.shape
    return (x.float().reshape(*shape[:-1], shape[-1] // block, block) @ h).reshape(shape)


def rotary_embed(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of interleaved pairs, in place: for ``(u, v) = x[b, l, g, 2i : 2i + 2]``,
    ``(u, v) <- (u · cos[l, i] − v · sin[l, i], u · sin[l, i] + v · cos[l, i])``, in float32
    (bf16 inputs widened, the result rounded back once).

    x (B, L, G, D) float32 or bfloat16, D even; cos, sin (L, D / 2) float32. Returns ``x``.
    """
    wide = x.float()
    pairs = torch.view_as_complex(wide.unflatten(-1, (x.shape[-1] // 2, 2)))
    pairs.mul_(torch.complex(cos.float(), sin.float())[None, :, None, :])
    return x.copy_(wide)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: torch.Tensor | None,
    window: int | None,
    scale: float,
    out: torch.Tensor,
) -> torch.Tensor:
    """Masked softmax attention: ``out[b, i, h] = Σ_j p_ij v[b, j, h]``, ``p_i`` the softmax of
    ``q[b, i, h] · k[b, j, h] · scale`` over keys with ``key_mask[b, j]`` and ``|i − j| <= window``
    (float32 scores; ``p`` rounded to ``v``'s dtype); rows with no allowed key are zero.

    q, k, v (B, L, H, D); key_mask (B, L) bool or None; window int or None; out (B, L, H, D),
    written and returned.
    """
    length = q.shape[1]
    qf, kf = q.float().transpose(1, 2), k.float().transpose(1, 2)  # (B, H, L, D)
    scores = qf @ kf.transpose(-1, -2) * scale  # (B, H, L, L)
    allowed = torch.ones(length, length, dtype=torch.bool, device=q.device)
    if window is not None:
        pos = torch.arange(length, device=q.device)
        allowed = (pos[:, None] - pos[None, :]).abs() <= window
    allowed = allowed[None, None]
    if key_mask is not None:
        allowed = allowed & key_mask[:, None, None, :]
    scores = scores.masked_fill(~allowed, float("-inf"))
    top = scores.amax(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).min)  # all-masked rows: finite
    e = torch.exp(scores - top)
    total = e.sum(-1, keepdim=True)
    p = e.to(v.dtype).float()
    o = (p @ v.float().transpose(1, 2)) / torch.where(total > 0, total, torch.ones_like(total))
    return out.copy_(o.transpose(1, 2))
