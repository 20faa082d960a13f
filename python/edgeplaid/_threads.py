"""Threads used by edgeplaid's CPU kernels (one pool per process, sleeping when idle)."""

from __future__ import annotations

import os

from edgeplaid._native import C


def set_num_threads(n: int) -> None:
    """Use ``n`` threads in the CPU kernels (``n <= 0``: one per CPU the process may use)."""
    if not isinstance(n, int):
        raise ValueError(f"n: expected an int, got {type(n).__name__}")
    if C is not None:
        C.set_num_threads(n)


def get_num_threads() -> int:
    """Threads the CPU kernels use."""
    if C is None:
        return len(os.sched_getaffinity(0))
    return int(C.get_num_threads())
