"""maxsim_packed: late-interaction scores against ragged documents packed back to back."""

from __future__ import annotations

from typing import Any

import torch

from edgeplaid.ops import _validate as v
from edgeplaid.ops import cpp_backend, reference, triton_backend
from edgeplaid.ops.dispatch import register, resolve


def maxsim_packed(
    queries: Any,
    doc_tokens: Any,
    doc_offsets: Any,
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

    Returns:
        (nq, nc) float32, fp32 accumulation. Empty documents score -inf; a query with no valid
        token scores 0.
    """
    q = v.queries(queries)
    nq, lq, dim = q.shape
    tokens = v.float_tensor(doc_tokens, "doc_tokens", 2, "(n_tokens, dim)")
    v.check_size(tokens, "doc_tokens", 1, dim, "dim of queries")
    v.check_device("doc_tokens", tokens, q.device)
    offsets = v.offsets(doc_offsets, tokens.shape[0], q.device)
    cand = v.candidates(candidates, nq, offsets.shape[0] - 1, q.device)
    qm = v.mask(queries_mask, "queries_mask", nq, lq, q.device)
    return resolve("maxsim_packed", q.device, backend)(q, tokens, offsets, cand, qm)


register("maxsim_packed", "reference", reference.maxsim_packed)
register("maxsim_packed", "cpp", cpp_backend.maxsim_packed)
register("maxsim_packed", "triton", triton_backend.maxsim_packed)
