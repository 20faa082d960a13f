"""The ``edgeplaid`` command line: index, add, delete, compact, search, rerank, eval, bench, info,
demo, serve.

Every command prints a human-readable report, or one JSON object with ``--json``; a failure
prints one line ``edgeplaid: error: ...`` and exits with status 2 (bad input) or 1 (a bug).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from edgeplaid.index._lexical import ANALYZERS
from edgeplaid.model._precision import PRECISIONS
from edgeplaid.search._fusion import FUSIONS
from edgeplaid.search._hybrid import MODES

ENCODER_FILE = "encoder.json"  # beside the index files: which model encoded the documents
DEFAULT_MODEL = "mixedbread-ai/mxbai-edge-colbert-v0-17m"
OFFLINE_MODEL = "minilm"  # edgeplaid.model.load: the offline MiniLM stand-in
# The fields of a corpus line that read_texts (edgeplaid.eval.beir) takes as the document's id and
# text; every other field of the line is the document's metadata (for `search --where`).
CORPUS_FIELDS = frozenset({"_id", "id", "title", "text"})


class UserError(Exception):
    """A problem with the command's input, reported in one line."""


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value}")
    return value


MAX_K = 100_000  # results are dense (n_queries, k) arrays: 2**40 would ask for terabytes


def k_value(text: str) -> int:
    """--k: a positive integer up to MAX_K."""
    value = positive_int(text)
    if value > MAX_K:
        raise argparse.ArgumentTypeError(f"expected a positive integer of at most {MAX_K:,}, got {value}")
    return value


class _Parser(argparse.ArgumentParser):
    """argparse with no abbreviated options (``--mode`` must not be read as ``--model``) and a
    usage error as the one line every other error is (the full usage is one ``-h`` away)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"edgeplaid: error: {message} (see {self.prog} -h)\n")


def check_device(text: str) -> str:
    """``text`` if it names a device this machine has: ``cpu``, ``cuda`` or ``cuda:N``."""
    kind, colon, number = text.partition(":")
    if text == "cpu":
        return text
    if kind != "cuda" or (colon and not number.isdigit()):
        raise UserError(f"--device: expected cpu, cuda or cuda:N, got {text!r}")
    import torch

    if not torch.cuda.is_available():
        build = "a CPU-only build of torch" if torch.version.cuda is None else "no CUDA device visible"
        raise UserError(f"--device {text}: CUDA is not available here ({build}); use --device cpu")
    if colon and int(number) >= torch.cuda.device_count():
        raise UserError(f"--device {text}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return text


def _emit(args: argparse.Namespace, payload: dict[str, Any], text: str) -> None:
    if args.json:
        print(json.dumps(payload, indent=1, default=str))
    else:
        print(text)


def _load_model(
    spec: str, quiet: bool, fallback: str | None = None, device: str = "cpu", precision: str = "auto"
) -> tuple[Any, str]:
    """(model on ``device`` at ``precision``, the spec that loaded): ``fallback`` replaces a model
    that cannot be loaded."""
    import transformers.utils.logging

    from edgeplaid.model import load_model

    transformers.utils.logging.disable_progress_bar()  # "Loading weights" bars, every load
    log = None if quiet else (lambda line: print(line, file=sys.stderr))
    return load_model(spec, device=device, log=log, fallback=fallback, return_spec=True, precision=precision)


def _write_json_atomic(path: Path, obj: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1), encoding="utf-8")
    os.replace(tmp, path)


def _load_index(
    directory: str, device: str = "cpu", ray_address: str | None = None, sharded_ok: bool = False
) -> Any:
    """The index at ``directory``: an Index, or (``sharded_ok``) a ShardedIndex on Ray when the
    directory is a sharded one (``edgeplaid index --shards``)."""
    from edgeplaid.index import Index

    path = Path(directory)
    if not path.is_dir():
        raise UserError(f"{directory}: no such index directory")
    if (path / "sharded.json").is_file():
        if not sharded_ok:
            raise UserError(
                f"{directory}: a sharded index: change it through the Python API "
                "(edgeplaid.distributed.ShardedIndex) or `edgeplaid serve`'s /v1/documents"
            )
        from edgeplaid.distributed import ShardedIndex

        return ShardedIndex.load(path, device=device, ray_address=ray_address)
    return Index.load(path, device=device)


def _index_model(directory: str, override: str | None) -> str:
    if override:
        return override
    path = Path(directory) / ENCODER_FILE
    if not path.is_file():
        raise UserError(f"{directory}: the index does not say which model encoded it: pass --model")
    model = _read_encoder(path).get("model")
    if not isinstance(model, str) or not model:
        raise UserError(f'{path}: no "model" (which model encoded the index): pass --model')
    return model


def _read_encoder(path: Path) -> dict[str, Any]:
    """encoder.json as a dict; UserError naming the file when it is not a JSON object."""
    try:
        encoder = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as e:
        raise UserError(f"{path}: unreadable ({e})") from None
    if not isinstance(encoder, dict):
        raise UserError(f"{path}: expected a JSON object, got {type(encoder).__name__}")
    return encoder


def _check_out_dir(out: Path) -> None:
    """Before minutes of encoding: ``out`` (an index directory to create) can be created, by
    trying it: its nearest existing ancestor is a directory where a directory can be made."""
    import tempfile

    parent = out.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"--out {out}: {parent} is not a directory")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".edgeplaid-probe-", dir=parent))
    except OSError as e:
        raise UserError(f"--out {out}: cannot write in {parent} ({e.strerror or e})") from None


def _check_out_file(out: Path) -> None:
    """Before encoding: ``out`` (a file to write) is not a directory and its directory exists
    and takes a new file."""
    import tempfile

    if out.is_dir():
        raise UserError(f"--out {out}: is a directory; give a file path")
    parent = out.absolute().parent
    if not parent.is_dir():
        raise UserError(f"--out {out}: {parent} is not a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=".edgeplaid-probe-", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"--out {out}: cannot write in {parent} ({e.strerror or e})") from None


def _check_text_arg(text: str, name: str) -> None:
    """A text from the command line: bytes that are not UTF-8 arrive as lone surrogates, which
    neither the tokenizer nor any output can take."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise UserError(f"{name}: not valid UTF-8 text") from None


