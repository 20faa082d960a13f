"""fused_decompress_maxsim: MaxSim straight from PLAID's compressed form."""

from __future__ import annotations

from typing import Any

import torch

from edgeplaid.ops import _validate as v
from edgeplaid.ops import bundles as b
from edgeplaid.ops import cpp_backend as cpp
from edgeplaid.ops import reference, triton_backend
from edgeplaid.ops.bundles import PRECISIONS  # noqa: F401  (re-exported: the one definition is in bundles)
from edgeplaid.ops.centroid_scores import centroid_scores as _centroid_scores
from edgeplaid.ops.dispatch import implements, register, resolve


def fused_decompress_maxsim(
    queries: Any,
    codes: Any,
    residuals: Any = None,
    doc_offsets: Any = None,
    candidates: Any = None,
    centroids: Any = None,
    bucket_weights: Any = None,
    nbits: int | None = None,
    queries_mask: Any = None,
    backend: str | None = None,
    *,
    centroid_scores: Any = None,
    inv_norm: Any = None,
    precision: str = "exact",
) -> torch.Tensor:
    """maxsim_packed(queries, decompress_residuals(codes, residuals, ...), doc_offsets, candidates).

    score[q, c] = Σ_{valid i} max_{t in doc} ⟨queries[q, i], token[t]⟩ with
    token[t] = normalize(centroids[codes[t]] + r_t), r_t[d] = bucket_weights[b_td] (bit order:
    decompress_residuals), normalize(x) = x · inv_norm, inv_norm = 1 / max(‖x‖₂, 1e-12), as
    colbert-ai's ResidualCodec.decompress. The documents never exist in memory.

    Two ways to compute it:

    * Decoding (``precision="exact"`` without ``centroid_scores``/``inv_norm``): each candidate is
      decoded to fp32 tokens in an on-chip tile and scored there.
    * From the codes (``centroid_scores`` or ``inv_norm`` given, or ``precision="int8"``). By
      linearity, ``⟨q, token[t]⟩ = (⟨q, centroids[codes[t]]⟩ + Σ_d q[d] · bucket_weights[b_td]) ·
      inv_norm[t]``: the first term is ``centroid_scores[q, i, codes[t]]``, which PLAID's stage 1
      already computed; the second reads only the residual codes; ``inv_norm`` is stored by the
      index. No centroid is read and nothing is normalised at search time.
      ``precision="exact"`` evaluates it in fp32 (equal to decoding within fp32 rounding).
      ``precision="int8"`` evaluates the residual term in integers: each query token quantised to
      int8 with its own scale (qscale_i = max_d |q_id| / 127), the bucket weights to 7-bit levels
      (wscale = max |w| / 63), ``s = fma(Σ_d qq_id · level[b_td], qscale_i · wscale,
      centroid_scores[q, i, code_t]) · inv_norm[t]``. Every CPU ISA (AVX-512 VNNI, AVX-512BW,
      AVX2, scalar) returns the same scores bit for bit. The centroid term stays fp32, so the
      error is that of the residual term only (~1e-4 of a token score on 48-dim SciFact).
      Missing ``centroid_scores`` are computed here (``Q · Cᵀ``: prefer passing stage 1's);
      missing ``inv_norm`` too (:func:`residual_inv_norms`: prefer the index's).

    Args:
        queries: (nq, Lq, dim) float32, float16 or bfloat16.
        codes: (n_tokens,) uint16, int32 or int64; residuals: (n_tokens, dim * nbits / 8) uint8.
        doc_offsets: (nd + 1,) int64, non-decreasing, from 0 to n_tokens.
        candidates: (nq, nc) int64 (-1 = padding, scores -inf) or None for every document.
        centroids: (C, dim) float32, float16 or bfloat16; bucket_weights: (2**nbits,) float.
        nbits: 1, 2, 4 or 8.
        queries_mask: (nq, Lq) bool or None.
        backend: "cpp", "triton" or "reference"; None picks by device.
        centroid_scores: (nq, Lq, C) float32, ⟨queries[q, i], centroids[c]⟩ (or a
            ``CentroidScores`` bundle, in either layout), or None.
        inv_norm: (n_tokens,) float32, positive and finite, or None.
        precision: "exact" or "int8" (int8: cpp and reference backends).

    Bundles (:mod:`edgeplaid.ops.bundles`) are accepted in place of the tensors and not re-checked:
    ``queries`` a ``Queries``, ``codes`` a ``CompressedDocs`` (residuals, offsets and inv_norm
    inside), ``centroids`` a ``Codec`` (bucket weights and nbits inside), ``candidates`` a
    ``Candidates``. Scoring from the codes is its own registered op,
    ``fused_decompress_maxsim_codes`` (cpp and reference); a backend without it (triton) scores
    ``"exact"`` by decoding, equal within fp32 rounding.

    Returns:
        (nq, nc) float32 (nc = nd when candidates is None).
    """
    q = b.queries(queries, queries_mask)
    nq, lq, dim = q.shape
    codec = b.codec(centroids, bucket_weights, nbits, dim=dim, device=q.device)
    from_codes = precision == "int8" or centroid_scores is not None or inv_norm is not None
    docs = b.compressed_docs(codes, residuals, doc_offsets, inv_norm, codec=codec, device=q.device)
    cand = b.candidates(candidates, nq, docs.n_docs, q.device)
    b.precision(precision)
    if from_codes and implements(
        "fused_decompress_maxsim_codes", q.device, backend, like="fused_decompress_maxsim"
    ):
        if centroid_scores is None:
            cs = b.CentroidScores(_centroid_scores(q, codec.centroids, 1)[0])
        else:
            cs = b.centroid_scores(
                centroid_scores, nq=nq, lq=lq, n_centroids=codec.n_centroids, device=q.device
            )
        if docs.inv_norm is None:
            inv = reference.residual_inv_norms(
                docs.codes, docs.residuals, codec.centroids, codec.bucket_weights, codec.nbits
            )
            docs = b.CompressedDocs(docs.codes, docs.residuals, docs.offsets, inv)
        fn = resolve("fused_decompress_maxsim_codes", q.device, backend)
        return fn(q, docs, codec, cand, cs, precision)
    if precision == "int8":
        raise ValueError(
            "precision: 'int8' runs on the cpp and reference backends (CPU); use 'exact' on GPUs"
        )
    return resolve("fused_decompress_maxsim", q.device, backend)(q, docs, codec, cand)


