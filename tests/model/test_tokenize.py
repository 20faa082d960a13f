"""Tokenisation rules (PyLate's, checked here without PyLate): prefix after the first special token,
lengths counting the prefix, one truncation warning, lowercasing, skiplist on documents only,
expansion with the mask token; plus order, batching and dtype invariances of the outputs."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from edgeplaid.model import ColBERT

from ._texts import DOCUMENTS, QUERIES


@pytest.fixture(scope="module")
def m17(model_dirs: dict[str, Path]) -> ColBERT:
    return ColBERT.from_pretrained(model_dirs["17m"], precision="fp32")


def test_settings_from_checkpoint(m17: ColBERT) -> None:
    s = m17.settings
    assert (s.query_prefix, s.document_prefix) == ("[Q] ", "[D] ")
    assert (s.query_length, s.document_length) == (48, 512)
    assert s.do_lower_case and not s.do_query_expansion and not s.attend_to_expansion_tokens
    assert m17.output_dim == 48 and m17.layout == "pylate"
    assert m17.pad_id == m17.tokenizer.mask_token_id


def test_prefix_after_first_special_token(m17: ColBERT) -> None:
    tok = m17.tokenizer
    (q,) = m17.tokenize(["hello world"], is_query=True)
    (d,) = m17.tokenize(["hello world"], is_query=False)
    body = tok("hello world")["input_ids"]
    assert q == [body[0], m17.query_prefix_id, *body[1:]]
    assert d == [body[0], m17.document_prefix_id, *body[1:]]
    assert tok.convert_ids_to_tokens(m17.query_prefix_id) == "[Q] "


def test_truncation_counts_prefix_and_warns_once(model_dirs: dict[str, Path]) -> None:
    m = ColBERT.from_pretrained(model_dirs["17m"], query_length=10, document_length=16, precision="fp32")
    with pytest.warns(UserWarning, match=r"2 of 3 documents exceeded the length limit of 16") as rec:
        ids = m.tokenize(["word " * 40, "short one", "word " * 50], is_query=False)
    assert len([w for w in rec if "exceeded" in str(w.message)]) == 1
    assert [len(x) for x in ids] == [16, 5, 16]
    assert ids[0][-1] == m.tokenizer.sep_token_id  # truncation keeps the closing special token
    with pytest.warns(UserWarning, match="1 of 1 queries"):
        q, mask = m.encode_queries(["word " * 40])
    assert q.shape == (1, 10, 48) and bool(mask.all())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m.tokenize(["word " * 6], is_query=True)  # exactly at the limit: 1 + 1 + 7 + 1 = 10, no warning


def test_lowercasing(m17: ColBERT) -> None:
    assert m17.tokenize(["HeLLo WORLD"], True) == m17.tokenize(["hello world"], True)
    assert m17.tokenize(["  padded  "], True) == m17.tokenize(["padded"], True)  # stripped


def test_skiplist_documents_only(m17: ColBERT) -> None:
    _, qmask = m17.encode_queries(["a , b . c !"])
    _, doclens = m17.encode_documents(["a , b . c !"])
    (ids,) = m17.tokenize(["a , b . c !"], is_query=False)
    skip = set(m17.skiplist_ids.tolist())
    assert int(qmask.sum()) == len(ids)  # queries keep punctuation
    assert int(doclens[0]) == len([t for t in ids if t not in skip]) == len(ids) - 3


def test_query_expansion_pads_with_mask_token(model_dirs: dict[str, Path]) -> None:
    m = ColBERT.from_pretrained(model_dirs["17m"], do_query_expansion=True, precision="fp32")
    q, mask = m.encode_queries(["short", "a bit longer query"])
    assert q.shape == (2, 48, 48) and bool(mask.all())
    assert torch.allclose(q.norm(dim=-1), torch.ones(2, 48), atol=1e-5)
    # Expansion tokens differ between queries (they attend to the query's tokens).
    assert not torch.allclose(q[0, 40], q[1, 40])


@pytest.mark.filterwarnings("ignore:.*truncated")
def test_outputs_normalised_and_shaped(m17: ColBERT) -> None:
    q, mask = m17.encode_queries(QUERIES)
    assert q.dtype == torch.float32 and mask.dtype == torch.bool and q.shape[:2] == mask.shape
    assert torch.allclose(q[mask].norm(dim=-1), torch.ones(int(mask.sum())), atol=1e-5)
    assert bool((q[~mask] == 0).all())
    tokens, doclens = m17.encode_documents(DOCUMENTS)
    assert tokens.dtype == torch.float32 and doclens.dtype == torch.int64
    assert tokens.shape == (int(doclens.sum()), 48) and doclens.shape == (len(DOCUMENTS),)
    assert torch.allclose(tokens.norm(dim=-1), torch.ones(tokens.shape[0]), atol=1e-5)


@pytest.mark.filterwarnings("ignore:.*truncated")
def test_order_and_batch_size_invariance(m17: ColBERT) -> None:
    tokens, doclens = m17.encode_documents(DOCUMENTS, batch_size=16)
    rev_tokens, rev_doclens = m17.encode_documents(DOCUMENTS[::-1], batch_size=1)
    assert rev_doclens.tolist() == doclens.tolist()[::-1]
    parts = torch.split(tokens, doclens.tolist())
    rev_parts = torch.split(rev_tokens, rev_doclens.tolist())[::-1]
    for a, b in zip(parts, rev_parts, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    q, mask = m17.encode_queries(QUERIES, batch_size=1)
    q2, mask2 = m17.encode_queries(QUERIES, batch_size=64)
    assert torch.equal(mask, mask2)
    torch.testing.assert_close(q, q2, atol=1e-5, rtol=0)


@pytest.mark.filterwarnings("ignore:.*truncated")
def test_packed_forward_matches_transformers(model_dirs: dict[str, Path]) -> None:
    m = ColBERT.from_pretrained(model_dirs["32m"], do_query_expansion=True, precision="fp32")
    assert m._packed is not None and m.use_fast_forward is None  # None: on CPU
    fast = m.encode_documents(DOCUMENTS), m.encode_queries(QUERIES)
    m.use_fast_forward = False
    slow = m.encode_documents(DOCUMENTS), m.encode_queries(QUERIES)
    for a, b in zip(fast, slow, strict=True):
        torch.testing.assert_close(a[0], b[0], atol=1e-5, rtol=0)
        assert torch.equal(a[1], b[1])


@pytest.mark.filterwarnings("ignore:.*truncated")
@pytest.mark.parametrize(("block", "onednn"), [(64, False), (7, True), (1000, True)])
def test_packed_forward_blocks_and_plain_linears(
    model_dirs: dict[str, Path], block: int, onednn: bool
) -> None:
    """Sliding-window attention in blocks of any size (ragged last block, a block longer than the
    documents), oneDNN or plain linear layers: transformers' outputs, padding included."""
    m = ColBERT.from_pretrained(model_dirs["17m"], precision="fp32")
    docs = [*DOCUMENTS, " ".join(DOCUMENTS[2:4]) * 3]
    m.use_fast_forward = False
    want = m.encode_documents(docs, batch_size=3)
    m.use_fast_forward = True
    m._packed.block = block
    m._linears.enabled = m._linears.enabled and onednn
    got = m.encode_documents(docs, batch_size=3)
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=0)
    assert torch.equal(got[1], want[1])


