"""One rule for NaN and inf: a ValueError naming the argument, on the C++ backend and the reference
(the C++ kernels once dropped a NaN document token; centroid_scores returned id -1 for a NaN
query token). Queries, centroids, bucket weights and centroid scores are checked at the op's
boundary, on every backend; document tokens, which are corpus-sized, by the kernels themselves (a
non-finite token poisons its document's score) and the op raises on the poisoned score. The
Triton kernels read document tokens on the GPU, where no check reads data back to the host: their
max drops a NaN token, as maxsim_packed's docstring says."""

from __future__ import annotations

import pytest
import torch

from edgeplaid import ops
from edgeplaid._native import C

BAD = [float("nan"), float("inf"), float("-inf")]


def _backends() -> list:
    out = [pytest.param("reference", id="reference")]
    out.append(pytest.param("cpp", id="cpp", marks=pytest.mark.skipif(C is None, reason="no C++ build")))
    return out


def _all_backends() -> list:
    """Where every check happens at the op's boundary (not in a kernel), Triton too."""
    try:
        import triton  # noqa: F401

        return [*_backends(), pytest.param("triton", id="triton-interpreter")]
    except ImportError:
        return _backends()


def _with(t: torch.Tensor, index: tuple, value: float) -> torch.Tensor:
    t = t.clone()
    t[index] = value
    return t


@pytest.mark.parametrize("bad", BAD)
@pytest.mark.parametrize("backend", _backends())
def test_maxsim_packed(backend, bad, cpp_isa_or_none):
    q = torch.randn(2, 5, 48)
    tokens = torch.randn(40, 48).half()
    offsets = torch.tensor([0, 7, 19, 40])
    cand = torch.tensor([[2, 0], [1, -1]])
    for form in (None, cand):
        with pytest.raises(ValueError, match="queries"):
            ops.maxsim_packed(_with(q, (1, 3, 7), bad), tokens, offsets, form, backend=backend)
        with pytest.raises(ValueError, match="doc_tokens"):
            ops.maxsim_packed(q, _with(tokens, (25, 11), bad), offsets, form, backend=backend)
    # a bad token of a document no query scores is not read: no error
    ops.maxsim_packed(
        q, _with(tokens, (3, 0), bad), offsets, torch.tensor([[2, 1], [1, -1]]), backend=backend
    )


@pytest.mark.parametrize("bad", BAD)
@pytest.mark.parametrize("backend", _backends())
def test_maxsim_padded(backend, bad, cpp_isa_or_none):
    q = torch.randn(2, 3, 64)
    docs = torch.randn(4, 9, 64)
    with pytest.raises(ValueError, match="documents"):
        ops.maxsim(q, _with(docs, (2, 4, 5), bad), backend=backend)
    mask = torch.ones(4, 9, dtype=torch.bool)
    mask[2, 4] = False  # a masked token does not count, whatever it holds
    out = ops.maxsim(q, _with(docs, (2, 4, 5), bad), None, mask, backend=backend)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("backend", _all_backends())
def test_centroid_side(backend):
    q = torch.randn(1, 4, 48)
    cents = torch.randn(10, 48)
    with pytest.raises(ValueError, match="queries"):
        ops.centroid_scores(_with(q, (0, 2, 1), float("nan")), cents, 3, backend=backend)
    with pytest.raises(ValueError, match="centroids"):
        ops.centroid_scores(q, _with(cents, (4, 4), float("inf")), 3, backend=backend)
    codes = torch.randint(0, 10, (20,))
    residuals = torch.randint(0, 256, (20, 24), dtype=torch.uint8)
    offsets = torch.tensor([0, 5, 20])
    weights = torch.linspace(-0.1, 0.1, 16)
    bad_weights = _with(weights, (3,), float("nan"))
    with pytest.raises(ValueError, match="bucket_weights"):
        ops.fused_decompress_maxsim(
            q, codes, residuals, offsets, None, cents, bad_weights, 4, backend=backend
        )
    with pytest.raises(ValueError, match="centroids"):
        ops.decompress_residuals(
            codes, residuals, _with(cents, (0, 0), float("nan")), weights, 4, backend=backend
        )
    cs = torch.randn(1, 4, 10)
    with pytest.raises(ValueError, match="centroid_scores"):
        ops.centroid_interaction(
            _with(cs, (0, 1, 2), float("nan")), codes, offsets, None, 0.5, backend=backend
        )
    if backend != "triton":
        with pytest.raises(ValueError, match="centroid_scores"):
            ops.fused_decompress_maxsim(
                q, codes, residuals, offsets, None, cents, weights, 4, backend=backend,
                centroid_scores=_with(cs, (0, 0, 0), float("-inf")),
            )  # fmt: skip


@pytest.fixture(params=["scalar", "avx2", "avx512", None])
def cpp_isa_or_none(request):
    """Every compiled ISA of the C++ kernels (None: the default choice)."""
    if request.param is None or C is None:
        yield None
        return
    if request.param not in C.cpu_info()["supported_isas"]:
        pytest.skip(f"this CPU (or build) has no {request.param}")
    previous = C.cpu_isa_state()
    C.set_cpu_isa(request.param)
    try:
        yield request.param
    finally:
        C.set_cpu_isa(previous)
