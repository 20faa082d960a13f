from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import edgeplaid
from conftest import DOC_LENGTHS, make_offsets, make_query_mask
from edgeplaid import ops
from edgeplaid.ops import bundles, reference
from edgeplaid.ops.centroid_interaction import centroid_interaction_topk


@pytest.mark.parametrize("lq", [1, 13, 32, 67])
@pytest.mark.parametrize("threshold", [None, 0.0, 2.0])
@pytest.mark.parametrize("with_candidates", [False, True])
@pytest.mark.parametrize("code_dtype", [torch.uint16, torch.int32, torch.int64], ids=str)
def test_exact(cpp_isa, lq, threshold, with_candidates, code_dtype):
    g = torch.Generator().manual_seed(lq)
    n_centroids, nq = 53, 3
    scores = torch.randint(-4, 5, (nq, lq, n_centroids), generator=g).float()
    offsets = make_offsets(DOC_LENGTHS)
    codes = torch.randint(0, n_centroids, (int(offsets[-1]),), generator=g)
    mask = make_query_mask(nq, lq, g)
    cand = None
    if with_candidates:
        cand = torch.randint(0, len(DOC_LENGTHS), (nq, 11), generator=g)
        cand[:, 2] = -1
    got = ops.centroid_interaction(
        scores, codes.to(code_dtype), offsets, cand, threshold, mask, backend="cpp"
    )
    want = reference.centroid_interaction(scores, codes, offsets, cand, threshold, mask)
    assert torch.equal(got, want)


def test_equals_maxsim_over_centroids(cpp_isa):
    # Without a threshold, stage 3 is MaxSim over documents made of their centroids.
    g = torch.Generator().manual_seed(0)
    centroids = torch.randint(-2, 3, (40, 48), generator=g).float()
    queries = torch.randint(-2, 3, (2, 9, 48), generator=g).float()
    offsets = make_offsets(DOC_LENGTHS)
    codes = torch.randint(0, 40, (int(offsets[-1]),), generator=g)
    scores, _ = ops.centroid_scores(queries, centroids, 1, backend="cpp")
    got = ops.centroid_interaction(scores, codes, offsets, backend="cpp")
    assert torch.equal(got, ops.maxsim_packed(queries, centroids[codes], offsets, backend="cpp"))


@pytest.mark.parametrize("threshold", [None, 0.1])
def test_many_centroids_run_on_the_pool(cpp_isa, threshold):
    """More centroids than one parallel chunk (~512 KiB of table): the per-query table is filled by several
    threads (a thread_local named there would be the thread's own; this crashed once)."""
    g = torch.Generator().manual_seed(7)
    n_cent, lq = 13000, 19
    cs = torch.randn(2, lq, n_cent, generator=g)
    mask = torch.rand(2, lq, generator=g) > 0.2
    offsets = torch.tensor([0, 40, 41, 300, 900], dtype=torch.int64)
    codes = torch.randint(0, n_cent, (900,), generator=g, dtype=torch.int32)
    cand = torch.tensor([[0, 1, 2, 3], [3, -1, 2, 0]])
    got = ops.centroid_interaction(cs, codes, offsets, cand, threshold, mask, backend="cpp")
    want = reference.centroid_interaction(cs, codes, offsets, cand, threshold, mask)
    torch.testing.assert_close(got, want)


# ------------------------------------------------------------------ centroid_interaction_topk


def _ivf(codes: torch.Tensor, offsets: torch.Tensor, n_centroids: int) -> SimpleNamespace:
    """The inverted file of packed codes: cell c lists, ascending and once each, the documents
    having a token in c."""
    doc_of = torch.repeat_interleave(torch.arange(offsets.shape[0] - 1), offsets[1:] - offsets[:-1])
    pairs = torch.unique(codes.long() * (offsets.shape[0] - 1) + doc_of)
    cell, doc = pairs // (offsets.shape[0] - 1), pairs % (offsets.shape[0] - 1)
    ivf_offsets = torch.zeros(n_centroids + 1, dtype=torch.int64)
    ivf_offsets[1:] = torch.cumsum(torch.bincount(cell, minlength=n_centroids), 0)
    return SimpleNamespace(offsets=ivf_offsets, docs=doc.to(torch.int32))


