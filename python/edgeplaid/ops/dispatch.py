"""The one place that picks a backend for an op.

Backends: ``triton`` (CUDA tensors), ``cpp`` (CPU tensors, the compiled ``edgeplaid._C``),
``reference`` (pure PyTorch, any device). A per-call ``backend=`` or the environment variable
``EDGEPLAID_BACKEND`` asks for one explicitly: if it is missing or cannot take the tensors'
device, that raises. Otherwise the device decides (CUDA -> triton, CPU -> cpp), falling back
to the reference with one warning per op and backend.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from typing import Any

import torch

from edgeplaid._native import IMPORT_ERROR, C

BACKENDS = ("triton", "cpp", "reference")
_registry: dict[str, dict[str, Callable[..., Any]]] = {}
_warned: set[tuple[str, str]] = set()


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend is not built, not importable or lacks the op."""


def register(op: str, backend: str, fn: Callable[..., Any]) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    _registry.setdefault(op, {})[backend] = fn


def _triton_status() -> tuple[bool, str]:
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return False, f"triton does not import ({exc})"
    return True, "ok"


def _why_unavailable(backend: str) -> str | None:
    if backend == "cpp" and C is None:
        return f"edgeplaid._C is not built ({IMPORT_ERROR})"
    if backend == "triton":
        ok, why = _triton_status()
        if not ok:
            return why
    return None


def _device_ok(backend: str, device: torch.device) -> bool:
    if backend == "cpp":
        return device.type == "cpu"
    if backend == "triton":
        return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
    return True


def implements(op: str, device: torch.device, backend: str | None = None, *, like: str) -> bool:
    """Whether the backend that :func:`resolve` picks for op ``like`` (same device, same request)
    also implements ``op``: how an op with an optional fast variant asks for it by capability."""
    requested = backend or os.environ.get("EDGEPLAID_BACKEND") or None
    if requested is None:
        requested = "triton" if device.type == "cuda" else "cpp"
        if requested not in _registry[like] or _why_unavailable(requested) is not None:
            requested = "reference"
    return requested in _registry.get(op, {})


def resolve(op: str, device: torch.device, backend: str | None = None) -> Callable[..., Any]:
    """The implementation of ``op`` for tensors on ``device``."""
    impls = _registry[op]
    requested = backend or os.environ.get("EDGEPLAID_BACKEND") or None
    if requested is not None:
        if requested not in BACKENDS:
            raise ValueError(f"backend: expected one of {', '.join(BACKENDS)}, got {requested!r}")
        why = _why_unavailable(requested)
        if why is None and requested not in impls:
            why = f"no {requested} implementation of {op} yet"
        if why is not None:
            raise BackendUnavailableError(f"backend {requested!r} was requested for {op} but {why}")
        if not _device_ok(requested, device):
            raise ValueError(f"backend: {requested!r} cannot run on {device} tensors")
        return impls[requested]
    preferred = "triton" if device.type == "cuda" else "cpp"
    if preferred in impls and _why_unavailable(preferred) is None:
        return impls[preferred]
    key = (op, preferred)
    if key not in _warned:
        _warned.add(key)
        why = _why_unavailable(preferred) or f"no {preferred} implementation of {op} yet"
        warnings.warn(f"edgeplaid: {op} falls back to the reference backend: {why}", stacklevel=3)
    return impls["reference"]


def available_backends() -> dict[str, Any]:
    """What was built and detected: backends, CPU ISAs, Triton, devices."""
    info: dict[str, Any] = {"backends": ["reference"], "cpp": None, "triton": None}
    if C is not None:
        info["backends"].insert(0, "cpp")
        cpu = dict(C.cpu_info())
        cpu["active_isa"] = C.cpu_isa()
        cpu["threads"] = C.get_num_threads()
        info["cpp"] = cpu
    else:
        info["cpp"] = {"error": IMPORT_ERROR}
    ok, why = _triton_status()
    if ok:
        info["backends"].insert(0, "triton")
    info["triton"] = {"importable": ok, "detail": why}
    info["cuda"] = torch.cuda.is_available()
    info["cuda_device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return info
