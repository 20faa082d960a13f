from __future__ import annotations

import pytest
import torch

from conftest import DOC_LENGTHS, make_offsets, make_query_mask
from edgeplaid import ops
from edgeplaid.ops import reference


def _index(dim: int, nbits: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    offsets = make_offsets(DOC_LENGTHS)
    n = int(offsets[-1])
    centroids = torch.randn(29, dim, generator=g).to(dtype)
    weights = torch.sort(torch.randn(1 << nbits, generator=g) * 0.2).values
    codes = torch.randint(0, 29, (n,), generator=g)
    residuals = torch.randint(0, 256, (n, dim * nbits // 8), generator=g, dtype=torch.uint8)
    return codes, residuals, offsets, centroids, weights


@pytest.mark.parametrize("nbits", [1, 2, 4, 8])
@pytest.mark.parametrize("dim", [40, 48, 64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("with_candidates", [False, True])
def test_matches_reference(cpp_isa, nbits, dim, dtype, with_candidates):
    codes, residuals, offsets, centroids, weights = _index(dim, nbits, dtype, seed=dim * nbits)
    g = torch.Generator().manual_seed(1)
    queries = torch.randn(3, 13, dim, generator=g)
    mask = make_query_mask(3, 13, g)
    cand = None
    if with_candidates:
        cand = torch.randint(0, len(DOC_LENGTHS), (3, 11), generator=g)
        cand[:, 0] = -1
    got = ops.fused_decompress_maxsim(
        queries, codes, residuals, offsets, cand, centroids, weights, nbits, mask, backend="cpp"
    )
    want = reference.fused_decompress_maxsim(
        queries, codes, residuals, offsets, cand, centroids, weights, nbits, mask
    )
    assert torch.equal(torch.isfinite(got), torch.isfinite(want))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_equals_decompress_then_maxsim(cpp_isa):
    codes, residuals, offsets, centroids, weights = _index(64, 4, torch.float32)
    codes = codes.to(torch.uint16)  # the index's storage for <= 65,536 centroids
    queries = torch.randn(2, 32, 64)
    fused = ops.fused_decompress_maxsim(
        queries, codes, residuals, offsets, None, centroids, weights, 4, backend="cpp"
    )
    tokens = ops.decompress_residuals(codes, residuals, centroids, weights, 4, backend="cpp")
    assert torch.equal(fused, ops.maxsim_packed(queries, tokens, offsets, backend="cpp"))


def test_empty_candidate_lists(cpp_isa):
    codes, residuals, offsets, centroids, weights = _index(48, 2, torch.float32)
    got = ops.fused_decompress_maxsim(
        torch.randn(2, 4, 48),
        codes,
        residuals,
        offsets,
        torch.empty(2, 0, dtype=torch.int64),
        centroids,
        weights,
        2,
        backend="cpp",
    )
    assert got.shape == (2, 0)