def _check_trec_ids(ids: Sequence[Any], what: str) -> None:
    """A TREC run file is whitespace-separated columns: an empty id or one holding whitespace (a
    space, a tab, a newline...) would shift or split its line, so it is refused, named."""
    for i in ids:
        s = str(i)
        if not s or any(c.isspace() for c in s):
            raise UserError(
                f"{what} id {s!r} is empty or contains whitespace: TREC run files cannot hold it "
                "(edgeplaid refuses such ids rather than write a corrupt run)"
            )


def _check_overwrite(out: Path) -> None:
    """Before any encoding: --overwrite replaces only an edgeplaid index (or an empty directory)."""
    from edgeplaid.index._storage import check_replaceable

    try:
        check_replaceable(out)
    except FileExistsError as e:
        raise UserError(str(e)) from None


Metadata = list[dict[str, Any] | None]


def _read_corpus(
    path: str, skip_bad_lines: bool, with_metadata: bool
) -> tuple[list[str], list[str], Metadata | None]:
    """(ids, texts, metadata) of a corpus file, empty texts left out (as ``read_texts`` and
    ``drop_empty`` read it); metadata: one dict or None per document (the fields of its JSONL
    line other than CORPUS_FIELDS), or None when no document has any (or not ``with_metadata``)."""
    from edgeplaid.eval import drop_empty, read_texts

    ids, texts = drop_empty(*read_texts(path, skip_bad_lines=skip_bad_lines))
    if not texts:
        raise UserError(f"{path}: the corpus is empty")
    metadata = _read_metadata(Path(path), ids) if with_metadata else None
    return ids, texts, metadata


def _read_metadata(path: Path, ids: list[str]) -> Metadata | None:
    """The metadata of the documents ``ids`` of a JSONL corpus, in their order (None: no
    document has any; a plain text file has none).

    A second pass over the file, after ``read_texts`` (which keeps only ids and texts): the lines
    it refused or skipped are skipped here too, silently (it reported them already)."""
    if path.suffix != ".jsonl":
        return None
    from edgeplaid.eval.beir import DataError, _records, _text_record
    from edgeplaid.index._metadata import check_metadata

    wanted = set(ids)
    found: dict[str, dict[str, Any]] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for number, record in _records(path, skip_bad_lines=True):
            try:
                doc_id, _ = _text_record(path, number, record, True)
            except DataError:
                continue
            fields = {k: v for k, v in record.items() if k not in CORPUS_FIELDS}
            if doc_id not in wanted or not fields:
                continue
            try:
                check_metadata([fields], 1)  # here, to name the line (JSON allows NaN, 2**70...)
            except ValueError as e:
                what = str(e).replace("metadata: document 0", f"metadata of {doc_id!r}", 1)
                raise UserError(f"{path}:{number}: {what} (--no-metadata leaves the fields out)") from None
            found[doc_id] = fields
    return [found.get(i) for i in ids] if found else None


def _encode_documents(
    spec: str, texts: list[str], quiet: bool, precision: str = "auto"
) -> tuple[Any, Any, float]:
    """(tokens, doclens, seconds) of the texts encoded by the model ``spec`` on the CPU."""
    model, _ = _load_model(spec, quiet, precision=precision)
    t0 = time.perf_counter()
    tokens, doclens = model.encode_documents(texts, show_progress_bar=not quiet)
    return tokens, doclens, time.perf_counter() - t0


_INT_ID = re.compile(r"-?[0-9]+")


def _index_ids(index: Any, ids: Sequence[str], what: str) -> list[Any]:
    """Ids read as text (a corpus, the command line) in the kind of the index's ids: as they are
    for an index of str ids (every index `edgeplaid index` builds), as ints for one of int ids
    (built through the Python API)."""
    if index.id_kind == "str":
        return list(ids)
    bad = [i for i in ids if not _INT_ID.fullmatch(i)]
    if bad:
        raise UserError(f"{what}: this index's ids are integers, got {bad[0]!r}")
    return [int(i) for i in ids]


def _param_value(text: str) -> Any:
    """A --param value: JSON when it parses as JSON (numbers, true, false, null, "quoted"
    strings), else the text itself. NaN and Infinity, which Python's JSON reader takes, stay text."""

    def refuse(name: str) -> Any:
        raise ValueError(name)

    try:
        return json.loads(text, parse_constant=refuse)
    except ValueError:
        return text


def _where_params(args: argparse.Namespace) -> tuple[str | None, list[Any] | None]:
    """(--where, --param values) checked against the filter grammar, before any work."""
    from edgeplaid.index._metadata import WhereError, compile_where

    if args.where is None:
        if args.param:
            raise UserError("--param: given without --where")
        return None, None
    _check_text_arg(args.where, "--where")  # compile_where lets a lone surrogate through
    params = [_param_value(p) for p in args.param] if args.param else None
    try:
        compile_where(args.where, params)
    except WhereError as e:
        raise UserError(f"--where: {str(e).removeprefix('where: ')}") from None
    return args.where, params


