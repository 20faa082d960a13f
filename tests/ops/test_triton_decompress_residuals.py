"""The Triton decompress_residuals against the reference (interpreter on CPU, or the GPU)."""

from __future__ import annotations

import pytest
import torch
from triton_helpers import DEVICE, SKIP_REASON, on_device

from edgeplaid import ops
from edgeplaid.ops import reference

pytest.importorskip("triton", reason=SKIP_REASON)


def _codec(n_tokens: int, dim: int, nbits: int, n_centroids: int = 37, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    centroids = torch.randn(n_centroids, dim, generator=g)
    weights = torch.sort(torch.randn(1 << nbits, generator=g) * 0.1).values
    codes = torch.randint(0, n_centroids, (n_tokens,), generator=g)
    residuals = torch.randint(0, 256, (n_tokens, dim * nbits // 8), generator=g, dtype=torch.uint8)
    return codes, residuals, centroids, weights


def _run(codes, residuals, centroids, weights, nbits):
    args = on_device(codes, residuals, centroids, weights)
    return ops.decompress_residuals(*args, nbits, backend="triton").cpu()


def test_golden_bit_order():
    """The bit order of tests/ops/test_decompress_residuals.py, byte for byte."""
    zero, codes = torch.zeros(1, 8), torch.zeros(1, dtype=torch.int64)
    cases = {
        1: ([0b10110010], [0, 1, 0, 0, 1, 1, 0, 1]),
        2: ([0b11100100, 0b00011011], [0, 1, 2, 3, 3, 2, 1, 0]),
        4: ([0x21, 0x43, 0x65, 0x87], [1, 2, 3, 4, 5, 6, 7, 8]),
        8: ([9, 1, 255, 0, 17, 128, 2, 77], [9, 1, 255, 0, 17, 128, 2, 77]),
    }
    for nbits, (row, buckets) in cases.items():
        weights = torch.arange(1 << nbits, dtype=torch.float32) + 1.0
        got = _run(codes, torch.tensor([row], dtype=torch.uint8), zero, weights, nbits)
        expected = torch.tensor(buckets, dtype=torch.float32) + 1.0
        torch.testing.assert_close(got[0], expected / expected.norm(), rtol=0, atol=1e-7)


@pytest.mark.parametrize("nbits", [1, 2, 4, 8])
@pytest.mark.parametrize("dim", [40, 48, 64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_matches_reference(nbits, dim, dtype):
    codes, residuals, centroids, weights = _codec(101, dim, nbits, seed=nbits + dim)
    code_dtype = (torch.uint16, torch.int32, torch.int64)[(nbits + dim) % 3]
    got = _run(codes.to(code_dtype), residuals, centroids.to(dtype), weights, nbits)
    want = reference.decompress_residuals(codes, residuals, centroids.to(dtype), weights, nbits)
    assert got.dtype == dtype and got.shape == (101, dim)
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    else:  # one rounding of the same fp32 value: at most one unit in the last place apart
        torch.testing.assert_close(got.float(), want.float(), rtol=8e-3, atol=1e-3)


def test_empty_and_bad_codes():
    codes, residuals, centroids, weights = _codec(0, 48, 4)
    assert _run(codes, residuals, centroids, weights, 4).shape == (0, 48)
    if DEVICE.type == "cpu":  # on CUDA the check would synchronise: the kernel reads nothing instead
        codes, residuals, centroids, weights = _codec(10, 48, 4)
        codes[3] = 37
        with pytest.raises(ValueError, match="codes"):
            _run(codes, residuals, centroids, weights, 4)
