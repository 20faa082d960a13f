"""The lexical side of an index: BM25 over the documents' texts by tantivy, in the same version
directory as the vectors, so the two sides never disagree.

Layout: ``<version>/lexical/`` is a tantivy index (``meta.json``, ``.managed.json``, each
tantivy segment's files) holding one tantivy document per live document: ``key`` (i64, indexed
and fast) and ``text`` (analysed; stored unless ``store_texts=False``). The key is the
document's id for int ids (and for an index whose ids are its positions: those never move while
they are the ids), and a 63-bit hash of the UTF-8 id for str ids (:func:`str_key`). Keys are
stable across compaction and merges, where positions are not, so those changes leave the
lexical files untouched.

Manifest entry ``"lexical"``: ``{"analyzer": "plain"|"english", "store_texts": bool, "key":
"id"|"blake2b63", "n_docs": live documents, "files": {name: {"nbytes", "checksum"}}}``; the
files are checked like the arrays (regular, the recorded size at every load, the checksum by
the verify policy).

Each change writes the new version's lexical directory as hard links to the previous version's
files plus what tantivy writes for the change. tantivy never modifies a file in place (segment
files are written once, ``meta.json`` and ``.managed.json`` are replaced by rename, deletions go
to new ``.del`` files), so the previous version, which readers may still map, stays intact.

Scoring is tantivy's BM25: k1 = 1.2, b = 0.75, idf(t) = ln(1 + (N - n_t + 0.5) / (n_t + 0.5)),
score(d) = sum over query terms t of idf(t) * tf * (k1 + 1) / (tf + k1 * (1 - b + b * len(d) /
avg_len)), where N, n_t and avg_len count deleted documents until tantivy merges their segment
(as Lucene does), and len(d) is kept in tantivy's one-byte length code (exact below 40 tokens).
"""

from __future__ import annotations

import hashlib
import os
import stat
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgeplaid.index._storage import IndexFormatError, file_checksum

if TYPE_CHECKING:
    from edgeplaid.index._storage import IndexWriter, Manifest
    from edgeplaid.search._lexical import LexicalSearcher

LEXICAL_DIR = "lexical"
# "plain": tantivy's default analysis (split on anything not a letter or digit, tokens of 40
# bytes or more dropped, lowercased), what the collections' reference BM25 figures use (SciFact: BEIR's
# 0.665; Cranfield: 0.311). "english": the same plus the Snowball English stemmer (tantivy's
# en_stem): +0.03 nDCG@10 on both collections here (benchmarks/results/hybrid.csv).
ANALYZERS = ("plain", "english")
DEFAULT_ANALYZER = "plain"
_LOCKS = (".tantivy-meta.lock", ".tantivy-writer.lock")
_WRITER_HEAP = 64 << 20  # tantivy's indexing buffer: flushed into a segment when full


def analyzer(name: str) -> Any:
    """The tantivy TextAnalyzer of ``name`` (one of :data:`ANALYZERS`)."""
    from tantivy import Filter, TextAnalyzerBuilder, Tokenizer

    if name not in ANALYZERS:
        raise ValueError(f"analyzer: expected one of {', '.join(ANALYZERS)}, got {name!r}")
    b = TextAnalyzerBuilder(Tokenizer.simple()).filter(Filter.remove_long(40)).filter(Filter.lowercase())
    if name == "english":
        b = b.filter(Filter.stemmer("english"))
    return b.build()


def _tokenizer_name(name: str) -> str:
    return f"edgeplaid-{name}"


def _schema(analyzer_name: str, store_texts: bool) -> Any:
    import tantivy

    sb = tantivy.SchemaBuilder()
    # Frequencies, no positions: BM25 needs term frequencies only (no phrase queries).
    sb.add_text_field(
        "text", stored=store_texts, tokenizer_name=_tokenizer_name(analyzer_name), index_option="freq"
    )
    sb.add_integer_field("key", stored=False, indexed=True, fast=True)
    return sb.build()


def _open_tantivy(directory: str, analyzer_name: str) -> Any:
    import tantivy

    idx = tantivy.Index.open(directory)
    idx.register_tokenizer(_tokenizer_name(analyzer_name), analyzer(analyzer_name))
    return idx


# ---------------------------------------------------------------------------- keys and texts


