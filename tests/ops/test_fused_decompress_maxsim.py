from __future__ import annotations

import pytest
import torch

from conftest import DOC_LENGTHS, make_offsets, make_query_mask
from edgeplaid import ops
from edgeplaid.ops import reference


def _index(dim: int, nbits: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    offsets = make_offsets(DOC_LENGTHS)
    n = int(offsets[-1])
    centroids = torch.randn(29, dim, generator=g).to(dtype)
    weights = torch.sort(torch.randn(1 << nbits, generator=g) * 0.2).values
    codes = torch.randint(0, 29, (n,), generator=g)
    residuals = torch.randint(0, 256, (n, dim * nbits // 8), generator=g, dtype=torch.uint8)
    return codes, residuals, offsets, centroids, weights


@pytest.mark.parametrize("nbits", [1, 2, 4, 8])
@pytest.mark.parametrize("dim", [40, 48, 64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("with_candidates", [False, True])
def test_matches_reference(cpp_isa, nbits, dim, dtype, with_candidates):
    codes, residuals, offsets, centroids, weights = _index(dim, nbits, dtype, seed=dim * nbits)
    g = torch.Generator().manual_seed(1)
    queries = torch.randn(3, 13, dim, generator=g)
    mask = make_query_mask(3, 13, g)
    cand = None
    if with_candidates:
        cand = torch.randint(0, len(DOC_LENGTHS), (3, 11), generator=g)
        cand[:, 0] = -1
    got = ops.fused_decompress_maxsim(
        queries, codes, residuals, offsets, cand, centroids, weights, nbits, mask, backend="cpp"
    )
    want = reference.fused_decompress_maxsim(
        queries, codes, residuals, offsets, cand, centroids, weights, nbits, mask
    )
    assert torch.equal(torch.isfinite(got), torch.isfinite(want))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_equals_decompress_then_maxsim(cpp_isa):
    codes, residuals, offsets, centroids, weights = _index(64, 4, torch.float32)
    codes = codes.to(torch.uint16)  # the index's storage for <= 65,536 centroids
    queries = torch.randn(2, 32, 64)
    fused = ops.fused_decompress_maxsim(
        queries, codes, residuals, offsets, None, centroids, weights, 4, backend="cpp"
    )
    tokens = ops.decompress_residuals(codes, residuals, centroids, weights, 4, backend="cpp")
    assert torch.equal(fused, ops.maxsim_packed(queries, tokens, offsets, backend="cpp"))


def test_empty_candidate_lists(cpp_isa):
    codes, residuals, offsets, centroids, weights = _index(48, 2, torch.float32)
    got = ops.fused_decompress_maxsim(
        torch.randn(2, 4, 48),
        codes,
        residuals,
        offsets,
        torch.empty(2, 0, dtype=torch.int64),
        centroids,
        weights,
        2,
        backend="cpp",
    )
    assert got.shape == (2, 0)


# ---------------------------------------------------------------- scoring from the codes


def _codes_case(dim: int, nbits: int, seed: int = 0, nq: int = 3, lq: int = 13, centroid_dtype=torch.float16):
    """A small index (unit centroids, as PLAID's), queries, their centroid scores and inv_norm."""
    g = torch.Generator().manual_seed(seed)
    codes, residuals, offsets, _, _ = _index(dim, nbits, torch.float32, seed)
    centroids = torch.nn.functional.normalize(torch.randn(29, dim, generator=g), dim=-1).to(centroid_dtype)
    weights = torch.sort(torch.randn(1 << nbits, generator=g) * 0.05).values
    queries = torch.nn.functional.normalize(torch.randn(nq, lq, dim, generator=g), dim=-1)
    mask = make_query_mask(nq, lq, g)
    cs = reference.centroid_scores(queries, centroids, 1, mask)[0]
    inv = ops.residual_inv_norms(codes, residuals, centroids, weights, nbits)
    cand = torch.randint(0, len(DOC_LENGTHS), (nq, 11), generator=g)
    cand[:, 0] = -1
    return queries, mask, codes, residuals, offsets, cand, centroids, weights, cs, inv


def _codes_call(case, nbits, precision, backend="cpp", with_candidates=True):
    queries, mask, codes, residuals, offsets, cand, centroids, weights, cs, inv = case
    return ops.fused_decompress_maxsim(
        queries,
        codes,
        residuals,
        offsets,
        cand if with_candidates else None,
        centroids,
        weights,
        nbits,
        mask,
        backend=backend,
        centroid_scores=cs,
        inv_norm=inv,
        precision=precision,
    )


@pytest.mark.parametrize("nbits", [1, 2, 4, 8])
@pytest.mark.parametrize("dim", [40, 48, 64, 128])
@pytest.mark.parametrize("with_candidates", [False, True])
def test_codes_exact_matches_decoding(cpp_isa, nbits, dim, with_candidates):
    """Exact mode: decompress -> normalise -> MaxSim within fp32 rounding."""
    case = _codes_case(dim, nbits, seed=dim + nbits)
    queries, mask, codes, residuals, offsets, cand, centroids, weights, _, _ = case
    got = _codes_call(case, nbits, "exact", with_candidates=with_candidates)
    want = reference.fused_decompress_maxsim(
        queries, codes, residuals, offsets, cand if with_candidates else None, centroids, weights, nbits, mask
    )
    assert torch.equal(torch.isfinite(got), torch.isfinite(want))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, _codes_call(case, nbits, "exact", "reference", with_candidates))


@pytest.mark.parametrize(
    ("nbits", "dim"),
    [(nb, d) for nb in (1, 2, 4, 8) for d in (40, 48, 64, 128)]
    # dim / 4 odd (44: the last group of 4 dimensions taken alone) and dim not a multiple of 4
    # (42: padded to 44 with weight-0 levels)
    + [(nb, d) for nb in (2, 4, 8) for d in (44,)]
    + [(nb, 42) for nb in (4, 8)],
)
def test_codes_int8_is_bit_exact_on_every_isa(cpp_int8_isa, nbits, dim):
    """Every SIMD path returns the scalar path's quantised arithmetic bit for bit."""
    case = _codes_case(dim, nbits, seed=3 * dim + nbits)
    got = _codes_call(case, nbits, "int8")
    previous = ops.cpp_backend.C.cpu_int8_isa()
    ops.cpp_backend.C.set_cpu_int8_isa("scalar")  # the int8 kernels' ISA is chosen apart
    try:
        want = _codes_call(case, nbits, "int8")
    finally:
        ops.cpp_backend.C.set_cpu_int8_isa(previous)
    assert torch.equal(got, want)
    # and the torch twin of the quantised arithmetic agrees to fp32 rounding
    torch.testing.assert_close(got, _codes_call(case, nbits, "int8", "reference"), rtol=2e-6, atol=2e-6)
    # and int8 is close to exact: the error is the residual term's quantisation only
    exact = _codes_call(case, nbits, "exact")
    fin = torch.isfinite(exact)
    assert torch.equal(torch.isfinite(got), fin)
    assert (got[fin] - exact[fin]).abs().max() < 5e-3 * 13


@pytest.mark.parametrize("precision", ["exact", "int8"])
def test_codes_awkward_shapes(cpp_int8_isa, precision):
    """Doc length 1 and 0, a fully masked query (0), padding candidates (-inf), every document."""
    g = torch.Generator().manual_seed(5)
    dim, nbits = 48, 4
    offsets = make_offsets([1, 0, 1, 37, 2])
    n = int(offsets[-1])
    codes = torch.randint(0, 7, (n,), generator=g, dtype=torch.int32)
    residuals = torch.randint(0, 256, (n, dim * nbits // 8), generator=g, dtype=torch.uint8)
    centroids = torch.nn.functional.normalize(torch.randn(7, dim, generator=g), dim=-1)
    weights = torch.linspace(-0.04, 0.05, 16)
    queries = torch.nn.functional.normalize(torch.randn(2, 5, dim, generator=g), dim=-1)
    mask = torch.tensor([[False] * 5, [True, False, True, True, False]])
    cand = torch.tensor([[0, 1, -1, 3], [1, 4, 0, -1]])
    kw = dict(precision=precision, centroid_scores=reference.centroid_scores(queries, centroids, 1, mask)[0])
    got = ops.fused_decompress_maxsim(
        queries, codes, residuals, offsets, cand, centroids, weights, nbits, mask, **kw
    )
    assert got[0].tolist()[:2] == [0.0, 0.0] and torch.isneginf(got[0, 2]) and torch.isneginf(got[1, 3])
    assert torch.isneginf(got[1, 0])  # an empty document
    want = reference.fused_decompress_maxsim(
        queries, codes, residuals, offsets, cand, centroids, weights, nbits, mask
    )
    fin = torch.isfinite(want)
    assert torch.equal(torch.isfinite(got), fin)
    torch.testing.assert_close(got[fin], want[fin], rtol=0, atol=1e-5 if precision == "exact" else 1e-2)
    every = ops.fused_decompress_maxsim(
        queries, codes, residuals, offsets, None, centroids, weights, nbits, mask, **kw
    )
    assert every.shape == (2, 5) and torch.equal(every[1, [1, 4, 0]], got[1, :3])
    empty = ops.fused_decompress_maxsim(
        queries,
        codes,
        residuals,
        offsets,
        torch.zeros(2, 0, dtype=torch.int64),
        centroids,
        weights,
        nbits,
        mask,
        **kw,
    )
    assert empty.shape == (2, 0)


def test_codes_without_stage_one_scores_or_inv_norm():
    """Missing centroid_scores / inv_norm are computed: same scores as when given."""
    case = _codes_case(48, 4, seed=8)
    queries, mask, codes, residuals, offsets, cand, centroids, weights, _cs, _inv = case
    given = _codes_call(case, 4, "int8", backend="reference")
    alone = ops.fused_decompress_maxsim(
        queries,
        codes,
        residuals,
        offsets,
        cand,
        centroids,
        weights,
        4,
        mask,
        backend="reference",
        precision="int8",
    )
    torch.testing.assert_close(alone, given)


def test_codes_bad_inputs():
    case = _codes_case(48, 4, seed=2)
    queries, mask, codes, residuals, offsets, cand, centroids, weights, cs, inv = case
    call = lambda **kw: ops.fused_decompress_maxsim(  # noqa: E731
        queries, codes, residuals, offsets, cand, centroids, weights, 4, mask, **kw
    )
    with pytest.raises(ValueError, match="precision"):
        call(precision="fp8")
    with pytest.raises(ValueError, match="centroid_scores"):
        call(centroid_scores=cs[:, :, :5], inv_norm=inv)
    with pytest.raises(ValueError, match="centroid_scores"):
        call(centroid_scores=cs.double(), inv_norm=inv)
    with pytest.raises(ValueError, match="inv_norm"):
        call(centroid_scores=cs, inv_norm=inv[:-1])
    for bad in (float("nan"), 0.0, -1.0, float("inf")):
        broken = inv.clone()
        broken[int(offsets[4])] = bad  # a token of document 4, a candidate of some query
        for precision in ("exact", "int8"):
            with pytest.raises(ValueError, match="inv_norm: token"):
                ops.fused_decompress_maxsim(
                    queries,
                    codes,
                    residuals,
                    offsets,
                    None,
                    centroids,
                    weights,
                    4,
                    mask,
                    backend="cpp",
                    centroid_scores=cs,
                    inv_norm=broken,
                    precision=precision,
                )
    bad_codes = codes.clone()
    bad_codes[3] = 29
    with pytest.raises(ValueError, match="codes"):
        ops.fused_decompress_maxsim(
            queries,
            bad_codes,
            residuals,
            offsets,
            None,
            centroids,
            weights,
            4,
            mask,
            backend="cpp",
            centroid_scores=cs,
            inv_norm=inv,
            precision="int8",
        )


def test_int8_peak_probe():
    C = ops.cpp_backend.C
    if C is None:
        pytest.skip("edgeplaid._C is not built")
    assert C.peak_int8_gops(0.02) > 0
    assert C.cpu_info()["int8_isa"] in ("scalar", "avx2", "avx512", "avx512vnni")


def test_each_op_reports_its_isa():
    """The int8 kernels' ISA is chosen apart from the fp32 one (VNNI > AVX-512BW > AVX2 where
    the CPU has it, whatever set_cpu_isa says), cpu_info()["op_isa"] names every op's, and the
    override names what it expected."""
    C = ops.cpp_backend.C
    if C is None:
        pytest.skip("edgeplaid._C is not built")
    info = C.cpu_info()
    supported = info["supported_isas"]
    best = (
        "avx512vnni"
        if info["vnni_available"]
        else next(i for i in ("avx512", "avx2", "scalar") if i in supported)
    )
    previous, previous_int8 = C.cpu_isa_state(), C.cpu_int8_isa()
    try:
        C.set_cpu_int8_isa(best)
        for isa in supported:  # the fp32 choice does not move the int8 one
            C.set_cpu_isa(isa)
            per_op = C.cpu_info()["op_isa"]
            assert per_op["fused_decompress_maxsim[int8]"] == best
            assert per_op["centroid_interaction_topk"] == isa
            # stage 1's centroid-major table runs on AMX tiles beside the AVX-512 kernels
            tiles = isa == "avx512" and C.cpu_amx()
            assert per_op["centroid_scores"] == (
                "amx (centroid-major, fp16/bf16 centroids), else avx512" if tiles else isa
            )
        C.set_cpu_int8_isa("scalar")
        assert C.cpu_info()["op_isa"]["fused_decompress_maxsim[int8]"] == "scalar"
        with pytest.raises(ValueError, match="expected one of scalar, avx2, avx512, avx512vnni"):
            C.set_cpu_int8_isa("sse2")
    finally:
        C.set_cpu_isa(previous)
        C.set_cpu_int8_isa(previous_int8)


@pytest.mark.parametrize("precision", ["exact", "int8"])
def test_codes_many_centroids_run_on_the_pool(cpp_isa, precision):
    """More centroids than one parallel chunk: the score tables are filled by several threads."""
    g = torch.Generator().manual_seed(9)
    dim, nbits, n_cent = 48, 4, 13000
    offsets = torch.tensor([0, 40, 41, 300, 900], dtype=torch.int64)
    codes = torch.randint(0, n_cent, (900,), generator=g, dtype=torch.int32)
    residuals = torch.randint(0, 256, (900, dim * nbits // 8), generator=g, dtype=torch.uint8)
    centroids = torch.nn.functional.normalize(torch.randn(n_cent, dim, generator=g), dim=-1)
    weights = torch.linspace(-0.05, 0.05, 16)
    queries = torch.nn.functional.normalize(torch.randn(2, 21, dim, generator=g), dim=-1)
    mask = torch.rand(2, 21, generator=g) > 0.2
    cs = reference.centroid_scores(queries, centroids, 1, mask)[0]
    cand = torch.tensor([[0, 1, 2, 3], [3, -1, 2, 0]])
    args = (queries, codes, residuals, offsets, cand, centroids, weights, nbits, mask)
    got = ops.fused_decompress_maxsim(*args, backend="cpp", centroid_scores=cs, precision=precision)
    want = ops.fused_decompress_maxsim(*args, backend="reference", centroid_scores=cs, precision=precision)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_codes_on_the_triton_backend_decode_or_refuse_int8():
    """The Triton kernel decodes: exact with stage-1 scores still gives the decoding result, int8 is
    refused with a clear error (the Triton twins of code scoring are a later issue)."""
    pytest.importorskip("triton")
    from triton_helpers import on_device  # the GPU when there is one, else the interpreter

    case = on_device(*_codes_case(48, 4, seed=4, nq=2, lq=5))
    queries, mask, codes, residuals, offsets, cand, centroids, weights, cs, inv = case
    args = (queries, codes, residuals, offsets, cand, centroids, weights, 4, mask)
    got = ops.fused_decompress_maxsim(*args, backend="triton", centroid_scores=cs, inv_norm=inv).cpu()
    want = reference.fused_decompress_maxsim(*(a.cpu() if isinstance(a, torch.Tensor) else a for a in args))
    fin = torch.isfinite(want)
    assert torch.equal(torch.isfinite(got), fin)
    torch.testing.assert_close(got[fin], want[fin], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="int8"):
        ops.fused_decompress_maxsim(*args, backend="triton", centroid_scores=cs, precision="int8")
