"""decompress_residuals: PLAID codes + packed residuals -> normalised token vectors."""

from __future__ import annotations

from typing import Any

import torch

from edgeplaid.ops import _validate as v
from edgeplaid.ops import bundles as b
from edgeplaid.ops import cpp_backend as cpp
from edgeplaid.ops import reference, triton_backend
from edgeplaid.ops.dispatch import register, resolve


def decompress_residuals(
    codes: Any,
    residuals: Any,
    centroids: Any,
    bucket_weights: Any = None,
    nbits: int | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """token[t] = normalize(centroids[codes[t]] + bucket_weights[b_t]),  normalize(x) = x / max(‖x‖₂, 1e-12).

    b_t[d] is dimension d's bucket index in residuals[t]. Bit order: a residual row is a
    little-endian bit string; dimension d occupies bits [d * nbits, (d + 1) * nbits), i.e.
    byte d * nbits // 8 starting at bit (d * nbits) % 8 from the least significant. For
    nbits = 4: byte 0 holds dim 0 in its low nibble and dim 1 in its high nibble. (colbert-ai
    writes the bits of each dimension reversed, most significant byte bit first; its indexes
    are converted on import.) Vectors are L2-normalised as colbert-ai's decompress does.

    Args:
        codes: (n,) uint16, int32 or int64 centroid ids in [0, C).
        residuals: (n, dim * nbits / 8) uint8.
        centroids: (C, dim) float32, float16 or bfloat16; dim * nbits must be a multiple of 8.
        bucket_weights: (2**nbits,) float (used as fp32).
        nbits: 1, 2, 4 or 8.
        backend: "cpp", "triton" or "reference"; None picks by device.

    Returns:
        (n, dim) in the dtype of centroids, computed in fp32.
    """
    codec = b.codec(centroids, bucket_weights, nbits)
    device = codec.centroids.device
    c = v.codes(codes, device)
    res = v.residuals(residuals, c.shape[0], codec.row_bytes, device)
    v.check_device("bucket_weights", codec.bucket_weights, device)
    return resolve("decompress_residuals", device, backend)(c, res, codec)


def _reference(codes: torch.Tensor, residuals: torch.Tensor, codec: b.Codec) -> torch.Tensor:
    return reference.decompress_residuals(
        codes, residuals, codec.centroids, codec.bucket_weights, codec.nbits
    )


def _cpp(codes: torch.Tensor, residuals: torch.Tensor, codec: b.Codec) -> torch.Tensor:
    name = cpp.dtype_name(codec.centroids)
    out = cpp.C.decompress_residuals(
        cpp.host(codes),
        cpp.host(residuals),
        cpp.host(codec.centroids),
        name,
        cpp.host(codec.bucket_weights),
        codec.nbits,
        name,
    )
    # Half-precision results come back as uint16 bit patterns.
    return torch.from_numpy(out).view(codec.centroids.dtype)


def _triton(codes: torch.Tensor, residuals: torch.Tensor, codec: b.Codec) -> torch.Tensor:
    return triton_backend.call(
        "decompress_residuals", codes, residuals, codec.centroids, codec.bucket_weights, codec.nbits
    )


register("decompress_residuals", "reference", _reference)
register("decompress_residuals", "cpp", _cpp)
register("decompress_residuals", "triton", _triton)
