"""Lexical (BM25) retrieval over one index version's tantivy index (see
:mod:`edgeplaid.index._lexical` for the layout and the scoring formula).

A query text is analysed with the index's analyzer and becomes a disjunction of its terms (a
bag of words: no query syntax, so a user's ``-``, ``:`` or quotes are just separators).
Documents are named by their lexical keys (int64); the caller maps keys to positions.
"""

from __future__ import annotations

from typing import Any

import numpy as np

# An allowed set up to this many keys is handed to tantivy as a term set (exact, O(set) per
# query); a larger one is applied to an over-fetched result (see LexicalSearcher.search).
TERM_SET_MAX = 1 << 16
# Up to this many keys, a disjunction of term queries rather than tantivy's TermSetQuery, whose
# set costs 0.2 ms to make even for 20 keys (hybrid search scores ~20 documents per query: 0.10
# ms in all this way, 0.31 ms with the term set; SciFact, this machine).
FEW_KEYS = 256


class LexicalSearcher:
    """BM25 retrieval and scoring of one tantivy searcher (one index version; thread-safe)."""

    def __init__(self, index: Any, searcher: Any, analyzer: Any, store_texts: bool) -> None:
        self.index = index
        self.searcher = searcher
        self.analyzer = analyzer
        self.store_texts = store_texts
        self.schema = index.schema

    @property
    def n_docs(self) -> int:
        return int(self.searcher.num_docs)

    def terms(self, text: str) -> list[str]:
        """The analysed terms of ``text`` (repeats kept: a term twice in the query counts twice)."""
        return list(self.analyzer.analyze(text))

    def _text_query(self, text: str) -> Any:
        from tantivy import Occur, Query

        terms = self.terms(text)
        if not terms:
            return None
        return Query.boolean_query([(Occur.Should, Query.term_query(self.schema, "text", t)) for t in terms])

    def _restricted(self, query: Any, keys: np.ndarray) -> Any:
        from tantivy import Occur, Query

        if keys.shape[0] <= FEW_KEYS:
            terms = [(Occur.Should, Query.term_query(self.schema, "key", k)) for k in keys.tolist()]
            keyset = Query.boolean_query(terms)
        else:
            keyset = Query.term_set_query(self.schema, "key", keys.tolist())
        allowed = Query.const_score_query(keyset, 0.0)
        return Query.boolean_query([(Occur.Must, allowed), (Occur.Must, query)])

    def _run(self, query: Any, limit: int) -> tuple[np.ndarray, np.ndarray, int]:
        hits = self.searcher.search(query, limit, count=False).hits
        if not hits:
            return np.zeros(0, np.int64), np.zeros(0, np.float32), 0
        keys = np.asarray(self.searcher.fast_field_values("key", [a for _, a in hits]), dtype=np.int64)
        scores = np.asarray([s for s, _ in hits], dtype=np.float32)
        return keys, scores, len(hits)

    def count(self, keys: np.ndarray) -> int:
        """How many documents of this version have one of ``keys`` (n,) int64."""
        from tantivy import Query

        if keys.shape[0] == 0:
            return 0
        q = Query.term_set_query(self.schema, "key", keys.tolist())
        return int(self.searcher.search(q, 1, count=True).count)

    def search(
        self, text: str, depth: int, allowed: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """The ``depth`` best documents for ``text``: (keys (n,) int64, BM25 scores (n,) float32),
        best first, n <= depth; only documents matching a term (score > 0).

        ``allowed``: sorted unique keys the result must come from (None: any). Up to
        :data:`TERM_SET_MAX` of them restrict tantivy's search itself; a larger set filters a
        result fetched ``ceil(2 * n_docs / len(allowed))`` times deeper, and only when that comes
        back short while more matched does the search run again with the whole set."""
        q = self._text_query(text)
        if q is None or depth < 1 or (allowed is not None and allowed.shape[0] == 0):
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        if allowed is None:
            keys, scores, _ = self._run(q, depth)
            return keys, scores
        if allowed.shape[0] > TERM_SET_MAX:
            limit = depth * -(-2 * max(self.n_docs, 1) // allowed.shape[0])
            keys, scores, got = self._run(q, limit)
            at = np.minimum(np.searchsorted(allowed, keys), allowed.shape[0] - 1)
            keep = allowed[at] == keys
            if int(keep.sum()) >= depth or got < limit:
                return keys[keep][:depth], scores[keep][:depth]
        keys, scores, _ = self._run(self._restricted(q, allowed), depth)
        return keys, scores

    def score(self, text: str, keys: np.ndarray) -> np.ndarray:
        """BM25 scores of the documents ``keys`` (n,) int64 for ``text``: (n,) float32, 0 for a
        document matching no term (or not in the index)."""
        out = np.zeros(keys.shape[0], dtype=np.float32)
        q = self._text_query(text)
        if q is None or keys.shape[0] == 0:
            return out
        u = np.sort(keys)  # sorted unique keys; np.unique's hashing costs more at these sizes
        u = u[np.concatenate(([True], u[1:] != u[:-1]))]
        got_k, got_s, _ = self._run(self._restricted(q, u), keys.shape[0])
        if got_k.shape[0]:
            order = np.argsort(got_k)
            sk = got_k[order]
            at = np.minimum(np.searchsorted(sk, keys), sk.shape[0] - 1)
            hit = sk[at] == keys
            out[hit] = got_s[order][at[hit]]
        return out

    def texts(self, keys: np.ndarray) -> list[str | None]:
        """The stored texts of the documents ``keys`` (None where absent); ValueError when the
        index was built with ``store_texts=False``."""
        from tantivy import Query

        if not self.store_texts:
            raise ValueError("texts: this index does not store its documents' texts (store_texts=False)")
        out: list[str | None] = []
        for k in keys.tolist():
            hits = self.searcher.search(Query.term_query(self.schema, "key", int(k)), 1, count=False).hits
            out.append(self.searcher.doc(hits[0][1])["text"][0] if hits else None)
        return out
