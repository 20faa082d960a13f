"""fused_decompress_maxsim on the GPU: MaxSim straight from PLAID's compressed form.

score[q, c] = Σ_{valid i} max_{t in doc} ⟨queries[q, i], token[t]⟩, doc = candidates[q, c]
(or c when candidates is None), token[t] = normalize(centroids[codes[t]] +
bucket_weights[b_t]) (formula and bit order: decompress_residuals). Each program decodes
BLOCK_T tokens of its document into registers (fp32, then the dot dtype) and MaxSims them
there: the decompressed documents never exist in memory. Grid as maxsim_packed: axis 0 =
candidate slot / document, axis 1 = group of queries (all-documents form: a document's
compressed bytes come from HBM once per group).
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
    decode_tile,
    doc_span,
    dot,
    grid_groups,
    load_query_tile,
    mask_u8,
    upcast_for_interpreter,
)

from edgeplaid.ops.reference import check_codes

# The first config is the default when EDGEPLAID_TRITON_AUTOTUNE=0.
_CONFIGS = [
    triton.Config({"BLOCK_T": bt}, num_warps=w, num_stages=s)
    for bt, w, s in [(64, 4, 2), (32, 4, 2), (64, 8, 3), (128, 8, 2)]
]


@autotune(_CONFIGS, key=["dim", "lq", "NBITS", "HAS_CAND"], interpret={"BLOCK_T": 32})
@triton.jit(do_not_specialize=["nq", "n_out", "n_docs", "q_per_prog", "n_cent"])
def _fused_decompress_maxsim_kernel(
    q_ptr,  # (nq, lq, dim) queries (fp32: 3-pass TF32 dots; half: dots in that dtype)
    qm_ptr,  # (nq, lq) uint8
    codes_ptr,  # (n_tokens,) int32/int64
    res_ptr,  # (n_tokens, dim * nbits / 8) uint8
    off_ptr,  # (n_docs + 1,) int64
    cand_ptr,  # (nq, n_out) int64
    cent_ptr,  # (C, dim)
    w_ptr,  # (2**nbits,) fp32
    out_ptr,  # (nq, n_out) fp32
    nq,
    n_out,
    n_docs,
    q_per_prog,
    n_cent,
    lq,
    dim,
    NBITS: tl.constexpr,
    HAS_CAND: tl.constexpr,
    HAS_QMASK: tl.constexpr,
    F32_DOT: tl.constexpr,
    D_PIECES: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    col = tl.program_id(0).to(tl.int64)
    q_lo = tl.program_id(1).to(tl.int64) * q_per_prog
    q_hi = tl.minimum(q_lo + q_per_prog, nq)
    offs_k = tl.arange(0, BLOCK_K)
    for qi in range(q_lo, q_hi):
        ok, start, length = doc_span(cand_ptr, off_ptr, qi, col, n_out, n_docs, HAS_CAND)
        total = tl.zeros([BLOCK_Q], dtype=tl.float32)
        for q0 in range(0, lq, BLOCK_Q):
            rows = q0 + tl.arange(0, BLOCK_Q)
            row_ok = rows < lq
            q = load_query_tile(q_ptr + qi * lq * dim, rows, offs_k, lq, dim)
            best = tl.full([BLOCK_Q], NEG_INF, dtype=tl.float32)
            for t0 in range(0, length, BLOCK_T):
                toks = start + t0 + tl.arange(0, BLOCK_T)
                t_in = (t0 + tl.arange(0, BLOCK_T)) < length
                d = decode_tile(codes_ptr, res_ptr, cent_ptr, w_ptr, toks, t_in, offs_k, dim, n_cent, NBITS)
                # Half queries: the fp32 tile is split into D_PIECES pieces of their dtype
                # (22 / 24 mantissa bits), so tensor-core dots keep it (nearly) unrounded.
                piece = d.to(q.dtype)
                s = dot(q, tl.trans(piece), None, F32_DOT, UPCAST)
                if D_PIECES >= 2:
                    d = d - piece.to(tl.float32)
                    piece = d.to(q.dtype)
                    s = dot(q, tl.trans(piece), s, F32_DOT, UPCAST)
                if D_PIECES >= 3:
                    d = d - piece.to(tl.float32)
                    s = dot(q, tl.trans(d.to(q.dtype)), s, F32_DOT, UPCAST)
                s = tl.where(t_in[None, :], s, NEG_INF)
                best = tl.maximum(best, tl.max(s, axis=1))
            total = add_valid_rows(total, best, qm_ptr + qi * lq, rows, row_ok, HAS_QMASK)
        tl.store(out_ptr + qi * n_out + col, tl.where(ok, tl.sum(total, axis=0), NEG_INF))


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
    """Triton fused_decompress_maxsim (arguments validated by edgeplaid.ops).

    queries (nq, Lq, dim) fp32/fp16/bf16; codes (n_tokens,) int32/int64; residuals
    (n_tokens, dim * nbits / 8) uint8; doc_offsets (nd + 1,) int64; candidates (nq, nc) int64
    or None; centroids (C, dim) fp32/fp16/bf16; bucket_weights (2**nbits,) float; queries_mask
    (nq, Lq) bool or None. Returns (nq, nc) or (nq, nd) fp32. Tokens are decoded in fp32; the
    dots run in the queries' dtype (fp32: 3-pass TF32; half: the decoded tile split into 2
    (fp16) or 3 (bf16) pieces of that dtype, so it is not rounded). Bad codes: ValueError on
    CPU tensors, read as no centroid on CUDA (a check would synchronise).
    """
    check_cuda_or_interpret(queries, codes, residuals, doc_offsets, candidates, centroids, bucket_weights)
    if codes.device.type == "cpu":
        check_codes(codes, centroids.shape[0])
    nq, lq, dim = queries.shape
    n_docs = doc_offsets.shape[0] - 1
    n_out = n_docs if candidates is None else candidates.shape[1]
    out = torch.empty(nq, n_out, dtype=torch.float32, device=queries.device)
    if nq == 0 or n_out == 0:
        return out
    if candidates is None:
        per, groups = grid_groups(nq, n_out)
    else:
        per, groups = grid_groups(nq, n_out, target_programs=1 << 62)
    _fused_decompress_maxsim_kernel[(n_out, groups)](
        queries,
        mask_u8(queries_mask, queries),
        codes,
        residuals,
        doc_offsets,
        candidates if candidates is not None else doc_offsets,
        centroids,
        bucket_weights.float().contiguous(),
        out,
        nq,
        n_out,
        n_docs,
        per,
        centroids.shape[0],
        lq,
        dim,
        NBITS=nbits,
        HAS_CAND=candidates is not None,
        HAS_QMASK=queries_mask is not None,
        F32_DOT=queries.dtype == torch.float32,
        D_PIECES={torch.float32: 1, torch.float16: 2, torch.bfloat16: 3}[queries.dtype],
        UPCAST=upcast_for_interpreter(queries.dtype),
        BLOCK_Q=block(lq, hi=64),
        BLOCK_K=block(dim),
    )
    return out
