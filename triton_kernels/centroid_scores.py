"""centroid_scores on the GPU: PLAID stage 1, every query token against every centroid.

scores[r, c] = ⟨queries[r], centroids[c]⟩ over the flattened query tokens r, and each
token's n_probe best centroids (score descending, ties to the lower id, as the reference's
stable sort). Grid: axis 0 = block of BLOCK_C (256) centroids, axis 1 = block of BLOCK_M query
tokens; one tl.dot tile per program (dim padded to a power of two, fp32 accumulation).

Top-k: per score the kernel forms the int64 key
    key = ordered(score) · 2**32 + (C - 1 - c),
where ordered() maps fp32 to int32 monotonically (sign-magnitude -> two's complement, -0.0
as +0.0). Keys are unique and order like (score desc, id asc). Each program keeps only its
tile's top KPAD keys per row (tl.topk, KPAD = next power of two >= n_probe) and writes them
to a small candidates buffer; torch.topk over the candidates then gives exactly the
reference's order (the global top n_probe is inside the union of the per-tile tops) with no
tie fix-up and no host synchronisation. For n_probe >= BLOCK_C every key is written.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from edgeplaid.triton_kernels._common import (
    INTERPRET,
    autotune,
    block,
    check_cuda_or_interpret,
    dot,
    load_query_tile,
    mask_u8,
    query_pieces,
    upcast_for_interpreter,
)

# The first config is the default when EDGEPLAID_TRITON_AUTOTUNE=0.
_CONFIGS = [triton.Config({}, num_warps=w, num_stages=s) for w, s in [(4, 3), (4, 2), (8, 2), (8, 3)]]


# Padding columns: below every real key, never selected (n_probe <= C).
_NO_KEY = tl.constexpr(-(2**63))
# Tile width: fixed (the candidates buffer's width depends on it), not autotuned.
BLOCK_C = 64 if INTERPRET else 256
# In-kernel per-tile top-k. The interpreter runs tl.topk's sorting network op by op (about
# 0.5 s per tile), so there every key is written and torch.topk does it all; the tests turn
# this on for one small case.
TOPK_IN_KERNEL = not INTERPRET


@autotune(_CONFIGS, key=["dim", "BLOCK_M", "KOUT"], interpret={})
@triton.jit(do_not_specialize=["n_rows", "n_cent", "piece_stride", "key_stride"])
def _centroid_scores_kernel(
    q_ptr,  # (S, n_rows, dim) query-token pieces in the dot dtype
    qm_ptr,  # (n_rows,) uint8
    c_ptr,  # (C, dim)
    s_ptr,  # (n_rows, C) fp32 scores out
    key_ptr,  # (n_rows, key_stride) int64 top-k candidate keys out
    n_rows,
    n_cent,
    piece_stride,
    key_stride,
    dim,
    HAS_QMASK: tl.constexpr,
    PIECES: tl.constexpr,
    F32_DOT: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_C: tl.constexpr,
    KOUT: tl.constexpr,  # keys kept per row and tile: KPAD, or BLOCK_C (all)
):
    cols = tl.program_id(0).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    rows = tl.program_id(1).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    c_ok = cols < n_cent
    r_ok = rows < n_rows
    cent = tl.load(
        c_ptr + cols[:, None] * dim + offs_k[None, :], mask=c_ok[:, None] & (offs_k < dim)[None, :], other=0.0
    )
    ct = tl.trans(cent)
    acc = dot(load_query_tile(q_ptr, rows, offs_k, n_rows, dim), ct, None, F32_DOT, UPCAST)
    if PIECES >= 2:
        acc = dot(load_query_tile(q_ptr + piece_stride, rows, offs_k, n_rows, dim), ct, acc, F32_DOT, UPCAST)
    if PIECES >= 3:
        acc = dot(
            load_query_tile(q_ptr + 2 * piece_stride, rows, offs_k, n_rows, dim), ct, acc, F32_DOT, UPCAST
        )
    acc = tl.where(acc == 0.0, 0.0, acc)  # -0.0 ties with +0.0, as in the reference's sort
    bits = acc.to(tl.int32, bitcast=True)
    ordered = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    key = (ordered.to(tl.int64) << 32) | tl.where(c_ok, n_cent - 1 - cols, 0)[None, :]
    key = tl.where(c_ok[None, :], key, _NO_KEY)
    if KOUT < BLOCK_C:
        key = tl.topk(key, KOUT)  # (BLOCK_M, KOUT), largest first
    kcols = tl.program_id(0).to(tl.int64) * KOUT + tl.arange(0, KOUT)
    tl.store(key_ptr + rows[:, None] * key_stride + kcols[None, :], key, mask=r_ok[:, None])
    out = rows[:, None] * n_cent + cols[None, :]
    m = r_ok[:, None] & c_ok[None, :]
    if HAS_QMASK:
        valid = tl.load(qm_ptr + rows, mask=r_ok, other=0) != 0
        acc = tl.where(valid[:, None], acc, 0.0)
    tl.store(s_ptr + out, acc, mask=m)


def centroid_scores(
    queries: torch.Tensor,
    centroids: torch.Tensor,
    n_probe: int,
    queries_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton centroid_scores (arguments validated by edgeplaid.ops.centroid_scores).

    queries (nq, Lq, dim) fp32/fp16/bf16; centroids (C, dim) fp32/fp16/bf16; 1 <= n_probe <= C;
    queries_mask (nq, Lq) bool or None. Returns scores (nq, Lq, C) fp32 (0 on masked tokens)
    and top_ids (nq, Lq, n_probe) int64 (best first, ties to the lower id, -1 on masked
    tokens). Half centroids: dots in their dtype (fp32 queries split in pieces); fp32:
    3-pass TF32.
    """
    check_cuda_or_interpret(queries, centroids, queries_mask)
    nq, lq, dim = queries.shape
    n_cent = centroids.shape[0]
    n_rows = nq * lq
    device = queries.device
    scores = torch.empty(nq, lq, n_cent, dtype=torch.float32, device=device)
    if n_rows == 0:
        return scores, torch.empty(nq, lq, n_probe, dtype=torch.int64, device=device)
    pieces, n_pieces = query_pieces(queries, centroids.dtype)
    block_m = block(n_rows, hi=32)
    kpad = triton.next_power_of_2(n_probe)
    kout = kpad if kpad < BLOCK_C and TOPK_IN_KERNEL else BLOCK_C
    n_blocks = triton.cdiv(n_cent, BLOCK_C)
    keys = torch.empty(n_rows, n_blocks * kout, dtype=torch.int64, device=device)
    _centroid_scores_kernel[(n_blocks, triton.cdiv(n_rows, block_m))](
        pieces,
        mask_u8(queries_mask, queries),
        centroids,
        scores,
        keys,
        n_rows,
        n_cent,
        n_rows * dim,
        keys.shape[1],
        dim,
        HAS_QMASK=queries_mask is not None,
        PIECES=n_pieces,
        F32_DOT=centroids.dtype == torch.float32,
        UPCAST=upcast_for_interpreter(centroids.dtype),
        BLOCK_M=block_m,
        BLOCK_K=block(dim),
        BLOCK_C=BLOCK_C,
        KOUT=kout,
    )
    top = torch.topk(keys, n_probe, dim=1, sorted=True).values
    ids = (n_cent - 1) - (top & 0xFFFFFFFF)
    if queries_mask is not None:
        ids = ids.masked_fill(~queries_mask.reshape(n_rows, 1), -1)
    return scores, ids.reshape(nq, lq, n_probe)
