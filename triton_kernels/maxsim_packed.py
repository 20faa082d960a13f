"""maxsim_packed on the GPU: MaxSim against ragged documents packed back to back.

score[q, c] = Σ_{valid i} max_{j in doc} ⟨queries[q, i], doc_tokens[j]⟩, doc = candidates[q, c]
(or c itself when candidates is None), doc's tokens doc_tokens[doc_offsets[doc] :
doc_offsets[doc + 1]]. The kernel walks the offsets itself: no host-side padding.

Grid: axis 0 = candidate slot / document, axis 1 = group of queries. In the all-documents
form a program scores one document against a group of queries, so each document is read
from HBM once per group (later queries hit L1/L2); in the candidates form a program scores
one (query, candidate) pair. Tiles: (BLOCK_Q query tokens) x (BLOCK_T document tokens) x
(dim padded to a power of two, BLOCK_K), tl.dot with fp32 accumulation.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from edgeplaid.triton_kernels._common import (
    NEG_INF,
    autotune,
    block,
    check_cuda_or_interpret,
    doc_span,
    grid_groups,
    mask_u8,
    maxsim_doc,
    query_pieces,
    upcast_for_interpreter,
)

# The first config is the default when EDGEPLAID_TRITON_AUTOTUNE=0.
_CONFIGS = [
    triton.Config({"BLOCK_T": bt}, num_warps=w, num_stages=s)
    for bt, w, s in [(64, 4, 3), (32, 2, 3), (64, 4, 4), (128, 4, 3), (128, 8, 3)]
]


@autotune(_CONFIGS, key=["dim", "lq", "HAS_CAND"], interpret={"BLOCK_T": 32})
@triton.jit(do_not_specialize=["nq", "n_out", "n_docs", "q_per_prog", "piece_stride"])
def _maxsim_packed_kernel(
    q_ptr,  # (S, nq, lq, dim) query pieces in the dot dtype
    qm_ptr,  # (nq, lq) uint8
    tok_ptr,  # (n_tokens, dim)
    off_ptr,  # (n_docs + 1,) int64
    cand_ptr,  # (nq, n_out) int64
    out_ptr,  # (nq, n_out) fp32
    nq,
    n_out,
    n_docs,
    q_per_prog,
    piece_stride,
    lq,
    dim,
    HAS_CAND: tl.constexpr,
    HAS_QMASK: tl.constexpr,
    PIECES: tl.constexpr,
    F32_DOT: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    col = tl.program_id(0).to(tl.int64)
    # int64 bounds: the loop index (and every offset built from it) is int64 on the GPU.
    q_lo = tl.program_id(1).to(tl.int64) * q_per_prog
    q_hi = tl.minimum(q_lo + q_per_prog, nq)
    for qi64 in range(q_lo, q_hi):
        ok, start, length = doc_span(cand_ptr, off_ptr, qi64, col, n_out, n_docs, HAS_CAND)
        score = maxsim_doc(
            q_ptr + qi64 * lq * dim,
            qm_ptr + qi64 * lq,
            tok_ptr,
            tok_ptr,
            start,
            length,
            lq,
            dim,
            piece_stride,
            HAS_QMASK,
            False,
            PIECES,
            F32_DOT,
            UPCAST,
            BLOCK_Q,
            BLOCK_T,
            BLOCK_K,
        )
        tl.store(out_ptr + qi64 * n_out + col, tl.where(ok, score, NEG_INF))


def maxsim_packed(
    queries: torch.Tensor,
    doc_tokens: torch.Tensor,
    doc_offsets: torch.Tensor,
    candidates: torch.Tensor | None = None,
    queries_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton maxsim_packed (arguments validated by edgeplaid.ops.maxsim_packed).

    queries (nq, Lq, dim) fp32/fp16/bf16; doc_tokens (n_tokens, dim) fp32/fp16/bf16;
    doc_offsets (nd + 1,) int64; candidates (nq, nc) int64 or None; queries_mask (nq, Lq)
    bool or None. Returns (nq, nc) or (nq, nd) fp32:
    score = Σ_{valid i} max_{j in doc} ⟨q_i, t_j⟩, -inf for empty documents and -1 slots.
    Half documents: dots in their dtype (fp32 queries split in pieces, see query_pieces);
    fp32 documents: 3-pass TF32 dots.
    """
    check_cuda_or_interpret(queries, doc_tokens, doc_offsets, candidates, queries_mask)
    nq, lq, dim = queries.shape
    n_docs = doc_offsets.shape[0] - 1
    n_out = n_docs if candidates is None else candidates.shape[1]
    out = torch.empty(nq, n_out, dtype=torch.float32, device=queries.device)
    if nq == 0 or n_out == 0:
        return out
    pieces, n_pieces = query_pieces(queries, doc_tokens.dtype)
    if candidates is None:
        per, groups = grid_groups(nq, n_out)
    else:
        per, groups = grid_groups(nq, n_out, target_programs=1 << 62)  # one query per program
    _maxsim_packed_kernel[(n_out, groups)](
        pieces,
        mask_u8(queries_mask, queries),
        doc_tokens,
        doc_offsets,
        candidates if candidates is not None else doc_offsets,
        out,
        nq,
        n_out,
        n_docs,
        per,
        nq * lq * dim,
        lq,
        dim,
        HAS_CAND=candidates is not None,
        HAS_QMASK=queries_mask is not None,
        PIECES=n_pieces,
        F32_DOT=doc_tokens.dtype == torch.float32,
        UPCAST=upcast_for_interpreter(doc_tokens.dtype),
        BLOCK_Q=block(lq, hi=64),
        BLOCK_K=block(dim),
    )
    return out