@pytest.mark.parametrize("lq", [1, 13, 32])
@pytest.mark.parametrize("threshold", [None, 0.0, 2.0])
@pytest.mark.parametrize("n_keep", [1, 5, 40])
@pytest.mark.parametrize("layout", ["token", "centroid"])
@pytest.mark.parametrize("code_dtype", [torch.uint16, torch.int32], ids=str)
def test_topk_exact(cpp_isa, lq, threshold, n_keep, layout, code_dtype):
    """Integer scores (many ties): the kernel's ids and scores equal the reference's exactly, ties
    broken to the lower id, pruned documents (-inf) after the scored ones, -1 padding."""
    g = torch.Generator().manual_seed(lq * 7 + n_keep)
    n_centroids, nq = 53, 4
    centroids = torch.randint(-3, 4, (n_centroids, 8), generator=g).float()
    queries = torch.randint(-2, 3, (nq, lq, 8), generator=g).float()
    mask = make_query_mask(nq, lq, g)
    offsets = make_offsets(DOC_LENGTHS)
    codes = torch.randint(0, n_centroids, (int(offsets[-1]),), generator=g)
    ivf = _ivf(codes, offsets, n_centroids)
    scores, top, cmax = ops.centroid_scores(
        queries, centroids, 3, mask, backend="cpp", layout=layout, with_max=True
    )
    cs = bundles.CentroidScores(scores, query_len=lq if layout == "centroid" else None)
    docs = bundles.DocCodes(codes.to(code_dtype), offsets)
    probed = top.reshape(nq, -1)
    live = torch.rand(len(DOC_LENGTHS), generator=g) > 0.2
    for kw in ({}, {"centroid_max": cmax}, {"live": live}):
        ids, s = centroid_interaction_topk(
            cs, docs, ivf, probed, n_keep, threshold, mask, backend="cpp", **kw
        )
        want_ids, want_s = reference.centroid_interaction_topk(
            cs.token_major(mask),
            codes,
            offsets,
            ivf.offsets,
            ivf.docs,
            probed,
            n_keep,
            threshold,
            mask,
            kw.get("live"),
        )
        assert torch.equal(ids, want_ids), kw
        assert torch.equal(s, want_s), kw


def test_topk_matches_the_padded_pipeline(cpp_isa):
    """Random scores: the kept set equals gathering the cells' documents, scoring them with
    centroid_interaction and taking the n best."""
    g = torch.Generator().manual_seed(3)
    n_centroids, nq, lq = 300, 3, 32
    scores = torch.randn(nq, lq, n_centroids, generator=g)
    offsets = make_offsets([int(x) for x in torch.randint(1, 60, (400,), generator=g)])
    codes = torch.randint(0, n_centroids, (int(offsets[-1]),), generator=g, dtype=torch.int32)
    ivf = _ivf(codes, offsets, n_centroids)
    probed = torch.randint(-1, n_centroids, (nq, 64), generator=g)
    ids, s = centroid_interaction_topk(
        scores, bundles.DocCodes(codes, offsets), ivf, probed, 50, 1.5, backend="cpp"
    )
    for qi in range(nq):
        cells = probed[qi][probed[qi] >= 0].unique()
        cand = torch.unique(torch.cat([ivf.docs[ivf.offsets[c] : ivf.offsets[c + 1]].long() for c in cells]))
        full = ops.centroid_interaction(scores[qi : qi + 1], codes, offsets, cand[None], 1.5, backend="cpp")[
            0
        ]
        order = torch.sort(full, descending=True, stable=True).indices[:50]
        assert torch.equal(ids[qi], cand[order])
        torch.testing.assert_close(s[qi], full[order])


def test_topk_splits_one_query_across_threads(cpp_isa):
    """One query with thousands of candidates: scored by the whole pool, same result as alone."""
    g = torch.Generator().manual_seed(5)
    n_centroids, lq = 64, 20
    scores = torch.randn(1, lq, n_centroids, generator=g)
    offsets = make_offsets([int(x) for x in torch.randint(1, 30, (5000,), generator=g)])
    codes = torch.randint(0, n_centroids, (int(offsets[-1]),), generator=g, dtype=torch.int32)
    ivf = _ivf(codes, offsets, n_centroids)
    probed = torch.arange(10)[None]
    docs = bundles.DocCodes(codes, offsets)
    ids, s = centroid_interaction_topk(scores, docs, ivf, probed, 300, 0.5, backend="cpp")
    want_ids, want_s = reference.centroid_interaction_topk(
        scores, codes, offsets, ivf.offsets, ivf.docs, probed, 300, 0.5
    )
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(s, want_s)


def test_topk_bad_input(cpp_isa):
    offsets = make_offsets([3, 2])
    codes = torch.tensor([0, 1, 2, 2, 1], dtype=torch.int32)
    scores = torch.randn(1, 4, 3)
    docs = bundles.DocCodes(codes, offsets)
    ivf = _ivf(codes, offsets, 3)
    with pytest.raises(ValueError, match="probed: centroid id 7"):
        centroid_interaction_topk(scores, docs, ivf, torch.tensor([[7]]), 2, backend="cpp")
    bad = SimpleNamespace(offsets=ivf.offsets, docs=torch.tensor([0, 5, 1, 0, 1], dtype=torch.int32))
    with pytest.raises(ValueError, match="ivf_docs: entry 1 is document 5"):
        centroid_interaction_topk(scores, docs, bad, torch.tensor([[0, 1]]), 2, backend="cpp")
    with pytest.raises(ValueError, match="n_keep"):
        centroid_interaction_topk(scores, docs, ivf, torch.tensor([[0]]), 0, backend="cpp")
    with pytest.raises(ValueError, match="ivf: expected offsets"):
        centroid_interaction_topk(
            scores,
            docs,
            SimpleNamespace(offsets=ivf.offsets[:2], docs=ivf.docs),
            torch.tensor([[0]]),
            2,
            backend="cpp",
        )
    with pytest.raises(ValueError, match="codes: token 2 has centroid id 9"):
        centroid_interaction_topk(
            scores,
            bundles.DocCodes(torch.tensor([0, 1, 9, 2, 1], dtype=torch.int32), offsets),
            ivf,
            torch.tensor([[0, 1, 2]]),
            2,
            backend="cpp",
        )


