"""The examples in the public API's docstrings run and give what they show."""

from __future__ import annotations

import doctest

import pytest

import edgeplaid.reranking


@pytest.mark.parametrize("module", [edgeplaid.reranking], ids=lambda m: m.__name__)
def test_docstring_examples(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
