"""attention: softmax attention of float32 or bf16 heads with an optional key mask and a sliding
window, the encoder's attention layers on CPU. float32 heads run a C++ kernel on the vector units
(FlashAttention-2's loop; AVX-512 wherever the CPU has it, Zen 4 included: 196 GFLOP/s on 17m's
4,096-token heads on 2 cores against 162 for torch's SDPA, and the sliding layers in one call
instead of one masked SDPA call per 64-query block); bf16 heads run on AMX tiles (CPUs with
AMX-BF16; on 2 Xeon cores 17m's bf16 attention took 0.30 s of 200 SciFact abstracts against 0.52 s
in torch's SDPA), else on AVX512-BF16's vdpbf16ps (the same loop as float32 over pairs of bf16:
on a 2-core Zen 4, 17m's 4,096-token heads at 301-313 GFLOP/s against 178-192 for the float32
kernel). Elsewhere the encoder keeps torch's scaled_dot_product_attention.
"""

from __future__ import annotations

import functools

import torch

from edgeplaid.ops import cpp_backend as cpp
from edgeplaid.ops import reference
from edgeplaid.ops.dispatch import register, resolve


@functools.cache
def amx_present() -> bool:
    """Whether the CPU has AMX-BF16 tiles at all, whether or not this kernel may use them now."""
    return cpp.C is not None and bool(cpp.C.cpu_info()["features"].get("amx_bf16", False))


def amx_ready() -> bool:
    """Whether the AMX bf16 kernel runs here: AMX-BF16 on the CPU, the tile state granted by the OS,
    and the tiles not turned off (``edgeplaid._C.set_cpu_amx(False)`` or ``EDGEPLAID_CPU_AMX=0``)."""
    return cpp.C is not None and bool(cpp.C.cpu_amx())


def bf16_kernel(head_dim: int) -> str:
    """The C++ kernel that takes bf16 heads of this size here: ``"amx"`` (32 or 64 dims where
    :func:`amx_ready`), ``"avx512bf16"`` (vdpbf16ps: a multiple of 16 up to 512 on CPUs with
    AVX512-BF16, unless a narrower ISA is forced) or ``"none"``."""
    return "none" if cpp.C is None else str(cpp.C.bf16_attention_kernel(int(head_dim)))


def cpp_ready(dtype: torch.dtype, head_dim: int) -> bool:
    """Whether the C++ kernel takes heads of this dtype and size here: float32 with a head dim that
    is a multiple of 16 (at most 512) on any CPU the extension loads on; bfloat16 where
    :func:`bf16_kernel` names one."""
    if cpp.C is None:
        return False
    if dtype == torch.float32:
        return head_dim % 16 == 0 and 16 <= head_dim <= 512
    return dtype == torch.bfloat16 and bf16_kernel(head_dim) != "none"


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: torch.Tensor | None = None,
    window: int | None = None,
    scale: float | None = None,
    out: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """``out[b, i, h] = Σ_j p_ij · v[b, j, h]``, ``p_i = softmax_j(q[b, i, h] · k[b, j, h] · scale)``
    over the allowed keys ``j``: ``key_mask[b, j]`` and ``|i − j| <= window``. Scores and softmax
    in float32; for bf16 heads ``p`` is rounded to bf16 for the second product (as torch's bf16
    flash attention). A row with no allowed key is zero.

    Args:
        q, k, v: (B, L, H, D) float32 or bfloat16 (all the same), any strides with a contiguous
            last axis (e.g. views of a fused QKV projection's output); for the C++ kernel D a
            multiple of 16 up to 512 (float32, bf16 on vdpbf16ps) or 32 / 64 (bf16 on AMX).
        key_mask: (B, L) bool, True where a key may be attended to; None: every key.
        window: the band's half width (ModernBERT's ``local_attention // 2``); None: no band.
        scale: multiplies the scores; None: ``D ** -0.5``.
        out: (B, L, H, D) of q's dtype with a contiguous last axis, written; None: a new tensor.
        backend: "cpp" or "reference"; None picks by device (the reference where the C++
            kernel does not take these heads: :func:`cpp_ready`).

    Returns:
        ``out``, (B, L, H, D) of q's dtype.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.ndim != 4:
            got = getattr(t, "shape", type(t).__name__)
            raise ValueError(f"{name}: expected a 4-D tensor (batch, length, heads, dim), got {got}")
        if t.dtype not in (torch.bfloat16, torch.float32) or t.dtype != q.dtype:
            raise ValueError(f"{name}: expected bfloat16 or float32 (the dtype of q), got {t.dtype}")
        if t.shape != q.shape:
            raise ValueError(f"{name}: expected the shape of q {tuple(q.shape)}, got {tuple(t.shape)}")
        if t.numel() and t.stride(-1) != 1:
            raise ValueError(f"{name}: expected a contiguous last axis, got strides {t.stride()}")
    b, length = q.shape[:2]
    if key_mask is not None and (key_mask.dtype != torch.bool or tuple(key_mask.shape) != (b, length)):
        got = f"{key_mask.dtype} {tuple(key_mask.shape)}"
        raise ValueError(f"key_mask: expected bool of shape {(b, length)}, got {got}")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 0):
        raise ValueError(f"window: expected a non-negative int or None, got {window!r}")
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    elif out.shape != q.shape or out.dtype != q.dtype or (out.numel() and out.stride(-1) != 1):
        raise ValueError(f"out: expected {q.dtype} of shape {tuple(q.shape)} with a contiguous last axis")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if backend is None and q.device.type == "cpu" and not cpp_ready(q.dtype, q.shape[-1]):
        backend = "reference"  # no C++ kernel for this dtype here: the twin, not an error
    return resolve("attention", q.device, backend)(q, k, v, key_mask, window, scale, out)


def _cpp(q, k, v, key_mask, window, scale, out):
    mask = None if key_mask is None else key_mask.contiguous().numpy()
    host = [cpp.host(t.detach()) for t in (q, k, v, out)]
    cpp.C.attention(*host, mask, -1 if window is None else window, scale)
    return out


register("attention", "reference", reference.attention)
register("attention", "cpp", _cpp)
