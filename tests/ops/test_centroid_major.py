"""The centroid-major layout of stage 1's scores (``centroid_scores(..., layout="centroid")``, a
``CentroidScores(table, query_len=lq)`` bundle): the same numbers as the token-major layout, in the
layout stages 2-4 read in place, and the same results from centroid_interaction and
fused_decompress_maxsim as the token-major bundle gives, bit for bit, on every ISA."""

from __future__ import annotations

import pytest
import torch

from edgeplaid import ops
from edgeplaid.ops import bundles as b


def _data(nq: int, lq: int, n_cent: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.nn.functional.normalize(torch.randn(nq, lq, 48, generator=g), dim=-1)
    cents = torch.nn.functional.normalize(torch.randn(n_cent, 48, generator=g), dim=-1)
    n_tok = 1500
    codes = torch.randint(0, n_cent, (n_tok,), generator=g, dtype=torch.int32)
    cuts = torch.randint(0, n_tok, (39,), generator=g).sort().values
    offsets = torch.cat([torch.tensor([0]), cuts, torch.tensor([n_tok])]).long()
    residuals = torch.randint(0, 256, (n_tok, 48 * 2 // 8), generator=g, dtype=torch.uint8)
    cand = torch.randint(-1, 40, (nq, 25), generator=g)
    return q, cents, codes, offsets, residuals, cand


# lq = 20: lanes of one vector cross a query boundary (the kernel's scalar copy); 32: whole
# vectors; 5 and 33: padding lanes.
@pytest.mark.parametrize(("nq", "lq", "n_cent"), [(3, 20, 300), (1, 32, 1000), (2, 5, 97), (2, 33, 200)])
@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
def test_layouts_agree(cpp_isa, nq, lq, n_cent, masked):
    q, cents, codes, offsets, residuals, cand = _data(nq, lq, n_cent)
    mask = None
    if masked:  # a query with every token, one with about half, one with none
        mask = torch.rand(nq, lq, generator=torch.Generator().manual_seed(lq)) < 0.5
        mask[0] = True
        if nq > 2:
            mask[2] = False
    token, ids = ops.centroid_scores(q, cents, 3, mask, backend="cpp")
    table, ids_cm = ops.centroid_scores(q, cents, 3, mask, backend="cpp", layout="centroid")
    assert table.shape == (nq, n_cent, b.table_stride(lq))
    assert torch.equal(ids_cm, ids)
    assert torch.equal(table, b.centroid_major(token, mask))
    for i in range(nq):  # the valid tokens compacted into the first lanes, the rest zero
        n_valid = lq if mask is None else int(mask[i].sum())
        assert (table[i, :, n_valid:] == 0).all()
    ref_table, _ = ops.centroid_scores(q, cents, 3, mask, backend="reference", layout="centroid")
    torch.testing.assert_close(ref_table, table, rtol=1e-5, atol=1e-5)
    # with_max: each centroid's best score over the valid tokens, taken from the kernel's tiles
    *same, cmax = ops.centroid_scores(q, cents, 3, mask, backend="cpp", layout="centroid", with_max=True)
    assert torch.equal(same[0], table) and torch.equal(same[1], ids)
    valid = torch.ones(nq, lq, dtype=torch.bool) if mask is None else mask
    want_max = token.masked_fill(~valid[..., None], float("-inf")).amax(dim=1)
    assert torch.equal(cmax, want_max)  # -inf for the query without tokens
    for layout, backend in (("token", "cpp"), ("centroid", "reference")):
        other = ops.centroid_scores(q, cents, 3, mask, backend=backend, layout=layout, with_max=True)[2]
        torch.testing.assert_close(other, cmax, rtol=1e-5, atol=1e-5)

    tm, cm = b.CentroidScores(token), b.CentroidScores(table, query_len=lq)
    assert torch.equal(cm.token_major(mask), token)
    for threshold in (None, 0.1, 0.9):
        want = ops.centroid_interaction(tm, codes, offsets, cand, threshold, mask, backend="cpp")
        got = ops.centroid_interaction(cm, codes, offsets, cand, threshold, mask, backend="cpp")
        assert torch.equal(got, want)
        ref = ops.centroid_interaction(cm, codes, offsets, cand, threshold, mask, backend="reference")
        torch.testing.assert_close(ref, want, rtol=1e-5, atol=1e-5)
    weights = torch.tensor([-0.05, -0.01, 0.01, 0.05])
    for precision in ("exact", "int8"):
        kw = dict(candidates=cand, centroids=cents, bucket_weights=weights, nbits=2, precision=precision)
        kw.update(queries_mask=mask, backend="cpp")
        want = ops.fused_decompress_maxsim(q, codes, residuals, offsets, centroid_scores=tm, **kw)
        got = ops.fused_decompress_maxsim(q, codes, residuals, offsets, centroid_scores=cm, **kw)
        assert torch.equal(got, want)


def test_centroid_layout_refuses_unknown_layouts_and_mismatched_sizes():
    q, cents, *_ = _data(2, 8, 50)
    with pytest.raises(ValueError, match="layout: expected 'token' or 'centroid'"):
        ops.centroid_scores(q, cents, 2, layout="rows")
    table, _ = ops.centroid_scores(q, cents, 2, layout="centroid")
    cm = b.CentroidScores(table, query_len=8)
    with pytest.raises(ValueError, match="expected query_len 9"):
        b.centroid_scores(cm, nq=2, lq=9, n_centroids=50, device=None)


def test_bindings_check_a_hand_made_table():
    # A bundle made by hand is trusted by the op layer; the binding still stops a table whose
    # stride does not fit its query_len before any kernel reads it.
    q, cents, codes, offsets, _, cand = _data(1, 20, 64)
    table, _ = ops.centroid_scores(q, cents, 2, layout="centroid")
    bad = b.CentroidScores(table[:, :, :16].contiguous(), query_len=20)
    with pytest.raises(ValueError, match="centroid_scores: expected size 32"):
        ops.centroid_interaction(bad, codes, offsets, cand, 0.5, backend="cpp")


def test_table_of_queries_without_tokens_is_zero(cpp_isa):
    # Every token masked: no sweep runs, and the table must still be all padding (zeros), the
    # maxima -inf, the ids -1 (the table was left unwritten before).
    q, cents, *_ = _data(2, 20, 300)
    mask = torch.zeros(2, 20, dtype=torch.bool)
    for dtype in (torch.float32, torch.float16):
        table, ids, cmax = ops.centroid_scores(
            q, cents.to(dtype), 3, mask, backend="cpp", layout="centroid", with_max=True
        )
        assert (table == 0).all() and (ids == -1).all() and (cmax == float("-inf")).all()
