"""compress_residuals: cpp (every ISA) against the PyTorch twin, bit for bit; the inverse of
decompress_residuals; torch.bucketize's boundary rule; errors."""

from __future__ import annotations

import pytest
import torch

from edgeplaid import ops
from edgeplaid.ops import reference


def _case(n: int, dim: int, nbits: int, n_centroids: int = 37, seed: int = 0):
    """Unit tokens near unit centroids, their codes, and a codec fitted on their residuals."""
    g = torch.Generator().manual_seed(seed)
    cents = torch.nn.functional.normalize(torch.randn(n_centroids, dim, generator=g), dim=-1)
    codes = torch.randint(0, n_centroids, (n,), generator=g)
    tokens = torch.nn.functional.normalize(cents[codes] + 0.3 * torch.randn(n, dim, generator=g), dim=-1)
    r = (tokens - cents[codes]).flatten()
    b = 1 << nbits
    q = torch.arange(b, dtype=torch.float32) / b
    cutoffs = torch.quantile(r, q[1:]) if r.numel() else torch.zeros(b - 1)
    weights = torch.quantile(r, q + 0.5 / b) if r.numel() else torch.zeros(b)
    return tokens, codes, cents, cutoffs, weights


@pytest.mark.parametrize("nbits", [1, 2, 4, 8])
@pytest.mark.parametrize("dim", [40, 48, 64, 128, 24])
def test_matches_reference_bit_for_bit(cpp_isa, nbits, dim):
    tokens, codes, cents, cutoffs, weights = _case(301, dim, nbits, seed=nbits * 1000 + dim)
    res, inv = ops.compress_residuals(tokens, codes, cents, cutoffs, weights, nbits, backend="cpp")
    want_res, want_inv = reference.compress_residuals(tokens, codes, cents, cutoffs, weights, nbits)
    assert res.dtype == torch.uint8 and res.shape == (301, dim * nbits // 8)
    assert inv.dtype == torch.float32 and inv.shape == (301,)
    assert torch.equal(res, want_res)
    assert torch.equal(inv, want_inv)  # one summation order on every backend and ISA
    # residual_inv_norms sums in torch's order: within fp32 rounding
    loose = ops.residual_inv_norms(codes, res, cents, weights, nbits)
    torch.testing.assert_close(inv, loose, rtol=5e-7, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("code_dtype", [torch.uint16, torch.int32, torch.int64], ids=str)
def test_half_inputs_and_code_dtypes(cpp_isa, dtype, code_dtype):
    """Tokens and centroids in fp16/bf16 are widened to fp32 first, as the twin does."""
    tokens, codes, cents, cutoffs, weights = _case(257, 48, 4, seed=7)
    args = (tokens.to(dtype), codes.to(code_dtype), cents.to(dtype), cutoffs, weights, 4)
    got = ops.compress_residuals(*args, backend="cpp")
    want = reference.compress_residuals(*args)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("nbits", [1, 2, 4, 8])
def test_inverse_of_decompress(any_backend, nbits):
    """Tokens that are exactly centroid + bucket_weights[b] (dyadic values, no rounding) compress
    to b: decompress_residuals(compress_residuals(x)) is normalize(x)."""
    g = torch.Generator().manual_seed(nbits)
    dim, n, n_cent = 48, 97, 11
    weights = (torch.arange(1 << nbits, dtype=torch.float32) - (1 << (nbits - 1))) / 8
    cutoffs = (weights[1:] + weights[:-1]) / 2  # strictly between consecutive weights
    cents = torch.randint(-4, 5, (n_cent, dim), generator=g).float()
    codes = torch.randint(0, n_cent, (n,), generator=g)
    buckets = torch.randint(0, 1 << nbits, (n, dim), generator=g)
    tokens = cents[codes] + weights[buckets]
    res, inv = ops.compress_residuals(tokens, codes, cents, cutoffs, weights, nbits, backend=any_backend)
    assert torch.equal(res, reference.pack_residuals(buckets, nbits))
    dec = ops.decompress_residuals(codes, res, cents, weights, nbits, backend=any_backend)
    torch.testing.assert_close(dec, torch.nn.functional.normalize(tokens, dim=-1), rtol=0, atol=1e-6)
    torch.testing.assert_close(inv, 1 / tokens.norm(dim=-1), rtol=1e-6, atol=0)


def test_boundaries_as_bucketize(any_backend):
    """A residual equal to a cutoff goes to the lower bucket (#cutoffs strictly below it), as
    torch.bucketize(right=False); below every cutoff -> 0, above every cutoff -> 2**nbits - 1."""
    nbits, dim = 2, 8
    cutoffs = torch.tensor([-0.5, 0.0, 0.5])
    weights = torch.tensor([-1.0, -0.25, 0.25, 1.0])
    r = torch.tensor([[-0.5, 0.0, 0.5, -0.6, 0.7, -0.4, 0.1, 0.5]])
    res, _ = ops.compress_residuals(
        r,
        torch.zeros(1, dtype=torch.int64),
        torch.zeros(1, dim),
        cutoffs,
        weights,
        nbits,
        backend=any_backend,
    )
    assert reference.unpack_residuals(res, nbits).tolist() == [[0, 1, 2, 0, 3, 1, 2, 2]]
    assert torch.bucketize(r, cutoffs).tolist() == [[0, 1, 2, 0, 3, 1, 2, 2]]


@pytest.mark.parametrize("n", [0, 1, 17])
def test_small_sizes(any_backend, n):
    tokens, codes, cents, cutoffs, weights = _case(n, 64, 4, seed=n)
    res, inv = ops.compress_residuals(tokens, codes, cents, cutoffs, weights, 4, backend=any_backend)
    assert res.shape == (n, 32) and inv.shape == (n,)
    want = reference.compress_residuals(tokens, codes, cents, cutoffs, weights, 4)
    assert torch.equal(res, want[0]) and torch.equal(inv, want[1])


def test_zero_vector_norm_is_clamped(any_backend):
    """centroid + weights summing to zero: inv_norm = 1 / 1e-12, as decompress's normalisation."""
    nbits = 1
    weights = torch.tensor([-1.0, 1.0])
    res, inv = ops.compress_residuals(
        torch.zeros(1, 8),
        torch.zeros(1, dtype=torch.int64),
        torch.ones(1, 8),
        torch.tensor([0.0]),
        weights,
        nbits,
        backend=any_backend,
    )
    assert reference.unpack_residuals(res, nbits).tolist() == [[0] * 8]
    assert float(inv[0]) == float(torch.tensor(1.0) / torch.tensor(1e-12))


def test_errors(any_backend):
    tokens, codes, cents, cutoffs, weights = _case(20, 48, 4)

    def call(**kw):
        a = dict(
            tokens=tokens,
            codes=codes,
            centroids=cents,
            bucket_cutoffs=cutoffs,
            bucket_weights=weights,
            nbits=4,
        )
        a.update(kw)
        return ops.compress_residuals(**a, backend=any_backend)

    with pytest.raises(ValueError, match="codes"):
        call(codes=torch.full((20,), 37))  # out of range
    with pytest.raises(ValueError, match="codes"):
        call(codes=codes[:-1])
    with pytest.raises(ValueError, match="centroids"):
        call(centroids=cents[:, :40])
    with pytest.raises(ValueError, match="bucket_cutoffs"):
        call(bucket_cutoffs=cutoffs[:-1])
    with pytest.raises(ValueError, match="bucket_cutoffs: expected non-decreasing"):
        call(bucket_cutoffs=cutoffs.flip(0))
    with pytest.raises(ValueError, match="bucket_weights"):
        call(bucket_weights=weights[:-1])
    with pytest.raises(ValueError, match="nbits"):
        call(nbits=3)
    with pytest.raises(ValueError, match="nbits"):
        ops.compress_residuals(
            tokens[:, :45].contiguous(),
            codes,
            cents[:, :45].contiguous(),
            cutoffs[:1],
            weights[:2],
            1,
            backend=any_backend,
        )
    with pytest.raises(ValueError, match="tokens"):
        call(tokens=tokens[None])
