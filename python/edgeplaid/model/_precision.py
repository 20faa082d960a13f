"""The encoder's compute precisions: names, the "auto" rule, and int8 linear layers for backbones
that run transformers' own forward (BERT, MiniLM; ModernBERT runs edgeplaid's forward, whose
:class:`~edgeplaid.model._modernbert.PackedLinears` does the same with fused epilogues).

The MLP's output projection (both forwards), the one layer whose input is the MLP's intermediate
activation: its input (GELU(a) * b in ModernBERT, GELU(a) in BERT) is heavy tailed per token, and
plain per-token int8 loses the most on it; it runs int8 with its rows rotated by Hadamard blocks
(:func:`rotation_block`, ``int8_linear``'s rotate), and stays in the model's dtype where no block
of 16 or more divides its width.

Smoothing: setting precision "int8" calibrates (:func:`calibrate_int8`): the model encodes
``CALIBRATION_TEXTS`` documents and as many queries of the shipped Cranfield sample in the model's
dtype (float32, or bf16 for int8 on bf16 weights),
each int8 layer records its input channels' largest |activation|, and its weight is quantised with
SmoothQuant's factors of them (:func:`edgeplaid.ops.smooth_factors`, alpha ``SMOOTH_ALPHA``).
Deterministic (fixed text), once per model (again after a ``.to()`` that replaces or changes the
parameters). MiniLM's per-token cosine to
fp32 on 100 SciFact abstracts: 0.99938 -> 0.99982 (Cranfield calibrating SciFact: another domain).
"""

from __future__ import annotations

import json
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from edgeplaid._native import C, cpu_has_bf16
from edgeplaid.ops.attention import amx_present
from edgeplaid.ops.int8_linear import Int8Weight, int8_linear, quantize_weight, smooth_factors

CALIBRATION_TEXTS = 32  # Cranfield documents, and as many queries
SMOOTH_ALPHA = 0.5  # measured best of 0.3-0.8 on MiniLM (module docstring)
# The MLP output projection's input (GELU(a) * b) has a heavy tail per token, which smoothing does
# not help (per token, not per channel): it runs int8 rotated by Hadamard blocks of this size
# (int8_linear's rotate). Per-token cosine to fp32 with only that layer in int8: MiniLM 0.99911
# plain, 0.99984 rotated; the random 17m 0.99969 -> 0.99990, 32m 0.99951 -> 0.99985 (blocks of 64
# as good as 128-512 and the cheapest).
ROTATE_BLOCK = 64


def rotation_block(in_features: int) -> int:
    """The Hadamard block for an MLP output projection of ``in_features``: the largest power of
    two up to ROTATE_BLOCK dividing it, or 0 (below 16: the layer stays out of int8)."""
    b = ROTATE_BLOCK
    while b >= 16 and in_features % b:
        b //= 2
    return b if b >= 16 else 0