@contextlib.contextmanager
def _changing(ids_arg: str) -> Iterator[None]:
    """One line for what an index change may refuse: an unknown id (KeyError, named after the
    argument that gave it), a filter outside the grammar, another writer holding the index."""
    from edgeplaid.index import IndexLockedError, WhereError

    try:
        yield
    except WhereError as e:
        raise UserError(f"--where: {str(e).removeprefix('where: ')}") from None
    except KeyError as e:
        message = str(e.args[0]) if e.args else "unknown id"
        raise UserError(f"{ids_arg}: {message.removeprefix('ids: ')}") from None
    except IndexLockedError as e:
        # The writer's lock wait ran out (another process is changing the index): not a bug.
        raise UserError(str(e)) from None


def _shape(index: Any) -> dict[str, int]:
    return {
        "documents": index.n_docs,
        "positions": index.n_positions,
        "deleted": index.n_positions - index.n_docs,
        "segments": len(index.segments),
    }


# ---------------------------------------------------------------------------- commands


_ANALYZER_HELP = (
    "how the lexical side splits texts into terms: plain (split on non-alphanumerics, lowercased; "
    "the default) or english (the same, stemmed)"
)


def _alpha(value: str) -> float:
    try:
        a = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {value!r}") from None
    if not 0.0 <= a <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {value!r}")
    return a


def _pool_factor(value: str) -> float:
    from edgeplaid.index._pooling import check_pool_factor

    try:
        return check_pool_factor(float(value))
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected a number in [1, 64], got {value!r} ({e})") from None


def _codec_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nbits", type=int, choices=(1, 2, 4, 8), default=4, help="residual bits per dimension")
    p.add_argument(
        "--buckets",
        choices=("lloyd_max", "quantile"),
        default="lloyd_max",
        help="residual levels: least squared error (default) or colbert-ai's equal-mass quantiles",
    )
    p.add_argument(
        "--pool-factor",
        type=_pool_factor,
        default=1.0,
        help="keep ceil(tokens / F) vectors per document, near-duplicates merged (default 1: all); "
        "with --nbits 2, 1.5 stores 15 bytes per token at SciFact's nDCG@10 (README)",
    )


def _hybrid_options(p: argparse.ArgumentParser, analyzer: bool = True) -> None:
    p.add_argument(
        "--fusion",
        choices=FUSIONS,
        default=None,
        help="hybrid: relative_score (min-max normalised scores, the default) or rrf (reciprocal rank)",
    )
    p.add_argument(
        "--alpha",
        type=_alpha,
        default=None,
        help="hybrid: the late side's weight in [0, 1] (default 0.6 with relative_score, 0.5 with rrf)",
    )
    if analyzer:
        p.add_argument("--analyzer", choices=ANALYZERS, default="plain", help=_ANALYZER_HELP)


def _ray_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--ray-address",
        help="sharded indexes: the Ray cluster ('auto': the running one, 'local': a new one for "
        "this process, or an address); default: the running one if any, else a local one",
    )


def cmd_index(args: argparse.Namespace) -> None:
    from edgeplaid.index import Index

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise UserError(f"{out}: exists; pass --overwrite to replace it")
    _check_out_dir(out)  # before minutes of encoding
    if args.overwrite and args.shards is not None:
        if out.exists() and not (out / "sharded.json").is_file() and (not out.is_dir() or any(out.iterdir())):
            raise UserError(
                f"{out}: --overwrite --shards replaces a sharded index or an empty directory only"
            )
    elif args.overwrite:
        _check_overwrite(out)
    ids, texts, metadata = _read_corpus(args.corpus, args.skip_bad_lines, not args.no_metadata)
    _check_trec_ids(ids, "document")  # `search --out` writes them to TREC run files
    if args.shards is not None:
        _index_sharded(args, out, ids, texts, metadata)
        return
    if args.ray_address is not None:
        raise UserError("--ray-address: only with --shards")
    tokens, doclens, t_encode = _encode_documents(args.model, texts, args.quiet, args.precision)
    t0 = time.perf_counter()
    index = Index.build(
        out,
        tokens,
        doclens,
        nbits=args.nbits,
        ids=ids,
        metadata=metadata,
        overwrite=args.overwrite,
        progress=not args.quiet,
        texts=None if args.no_lexical else texts,
        store_texts=not args.no_store_texts,
        analyzer=args.analyzer,
        buckets=args.buckets,
        pool_factor=args.pool_factor,
    )
    t_build = time.perf_counter() - t0
    _write_json_atomic(out / ENCODER_FILE, {"model": args.model, "dim": int(tokens.shape[1])})
    n_meta = 0 if metadata is None else sum(m is not None for m in metadata)
    payload = {
        "index": str(out),
        "documents": len(ids),
        "with_metadata": n_meta,
        "tokens": int(tokens.shape[0]),
        "bytes": index.nbytes(),
        "encode_s": round(t_encode, 3),
        "build_s": round(t_build, 3),
    }
    _emit(
        args,
        payload,
        f"indexed {len(ids):,} documents ({tokens.shape[0]:,} tokens, {n_meta:,} with metadata) into "
        f"{out} ({index.nbytes() / 2**20:.1f} MiB); encode {t_encode:.1f} s, build {t_build:.1f} s",
    )


