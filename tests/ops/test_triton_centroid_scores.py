"""The Triton centroid_scores against the reference (interpreter on CPU, or the GPU)."""

from __future__ import annotations

import pytest
import torch
from triton_helpers import SKIP_REASON, on_device

from conftest import make_query_mask, make_values
from edgeplaid import ops
from edgeplaid.ops import reference

pytest.importorskip("triton", reason=SKIP_REASON)


def _run(q, c, n_probe, mask):
    scores, ids = ops.centroid_scores(*on_device(q, c), n_probe, *on_device(mask), backend="triton")
    return scores.cpu(), ids.cpu()


@pytest.mark.parametrize("dim", [40, 48, 64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_exact_with_ties(dim, dtype):
    # Integer values make exact ties common: top ids must follow (score desc, id asc).
    g = torch.Generator().manual_seed(dim)
    queries = make_values((2, 13, dim), True, g)
    centroids = make_values((300, dim), True, g)
    mask = make_query_mask(2, 13, g)
    scores, ids = _run(queries.to(dtype), centroids.to(dtype), 8, mask)
    want_scores, want_ids = reference.centroid_scores(queries, centroids, 8, mask)
    assert scores.dtype == torch.float32 and ids.dtype == torch.int64
    assert torch.equal(scores, want_scores)
    assert torch.equal(ids, want_ids)
    assert (ids[0] == -1).all() and (scores[0] == 0).all()


@pytest.mark.parametrize(("n_centroids", "n_probe"), [(1, 1), (11, 4), (11, 11), (1031, 32)])
def test_probe_counts(n_centroids, n_probe):
    g = torch.Generator().manual_seed(n_centroids)
    queries = make_values((2, 5, 48), True, g)
    centroids = make_values((n_centroids, 48), True, g)
    # fp32 queries against fp16 centroids: split into fp16 pieces, still exact on integers.
    scores, ids = _run(queries, centroids.half(), n_probe, None)
    want_scores, want_ids = reference.centroid_scores(queries, centroids, n_probe)
    assert torch.equal(scores, want_scores) and torch.equal(ids, want_ids)


def test_ranked_on_float_inputs():
    g = torch.Generator().manual_seed(1)
    queries, centroids = torch.randn(2, 32, 64, generator=g), torch.randn(1024, 64, generator=g)
    scores, ids = _run(queries, centroids, 16, None)
    want_scores, want_ids = reference.centroid_scores(queries, centroids, 16)
    torch.testing.assert_close(scores, want_scores, rtol=1e-5, atol=1e-4)
    flat = want_scores.reshape(-1, 1024)
    for row, (a, b) in enumerate(
        zip(ids.reshape(-1, 16).tolist(), want_ids.reshape(-1, 16).tolist(), strict=True)
    ):
        for c in set(a) ^ set(b):  # only near-equal neighbours at the cut may swap
            assert abs(float(flat[row, c] - flat[row, b[-1]])) < 1e-4


def test_in_kernel_top_k(monkeypatch):
    """The GPU path: each tile keeps its top keys (tl.topk) before torch.topk; on the
    interpreter it is off by default (slow there), so one small case runs it here."""
    from edgeplaid.triton_kernels import centroid_scores as kernel

    monkeypatch.setattr(kernel, "TOPK_IN_KERNEL", True)
    g = torch.Generator().manual_seed(5)
    queries = make_values((1, 3, 48), True, g)
    centroids = make_values((150, 48), True, g)  # 3 tiles of 64 on the interpreter, the last partial
    mask = torch.tensor([[True, False, True]])
    scores, ids = _run(queries, centroids, 5, mask)
    want_scores, want_ids = reference.centroid_scores(queries, centroids, 5, mask)
    assert torch.equal(scores, want_scores) and torch.equal(ids, want_ids)
