"""GPU side of the benchmarks: device peaks, CUDA timing, and rows for the shared CSVs.

Timing is triton.testing.do_bench (CUDA events, L2 flushed between runs, median). Every
figure is reported against the device's physical peak: HBM bandwidth (the MaxSim kernels
are bandwidth-bound at 32 query tokens) and dense fp16/bf16 tensor-core FLOP/s.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from _harness import Report

# name fragment -> (HBM GB/s, dense fp16/bf16 TFLOP/s); first match wins.
PEAKS = [
    ("H100 PCIe", 2000.0, 756.0),
    ("H100 NVL", 3900.0, 835.0),
    ("H100", 3350.0, 989.0),  # SXM
    ("H200", 4800.0, 989.0),
    ("GH200", 4000.0, 989.0),
    ("A100-SXM4-80GB", 2039.0, 312.0),
    ("A100", 1555.0, 312.0),
    ("L40S", 864.0, 362.0),
    ("A10", 600.0, 125.0),
]

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def device_name() -> str:
    return torch.cuda.get_device_name(0)


def peaks() -> tuple[float, float, str]:
    """(HBM GB/s, dense half TFLOP/s, source) of this GPU: the datasheet figure where the name
    is known, else the measured device-to-device copy bandwidth (and no FLOP peak)."""
    name = device_name()
    for key, gbps, tflops in PEAKS:
        if key in name:
            return gbps, tflops, f"datasheet {key}"
    return copy_bandwidth(), 0.0, "measured copy"


def copy_bandwidth(n_bytes: int = 1 << 30) -> float:
    """Achievable HBM GB/s: a device-to-device copy (reads and writes n_bytes)."""
    src = torch.empty(n_bytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src))
    return 2 * n_bytes / ms / 1e6


def bench_ms(fn: Callable[[], object]) -> float:
    """Median ms of fn on the GPU (warm-up and autotuning happen in the first calls)."""
    import triton.testing

    fn()
    torch.cuda.synchronize()
    return float(triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median"))


class GpuReport(Report):
    """A Report whose rows carry the GPU name and the share of its HBM bandwidth."""

    def __init__(self, op: str, case: str, flops: float, bytes_moved: float) -> None:
        self.hbm_gbps, tflops, self.peak_source = peaks()
        super().__init__(op, case, flops=flops, bytes_moved=bytes_moved, peak_gflops=tflops * 1e3)

    def add_ms(self, contender: str, ms: float, note: str = "") -> dict:
        row = self.add(contender, ms / 1e3, note)
        row["device"] = device_name()
        row["isa"] = "cuda"
        row["threads"] = ""
        if self.bytes_moved:
            pct = 100 * self.bytes_moved / (ms / 1e3) / 1e9 / self.hbm_gbps
            hbm = f"{pct:.1f}% of HBM {self.hbm_gbps:.0f} GB/s ({self.peak_source})"
            row["note"] = f"{hbm}; {note}" if note else hbm
        return row

    def ratio(self, ours: str, peer: str) -> float | None:
        """How many times faster the row `ours` is than the row `peer` (None if absent)."""
        a = next((r for r in self.rows if r["contender"] == ours), None)
        b = next((r for r in self.rows if r["contender"].startswith(peer)), None)
        return None if a is None or b is None else b["median_ms"] / a["median_ms"]