def _index_sharded(
    args: argparse.Namespace, out: Path, ids: list[str], texts: list[str], metadata: Any
) -> None:
    """`edgeplaid index --shards N`: the corpus encoded by a pool of encoder actors and streamed
    into a sharded build (edgeplaid.distributed), on the Ray cluster of --ray-address."""
    import transformers.utils.logging

    from edgeplaid.distributed import ShardedIndex, encode

    transformers.utils.logging.disable_progress_bar()
    t0 = time.perf_counter()
    stream = encode(
        args.model,
        texts,
        ids=ids,
        metadata=metadata,
        keep_texts=not args.no_lexical,
        ray_address=args.ray_address,
        progress=not args.quiet,
        precision=args.precision,
    )
    dims: list[int] = []

    def batches():
        for b in stream:
            dims.append(int(b["doc_tokens"].shape[1]))
            yield b

    index = ShardedIndex.build(
        out,
        batches(),
        nbits=args.nbits,
        n_shards=args.shards,
        overwrite=args.overwrite,
        progress=not args.quiet,
        store_texts=not args.no_store_texts,
        analyzer=args.analyzer,
        buckets=args.buckets,
        pool_factor=args.pool_factor,
        ray_address=args.ray_address,
    )
    try:
        t_total = time.perf_counter() - t0
        _write_json_atomic(out / ENCODER_FILE, {"model": args.model, "dim": dims[0]})
        info = index.shard_info()
        n_tokens = sum(i["n_tokens"] for i in info)
        nbytes = sum(i["nbytes"] for i in info)
        payload = {
            "index": str(out),
            "documents": len(ids),
            "shards": args.shards,
            "shard_documents": [i["n_docs"] for i in info],
            "tokens": n_tokens,
            "bytes": nbytes,
            "encode_and_build_s": round(t_total, 3),
        }
        _emit(
            args,
            payload,
            f"indexed {len(ids):,} documents ({n_tokens:,} tokens) into {args.shards} shards in {out} "
            f"({nbytes / 2**20:.1f} MiB; documents per shard {payload['shard_documents']}); "
            f"encode + build {t_total:.1f} s",
        )
    finally:
        index.close()


def cmd_add(args: argparse.Namespace) -> None:
    index = _load_index(args.index)
    ids, texts, metadata = _read_corpus(args.corpus, args.skip_bad_lines, not args.no_metadata)
    _check_trec_ids(ids, "document")
    keys = _index_ids(index, ids, args.corpus)
    # Checked before the model loads: a refused run costs nothing. The index's own check (under
    # its writer lock) still refuses an id another process adds meanwhile.
    old = [r for r, key in enumerate(keys) if key in index]
    if old and not args.update:
        shown = ", ".join(repr(ids[r]) for r in old[:5]) + (" ..." if len(old) > 5 else "")
        raise UserError(
            f"{args.corpus}: {len(old):,} ids already in the index ({shown}); "
            "--update replaces those documents"
        )
    tokens, doclens, t_encode = _encode_documents(
        _index_model(args.index, args.model), texts, args.quiet, args.precision
    )
    if int(tokens.shape[1]) != index.dim:
        raise UserError(
            f"--model: it encodes {tokens.shape[1]}-dim vectors, the index holds {index.dim}-dim ones"
        )
    new = sorted(set(range(len(keys))) - set(old))
    t0 = time.perf_counter()
    with _changing(args.corpus):
        # One atomic version: the new documents added, the existing ones replaced.
        lexical = texts if index.has_lexical else None  # the BM25 side indexes them too
        if old:
            index.upsert(keys, tokens, doclens, metadata=metadata, texts=lexical)
        else:
            index.add(tokens, doclens, ids=keys, metadata=metadata, texts=lexical)
    t_write = time.perf_counter() - t0
    payload = {
        "index": args.index,
        "added": len(new),
        "updated": len(old),
        "n_docs": index.n_docs,
        "segments": len(index.segments),
        "tokens": int(tokens.shape[0]),
        "encode_s": round(t_encode, 3),
        "write_s": round(t_write, 3),
    }
    _emit(
        args,
        payload,
        f"added {len(new):,} and updated {len(old):,} documents in {args.index}: {index.n_docs:,} "
        f"documents in all ({len(index.segments)} segments); encode {t_encode:.1f} s, write {t_write:.1f} s",
    )


def _read_ids_file(path: str) -> list[str]:
    """One id a line (the line's end stripped, blank lines skipped)."""
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            ids = [line.rstrip("\r\n") for line in f if line.strip()]
    except OSError as e:
        raise UserError(f"--ids-file {path}: {e.strerror or e}") from None
    if not ids:
        raise UserError(f"--ids-file {path}: no ids in the file")
    return ids


def cmd_delete(args: argparse.Namespace) -> None:
    selectors = (("--ids", args.ids), ("--ids-file", args.ids_file), ("--where", args.where))
    given = [name for name, value in selectors if value is not None]
    if len(given) != 1:
        both = f" (got {' and '.join(given)})" if given else ""
        raise UserError(f"--ids, --ids-file, --where: give exactly one of them{both}")
    where, params = _where_params(args)
    index = _load_index(args.index)
    if where is not None:
        with _changing("--where"):
            n = index.delete(where=where, params=params)
    else:
        arg = "--ids" if args.ids else f"--ids-file {args.ids_file}"
        keys = _index_ids(index, args.ids or _read_ids_file(args.ids_file), arg)
        with _changing(arg):
            n = index.delete(keys)
    _emit(
        args,
        {"index": args.index, "deleted": n, "n_docs": index.n_docs},
        f"deleted {n:,} documents from {args.index}: {index.n_docs:,} left",
    )


