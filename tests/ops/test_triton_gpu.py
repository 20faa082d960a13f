"""The full grid of every Triton kernel on a CUDA device (marker `gpu`; skipped without CUDA).

Larger and more varied shapes than the interpreter tests: thousands of ragged documents,
dims 40/48/64/128, every dtype pairing, and the serving habits (no recompilation when only
the batch sizes change). Run with `python -m pytest -m gpu tests/ops` on a GPU machine.
"""

from __future__ import annotations

import pytest
import torch

from conftest import make_offsets, make_query_mask, make_values
from edgeplaid import ops
from edgeplaid.ops import reference

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
pytest.importorskip("triton", reason="triton is not installed (pip install -e '.[gpu]')")

DIMS = [40, 48, 64, 128]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
CUDA = torch.device("cuda")


def ref(fn, *args):
    """The reference computed on the GPU (fp32 einsum; TF32 stays off for torch matmuls by
    default, so integer inputs remain exact), results back on the CPU."""
    out = fn(*[a.to(CUDA) if isinstance(a, torch.Tensor) else a for a in args])
    return tuple(o.cpu() for o in out) if isinstance(out, tuple) else out.cpu()


def _corpus(dim: int, integer: bool, n_docs: int = 3000, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 301, (n_docs,), generator=g)
    lengths[:5] = torch.tensor([0, 1, 1, 0, 300])
    offsets = make_offsets(lengths.tolist())
    tokens = make_values((int(offsets[-1]), dim), integer, g)
    return tokens, offsets, g


@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lq", [1, 32, 67])
def test_maxsim_packed_exact_full(dim, dtype, lq):
    tokens, offsets, g = _corpus(dim, True, seed=dim + lq)
    nq, nd = 5, offsets.shape[0] - 1
    queries = make_values((nq, lq, dim), True, g)
    mask = make_query_mask(nq, lq, g)
    cand = torch.randint(-1, nd, (nq, 257), generator=g)
    for c in (None, cand):
        got = ops.maxsim_packed(
            queries.to(dtype).to(CUDA),
            tokens.to(dtype).to(CUDA),
            offsets.to(CUDA),
            None if c is None else c.to(CUDA),
            mask.to(CUDA),
            backend="triton",
        ).cpu()
        want = ref(reference.maxsim_packed, queries, tokens, offsets, c, mask)
        assert torch.equal(got, want)
    # fp32 queries against half documents (query pieces) stay exact on integers.
    got = ops.maxsim_packed(
        queries.to(CUDA),
        tokens.to(dtype).to(CUDA),
        offsets.to(CUDA),
        cand.to(CUDA),
        mask.to(CUDA),
        backend="triton",
    ).cpu()
    assert torch.equal(got, ref(reference.maxsim_packed, queries, tokens, offsets, cand, mask))


@pytest.mark.parametrize("dim", [48, 64])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_maxsim_packed_ranked_full(dim, dtype):
    tokens, offsets, g = _corpus(dim, False, n_docs=20000, seed=3)
    tokens = torch.nn.functional.normalize(tokens, dim=-1)
    queries = torch.nn.functional.normalize(torch.randn(8, 32, dim, generator=g), dim=-1)
    got = ops.maxsim_packed(queries.to(CUDA), tokens.to(dtype).to(CUDA), offsets.to(CUDA), backend="triton")
    want = reference.maxsim_packed(queries.to(CUDA), tokens.to(CUDA), offsets.to(CUDA))
    finite = torch.isfinite(want)
    assert torch.equal(finite, torch.isfinite(got))
    err = (got[finite] - want[finite]).abs().max().item()
    assert err < (2e-2 if dtype == torch.bfloat16 else 4e-3), err
    for qi in range(8):
        top_got = set(got[qi].topk(10).indices.tolist())
        top_want = set(want[qi].topk(10).indices.tolist())
        assert len(top_got ^ top_want) <= 2


def test_no_recompilation_across_batch_sizes():
    from edgeplaid.triton_kernels import maxsim_packed as mod

    tokens, offsets, _ = _corpus(48, False, n_docs=500)
    t, o = tokens.half().to(CUDA), offsets.to(CUDA)

    def n_compiled() -> int:
        fn = getattr(mod._maxsim_packed_kernel, "fn", mod._maxsim_packed_kernel)
        try:  # JITFunction.device_caches: device -> (compiled kernels by key, ...)
            return sum(len(c[0]) for c in fn.device_caches.values())
        except (AttributeError, TypeError, IndexError, KeyError):
            pytest.skip("this triton keeps its kernel cache elsewhere")

    def both_forms(nq: int) -> None:
        q = torch.randn(nq, 32, 48, device=CUDA).half()
        ops.maxsim_packed(q, t, o, backend="triton")
        ops.maxsim_packed(q, t, o, torch.randint(-1, 500, (nq, nq * 3 + 1), device=CUDA), backend="triton")

    for nq in (3, 1):  # compiles (and autotunes) each form once
        both_forms(nq)
    torch.cuda.synchronize()
    before = n_compiled()
    for nq in (2, 5, 16, 17, 64, 1000):
        both_forms(nq)
    torch.cuda.synchronize()
    assert n_compiled() == before, "batch sizes must not recompile"


