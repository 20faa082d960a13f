"""The Triton maxsim_packed against the reference (interpreter on CPU, or the GPU)."""

from __future__ import annotations

import pytest
import torch
from triton_helpers import SKIP_REASON, assert_within_twice_torch, on_device, torch_lowp_maxsim_packed

from conftest import DOC_LENGTHS, make_offsets, make_query_mask, make_values
from edgeplaid import ops
from edgeplaid.ops import reference

pytest.importorskip("triton", reason=SKIP_REASON)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _inputs(dim: int, lq: int, integer: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    nq = 3
    queries = make_values((nq, lq, dim), integer, g)
    offsets = make_offsets(DOC_LENGTHS)  # lengths 0, 1, ..., 300
    tokens = make_values((int(offsets[-1]), dim), integer, g)
    mask = make_query_mask(nq, lq, g)  # query 0 fully masked
    candidates = torch.randint(0, len(DOC_LENGTHS), (nq, 11), generator=g)  # 11 candidates
    candidates[2, :] = candidates[2, 0]  # repeats
    candidates[:, 3] = -1
    candidates[:, 4] = 1  # the empty document
    return queries, tokens, offsets, mask, candidates


def _run(q, t, offsets, cand, mask):
    return ops.maxsim_packed(*on_device(q, t, offsets, cand, mask), backend="triton").cpu()


@pytest.mark.parametrize("dim", [40, 48, 64, 128])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_candidates", [False, True])
def test_exact_on_integer_inputs(dim, dtype, with_candidates):
    queries, tokens, offsets, mask, candidates = _inputs(dim, 13, integer=True, seed=dim)
    cand = candidates if with_candidates else None
    got = _run(queries.to(dtype), tokens.to(dtype), offsets, cand, mask)
    want = reference.maxsim_packed(queries, tokens, offsets, cand, mask)
    assert got.dtype == torch.float32
    assert torch.equal(got, want)
    if with_candidates:
        assert torch.isneginf(got[:, 3]).all(), "-1 padding scores -inf"
        assert (got[0][candidates[0] >= 0] == 0).all(), "a fully masked query scores 0"
    else:
        assert torch.isneginf(got[1:, 1]).all(), "an empty document scores -inf"


@pytest.mark.parametrize(("lq", "dim"), [(1, 48), (67, 64)])
@pytest.mark.parametrize("qdtype", [torch.float32, torch.float16], ids=str)
def test_query_lengths_and_mixed_dtypes(lq, dim, qdtype):
    # One query token, several query tiles (67 > 64), and queries in another dtype than the
    # documents (fp32 queries are split into half pieces; exact on integers either way).
    queries, tokens, offsets, mask, candidates = _inputs(dim, lq, integer=True, seed=lq)
    got = _run(queries.to(qdtype), tokens.bfloat16(), offsets, candidates, mask)
    assert torch.equal(got, reference.maxsim_packed(queries, tokens, offsets, candidates, mask))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_low_precision_error_within_twice_torch(dtype):
    queries, tokens, offsets, mask, candidates = _inputs(48, 32, integer=False, seed=1)
    exact = reference.maxsim_packed(queries, tokens, offsets, candidates, mask)
    q_lp, t_lp = queries.to(dtype), tokens.to(dtype)
    got = _run(q_lp, t_lp, offsets, candidates, mask)
    assert_within_twice_torch(got, exact, torch_lowp_maxsim_packed(q_lp, t_lp, offsets, candidates, mask))


def test_fp32_float_inputs():
    queries, tokens, offsets, mask, candidates = _inputs(128, 32, integer=False, seed=2)
    got = _run(queries, tokens, offsets, candidates, mask)
    torch.testing.assert_close(
        got, reference.maxsim_packed(queries, tokens, offsets, candidates, mask), rtol=1e-5, atol=1e-4
    )


def test_empty_candidate_lists_and_no_documents():
    queries, tokens, offsets, _, _ = _inputs(48, 5, integer=True)
    assert _run(queries, tokens, offsets, torch.empty(3, 0, dtype=torch.int64), None).shape == (3, 0)
    got = _run(queries, torch.empty(0, 48), torch.zeros(1, dtype=torch.int64), None, None)
    assert got.shape == (3, 0)