def cmd_compact(args: argparse.Namespace) -> None:
    index = _load_index(args.index)
    before = _shape(index)
    t0 = time.perf_counter()
    with _changing(args.index):
        wrote = index.compact()
    seconds = time.perf_counter() - t0
    after = _shape(index)

    def describe(s: dict[str, int]) -> str:
        segments = f"{s['segments']} segment{'' if s['segments'] == 1 else 's'}"
        return f"{segments}, {s['positions']:,} positions ({s['deleted']:,} deleted)"

    text = (
        f"compacted {args.index} in {seconds:.1f} s: {describe(before)} -> {describe(after)}"
        if wrote
        else f"{args.index}: nothing to compact ({describe(before)})"
    )
    _emit(args, {"index": args.index, "compacted": wrote, "before": before, "after": after}, text)


def cmd_search(args: argparse.Namespace) -> None:
    if (args.query is None) == (args.queries is None):
        raise UserError("give either a query text or --queries FILE")
    where, params = _where_params(args)  # before loading and encoding anything
    if args.out:
        _check_out_file(Path(args.out))
    index = _load_index(args.index, args.device, args.ray_address, sharded_ok=True)
    try:
        _search(args, index, where, params)
    finally:
        if hasattr(index, "close"):  # a ShardedIndex: end its shard actors
            index.close()


def _search(args: argparse.Namespace, index: Any, where: str | None, params: list[Any] | None) -> None:
    from edgeplaid.eval import drop_empty, read_texts, to_run, write_trec

    if where is not None and not index.has_metadata:
        warnings.warn(f"--where: {args.index} holds no metadata: no document matches", stacklevel=1)
    if args.query is not None:
        _check_text_arg(args.query, "query")
        query_ids, texts = ["1"], [args.query]
    else:
        query_ids, texts = drop_empty(
            *read_texts(args.queries, skip_bad_lines=args.skip_bad_lines, with_title=False), "queries"
        )
        if not texts:
            raise UserError(f"{args.queries}: no queries")
    if args.out:  # before encoding
        _check_trec_ids(query_ids, "query")
    if args.mode != "late" and not index.has_lexical:
        raise UserError(
            f"--mode {args.mode}: {args.index} has no lexical side (index it without --no-lexical)"
        )
    if args.mode != "hybrid" and (args.alpha is not None or args.fusion is not None):
        raise UserError("--alpha, --fusion: only with --mode hybrid")
    queries = mask = None
    t_encode = 0.0
    if args.mode != "lexical":
        model, _ = _load_model(
            _index_model(args.index, args.model), args.quiet, device=args.device, precision=args.precision
        )
        t0 = time.perf_counter()
        queries, mask = model.encode_queries(texts, show_progress_bar=not args.quiet)
        t_encode = time.perf_counter() - t0
    t0 = time.perf_counter()
    hybrid = {"alpha": args.alpha, "fusion": args.fusion} if args.mode == "hybrid" else {}
    result = index.search(
        queries,
        k=args.k,
        queries_mask=mask,
        where=where,
        params=params,
        text=None if args.mode == "late" else texts,
        mode=args.mode,
        **hybrid,
    )
    t_search = time.perf_counter() - t0
    run = to_run(query_ids, result.user_ids, result.scores.cpu().numpy())
    if args.out:
        # an index built through the Python API may hold any str ids: those retrieved are checked
        _check_trec_ids([d for docs in run.values() for d in docs], "document")
        write_trec(args.out, run)
    payload = {"encode_s": t_encode, "search_s": t_search, "results": run if not args.out else str(args.out)}
    lines = []
    if not args.out:
        for qid, text in zip(query_ids, texts, strict=True):
            lines.append(f"query {qid}: {text}")
            for rank, (doc, score) in enumerate(sorted(run[qid].items(), key=lambda x: -x[1]), 1):
                lines.append(f"  {rank:>3}. {doc:<20} {score:.4f}")
    lines.append(
        f"{len(texts)} queries: encode {t_encode * 1e3:.1f} ms, search {t_search * 1e3:.1f} ms"
        + (f"; run written to {args.out}" if args.out else "")
    )
    _emit(args, payload, "\n".join(lines))


def cmd_rerank(args: argparse.Namespace) -> None:
    from edgeplaid.eval import drop_empty, read_texts
    from edgeplaid.reranking import rerank

    ids, texts = drop_empty(*read_texts(args.docs, skip_bad_lines=args.skip_bad_lines))
    if not texts:
        raise UserError(f"{args.docs}: no documents")
    if not args.query.strip():
        raise UserError("--query: the query is empty")
    _check_text_arg(args.query, "--query")
    model, _ = _load_model(args.model, args.quiet, device=args.device, precision=args.precision)
    scores, order = rerank(args.query, texts, k=args.k, model=model)
    ranked = [{"id": ids[i], "score": float(s)} for i, s in zip(order.tolist(), scores.tolist(), strict=True)]
    _emit(
        args,
        {"query": args.query, "results": ranked},
        "\n".join(f"{r + 1:>3}. {d['id']:<20} {d['score']:.4f}" for r, d in enumerate(ranked)),
    )


def _report_text(report: Any) -> str:
    m = report.metrics
    lines = [
        f"{report.dataset}: {report.n_docs:,} documents, {report.n_tokens:,} tokens, "
        f"{report.n_queries} queries, model {report.model}",
    ]
    if len(report.modes) > 1:
        for mode, metrics in report.modes.items():
            lines.append(
                f"  {mode + ':':<9}" + "  ".join(f"{name} {value:.4f}" for name, value in metrics.items())
            )
    else:
        lines.append("  " + "  ".join(f"{name} {value:.4f}" for name, value in m.items()))
    if report.exhaustive_metrics is not None:
        lines.append(
            "  exhaustive MaxSim: "
            + "  ".join(f"{name} {value:.4f}" for name, value in report.exhaustive_metrics.items())
            + f"  (PLAID recall@10 vs exhaustive {report.recall_vs_exhaustive:.3f})"
        )
    t = report.timings
    lines.append(
        "  time: "
        + ", ".join(f"{name} {seconds:.2f} s" for name, seconds in t.items())
        + f"; index {report.index_bytes / 2**20:.1f} MiB"
        + f" ({report.index_bytes / max(report.n_tokens, 1):.1f} B/token)"
    )
    return "\n".join(lines)


