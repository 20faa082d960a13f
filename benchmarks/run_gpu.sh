#!/usr/bin/env bash
# One command for a session with a GPU, from the repo root of a bare machine holding only the
# working tree: installs nothing from the network when the machine has a CUDA torch (the project's
# GPU machine has torch, triton, pybind11, pytest, pytest-benchmark and pytest-xdist, and no
# network), runs the gpu-marked tests and the Triton tests on the GPU, the GPU end-to-end search
# benchmark and the GPU op benchmarks, appends to benchmarks/results/*.csv, plots, and copies
# a tarball of the results, the log and the plot to "$OUT" when that variable is set.
#
#   bash benchmarks/run_gpu.sh [all|tests|bench]   # default all: about 7 minutes on an H200
#   EDGEPLAID_BENCH_QUICK=1 bash benchmarks/run_gpu.sh bench   # smoke run, nothing recorded
#
# Each step has its own time limit (EDGEPLAID_GPU_{TESTS,SEARCH,OPS}_S) so that the whole run fits
# one 8-minute command: a step that runs out is reported and the next one still runs.
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
TESTS_S=${EDGEPLAID_GPU_TESTS_S:-150}
SEARCH_S=${EDGEPLAID_GPU_SEARCH_S:-120}
OPS_S=${EDGEPLAID_GPU_OPS_S:-150}
# Compiling a Triton kernel variant is CPU work: spread the tests over the host's cores.
XDIST=()
"$PY" -c "import xdist" 2>/dev/null && XDIST=(-n "$(( $(nproc) > 8 ? 8 : $(nproc) ))")
if [ "$STEP" = all ] || [ "$STEP" = tests ]; then
    echo "== gpu-marked tests + the Triton tests on the GPU (the files the CPU interpreter runs) [${TESTS_S} s]"
    EDGEPLAID_TRITON_AUTOTUNE=0 timeout "$TESTS_S" "$PY" -m pytest tests/ops tests/search/test_pipeline.py \
        -m "gpu or not (slow or benchmark)" -k "triton or gpu or device" "${XDIST[@]}" \
        -q -p no:cacheprovider --tb=short --maxfail=25 -ra || { echo "== tests: status $?"; status=1; }
fi
BENCH_OPTS=()
"$PY" -c "import pytest_benchmark" 2>/dev/null && BENCH_OPTS=(--benchmark-disable)
if [ "$STEP" = all ] || [ "$STEP" = bench ]; then
    echo "== GPU end-to-end search benchmark [${SEARCH_S} s]"
    timeout "$SEARCH_S" "$PY" -m pytest benchmarks/bench_search_gpu.py -m benchmark -s -q -p no:cacheprovider \
        "${BENCH_OPTS[@]}" || { echo "== search benchmark: status $?"; status=1; }
    echo "== GPU op benchmarks [${OPS_S} s]"
    timeout "$OPS_S" "$PY" -m pytest benchmarks -m benchmark -k "gpu and not search" -s -q -p no:cacheprovider \
        "${BENCH_OPTS[@]}" || { echo "== op benchmarks: status $?"; status=1; }
    "$PY" benchmarks/plot_gpu.py benchmarks/results/gpu.png || true
fi

if [ -n "${OUT:-}" ]; then
    # One tarball: the device tool brings back at most 8 files.
    tar czf "$OUT/results.tgz" benchmarks/results/*.csv 2>/dev/null
    cp benchmarks/results/gpu_run.log "$OUT/" 2>/dev/null
    cp benchmarks/results/gpu.png "$OUT/" 2>/dev/null || true
    echo "== copied results.tgz, gpu_run.log and gpu.png to $OUT"
fi
echo "== done (status $status)"
exit $status
