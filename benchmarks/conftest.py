"""Benchmarks: run with `python -m pytest benchmarks -m benchmark -s` (see README)."""

from __future__ import annotations

import os

# Before torch loads: idle OpenMP threads of torch's matmuls otherwise spin for a while after
# each baseline call and steal the cores from the next contender (measured: centroid_scores
# 2.5 ms after torch's matmul vs 1.5 ms alone). One sleeping pool per process is the setting
# we recommend to users too (README).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest

from edgeplaid._native import C


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        item.add_marker(pytest.mark.benchmark)


@pytest.fixture(scope="session")
def peak_gflops() -> float:
    """This machine's fp32 FMA peak on the kernels' threads, measured once per session."""
    if C is None:
        pytest.skip("edgeplaid._C is not built: nothing to compare with the peak")
    return float(C.peak_gflops(0.5))


@pytest.fixture(params=["avx2", "avx512"])
def isa(request: pytest.FixtureRequest):
    """Each benchmark runs on every SIMD ISA this CPU has."""
    if C is None or request.param not in C.cpu_info()["supported_isas"]:
        pytest.skip(f"no {request.param} here")
    previous = C.cpu_isa()
    C.set_cpu_isa(request.param)
    yield request.param
    C.set_cpu_isa(previous)
