"""Index fuzzer: mutate a small index, load it and search; classify every outcome.

Mutations (each on a fresh copy): byte flips and truncations/extensions of any file, manifest
edits (value replacements, deletions, additions; unsigned, or re-signed as a writer would),
file-type swaps (FIFO, directory, symlinks to /dev/zero, /dev/urandom, another file of the
index or one outside it, a missing file). Outcomes: ``error`` (IndexFormatError / ValueError,
the documented ones), ``same`` (the unmutated index's answer, bit for bit), ``silent`` (loaded
and answered differently), ``crash`` (any other exception), ``hang`` (over the deadline).
A hard crash (signal) kills the process: run it as a subprocess (``python _fuzz.py N SEED
VERIFY``, one JSON line out) and read the last ``progress`` line of stderr.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

import torch  # noqa: E402
from _index_tools import resign  # noqa: E402

from _plaid_data import corpus  # noqa: E402
from edgeplaid import Index, IndexFormatError  # noqa: E402
from edgeplaid.index._storage import manifest_checksum  # noqa: E402

VALUES: list[Any] = [
    0, 1, -1, 2, 3, 7, 16, 17, 48, 64, 2**31, 2**63, 10**30, 1.5, float("inf"), True, False, None,
    "", "none", "int", "str", "../ids_str.bin", "/dev/zero", "codes.bin", "<i4", "<u2", "|u1", ">f4",
    "<f8", "xxh64:0000000000000000", [], [0], [1, 2], {}, {"a": 1},
]  # fmt: skip


def _paths(obj: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix] if prefix else []
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _paths(v, (*prefix, i))
    return out


def _set(obj: Any, path: tuple, value: Any, delete: bool = False) -> None:
    for k in path[:-1]:
        obj = obj[k]
    if delete and isinstance(obj, dict):
        del obj[path[-1]]
    elif delete:
        obj.pop(path[-1])
    else:
        obj[path[-1]] = value


def mutate(p: Path, rng: random.Random, outside: Path) -> str:
    """Applies one random mutation to the index copy at ``p``; returns its description."""
    files = sorted(f.name for f in p.iterdir())
    kind = rng.choice(["flip", "flip", "truncate", "manifest", "manifest_signed", "type"])
    if kind == "flip":
        name = rng.choice(files)
        raw = bytearray((p / name).read_bytes())
        if not raw:
            return f"flip {name} (empty: nothing)"
        for _ in range(rng.choice([1, 1, 1, 2, 8])):
            i = rng.randrange(len(raw))
            raw[i] ^= rng.randrange(1, 256)
        (p / name).write_bytes(bytes(raw))
        return f"flip {name}"
    if kind == "truncate":
        name = rng.choice(files)
        raw = (p / name).read_bytes()
        if rng.random() < 0.8:
            n = rng.randrange(len(raw) + 1) if raw else 0
            (p / name).write_bytes(raw[:n])
            return f"truncate {name} to {n}"
        (p / name).write_bytes(raw + bytes(rng.randrange(1, 64)))
        return f"extend {name}"
    if kind in ("manifest", "manifest_signed"):
        m = json.loads((p / "manifest.json").read_text())
        path = rng.choice(_paths(m))
        r = rng.random()
        if r < 0.2:
            _set(m, path, None, delete=True)
            what = f"delete {path}"
        elif r < 0.3:
            _set(m, (*path[:-1], "extra_key"), 1) if isinstance(path[-1], str) else _set(m, path, 5)
            what = f"add beside {path}"
        else:
            v = rng.choice(VALUES)
            _set(m, path, v)
            what = f"set {path} = {v!r}"
        if kind == "manifest_signed" and "manifest_checksum" in m:
            try:
                m["manifest_checksum"] = manifest_checksum(m)
            except (ValueError, TypeError):
                pass
        try:
            text = json.dumps(m)
        except ValueError:
            text = json.dumps(m, allow_nan=True)
        (p / "manifest.json").write_text(text)
        return f"{kind}: {what}"
    name = rng.choice(files)
    os.remove(p / name)
    swap = rng.choice(["fifo", "dir", "zero", "urandom", "sibling", "outside", "missing"])
    if swap == "fifo":
        os.mkfifo(p / name)
    elif swap == "dir":
        os.mkdir(p / name)
    elif swap == "zero":
        os.symlink("/dev/zero", p / name)
    elif swap == "urandom":
        os.symlink("/dev/urandom", p / name)
    elif swap == "sibling":
        os.symlink(p / rng.choice([f for f in files if f != name]), p / name)
    elif swap == "outside":
        os.symlink(outside / name, p / name)
    return f"type {name} -> {swap}"


def answer(index: Index, q: torch.Tensor) -> tuple:
    r = index.search(q, k=7)
    e = index.search_exhaustive(q, k=7)
    return (r.scores, r.ids, r.user_ids, e.scores, e.ids)


def same(a: tuple, b: tuple) -> bool:
    return all(
        torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y for x, y in zip(a, b, strict=True)
    )


class Hang(Exception):
    pass


def _alarm(*_: Any) -> None:
    raise Hang


def fuzz(n: int, seed: int, verify: bool | None, deadline_s: float = 20.0) -> dict[str, Any]:
    rng = random.Random(seed)
    tokens, doclens, topics = corpus(n_docs=50, seed=seed)
    g = torch.Generator().manual_seed(seed)
    q = torch.nn.functional.normalize(topics[torch.randint(0, topics.shape[0], (4, 6), generator=g)], dim=-1)
    root = Path(tempfile.mkdtemp(prefix="edgeplaid-fuzz-"))
    try:
        ids = [f"d{i}" for i in range(doclens.shape[0])]
        base = Index.build(root / "base", tokens, doclens, nbits=2, ids=ids, n_centroids=16, progress=False)
        want = answer(base, q)
        outside = root / "outside"
        shutil.copytree(base.path, outside)
        resign(outside)
        counts: Counter[str] = Counter()
        by_kind: dict[str, Counter[str]] = {}
        examples: dict[str, list[str]] = {}
        signal.signal(signal.SIGALRM, _alarm)
        for i in range(n):
            p = root / f"m{i}"
            shutil.copytree(base.path, p)
            what = mutate(p, rng, outside)
            print(f"progress {i} {what}", file=sys.stderr, flush=True)
            signal.setitimer(signal.ITIMER_REAL, deadline_s)
            try:
                got = answer(Index.load(p, verify=verify), q)
                outcome = "same" if same(got, want) else "silent"
            except Hang:
                outcome = "hang"
            except (IndexFormatError, ValueError):
                outcome = "error"
            except Exception as e:
                outcome = "crash"
                what += f" -> {type(e).__name__}: {e}"
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            counts[outcome] += 1
            by_kind.setdefault(what.split(" ")[0].rstrip(":"), Counter())[outcome] += 1
            if outcome in ("silent", "crash", "hang"):
                examples.setdefault(outcome, []).append(what)
            shutil.rmtree(p, ignore_errors=True)
        return {
            "mutations": n,
            "verify": verify,
            "outcomes": dict(counts),
            "by_kind": {k: dict(v) for k, v in by_kind.items()},
            "examples": {k: v[:10] for k, v in examples.items()},
        }
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    n, seed = int(sys.argv[1]), int(sys.argv[2])
    verify = {"none": None, "true": True, "false": False}[sys.argv[3].lower()]
    print(json.dumps(fuzz(n, seed, verify)))
