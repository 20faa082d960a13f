"""compress_residuals: token vectors + their centroid codes -> packed residuals and inv_norm.

The inverse of :func:`edgeplaid.ops.decompress_residuals`, one pass per token (index building).
"""

from __future__ import annotations

from typing import Any

import torch

from edgeplaid.ops import _validate as v
from edgeplaid.ops import cpp_backend as cpp
from edgeplaid.ops import reference
from edgeplaid.ops.dispatch import register, resolve


def compress_residuals(
    tokens: Any,
    codes: Any,
    centroids: Any,
    bucket_cutoffs: Any,
    bucket_weights: Any,
    nbits: int,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual codes of tokens against their centroids, and the norms the decoders divide by.

    r = tokens[t] - centroids[codes[t]] (fp32); dimension d's bucket b_t[d] = #{j :
    bucket_cutoffs[j] < r[d]} (``torch.bucketize(r, bucket_cutoffs)``); residuals[t] packs b_t in
    decompress_residuals' bit order (dimension d at bits [d * nbits, (d + 1) * nbits) of the row
    read as a little-endian bit string); inv_norm[t] = 1 / max(‖centroids[codes[t]] +
    bucket_weights[b_t]‖₂, 1e-12), the squared norm summed in one fixed order on every backend
    (16 lane sums folded in halves: reference._sum_squares16), so the backends agree bit for bit
    (:func:`edgeplaid.ops.residual_inv_norms` sums in torch's order: within fp32 rounding).

    Args:
        tokens: (n, dim) float32, float16 or bfloat16.
        codes: (n,) uint16, int32 or int64 centroid ids in [0, C).
        centroids: (C, dim) float32, float16 or bfloat16 (widened to fp32).
        bucket_cutoffs: (2**nbits - 1,) float32, non-decreasing.
        bucket_weights: (2**nbits,) float32.
        nbits: 1, 2, 4 or 8; dim * nbits must be a multiple of 8.
        backend: "cpp" or "reference"; None picks by device.

    Returns:
        residuals (n, dim * nbits / 8) uint8 and inv_norm (n,) float32.
    """
    x = v.float_tensor(tokens, "tokens", 2, "(n_tokens, dim)")
    cents, weights, n = v.codec(centroids, bucket_weights, nbits, x.shape[1], x.device)
    c = v.codes(codes, x.device)
    v.check_size(c, "codes", 0, x.shape[0], "one per token")
    cut = v.float_tensor(bucket_cutoffs, "bucket_cutoffs", 1, "(2**nbits - 1,)")
    v.check_size(cut, "bucket_cutoffs", 0, (1 << n) - 1, "2**nbits - 1")
    v.check_device("bucket_cutoffs", cut, x.device)
    if cut.numel() > 1 and bool((cut[1:] < cut[:-1]).any()):
        raise ValueError("bucket_cutoffs: expected non-decreasing values")
    cut, weights = cut.float().contiguous(), weights.float().contiguous()
    return resolve("compress_residuals", x.device, backend)(x, c, cents, cut, weights, n)


def _cpp(x, codes, centroids, cutoffs, weights, nbits):
    res, inv = cpp.C.compress_residuals(
        cpp.host(x),
        cpp.dtype_name(x),
        cpp.host(codes),
        cpp.host(centroids),
        cpp.dtype_name(centroids),
        cpp.host(cutoffs),
        cpp.host(weights),
        nbits,
    )
    return torch.from_numpy(res), torch.from_numpy(inv)


register("compress_residuals", "reference", reference.compress_residuals)
register("compress_residuals", "cpp", _cpp)
