"""The Triton maxsim (padded) against the reference (interpreter on CPU, or the GPU)."""

from __future__ import annotations

import pytest
import torch
from triton_helpers import SKIP_REASON, assert_within_twice_torch, on_device

from conftest import make_query_mask, make_values
from edgeplaid import ops
from edgeplaid.ops import reference

pytest.importorskip("triton", reason=SKIP_REASON)


def _inputs(dim: int, ld: int, integer: bool, seed: int):
    g = torch.Generator().manual_seed(seed)
    nq, nd, lq = 3, 6, 13
    queries = make_values((nq, lq, dim), integer, g)
    docs = make_values((nd, ld, dim), integer, g)
    qmask = make_query_mask(nq, lq, g)  # query 0 fully masked
    dmask = torch.rand(nd, ld, generator=g) > 0.4
    dmask[1] = False  # a fully masked document scores -inf
    dmask[2] = True
    return queries, docs, qmask, dmask


def _run(q, d, qm, dm):
    return ops.maxsim(*on_device(q, d, qm, dm), backend="triton").cpu()


@pytest.mark.parametrize("dim", [40, 48, 64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("ld", [1, 11])
def test_exact_on_integer_inputs(dim, dtype, ld):
    queries, docs, qmask, dmask = _inputs(dim, ld, True, seed=dim + ld)
    got = _run(queries.to(dtype), docs.to(dtype), qmask, dmask)
    assert torch.equal(got, reference.maxsim(queries, docs, qmask, dmask))
    assert (got[0] == 0).all() and torch.isneginf(got[1:, 1]).all()


@pytest.mark.parametrize("ld", [0, 200])
def test_unmasked_and_long_or_empty_documents(ld):
    queries, docs, _, _ = _inputs(64, ld, True, seed=ld)
    got = _run(queries, docs.half(), None, None)
    assert torch.equal(got, reference.maxsim(queries, docs))
    if ld == 0:
        assert torch.isneginf(got).all()


def test_low_precision_error_within_twice_torch():
    queries, docs, qmask, dmask = _inputs(48, 40, False, seed=4)
    exact = reference.maxsim(queries, docs, qmask, dmask)
    q_lp, d_lp = queries.half(), docs.half()
    sim = torch.einsum("qid,njd->qnij", q_lp, d_lp).float().masked_fill(~dmask[None, :, None, :], -torch.inf)
    torch_lp = sim.amax(-1).masked_fill(~qmask[:, None, :], 0.0).sum(-1)
    assert_within_twice_torch(_run(q_lp, d_lp, qmask, dmask), exact, torch_lp)


def test_zero_documents_and_matches_packed_form():
    assert _run(torch.randn(2, 3, 48), torch.empty(0, 4, 48), None, None).shape == (2, 0)
    g = torch.Generator().manual_seed(0)
    queries, docs = torch.randn(2, 32, 48, generator=g), torch.randn(5, 30, 48, generator=g)
    offsets = torch.arange(0, 151, 30)
    packed = ops.maxsim_packed(*on_device(queries, docs.reshape(-1, 48), offsets), backend="triton").cpu()
    assert torch.equal(_run(queries, docs, None, None), packed)
