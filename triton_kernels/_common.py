"""Pieces shared by the Triton kernels and launchers of edgeplaid.

* ``INTERPRET``: True under ``TRITON_INTERPRET=1`` (CPU tensors, numpy semantics).
* ``autotune``: ``triton.autotune`` on a GPU; a single fixed config under the interpreter,
  where benchmarking configs would only multiply test time.
* ``query_pieces``: queries split into pieces of the documents' dtype, so that tensor-core
  dots of half documents keep fp32 queries (nearly) exact.
* ``dot``: ``tl.dot`` with fp32 accumulation; fp32 operands use the 3-pass TF32 scheme.
* ``maxsim_doc``: Σ_valid i max_valid j ⟨q_i, d_j⟩ of one query against one token range.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# Grid axes 1 and 2 are limited to 65,535 blocks; axis 0 to 2**31 - 1.
MAX_GRID_YZ = 65535
# A constexpr: jitted code may only read module globals that are constexprs.
NEG_INF = tl.constexpr(float("-inf"))


class _Fixed:
    """Launches ``fn[grid](...)`` with one config's meta-parameters (interpreter mode)."""

    def __init__(self, fn: Any, config: dict[str, Any]) -> None:
        self.fn = fn
        self.config = config

    def __getitem__(self, grid: Any) -> Callable[..., Any]:
        launch = self.fn[grid]

        def run(*args: Any, **kwargs: Any) -> Any:
            return launch(*args, **kwargs, **self.config)

        return run


def autotune(configs: Sequence[triton.Config], key: list[str], interpret: dict[str, Any]) -> Callable:
    """``triton.autotune(configs, key)`` on a GPU. Fixed meta-parameters instead: ``interpret``
    under the interpreter (the autotuner would time every config on the CPU), and the first
    config when ``EDGEPLAID_TRITON_AUTOTUNE=0`` (tests: one compile per variant, no timing)."""

    def wrap(fn: Any) -> Any:
        if INTERPRET:
            return _Fixed(fn, interpret)
        if os.environ.get("EDGEPLAID_TRITON_AUTOTUNE", "1") == "0":
            first = configs[0]
            return _Fixed(fn, {**first.kwargs, "num_warps": first.num_warps, "num_stages": first.num_stages})
        extra = {}
        if "cache_results" in inspect.signature(triton.autotune).parameters:
            extra["cache_results"] = True  # autotune once per machine, not once per process
        return triton.autotune(configs=list(configs), key=key, **extra)(fn)

    return wrap


def block(n: int, lo: int = 16, hi: int | None = None) -> int:
    """Next power of two >= n, clamped to [lo, hi] (tl.dot needs every side >= 16)."""
    b = max(lo, triton.next_power_of_2(max(int(n), 1)))
    return b if hi is None else min(b, hi)


def query_pieces(queries: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, int]:
    """queries (nq, Lq, dim) -> pieces (S, nq, Lq, dim) in ``dtype`` with Σ_s pieces[s] ≈ queries.

    p_s = dtype(q - Σ_{r<s} p_r): one piece when the dtypes agree (or dtype is fp32), two for
    fp16 documents (22 mantissa bits), three for bf16 documents (24 bits), so that ⟨q, d⟩
    over half documents d keeps fp32 queries within an fp32 rounding of the reference at the
    cost of S tensor-core dots (MaxSim is bandwidth-bound: the extra dots are free). Caveat:
    query values beyond the half dtype's range overflow (fp16: |q| > 65504).
    """
    if queries.dtype == dtype or dtype == torch.float32:
        return queries.to(dtype).contiguous().unsqueeze(0), 1
    n = 2 if dtype == torch.float16 else 3
    rest = queries.float()
    pieces = []
    for _ in range(n):
        p = rest.to(dtype)
        pieces.append(p)
        rest = rest - p.float()
    return torch.stack(pieces).contiguous(), n


