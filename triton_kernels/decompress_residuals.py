"""decompress_residuals on the GPU: PLAID codes + packed residuals -> normalised vectors.

token[t] = normalize(centroids[codes[t]] + bucket_weights[b_t]), normalize(x) =
x / max(‖x‖₂, 1e-12), b_t[d] = bits [d·nbits, (d+1)·nbits) of residual row t read as a
little-endian bit string (README, pinned by tests/ops/test_decompress_residuals.py).
Grid: one program per BLOCK_T tokens; the whole (padded) dim of a token is one tile row, so
the L2 norm is a row reduction in registers.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from edgeplaid.triton_kernels._common import autotune, block, check_cuda_or_interpret, decode_tile

from edgeplaid.ops.reference import check_codes

# The first config is the default when EDGEPLAID_TRITON_AUTOTUNE=0.
_CONFIGS = [
    triton.Config({"BLOCK_T": bt}, num_warps=w, num_stages=2) for bt, w in [(64, 4), (32, 4), (128, 8)]
]


@autotune(_CONFIGS, key=["dim", "NBITS"], interpret={"BLOCK_T": 64})
@triton.jit(do_not_specialize=["n", "n_cent"])
def _decompress_residuals_kernel(
    codes_ptr,  # (n,) int32/int64
    res_ptr,  # (n, dim * nbits / 8) uint8
    cent_ptr,  # (C, dim)
    w_ptr,  # (2**nbits,) fp32
    out_ptr,  # (n, dim), dtype of centroids
    n,
    n_cent,
    dim,
    NBITS: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    toks = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_in = toks < n
    offs_k = tl.arange(0, BLOCK_K)
    v = decode_tile(codes_ptr, res_ptr, cent_ptr, w_ptr, toks, t_in, offs_k, dim, n_cent, NBITS)
    m = t_in[:, None] & (offs_k < dim)[None, :]
    tl.store(out_ptr + toks[:, None] * dim + offs_k[None, :], v.to(out_ptr.dtype.element_ty), mask=m)


def decompress_residuals(
    codes: torch.Tensor,
    residuals: torch.Tensor,
    centroids: torch.Tensor,
    bucket_weights: torch.Tensor,
    nbits: int,
) -> torch.Tensor:
    """Triton decompress_residuals (arguments validated by edgeplaid.ops.decompress_residuals).

    codes (n,) int32/int64 in [0, C); residuals (n, dim * nbits / 8) uint8; centroids (C, dim)
    fp32/fp16/bf16; bucket_weights (2**nbits,) float; nbits 1/2/4/8. Returns (n, dim) in the
    dtype of centroids, computed in fp32. Codes are range-checked (ValueError) on CPU tensors;
    on CUDA that would synchronise, so the kernel reads no centroid for a bad code instead.
    """
    check_cuda_or_interpret(codes, residuals, centroids, bucket_weights)
    if codes.device.type == "cpu":
        check_codes(codes, centroids.shape[0])
    n = codes.shape[0]
    dim = centroids.shape[1]
    out = torch.empty(n, dim, dtype=centroids.dtype, device=centroids.device)
    if n == 0:
        return out
    weights = bucket_weights.float().contiguous()

    def grid(meta: dict) -> tuple[int]:
        return (triton.cdiv(n, meta["BLOCK_T"]),)

    _decompress_residuals_kernel[grid](
        codes, residuals, centroids, weights, out, n, centroids.shape[0], dim, NBITS=nbits, BLOCK_K=block(dim)
    )
    return out
