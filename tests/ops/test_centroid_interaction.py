from __future__ import annotations

import pytest
import torch

from conftest import DOC_LENGTHS, make_offsets, make_query_mask
from edgeplaid import ops
from edgeplaid.ops import reference


@pytest.mark.parametrize("lq", [1, 13, 32, 67])
@pytest.mark.parametrize("threshold", [None, 0.0, 2.0])
@pytest.mark.parametrize("with_candidates", [False, True])
@pytest.mark.parametrize("code_dtype", [torch.uint16, torch.int32, torch.int64], ids=str)
def test_exact(cpp_isa, lq, threshold, with_candidates, code_dtype):
    g = torch.Generator().manual_seed(lq)
    n_centroids, nq = 53, 3
    scores = torch.randint(-4, 5, (nq, lq, n_centroids), generator=g).float()
    offsets = make_offsets(DOC_LENGTHS)
    codes = torch.randint(0, n_centroids, (int(offsets[-1]),), generator=g)
    mask = make_query_mask(nq, lq, g)
    cand = None
    if with_candidates:
        cand = torch.randint(0, len(DOC_LENGTHS), (nq, 11), generator=g)
        cand[:, 2] = -1
    got = ops.centroid_interaction(
        scores, codes.to(code_dtype), offsets, cand, threshold, mask, backend="cpp"
    )
    want = reference.centroid_interaction(scores, codes, offsets, cand, threshold, mask)
    assert torch.equal(got, want)


def test_equals_maxsim_over_centroids(cpp_isa):
    # Without a threshold, stage 3 is MaxSim over documents made of their centroids.
    g = torch.Generator().manual_seed(0)
    centroids = torch.randint(-2, 3, (40, 48), generator=g).float()
    queries = torch.randint(-2, 3, (2, 9, 48), generator=g).float()
    offsets = make_offsets(DOC_LENGTHS)
    codes = torch.randint(0, 40, (int(offsets[-1]),), generator=g)
    scores, _ = ops.centroid_scores(queries, centroids, 1, backend="cpp")
    got = ops.centroid_interaction(scores, codes, offsets, backend="cpp")
    assert torch.equal(got, ops.maxsim_packed(queries, centroids[codes], offsets, backend="cpp"))


@pytest.mark.parametrize("threshold", [None, 0.1])
def test_many_centroids_run_on_the_pool(cpp_isa, threshold):
    """More centroids than one parallel chunk (~512 KiB of table): the per-query table is filled by several
    threads (a thread_local named there would be the thread's own; this crashed once)."""
    g = torch.Generator().manual_seed(7)
    n_cent, lq = 13000, 19
    cs = torch.randn(2, lq, n_cent, generator=g)
    mask = torch.rand(2, lq, generator=g) > 0.2
    offsets = torch.tensor([0, 40, 41, 300, 900], dtype=torch.int64)
    codes = torch.randint(0, n_cent, (900,), generator=g, dtype=torch.int32)
    cand = torch.tensor([[0, 1, 2, 3], [3, -1, 2, 0]])
    got = ops.centroid_interaction(cs, codes, offsets, cand, threshold, mask, backend="cpp")
    want = reference.centroid_interaction(cs, codes, offsets, cand, threshold, mask)
    torch.testing.assert_close(got, want)