PRECISIONS = ("auto", "fp32", "bf16", "fp16", "int8")
DTYPE_OF = {"fp32": torch.float32, "int8": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
INT8_DTYPES = (torch.float32, torch.bfloat16)  # int8's linear layers take either; the rest runs in it


def int8_dtype() -> torch.dtype:
    """The weights' dtype for precision "int8" on this CPU: bf16 where the CPU multiplies bf16
    itself (attention and the rest in bf16, the int8 layers' inputs and outputs too), else
    float32."""
    return torch.bfloat16 if cpu_has_bf16() else torch.float32


def vnni_int8() -> bool:
    """The int8 kernels run AVX-512 VNNI here (``vpdpbusd``: int8_linear at 2.5-3x its AVX2 code)."""
    return C is not None and C.cpu_int8_isa() == "avx512vnni"


def resolve_precision(
    precision: str, device: torch.device, dtype: torch.dtype | None, own_forward: bool = True
) -> str:
    """The precision ``precision`` names on ``device``; ``dtype`` is an explicit weight dtype;
    ``own_forward``: the backbone runs edgeplaid's ModernBERT forward.

    "auto": an explicit ``dtype`` keeps its precision ("fp32"/"fp16"/"bf16"); on a CUDA device
    "bf16" where the GPU has it, else "fp16". On the CPU, measured (benchmarks/bench_encode.py,
    per-token cosine to fp32 and SciFact nDCG@10 with the MiniLM stand-in):

    * "bf16" where the CPU has AMX tiles (oneDNN's bf16 products on them: on 2 Xeon cores 17m
      encodes 2.3x faster than in fp32 at cosine 0.9999 mean; int8's kernel has no tile path).
    * "int8" on a bf16 model where the CPU multiplies bf16 itself without AMX and the int8
      kernels run VNNI (Zen 4): vpdpbusd multiplies at twice vdpbf16ps' rate. 2 Zen 4 cores, 200
      abstracts: 17m 87-100 against bf16's 63-83 docs/s (alternated), cosine 0.99957 / 0.99826;
      MiniLM's SciFact encoding 102 s against 127 s, nDCG@10 0.6914 (exhaustive 0.6901) against
      fp32's 0.6917 / 0.6917 and bf16's 0.6911 / 0.6908. Every backbone.
    * "bf16" elsewhere with native bf16 (AVX512-BF16 without the C++ kernels).
    * else "int8" for edgeplaid's ModernBERT forward when the C++ kernel is built (on 2 AVX2 EPYC
      cores 1.2x fp32, cosine 0.9996 mean), and for other backbones (BERT, the MiniLM stand-in)
      where the int8 kernels run AVX-512 VNNI: MiniLM on 2 Zen 4 cores 36 against 26 docs/s in
      fp32, SciFact nDCG@10 0.6917 -> 0.6903 (exhaustive 0.6917 -> 0.6892) with the calibrated
      smoothing; with AVX2's int8 kernel MiniLM ran as fast as fp32 (25.5 against 26 docs/s), so
      there it stays "fp32".
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
            return "int8" if vnni_int8() and not amx_present() else "bf16"
        if device.type == "cpu" and C is not None and (own_forward or vnni_int8()):
            return "int8"
        return "fp32"
    if (
        dtype is not None
        and DTYPE_OF[precision] != dtype
        and not (precision == "int8" and dtype in INT8_DTYPES)
    ):
        raise ValueError(f"dtype {dtype} contradicts precision {precision!r}: give one of them")
    if precision == "int8" and device.type != "cpu":
        raise ValueError(
            f"precision 'int8' runs on the CPU (its kernel is C++); on {device.type} use 'bf16' or 'fp16'"
        )
    return precision


def record_amax(ranges: dict, weight: torch.Tensor, x: torch.Tensor) -> None:
    """Keeps in ``ranges`` (by ``id(weight)``, with the weight itself: an id can be reused once a
    tensor is gone) the running max over calls of each input channel's largest |x| (x: (..., K))."""
    amax = x.detach().reshape(-1, x.shape[-1]).abs().amax(0).float().cpu()
    seen = input_ranges(ranges, weight)
    ranges[id(weight)] = (weight, amax if seen is None else torch.maximum(seen, amax))


def input_ranges(ranges: dict, weight: torch.Tensor) -> torch.Tensor | None:
    """The channel ranges recorded for this very ``weight`` tensor, or None."""
    entry = ranges.get(id(weight))
    return entry[1] if entry is not None and entry[0] is weight else None


def quantize_layer(
    source: torch.Tensor,
    bias: torch.Tensor | None,
    ranges: dict,
    rotate: int = 0,
    weight: torch.Tensor | None = None,
) -> Int8Weight:
    """The int8 copy of a layer's weight ``source`` (or of ``weight``, rows derived from it):
    rotated by Hadamard blocks of ``rotate``, else smoothed by the factors of ``source``'s
    calibrated input ranges in ``ranges`` where they were recorded (both forwards use this)."""
    amax = None if rotate else input_ranges(ranges, source)
    smooth = None if amax is None else smooth_factors(amax, source.detach(), SMOOTH_ALPHA)
    return quantize_weight(source if weight is None else weight, bias, smooth=smooth, rotate=rotate)


class QuantizedLinear(nn.Linear):
    """An ``nn.Linear`` (same parameters, same state dict) whose float32 CPU forward runs through
    :func:`edgeplaid.ops.int8_linear` while ``int8`` is set; the weight is quantised at first use
    (smoothed by the model's calibrated input ranges, or, for an MLP output projection, rotated by
    Hadamard blocks: ``rotate``) and again whenever it changes."""

    int8: bool = False
    calibrating: bool = False

    @classmethod
    def wrap(cls, layer: nn.Linear) -> QuantizedLinear:
        q = cls.__new__(cls)
        nn.Module.__init__(q)
        q.in_features, q.out_features = layer.in_features, layer.out_features
        q.weight = layer.weight
        q.bias = layer.bias
        q.__dict__["_q"] = None
        q.__dict__["ranges"] = {}  # set_int8 shares the model's (PackedLinears.act_amax)
        q.__dict__["rotate"] = 0  # set_int8: the Hadamard block of an MLP output projection
        return q

    def _quantized(self) -> Int8Weight:
        key = (self.weight.data_ptr(), self.weight._version)
        cached = self.__dict__.get("_q")
        if cached is None or cached[0] != key:
            rotate = self.__dict__.get("rotate", 0)
            cached = (key, quantize_layer(self.weight, self.bias, self.__dict__["ranges"], rotate))
            self.__dict__["_q"] = cached
        return cached[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        wide_or_bf16 = x.dtype in INT8_DTYPES
        rotated = self.__dict__.get("rotate", 0) > 0  # rotated layers are never smoothed
        if self.calibrating and x.device.type == "cpu" and wide_or_bf16 and not rotated:
            record_amax(self.__dict__["ranges"], self.weight, x)
        if not (self.int8 and x.device.type == "cpu" and wide_or_bf16 and x.dtype == self.weight.dtype):
            return F.linear(x, self.weight, self.bias)
        y = int8_linear(x.reshape(-1, self.in_features).contiguous(), self._quantized())
        return y.view(*x.shape[:-1], self.out_features)


def calibration_texts() -> tuple[list[str], list[str]]:
    """The first ``CALIBRATION_TEXTS`` documents and queries of the shipped Cranfield sample."""
    from edgeplaid.data import CRANFIELD

    def first(name: str) -> list[str]:
        with open(CRANFIELD / name, encoding="utf-8") as f:
            rows = [json.loads(line) for _, line in zip(range(CALIBRATION_TEXTS), f, strict=False)]
        return [r["text"] for r in rows]

    return first("corpus.jsonl"), first("queries.jsonl")


def calibrate_int8(model: Any) -> None:
    """Measures each int8 layer's input channel ranges on :func:`calibration_texts` in the model's
    dtype with int8 off (``model``: a :class:`~edgeplaid.model.ColBERT` on the CPU) and drops the
    cached weight copies (the calibration's packed ones are never read under int8): the int8 ones
    are quantised again, smoothed, at their next use."""
    linears = model._linears
    layers = [m for m in model.backbone.modules() if isinstance(m, QuantizedLinear)]
    int8 = linears.int8, [m.int8 for m in layers]
    linears.act_amax.clear()  # shared with the layers (set_int8)
    linears.int8, linears.calibrating = False, True
    for m in layers:
        m.int8, m.calibrating = False, True
    try:
        docs, queries = calibration_texts()
        with warnings.catch_warnings():  # truncating the sample text is nothing to tell a user
            warnings.simplefilter("ignore")
            model.encode_documents(docs, show_progress_bar=False)
            model.encode_queries(queries, show_progress_bar=False)
    finally:
        linears.int8, linears.calibrating = int8[0], False
        for m, on in zip(layers, int8[1], strict=True):
            m.int8, m.calibrating = on, False
            m.__dict__["_q"] = None
        linears.drop_copies()


def set_int8(backbone: nn.Module, enabled: bool, ranges: dict | None = None) -> None:
    """Turns int8 on or off in every linear layer of ``backbone``, wrapping plain ``nn.Linear``
    layers once; the MLP's output projection (``in_features == config.intermediate_size``) runs
    rotated (:func:`rotation_block`), or stays out where no block divides it. ``ranges``: the
    calibration's channel ranges by weight id, shared with the layers."""
    mlp_in = getattr(getattr(backbone, "config", None), "intermediate_size", None)
    mlp_rotate = rotation_block(mlp_in) if isinstance(mlp_in, int) else 0
    for parent in list(backbone.modules()):
        for name, child in list(parent.named_children()):
            is_mlp_out = type(child) is nn.Linear and child.in_features == mlp_in
            if type(child) is nn.Linear and (not is_mlp_out or mlp_rotate):
                if not enabled:
                    continue
                child = QuantizedLinear.wrap(child)
                child.__dict__["rotate"] = mlp_rotate if is_mlp_out else 0
                setattr(parent, name, child)
            if isinstance(child, QuantizedLinear):
                child.int8 = enabled
                if ranges is not None:
                    child.__dict__["ranges"] = ranges
