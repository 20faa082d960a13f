"""Token-budget batching: the same vectors whatever the batches, and clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tests.model._texts import DOCUMENTS

from edgeplaid.model import ColBERT


def test_batches_fill_a_token_budget(model_dirs: dict[str, Path]) -> None:
    model = ColBERT.from_pretrained(model_dirs["17m"], precision="fp32")
    ids = [[1] * n for n in (5, 300, 40, 41, 7, 120)]
    got = list(model._batches(ids, None, "", False, max_tokens=300))
    assert [c for c, _ in got] == [[1], [5, 3], [2, 4, 0]]  # longest first, <= 300 padded positions
    capped = list(model._batches(ids, 2, "", False, max_tokens=1000))
    assert [len(c) for c, _ in capped] == [2, 2, 2]
    with pytest.raises(ValueError, match="max_tokens must be >= 1"):
        list(model._batches(ids, None, "", False, max_tokens=0))


def test_same_vectors_whatever_the_batches(model_dirs: dict[str, Path]) -> None:
    model = ColBERT.from_pretrained(model_dirs["17m"], precision="fp32")
    ref, lens = model.encode_documents(DOCUMENTS, batch_size=1)
    for kwargs in ({}, {"max_tokens": 64}, {"max_tokens": 100_000}, {"batch_size": 3, "max_tokens": 900}):
        got, got_lens = model.encode_documents(DOCUMENTS, **kwargs)
        assert torch.equal(got_lens, lens)
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
