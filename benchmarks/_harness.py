"""Timing, peak and CSV helpers shared by the benchmarks.

Every figure is measured in the run that reports it: the machine's fp32 peak (the FMA
probe of edgeplaid._C), our op, and the baselines, so ratios compare like with like on this
shared machine. Results append to benchmarks/results/<op>.csv.
"""

from __future__ import annotations

import csv
import datetime as dt
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from edgeplaid._native import C

RESULTS = Path(__file__).parent / "results"
COLUMNS = [
    "date",
    "commit",
    "op",
    "case",
    "contender",
    "isa",
    "threads",
    "cpu",
    "device",
    "median_ms",
    "gflops",
    "pct_of_peak",
    "gbps",
    "speedup_vs_torch",
    "peak_gflops",
    "note",
]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            check=True,
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def median_seconds(
    fn: Callable[[], object], min_rounds: int = 5, min_seconds: float = 1.0, max_rounds: int = 200
) -> float:
    """Median wall time of fn() after one warm-up call, over at least min_rounds calls."""
    fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_rounds and (len(times) < min_rounds or time.perf_counter() - start < min_seconds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@dataclass
class Report:
    """Rows of one benchmark case: ours and the baselines, printed as a table and saved."""

    op: str
    case: str
    flops: float = 0.0  # useful FLOPs of the op (2 per multiply-add)
    bytes_moved: float = 0.0  # bytes the op must read or write at least
    peak_gflops: float = 0.0
    rows: list[dict] = field(default_factory=list)

    def add(
        self,
        contender: str,
        seconds: float,
        note: str = "",
        peak: float | None = None,
        isa: str | None = None,
    ) -> dict:
        """One contender's median time; ``peak`` overrides the case's peak for this row (an int8
        kernel is held to the int8 peak), ``isa`` the ISA label (e.g. avx512vnni)."""
        peak = self.peak_gflops if peak is None else peak
        gflops = self.flops / seconds / 1e9 if self.flops else 0.0
        row = {
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "commit": commit(),
            "op": self.op,
            "case": self.case,
            "contender": contender,
            "isa": isa or (C.cpu_isa() if C is not None and contender.startswith("edgeplaid") else ""),
            "threads": C.get_num_threads() if C is not None else torch.get_num_threads(),
            "cpu": cpu_model(),
            "device": "cpu",
            "median_ms": round(seconds * 1e3, 4),
            "gflops": round(gflops, 2),
            "pct_of_peak": round(100 * gflops / peak, 1) if peak and gflops else "",
            "gbps": round(self.bytes_moved / seconds / 1e9, 2) if self.bytes_moved else "",
            "speedup_vs_torch": "",
            "peak_gflops": round(peak, 1),
            "note": note,
        }
        self.rows.append(row)
        return row

    def finish(self, baseline: str = "torch") -> list[dict]:
        """Fills the speed-up against the torch baseline, prints the table, appends the CSV."""
        base = next((r for r in self.rows if r["contender"].startswith(baseline)), None)
        for r in self.rows:
            if base is not None:
                r["speedup_vs_torch"] = round(base["median_ms"] / r["median_ms"], 2)
        print(f"\n{self.op} — {self.case} (peak {self.peak_gflops:.0f} GFLOP/s measured now)")
        for r in self.rows:
            pct = f"{r['pct_of_peak']}%" if r["pct_of_peak"] != "" else "-"
            print(
                f"  {r['contender']:<44} {r['median_ms']:>10.3f} ms {r['gflops']:>8.1f} GFLOP/s {pct:>7} "
                f"x{r['speedup_vs_torch']} vs torch {r['note']}"
            )
        if quick():
            return self.rows  # smoke runs are not measurements
        RESULTS.mkdir(exist_ok=True)
        path = RESULTS / f"{self.op}.csv"
        new = not path.exists()
        with path.open("a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS)
            if new:
                writer.writeheader()
            writer.writerows(self.rows)
        return self.rows


def ours_label() -> str:
    return f"edgeplaid cpp ({C.cpu_isa()})" if C is not None else "edgeplaid (no C++)"


def quick() -> bool:
    """EDGEPLAID_BENCH_QUICK=1 shrinks shapes (a smoke run, not a measurement)."""
    return os.environ.get("EDGEPLAID_BENCH_QUICK", "") not in ("", "0")


def time_ours(benchmark, fn: Callable[[], object], rounds: int = 20) -> float:
    """Times fn with pytest-benchmark (so its tables and --benchmark-json work) and returns the
    median; falls back to median_seconds under --benchmark-disable."""
    benchmark.pedantic(fn, rounds=rounds, warmup_rounds=1, iterations=1)
    stats = getattr(benchmark, "stats", None)
    if stats is None:
        return median_seconds(fn, min_rounds=rounds)
    return float(stats.stats.median)


def append_cases(path: Path, rows: list[dict]) -> None:
    """Appends ``{case, value, unit, baseline}`` rows to the CSV ``path`` (date, commit and CPU
    added; a header when the file is new): the end-to-end benchmarks' record."""
    new = not path.exists()
    with open(path, "a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(["date", "commit", "cpu", "case", "value", "unit", "baseline"])
        for r in rows:
            w.writerow(
                [
                    dt.date.today().isoformat(),
                    commit(),
                    cpu_model(),
                    r["case"],
                    f"{r['value']:.4g}",
                    r["unit"],
                    r["baseline"],
                ]
            )
