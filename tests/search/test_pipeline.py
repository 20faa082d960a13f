"""One search pipeline for every device: the Triton backend (interpreter on CPU, or a GPU) against
the C++ one, bundles checked once and never again per query, devices named in errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from _plaid_data import corpus, queries
from edgeplaid import Index
from edgeplaid.ops import _validate, bundles, fused_decompress_maxsim, maxsim_packed

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False

CUDA = torch.cuda.is_available()


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    # Small: the Triton interpreter runs every program in Python.
    tokens, doclens, topics = corpus(n_docs=48, n_topics=12, seed=3)
    idx = Index.build(tmp_path_factory.mktemp("p") / "i", tokens, doclens, n_centroids=32, progress=False)
    return idx, topics


def _agree(a: torch.Tensor, b: torch.Tensor, sa: torch.Tensor, budget: int) -> None:
    """Same top-k ids, up to ``budget`` swaps between scores within 1e-4 of each other."""
    diff = (a.cpu() != b.cpu()).nonzero().tolist()
    assert len(diff) <= budget, diff
    for qi, j in diff:
        near = (sa[qi] - sa[qi, j]).abs() <= 1e-4
        assert int(near.sum()) >= 2, (qi, j)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_triton_pipeline_matches_cpp(small):
    """Stages 1-4 and the torch glue on the Triton backend (the GPU's path) return the C++
    pipeline's top-k (exact last stage on both) and scores within fp32 rounding."""
    idx, topics = small
    q, m = queries(topics, n=3, length=6, seed=2)
    if CUDA:
        idx = Index.load(idx.path, device="cuda")
    cpu = Index.load(idx.path)
    want = cpu.search(q, k=5, queries_mask=m, precision="exact", n_probe=2, n_candidates=16, n_rerank=8)
    got = idx.search(q, k=5, queries_mask=m, n_probe=2, n_candidates=16, n_rerank=8, backend="triton")
    assert got.ids.device == idx.device
    _agree(got.ids, want.ids, want.scores, budget=1)
    assert torch.allclose(got.scores.cpu(), want.scores, atol=1e-4)
    ex_want = cpu.search_exhaustive(q, k=4, queries_mask=m)
    ex_got = idx.search_exhaustive(q, k=4, queries_mask=m, backend="triton")
    _agree(ex_got.ids, ex_want.ids, ex_want.scores, budget=1)
    assert torch.allclose(ex_got.scores.cpu(), ex_want.scores, atol=1e-4)


def test_torch_glue_gathers_what_numpy_gathers(small):
    """The device-agnostic candidate gathering returns the numpy path's lists."""
    from edgeplaid.search._plaid import _gather_numpy, _gather_torch

    idx, topics = small
    s = idx._searcher
    _q, m = queries(topics, n=5, length=6, seed=4)
    top = torch.randint(-1, idx.n_centroids, (5, 6, 3))
    got = _gather_torch(top, m, s.parts)
    marks = np.zeros(s.n_docs, dtype=bool)
    for i in range(5):
        want = _gather_numpy(top[i].numpy(), m[i].numpy(), s._ivf_offsets, s._ivf_docs, marks)
        row = got[i][got[i] >= 0].numpy()
        assert np.array_equal(row, want)
        assert not marks.any()


def test_search_never_rescans_the_index(small):
    """The index's bundles are checked once, at load: a search runs no O(n_docs) check."""
    idx, topics = small
    q, m = queries(topics, n=4, length=6, seed=5)
    idx.search(q, k=3, queries_mask=m)  # warm
    before = dict(_validate.DATA_SCANS)
    idx.search(q, k=3, queries_mask=m)
    idx.search(q, k=3, queries_mask=m, precision="exact")
    idx.search_exhaustive(q, k=3, queries_mask=m)
    assert _validate.DATA_SCANS == before
    # plain tensors are still checked at the op's boundary (the counter sees it)
    fused_decompress_maxsim(
        q, idx.codes, idx.residuals, idx.doc_offsets, None, idx.centroids, idx.bucket_weights, 4
    )
    assert _validate.DATA_SCANS.get("doc_offsets", 0) == before.get("doc_offsets", 0) + 1


def test_a_bundle_is_trusted_and_a_bad_one_is_stopped_by_the_kernels():
    q = torch.randn(2, 3, 16)
    tokens = torch.randn(10, 16)
    good = bundles.packed_docs(tokens, torch.tensor([0, 4, 10]), dim=16, device=q.device)
    scans = _validate.DATA_SCANS.get("doc_offsets", 0)
    assert torch.allclose(maxsim_packed(q, good), maxsim_packed(q, tokens, torch.tensor([0, 4, 10])))
    assert _validate.DATA_SCANS["doc_offsets"] == scans + 1  # the tensor call only
    bad = bundles.PackedDocs(tokens, torch.tensor([0, 4, 99]))  # hand-made: never checked in Python
    with pytest.raises(ValueError):
        maxsim_packed(q, bad)
    bad_ids = bundles.Candidates(torch.tensor([[0, 7], [1, -1]]), n_docs=2)
    with pytest.raises(ValueError):
        maxsim_packed(q, good, candidates=bad_ids)
    with pytest.raises(ValueError, match="checked against 5 documents"):
        maxsim_packed(q, good, candidates=bundles.Candidates(torch.tensor([[0], [1]]), n_docs=5))


def test_device_mismatch_names_both_devices():
    q = torch.randn(1, 3, 8)
    with pytest.raises(ValueError, match=r"doc_tokens: expected a tensor on cpu.*got one on meta"):
        maxsim_packed(q, torch.empty(4, 8, device="meta"), torch.tensor([0, 4]))


def test_index_device_round_trip_and_errors(small):
    idx, topics = small
    q, m = queries(topics, n=2, length=5, seed=6)
    want = idx.search(q, k=3, queries_mask=m)
    assert idx.to("cpu") is idx and idx.device == torch.device("cpu")
    with pytest.raises(ValueError, match="device"):
        Index.load(idx.path, device="tpu-7")
    if not CUDA:
        with pytest.raises(ValueError, match=r"cuda.*CUDA is not available"):
            Index.load(idx.path, device="cuda")
    else:
        gpu = Index.load(idx.path, device="cuda")
        back = gpu.to("cpu")
        assert back.device == torch.device("cpu")
        got = back.search(q, k=3, queries_mask=m)
        assert torch.equal(got.ids, want.ids)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_gpu_search_equals_cpu_exact_and_queries_follow_the_index(small):
    idx, topics = small
    q, m = queries(topics, n=6, length=6, seed=7)
    gpu = Index.load(idx.path, device="cuda")
    want = idx.search(q, k=5, queries_mask=m, precision="exact")
    got = gpu.search(q.cuda(), k=5, queries_mask=m.cuda())
    assert got.ids.is_cuda and got.scores.is_cuda
    _agree(got.ids, want.ids, want.scores, budget=2)
    got_cpu_q = gpu.search(q, k=5, queries_mask=m)  # CPU queries follow the index to the GPU
    assert torch.equal(got_cpu_q.ids, got.ids)
    assert gpu.search(q.cuda(), k=5, queries_mask=m.cuda(), subset=[0, 1, 2]).ids.max() <= 2


def test_joined_ivf_of_a_living_index(tmp_path, monkeypatch):
    """Three segments: the IVF stage 2 reads is every segment's lists, cell by cell, in segment
    order, at global positions; deleted documents are masked by the live array; the next version
    after a delete shares the joined lists; search equals the pipeline over the padded path."""
    from edgeplaid.index import _mutate

    monkeypatch.setattr(_mutate, "MERGE_FACTOR", 0)  # keep the three segments
    tokens, doclens, topics = corpus(n_docs=90, n_topics=12, seed=5)
    off = np.concatenate([[0], np.cumsum(doclens.numpy())])
    idx = Index.build(tmp_path / "i", tokens[: off[30]], doclens[:30], n_centroids=32, progress=False)
    idx.add(tokens[off[30] : off[60]], doclens[30:60])
    idx.add(tokens[off[60] :], doclens[60:])
    s = idx._state.searcher
    assert len(s.parts) == 3
    ivf, live = s.joined_ivf()
    assert live is None
    for c in range(idx.n_centroids):
        want = np.concatenate(
            [p.ivf.docs[p.ivf.offsets[c] : p.ivf.offsets[c + 1]].numpy() + p.start for p in s.parts]
        )
        assert np.array_equal(ivf.docs[ivf.offsets[c] : ivf.offsets[c + 1]].numpy(), want)
    q, m = queries(topics, n=6, length=8, seed=6)
    before = idx.search(q, k=10, queries_mask=m)
    idx.delete(list(before.user_ids[0][:3]))
    s2 = idx._state.searcher
    ivf2, live2 = s2.joined_ivf()
    assert ivf2 is ivf  # the same segments: the joined lists are shared, not joined again
    assert live2 is not None and int((~live2).sum()) == 3
    got = idx.search(q, k=10, queries_mask=m)
    assert not set(before.user_ids[0][:3]) & set(got.user_ids[0])
    # The filtered (padded) path with every live document allowed gives the same lists.
    allowed = idx.positions(list(idx.ids()))
    padded = idx.search(q, k=10, queries_mask=m, subset=allowed, n_candidates=10**6, n_rerank=10**6)
    exact = idx.search(q, k=10, queries_mask=m, n_candidates=10**6, n_rerank=10**6)
    assert torch.equal(padded.ids, exact.ids)
