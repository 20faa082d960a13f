"""The compiled extension `edgeplaid._C`, or None when the package was installed without it."""

from __future__ import annotations

from types import ModuleType

C: ModuleType | None
IMPORT_ERROR: str | None
try:
    from edgeplaid import _C as C

    IMPORT_ERROR = None
except ImportError as exc:  # built without a compiler, or a broken build
    C = None
    IMPORT_ERROR = str(exc)
