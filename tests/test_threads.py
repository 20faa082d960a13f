from __future__ import annotations

import subprocess
import sys
import threading

import pytest
import torch

import edgeplaid
from edgeplaid import ops

C = pytest.importorskip("edgeplaid._C")


def _work():
    g = torch.Generator().manual_seed(0)
    offsets = torch.arange(0, 64 * 200 + 1, 200)
    return torch.randn(4, 32, 48, generator=g), torch.randn(int(offsets[-1]), 48, generator=g).half(), offsets


def test_thread_count_does_not_change_results():
    q, t, o = _work()
    before = edgeplaid.get_num_threads()
    try:
        edgeplaid.set_num_threads(1)
        assert edgeplaid.get_num_threads() == 1
        one = ops.maxsim_packed(q, t, o)
        edgeplaid.set_num_threads(3)
        assert torch.equal(ops.maxsim_packed(q, t, o), one)
    finally:
        edgeplaid.set_num_threads(before)


def test_concurrent_python_threads():
    """The GIL is released; calls from several Python threads run and agree."""
    q, t, o = _work()
    want = ops.maxsim_packed(q, t, o)
    results, errors = [], []

    def run():
        try:
            for _ in range(5):
                results.append(ops.maxsim_packed(q, t, o))
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    assert len(results) == 20 and all(torch.equal(r, want) for r in results)


def test_peak_probe_measures_something():
    assert C.peak_gflops(0.05) > 0.1


def test_set_num_threads_rejects_non_int():
    with pytest.raises(ValueError, match="n"):
        edgeplaid.set_num_threads(1.5)


_SPIN_SCRIPT = """
import torch, edgeplaid
from edgeplaid import ops
edgeplaid.set_num_threads(2)
g = torch.Generator().manual_seed(0)
offsets = torch.arange(0, 64 * 200 + 1, 200)
q, t = torch.randn(4, 32, 48, generator=g), torch.randn(int(offsets[-1]), 48, generator=g)
print(ops.maxsim_packed(q, t, offsets).sum().item())
"""


def _spin_run(value: str) -> subprocess.CompletedProcess:
    env = {**__import__("os").environ, "EDGEPLAID_SPIN_US": value}
    return subprocess.run([sys.executable, "-c", _SPIN_SCRIPT], env=env, capture_output=True, text=True)


def test_spin_setting_does_not_change_results():
    """Workers that sleep at once (0) and workers that poll agree with each other."""
    sleeping, polling = _spin_run("0"), _spin_run("5000")
    assert sleeping.returncode == 0 and polling.returncode == 0, sleeping.stderr + polling.stderr
    assert sleeping.stdout == polling.stdout


@pytest.mark.parametrize("bad", ["-1", "1.5", "fast", "100001"])
def test_spin_setting_rejects_bad_values(bad):
    out = _spin_run(bad)
    assert out.returncode != 0
    assert "EDGEPLAID_SPIN_US" in out.stderr and "integer in [0, 100000]" in out.stderr