def residual_inv_norms(
    codes: Any, residuals: Any, centroids: Any, bucket_weights: Any, nbits: int
) -> torch.Tensor:
    """inv_norm[t] = 1 / max(‖centroids[codes[t]] + bucket_weights[b_t]‖₂, 1e-12), (n_tokens,)
    float32: what a PLAID index stores per token for fused_decompress_maxsim's code scoring."""
    cents, weights, n = v.codec(centroids, bucket_weights, nbits, None, None)
    c = v.codes(codes, cents.device)
    res = v.residuals(residuals, c.shape[0], cents.shape[1] * n // 8, cents.device)
    return reference.residual_inv_norms(c, res, cents, weights, n)


def _reference(
    q: b.Queries, docs: b.CompressedDocs, codec: b.Codec, cand: b.Candidates | None
) -> torch.Tensor:
    return reference.fused_decompress_maxsim(
        q.data,
        docs.codes,
        docs.residuals,
        docs.offsets,
        b.ids_of(cand),
        codec.centroids,
        codec.bucket_weights,
        codec.nbits,
        q.mask,
    )


def _reference_codes(
    q: b.Queries,
    docs: b.CompressedDocs,
    codec: b.Codec,
    cand: b.Candidates | None,
    cs: b.CentroidScores,
    precision: str,
) -> torch.Tensor:
    return reference.fused_decompress_maxsim_codes(
        q.data,
        docs.codes,
        docs.residuals,
        docs.offsets,
        b.ids_of(cand),
        codec.bucket_weights,
        codec.nbits,
        q.mask,
        cs.token_major(q.mask),
        docs.inv_norm,
        precision,
    )


def _cpp(q: b.Queries, docs: b.CompressedDocs, codec: b.Codec, cand: b.Candidates | None) -> torch.Tensor:
    out = cpp.C.fused_decompress_maxsim(
        cpp.host_queries(q.data),
        cpp.host(q.mask),
        cpp.host(docs.codes),
        cpp.host(docs.residuals),
        cpp.host(docs.offsets),
        cpp.host(b.ids_of(cand)),
        cpp.host(codec.centroids),
        cpp.dtype_name(codec.centroids),
        cpp.host(codec.bucket_weights),
        codec.nbits,
    )
    return torch.from_numpy(out)


def _cpp_codes(
    q: b.Queries,
    docs: b.CompressedDocs,
    codec: b.Codec,
    cand: b.Candidates | None,
    cs: b.CentroidScores,
    precision: str,
) -> torch.Tensor:
    # The centroid-major score table is read in place (query_len given).
    out = cpp.C.fused_decompress_maxsim_codes(
        cpp.host_queries(q.data),
        cpp.host(q.mask),
        cpp.host(docs.codes),
        cpp.host(docs.residuals),
        cpp.host(docs.inv_norm),
        cpp.host(docs.offsets),
        cpp.host(b.ids_of(cand)),
        cpp.host(cs.scores.contiguous()),
        cpp.host(codec.bucket_weights),
        codec.nbits,
        precision,
        cs.query_len,
    )
    return torch.from_numpy(out)


def _triton(q: b.Queries, docs: b.CompressedDocs, codec: b.Codec, cand: b.Candidates | None) -> torch.Tensor:
    return triton_backend.call(
        "fused_decompress_maxsim",
        *(q.data, docs.codes, docs.residuals, docs.offsets, b.ids_of(cand)),
        *(codec.centroids, codec.bucket_weights, codec.nbits, q.mask),
    )


register("fused_decompress_maxsim", "reference", _reference)
register("fused_decompress_maxsim", "cpp", _cpp)
register("fused_decompress_maxsim", "triton", _triton)
register("fused_decompress_maxsim_codes", "reference", _reference_codes)
register("fused_decompress_maxsim_codes", "cpp", _cpp_codes)