def cmd_eval(args: argparse.Namespace) -> None:
    from edgeplaid.eval import load_beir
    from edgeplaid.eval.pipeline import evaluate_collection

    collection = load_beir(args.dataset, split=args.split, skip_bad_lines=args.skip_bad_lines)
    model, _ = _load_model(args.model, args.quiet, device=args.device, precision=args.precision)
    report = evaluate_collection(
        collection,
        model,
        model_name=args.model,
        k=args.k,
        nbits=args.nbits,
        exhaustive=args.exhaustive,
        progress=not args.quiet,
        modes=args.mode,
        fusion=args.fusion,
        alpha=args.alpha,
        analyzer=args.analyzer,
        buckets=args.buckets,
        pool_factor=args.pool_factor,
    )
    _emit(args, report.as_dict(), _report_text(report))


def cmd_demo(args: argparse.Namespace) -> None:
    from edgeplaid.data import CRANFIELD
    from edgeplaid.eval import load_beir
    from edgeplaid.eval.pipeline import evaluate_collection

    collection = load_beir(CRANFIELD)
    model, model_spec = _load_model(
        args.model or DEFAULT_MODEL,
        args.quiet,
        fallback=OFFLINE_MODEL,
        device=args.device,
        precision=args.precision,
    )
    report = evaluate_collection(
        collection, model, model_name=model_spec, k=100, exhaustive=True, progress=not args.quiet
    )
    lines = [_report_text(report), ""]
    docs = dict(zip(collection.doc_ids, collection.doc_texts, strict=True))
    for qid, text in list(zip(collection.query_ids, collection.query_texts, strict=True))[:3]:
        lines.append(f"query {qid}: {text}")
        judged = collection.qrels.get(qid, {})
        top = sorted(report.run[qid].items(), key=lambda x: -x[1])[:3]
        for rank, (doc, score) in enumerate(top, 1):
            mark = "relevant" if judged.get(doc, 0) > 0 else "        "
            lines.append(f"  {rank}. [{mark}] {score:7.3f}  {doc:>5}  {docs[doc][:90]}")
    _emit(args, report.as_dict(), "\n".join(lines))


def _info_sharded(args: argparse.Namespace) -> None:
    """`edgeplaid info` of a sharded index: its manifest and each shard's shape, read from the
    directories (no Ray needed)."""
    from edgeplaid.distributed._layout import ShardedIndexError, read_manifest
    from edgeplaid.index import Index

    try:
        m = read_manifest(args.index)
    except ShardedIndexError as e:
        raise UserError(str(e)) from None
    shards = []
    for name in m["shards"]:
        ix = Index.load(Path(args.index) / name)
        shards.append(
            {"shard": name, **_shape(ix), "tokens": ix.n_tokens, "bytes": ix.nbytes() + ix.lexical_nbytes()}
        )
    n_docs = sum(sh["documents"] for sh in shards)
    n_tokens = sum(sh["tokens"] for sh in shards)
    nbytes = sum(sh["bytes"] for sh in shards)
    encoder = Path(args.index) / ENCODER_FILE
    payload = {
        "manifest": m,
        "documents": n_docs,
        "tokens": n_tokens,
        "bytes": nbytes,
        "shards": shards,
        "encoder": _read_encoder(encoder) if encoder.is_file() else None,
    }
    lines = [
        f"{args.index}: sharded index, {m['n_shards']} shards sharing one codec, {n_docs:,} documents, "
        f"{n_tokens:,} tokens, dim {m['dim']}, nbits {m['nbits']}, {nbytes / 2**20:.2f} MiB, "
        f"{m['id_kind']} ids placed by hash, lexical: {'yes' if m.get('lexical') else 'none'}"
    ]
    lines += [
        f"  {sh['shard']}: {sh['documents']:,} documents, {sh['tokens']:,} tokens, "
        f"{sh['segments']} segment(s), {sh['deleted']:,} deleted, {sh['bytes'] / 2**20:.2f} MiB"
        for sh in shards
    ]
    if payload["encoder"]:
        lines.append(f"  encoder: {payload['encoder'].get('model', '(no model recorded)')}")
    _emit(args, payload, "\n".join(lines))


