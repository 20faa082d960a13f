"""maxsim: late-interaction scores of padded queries against padded documents."""

from __future__ import annotations

from typing import Any

import torch

from edgeplaid.ops import _validate as v
from edgeplaid.ops import cpp_backend as cpp
from edgeplaid.ops import reference, triton_backend
from edgeplaid.ops.dispatch import register, resolve


def maxsim(
    queries: Any,
    documents: Any,
    queries_mask: Any = None,
    documents_mask: Any = None,
    backend: str | None = None,
) -> torch.Tensor:
    """score[q, n] = Σ_{valid i} max_{valid j} ⟨queries[q, i], documents[n, j]⟩.

    Args:
        queries: (nq, Lq, dim) float32, float16 or bfloat16.
        documents: (nd, Ld, dim) float32, float16 or bfloat16 (may differ from queries).
        queries_mask: (nq, Lq) bool, True = token counts; None = all.
        documents_mask: (nd, Ld) bool, True = token counts; None = all.
        backend: "cpp", "triton" or "reference"; None picks by device (see ops.dispatch).

    Returns:
        (nq, nd) float32. Accumulation is fp32; half inputs are widened exactly. A document
        with no valid token scores -inf; a query with no valid token scores 0. Non-finite
        inputs raise ValueError naming the argument (CUDA tensors are not read on the host: a
        document holding NaN or inf scores NaN there).
    """
    q = v.queries(queries)
    nq, lq, dim = q.shape
    d = v.float_tensor(documents, "documents", 3, "(n_docs, doc_len, dim)")
    v.check_size(d, "documents", 2, dim, "dim of queries")
    v.check_device("documents", d, q.device)
    qm = v.mask(queries_mask, "queries_mask", nq, lq, q.device)
    dm = v.mask(documents_mask, "documents_mask", d.shape[0], d.shape[1], q.device)
    return v.check_finite_scores(resolve("maxsim", q.device, backend)(q, d, qm, dm), "documents")


Mask = torch.Tensor | None


def _cpp(q: torch.Tensor, d: torch.Tensor, qm: Mask, dm: Mask) -> torch.Tensor:
    out = cpp.C.maxsim_padded(cpp.host_queries(q), cpp.host(qm), cpp.host(d), cpp.dtype_name(d), cpp.host(dm))
    return torch.from_numpy(out)


def _triton(q: torch.Tensor, d: torch.Tensor, qm: Mask, dm: Mask) -> torch.Tensor:
    return triton_backend.call("maxsim", q, d, qm, dm)


register("maxsim", "reference", reference.maxsim)
register("maxsim", "cpp", _cpp)
register("maxsim", "triton", _triton)