def mask_u8(mask: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """A bool mask as uint8 (what the kernels load), or a 1-element dummy when absent."""
    if mask is None:
        return torch.zeros(1, dtype=torch.uint8, device=like.device)
    return mask.view(torch.uint8)


def upcast_for_interpreter(dtype: torch.dtype) -> bool:
    """The interpreter's bf16 tl.dot returns garbage (triton 3.9): widen bf16 operands to fp32
    there. Products of two bf16 values are exact in fp32, so the result is what tensor cores
    computing in fp32 accumulation return."""
    return INTERPRET and dtype == torch.bfloat16


@triton.jit
def dot(a, b, acc, F32_DOT: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b in fp32. F32_DOT: fp32 operands, 3-pass TF32 (≈ fp32 accuracy on tensor
    cores). UPCAST: widen to fp32 first (interpreter only, see upcast_for_interpreter)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    elif F32_DOT:
        return tl.dot(a, b, acc, input_precision="tf32x3")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def load_query_tile(q_ptr, rows, offs_k, lq, dim):
    """Rows ``rows`` of one query (rows of ``dim`` elements) -> (len(rows), BLOCK_K), zero padded."""
    m = (rows[:, None] < lq) & (offs_k[None, :] < dim)
    return tl.load(q_ptr + rows[:, None] * dim + offs_k[None, :], mask=m, other=0.0)


@triton.jit
def sim_tile(qa, qb, qc, dt, PIECES: tl.constexpr, F32_DOT: tl.constexpr, UPCAST: tl.constexpr):
    """Σ_s q_s @ dt: (BLOCK_Q, BLOCK_K) x (BLOCK_K, BLOCK_T) -> (BLOCK_Q, BLOCK_T) fp32."""
    s = dot(qa, dt, None, F32_DOT, UPCAST)
    if PIECES >= 2:
        s = dot(qb, dt, s, F32_DOT, UPCAST)
    if PIECES >= 3:
        s = dot(qc, dt, s, F32_DOT, UPCAST)
    return s


@triton.jit
def doc_span(cand_ptr, off_ptr, qi, col, n_out, n_docs, HAS_CAND: tl.constexpr):
    """(ok, start, length) of the document that column ``col`` of query ``qi`` scores: its
    candidate id (HAS_CAND) or ``col`` itself. Never trusts an id: -1 (padding) and anything
    out of range give ok=False and length 0, so nothing is read and the score is -inf."""
    if HAS_CAND:
        doc = tl.load(cand_ptr + qi * n_out + col)
    else:
        doc = col
    ok = (doc >= 0) & (doc < n_docs)
    doc = tl.where(ok, doc, 0)
    start = tl.load(off_ptr + doc)
    length = tl.where(ok, tl.load(off_ptr + doc + 1) - start, 0)
    return ok, start, length


@triton.jit
def add_valid_rows(total, best, qm_ptr, rows, row_ok, HAS_QMASK: tl.constexpr):
    """total + best on the valid query rows (in range and unmasked): masked rows add 0."""
    valid = row_ok
    if HAS_QMASK:
        valid = valid & (tl.load(qm_ptr + rows, mask=row_ok, other=0) != 0)
    return total + tl.where(valid, best, 0.0)


@triton.jit
def maxsim_doc(
    q_ptr,
    qm_ptr,
    tok_ptr,
    tm_ptr,
    start,
    length,
    lq,
    dim,
    piece_stride,
    HAS_QMASK: tl.constexpr,
    HAS_TMASK: tl.constexpr,
    PIECES: tl.constexpr,
    F32_DOT: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Σ_{valid i} max_{valid j} ⟨q_i, tok[start + j]⟩ for j in [0, length): fp32 scalar.

    q_ptr: one query's first row (piece 0), rows of ``dim`` elements, pieces ``piece_stride``
    apart; qm_ptr: its mask row (uint8). tok_ptr: token rows of ``dim`` elements; tm_ptr:
    their uint8 mask (HAS_TMASK). No valid token -> -inf for each valid query row; no valid
    query row -> 0.
    """
    offs_k = tl.arange(0, BLOCK_K)
    k_ok = offs_k < dim
    total = tl.zeros([BLOCK_Q], dtype=tl.float32)
    for q0 in range(0, lq, BLOCK_Q):
        rows = q0 + tl.arange(0, BLOCK_Q)
        row_ok = rows < lq
        qa = load_query_tile(q_ptr, rows, offs_k, lq, dim)
        # Unused pieces alias piece 0 (never read: sim_tile stops at PIECES).
        qb = qa
        qc = qa
        if PIECES >= 2:
            qb = load_query_tile(q_ptr + piece_stride, rows, offs_k, lq, dim)
        if PIECES >= 3:
            qc = load_query_tile(q_ptr + 2 * piece_stride, rows, offs_k, lq, dim)
        best = tl.full([BLOCK_Q], NEG_INF, dtype=tl.float32)
        for t0 in range(0, length, BLOCK_T):
            toks = t0 + tl.arange(0, BLOCK_T)
            t_in = toks < length
            rows_t = (start + toks).to(tl.int64)
            d = tl.load(
                tok_ptr + rows_t[:, None] * dim + offs_k[None, :],
                mask=t_in[:, None] & k_ok[None, :],
                other=0.0,
            )
            s = sim_tile(qa, qb, qc, tl.trans(d), PIECES, F32_DOT, UPCAST)
            t_ok = t_in
            if HAS_TMASK:
                t_ok = t_ok & (tl.load(tm_ptr + rows_t, mask=t_in, other=0) != 0)
            s = tl.where(t_ok[None, :], s, NEG_INF)
            best = tl.maximum(best, tl.max(s, axis=1))
        total = add_valid_rows(total, best, qm_ptr, rows, row_ok, HAS_QMASK)
    return tl.sum(total, axis=0)


def grid_groups(n_items: int, n_cols: int, target_programs: int = 8192) -> tuple[int, int]:
    """Split n_items (queries) into groups for grid axis 1: (items per program, groups).

    One program scores one column (document) for a group of queries, so a document is read
    from HBM once per group; groups only multiply until the grid fills the GPU."""
    groups = max(1, min(n_items, -(-target_programs // max(n_cols, 1)), MAX_GRID_YZ))
    per = -(-n_items // groups)
    groups = -(-n_items // per)
    while groups > MAX_GRID_YZ:
        per += 1
        groups = -(-n_items // per)
    return per, groups


def check_cuda_or_interpret(*tensors: torch.Tensor | None) -> None:
    """The Triton backend runs CUDA tensors, or CPU tensors under TRITON_INTERPRET=1."""
    for t in tensors:
        if t is None:
            continue
        if t.device.type != "cuda" and not INTERPRET:
            raise ValueError(f"backend: 'triton' needs CUDA tensors (or TRITON_INTERPRET=1), got {t.device}")


@triton.jit
def _spread(v, NBITS: tl.constexpr, SHIFT: tl.constexpr):
    """Packed bytes (T, B) int32 -> their (T, B · 8 / NBITS / 2**SHIFT) fields, in dimension order.

    Field j of byte i (bits [j·nbits, (j+1)·nbits)) is dimension i·(8 / nbits) + j. Splitting
    the fields into the even and odd ones and interleaving them recursively puts every field
    in its place: one contiguous load of the packed row instead of one byte load per dim.
    """
    if NBITS * (1 << SHIFT) == 8:
        return v & ((1 << NBITS) - 1)
    else:
        even = _spread(v, NBITS, SHIFT + 1)
        odd = _spread(v >> (NBITS << SHIFT), NBITS, SHIFT + 1)
        return tl.interleave(even, odd)


@triton.jit
def decode_tile(codes_ptr, res_ptr, cent_ptr, w_ptr, toks, t_in, offs_k, dim, n_cent, NBITS: tl.constexpr):
    """Tokens ``toks`` (BLOCK_T,) int64 of a PLAID index -> (BLOCK_T, BLOCK_K) fp32 unit vectors.

    token[t] = normalize(centroids[codes[t]] + bucket_weights[b_t]), normalize(x) =
    x / max(‖x‖₂, 1e-12); dimension d's bucket index b_t[d] is bits [d·nbits, (d+1)·nbits) of
    residual row t read as a little-endian bit string (byte d·nbits // 8, from bit
    d·nbits % 8). Rows outside ``t_in`` and padded dims (>= dim) are 0. A code outside
    [0, n_cent) reads no centroid (the launchers report such codes where they can).
    """
    BLOCK_K: tl.constexpr = offs_k.shape[0]
    ROW_BYTES_PAD: tl.constexpr = BLOCK_K * NBITS // 8
    k_ok = offs_k < dim
    m = t_in[:, None] & k_ok[None, :]
    code = tl.load(codes_ptr + toks, mask=t_in, other=0).to(tl.int64)
    code_ok = (code >= 0) & (code < n_cent)
    cent = tl.load(
        cent_ptr + tl.where(code_ok, code, 0)[:, None] * dim + offs_k[None, :],
        mask=m & code_ok[:, None],
        other=0.0,
    ).to(tl.float32)
    row_bytes = dim * NBITS // 8
    offs_b = tl.arange(0, ROW_BYTES_PAD)
    packed = tl.load(
        res_ptr + toks[:, None] * row_bytes + offs_b[None, :],
        mask=t_in[:, None] & (offs_b < row_bytes)[None, :],
        other=0,
    ).to(tl.int32)
    bucket = _spread(packed, NBITS, 0)  # (BLOCK_T, BLOCK_K)
    v = cent + tl.load(w_ptr + bucket)  # the (2**nbits,) table stays in L1
    v = tl.where(m, v, 0.0)
    norm = tl.sqrt(tl.sum(v * v, axis=1))
    return v / tl.maximum(norm, 1e-12)[:, None]
