from __future__ import annotations

import warnings

import pytest
import torch

import edgeplaid
from edgeplaid import ops
from edgeplaid.ops import dispatch


def _args():
    return torch.randn(1, 3, 48), torch.randn(5, 48), torch.tensor([0, 2, 5])


def test_explicit_backend_that_is_missing_raises():
    with pytest.raises(ops.BackendUnavailableError, match="triton"):
        ops.maxsim_packed(*_args(), backend="triton")


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="backend"):
        ops.maxsim_packed(*_args(), backend="cuda")


def test_environment_variable_picks_the_backend(monkeypatch):
    calls = []
    monkeypatch.setitem(
        dispatch._registry["maxsim_packed"],
        "reference",
        lambda *a: calls.append("reference") or torch.zeros(1, 2),
    )
    monkeypatch.setenv("EDGEPLAID_BACKEND", "reference")
    ops.maxsim_packed(*_args())
    assert calls == ["reference"]


def test_automatic_choice_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setattr(dispatch, "C", None)
    monkeypatch.setattr(dispatch, "_warned", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        a = ops.maxsim_packed(*_args())
        ops.maxsim_packed(*_args())
    assert len([w for w in caught if "falls back" in str(w.message)]) == 1
    assert a.shape == (1, 2)
    with pytest.raises(ops.BackendUnavailableError, match="cpp"):
        ops.maxsim_packed(*_args(), backend="cpp")


def test_cpp_is_the_cpu_default_when_built():
    pytest.importorskip("edgeplaid._C")
    from edgeplaid.ops import cpp_backend

    assert dispatch.resolve("maxsim_packed", torch.device("cpu")) is cpp_backend.maxsim_packed


def test_available_backends_reports_build_and_device():
    info = edgeplaid.available_backends()
    assert "reference" in info["backends"]
    assert isinstance(info["cuda"], bool)
    if "cpp" in info["backends"]:
        assert "scalar" in info["cpp"]["compiled_isas"]
        assert info["cpp"]["active_isa"] in info["cpp"]["supported_isas"]
