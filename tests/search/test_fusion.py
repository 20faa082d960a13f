"""Fusion arithmetic (edgeplaid.search._fusion) on fixed score lists, computed by hand."""

from __future__ import annotations

import numpy as np
import pytest

from edgeplaid.search._fusion import RRF_K, fuse


def test_rrf_by_hand():
    late = np.array([0.9, 0.5, 0.7, 0.1], dtype=np.float32)  # ranks 1, 3, 2, 4
    lexical = np.array([0.0, 3.0, 5.0, 1.0], dtype=np.float32)  # doc 0 unmatched; ranks -, 2, 1, 3
    got = fuse(late, lexical, "rrf", 0.5)
    k = RRF_K
    want = [
        0.5 / (k + 1),
        0.5 / (k + 3) + 0.5 / (k + 2),
        0.5 / (k + 2) + 0.5 / (k + 1),
        0.5 / (k + 4) + 0.5 / (k + 3),
    ]
    np.testing.assert_allclose(got, want, rtol=1e-12)
    # alpha weighs the sides: alpha=1 is the late ranking alone, alpha=0 the lexical one
    np.testing.assert_allclose(fuse(late, lexical, "rrf", 1.0), [1 / (k + r) for r in (1, 3, 2, 4)])
    np.testing.assert_allclose(fuse(late, lexical, "rrf", 0.0), [0, 1 / (k + 2), 1 / (k + 1), 1 / (k + 3)])


def test_rrf_ties_share_a_rank():
    got = fuse(np.array([1.0, 1.0, 0.5]), np.array([2.0, 2.0, 0.0]), "rrf", 0.5)
    assert got[0] == got[1] == 0.5 / (RRF_K + 1) + 0.5 / (RRF_K + 1)  # ranks 1, 1 on both sides
    assert got[2] == 0.5 / (RRF_K + 3)


def test_relative_score_by_hand():
    late = np.array([10.0, 20.0, 15.0], dtype=np.float32)  # min 10, max 20 -> 0, 1, 0.5
    lexical = np.array([4.0, 0.0, 2.0], dtype=np.float32)  # min 0, max 4 -> 1, 0, 0.5
    got = fuse(late, lexical, "relative_score", 0.6)
    np.testing.assert_allclose(got, [0.6 * 0 + 0.4 * 1, 0.6 * 1 + 0.4 * 0, 0.6 * 0.5 + 0.4 * 0.5])


def test_relative_score_constant_side_is_zero():
    got = fuse(np.array([3.0, 3.0]), np.array([0.0, 2.0]), "relative_score", 0.5)
    np.testing.assert_allclose(got, [0.0, 0.5])


def test_empty_union_and_unknown_fusion():
    assert fuse(np.zeros(0), np.zeros(0), "rrf", 0.5).shape == (0,)
    with pytest.raises(ValueError, match="fusion"):
        fuse(np.ones(2), np.ones(2), "sum", 0.5)
