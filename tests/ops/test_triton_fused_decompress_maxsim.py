"""The Triton fused_decompress_maxsim against the reference (interpreter on CPU, or the GPU)."""

from __future__ import annotations

import pytest
import torch
from triton_helpers import SKIP_REASON, on_device

from conftest import DOC_LENGTHS, make_offsets, make_query_mask
from edgeplaid import ops
from edgeplaid.ops import reference

pytest.importorskip("triton", reason=SKIP_REASON)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _index(dim: int, nbits: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    offsets = make_offsets(DOC_LENGTHS)  # lengths 0, 1, ..., 300
    n = int(offsets[-1])
    centroids = torch.randn(29, dim, generator=g).to(dtype)
    weights = torch.sort(torch.randn(1 << nbits, generator=g) * 0.2).values
    codes = torch.randint(0, 29, (n,), generator=g)
    residuals = torch.randint(0, 256, (n, dim * nbits // 8), generator=g, dtype=torch.uint8)
    return codes, residuals, offsets, centroids, weights


def _check(dim, nbits, cdtype, qdtype, with_candidates, seed):
    codes, residuals, offsets, centroids, weights = _index(dim, nbits, cdtype, seed=seed)
    g = torch.Generator().manual_seed(1)
    queries = torch.randn(3, 13, dim, generator=g).to(qdtype)
    mask = make_query_mask(3, 13, g)
    cand = None
    if with_candidates:
        cand = torch.randint(0, len(DOC_LENGTHS), (3, 11), generator=g)
        cand[:, 0] = -1
        cand[:, 1] = 1  # the empty document
    args = on_device(queries, codes, residuals, offsets, cand, centroids, weights)
    got = ops.fused_decompress_maxsim(*args[:6], args[6], nbits, *on_device(mask), backend="triton").cpu()
    want = reference.fused_decompress_maxsim(
        queries, codes, residuals, offsets, cand, centroids, weights, nbits, mask
    )
    assert torch.equal(torch.isfinite(got), torch.isfinite(want))
    # Half queries: the fp32 tile is split into half pieces, so the error stays fp32-sized.
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("nbits", [1, 2, 4, 8])
@pytest.mark.parametrize("dim", [40, 48, 64, 128])
def test_nbits_and_dims(nbits, dim):
    _check(dim, nbits, torch.float32, torch.float32, True, seed=dim * nbits)


@pytest.mark.parametrize("cdtype", DTYPES, ids=str)
@pytest.mark.parametrize("qdtype", DTYPES, ids=str)
def test_dtypes(cdtype, qdtype):
    _check(48, 4, cdtype, qdtype, cdtype == qdtype, seed=7)


def test_empty_candidate_lists():
    codes, residuals, offsets, centroids, weights = _index(48, 2, torch.float32)
    empty = torch.empty(2, 0, dtype=torch.int64)
    args = on_device(torch.randn(2, 4, 48), codes, residuals, offsets, empty, centroids, weights)
    assert ops.fused_decompress_maxsim(*args, 2, backend="triton").shape == (2, 0)


def test_equals_decompress_then_maxsim():
    codes, residuals, offsets, centroids, weights = _index(64, 4, torch.float32)
    queries = torch.randn(2, 32, 64)
    q, c, r, o, cents, w = on_device(queries, codes, residuals, offsets, centroids, weights)
    fused = ops.fused_decompress_maxsim(q, c, r, o, None, cents, w, 4, backend="triton")
    tokens = ops.decompress_residuals(c, r, cents, w, 4, backend="triton")
    torch.testing.assert_close(fused, ops.maxsim_packed(q, tokens, o, backend="triton"), rtol=1e-6, atol=1e-6)
