"""Every op, on every backend, with every zero-sized axis: a correctly shaped result, never a crash.

(Zero queries once overflowed the heap in the C++ all-documents form; the bindings now return an
empty output without calling a kernel.)
"""

from __future__ import annotations

import pytest
import torch

from edgeplaid import ops
from edgeplaid._native import C

DIM = 16


def _backends() -> list:
    out = [pytest.param("reference", id="reference")]
    out.append(pytest.param("cpp", id="cpp", marks=pytest.mark.skipif(C is None, reason="no C++ build")))
    try:
        import triton  # noqa: F401

        out.append(pytest.param("triton", id="triton"))
    except ImportError:
        out.append(pytest.param("triton", id="triton", marks=pytest.mark.skip(reason="no triton")))
    return out


def _dev() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _codec(n_cent: int = 5, nbits: int = 4):
    d = _dev()
    return torch.randn(n_cent, DIM, device=d), torch.linspace(-0.1, 0.1, 1 << nbits, device=d), nbits


def _compressed(doclens: list[int], n_cent: int = 5):
    d = _dev()
    n = sum(doclens)
    codes = torch.randint(0, n_cent, (n,), device=d)
    residuals = torch.randint(0, 256, (n, DIM * 4 // 8), dtype=torch.uint8, device=d)
    offsets = torch.tensor([0, *torch.tensor(doclens, dtype=torch.int64).cumsum(0).tolist()], device=d)
    return codes, residuals, offsets


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize(
    ("nq", "lq", "nd", "ld"), [(0, 3, 4, 5), (2, 0, 4, 5), (2, 3, 0, 5), (2, 3, 4, 0), (0, 0, 0, 0)]
)
def test_maxsim(backend, nq, lq, nd, ld):
    d = _dev()
    out = ops.maxsim(torch.randn(nq, lq, DIM, device=d), torch.randn(nd, ld, DIM, device=d), backend=backend)
    assert out.shape == (nq, nd) and out.dtype == torch.float32
    if nq and nd:
        want = 0.0 if lq == 0 else float("-inf")  # no query token scores 0; no document token -inf
        assert bool((out.cpu() == want).all())


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize(
    ("nq", "lq", "doclens", "nc"),
    [
        (0, 3, [2, 3], None),
        (0, 3, [2, 3], 0),
        (2, 0, [2, 3], None),
        (2, 3, [], None),
        (2, 3, [0, 0], None),
        (2, 3, [2, 3], 0),
    ],
)
def test_maxsim_packed_and_fused(backend, nq, lq, doclens, nc):
    d = _dev()
    q = torch.randn(nq, lq, DIM, device=d)
    n = sum(doclens)
    offsets = torch.tensor([0, *torch.tensor(doclens, dtype=torch.int64).cumsum(0).tolist()], device=d)
    cand = None if nc is None else torch.zeros(nq, nc, dtype=torch.int64, device=d)
    width = len(doclens) if nc is None else nc
    out = ops.maxsim_packed(q, torch.randn(n, DIM, device=d), offsets, cand, backend=backend)
    assert out.shape == (nq, width)
    codes, residuals, offsets = _compressed(doclens)
    cents, weights, nbits = _codec()
    out = ops.fused_decompress_maxsim(
        q, codes, residuals, offsets, cand, cents, weights, nbits, backend=backend
    )
    assert out.shape == (nq, width)
    if backend != "triton":
        cs = torch.zeros(nq, lq, cents.shape[0], device=d)
        for precision in ("exact", "int8"):
            out = ops.fused_decompress_maxsim(
                q, codes, residuals, offsets, cand, cents, weights, nbits, backend=backend,
                centroid_scores=cs, precision=precision,
            )  # fmt: skip
            assert out.shape == (nq, width)
    scores = torch.zeros(nq, lq, cents.shape[0], device=d)
    out = ops.centroid_interaction(scores, codes, offsets, cand, 0.5, backend=backend)
    assert out.shape == (nq, width)


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize(("nq", "lq"), [(0, 3), (2, 0), (0, 0)])
def test_centroid_scores(backend, nq, lq):
    d = _dev()
    scores, ids = ops.centroid_scores(
        torch.randn(nq, lq, DIM, device=d), torch.randn(7, DIM, device=d), 3, backend=backend
    )
    assert scores.shape == (nq, lq, 7) and ids.shape == (nq, lq, 3)


@pytest.mark.parametrize("backend", _backends())
def test_decompress_nothing(backend):
    codes, residuals, _ = _compressed([])
    cents, weights, nbits = _codec()
    out = ops.decompress_residuals(codes, residuals, cents, weights, nbits, backend=backend)
    assert out.shape == (0, DIM)
