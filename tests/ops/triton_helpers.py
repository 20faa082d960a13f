"""Shared by tests/ops/test_triton_*.py: where the Triton kernels run and the tolerance rules.

Without CUDA the kernels run on CPU tensors in Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 before triton is imported); the shapes are small because the interpreter
executes every program in Python. With CUDA the same tests run on the GPU.
"""

from __future__ import annotations

import pytest
import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SKIP_REASON = "triton is not installed (pip install -e '.[gpu]')"


def on_device(*tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    return [None if t is None else t.to(DEVICE) for t in tensors]


def assert_within_twice_torch(got: torch.Tensor, exact: torch.Tensor, torch_lp: torch.Tensor) -> None:
    """Low precision: same finite pattern as the fp32 reference, error <= 2x torch's own
    half-precision error (both against the fp32 reference)."""
    got = got.cpu()
    finite = torch.isfinite(exact)
    assert torch.equal(finite, torch.isfinite(got))
    assert torch.equal(exact[~finite], got[~finite])
    if finite.any():
        torch_err = (torch_lp[finite] - exact[finite]).abs().max()
        our_err = (got[finite] - exact[finite]).abs().max()
        assert our_err <= 2 * torch_err + 1e-6, (float(our_err), float(torch_err))


def torch_lowp_maxsim_packed(q_lp, t_lp, offsets, candidates, mask) -> torch.Tensor:
    """maxsim_packed computed by torch in the half dtype itself (fp32 out)."""
    nq = q_lp.shape[0]
    out = torch.full(candidates.shape, float("-inf"))
    for qi in range(nq):
        for ci, doc in enumerate(candidates[qi].tolist()):
            if doc < 0:
                continue
            sim = (q_lp[qi][mask[qi]] @ t_lp[offsets[doc] : offsets[doc + 1]].T).float()
            out[qi, ci] = sim.amax(-1).sum() if sim.shape[1] else (0.0 if not mask[qi].any() else -torch.inf)
    return out


gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
