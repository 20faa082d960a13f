from __future__ import annotations

import pytest
import torch

from edgeplaid import ops
from edgeplaid.ops import reference


def _codec(n_tokens: int, dim: int, nbits: int, n_centroids: int = 37, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    centroids = torch.randn(n_centroids, dim, generator=g)
    weights = torch.sort(torch.randn(1 << nbits, generator=g) * 0.1).values
    codes = torch.randint(0, n_centroids, (n_tokens,), generator=g)
    residuals = torch.randint(0, 256, (n_tokens, dim * nbits // 8), generator=g, dtype=torch.uint8)
    return codes, residuals, centroids, weights


def test_golden_bit_order(any_backend):
    """Pins the on-disk bit order: dimension d's bucket is bits [d*nbits, (d+1)*nbits) of the
    row read as a little-endian bit string."""
    dim = 8
    zero = torch.zeros(1, dim)
    codes = torch.zeros(1, dtype=torch.int64)
    cases = {
        # nbits: (row bytes, bucket index of dims 0..7)
        1: ([0b10110010], [0, 1, 0, 0, 1, 1, 0, 1]),
        2: ([0b11100100, 0b00011011], [0, 1, 2, 3, 3, 2, 1, 0]),
        4: ([0x21, 0x43, 0x65, 0x87], [1, 2, 3, 4, 5, 6, 7, 8]),
        8: ([9, 1, 255, 0, 17, 128, 2, 77], [9, 1, 255, 0, 17, 128, 2, 77]),
    }
    for nbits, (row, buckets) in cases.items():
        weights = torch.arange(1 << nbits, dtype=torch.float32) + 1.0  # bucket b -> weight b + 1
        got = ops.decompress_residuals(
            codes, torch.tensor([row], dtype=torch.uint8), zero, weights, nbits, backend=any_backend
        )
        expected = torch.tensor(buckets, dtype=torch.float32) + 1.0
        torch.testing.assert_close(got[0], expected / expected.norm(), rtol=0, atol=1e-7)
        packed = reference.pack_residuals(torch.tensor([buckets]), nbits)
        assert packed.tolist() == [row], f"pack_residuals disagrees for nbits={nbits}"


@pytest.mark.parametrize("nbits", [1, 2, 4, 8])
@pytest.mark.parametrize("dim", [40, 48, 64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("code_dtype", [torch.uint16, torch.int32, torch.int64], ids=str)
def test_matches_reference(cpp_isa, nbits, dim, dtype, code_dtype):
    codes, residuals, centroids, weights = _codec(301, dim, nbits, seed=nbits + dim)
    got = ops.decompress_residuals(
        codes.to(code_dtype), residuals, centroids.to(dtype), weights, nbits, backend="cpp"
    )
    want = reference.decompress_residuals(codes, residuals, centroids.to(dtype), weights, nbits)
    assert got.dtype == dtype and got.shape == (301, dim)
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    else:  # one rounding of the same fp32 value: at most one unit in the last place apart
        torch.testing.assert_close(got.float(), want.float(), rtol=8e-3, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_output_is_the_rounded_fp32_output(cpp_isa, dtype):
    # Half outputs are the kernel's own fp32 vectors rounded to nearest even, bit for bit
    # (the SIMD conversions and the scalar tail alike: 301 x 40 values leave a tail).
    codes, residuals, centroids, weights = _codec(301, 40, 4, seed=7)
    half_centroids = centroids.to(dtype)
    as_fp32 = ops.decompress_residuals(codes, residuals, half_centroids.float(), weights, 4, backend="cpp")
    got = ops.decompress_residuals(codes, residuals, half_centroids, weights, 4, backend="cpp")
    assert torch.equal(got, as_fp32.to(dtype))


def test_roundtrip_pack_unpack():
    g = torch.Generator().manual_seed(0)
    for nbits in (1, 2, 4, 8):
        buckets = torch.randint(0, 1 << nbits, (50, 64), generator=g)
        assert torch.equal(
            reference.unpack_residuals(reference.pack_residuals(buckets, nbits), nbits), buckets
        )


def test_empty(cpp_isa):
    codes, residuals, centroids, weights = _codec(0, 48, 4)
    assert ops.decompress_residuals(codes, residuals, centroids, weights, 4, backend="cpp").shape == (0, 48)