def str_key(user_id: str) -> int:
    """The lexical key of a str id: the first 8 bytes of its blake2b digest (UTF-8), little
    endian, shifted right by one (a non-negative int64). Stable across machines and versions."""
    d = hashlib.blake2b(user_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(d, "little") >> 1


def keys_of_ids(ids: Sequence[Any] | np.ndarray, id_kind: str) -> np.ndarray:
    """(n,) int64 lexical keys of user ids of an index whose ids are ``id_kind``."""
    if id_kind == "str":
        return np.fromiter((str_key(u) for u in ids), np.int64, len(ids))
    return np.asarray(ids, dtype=np.int64).reshape(-1)


def check_text(text: Any, name: str) -> str:
    """``text`` if it is a str tantivy can take (valid UTF-8: no lone surrogate); ValueError
    naming ``name`` otherwise."""
    if not isinstance(text, str):
        raise ValueError(f"{name}: expected str, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{name}: not valid UTF-8 (a lone surrogate)") from None
    return text


def check_texts(texts: Any, n_docs: int | None) -> list[str]:
    """``texts`` as a list of n_docs str (None: any count); ValueError naming what is wrong."""
    if hasattr(texts, "tolist") and not isinstance(texts, (str, bytes)):
        texts = texts.tolist()  # numpy arrays, pandas Series
    if isinstance(texts, (str, bytes)) or not isinstance(texts, Sequence):
        raise ValueError(f"texts: expected a sequence of str (one per document), got {type(texts).__name__}")
    if n_docs is not None and len(texts) != n_docs:
        raise ValueError(f"texts: expected one text per document ({n_docs}), got {len(texts)}")
    out = list(texts)
    for i, t in enumerate(out):
        check_text(t, f"texts[{i}]")
    return out


def check_new_keys(keys: np.ndarray, existing: np.ndarray | None, ids: Sequence[Any]) -> None:
    """Two str ids whose 63-bit keys collide are refused rather than mixed up: ValueError naming
    them (the birthday bound n^2 / 2^64: about 5e-6 for 10 million ids, 5e-4 for 100 million;
    past that, int ids avoid it). ``existing``: sorted keys of the documents that stay."""
    order = np.argsort(keys, kind="stable")
    sk = keys[order]
    dup = np.flatnonzero(sk[1:] == sk[:-1])
    if dup.shape[0]:
        a, b = int(order[dup[0]]), int(order[dup[0] + 1])
        raise ValueError(f"ids: {ids[a]!r} and {ids[b]!r} share a lexical key (a 63-bit hash); rename one")
    if existing is not None and existing.shape[0] and keys.shape[0]:
        at = np.minimum(np.searchsorted(existing, keys), existing.shape[0] - 1)
        hit = np.flatnonzero(existing[at] == keys)
        if hit.shape[0]:
            raise ValueError(
                f"ids: {ids[int(hit[0])]!r} shares a lexical key (a 63-bit hash) with a document of "
                "the index; rename it"
            )


# ---------------------------------------------------------------------------- writing


def write_lexical(
    w: IndexWriter,
    previous: Manifest | None,
    *,
    analyzer_name: str,
    store_texts: bool,
    key_kind: str,
    add_keys: np.ndarray,
    add_texts: list[str],
    delete_keys: np.ndarray,
    n_docs: int,
) -> dict[str, Any]:
    """Writes the lexical directory of the version ``w`` writes: the previous version's (hard
    links; None: a new one) with ``delete_keys`` removed and ``add_keys``/``add_texts`` added,
    committed by tantivy; returns its manifest entry (``n_docs``: live documents after)."""
    import tantivy

    dst = w.path(LEXICAL_DIR)
    dst.mkdir()
    prev = None if previous is None else previous.get("lexical")
    reuse: dict[str, dict[str, Any]] = {}
    if prev is not None:
        _link_previous(dst, previous, prev["files"])  # type: ignore[arg-type]
        reuse = {name: {**e, "ino": os.stat(dst / name).st_ino} for name, e in prev["files"].items()}
        idx = _open_tantivy(str(dst), analyzer_name)
    else:
        idx = tantivy.Index(_schema(analyzer_name, store_texts), path=str(dst))
        idx.register_tokenizer(_tokenizer_name(analyzer_name), analyzer(analyzer_name))
    writer = idx.writer(heap_size=_WRITER_HEAP, num_threads=1)
    for k in delete_keys.tolist():
        writer.delete_documents_by_term("key", k)
    for k, t in zip(add_keys.tolist(), add_texts, strict=True):
        writer.add_document(tantivy.Document(key=k, text=t))
    writer.commit()
    writer.wait_merging_threads()  # merges tantivy started finish here, not in a later version
    gc = idx.writer(heap_size=_WRITER_HEAP, num_threads=1)
    gc.garbage_collect_files()  # files of merged-away segments: not part of this version
    del gc, writer
    idx.reload()
    if idx.searcher().num_docs != n_docs:  # never commit what a load would refuse
        raise RuntimeError(
            f"edgeplaid bug: the lexical side would hold {idx.searcher().num_docs} documents, "
            f"the index {n_docs}"
        )
    del idx
    files: dict[str, dict[str, Any]] = {}
    for name in sorted(os.listdir(dst)):
        if name in _LOCKS:
            continue
        st = os.stat(dst / name, follow_symlinks=False)
        if not stat.S_ISREG(st.st_mode):
            raise RuntimeError(
                f"edgeplaid bug: tantivy left {name} in the lexical directory"
            )  # pragma: no cover
        old = reuse.get(name)
        if old is not None and old["ino"] == st.st_ino:  # a link to a checked file: not re-read
            files[name] = {"nbytes": old["nbytes"], "checksum": old["checksum"]}
            continue
        with open(dst / name, "rb") as f:
            os.fsync(f.fileno())
            files[name] = {"nbytes": st.st_size, "checksum": file_checksum(f)}
    fd = os.open(dst, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return {
        "analyzer": analyzer_name,
        "store_texts": bool(store_texts),
        "key": "blake2b63" if key_kind == "str" else "id",
        "n_docs": int(n_docs),
        "files": files,
    }


def link_lexical(w: IndexWriter, previous: Manifest) -> dict[str, Any] | None:
    """The previous version's lexical directory, unchanged, into the version ``w`` writes (hard
    links); returns its entry (None without one)."""
    prev = previous.get("lexical")
    if prev is None:
        return None
    dst = w.path(LEXICAL_DIR)
    dst.mkdir()
    _link_previous(dst, previous, prev["files"], _LOCKS)
    return prev


def _link_previous(dst: Path, previous: Manifest, names: Any, optional: tuple[str, ...] = ()) -> None:
    """Hard-links the files ``names`` (and ``optional`` ones, where present) of the previous
    version's lexical directory into ``dst``."""
    src_fd = os.open(LEXICAL_DIR, os.O_RDONLY | os.O_DIRECTORY, dir_fd=previous.dir.fd)  # type: ignore[attr-defined]
    try:
        for name in [*names, *optional]:
            try:
                os.link(name, dst / name, src_dir_fd=src_fd, follow_symlinks=False)
            except FileNotFoundError:
                if name not in optional:
                    raise
    finally:
        os.close(src_fd)


# ---------------------------------------------------------------------------- reading


_ENTRY_KEYS = {"analyzer", "store_texts", "key", "n_docs", "files"}


def validate_entry(e: Any, where: str, n_live: int, id_kind: str) -> None:
    """The manifest's ``lexical`` entry against its schema (no file read)."""
    if not isinstance(e, dict) or set(e) != _ENTRY_KEYS:
        raise IndexFormatError(f"{where}: lexical must have exactly the keys {sorted(_ENTRY_KEYS)}")
    if e["key"] != ("blake2b63" if id_kind == "str" else "id"):
        raise IndexFormatError(f"{where}: lexical: key {e['key']!r} does not fit {id_kind} ids")
    if (
        e["analyzer"] not in ANALYZERS
        or type(e["store_texts"]) is not bool
        or e["key"] not in ("id", "blake2b63")
    ):
        raise IndexFormatError(f"{where}: lexical: bad analyzer, store_texts or key")
    if type(e["n_docs"]) is not int or e["n_docs"] != n_live:
        raise IndexFormatError(
            f"{where}: lexical holds {e['n_docs']!r} documents, the index {n_live} live ones"
        )
    files = e["files"]
    if not isinstance(files, dict) or "meta.json" not in files or len(files) > 100_000:
        raise IndexFormatError(f"{where}: lexical: files must be an object naming meta.json")
    for name, f in files.items():
        if (
            not isinstance(name, str)
            or not 0 < len(name) <= 100
            or name in (".", "..")
            or "/" in name
            or "\0" in name
            or name in _LOCKS
        ):
            raise IndexFormatError(f"{where}: lexical: {name!r} is not a plain file name")
        if (
            not isinstance(f, dict)
            or set(f) != {"nbytes", "checksum"}
            or type(f["nbytes"]) is not int
            or f["nbytes"] < 0
        ):
            raise IndexFormatError(f"{where}: lexical: {name}: expected {{nbytes, checksum}}")
        if not isinstance(f["checksum"], str) or ":" not in f["checksum"]:
            raise IndexFormatError(f"{where}: lexical: {name}: bad checksum")


def lexical_bytes(m: dict[str, Any]) -> int:
    e = m.get("lexical")
    return 0 if e is None else sum(int(f["nbytes"]) for f in e["files"].values())


def check_lexical_files(path: Path, m: Manifest, hash: bool) -> None:
    """Every file the manifest lists for the lexical side is a regular file (no symlink) of the
    recorded size, and with ``hash`` of the recorded checksum; IndexFormatError otherwise."""
    e = m.get("lexical")
    if e is None:
        return
    try:
        dfd = os.open(LEXICAL_DIR, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=m.dir.fd)  # type: ignore[attr-defined]
    except OSError as err:
        raise IndexFormatError(f"{path}: cannot open the lexical directory ({err.strerror})") from err
    try:
        # tantivy opens its files by name and follows links: nothing but the listed files and
        # its two (regular) lock files may be in the directory.
        for name in os.listdir(dfd):
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
            if name not in e["files"] and (name not in _LOCKS or not stat.S_ISREG(st.st_mode)):
                raise IndexFormatError(f"{path}: lexical/{name}: not a file of this version (refused)")
        for name, f in e["files"].items():
            try:
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dfd)
            except OSError as err:
                raise IndexFormatError(f"{path}: lexical/{name}: cannot open ({err.strerror})") from err
            with os.fdopen(fd, "rb") as fh:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode) or st.st_size != f["nbytes"]:
                    raise IndexFormatError(
                        f"{path}: lexical/{name} is not a regular file of {f['nbytes']} bytes: "
                        "the index is corrupt"
                    )
                if hash and file_checksum(fh, f["checksum"].partition(":")[0]) != f["checksum"]:
                    raise IndexFormatError(
                        f"{path}: checksum mismatch in lexical/{name}: the index is corrupt"
                    )
    finally:
        os.close(dfd)


