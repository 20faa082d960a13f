"""attention: the encoder's attention layers (mxbai-edge-colbert-v0 heads: 64 dims, 4 heads for
17m, 6 for 32m) on the CPU kernels against torch's scaled_dot_product_attention.

Cases: a global layer over 2 documents of 4,096 tokens, a sliding-window layer (ModernBERT's
``local_attention // 2 = 64`` each side) over the same, and a global layer over 16 documents of 256
tokens (SciFact-sized). Contenders: torch's SDPA in float32 and in bf16 (the sliding case as one
call with a dense band mask: what a torch user writes), edgeplaid's float32 kernel (the attention
ISA) and its bf16 kernel where one runs (AMX tiles, or vdpbf16ps on AVX512-BF16 CPUs). FLOPs are
the useful ones, 4 * d per allowed (query, key) pair; float32 rows are held to the fp32 FMA peak
of the best ISA, bf16 rows to the vdpbf16ps peak (``peak_bf16_gflops``) where the CPU has it.
Outputs are checked against the reference twin before timing.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from _harness import Report, median_seconds, quick
from edgeplaid import ops
from edgeplaid._native import C
from edgeplaid.ops.attention import bf16_kernel

CASES = {  # (batch, length, heads, window)
    "17m global 2 x 4096": (2, 4096, 4, None),
    "17m sliding 2 x 4096": (2, 4096, 4, 64),
    "17m global 16 x 256": (16, 256, 4, None),
    "32m global 2 x 4096": (2, 4096, 6, None),
}
HEAD_DIM = 64


@functools.cache
def bf16_peak() -> float:
    """vdpbf16ps' peak on the kernels' threads; 0 where the CPU has no AVX512-BF16."""
    try:
        return float(C.peak_bf16_gflops(0.5))
    except (ValueError, AttributeError):
        return 0.0


def useful_flops(b: int, length: int, h: int, window: int | None) -> float:
    pos = torch.arange(length)
    pairs = length * length if window is None else int(((pos[:, None] - pos[None, :]).abs() <= window).sum())
    return 4.0 * HEAD_DIM * b * h * pairs


@pytest.mark.parametrize("case", list(CASES))
def test_attention(case: str, machine_peak_gflops: float) -> None:
    if C is None:
        pytest.skip("edgeplaid._C is not built")
    b, length, h, window = CASES[case]
    if quick():
        b, length = 1, min(length, 512)
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(b, length, 3, h, HEAD_DIM, generator=g)  # views of a fused QKV output
    q, k, v = qkv.unbind(2)
    qb, kb, vb = qkv.bfloat16().unbind(2)
    report = Report(
        "attention",
        f"{case}: (B, L, H, D) = ({b}, {length}, {h}, {HEAD_DIM})" + (f", window {window}" if window else ""),
        flops=useful_flops(b, length, h, window),
        peak_gflops=machine_peak_gflops,
    )
    mask = None
    if window is not None:
        pos = torch.arange(length)
        mask = (pos[:, None] - pos[None, :]).abs() <= window
    heads = [t.transpose(1, 2) for t in (q, k, v)]  # (B, H, L, D), as transformers passes them
    heads_bf16 = [t.transpose(1, 2) for t in (qb, kb, vb)]
    scale = HEAD_DIM**-0.5
    report.add(
        "torch SDPA fp32",
        median_seconds(lambda: F.scaled_dot_product_attention(*heads, attn_mask=mask, scale=scale)),
    )
    report.add(
        "torch SDPA bf16",
        median_seconds(lambda: F.scaled_dot_product_attention(*heads_bf16, attn_mask=mask, scale=scale)),
    )
    out = torch.empty(b, length, h, HEAD_DIM)
    want = ops.attention(q, k, v, None, window, scale, backend="reference")
    got = ops.attention(q, k, v, None, window, scale, out=out, backend="cpp")
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)  # same outputs first
    isa = C.cpu_info()["op_isa"]["attention"]
    report.add(
        f"edgeplaid cpp fp32 ({isa})",
        median_seconds(lambda: ops.attention(q, k, v, None, window, scale, out=out, backend="cpp")),
        isa=isa,
    )
    kernel = bf16_kernel(HEAD_DIM)
    if kernel != "none":
        out_bf16 = torch.empty(b, length, h, HEAD_DIM, dtype=torch.bfloat16)
        want = ops.attention(qb, kb, vb, None, window, scale, backend="reference").float()
        got = ops.attention(qb, kb, vb, None, window, scale, out=out_bf16, backend="cpp").float()
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
        peak = bf16_peak() if kernel == "avx512bf16" else None
        seconds = median_seconds(
            lambda: ops.attention(qb, kb, vb, None, window, scale, out=out_bf16, backend="cpp")
        )
        report.add(
            f"edgeplaid cpp bf16 ({kernel})",
            seconds,
            peak=peak or None,
            isa=kernel,
            note=f"held to the vdpbf16ps peak {peak:.0f} GFLOP/s" if peak else "",
        )
    report.finish(baseline="torch SDPA fp32")
