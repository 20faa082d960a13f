from __future__ import annotations

import pytest
import torch

from conftest import make_query_mask, make_values
from edgeplaid import ops
from edgeplaid.ops import reference


@pytest.mark.parametrize("dim", [40, 48, 64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    ("n_centroids", "n_probe"),
    [(1, 1), (11, 4), (11, 11), (300, 8), (1000, 5), (1031, 32), (4096, 16), (4099, 3)],
)
def test_exact_with_ties(cpp_isa, dim, dtype, n_centroids, n_probe):
    # Integer values make exact ties common: top ids must follow (score desc, id asc).
    g = torch.Generator().manual_seed(n_centroids)
    queries = make_values((2, 13, dim), True, g)
    centroids = make_values((n_centroids, dim), True, g)
    mask = make_query_mask(2, 13, g)
    scores, ids = ops.centroid_scores(queries.to(dtype), centroids.to(dtype), n_probe, mask, backend="cpp")
    want_scores, want_ids = reference.centroid_scores(queries, centroids, n_probe, mask)
    assert scores.dtype == torch.float32 and ids.dtype == torch.int64
    assert torch.equal(scores, want_scores)
    assert torch.equal(ids, want_ids)
    assert (ids[0] == -1).all() and (scores[0] == 0).all()


def test_ranked_on_float_inputs(cpp_isa):
    g = torch.Generator().manual_seed(1)
    queries, centroids = torch.randn(4, 32, 64, generator=g), torch.randn(4096, 64, generator=g)
    scores, ids = ops.centroid_scores(queries, centroids, 16, backend="cpp")
    want_scores, want_ids = reference.centroid_scores(queries, centroids, 16)
    torch.testing.assert_close(scores, want_scores, rtol=1e-5, atol=1e-4)
    # Rounding may swap near-equal neighbours at the cut; any difference is such a pair.
    flat = want_scores.reshape(-1, 4096)
    for row, (a, b) in enumerate(
        zip(ids.reshape(-1, 16).tolist(), want_ids.reshape(-1, 16).tolist(), strict=True)
    ):
        for c in set(a) ^ set(b):
            assert abs(float(flat[row, c] - flat[row, b[-1]])) < 1e-4
