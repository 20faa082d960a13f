"""One local Ray cluster (2 CPUs) per test module of tests/distributed."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def cluster():
    ray = pytest.importorskip("ray")
    from edgeplaid.distributed import connect

    if not ray.is_initialized():
        connect("local", num_cpus=2)
    yield
    ray.shutdown()
