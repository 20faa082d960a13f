"""Argument checks shared by every op and every backend: one set of error messages.

Each check raises ValueError naming the argument and what was expected. Checks that read the
data (offsets, candidate ids) run only on CPU tensors, where they are cheap and synchronise
nothing; the kernels never trust them either and check every id they dereference.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int32, torch.int64)
# PLAID codes: uint16 for indexes of <= 65,536 centroids (2 bytes a token), else int32/int64.
CODE_DTYPES = (torch.uint16, torch.int32, torch.int64)
NBITS = (1, 2, 4, 8)

# How many O(n) data scans the checks below have run, by argument name. Tests read it to prove
# that a bundle built once (edgeplaid.ops.bundles) is never scanned again per call.
DATA_SCANS: dict[str, int] = {}


def _count_scan(name: str) -> None:
    DATA_SCANS[name] = DATA_SCANS.get(name, 0) + 1


def as_tensor(x: Any, name: str) -> torch.Tensor:
    """A torch tensor view of ``x`` (numpy arrays are shared, not copied)."""
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, np.ndarray):
        return torch.from_numpy(x)
    raise ValueError(f"{name}: expected a torch.Tensor or numpy.ndarray, got {type(x).__name__}")


def optional_tensor(x: Any, name: str) -> torch.Tensor | None:
    return None if x is None else as_tensor(x, name)


def check_rank(t: torch.Tensor, name: str, ndim: int, layout: str) -> None:
    if t.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D tensor {layout}, got shape {tuple(t.shape)}")


def check_contiguous(t: torch.Tensor, name: str) -> None:
    if not t.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous tensor (call .contiguous() first)")


def check_dtype(t: torch.Tensor, name: str, allowed: Sequence[torch.dtype]) -> None:
    if t.dtype not in allowed:
        names = ", ".join(str(d).replace("torch.", "") for d in allowed)
        raise ValueError(f"{name}: expected dtype {names}, got {str(t.dtype).replace('torch.', '')}")


def check_size(t: torch.Tensor, name: str, axis: int, want: int, what: str) -> None:
    if t.shape[axis] != want:
        raise ValueError(f"{name}: expected size {want} ({what}) on axis {axis}, got shape {tuple(t.shape)}")


def check_device(name: str, t: torch.Tensor, device: torch.device) -> None:
    if t.device != device:
        raise ValueError(
            f"{name}: expected a tensor on {device} (the queries' device), got one on {t.device}"
        )


def check_finite(t: torch.Tensor, name: str) -> None:
    """ValueError naming ``name`` when a CPU tensor holds NaN or inf (CUDA tensors are not read:
    that would synchronise the host on every call).

    One vectorised sum decides (a NaN or inf makes it non-finite); only then, since a sum of
    huge finite values can overflow too, the exact element test runs.
    """
    if t.device.type != "cpu" or t.numel() == 0:
        return
    if math.isfinite(float(t.sum(dtype=torch.float32))):
        return
    bad = ~torch.isfinite(t)
    if bool(bad.any()):
        where = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(f"{name}: expected finite values, got {t[where].item()} at index {where}")


def check_finite_scores(out: torch.Tensor, name: str) -> torch.Tensor:
    """``out`` unless a score is NaN or +inf: the kernels score a document holding a non-finite
    value NaN (the reference NaN or +inf), and on CPU that is an error naming the document
    argument. (A finite document scores a finite value, an empty one or padding -inf.)"""
    if out.device.type != "cpu" or not out.numel():
        return out
    bad = torch.isnan(out) | torch.isposinf(out)
    if bool(bad.any()):
        q, c = (int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"{name}: expected finite values, but a document scored against query {q} (column {c}) "
            "holds NaN or inf"
        )
    return out


def float_tensor(x: Any, name: str, ndim: int, layout: str) -> torch.Tensor:
    t = as_tensor(x, name)
    check_rank(t, name, ndim, layout)
    check_dtype(t, name, FLOAT_DTYPES)
    check_contiguous(t, name)
    return t


def queries(x: Any) -> torch.Tensor:
    t = float_tensor(x, "queries", 3, "(n_queries, query_len, dim)")
    if t.shape[2] < 1:
        raise ValueError(f"queries: dim must be >= 1, got shape {tuple(t.shape)}")
    check_finite(t, "queries")
    return t


def mask(x: Any, name: str, rows: int, cols: int, device: torch.device) -> torch.Tensor | None:
    if x is None:
        return None
    t = as_tensor(x, name)
    check_rank(t, name, 2, "(n, length)")
    check_dtype(t, name, (torch.bool,))
    check_contiguous(t, name)
    check_size(t, name, 0, rows, "rows")
    check_size(t, name, 1, cols, "tokens per row")
    check_device(name, t, device)
    return t


def offsets(x: Any, n_tokens: int, device: torch.device) -> torch.Tensor:
    t = as_tensor(x, "doc_offsets")
    check_rank(t, "doc_offsets", 1, "(n_docs + 1,)")
    check_dtype(t, "doc_offsets", (torch.int64,))
    check_contiguous(t, "doc_offsets")
    check_device("doc_offsets", t, device)
    if t.shape[0] < 1:
        raise ValueError("doc_offsets: expected at least one entry (n_docs + 1)")
    if t.device.type == "cpu":
        _count_scan("doc_offsets")
        if int(t[0]) != 0 or int(t[-1]) != n_tokens or bool((t[1:] < t[:-1]).any()):
            raise ValueError(
                f"doc_offsets: expected non-decreasing offsets from 0 to n_tokens={n_tokens}, "
                f"got first {int(t[0])}, last {int(t[-1])}"
            )
    return t


def candidates(x: Any, n_queries: int, n_docs: int, device: torch.device) -> torch.Tensor | None:
    if x is None:
        return None
    t = as_tensor(x, "candidates")
    check_rank(t, "candidates", 2, "(n_queries, n_candidates)")
    check_dtype(t, "candidates", (torch.int64,))
    check_contiguous(t, "candidates")
    check_size(t, "candidates", 0, n_queries, "n_queries")
    check_device("candidates", t, device)
    if t.device.type == "cpu" and t.numel():
        _count_scan("candidates")
    if t.device.type == "cpu" and t.numel() and (int(t.min()) < -1 or int(t.max()) >= n_docs):
        raise ValueError(
            f"candidates: ids must be -1 (padding) or in [0, {n_docs}), got range "
            f"[{int(t.min())}, {int(t.max())}]"
        )
    return t


def codes(x: Any, device: torch.device) -> torch.Tensor:
    t = as_tensor(x, "codes")
    check_rank(t, "codes", 1, "(n_tokens,)")
    check_dtype(t, "codes", CODE_DTYPES)
    check_contiguous(t, "codes")
    check_device("codes", t, device)
    return t


def nbits(n: Any) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n not in NBITS:
        raise ValueError(f"nbits: expected one of 1, 2, 4, 8, got {n!r}")
    return n


def codec(
    centroids_: Any, bucket_weights_: Any, nbits_: Any, dim: int | None, device: torch.device | None
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Checks centroids (n_centroids, dim), bucket_weights (2**nbits,) and nbits."""
    n = nbits(nbits_)
    cents = float_tensor(centroids_, "centroids", 2, "(n_centroids, dim)")
    if dim is not None:
        check_size(cents, "centroids", 1, dim, "dim")
    dim = cents.shape[1]
    if dim * n % 8:
        raise ValueError(f"nbits: dim * nbits must be a multiple of 8, got dim={dim}, nbits={n}")
    weights = float_tensor(bucket_weights_, "bucket_weights", 1, "(2**nbits,)")
    check_size(weights, "bucket_weights", 0, 1 << n, "2**nbits")
    check_finite(cents, "centroids")
    check_finite(weights, "bucket_weights")
    if device is not None:
        check_device("centroids", cents, device)
        check_device("bucket_weights", weights, device)
    return cents, weights, n


def residuals(x: Any, n_tokens: int, row_bytes: int, device: torch.device) -> torch.Tensor:
    t = as_tensor(x, "residuals")
    check_rank(t, "residuals", 2, "(n_tokens, dim * nbits / 8)")
    check_dtype(t, "residuals", (torch.uint8,))
    check_contiguous(t, "residuals")
    check_size(t, "residuals", 0, n_tokens, "one row per code")
    check_size(t, "residuals", 1, row_bytes, "dim * nbits / 8 bytes")
    check_device("residuals", t, device)
    return t