def test_packed_weights_follow_the_parameters(model_dirs: dict[str, Path]) -> None:
    """The oneDNN copies of the weights are re-made when a parameter changes in place."""
    m = ColBERT.from_pretrained(model_dirs["17m"], precision="fp32")
    before = m.encode_documents(DOCUMENTS[:2])[0]
    with torch.no_grad():
        m.backbone.layers[1].mlp.Wo.weight.mul_(2)
        m.head[0].linear.weight.mul_(-1)
    after = m.encode_documents(DOCUMENTS[:2])[0]
    m.use_fast_forward = False
    m._linears.enabled = False  # transformers' forward, F.linear head: the live parameters
    torch.testing.assert_close(after, m.encode_documents(DOCUMENTS[:2])[0], atol=1e-5, rtol=0)
    assert not torch.allclose(after, before, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(model_dirs: dict[str, Path], dtype: torch.dtype) -> None:
    """Half weights (CPU here; the GPU path is the same code): finite, normalised, close to fp32."""
    ref = ColBERT.from_pretrained(model_dirs["17m"], precision="fp32")
    half = ColBERT.from_pretrained(model_dirs["17m"], dtype=dtype)
    assert half.dtype == dtype
    texts = DOCUMENTS[:4]
    t32, l32 = ref.encode_documents(texts)
    t16, l16 = half.encode_documents(texts)
    assert torch.equal(l32, l16) and t16.dtype == torch.float32 and torch.isfinite(t16).all()
    assert (t16 * t32).sum(-1).mean() > 0.97  # cosine with the fp32 vectors
    q, mask = half.encode_queries(QUERIES[:3])
    assert torch.isfinite(q).all() and bool((q[~mask] == 0).all())


def test_empty_input_list(m17: ColBERT) -> None:
    tokens, doclens = m17.encode_documents([])
    assert tokens.shape == (0, 48) and doclens.shape == (0,)
    q, mask = m17.encode_queries([])
    assert q.shape == (0, 0, 48) and mask.shape == (0, 0)


def test_single_string_is_one_text(m17: ColBERT) -> None:
    q, mask = m17.encode_queries("one query")
    assert q.shape[0] == 1 and mask.shape[0] == 1
