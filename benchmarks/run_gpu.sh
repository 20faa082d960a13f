#!/usr/bin/env bash
# One command for a session with a GPU, from the repo root of a bare machine holding only the
# working tree: installs (keeping the machine's CUDA torch when it has one), runs the
# gpu-marked tests and the GPU benchmarks, appends to benchmarks/results/*.csv, plots, and
# copies everything to "$OUT" when that variable is set.
#
#   bash benchmarks/run_gpu.sh [all|tests|bench]   # default all; full shapes (>= 10M tokens)
#   EDGEPLAID_BENCH_QUICK=1 bash benchmarks/run_gpu.sh bench   # smoke run, nothing recorded
#
# "tests" and "bench" fit separately in a 10-minute command limit (tests: one compile per
# kernel variant, EDGEPLAID_TRITON_AUTOTUNE=0; bench: autotuned, 10M-token corpora).
set -uo pipefail
STEP=${1:-all}
cd "$(dirname "$0")/.."
LOG=benchmarks/results/gpu_run.log
mkdir -p benchmarks/results
exec > >(tee -a "$LOG") 2>&1
echo "== edgeplaid GPU run $(date -u +%FT%TZ)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true

PY=${PYTHON:-python3}
# GPU machines may have no network: every install below is best effort, and what is already
# there (a CUDA torch, triton, pytest) is used as it is.
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "== no CUDA torch here: installing torch + triton from PyPI (its Linux wheels are CUDA builds)"
    "$PY" -m pip install -q --force-reinstall torch triton || { echo "cannot install a CUDA torch"; exit 1; }
fi
"$PY" -c "import triton" 2>/dev/null || "$PY" -m pip install -q triton || { echo "no triton"; exit 1; }
for mod in pytest pytest_benchmark pybind11 numpy; do
    "$PY" -c "import $mod" 2>/dev/null || "$PY" -m pip install -q "${mod/_/-}" || true
done
# Build edgeplaid against the torch that is there (no build isolation: nothing pulls another
# torch). Without a compiler or pybind11 it still runs: the Triton path needs no C++.
if ! "$PY" -m pip install -q --no-build-isolation --no-deps -e . ; then
    echo "== pip install -e . failed: running from a staged copy on PYTHONPATH (no C++ extension)"
    STAGE=$(mktemp -d)
    cp -r python/edgeplaid "$STAGE/edgeplaid"
    rm -rf "$STAGE/edgeplaid/triton_kernels"
    cp -r triton_kernels "$STAGE/edgeplaid/triton_kernels"
    export PYTHONPATH="$STAGE${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PY" -c "import edgeplaid, json; print(json.dumps(edgeplaid.available_backends(), indent=1, default=str))"

status=0
if [ "$STEP" = all ] || [ "$STEP" = tests ]; then
    echo "== gpu-marked tests + the Triton op tests on the GPU (the files the CPU interpreter runs)"
    EDGEPLAID_TRITON_AUTOTUNE=0 "$PY" -m pytest tests/ops -m "gpu or not (slow or benchmark)" -k "triton" \
        -q -p no:cacheprovider --tb=short --maxfail=25 -ra || status=1
fi
if [ "$STEP" = all ] || [ "$STEP" = bench ]; then
    echo "== GPU benchmarks"
    BENCH_OPTS=()
    "$PY" -c "import pytest_benchmark" 2>/dev/null && BENCH_OPTS=(--benchmark-disable)
    "$PY" -m pytest benchmarks -m benchmark -k gpu -s -q -p no:cacheprovider "${BENCH_OPTS[@]}" || status=1
    "$PY" benchmarks/plot_gpu.py benchmarks/results/gpu.png || true
fi

if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT/results"
    cp benchmarks/results/*.csv benchmarks/results/gpu_run.log "$OUT/results/" 2>/dev/null
    cp benchmarks/results/gpu.png "$OUT/results/" 2>/dev/null || true
    echo "== copied results to $OUT/results"
fi
echo "== done (status $status)"
exit $status
