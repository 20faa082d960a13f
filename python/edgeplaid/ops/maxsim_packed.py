"""maxsim_packed: late-interaction scores against ragged documents packed back to back."""

from __future__ import annotations

from typing import Any

import torch

from edgeplaid.ops import _validate as v
from edgeplaid.ops import bundles as b
from edgeplaid.ops import cpp_backend as cpp
from edgeplaid.ops import reference, triton_backend
from edgeplaid.ops.dispatch import register, resolve


def maxsim_packed(
    queries: Any,
    doc_tokens: Any,
    doc_offsets: Any = None,
    candidates: Any = None,
    queries_mask: Any = None,
    backend: str | None = None,
) -> torch.Tensor:
    """score[q, c] = Σ_{valid i} max_{j in doc} ⟨queries[q, i], doc_tokens[j]⟩, doc = candidates[q, c].

    Args:
        queries: (nq, Lq, dim) float32, float16 or bfloat16.
        doc_tokens: (n_tokens, dim) float32, float16 or bfloat16; document n is
            doc_tokens[doc_offsets[n] : doc_offsets[n + 1]] (the index's native form).
        doc_offsets: (nd + 1,) int64, non-decreasing, from 0 to n_tokens.
        candidates: (nq, nc) int64, each query's own documents (reranking, PLAID's last
            stage); -1 is padding and scores -inf. None scores every document (nc = nd),
            reading each document once for all queries.
        queries_mask: (nq, Lq) bool, True = token counts; None = all.
        backend: "cpp", "triton" or "reference"; None picks by device.

    Bundles (:mod:`edgeplaid.ops.bundles`) are accepted in place of the tensors and not re-checked:
    ``queries`` a ``Queries`` (mask inside), ``doc_tokens`` a ``PackedDocs`` (offsets inside),
    ``candidates`` a ``Candidates``.

    Returns:
        (nq, nc) float32, fp32 accumulation. Empty documents score -inf; a query with no valid
        token scores 0. Non-finite inputs raise ValueError naming the argument (on CUDA tensors
        the data is not read on the host: a document holding NaN or inf scores NaN there).
    """
    q = b.queries(queries, queries_mask)
    docs = b.packed_docs(doc_tokens, doc_offsets, dim=q.shape[2], device=q.device)
    cand = b.candidates(candidates, q.shape[0], docs.n_docs, q.device)
    out = resolve("maxsim_packed", q.device, backend)(q, docs, cand)
    return v.check_finite_scores(out, "doc_tokens")


def _reference(q: b.Queries, docs: b.PackedDocs, cand: b.Candidates | None) -> torch.Tensor:
    return reference.maxsim_packed(q.data, docs.tokens, docs.offsets, b.ids_of(cand), q.mask)


def _cpp(q: b.Queries, docs: b.PackedDocs, cand: b.Candidates | None) -> torch.Tensor:
    out = cpp.C.maxsim_packed(
        cpp.host_queries(q.data),
        cpp.host(q.mask),
        cpp.host(docs.tokens),
        cpp.dtype_name(docs.tokens),
        cpp.host(docs.offsets),
        cpp.host(b.ids_of(cand)),
    )
    return torch.from_numpy(out)


def _triton(q: b.Queries, docs: b.PackedDocs, cand: b.Candidates | None) -> torch.Tensor:
    return triton_backend.call("maxsim_packed", q.data, docs.tokens, docs.offsets, b.ids_of(cand), q.mask)


register("maxsim_packed", "reference", _reference)
register("maxsim_packed", "cpp", _cpp)
register("maxsim_packed", "triton", _triton)
