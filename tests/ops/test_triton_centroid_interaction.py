"""The Triton centroid_interaction against the reference (interpreter on CPU, or the GPU)."""

from __future__ import annotations

import pytest
import torch
from triton_helpers import SKIP_REASON, on_device

from conftest import DOC_LENGTHS, make_offsets, make_query_mask
from edgeplaid import ops
from edgeplaid.ops import reference

pytest.importorskip("triton", reason=SKIP_REASON)


@pytest.mark.parametrize("lq", [1, 13, 67])
@pytest.mark.parametrize("threshold", [None, 0.0, 2.0])
@pytest.mark.parametrize("with_candidates", [False, True])
def test_exact(lq, threshold, with_candidates):
    g = torch.Generator().manual_seed(lq)
    n_centroids, nq = 53, 3
    scores = torch.randint(-4, 5, (nq, lq, n_centroids), generator=g).float()
    offsets = make_offsets(DOC_LENGTHS)  # lengths 0, 1, ..., 300
    codes = torch.randint(0, n_centroids, (int(offsets[-1]),), generator=g)
    mask = make_query_mask(nq, lq, g)  # query 0 fully masked
    cand = None
    if with_candidates:
        cand = torch.randint(0, len(DOC_LENGTHS), (nq, 11), generator=g)
        cand[:, 2] = -1
        cand[:, 3] = 1  # the empty document
    code_dtype = (torch.uint16, torch.int32, torch.int64)[lq % 3]
    args = on_device(scores, codes.to(code_dtype), offsets, cand)
    got = ops.centroid_interaction(*args, threshold, *on_device(mask), backend="triton").cpu()
    assert torch.equal(got, reference.centroid_interaction(scores, codes, offsets, cand, threshold, mask))


def test_empty_candidate_lists_and_no_mask():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(2, 32, 40, generator=g)
    offsets = make_offsets(DOC_LENGTHS)
    codes = torch.randint(0, 40, (int(offsets[-1]),), generator=g)
    empty = torch.empty(2, 0, dtype=torch.int64)
    assert ops.centroid_interaction(*on_device(scores, codes, offsets, empty), backend="triton").shape == (
        2,
        0,
    )
    got = ops.centroid_interaction(*on_device(scores, codes, offsets), None, 0.5, backend="triton").cpu()
    want = reference.centroid_interaction(scores, codes, offsets, None, 0.5)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5)  # float sums in another order


@pytest.mark.parametrize("threshold", [None, 0.5])
def test_zero_query_tokens(threshold):
    offsets, codes = torch.tensor([0, 2, 2, 5]), torch.tensor([1, 6, 0, 3, 3])
    scores = torch.randn(2, 0, 7)
    args = on_device(scores, codes, offsets)
    got = ops.centroid_interaction(*args, None, threshold, backend="triton").cpu()
    assert torch.equal(got, reference.centroid_interaction(scores, codes, offsets, None, threshold))