def cmd_info(args: argparse.Namespace) -> None:
    from edgeplaid.index._codec import recorded_bucket_fit

    if (Path(args.index) / "sharded.json").is_file():
        _info_sharded(args)
        return
    index = _load_index(args.index)
    files = {p.name: p.stat().st_size for p in sorted(Path(args.index).iterdir()) if p.is_file()}
    encoder = Path(args.index) / ENCODER_FILE
    shape = _shape(index)
    payload = {
        "manifest": index.manifest,
        **shape,
        "metadata": index.manifest.get("metadata") is not None,
        "lexical": None
        if not index.has_lexical
        else {k: index.manifest["lexical"][k] for k in ("analyzer", "store_texts", "n_docs")}
        | {"bytes": index.lexical_nbytes()},
        "files": files,
        "bytes": sum(files.values()),
        "bytes_per_token": sum(files.values()) / max(index.n_tokens, 1),
        "encoder": _read_encoder(encoder) if encoder.is_file() else None,
    }
    lines = [
        f"{args.index}: format {index.manifest.get('format_version')}, {index.n_docs:,} documents, "
        f"{index.n_tokens:,} tokens, dim {index.dim}, nbits {index.nbits}, {index.n_centroids:,} centroids",
        f"  {shape['segments']} segment{'' if shape['segments'] == 1 else 's'}, "
        f"{shape['deleted']:,} deleted documents (until compact), "
        f"metadata: {'yes' if payload['metadata'] else 'none'}",
        f"  {payload['bytes'] / 2**20:.2f} MiB, {payload['bytes_per_token']:.1f} bytes per token, "
        f"buckets {recorded_bucket_fit(index.manifest) or 'quantile (colbert-ai)'}, "
        f"pool factor {index.pool_factor:g}",
    ]
    lex = payload["lexical"]
    if lex is None:
        lines.append("  lexical (BM25): none")
    else:
        texts = "stored" if lex["store_texts"] else "not stored"
        mib = lex["bytes"] / 2**20
        lines.append(
            f"  lexical (BM25): {lex['analyzer']} analyzer, texts {texts}, {mib:.2f} MiB in lexical/"
        )
    lines += [f"  {name:<28} {size:>14,} B" for name, size in files.items()]
    if payload["encoder"]:
        lines.append(f"  encoder: {payload['encoder'].get('model', '(no model recorded)')}")
    _emit(args, payload, "\n".join(lines))


def cmd_bench(args: argparse.Namespace) -> None:
    from edgeplaid.bench import run_benchmarks

    rows = run_benchmarks(quick=args.quick, plot=args.plot, log=None if args.json else print)
    if args.json:
        print(json.dumps(rows, indent=1))


def cmd_serve(args: argparse.Namespace) -> None:
    from edgeplaid.serve import serve

    if args.index:
        if not Path(args.index).is_dir():
            raise UserError(f"{args.index}: no such index directory")
        args.model = _index_model(args.index, args.model)
    elif not args.model and not args.quiet:
        print(
            "edgeplaid: no --model: serving /v1/rerank with precomputed embeddings only",
            file=sys.stderr,
        )
    serve(args)


