"""kill -9 during index writes (issues 13, 16): a child process builds, overwrites, upgrades, adds to,
deletes from, updates or compacts an index and is killed at a random moment (a share of them inside
the directory switch, widened by a pause, with and without the atomic exchange). Afterwards the path
always loads as the old or the new index (a first build: no index or the new one), and the next open
leaves no leftovers."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from _kill_child import mutate

from _plaid_data import corpus
from edgeplaid import Index, IndexFormatError

CHILD = Path(__file__).with_name("_kill_child.py")


def _corpus(n_docs: int):
    tokens, doclens, _ = corpus(n_docs=60, seed=5)
    n = int(doclens[:n_docs].sum())
    return tokens[:n], doclens[:n_docs]


def _answer(index: Index, q: torch.Tensor) -> tuple:
    r = index.search(q, k=5)
    e = index.search_exhaustive(q, k=8)
    return (index.n_docs, r.scores.tolist(), r.user_ids, e.scores.tolist(), e.user_ids, sorted(index.ids()))


MUTATIONS = ("add", "delete", "update", "compact")


class Harness:
    def __init__(self, root: Path) -> None:
        self.root = root
        _, _, topics = corpus(n_docs=60, seed=5)
        self.q = torch.nn.functional.normalize(topics[:4, None, :].expand(4, 3, -1).contiguous(), dim=-1)
        self.a = root / "ref-a"
        self.b = root / "ref-b"
        self.legacy = root / "ref-legacy"
        Index.build(self.a, *_corpus(40), n_centroids=8, progress=False)
        Index.build(self.b, *_corpus(60), n_centroids=8, progress=False)
        self.answers = {
            "old": _answer(Index.load(self.a), self.q),
            "new": _answer(Index.load(self.b), self.q),
        }
        # The living index's changes: each from A (compact: from A with deletions), and the state
        # the same change leaves when not killed (the child's change is deterministic).
        self.deleted = root / "ref-deleted"
        shutil.copytree(self.a, self.deleted)
        Index.load(self.deleted).delete([5, 6, 7, 20])
        for op in MUTATIONS:
            base = self.deleted if op == "compact" else self.a
            after = root / f"ref-{op}"
            shutil.copytree(base, after)
            mutate(op, Index.load(after))
            self.answers[op] = {
                "old": _answer(Index.load(base), self.q),
                "new": _answer(Index.load(after), self.q),
            }
        shutil.copytree(self.a, self.legacy)
        m = json.loads((self.legacy / "manifest.json").read_text())
        del m["manifest_checksum"]
        m["format_version"] = 2
        m.pop("segments", None)  # written before segments existed
        (self.legacy / "manifest.json").write_text(json.dumps(m))

    def trial(
        self, i: int, op: str, delay: float | None, widen: bool, exchange: bool
    ) -> tuple[str, list[str]]:
        """One child, killed ``delay`` s after it was told to go (None: not killed); returns
        (outcome, the phases it reported, each ``name @seconds-since-go``)."""
        work = self.root / f"t{i}"
        work.mkdir()
        path = work / "index"
        if op == "overwrite" or (op in MUTATIONS and op != "compact"):
            shutil.copytree(self.a, path)
        elif op == "compact":
            shutil.copytree(self.deleted, path)
        elif op == "upgrade":
            shutil.copytree(self.legacy, path)
        env = dict(os.environ)
        if not exchange:
            env["EDGEPLAID_NO_RENAME_EXCHANGE"] = "1"
        child = subprocess.Popen(
            [sys.executable, str(CHILD), op, str(path), "1" if widen else "0"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        assert child.stdout.readline().strip() == "ready"
        child.stdin.write("go\n")
        child.stdin.flush()
        if delay is not None:
            time.sleep(delay)
            child.send_signal(signal.SIGKILL)
        child.wait(timeout=120)
        phases = [ln.strip() for ln in child.stdout.read().splitlines()]
        last = phases[-1] if phases else "(before start)"
        # the path holds the old or the new index (a first build: nothing or the new one)
        try:
            got = _answer(Index.load(path), self.q)
        except IndexFormatError:
            got = None
        if got is None:
            outcome = "absent" if op == "build" and not os.path.lexists(path) else "BROKEN"
        elif op in MUTATIONS:
            outcome = next((k for k, v in self.answers[op].items() if got == v), "WRONG")
            if outcome != "WRONG":
                Index.load(path).verify()  # every checksum of the version found holds
        elif op == "upgrade":
            v = json.loads((path / "manifest.json").read_text())["format_version"]
            outcome = f"{'old' if v == 2 else 'new'}" if got == self.answers["old"] else "WRONG"
        else:
            want = {"old": self.answers["old"], "new": self.answers["new"]}
            if op == "build":
                want = {"new": self.answers["old"]}  # a build writes corpus A
            outcome = next((k for k, v in want.items() if got == v), "WRONG")
        leftovers = sorted(p.name for p in work.iterdir() if p.name != "index")
        if leftovers:
            outcome += f" +leftovers {leftovers}"
        if delay is None:
            assert child.returncode == 0 and last.startswith("done"), phases
        shutil.rmtree(work, ignore_errors=True)
        return outcome, phases


def run_kills(
    root: Path, n: int, seed: int, ops: tuple[str, ...] = ("overwrite", "upgrade", "build")
) -> dict:
    h = Harness(root)
    rng = random.Random(seed)
    # when each write reaches its directory switch and its end here (not killed, widened): half
    # the kills are drawn over the whole write, half around the switch (the rename window)
    span, window = {}, {}
    for op in ops:
        phases = h.trial(-1 - len(span), op, None, widen=True, exchange=True)[1]
        at = {p.rsplit(" @", 1)[0]: float(p.rsplit(" @", 1)[1]) for p in phases}
        span[op] = at["done"]
        sw = [t for name, t in at.items() if "switch" in name or "rename" in name]
        window[op] = (min(sw) - 0.02, max(sw) + 0.06) if sw else (0.0, at["done"])
    outcomes: Counter[str] = Counter()
    phases: Counter[str] = Counter()
    bad = []
    for i in range(n):
        op = ops[i % len(ops)]
        widen, exchange = rng.random() < 0.6, rng.random() < 0.7
        delay = max(0.0, rng.uniform(0, span[op]) if i % 2 else rng.uniform(*window[op]))
        outcome, reported = h.trial(i, op, delay, widen, exchange)
        last = reported[-1].rsplit(" @", 1)[0] if reported else "(before start)"
        outcomes[f"{op}: {outcome}"] += 1
        phases[last.split(" ->")[0]] += 1
        if "BROKEN" in outcome or "WRONG" in outcome or "leftovers" in outcome:
            bad.append((op, delay, widen, exchange, outcome, last))
    return {
        "kills": n,
        "outcomes": dict(outcomes),
        "last_phase": dict(phases),
        "bad": bad,
        "span_s": span,
        "switch_window_s": window,
    }


def test_kill_sample(tmp_path):
    report = run_kills(tmp_path, n=2, seed=1, ops=("overwrite",))  # one in the switch window
    print(json.dumps(report, indent=1))
    assert not report["bad"], report["bad"]


def test_kill_living_index_sample(tmp_path):
    """A handful of kills during add, delete, update and compact (the slow suite runs 60)."""
    report = run_kills(tmp_path, n=8, seed=3, ops=MUTATIONS)
    print(json.dumps(report, indent=1))
    assert not report["bad"], report["bad"]
    assert set(report["outcomes"]) & {f"{op}: old" for op in MUTATIONS}, report["outcomes"]


@pytest.mark.slow
def test_kill_9_living_index(tmp_path):
    report = run_kills(tmp_path, n=60, seed=4, ops=MUTATIONS)
    print(json.dumps(report, indent=1))
    assert not report["bad"], report["bad"]
    in_window = sum(v for k, v in report["last_phase"].items() if "switch" in k or "rename" in k)
    assert in_window >= 10, report["last_phase"]


@pytest.mark.slow
def test_kill_9_at_random_moments(tmp_path):
    report = run_kills(tmp_path, n=60, seed=2)
    print(json.dumps(report, indent=1))
    assert not report["bad"], report["bad"]
    in_window = sum(v for k, v in report["last_phase"].items() if "switch" in k or "rename" in k)
    assert in_window >= 10, report["last_phase"]
