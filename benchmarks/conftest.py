"""Benchmarks: run with `python -m pytest benchmarks -m benchmark -s` (see README)."""

from __future__ import annotations

import os
import sys

# Before torch loads: idle OpenMP threads of torch's matmuls otherwise spin for a while after
# each baseline call and steal the cores from the next contender (measured: centroid_scores
# 2.5 ms after torch's matmul vs 1.5 ms alone). One sleeping pool per process is the setting
# we recommend to users too (README). Not when only bench_encode.py runs: it measures the encoder
# as users get it, under the policy `import edgeplaid` picks (PASSIVE where the encoder's default
# precision is int8, a short spin where it is bf16: python/edgeplaid/__init__.py).
_targets = [a for a in sys.argv[1:] if "bench" in a and not a.startswith("-") and a != "benchmark"]
if not (_targets and all("bench_encode" in a for a in _targets)):
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402 (after the OpenMP policy)

from edgeplaid._native import C  # noqa: E402


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        item.add_marker(pytest.mark.benchmark)


_peaks: dict[str, float] = {}


@pytest.fixture(params=["avx2", "avx512"])
def isa(request: pytest.FixtureRequest):
    """Each benchmark runs on every SIMD ISA this CPU has; the int8 kernels (whose ISA is chosen
    apart) on the same vector width: AVX2, or AVX-512 with VNNI where the CPU has it."""
    if C is None or request.param not in C.cpu_info()["supported_isas"]:
        pytest.skip(f"no {request.param} here")
    previous, previous_int8 = C.cpu_isa_state(), C.cpu_int8_isa()
    C.set_cpu_isa(request.param)
    vnni = request.param == "avx512" and C.cpu_info()["vnni_available"]
    C.set_cpu_int8_isa("avx512vnni" if vnni else request.param)
    yield request.param
    C.set_cpu_isa(previous)
    C.set_cpu_int8_isa(previous_int8)


@pytest.fixture
def peak_gflops(isa: str) -> float:
    """The fp32 FMA peak of the ISA under test on the kernels' threads, measured once per
    session and ISA: an AVX2 kernel on an AVX-512 CPU is held to the AVX2 peak, as it would be
    on the AVX2-only machines where it is the fast path."""
    if isa not in _peaks:
        _peaks[isa] = float(C.peak_gflops(0.5))
    return _peaks[isa]


_int8_peaks: dict[str, float] = {}


@pytest.fixture
def peak_int8_gops(isa: str) -> float:
    """The int8 multiply-add peak (G int ops/s) of the int8 kernels the ISA under test runs
    (VNNI on AVX-512 where present), measured once per session and kernel set."""
    key = C.cpu_info()["int8_isa"]
    if key not in _int8_peaks:
        _int8_peaks[key] = float(C.peak_int8_gops(0.5))
    return _int8_peaks[key]


@pytest.fixture(scope="session")
def machine_peak_gflops() -> float:
    """The fp32 FMA peak of the best ISA this CPU has: the bar for work that does not run on
    edgeplaid's kernels (torch's GEMMs in the encoder), measured once, not per ISA."""
    previous = C.cpu_isa_state()
    C.set_cpu_isa(C.cpu_info()["best_isa"])
    try:
        return float(C.peak_gflops(0.5))
    finally:
        C.set_cpu_isa(previous)
