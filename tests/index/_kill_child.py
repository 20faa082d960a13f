"""Child of the kill -9 test: performs one index write when told to, reporting its phases.

``python _kill_child.py OP PATH WIDEN``: OP is overwrite (PATH <- corpus B), upgrade (PATH is a
legacy index), build (PATH is new, corpus A), or a change of the living index at PATH: add, delete,
update, compact (see :func:`mutate`, which the parent also runs to know the new state). WIDEN=1
sleeps around the directory switch (the rename window) so that random kills land there often. Prints
``ready``, waits for a line on stdin, prints ``phase <name>`` as it goes and ``done`` at the end."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

from _plaid_data import corpus  # noqa: E402
from edgeplaid import Index  # noqa: E402
from edgeplaid.index import _storage  # noqa: E402

T0 = [0.0]


def say(line: str) -> None:
    if line.startswith(("phase", "done")):  # seconds since go: the parent aims its kills by them
        line += f" @{time.perf_counter() - T0[0]:.4f}"
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def corpus_of(n_docs: int):
    tokens, doclens, _ = corpus(n_docs=60, seed=5)
    n = int(doclens[:n_docs].sum())
    return tokens[:n], doclens[:n_docs]


def mutate(op: str, index: Index) -> None:
    """The changes of the kill test (deterministic: the parent runs them too)."""
    tokens, doclens, _ = corpus(n_docs=60, seed=5)
    offs = [0, *doclens.cumsum(0).tolist()]
    more = tokens[offs[40] : offs[52]], doclens[40:52]
    if op == "add":
        index.add(*more, metadata=[{"n": i, "name": f"doc-{i}"} for i in range(12)])
    elif op == "delete":
        index.delete(list(range(0, 40, 3)))
    elif op == "update":
        index.update(
            [1, 2, 3], tokens[offs[40] : offs[43]], doclens[40:43], metadata=[{"n": 1}, None, {"n": 3}]
        )
    elif op == "compact":
        index.compact()
    else:
        raise ValueError(op)


def main() -> None:
    op, path, widen = sys.argv[1], Path(sys.argv[2]), sys.argv[3] == "1"
    pause = 0.05 if widen else 0.0
    exchange, rename = _storage._exchange, os.rename

    def exchange_(a, b):
        say("phase switch")
        time.sleep(pause)
        ok = exchange(a, b)
        say("phase switched" if ok else "phase no-exchange")
        time.sleep(pause)
        return ok

    def rename_(a, b, *rest, **kw):
        say(f"phase rename {Path(a).name[:14]} -> {Path(b).name[:14]}")
        rename(a, b, *rest, **kw)
        time.sleep(pause)

    _storage._exchange = exchange_
    _storage.os.rename = rename_
    tokens, doclens = corpus_of(60 if op == "overwrite" else 40)
    index = Index.load(path) if op not in ("overwrite", "build") else None
    say("ready")
    sys.stdin.readline()
    T0[0] = time.perf_counter()
    say("phase start")
    if op == "overwrite":
        Index.build(path, tokens, doclens, n_centroids=8, overwrite=True, progress=False)
    elif op == "build":
        Index.build(path, tokens, doclens, n_centroids=8, progress=False)
    elif op == "upgrade":
        index.upgrade()
    else:
        mutate(op, index)
    say("done")


if __name__ == "__main__":
    main()