# ---------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="edgeplaid",
        description="Late-interaction (ColBERT) retrieval with PLAID indexes and fused kernels.",
    )
    common = _Parser(add_help=False)
    common.add_argument("--json", action="store_true", help="print one JSON object")
    common.add_argument("--quiet", action="store_true", help="no progress bars or notes on stderr")
    precision = _Parser(add_help=False)
    precision.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="auto",
        help="the encoder's precision: auto (default: bf16 on CPUs with AMX, int8 on bf16 weights with "
        "AVX512-BF16 and VNNI, else bf16 with AVX512-BF16; without it int8 for ModernBERT models and, "
        "with AVX-512 VNNI, others; bf16/fp16 on GPUs), fp32 (PyLate's outputs exactly), bf16, fp16, "
        "int8 (CPU)",
    )
    on_device = _Parser(add_help=False, parents=[precision])
    on_device.add_argument(
        "--device", default="cpu", help="cpu (default), cuda or cuda:N: where the model and index run"
    )
    bad_lines = _Parser(add_help=False)
    bad_lines.add_argument(
        "--skip-bad-lines", action="store_true", help="warn about malformed JSONL lines and go on"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "index", parents=[common, bad_lines, precision], help="encode a corpus and build a PLAID index"
    )
    p.add_argument("corpus", help="BEIR corpus.jsonl (_id, title, text) or a text file, one document a line")
    p.add_argument("--model", required=True, help="model name or path ('minilm': the offline stand-in)")
    p.add_argument("--out", required=True, help="index directory to create")
    _codec_options(p)
    p.add_argument(
        "--overwrite", action="store_true", help="replace an existing edgeplaid index (nothing else)"
    )
    p.add_argument(
        "--no-metadata",
        action="store_true",
        help="leave out the metadata (by default every field of a JSONL line but _id/id/title/text)",
    )
    p.add_argument(
        "--no-lexical",
        action="store_true",
        help="no lexical (BM25) side: by default the texts are indexed too, for search --mode lexical|hybrid",
    )
    p.add_argument(
        "--no-store-texts", action="store_true", help="index the texts for BM25 without keeping them"
    )
    p.add_argument("--analyzer", choices=ANALYZERS, default="plain", help=_ANALYZER_HELP)
    p.add_argument(
        "--shards",
        type=positive_int,
        help="a sharded index of N shards on Ray (pip install -e '.[distributed]'): encoded by a "
        "pool of encoder actors, the shards built in parallel",
    )
    _ray_option(p)
    p.set_defaults(fn=cmd_index)

    p = sub.add_parser(
        "add",
        parents=[common, bad_lines, precision],
        help="encode a corpus and add its documents to an index",
    )
    p.add_argument("index", help="index directory")
    p.add_argument("corpus", help="corpus.jsonl (_id, title, text, metadata fields) or a text file")
    p.add_argument("--model", help="override the model recorded with the index")
    p.add_argument(
        "--update", action="store_true", help="replace the documents whose ids are in the index already"
    )
    p.add_argument("--no-metadata", action="store_true", help="leave out the metadata fields")
    p.set_defaults(fn=cmd_add)

    filters = _Parser(add_help=False)
    filters.add_argument(
        "--where", help='metadata filter, e.g. "year >= ? AND source = ?" (values as ? with --param)'
    )
    filters.add_argument(
        "--param",
        action="append",
        metavar="VALUE",
        help='the value of the next ? of --where (repeat; JSON when it parses: 2020, true, null, "2020")',
    )

    p = sub.add_parser("delete", parents=[common, filters], help="delete documents from an index")
    p.add_argument("index", help="index directory")
    p.add_argument("--ids", nargs="+", metavar="ID", help="the ids of the documents to delete")
    p.add_argument("--ids-file", help="a file of ids to delete, one a line")
    p.set_defaults(fn=cmd_delete)

    p = sub.add_parser(
        "compact", parents=[common], help="merge an index's segments and drop its deleted documents"
    )
    p.add_argument("index", help="index directory")
    p.set_defaults(fn=cmd_compact)

    p = sub.add_parser("search", parents=[common, bad_lines, on_device, filters], help="search an index")
    p.add_argument("index")
    p.add_argument("query", nargs="?", help="a query text")
    p.add_argument("--queries", help="queries.jsonl (_id, text) or a text file, one query a line")
    p.add_argument("--k", type=k_value, default=10, help=f"results per query (at most {MAX_K:,})")
    p.add_argument(
        "--out",
        help="write a TREC run file instead of printing (ids must be free of whitespace: refused otherwise)",
    )
    p.add_argument("--model", help="override the model recorded with the index")
    p.add_argument(
        "--mode",
        choices=MODES,
        default="late",
        help="late (PLAID, the default), lexical (BM25) or hybrid (both fused); the last two need "
        "an index built with its texts",
    )
    _hybrid_options(p, analyzer=False)
    _ray_option(p)
    p.set_defaults(fn=cmd_search)

    p = sub.add_parser(
        "rerank", parents=[common, bad_lines, on_device], help="rerank documents for one query"
    )
    p.add_argument("--model", required=True)
    p.add_argument("--query", required=True)
    p.add_argument("--docs", required=True, help="documents .jsonl or a text file")
    p.add_argument("--k", type=k_value, default=None)
    p.set_defaults(fn=cmd_rerank)

    p = sub.add_parser(
        "eval", parents=[common, bad_lines, on_device], help="evaluate on a BEIR-format directory"
    )
    p.add_argument("dataset")
    p.add_argument("--model", required=True)
    p.add_argument("--split", default="test")
    p.add_argument("--k", type=k_value, default=100)
    _codec_options(p)
    p.add_argument("--exhaustive", action="store_true", help="also exact MaxSim over every document")
    p.add_argument(
        "--mode",
        nargs="+",
        choices=MODES,
        default=["late"],
        help="search modes to evaluate on the same index (several: one line each); default late",
    )
    _hybrid_options(p)
    p.set_defaults(fn=cmd_eval)

    p = sub.add_parser(
        "demo", parents=[common, on_device], help="index and search the built-in Cranfield sample"
    )
    p.add_argument("--model", help="default: mxbai-edge-colbert-v0-17m if it loads, else the offline MiniLM")
    p.set_defaults(fn=cmd_demo)

    p = sub.add_parser("info", parents=[common], help="an index's manifest and sizes")
    p.add_argument("index")
    p.set_defaults(fn=cmd_info)

    p = sub.add_parser("bench", parents=[common], help="kernel benchmarks against torch, as %% of peak")
    p.add_argument("--quick", action="store_true", help="small shapes (a smoke run)")
    p.add_argument("--plot", default="edgeplaid-bench.png", help="PNG plot path ('' for none)")
    p.set_defaults(fn=cmd_bench)

    p = sub.add_parser("serve", parents=[common, on_device], help="HTTP reranking and search service")
    p.add_argument(
        "--model", help="default: the model recorded with --index; none: precomputed embeddings only"
    )
    p.add_argument("--index", help="an index directory (a sharded one too: served through Ray)")
    _ray_option(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("EDGEPLAID_API_KEY"))
    p.add_argument("--batch-window-ms", type=float, default=2.0)
    p.add_argument("--max-batch", type=positive_int, default=64)
    p.add_argument("--max-queue", type=positive_int, default=256)
    p.add_argument("--max-documents", type=positive_int, default=1000)
    p.add_argument("--max-text-chars", type=positive_int, default=20000, help="characters per text")
    p.add_argument(
        "--max-request-chars",
        type=positive_int,
        default=1_000_000,
        help="characters of all the texts of one request together (bounds one request's work)",
    )
    p.add_argument(
        "--max-write-queue",
        type=positive_int,
        default=16,
        help="writes (POST/DELETE /v1/documents) waiting at a time; more are answered 503",
    )
    p.add_argument(
        "--request-timeout",
        type=positive_float,
        default=10.0,
        help="seconds for a request's head and body to arrive (slow clients are disconnected)",
    )
    p.set_defaults(fn=cmd_serve)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # transformers' load reports are not for command-line users; our warnings print as one line.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    # (the library's own warnings may start with "edgeplaid: " already: not said twice)
    warnings.formatwarning = lambda message, *rest, **kw: (
        f"edgeplaid: warning: {str(message).removeprefix('edgeplaid: ')}\n"
    )
    from edgeplaid.eval.beir import DataError

    # OSError: the file system's answer (permission, full disk, not a directory...), one line too.
    expected: tuple[type[BaseException], ...] = (UserError, DataError, ValueError, OSError)
    try:
        from edgeplaid.index import IndexFormatError

        expected += (IndexFormatError,)
    except ImportError:
        pass
    try:
        if getattr(args, "device", None) is not None:
            args.device = check_device(args.device)
        args.fn(args)
    except expected as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"edgeplaid: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("edgeplaid: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
