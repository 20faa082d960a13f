"""The compiled extension `edgeplaid._C`, or None when the package was installed without it."""

from __future__ import annotations

import os
from types import ModuleType

C: ModuleType | None
IMPORT_ERROR: str | None
try:
    from edgeplaid import _C as C

    IMPORT_ERROR = None
except ImportError as exc:  # built without a compiler, or a broken build
    C = None
    IMPORT_ERROR = str(exc)

SPIN_US_MAX = 100_000


def _check_spin_env() -> None:
    """EDGEPLAID_SPIN_US (how long an idle kernel thread polls before sleeping, read by the C++
    pool at its first parallel call) must be an integer in [0, 100000] microseconds."""
    raw = os.environ.get("EDGEPLAID_SPIN_US", "")
    if raw == "":
        return
    if not (raw.isdigit() and 0 <= int(raw) <= SPIN_US_MAX):
        raise ValueError(
            f"EDGEPLAID_SPIN_US: expected an integer in [0, {SPIN_US_MAX}] (microseconds), got {raw!r}"
        )


_check_spin_env()


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16, which every CPU with AMX has too),
    where oneDNN's bf16 matrix products run at twice the fp32 rate or more (with AMX: 2.1-2.9 against
    0.3 TFLOP/s on two Xeon cores); elsewhere torch widens bf16 to fp32 and it is slower. Read
    through the extension's cpuid (no torch import: ``import edgeplaid`` asks before torch loads);
    False without the extension."""
    return C is not None and bool(C.cpu_info()["features"].get("avx512_bf16", False))
