from __future__ import annotations

import importlib
import subprocess
import sys
import warnings

import pytest
import torch

import edgeplaid
from edgeplaid import ops
from edgeplaid.ops import dispatch


def _args():
    return torch.randn(1, 3, 48), torch.randn(5, 48), torch.tensor([0, 2, 5])


def test_explicit_backend_that_is_missing_raises(monkeypatch):
    monkeypatch.setattr(dispatch, "_triton_status", lambda: (False, "triton does not import (test)"))
    with pytest.raises(ops.BackendUnavailableError, match="triton"):
        ops.maxsim_packed(*_args(), backend="triton")
    monkeypatch.undo()
    monkeypatch.setitem(
        dispatch._registry, "maxsim_packed", {"reference": dispatch._registry["maxsim_packed"]["reference"]}
    )
    with pytest.raises(ops.BackendUnavailableError, match="no triton implementation"):
        ops.maxsim_packed(*_args(), backend="triton")


def test_import_without_triton():
    """CPU-only installs (no `gpu` extra): edgeplaid imports and runs, triton is reported absent."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, edgeplaid\n"
        "from edgeplaid import ops\n"
        "info = edgeplaid.available_backends()\n"
        "assert 'triton' not in info['backends'] and not info['triton']['importable'], info\n"
        "args = (torch.randn(1, 3, 48), torch.randn(5, 48), torch.tensor([0, 2, 5]))\n"
        "ops.maxsim_packed(*args)\n"
        "try:\n"
        "    ops.maxsim_packed(*args, backend='triton')\n"
        "except ops.BackendUnavailableError:\n"
        "    pass\n"
        "else:\n"
        "    raise AssertionError('triton backend ran without triton')\n"
        "assert 'edgeplaid.triton_kernels' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


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
    op_module = importlib.import_module("edgeplaid.ops.maxsim_packed")

    assert dispatch.resolve("maxsim_packed", torch.device("cpu")) is op_module._cpp


def test_available_backends_reports_build_and_device():
    info = edgeplaid.available_backends()
    assert "reference" in info["backends"]
    assert isinstance(info["cuda"], bool)
    if "cpp" in info["backends"]:
        assert "scalar" in info["cpp"]["compiled_isas"]
        assert info["cpp"]["active_isa"] in info["cpp"]["supported_isas"]


def test_set_cpu_isa_auto_undoes_a_forced_isa():
    """A test or tool that forces an ISA restores the previous state with cpu_isa_state(): the
    forced name, or "auto" (the CPU's own choice, so that per-op rules such as the float32
    attention's AVX-512 apply again)."""
    from edgeplaid._native import C

    if C is None:
        pytest.skip("edgeplaid._C is not built")
    previous = C.cpu_isa_state()
    try:
        C.set_cpu_isa("scalar")
        assert C.cpu_isa_state() == "scalar" and C.cpu_info()["op_isa"]["attention"] == "scalar"
        C.set_cpu_isa("auto")
        assert C.cpu_isa_state() == "auto" and C.cpu_isa() == C.cpu_info()["best_isa"]
        want = "avx512" if "avx512" in C.cpu_info()["supported_isas"] else C.cpu_isa()
        assert C.cpu_info()["op_isa"]["attention"] == want
    finally:
        C.set_cpu_isa(previous)