def open_lexical(path: Path, m: Manifest) -> LexicalSearcher | None:
    """The lexical searcher of the version ``m`` was read from (None without a lexical side).

    tantivy opens files by path (it even resolves the ``/proc/self/fd`` link it is given to the
    directory's name): once the searcher holds its files, the directory is checked to be still
    the one at the index's path; otherwise IndexFormatError (a load starts again on the new
    version). tantivy's reader takes a lock file in the directory (opened for writing): an index
    in a read-only place loads without its lexical side, with a warning."""
    from edgeplaid.search._lexical import LexicalSearcher

    e = m.get("lexical")
    if e is None:
        return None
    base = f"/proc/self/fd/{m.dir.fd}" if os.path.isdir("/proc/self/fd") else str(path)  # type: ignore[attr-defined]
    try:
        idx = _open_tantivy(f"{base}/{LEXICAL_DIR}", e["analyzer"])
        idx.config_reader(reload_policy="manual", num_warmers=0)
        searcher = idx.searcher()
    except (ValueError, OSError) as err:
        if "Lockfile" in str(err) and not os.access(f"{base}/{LEXICAL_DIR}", os.W_OK):
            warnings.warn(
                f"edgeplaid: {path}: the lexical (BM25) side cannot be opened read-only (tantivy "
                "takes a lock file there): loaded without it; lexical and hybrid search need write access",
                stacklevel=4,
            )
            return None
        raise IndexFormatError(f"{path}: cannot open the lexical index of this version ({err})") from err
    if m.dir.removed():  # type: ignore[attr-defined]
        raise IndexFormatError(f"{path}: the index was replaced while its lexical side was opened")
    if searcher.num_docs != e["n_docs"]:
        raise IndexFormatError(
            f"{path}: the lexical index holds {searcher.num_docs} documents, the manifest says "
            f"{e['n_docs']}: "
            "the index is corrupt"
        )
    return LexicalSearcher(idx, searcher, analyzer(e["analyzer"]), e["store_texts"])
