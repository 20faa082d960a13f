from __future__ import annotations

import pytest
import torch

from conftest import make_query_mask, make_values
from edgeplaid import ops
from edgeplaid.ops import reference


@pytest.mark.parametrize("dim", [40, 48, 64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("ld", [1, 11, 200])
@pytest.mark.parametrize("masked", [False, True])
def test_exact_on_integer_inputs(cpp_isa, dim, dtype, ld, masked):
    g = torch.Generator().manual_seed(dim + ld)
    nq, nd, lq = 3, 6, 13
    queries = make_values((nq, lq, dim), True, g)
    docs = make_values((nd, ld, dim), True, g)
    qmask = make_query_mask(nq, lq, g) if masked else None
    dmask = None
    if masked:
        dmask = torch.rand(nd, ld, generator=g) > 0.4
        dmask[1] = False  # a fully masked document scores -inf
        dmask[2] = True
    got = ops.maxsim(queries.to(dtype), docs.to(dtype), qmask, dmask, backend="cpp")
    want = reference.maxsim(queries, docs, qmask, dmask)
    assert torch.equal(got, want)
    if masked:
        assert (got[0] == 0).all()
        assert torch.isneginf(got[1:, 1]).all()


def test_matches_packed_form(cpp_isa):
    g = torch.Generator().manual_seed(0)
    queries, docs = torch.randn(2, 32, 48, generator=g), torch.randn(5, 30, 48, generator=g)
    offsets = torch.arange(0, 151, 30)
    padded = ops.maxsim(queries, docs, backend="cpp")
    packed = ops.maxsim_packed(queries, docs.reshape(-1, 48), offsets, backend="cpp")
    assert torch.equal(padded, packed)


def test_zero_documents(cpp_isa):
    got = ops.maxsim(torch.randn(2, 3, 48), torch.empty(0, 4, 48), backend="cpp")
    assert got.shape == (2, 0)
