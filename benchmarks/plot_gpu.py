"""Plot the GPU rows of benchmarks/results/*.csv: % of HBM per contender and case.

Usage: python benchmarks/plot_gpu.py [out.png]. Skips (exit 0) without matplotlib.
"""

from __future__ import annotations

import csv
import re
import sys
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def main() -> int:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return 0
    rows = []
    for path in sorted(RESULTS.glob("*.csv")):
        with path.open() as f:
            rows += [r for r in csv.DictReader(f) if r.get("isa") == "cuda"]
    if not rows:
        print("no GPU rows in benchmarks/results/*.csv")
        return 0
    latest: dict[tuple[str, str], dict] = {}
    for r in rows:  # the newest row per (case, contender)
        latest[(r["case"], r["contender"])] = r
    cases = sorted({c for c, _ in latest})
    fig, axes = plt.subplots(len(cases), 1, figsize=(10, 2.2 * len(cases) + 1), squeeze=False)
    for ax, case in zip(axes[:, 0], cases, strict=True):
        items = [(k[1], v) for k, v in latest.items() if k[0] == case]
        names = [n for n, _ in items]
        pct = []
        for _, v in items:
            m = re.match(r"([\d.]+)% of HBM", v.get("note", ""))
            pct.append(float(m.group(1)) if m else 0.0)
        ax.barh(names, pct, color=["tab:red" if n.startswith("edgeplaid") else "tab:gray" for n in names])
        for i, (_, v) in enumerate(items):
            ax.text(pct[i], i, f" {float(v['median_ms']):.3f} ms", va="center", fontsize=7)
        ax.set_title(f"{items[0][1]['op']}: {case} [{items[0][1]['device']}]", fontsize=8)
        ax.set_xlabel("% of HBM bandwidth", fontsize=7)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else RESULTS / "gpu.png"
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
