"""Bad inputs raise ValueError naming the argument, on every backend: never a crash."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgeplaid import ops


def _packed():
    q = torch.randn(2, 4, 48)
    tokens = torch.randn(10, 48)
    offsets = torch.tensor([0, 3, 10])
    return q, tokens, offsets


CASES = {
    "wrong dim": (lambda q, t, o: ops.maxsim_packed(q, torch.randn(10, 40), o), "doc_tokens"),
    "offsets decreasing": (
        lambda q, t, o: ops.maxsim_packed(q, t, torch.tensor([0, 7, 3, 10])),
        "doc_offsets",
    ),
    "offsets past end": (lambda q, t, o: ops.maxsim_packed(q, t, torch.tensor([0, 3, 11])), "doc_offsets"),
    "offsets int32": (lambda q, t, o: ops.maxsim_packed(q, t, o.int()), "doc_offsets"),
    "candidate out of range": (
        lambda q, t, o: ops.maxsim_packed(q, t, o, torch.tensor([[0, 2], [1, 0]])),
        "candidates",
    ),
    "candidate below -1": (
        lambda q, t, o: ops.maxsim_packed(q, t, o, torch.tensor([[0, -2], [1, 0]])),
        "candidates",
    ),
    "candidates wrong rows": (
        lambda q, t, o: ops.maxsim_packed(q, t, o, torch.tensor([[0, 1]])),
        "candidates",
    ),
    "queries int": (lambda q, t, o: ops.maxsim_packed(q.int(), t, o), "queries"),
    "queries 2-D": (lambda q, t, o: ops.maxsim_packed(q[0], t, o), "queries"),
    "tokens float64": (lambda q, t, o: ops.maxsim_packed(q, t.double(), o), "doc_tokens"),
    "tokens non-contiguous": (lambda q, t, o: ops.maxsim_packed(q, torch.randn(48, 10).T, o), "doc_tokens"),
    "queries non-contiguous": (lambda q, t, o: ops.maxsim_packed(q.transpose(0, 1), t, o), "queries"),
    "mask wrong shape": (
        lambda q, t, o: ops.maxsim_packed(q, t, o, queries_mask=torch.ones(2, 5, dtype=bool)),
        "queries_mask",
    ),
    "mask not bool": (
        lambda q, t, o: ops.maxsim_packed(q, t, o, queries_mask=torch.ones(2, 4)),
        "queries_mask",
    ),
    "not a tensor": (lambda q, t, o: ops.maxsim_packed(q.tolist(), t, o), "queries"),
    "padded wrong dim": (lambda q, t, o: ops.maxsim(q, torch.randn(3, 5, 64)), "documents"),
    "n_probe zero": (lambda q, t, o: ops.centroid_scores(q, t, 0), "n_probe"),
    "n_probe too large": (lambda q, t, o: ops.centroid_scores(q, t, 11), "n_probe"),
    "threshold string": (
        lambda q, t, o: ops.centroid_interaction(
            torch.randn(2, 4, 5), torch.zeros(10).long(), o, threshold="x"
        ),
        "threshold",
    ),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_bad_input_names_the_argument(any_backend, case, monkeypatch):
    fn, argument = CASES[case]
    monkeypatch.setenv("EDGEPLAID_BACKEND", any_backend)
    with pytest.raises(ValueError, match=argument):
        fn(*_packed())


def _codec(nbits=4, dim=48, n=10):
    codes = torch.randint(0, 5, (n,))
    residuals = torch.zeros(n, dim * nbits // 8, dtype=torch.uint8)
    return codes, residuals, torch.randn(5, dim), torch.zeros(1 << nbits)


@pytest.mark.parametrize("nbits", [0, 3, 16, 4.0, True])
def test_nbits_outside_the_set(any_backend, nbits):
    codes, residuals, centroids, weights = _codec()
    with pytest.raises(ValueError, match="nbits"):
        ops.decompress_residuals(codes, residuals, centroids, weights, nbits, backend=any_backend)


def test_code_out_of_range_is_reported_not_read(any_backend):
    codes, residuals, centroids, weights = _codec()
    codes[7] = 5
    with pytest.raises(ValueError, match="codes"):
        ops.decompress_residuals(codes, residuals, centroids, weights, 4, backend=any_backend)


def test_code_out_of_range_in_fused_and_interaction(any_backend):
    codes, residuals, centroids, weights = _codec()
    codes[9] = -3
    offsets = torch.tensor([0, 4, 10])
    with pytest.raises(ValueError, match="codes"):
        ops.fused_decompress_maxsim(
            torch.randn(1, 3, 48), codes, residuals, offsets, None, centroids, weights, 4, backend=any_backend
        )
    with pytest.raises(ValueError, match="codes"):
        ops.centroid_interaction(torch.randn(1, 3, 5), codes, offsets, backend=any_backend)


def test_residual_row_size(any_backend):
    codes, _, centroids, weights = _codec()
    with pytest.raises(ValueError, match="residuals"):
        ops.decompress_residuals(
            codes, torch.zeros(10, 23, dtype=torch.uint8), centroids, weights, 4, backend=any_backend
        )


def test_dim_times_nbits_not_bytes(any_backend):
    with pytest.raises(ValueError, match="nbits"):
        ops.decompress_residuals(
            torch.zeros(1).long(),
            torch.zeros(1, 1, dtype=torch.uint8),
            torch.randn(2, 4),
            torch.zeros(2),
            1,
            backend=any_backend,
        )


def test_numpy_inputs_are_accepted():
    q, t, o = _packed()
    got = ops.maxsim_packed(q.numpy(), t.numpy(), o.numpy())
    assert torch.equal(got, ops.maxsim_packed(q, t, o))
    assert isinstance(got, torch.Tensor)
    with pytest.raises(ValueError, match="doc_offsets"):
        ops.maxsim_packed(q.numpy(), t.numpy(), np.array([0, 3, 10], dtype=np.int32))


def test_binding_checks_structure_directly():
    """edgeplaid._C is importable on its own: its own checks stop bad arrays too."""
    C = pytest.importorskip("edgeplaid._C")
    q = np.zeros((1, 2, 48), np.float32)
    with pytest.raises(ValueError, match="doc_tokens"):
        C.maxsim_packed(q, None, np.zeros((4, 40), np.float32), "float32", np.array([0, 4]), None)
    with pytest.raises(ValueError, match="doc_offsets"):
        C.maxsim_packed(q, None, np.zeros((4, 48), np.float32), "float32", np.array([0, 9]), None)
    with pytest.raises(ValueError, match="candidates"):
        C.maxsim_packed(
            q, None, np.zeros((4, 48), np.float32), "float32", np.array([0, 4]), np.array([[3]], np.int64)
        )
    with pytest.raises(ValueError, match="doc_tokens"):
        C.maxsim_packed(q, None, np.zeros((4, 48), np.float64), "float32", np.array([0, 4]), None)
    with pytest.raises(ValueError, match="queries"):
        C.maxsim_packed(
            np.zeros((1, 48, 2), np.float32).transpose(0, 2, 1),
            None,
            np.zeros((4, 48), np.float32),
            "float32",
            np.array([0, 4]),
            None,
        )
