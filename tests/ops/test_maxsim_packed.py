from __future__ import annotations

import pytest
import torch

from conftest import DOC_LENGTHS, make_offsets, make_query_mask, make_values
from edgeplaid import ops
from edgeplaid.ops import reference

DIMS = [40, 48, 64, 128]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _inputs(dim: int, lq: int, integer: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    nq = 3
    queries = make_values((nq, lq, dim), integer, g)
    offsets = make_offsets(DOC_LENGTHS)
    tokens = make_values((int(offsets[-1]), dim), integer, g)
    mask = make_query_mask(nq, lq, g)
    nd = len(DOC_LENGTHS)
    # 11 candidates per query, with padding and repeats.
    candidates = torch.randint(0, nd, (nq, 11), generator=g)
    candidates[:, 3] = -1
    candidates[2, :] = candidates[2, 0]
    return queries, tokens, offsets, mask, candidates


@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lq", [1, 13, 67])
@pytest.mark.parametrize("with_candidates", [False, True])
def test_exact_on_integer_inputs(cpp_isa, dim, dtype, lq, with_candidates):
    queries, tokens, offsets, mask, candidates = _inputs(dim, lq, integer=True)
    cand = candidates if with_candidates else None
    got = ops.maxsim_packed(queries.to(dtype), tokens.to(dtype), offsets, cand, mask, backend="cpp")
    want = reference.maxsim_packed(queries, tokens, offsets, cand, mask)
    assert got.dtype == torch.float32
    assert torch.equal(got, want)
    real = candidates[0] >= 0 if with_candidates else slice(None)
    assert (got[0][real] == 0).all(), "a fully masked query scores 0"
    if not with_candidates:
        assert torch.isneginf(got[1:, 1]).all(), "an empty document scores -inf"


def test_empty_candidate_lists(cpp_isa):
    queries, tokens, offsets, _, _ = _inputs(48, 5, integer=True)
    got = ops.maxsim_packed(queries, tokens, offsets, torch.empty(3, 0, dtype=torch.int64), backend="cpp")
    assert got.shape == (3, 0)


def test_no_documents(cpp_isa):
    queries = torch.randn(2, 4, 48)
    got = ops.maxsim_packed(queries, torch.empty(0, 48), torch.zeros(1, dtype=torch.int64), backend="cpp")
    assert got.shape == (2, 0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("dim", [48, 128])
def test_low_precision_error_within_twice_torch(cpp_isa, dtype, dim):
    queries, tokens, offsets, mask, candidates = _inputs(dim, 32, integer=False, seed=1)
    exact = reference.maxsim_packed(queries, tokens, offsets, candidates, mask)
    q_lp, t_lp = queries.to(dtype), tokens.to(dtype)
    got = ops.maxsim_packed(q_lp, t_lp, offsets, candidates, mask, backend="cpp")
    # torch computing in the low precision itself (what a half-precision pipeline would do).
    torch_lp = torch.full_like(exact, float("-inf"))
    for qi in range(queries.shape[0]):
        for ci, doc in enumerate(candidates[qi].tolist()):
            if doc < 0:
                continue
            sim = (q_lp[qi][mask[qi]] @ t_lp[offsets[doc] : offsets[doc + 1]].T).float()
            torch_lp[qi, ci] = (
                sim.amax(-1).sum() if sim.shape[1] else (0.0 if not mask[qi].any() else -torch.inf)
            )
    finite = torch.isfinite(exact)
    assert torch.equal(finite, torch.isfinite(got))
    torch_err = (torch_lp[finite] - exact[finite]).abs().max()
    our_err = (got[finite] - exact[finite]).abs().max()
    assert our_err <= 2 * torch_err + 1e-6


def test_ranked_results_match_reference(cpp_isa):
    g = torch.Generator().manual_seed(3)
    lengths = torch.randint(1, 120, (400,), generator=g).tolist()
    offsets = make_offsets(lengths)
    tokens = torch.nn.functional.normalize(torch.randn(int(offsets[-1]), 48, generator=g), dim=-1)
    queries = torch.nn.functional.normalize(torch.randn(4, 32, 48, generator=g), dim=-1)
    got = ops.maxsim_packed(queries, tokens.half(), offsets, backend="cpp")
    want = reference.maxsim_packed(queries, tokens, offsets)
    for qi in range(4):
        top_got = set(got[qi].topk(10).indices.tolist())
        top_want = set(want[qi].topk(10).indices.tolist())
        assert len(top_got ^ top_want) <= 2, "at most one swap at the cut between near-equal scores"


def test_isas_are_bit_identical():
    from edgeplaid._native import C

    if C is None:
        pytest.skip("edgeplaid._C is not built")
    queries, tokens, offsets, mask, candidates = _inputs(64, 37, integer=False, seed=5)
    previous = C.cpu_isa_state()
    results = {}
    try:
        for isa in C.cpu_info()["supported_isas"]:
            C.set_cpu_isa(isa)
            results[isa] = ops.maxsim_packed(queries, tokens.half(), offsets, candidates, mask, backend="cpp")
    finally:
        C.set_cpu_isa(previous)
    first = next(iter(results.values()))
    for isa, r in results.items():
        assert torch.equal(r, first), isa