@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("ld", [0, 1, 11, 200])
def test_maxsim_exact_full(dim, dtype, ld):
    g = torch.Generator().manual_seed(dim + ld)
    queries, docs = make_values((7, 32, dim), True, g), make_values((300, ld, dim), True, g)
    qmask, dmask = make_query_mask(7, 32, g), torch.rand(300, ld, generator=g) > 0.3
    got = ops.maxsim(
        queries.to(dtype).to(CUDA), docs.to(dtype).to(CUDA), qmask.to(CUDA), dmask.to(CUDA), backend="triton"
    ).cpu()
    assert torch.equal(got, ref(reference.maxsim, queries, docs, qmask, dmask))


@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("n_centroids", "n_probe"), [(1, 1), (11, 11), (1031, 32), (65536, 32)])
def test_centroid_scores_exact_full(dim, dtype, n_centroids, n_probe):
    g = torch.Generator().manual_seed(n_centroids + dim)
    queries, centroids = make_values((3, 32, dim), True, g), make_values((n_centroids, dim), True, g)
    mask = make_query_mask(3, 32, g)
    scores, ids = ops.centroid_scores(
        queries.to(dtype).to(CUDA), centroids.to(dtype).to(CUDA), n_probe, mask.to(CUDA), backend="triton"
    )
    want_scores, want_ids = ref(reference.centroid_scores, queries, centroids, n_probe, mask)
    assert torch.equal(scores.cpu(), want_scores) and torch.equal(ids.cpu(), want_ids)


@pytest.mark.parametrize("nbits", [1, 2, 4, 8])
@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_decompress_and_fused_full(nbits, dim, dtype):
    _, offsets, g = _corpus(dim, False, n_docs=2000, seed=nbits)
    n = int(offsets[-1])
    centroids = torch.randn(4096, dim, generator=g).to(dtype)
    weights = torch.sort(torch.randn(1 << nbits, generator=g) * 0.2).values
    codes = torch.randint(0, 4096, (n,), generator=g, dtype=torch.int32)
    residuals = torch.randint(0, 256, (n, dim * nbits // 8), generator=g, dtype=torch.uint8)
    args = [x.to(CUDA) for x in (codes, residuals, centroids, weights)]
    got = ops.decompress_residuals(*args, nbits, backend="triton").cpu()
    want = ref(reference.decompress_residuals, codes, residuals, centroids, weights, nbits)
    torch.testing.assert_close(
        got.float(),
        want.float(),
        rtol=8e-3 if dtype != torch.float32 else 1e-6,
        atol=1e-3 if dtype != torch.float32 else 1e-6,
    )
    queries = torch.randn(4, 32, dim, generator=g).to(dtype)
    mask = make_query_mask(4, 32, g)
    cand = torch.randint(-1, offsets.shape[0] - 1, (4, 100), generator=g)
    for c in (None, cand):
        got = ops.fused_decompress_maxsim(
            queries.to(CUDA),
            args[0],
            args[1],
            offsets.to(CUDA),
            None if c is None else c.to(CUDA),
            args[2],
            args[3],
            nbits,
            mask.to(CUDA),
            backend="triton",
        ).cpu()
        want = ref(
            reference.fused_decompress_maxsim,
            queries,
            codes,
            residuals,
            offsets,
            c,
            centroids,
            weights,
            nbits,
            mask,
        )
        assert torch.equal(torch.isfinite(got), torch.isfinite(want))
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("lq", [1, 32, 67])
@pytest.mark.parametrize("threshold", [None, 0.0, 2.0])
def test_centroid_interaction_exact_full(lq, threshold):
    _, offsets, g = _corpus(8, True, n_docs=3000, seed=lq)
    n_cent = 4096
    scores = torch.randint(-4, 5, (4, lq, n_cent), generator=g).float()
    codes = torch.randint(0, n_cent, (int(offsets[-1]),), generator=g)
    mask = make_query_mask(4, lq, g)
    cand = torch.randint(-1, offsets.shape[0] - 1, (4, 500), generator=g)
    for c in (None, cand):
        got = ops.centroid_interaction(
            scores.to(CUDA),
            codes.to(CUDA),
            offsets.to(CUDA),
            None if c is None else c.to(CUDA),
            threshold,
            mask.to(CUDA),
            backend="triton",
        ).cpu()
        want = ref(reference.centroid_interaction, scores, codes, offsets, c, threshold, mask)
        assert torch.equal(got, want)