def _topk_equals_reference(scores, codes, offsets, ivf, probed, n_keep, threshold, mask, live):
    """The cpp kernel's ids and scores equal the reference's exactly; returns the reference's scores."""
    ids, s = centroid_interaction_topk(
        scores,
        bundles.DocCodes(codes, offsets),
        ivf,
        probed,
        n_keep,
        threshold,
        mask,
        live=live,
        backend="cpp",
    )
    want_ids, want_s = reference.centroid_interaction_topk(
        scores, codes, offsets, ivf.offsets, ivf.docs, probed, n_keep, threshold, mask, live
    )
    assert torch.equal(ids, want_ids)
    assert torch.equal(s, want_s)
    return want_s


@pytest.mark.parametrize("lq", [3, 8, 24, 32, 40])
def test_topk_long_documents_few_kept_centroids(cpp_isa, lq):
    """Long documents and a high threshold: the kept centroids' IVF lists are far shorter than the
    candidates' tokens, so the kernel scores centroid by centroid (never reading the codes); its
    ids and scores equal the reference's (integer scores: exact), for lane counts in registers
    (lq <= 32) and beyond."""
    g = torch.Generator().manual_seed(lq)
    n_centroids, nq = 200, 3
    scores = torch.randint(-6, 7, (nq, lq, n_centroids), generator=g).float()
    mask = make_query_mask(nq, lq, g)
    offsets = make_offsets([200] * 60 + [1, 0, 350])
    codes = torch.randint(0, n_centroids, (int(offsets[-1]),), generator=g, dtype=torch.int32)
    ivf = _ivf(codes, offsets, n_centroids)
    probed = torch.randint(0, n_centroids, (nq, 6), generator=g)
    live = torch.ones(offsets.shape[0] - 1, dtype=torch.bool)
    live[::7] = False
    for threshold in (5.0, 6.0):
        for lv in (None, live):
            _topk_equals_reference(scores, codes, offsets, ivf, probed, 25, threshold, mask, lv)


def test_topk_one_query_by_centroid_split_across_threads(cpp_isa):
    """One query, a high threshold and ~10^5 kept list entries: the kernel splits the kept
    centroids across the pool (3 threads, whatever the machine), each part maxing into its own
    state, and merges the parts; every candidate's id and score (n_keep above their count) equal
    the reference's exactly (integer scores), with and without deleted documents."""
    g = torch.Generator().manual_seed(11)
    n_centroids, lq, threshold = 400, 24, 970.0
    scores = torch.randint(-1000, 1001, (1, lq, n_centroids), generator=g).float()
    mask = torch.arange(lq)[None] < 19  # 19 valid tokens: three lane vectors, the last partial
    kept = (scores[0][mask[0]].amax(0) >= threshold).nonzero().flatten()
    dropped = (scores[0][mask[0]].amax(0) < threshold).nonzero().flatten()
    # 3,000 random documents, then 5 holding one pruned (probed) centroid and the last kept one
    # only: they are touched in the last part alone.
    lengths = [int(x) for x in torch.randint(150, 250, (3000,), generator=g)] + [20] * 5
    offsets = make_offsets(lengths)
    codes = torch.randint(0, n_centroids, (int(offsets[-1]),), generator=g, dtype=torch.int32)
    codes[int(offsets[3000]) :] = torch.tensor([int(dropped[0])] * 10 + [int(kept[-1])] * 10).repeat(5)
    ivf = _ivf(codes, offsets, n_centroids)
    probed = torch.cat([dropped[:1], torch.randint(0, n_centroids, (5,), generator=g)])[None]
    live = torch.rand(offsets.shape[0] - 1, generator=g) > 0.1
    entries = int((ivf.offsets[kept + 1] - ivf.offsets[kept]).sum())
    # Centroid by centroid (the kept lists are shorter than the candidates' tokens), and enough
    # entries for 3 parts (kEntriesPerPart 4,096; kEntriesPerRow 4 x ~3,000 candidate rows).
    assert 3 * 4 * 3013 <= entries < int(offsets[-1]), entries
    threads = edgeplaid.get_num_threads()
    edgeplaid.set_num_threads(3)
    try:
        for lv in (None, live):
            want_s = _topk_equals_reference(scores, codes, offsets, ivf, probed, 4000, threshold, mask, lv)
            assert torch.unique(want_s).numel() > 10  # the order is decided by the scores, not the ids
    finally:
        edgeplaid.set_num_threads(threads)
