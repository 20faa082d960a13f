from __future__ import annotations

import pytest
import torch

from conftest import make_query_mask, make_values
from edgeplaid import ops
from edgeplaid.ops import reference
from edgeplaid.ops.bundles import CentroidScores


@pytest.mark.parametrize("dim", [40, 48, 64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    ("n_centroids", "n_probe"),
    [(1, 1), (11, 4), (11, 11), (300, 8), (1000, 5), (1031, 32), (4096, 16), (4099, 3)],
)
@pytest.mark.parametrize("layout", ["token", "centroid"])
def test_exact_with_ties(cpp_isa, dim, dtype, n_centroids, n_probe, layout):
    # Integer values make exact ties common: top ids must follow (score desc, id asc).
    g = torch.Generator().manual_seed(n_centroids)
    queries = make_values((2, 13, dim), True, g)
    centroids = make_values((n_centroids, dim), True, g)
    mask = make_query_mask(2, 13, g)
    scores, ids = ops.centroid_scores(
        queries.to(dtype), centroids.to(dtype), n_probe, mask, backend="cpp", layout=layout
    )
    want_scores, want_ids = reference.centroid_scores(queries, centroids, n_probe, mask)
    assert scores.dtype == torch.float32 and ids.dtype == torch.int64
    if layout == "token":
        assert torch.equal(scores, want_scores)
        assert (scores[0] == 0).all()
    assert torch.equal(ids, want_ids)
    assert (ids[0] == -1).all()


@pytest.mark.parametrize("n_probe", [1, 4, 8, 9])
def test_all_centroids_tied(cpp_isa, n_probe):
    # Every centroid scores the same: the k lowest ids win. The scan's threshold bound (the k-th
    # best maximum of the row groups seen) equals every later score here, so a bound taken from a
    # group before that group's own rows were scanned, or a >= instead of a >, would change ids.
    queries = torch.ones(2, 5, 48)
    centroids = torch.ones(1000, 48)
    for layout in ("token", "centroid"):
        _, ids = ops.centroid_scores(queries, centroids, n_probe, backend="cpp", layout=layout)
        assert ids.tolist() == [[list(range(n_probe))] * 5] * 2


def test_ranked_on_float_inputs(cpp_isa):
    g = torch.Generator().manual_seed(1)
    queries, centroids = torch.randn(4, 32, 64, generator=g), torch.randn(4096, 64, generator=g)
    scores, ids = ops.centroid_scores(queries, centroids, 16, backend="cpp")
    want_scores, want_ids = reference.centroid_scores(queries, centroids, 16)
    torch.testing.assert_close(scores, want_scores, rtol=1e-5, atol=1e-4)
    # Rounding may swap near-equal neighbours at the cut; any difference is such a pair.
    flat = want_scores.reshape(-1, 4096)
    for row, (a, b) in enumerate(
        zip(ids.reshape(-1, 16).tolist(), want_ids.reshape(-1, 16).tolist(), strict=True)
    ):
        for c in set(a) ^ set(b):
            assert abs(float(flat[row, c] - flat[row, b[-1]])) < 1e-4


# ---- the centroid-major table on AMX tiles (csrc/cpu/centroid_scores_amx.h)


@pytest.fixture
def amx_tiles():
    """Runs the test with the AMX tiles on (the AVX-512 kernels chosen); skips where the CPU, OS or
    build has none. Yields a function that turns the tiles on or off for one call's comparison."""
    from edgeplaid._native import C

    if C is None or not C.cpu_info()["amx_ready"]:
        pytest.skip("no AMX here (or edgeplaid._C is not built)")
    isa, amx = C.cpu_isa_state(), C.cpu_amx()
    C.set_cpu_isa("avx512")
    C.set_cpu_amx(True)
    yield C.set_cpu_amx
    C.set_cpu_isa(isa)
    C.set_cpu_amx(amx)


def _table(queries, centroids, n_probe, mask):
    return ops.centroid_scores(
        queries, centroids, n_probe, mask, backend="cpp", layout="centroid", with_max=True
    )


# lq 70: five groups of 16 tokens (passes of two, then one); 13: one group; n_centroids not a
# multiple of the 32-centroid step (a short last step on some thread), and fewer than one step.
@pytest.mark.parametrize("dim", [40, 48, 50, 64, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    ("nq", "lq", "n_centroids"), [(3, 13, 1031), (2, 70, 300), (1, 32, 4099), (2, 5, 17)]
)
def test_amx_table_exact_on_integers(amx_tiles, dim, dtype, nq, lq, n_centroids):
    # Integer values: every product and sum is exact in both kernels, so the tiles must give the
    # reference's scores bit for bit, and its ids with ties to the lower id.
    g = torch.Generator().manual_seed(dim * n_centroids + lq)
    queries = make_values((nq, lq, dim), True, g)
    centroids = make_values((n_centroids, dim), True, g)
    mask = make_query_mask(nq, lq, g)  # query 0 has no valid token
    n_probe = min(8, n_centroids)
    table, ids, cmax = _table(queries, centroids.to(dtype), n_probe, mask)
    amx_tiles(False)
    want_table, want_ids, want_max = _table(queries, centroids.to(dtype), n_probe, mask)
    assert torch.equal(table, want_table)
    assert torch.equal(ids, want_ids)
    assert torch.equal(cmax, want_max)
    _, ref_ids = reference.centroid_scores(queries, centroids, n_probe, mask)
    assert torch.equal(ids, ref_ids)
    assert (cmax[0] == float("-inf")).all() and (table[0] == 0).all()


@pytest.mark.parametrize("dim", [48, 64])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_amx_table_within_fp32_rounding(amx_tiles, dim, dtype):
    # Unit vectors, like a codec's: the split products (bf16 pieces of fp16 centroids and of fp32
    # queries) differ from the fp32 kernel's sums by a few ulp only; the maxima are the table's.
    g = torch.Generator().manual_seed(dim)
    queries = torch.nn.functional.normalize(torch.randn(4, 32, dim, generator=g), dim=-1)
    centroids = torch.nn.functional.normalize(torch.randn(5000, dim, generator=g), dim=-1).to(dtype)
    mask = torch.rand(4, 32, generator=g) < 0.7
    table, ids, cmax = _table(queries, centroids, 4, mask)
    amx_tiles(False)
    want_table, want_ids, _ = _table(queries, centroids, 4, mask)
    assert (table - want_table).abs().max() <= 6e-7  # dropping the q_lo products: ~2e-6
    valid = mask.sum(dim=1)
    for i in range(4):
        n = int(valid[i])
        assert (table[i, :, n:] == 0).all()
        assert torch.equal(cmax[i], table[i, :, :n].amax(dim=1))
    # Ids may differ only where two centroids' scores are within that rounding of each other.
    token = CentroidScores(want_table, query_len=32).token_major(mask)
    rows = token[mask]
    for got, want, row in zip(ids[mask].tolist(), want_ids[mask].tolist(), rows, strict=True):
        for c in set(got) ^ set(want):
            assert abs(float(row[c] - row[want[-1]])) <= 2e-6


def test_amx_can_be_turned_off(amx_tiles):
    from edgeplaid._native import C
    from edgeplaid.ops.attention import amx_ready

    assert C.cpu_info()["op_isa"]["centroid_scores"].startswith("amx")
    amx_tiles(False)
    info = C.cpu_info()
    assert not C.cpu_amx() and not amx_ready() and info["amx_ready"] and not info["amx_enabled"]
    assert info["op_isa"]["centroid_scores"] == "avx512"
    # bf16 attention leaves the tiles for vdpbf16ps (every AMX CPU has AVX512-BF16), or none
    assert info["op_isa"]["attention[bf16]"] == ("avx512bf16" if info["features"]["avx512_bf16"] else "none")
    q = torch.zeros(1, 4, 1, 64, dtype=torch.bfloat16)
    if info["op_isa"]["attention[bf16]"] == "none":
        with pytest.raises(ValueError, match="attention: bfloat16 needs AMX-BF16"):
            ops.attention(q, q, q, backend="cpp")
    else:
        assert not ops.attention(q, q, q, backend="cpp").any()


def test_amx_table_at_the_ends_of_fp32(amx_tiles):
    # A query value beyond bf16's largest (3.4e38, finite in fp32) must not become inf in the
    # pieces, and values too small for the tiles (subnormal pieces are zero there) send the call to
    # the AVX-512 kernel: both give the AVX-512 kernel's ids and (near-)scores.
    q = torch.zeros(1, 3, 16)
    q[0, :, 0] = torch.tensor([1.0, 3.4e38, 1e-39])  # 3.4e38 rounds to inf in bf16
    q[0, :2, 1] = 1e-3
    c = torch.full((40, 16), 0.5).half()
    c[7] = 0.75
    for values in (q[:, :2], q):
        table, ids, cmax = _table(values, c, 2, None)
        amx_tiles(False)
        want_table, want_ids, want_max = _table(values, c, 2, None)
        amx_tiles(True)
        assert torch.isfinite(table).all()
        assert torch.equal(ids, want_ids) and ids[0, :, 0].eq(7).all()
        torch.testing.assert_close(table, want_table, rtol=1e-6, atol=0)
        torch.testing.assert_close(cmax, want_max, rtol=1e-6, atol=0)


def test_amx_table_on_three_threads(amx_tiles):
    # More pool threads than this machine's cores: each owns a range of 32-centroid steps.
    import edgeplaid

    g = torch.Generator().manual_seed(3)
    queries = make_values((2, 32, 48), True, g)
    centroids = make_values((1000, 48), True, g).half()
    mask = make_query_mask(2, 32, g)
    previous = edgeplaid.get_num_threads()
    edgeplaid.set_num_threads(3)
    try:
        got = _table(queries, centroids, 5, mask)
        amx_tiles(False)
        want = _table(queries, centroids, 5, mask)
    finally:
        edgeplaid.set_num_threads(previous)
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)


# ---- precision="int8": integer products (csrc/cpu/centroid_scores_impl.h, centroid_scores_int8)


@pytest.mark.parametrize("dim", [16, 30, 48, 64, 128])
@pytest.mark.parametrize(
    ("nq", "lq", "n_centroids", "n_probe"),
    [(1, 1, 1, 1), (3, 13, 11, 4), (2, 32, 1000, 2), (1, 7, 97, 8), (2, 40, 4099, 16), (5, 33, 300, 9)],
)
def test_int8_bit_exact_on_every_isa(cpp_int8_isa, dim, nq, lq, n_centroids, n_probe):
    # The integer sums are exact and the epilogue the same two roundings on every ISA: the cpp
    # kernel equals its reference bit for bit, scores, ids and centroid maxima, in both layouts
    # (lq 33 and 40 leave partial last vectors on every lane width; 5 queries pack tokens of
    # several queries into one vector).
    g = torch.Generator().manual_seed(dim * n_centroids + lq)
    queries = torch.randn(nq, lq, dim, generator=g)
    centroids = torch.randn(n_centroids, dim, generator=g).half()
    mask = make_query_mask(nq, lq, g) if nq > 1 else None
    for layout in ("token", "centroid"):
        kw = dict(layout=layout, with_max=True, precision="int8")
        got = ops.centroid_scores(queries, centroids, n_probe, mask, backend="cpp", **kw)
        want = ops.centroid_scores(queries, centroids, n_probe, mask, backend="reference", **kw)
        for a, b in zip(got, want, strict=True):
            assert torch.equal(a, b), layout


def test_int8_formula_and_fidelity():
    # The reference against the formula written out, and the int8 scores within the quantisation's
    # bound of the exact ones: |q.c - q'.c'| <= |q|_1 * scale_c / 2 + |L_c|_1 * scale_c * qscale / 2.
    g = torch.Generator().manual_seed(5)
    q = torch.nn.functional.normalize(torch.randn(2, 9, 48, generator=g), dim=-1)
    c = torch.nn.functional.normalize(torch.randn(500, 48, generator=g), dim=-1)
    before = c.clone()
    levels, scales = ops.quantise_centroids(c)
    assert torch.equal(c, before)  # worked on a copy
    assert levels.dtype == torch.int8 and levels.shape == (2, 500, 48) and scales.shape == (500,)
    full = levels[0].long() * 64 + levels[1].long()
    assert int(levels[0].abs().max()) == 63 and int(levels[1].abs().max()) <= 32
    assert int(full.abs().max()) == 4032
    assert ((full.double() * scales[:, None].double() - c.double()).abs() <= scales[:, None] / 2 + 1e-7).all()
    qscale = q.abs().amax(-1, keepdim=True) / 127
    qq = torch.round(q / qscale)
    dots = torch.einsum("qid,cd->qic", qq.double(), full.double()).float()
    want = dots * (qscale * scales)
    got, _ = reference.centroid_scores_int8(q, levels, scales, 4)
    assert torch.equal(got, want)
    exact = torch.einsum("qid,cd->qic", q, c)
    bound = q.abs().sum(-1, keepdim=True) * scales / 2 + full.abs().sum(-1).float() * scales * qscale / 2
    assert ((got - exact).abs() <= bound + 1e-6).all()
    assert (got - exact).abs().max() < 0.01  # unit vectors: the query's 8 bits, ~1e-3 typical


def test_int8_quantise_centroids_layout():
    # dim not a multiple of 4: zero levels past dim; a zero row: scale 0, levels 0; a Codec's are
    # computed once.
    c = torch.tensor([[0.5, -0.75, 0.25, 0.0, 2.0], [0.0] * 5])
    levels, scales = ops.quantise_centroids(c)
    assert levels.shape == (2, 2, 8)
    # L = round(c / (2 / 4032)) = 1008, -1512, 504, 0, 4032 -> hi = round(L / 64), lo = L - 64 hi
    assert levels[0, 0].tolist() == [16, -24, 8, 0, 63, 0, 0, 0]
    assert levels[1, 0].tolist() == [-16, 24, -8, 0, 0, 0, 0, 0]
    assert levels[:, 1].abs().sum() == 0 and scales[1] == 0
    assert torch.equal(scales[:1], torch.tensor([2.0]) / 4032)
    from edgeplaid.ops.bundles import Codec

    codec = Codec(c, torch.tensor([-0.1, 0.1]), 1)
    assert ops.quantise_centroids(codec) is ops.quantise_centroids(codec)


def test_int8_zero_query_token_and_masks(cpp_int8_isa):
    # A zero query token scores 0 everywhere (qscale 0); masked tokens 0 with ids -1.
    q = torch.randn(2, 5, 48)
    q[1, 2] = 0
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[0, 3] = False
    c = torch.randn(200, 48)
    scores, ids = ops.centroid_scores(q, c, 3, mask, backend="cpp", precision="int8")
    assert (scores[1, 2] == 0).all() and (scores[0, 3] == 0).all() and (ids[0, 3] == -1).all()
    assert ids[1, 2].tolist() == [0, 1, 2]  # all tied at 0: the lowest ids


def test_int8_argument_errors():
    q, c = torch.randn(1, 4, 48), torch.randn(100, 48)
    with pytest.raises(ValueError, match="precision: expected one of"):
        ops.centroid_scores(q, c, 2, backend="cpp", precision="fp8")
    with pytest.raises(ValueError, match="precision: 'int8' runs on the cpp and reference"):
        ops.centroid_scores(q, c, 2, backend="triton", precision="int8")
    from edgeplaid._native import C

    if C is None:
        pytest.skip("edgeplaid._C is not built")
    qn, cn = q.numpy(), c.numpy()

    def call(levels, scales):
        return C.centroid_scores(
            qn, None, cn, "float32", 2, precision="int8", centroid_levels=levels, centroid_scales=scales
        )

    with pytest.raises(ValueError, match="centroid_levels, centroid_scales: expected both"):
        call(None, None)
    levels, scales = ops.quantise_centroids(c)
    with pytest.raises(ValueError, match="centroid_levels: expected size 48"):
        call(levels[:, :, :44].contiguous().numpy(), scales.numpy())
    with pytest.raises(ValueError, match="centroid_levels: expected a 3-D array"):
        call(levels[0].numpy(), scales.numpy())
    with pytest.raises(ValueError, match="centroid_levels: expected int8"):
        call(levels.to(torch.int16).numpy(), scales.numpy())
    with pytest.raises(ValueError, match="centroid_scales: expected size 100"):
        call(levels.numpy(), scales[:99].numpy())
    with pytest.raises(ValueError, match="centroid_levels: expected a numpy array"):
        call(levels.tolist(), scales.numpy())
    wide_q, wide_c = torch.randn(1, 2, 4036), torch.randn(10, 4036)  # past the int32 sums' reach
    wl, ws = ops.quantise_centroids(wide_c)
    with pytest.raises(ValueError, match="queries: int8 stage 1 takes dim <= 4032"):
        C.centroid_scores(wide_q.numpy(), None, wide_c.numpy(), "float32", 2, precision="int8",
                          centroid_levels=wl.numpy(), centroid_scales=ws.numpy())  # fmt: skip
