"""``edgeplaid.rerank``: late-interaction reranking of one query's candidate documents."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from edgeplaid import ops


def _as_model(model: Any) -> Any:
    if model is None:
        raise ValueError("model: texts need an encoder: pass a ColBERT or a model name/path")
    if isinstance(model, str):
        from edgeplaid.model import load_model

        return load_model(model)
    return model


def _documents_as_packed(documents: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens (n_tokens, dim), doc_offsets (n_docs + 1,) int64) from embeddings in any of the
    accepted forms: a list of (Ld_i, dim) arrays, or a pair (tokens, doclens)."""
    if isinstance(documents, tuple) and len(documents) == 2 and not isinstance(documents[0], str):
        tokens, doclens = (torch.as_tensor(x) for x in documents)
        if doclens.dim() != 1 or doclens.dtype.is_floating_point:
            raise ValueError("documents: expected (tokens (n_tokens, dim), doclens (n_docs,) int)")
        return tokens, ops.offsets_from_lengths(doclens)
    docs = [torch.as_tensor(d) for d in documents]
    for i, d in enumerate(docs):
        if d.dim() != 2:
            raise ValueError(f"documents[{i}]: expected a (doc_len, dim) array, got shape {tuple(d.shape)}")
    offsets = ops.offsets_from_lengths(torch.tensor([d.shape[0] for d in docs], dtype=torch.int64))
    return torch.cat(docs) if docs else torch.empty(0, 0), offsets


def rerank(
    query: str | Any,
    documents: Sequence[str] | Sequence[Any] | tuple[Any, Any],
    k: int | None = None,
    model: Any = None,
    query_mask: Any = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores ``documents`` against ``query`` by MaxSim and ranks them.

    score(d) = Σ_i max_j ⟨q_i, d_j⟩ over the query's (unmasked) tokens i and d's tokens j.

    Args:
        query: a text (encoded with ``model``), or query token vectors (Lq, dim) float.
        documents: texts (encoded with ``model``), or document token vectors: a list of
            (Ld_i, dim) float arrays, or a pair (tokens (n_tokens, dim), doclens (n_docs,) int).
        k: keep the best k (default: all).
        model: an :class:`edgeplaid.ColBERT` or a model name/path; required for texts.
        query_mask: (Lq,) bool for query vectors; None: every token counts.

    Returns:
        ``(scores (k,) float32, order (k,) int64)``: best first; ``order`` indexes ``documents``.

    Example:
        >>> import torch
        >>> q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
        >>> docs = [torch.tensor([[1.0, 0.0]]), torch.tensor([[0.6, 0.8], [0.0, 1.0]])]
        >>> scores, order = rerank(q, docs)
        >>> order.tolist(), [round(s, 2) for s in scores.tolist()]
        ([1, 0], [1.6, 1.0])
    """
    if isinstance(documents, str):
        raise ValueError("documents: expected a sequence of texts or of token-vector arrays, got one str")
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
        raise ValueError(f"k: expected a positive int or None, got {k!r}")
    n_docs = len(documents[1]) if isinstance(documents, tuple) and len(documents) == 2 else len(documents)
    if isinstance(query, str):
        encoder = _as_model(model)
        q, qmask = encoder.encode_queries([query])
    else:
        q = torch.as_tensor(query)
        if q.dim() != 2:
            raise ValueError(
                f"query: expected a text or a (query_len, dim) array, got shape {tuple(q.shape)}"
            )
        q = q[None]
        qmask = None if query_mask is None else torch.as_tensor(query_mask, dtype=torch.bool)[None]
    if n_docs == 0:
        return torch.empty(0, dtype=torch.float32), torch.empty(0, dtype=torch.int64)
    if all(isinstance(d, str) for d in documents):
        tokens, doclens = _as_model(model).encode_documents(list(documents))
        offsets = ops.offsets_from_lengths(doclens)
    else:
        tokens, offsets = _documents_as_packed(documents)
    q = q.to(tokens.device)
    candidates = torch.arange(n_docs, device=tokens.device)[None]
    scores = ops.maxsim_packed(q, tokens, offsets.to(tokens.device), candidates, qmask)[0].cpu()
    order = torch.argsort(scores, descending=True, stable=True)
    if k is not None:
        order = order[:k]
    return scores[order], order
