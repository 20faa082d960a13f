"""Connecting to Ray: the running cluster when there is one, else a local one for this process."""

from __future__ import annotations

import logging
import os


def _ray():
    try:
        import ray
    except ImportError:
        raise ImportError(
            "edgeplaid.distributed needs Ray: pip install -e '.[distributed]' (or pip install ray)"
        ) from None
    return ray


def connect(ray_address: str | None = None, num_cpus: int | None = None) -> None:
    """Connects this process to Ray unless it already is.

    Args:
        ray_address: None: the cluster named by ``RAY_ADDRESS`` or already running on this machine
            if any, else a new local one; ``"auto"``: the running cluster (ConnectionError if
            none); ``"local"``: a new local cluster for this process; anything else: that
            cluster's address (``"ray://host:10001"``, ``"host:6379"``).
        num_cpus: CPUs of a new local cluster (default: every CPU).
    """
    if ray_address is not None and (not isinstance(ray_address, str) or not ray_address):
        raise ValueError(f"ray_address: expected None, 'auto', 'local' or an address, got {ray_address!r}")
    ray = _ray()
    if ray.is_initialized():
        return
    quiet = {"logging_level": logging.WARNING, "include_dashboard": False}
    if ray_address == "local":
        ray.init(address="local", num_cpus=num_cpus, **quiet)
        return
    if ray_address is None:
        try:
            ray.init(address="auto", **quiet)
            return
        except ConnectionError:
            if os.environ.get("RAY_ADDRESS"):
                raise
        ray.init(address="local", num_cpus=num_cpus, **quiet)
        return
    ray.init(address=ray_address, **quiet)
