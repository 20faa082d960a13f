"""The encoder's compute precisions: names, the "auto" rule, and int8 linear layers for backbones
that run transformers' own forward (BERT, MiniLM; ModernBERT runs edgeplaid's forward, whose
:class:`~edgeplaid.model._modernbert.PackedLinears` does the same with fused epilogues).

Rule for which layers stay float32 under int8 (both forwards): the MLP's output projection, the
one layer whose input is the MLP's intermediate activation. Its input (GELU(a) * b in ModernBERT,
GELU(a) in BERT) is heavy tailed, and per-token int8 loses the most on it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from edgeplaid._native import C, cpu_has_bf16
from edgeplaid.ops.int8_linear import Int8Weight, int8_linear, quantize_weight

PRECISIONS = ("auto", "fp32", "bf16", "fp16", "int8")
DTYPE_OF = {"fp32": torch.float32, "int8": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(
    precision: str, device: torch.device, dtype: torch.dtype | None, own_forward: bool = True
) -> str:
    """The precision ``precision`` names on ``device``; ``dtype`` is an explicit weight dtype;
    ``own_forward``: the backbone runs edgeplaid's ModernBERT forward.

    "auto": an explicit ``dtype`` keeps its precision ("fp32"/"fp16"/"bf16"); on a CUDA device
    "bf16" where the GPU has it, else "fp16". On the CPU, measured (benchmarks/bench_encode.py,
    per-token cosine to fp32 and SciFact nDCG@10 with the MiniLM stand-in):

    * "bf16" where the CPU multiplies bf16 itself (AVX512-BF16, AMX): on 2 Xeon cores with AMX
      17m encodes 2.3x faster than in fp32 at cosine 0.9999 mean, and int8 (AVX2 code) is slower
      than fp32 there. Every backbone.
    * else "int8" for edgeplaid's ModernBERT forward when the C++ kernel is built (on 2 AVX2 EPYC
      cores 1.2x fp32, cosine 0.9996 mean). Other backbones (BERT, the MiniLM stand-in) stay
      "fp32": int8 MiniLM lost 0.0035 of SciFact nDCG@10 (0.6931 -> 0.6894), over the 0.003 bar.
    * else "fp32".
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {PRECISIONS}, got {precision!r}")
    named = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype)
    if precision == "auto":
        if named is not None:
            return named
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        if device.type == "cpu" and cpu_has_bf16():
            return "bf16"
        if device.type == "cpu" and C is not None and own_forward:
            return "int8"
        return "fp32"
    if dtype is not None and DTYPE_OF[precision] != dtype:
        raise ValueError(f"dtype {dtype} contradicts precision {precision!r}: give one of them")
    if precision == "int8" and device.type != "cpu":
        raise ValueError(
            f"precision 'int8' runs on the CPU (its kernel is C++); on {device.type} use 'bf16' or 'fp16'"
        )
    return precision


class QuantizedLinear(nn.Linear):
    """An ``nn.Linear`` (same parameters, same state dict) whose float32 CPU forward runs through
    :func:`edgeplaid.ops.int8_linear` while ``int8`` is set; the weight is quantised at first use
    and again whenever it changes."""

    int8: bool = False

    @classmethod
    def wrap(cls, layer: nn.Linear) -> QuantizedLinear:
        q = cls.__new__(cls)
        nn.Module.__init__(q)
        q.in_features, q.out_features = layer.in_features, layer.out_features
        q.weight = layer.weight
        q.bias = layer.bias
        q.__dict__["_q"] = None
        return q

    def _quantized(self) -> Int8Weight:
        key = (self.weight.data_ptr(), self.weight._version)
        cached = self.__dict__.get("_q")
        if cached is None or cached[0] != key:
            cached = (key, quantize_weight(self.weight, self.bias))
            self.__dict__["_q"] = cached
        return cached[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.int8 and x.device.type == "cpu" and x.dtype == torch.float32):
            return F.linear(x, self.weight, self.bias)
        y = int8_linear(x.reshape(-1, self.in_features).contiguous(), self._quantized())
        return y.view(*x.shape[:-1], self.out_features)


def set_int8(backbone: nn.Module, enabled: bool) -> None:
    """Turns int8 on or off in every linear layer of ``backbone`` but the MLP's output projection
    (``in_features == config.intermediate_size``), wrapping plain ``nn.Linear`` layers once."""
    keep_in = getattr(getattr(backbone, "config", None), "intermediate_size", None)
    for parent in list(backbone.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and child.in_features != keep_in:
                if not enabled:
                    continue
                child = QuantizedLinear.wrap(child)
                setattr(parent, name, child)
            if isinstance(child, QuantizedLinear):
                child.int8 = enabled
