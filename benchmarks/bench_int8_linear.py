"""int8_linear: the encoder's linear layers (17m and 32m shapes, 5,280 tokens = 16 documents of
330) in int8 against float32 oneDNN (what precision "fp32" runs) and torch's F.linear (MKL).

The int8 kernel is held to the machine's int8 multiply-add peak (``peak_int8_gops``) of the int8
ISA under test, the float32 contenders to the fp32 FMA peak. On AVX2 expect at most 2x float32
(one vpmaddubsw + vpmaddwd per 32 multiply-adds against one FMA per 8); with AVX-512 VNNI one
vpdpbusd per 64 (csrc/cpu/int8_linear_impl.h).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from _harness import Report, median_seconds, quick, time_ours
from edgeplaid import ops
from edgeplaid._native import C

SHAPES = {  # (in_features, out_features): qkv, the GLU's input, attention output, head
    "17m qkv": (256, 768),
    "17m mlp in": (256, 768),
    "17m attn out": (256, 256),
    "17m head": (256, 512),
    "32m qkv": (384, 1152),
    "32m head": (768, 768),
}


@pytest.mark.parametrize("layer", list(SHAPES))
def test_int8_linear(benchmark, peak_gflops, peak_int8_gops, isa, layer):
    k, n = SHAPES[layer]
    m = 512 if quick() else 5280
    g = torch.Generator().manual_seed(0)
    x = torch.randn(m, k, generator=g)
    w = torch.randn(n, k, generator=g) * k**-0.5
    b = torch.randn(n, generator=g)
    q = ops.quantize_weight(w, b)
    case = f"{layer}: ({m}, {k}) x ({k}, {n})"
    report = Report("int8_linear", case, flops=2.0 * m * k * n, peak_gflops=peak_gflops)
    report.add("torch F.linear fp32 (MKL)", median_seconds(lambda: F.linear(x, w, b), min_rounds=5))
    if torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        packed = torch.ops.mkldnn._reorder_linear_weight(w, None)
        onednn = median_seconds(
            lambda: torch.ops.mkldnn._linear_pointwise(x, packed, b, "none", [], ""), min_rounds=5
        )
        report.add("oneDNN fp32, packed weight (precision fp32)", onednn)
    ours = time_ours(benchmark, lambda: ops.int8_linear(x, q))
    report.add(f"edgeplaid cpp ({C.cpu_int8_isa()}) int8", ours, peak=peak_int8_gops)
    report.finish()
