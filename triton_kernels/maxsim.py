"""maxsim on the GPU: MaxSim of padded queries against padded documents.

score[q, n] = Σ_{valid i} max_{valid j} ⟨queries[q, i], documents[n, j]⟩.

Grid: axis 0 = document, axis 1 = group of queries; a program reads its document once from
HBM and scores it against its group of queries (repeat reads hit L1/L2). Tiles: (BLOCK_Q
query tokens) x (BLOCK_T document tokens) x (dim padded to a power of two), tl.dot with fp32
accumulation; the document mask turns masked tokens into -inf before the max.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from edgeplaid.triton_kernels._common import (
    autotune,
    block,
    check_cuda_or_interpret,
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


@autotune(_CONFIGS, key=["dim", "lq"], interpret={"BLOCK_T": 32})
@triton.jit(do_not_specialize=["nq", "nd", "ld", "q_per_prog", "piece_stride"])
def _maxsim_kernel(
    q_ptr,  # (S, nq, lq, dim) query pieces in the dot dtype
    qm_ptr,  # (nq, lq) uint8
    d_ptr,  # (nd, ld, dim)
    dm_ptr,  # (nd, ld) uint8
    out_ptr,  # (nq, nd) fp32
    nq,
    nd,
    q_per_prog,
    piece_stride,
    lq,
    ld,
    dim,
    HAS_QMASK: tl.constexpr,
    HAS_DMASK: tl.constexpr,
    PIECES: tl.constexpr,
    F32_DOT: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    doc = tl.program_id(0).to(tl.int64)
    q_lo = tl.program_id(1).to(tl.int64) * q_per_prog
    q_hi = tl.minimum(q_lo + q_per_prog, nq)
    for qi in range(q_lo, q_hi):
        score = maxsim_doc(
            q_ptr + qi * lq * dim,
            qm_ptr + qi * lq,
            d_ptr,
            dm_ptr,
            doc * ld,
            ld,
            lq,
            dim,
            piece_stride,
            HAS_QMASK,
            HAS_DMASK,
            PIECES,
            F32_DOT,
            UPCAST,
            BLOCK_Q,
            BLOCK_T,
            BLOCK_K,
        )
        tl.store(out_ptr + qi * nd + doc, score)


def maxsim(
    queries: torch.Tensor,
    documents: torch.Tensor,
    queries_mask: torch.Tensor | None = None,
    documents_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton maxsim (arguments validated by edgeplaid.ops.maxsim).

    queries (nq, Lq, dim), documents (nd, Ld, dim): fp32/fp16/bf16; masks (nq, Lq), (nd, Ld)
    bool or None. Returns (nq, nd) fp32: Σ_{valid i} max_{valid j} ⟨q_i, d_j⟩; -inf for a
    document without valid token, 0 for a query without valid token.
    """
    check_cuda_or_interpret(queries, documents, queries_mask, documents_mask)
    nq, lq, dim = queries.shape
    nd, ld, _ = documents.shape
    out = torch.empty(nq, nd, dtype=torch.float32, device=queries.device)
    if nq == 0 or nd == 0:
        return out
    pieces, n_pieces = query_pieces(queries, documents.dtype)
    per, groups = grid_groups(nq, nd)
    _maxsim_kernel[(nd, groups)](
        pieces,
        mask_u8(queries_mask, queries),
        documents,
        mask_u8(documents_mask, documents),
        out,
        nq,
        nd,
        per,
        nq * lq * dim,
        lq,
        ld,
        dim,
        HAS_QMASK=queries_mask is not None,
        HAS_DMASK=documents_mask is not None,
        PIECES=n_pieces,
        F32_DOT=documents.dtype == torch.float32,
        UPCAST=upcast_for_interpreter(documents.dtype),
        BLOCK_Q=block(lq, hi=64),
        BLOCK_K=block(dim),
    )
    return out
