"""``edgeplaid.rerank``: late-interaction reranking of one query's candidate documents.

Everything stays on one device: texts are encoded on the model's device, token vectors are
scored where they are (CUDA tensors by the Triton kernels, CPU tensors by the C++ ones), and
the ranking comes back on that device. Inputs on two devices are an error, never a silent copy.
"""

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


def _check_same_device(name: str, t: torch.Tensor, other: str, device: torch.device) -> None:
    if t.device != device:
        raise ValueError(
            f"{name} is on {t.device} but {other} on {device}: put both on one device (.to(device))"
        )


def _documents_as_packed(documents: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens (n_tokens, dim), doc_offsets (n_docs + 1,) int64), both on the tokens' device, from
    embeddings in any of the accepted forms: a list of (Ld_i, dim) arrays on one device, or a
    pair (tokens, doclens) (doclens may sit on the host: they are a few integers)."""
    if isinstance(documents, tuple) and len(documents) == 2 and not isinstance(documents[0], str):
        tokens, doclens = (torch.as_tensor(x) for x in documents)
        if tokens.dim() != 2:
            raise ValueError(f"documents: expected tokens (n_tokens, dim), got shape {tuple(tokens.shape)}")
        if doclens.dim() != 1 or doclens.dtype.is_floating_point:
            raise ValueError("documents: expected (tokens (n_tokens, dim), doclens (n_docs,) int)")
        return tokens, ops.offsets_from_lengths(doclens, device=tokens.device)
    docs = [torch.as_tensor(d) for d in documents]
    for i, d in enumerate(docs):
        if d.dim() != 2:
            raise ValueError(f"documents[{i}]: expected a (doc_len, dim) array, got shape {tuple(d.shape)}")
        _check_same_device(f"documents[{i}]", d, "documents[0]", docs[0].device)
        if d.shape[1] != docs[0].shape[1]:
            raise ValueError(f"documents[{i}]: dim {d.shape[1]}, but documents[0] has dim {docs[0].shape[1]}")
    device = docs[0].device
    offsets = ops.offsets_from_lengths([d.shape[0] for d in docs], device=device)
    return torch.cat(docs), offsets


def rerank(
    query: str | Any,
    documents: Sequence[str] | Sequence[Any] | tuple[Any, Any],
    k: int | None = None,
    model: Any = None,
    query_mask: Any = None,
    *,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores ``documents`` against ``query`` by MaxSim and ranks them.

    score(d) = Σ_i max_j ⟨q_i, d_j⟩ over the query's (unmasked) tokens i and d's tokens j.
    Texts and precomputed embeddings mix freely (a text query against embedded documents, or
    the reverse), as long as everything ends up on one device.

    Args:
        query: a text (encoded with ``model``), or query token vectors (Lq, dim)
            float32/float16/bfloat16.
        documents: texts (encoded with ``model``), or document token vectors: a list of
            (Ld_i, dim) float arrays, or a pair (tokens (n_tokens, dim), doclens (n_docs,) int).
        k: keep the best k (default: all).
        model: an :class:`edgeplaid.ColBERT` or a model name/path; required for texts.
        query_mask: (Lq,) bool for query vectors; None: every token counts.
        backend: ``"cpp"``, ``"triton"`` or ``"reference"`` for the scoring; None: by device.

    Returns:
        ``(scores (k,) float32, order (k,) int64)``, on the device the scoring ran on (the
        model's for texts, the vectors' otherwise): best first, ties in input order; ``order``
        indexes ``documents``. Empty documents score -inf.

    Raises:
        ValueError: bad shapes, or query and documents on different devices.

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
    pair = isinstance(documents, tuple) and len(documents) == 2 and not isinstance(documents[0], str)
    n_docs = len(documents[1]) if pair else len(documents)
    doc_texts = not pair and n_docs > 0 and all(isinstance(d, str) for d in documents)
    if not pair and not doc_texts and any(isinstance(d, str) for d in documents):
        raise ValueError("documents: expected all texts or all token-vector arrays, got a mix")
    # Loaded once, even when both the query and the documents are texts.
    encoder = _as_model(model) if isinstance(query, str) or doc_texts else None

    if isinstance(query, str):
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
        return torch.empty(0, dtype=torch.float32, device=q.device), torch.empty(
            0, dtype=torch.int64, device=q.device
        )
    if doc_texts:
        tokens, doclens = encoder.encode_documents(list(documents))
        offsets = ops.offsets_from_lengths(doclens)  # on the model's device, like the tokens
    else:
        tokens, offsets = _documents_as_packed(documents)
    _check_same_device("query", q, "documents", tokens.device)
    if qmask is not None:
        _check_same_device("query_mask", qmask, "query", q.device)
    candidates = torch.arange(n_docs, device=tokens.device)[None]
    scores = ops.maxsim_packed(q, tokens, offsets, candidates, qmask, backend=backend)[0]
    scores, order = torch.sort(scores, descending=True, stable=True)
    return scores[:k], order[:k]
