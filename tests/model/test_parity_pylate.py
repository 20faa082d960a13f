"""Parity with PyLate's ``ColBERT.encode`` (fp32, max abs diff <= 1e-5, identical masks and token
ids) on random checkpoints with the exact mxbai-edge-colbert-v0 17m / 32m shapes, a tiny BERT
ColBERT and the Stanford HF_ColBERT layout; expansion on/off, truncation, lowercasing, skiplist."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from edgeplaid.model import ColBERT
from edgeplaid.model._testing import build_modernbert_colbert

from ._texts import DOCUMENTS, QUERIES

try:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from pylate import models as pylate_models
except Exception as exc:  # ImportError, or a broken optional dependency of pylate
    pylate_models = None
    _why = f"pylate cannot be imported ({type(exc).__name__}: {exc}); see .ci/run for the install lines"

pytestmark = pytest.mark.skipif(pylate_models is None, reason=_why if pylate_models is None else "")

ATOL = 1e-5


def _as_tensor(x) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x)) if not isinstance(x, torch.Tensor) else x


def assert_parity(ours: ColBERT, theirs, queries: list[str], documents: list[str]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # truncation warnings: tested elsewhere
        q, qmask = ours.encode_queries(queries, batch_size=3)
        tokens, doclens = ours.encode_documents(documents, batch_size=2)
        q_ids = ours.tokenize(queries, is_query=True)
        d_ids = ours.tokenize(documents, is_query=False)
        pq = theirs.encode(queries, is_query=True, output_value=None, batch_size=32)
        pd = theirs.encode(documents, is_query=False, output_value=None, batch_size=32)

    s = ours.settings
    for i in range(len(queries)):
        mask = _as_tensor(pq["masks"][i]).bool()
        ids = _as_tensor(pq["input_ids"][i])
        n = len(q_ids[i])
        assert ids[:n].tolist() == q_ids[i], f"query {i}: token ids differ"
        assert (ids[n:] == ours.pad_id).all()
        expected = _as_tensor(pq["token_embeddings"][i])[mask].float()
        assert int(qmask[i].sum()) == int(mask.sum()), f"query {i}: mask differs"
        assert qmask[i, : mask.shape[0]].tolist() == mask.tolist()
        assert not qmask[i, mask.shape[0] :].any()
        got = q[i][qmask[i]]
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
        if s.do_query_expansion:
            assert qmask.shape[1] == s.query_length and bool(qmask[i].all())

    offsets = torch.cat([torch.zeros(1, dtype=torch.long), doclens.cumsum(0)])
    assert len(doclens) == len(documents)
    for i in range(len(documents)):
        mask = _as_tensor(pd["masks"][i]).bool()
        ids = _as_tensor(pd["input_ids"][i])
        n = len(d_ids[i])
        assert ids[:n].tolist() == d_ids[i], f"document {i}: token ids differ"
        assert int(doclens[i]) == int(mask.sum()), f"document {i}: kept-token count differs"
        expected = _as_tensor(pd["token_embeddings"][i])[mask].float()
        torch.testing.assert_close(tokens[offsets[i] : offsets[i + 1]], expected, atol=ATOL, rtol=0)


CASES = [
    ("17m", {}),
    ("32m", {}),
    ("17m", {"do_query_expansion": True}),
    ("32m", {"do_query_expansion": True, "attend_to_expansion_tokens": True}),
    ("17m", {"query_length": 12, "document_length": 40}),
    ("32m", {"skiplist_words": [".", "the", ";"], "document_length": 150}),
    ("bert", {}),
    ("bert", {"do_query_expansion": True, "query_length": 20}),
    ("stanford", {}),
    ("stanford", {"do_query_expansion": False, "document_length": 30}),
    ("stanford_st", {}),
]


@pytest.mark.parametrize(
    ("name", "overrides"), CASES, ids=[f"{n}-{'-'.join(o) or 'default'}" for n, o in CASES]
)
def test_parity(model_dirs: dict[str, Path], name: str, overrides: dict) -> None:
    path = model_dirs[name]
    ours = ColBERT.from_pretrained(path, **overrides, precision="fp32")
    theirs = pylate_models.ColBERT(str(path), device="cpu", **overrides)
    assert ours.output_dim == theirs[-1].out_features
    assert ours.query_prefix_id == theirs.query_prefix_id
    assert ours.document_prefix_id == theirs.document_prefix_id
    assert ours.settings.query_length == theirs.query_length
    assert ours.settings.document_length == theirs.document_length
    assert ours.settings.do_query_expansion == theirs.do_query_expansion
    assert ours.settings.attend_to_expansion_tokens == theirs.attend_to_expansion_tokens
    assert sorted(ours.skiplist_ids.tolist()) == sorted(set(theirs.skiplist))
    assert_parity(ours, theirs, QUERIES, DOCUMENTS)


@pytest.mark.parametrize("size", ["17m", "32m"])
def test_parity_transformers_forward(model_dirs: dict[str, Path], size: str) -> None:
    """transformers' ModernBERT forward (``use_fast_forward = False``) gives PyLate's outputs too."""
    path = model_dirs[size]
    ours = ColBERT.from_pretrained(path, do_query_expansion=True, precision="fp32")
    ours.use_fast_forward = False
    theirs = pylate_models.ColBERT(str(path), device="cpu", do_query_expansion=True)
    assert_parity(ours, theirs, QUERIES, DOCUMENTS)


def test_parity_without_lowercasing(tmp_path: Path, tokenizer_dir: Path) -> None:
    """do_lower_case false: upper-case words reach the (cased here) tokenizer as they are."""
    path = build_modernbert_colbert(tmp_path / "cased", "17m", tokenizer_dir, seed=5, do_lower_case=False)
    ours = ColBERT.from_pretrained(path, precision="fp32")
    assert not ours.settings.do_lower_case
    theirs = pylate_models.ColBERT(str(path), device="cpu")
    assert_parity(ours, theirs, QUERIES, DOCUMENTS[:3])


def test_checkpoint_saved_by_pylate(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    """A directory written by PyLate's own ``save`` loads and encodes identically."""
    theirs = pylate_models.ColBERT(str(model_dirs["32m"]), device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs.save(str(tmp_path / "saved"))
    ours = ColBERT.from_pretrained(tmp_path / "saved", precision="fp32")
    assert_parity(ours, theirs, QUERIES[:2], DOCUMENTS[:2])
