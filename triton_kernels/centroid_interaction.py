"""centroid_interaction on the GPU: PLAID stages 2-3 from centroid scores alone.

score[q, c] = Σ_{valid i} max_{kept t in doc} centroid_scores[q, i, codes[t]], doc =
candidates[q, c] (or c when candidates is None); token t is kept when threshold is None or
max_{valid i} centroid_scores[q, i, codes[t]] >= threshold. A document with no kept token
scores -inf; a query with no valid token scores 0.

Grid as maxsim_packed (axis 0 = candidate slot / document, axis 1 = group of queries). A
program walks its document's codes in BLOCK_T tiles and gathers the (BLOCK_Q, BLOCK_T)
scores from the query's (Lq, C) table (L2-resident for PLAID's candidate sets). With a
threshold, the per-centroid keep flags are one torch pass ahead of the kernel:
keep[q, c] = max_{valid i} scores[q, i, c] >= threshold (PLAID's per-centroid max), one byte
per centroid, so a q-tile never needs the other q-tiles' scores.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from edgeplaid.triton_kernels._common import (
    NEG_INF,
    add_valid_rows,
    autotune,
    block,
    check_cuda_or_interpret,
    doc_span,
    grid_groups,
    mask_u8,
)

from edgeplaid.ops.reference import check_codes

# The first config is the default when EDGEPLAID_TRITON_AUTOTUNE=0.
_CONFIGS = [
    triton.Config({"BLOCK_T": bt}, num_warps=w, num_stages=2) for bt, w in [(64, 4), (32, 4), (128, 8)]
]


@autotune(_CONFIGS, key=["lq", "HAS_THRESHOLD", "HAS_CAND"], interpret={"BLOCK_T": 32})
@triton.jit(do_not_specialize=["nq", "n_out", "n_docs", "q_per_prog", "n_cent"])
def _centroid_interaction_kernel(
    cs_ptr,  # (nq, lq, C) fp32 centroid scores
    keep_ptr,  # (nq, C) uint8 keep flags (HAS_THRESHOLD)
    qm_ptr,  # (nq, lq) uint8
    codes_ptr,  # (n_tokens,) int32/int64
    off_ptr,  # (n_docs + 1,) int64
    cand_ptr,  # (nq, n_out) int64
    out_ptr,  # (nq, n_out) fp32
    nq,
    n_out,
    n_docs,
    q_per_prog,
    n_cent,
    lq,
    HAS_CAND: tl.constexpr,
    HAS_QMASK: tl.constexpr,
    HAS_THRESHOLD: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    col = tl.program_id(0).to(tl.int64)
    q_lo = tl.program_id(1).to(tl.int64) * q_per_prog
    q_hi = tl.minimum(q_lo + q_per_prog, nq)
    for qi in range(q_lo, q_hi):
        ok, start, length = doc_span(cand_ptr, off_ptr, qi, col, n_out, n_docs, HAS_CAND)
        table = cs_ptr + qi * lq * n_cent
        total = tl.zeros([BLOCK_Q], dtype=tl.float32)
        for q0 in range(0, lq, BLOCK_Q):
            rows = q0 + tl.arange(0, BLOCK_Q)
            row_ok = rows < lq
            best = tl.full([BLOCK_Q], NEG_INF, dtype=tl.float32)
            for t0 in range(0, length, BLOCK_T):
                t = t0 + tl.arange(0, BLOCK_T)
                t_in = t < length
                code = tl.load(codes_ptr + start + t, mask=t_in, other=0).to(tl.int64)
                t_ok = t_in & (code >= 0) & (code < n_cent)  # a bad code reads nothing
                code = tl.where(t_ok, code, 0)
                if HAS_THRESHOLD:
                    t_ok = t_ok & (tl.load(keep_ptr + qi * n_cent + code, mask=t_ok, other=0) != 0)
                s = tl.load(
                    table + rows[:, None] * n_cent + code[None, :],
                    mask=row_ok[:, None] & t_ok[None, :],
                    other=NEG_INF,
                )
                best = tl.maximum(best, tl.max(s, axis=1))
            total = add_valid_rows(total, best, qm_ptr + qi * lq, rows, row_ok, HAS_QMASK)
        tl.store(out_ptr + qi * n_out + col, tl.where(ok, tl.sum(total, axis=0), NEG_INF))


def centroid_interaction(
    centroid_scores: torch.Tensor,
    codes: torch.Tensor,
    doc_offsets: torch.Tensor,
    candidates: torch.Tensor | None = None,
    threshold: float | None = None,
    queries_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton centroid_interaction (arguments validated by edgeplaid.ops.centroid_interaction).

    centroid_scores (nq, Lq, C) fp32; codes (n_tokens,) int32/int64; doc_offsets (nd + 1,)
    int64; candidates (nq, nc) int64 or None; threshold float or None; queries_mask (nq, Lq)
    bool or None. Returns (nq, nc) or (nq, nd) fp32 (exact: only max and sum of the inputs).
    Bad codes: ValueError on CPU tensors; skipped on CUDA (a check would synchronise).
    """
    check_cuda_or_interpret(centroid_scores, codes, doc_offsets, candidates, queries_mask)
    nq, lq, n_cent = centroid_scores.shape
    if codes.device.type == "cpu":
        check_codes(codes, n_cent)
    n_docs = doc_offsets.shape[0] - 1
    n_out = n_docs if candidates is None else candidates.shape[1]
    out = torch.empty(nq, n_out, dtype=torch.float32, device=centroid_scores.device)
    if nq == 0 or n_out == 0:
        return out
    keep = mask_u8(None, centroid_scores)
    if threshold is not None and lq == 0:
        keep = torch.zeros(nq, n_cent, dtype=torch.uint8, device=centroid_scores.device)
    elif threshold is not None:
        masked = centroid_scores
        if queries_mask is not None:
            masked = centroid_scores.masked_fill(~queries_mask[..., None], float("-inf"))
        # amax over zero valid tokens is -inf: nothing kept, and nothing scores either.
        keep = (masked.amax(dim=1) >= threshold).view(torch.uint8).contiguous()
    if candidates is None:
        per, groups = grid_groups(nq, n_out)
    else:
        per, groups = grid_groups(nq, n_out, target_programs=1 << 62)
    _centroid_interaction_kernel[(n_out, groups)](
        centroid_scores,
        keep,
        mask_u8(queries_mask, centroid_scores),
        codes,
        doc_offsets,
        candidates if candidates is not None else doc_offsets,
        out,
        nq,
        n_out,
        n_docs,
        per,
        n_cent,
        lq,
        HAS_CAND=candidates is not None,
        HAS_QMASK=queries_mask is not None,
        HAS_THRESHOLD=threshold is not None,
        BLOCK_Q=block(lq, lo=2, hi=64),
    )
    return out
