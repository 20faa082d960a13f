"""Long documents: 4,096 tokens through edgeplaid's ModernBERT forward (blocked sliding-window
attention, never an L x L matrix in the local layers) against transformers' forward."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from tests.model._texts import DOCUMENTS

from edgeplaid.model import ColBERT


def test_4096_tokens_match_transformers(model_dirs: dict[str, Path]) -> None:
    ours = ColBERT.from_pretrained(model_dirs["17m"], document_length=4096, precision="fp32")
    theirs = ColBERT.from_pretrained(model_dirs["17m"], document_length=4096, precision="fp32")
    theirs.use_fast_forward = False
    words = " ".join(DOCUMENTS).split()
    long_text = " ".join(words[i % len(words)] for i in range(6000))
    texts = [long_text, DOCUMENTS[0]]  # and a short one in the same batch: padding to 4,096
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # truncated to 4,096 tokens
        assert len(ours.tokenize(texts, is_query=False)[0]) == 4096
        a, la = ours.encode_documents(texts, batch_size=2)
        b, lb = theirs.encode_documents(texts, batch_size=2)
    assert torch.equal(la, lb) and int(la[0]) > 3000
    torch.testing.assert_close(a, b, rtol=0, atol=2e-5)
