"""BEIR-format collections: corpus.jsonl, queries.jsonl and qrels/<split>.tsv.

Every reader names the file and the line of a malformed record; ``skip_bad_lines=True``
warns once per bad line and goes on instead. Document order and ids are kept as in the file.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path


class DataError(ValueError):
    """A collection file is missing, malformed or inconsistent (the message says where)."""


@dataclass
class Collection:
    """A retrieval collection: documents, queries and relevance judgements.

    ``doc_ids``/``doc_texts`` are parallel lists (title and text joined by a space, as BEIR's
    ColBERT evaluations do); ``qrels[query_id][doc_id] = relevance`` (int, > 0 is relevant).
    """

    name: str
    doc_ids: list[str]
    doc_texts: list[str]
    query_ids: list[str] = field(default_factory=list)
    query_texts: list[str] = field(default_factory=list)
    qrels: dict[str, dict[str, int]] = field(default_factory=dict)


def _is_unicode(text: str) -> bool:
    """False for a str holding a lone surrogate (undecodable bytes read with surrogateescape, or
    a JSON \\udXXX escape): the tokenizer, UTF-8 output and the service cannot take it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _records(path: Path, skip_bad_lines: bool) -> Iterator[tuple[int, dict]]:
    """(line number, object) of every non-empty line of a JSONL file."""
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    # surrogateescape: a line that is not UTF-8 is one bad line (named, skippable), not an error
    # that ends the whole read.
    with path.open(encoding="utf-8", errors="surrogateescape") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                if not _is_unicode(line):
                    raise ValueError("not valid UTF-8")
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise ValueError(f"expected a JSON object, got {type(record).__name__}")
            except ValueError as exc:
                message = f"{path}:{number}: malformed JSON line ({exc})"
                if not skip_bad_lines:
                    raise DataError(message + "; --skip-bad-lines skips such lines") from None
                warnings.warn(message + "; skipped", stacklevel=3)
                continue
            yield number, record


def _text_record(path: Path, number: int, record: dict, with_title: bool) -> tuple[str, str]:
    doc_id = record.get("_id", record.get("id"))
    if doc_id is None or isinstance(doc_id, (dict, list, bool)):
        raise DataError(f"{path}:{number}: expected an '_id' (string or number)")
    text = record.get("text", "")
    title = record.get("title", "") if with_title else ""
    if not isinstance(text, str) or not isinstance(title, str):
        raise DataError(f"{path}:{number}: 'text' and 'title' must be strings")
    for name, value in (("_id", str(doc_id)), ("title", title), ("text", text)):
        if not _is_unicode(value):  # a JSON \udfff escape decodes to a lone surrogate
            raise DataError(f"{path}:{number}: '{name}' holds a lone surrogate: not valid Unicode text")
    return str(doc_id), f"{title} {text}".strip() if title else text


def read_texts(
    path: str | Path, skip_bad_lines: bool = False, with_title: bool = True
) -> tuple[list[str], list[str]]:
    """(ids, texts) of a corpus or queries file.

    ``.jsonl``: one object a line with ``_id`` (or ``id``), ``text`` and optional ``title``.
    Any other file: one text a line, ids "1", "2", … by line number (blank lines skipped).
    Duplicate ids raise DataError.
    """
    path = Path(path)
    ids: list[str] = []
    texts: list[str] = []
    if path.suffix == ".jsonl":
        for number, record in _records(path, skip_bad_lines):
            try:
                doc_id, text = _text_record(path, number, record, with_title)
            except DataError as exc:
                if not skip_bad_lines:
                    raise
                warnings.warn(f"{exc}; skipped", stacklevel=2)
                continue
            ids.append(doc_id)
            texts.append(text)
    else:
        if not path.is_file():
            raise DataError(f"{path}: no such file")
        with path.open(encoding="utf-8", errors="surrogateescape") as f:
            for number, line in enumerate(f, 1):
                if line.strip() and not _is_unicode(line):
                    message = f"{path}:{number}: not valid UTF-8"
                    if not skip_bad_lines:
                        raise DataError(message + "; --skip-bad-lines skips such lines")
                    warnings.warn(message + "; skipped", stacklevel=2)
                elif line.strip():
                    ids.append(str(number))
                    texts.append(line.rstrip("\n"))
    seen: set[str] = set()
    for doc_id in ids:
        if doc_id in seen:
            raise DataError(f"{path}: duplicate id {doc_id!r}")
        seen.add(doc_id)
    return ids, texts


def drop_empty(ids: list[str], texts: list[str], what: str = "documents") -> tuple[list[str], list[str]]:
    """The (ids, texts) whose text is not blank; one warning names the ones left out (an empty
    text has nothing to encode: BEIR corpora do hold a few, e.g. Cranfield's 471 and 995)."""
    keep = [i for i, t in enumerate(texts) if t.strip()]
    if len(keep) < len(texts):
        dropped = [ids[i] for i in range(len(texts)) if not texts[i].strip()]
        shown = ", ".join(dropped[:10]) + (" …" if len(dropped) > 10 else "")
        warnings.warn(f"{len(dropped)} empty {what} left out: {shown}", stacklevel=2)
    return [ids[i] for i in keep], [texts[i] for i in keep]


def read_qrels(path: str | Path) -> dict[str, dict[str, int]]:
    """qrels[query_id][doc_id] = relevance from a BEIR TSV (header query-id, corpus-id, score)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    qrels: dict[str, dict[str, int]] = {}
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            parts = line.rstrip("\n").split("\t")
            if (number == 1 and parts[0] == "query-id") or not line.strip():
                continue
            if len(parts) != 3:
                raise DataError(f"{path}:{number}: expected 3 tab-separated columns, got {len(parts)}")
            try:
                score = int(parts[2])
            except ValueError:
                raise DataError(f"{path}:{number}: score {parts[2]!r} is not an integer") from None
            qrels.setdefault(parts[0], {})[parts[1]] = score
    return qrels


def load_beir(directory: str | Path, split: str = "test", skip_bad_lines: bool = False) -> Collection:
    """The collection in a BEIR directory: corpus.jsonl, queries.jsonl, qrels/<split>.tsv.

    Only queries with judgements are kept (as BEIR evaluates); ``queries_<split>.jsonl`` is
    preferred over ``queries.jsonl`` where it exists.
    """
    root = Path(directory)
    if not root.is_dir():
        raise DataError(f"{root}: not a directory (expected corpus.jsonl, queries.jsonl, qrels/{split}.tsv)")
    doc_ids, doc_texts = drop_empty(*read_texts(root / "corpus.jsonl", skip_bad_lines))
    if not doc_ids:
        raise DataError(f"{root / 'corpus.jsonl'}: the corpus is empty")
    qrels = read_qrels(root / "qrels" / f"{split}.tsv")
    queries_file = root / f"queries_{split}.jsonl"
    if not queries_file.is_file():
        queries_file = root / "queries.jsonl"
    query_ids, query_texts = read_texts(queries_file, skip_bad_lines, with_title=False)
    query_ids, query_texts = drop_empty(query_ids, query_texts, "queries")
    kept = [(i, t) for i, t in zip(query_ids, query_texts, strict=True) if i in qrels]
    if not kept:
        raise DataError(f"{queries_file}: no query has judgements in qrels/{split}.tsv")
    return Collection(
        name=root.name,
        doc_ids=doc_ids,
        doc_texts=doc_texts,
        query_ids=[i for i, _ in kept],
        query_texts=[t for _, t in kept],
        qrels=qrels,
    )
