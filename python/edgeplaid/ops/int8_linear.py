"""int8_linear: a linear layer with int8 weights (per output channel) and int8 activations
(per row, quantised at call time), float32 in and out. The encoder's precision "int8" runs its
linear layers through it.

Why per row: a token's activations are quantised on their own range, so one token with large
values does not coarsen every other token's (per-tensor scales, as torch's dynamic quantisation
uses, cost the random 17m model's tokens 0.007 of mean cosine against 0.0007 here).

Smoothing (SmoothQuant, Xiao et al. 2023): where a few input channels run far larger than the rest
(BERT's layer norms put one channel of MiniLM's MLP input at 28 against a median of 2), they set
every token's scale alone and the other channels keep a few levels. ``quantize_weight(...,
smooth=s)`` multiplies the weight's columns by ``s`` and the op divides ``x``'s channels by it
before quantising: the product is unchanged, the activations' range is evened out and the
weights', which quantise per output channel, absorbs it. :func:`smooth_factors` makes ``s`` from
the channels' largest activations on calibration text (the model's, ``model/_precision.py``).
MiniLM's per-token cosine to fp32 on 100 SciFact abstracts: 0.99938 without, 0.99982 with
(calibrated on Cranfield, alpha 0.5; 0.99970 at alpha 0.8).

Rotation (QuaRot, Ashkboos et al. 2024): where the outliers are per token rather than per channel
(the MLP's output projection's input, GELU(a) * b), smoothing cannot help; ``quantize_weight(...,
rotate=b)`` multiplies the weight's rows by block-diagonal Hadamard matrices and the op the rows of
``x`` (a fast Walsh-Hadamard transform as they are quantised): a token's few large elements are
spread over their block and the small ones keep their levels (only that layer in int8: MiniLM's
per-token cosine 0.99911 -> 0.99984).

Fused layer norm: ``norm=(weight, bias, eps)`` normalises each row in the kernel as it is read
for quantisation (a pre-norm transformer's LayerNorm -> Linear in one pass, nothing rounded).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from edgeplaid.ops import cpp_backend as cpp
from edgeplaid.ops import reference
from edgeplaid.ops.dispatch import register, resolve

POSTS = ("none", "add", "mul", "geglu")


@dataclass(frozen=True)
class Int8Weight:
    """A linear layer's weight quantised per output channel.

    ``qweight (N, K) int8`` = round(weight · 127 / amax_n), ``scale (N,) float32`` = amax_n / 127,
    ``bias (N,) float32`` (zeros when the layer has none). ``packed``: the same values in the
    C++ kernel's layout with ``scale`` and ``bias`` zero-padded to its column blocks, or None
    (no C++ backend, or another device). ``inv_smooth (K,) float32``: 1 / the smoothing factors
    the weight's columns were multiplied by (``quantize_weight(..., smooth=)``), or None.
    ``rotate``: the Hadamard blocks' size the weight's rows were rotated by (0: none).
    """

    qweight: torch.Tensor
    scale: torch.Tensor
    bias: torch.Tensor
    packed: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None
    inv_smooth: torch.Tensor | None = None
    rotate: int = 0

    @property
    def out_features(self) -> int:
        return self.qweight.shape[0]

    @property
    def in_features(self) -> int:
        return self.qweight.shape[1]


def quantize_weight(
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    smooth: torch.Tensor | None = None,
    rotate: int = 0,
) -> Int8Weight:
    """Quantises ``weight (out_features, in_features)`` float per output channel (the rows of
    ``weight``, as :func:`edgeplaid.ops.reference.quantize_rows`), packing it for the C++ kernel
    when the weight is on the CPU and the kernel is built. ``smooth (in_features,)``: positive
    smoothing factors (:func:`smooth_factors`); the rows quantised are ``weight · smooth`` and
    :func:`int8_linear` divides ``x``'s channels by ``smooth`` before quantising them.

    ``rotate``: 0, or a power of two dividing ``in_features``: the rows quantised are then
    ``(weight · smooth) H / rotate`` and :func:`int8_linear` multiplies ``x``'s rows by ``H``
    (:func:`~edgeplaid.ops.reference.hadamard_blocks`, ``H H = rotate · I``) before quantising:
    the product is unchanged, while a row's few large elements are spread over its block (the
    MLP output projection's heavy-tailed input keeps its small elements; QuaRot's idea)."""
    if not isinstance(weight, torch.Tensor) or weight.ndim != 2 or weight.numel() == 0:
        raise ValueError(
            f"weight: expected a non-empty 2-D tensor (out_features, in_features), got "
            f"{getattr(weight, 'shape', type(weight).__name__)}"
        )
    w = weight.detach().float().contiguous()
    n, k = w.shape
    inv_smooth = None
    if smooth is not None:
        smooth = smooth.detach().float().to(w.device)
        if smooth.shape != (k,) or not bool(torch.isfinite(smooth).all()) or not bool((smooth > 0).all()):
            raise ValueError(
                f"smooth: expected ({k},) positive finite factors, got shape {tuple(smooth.shape)}"
                + ("" if smooth.shape != (k,) else f", min {float(smooth.min()):.3g}")
            )
        w = (w * smooth[None, :]).contiguous()
        inv_smooth = (1.0 / smooth).contiguous()
    is_int = isinstance(rotate, int) and not isinstance(rotate, bool)
    block = is_int and rotate >= 2 and not rotate & (rotate - 1) and k % rotate == 0
    if not is_int or (rotate != 0 and not block):
        raise ValueError(
            f"rotate: expected 0 or a power of two >= 2 dividing in_features ({k}), got {rotate!r}"
        )
    if rotate:
        w = (reference.hadamard_blocks(w, rotate) / rotate).contiguous()  # / 2^j: exact
    qweight, scale = reference.quantize_rows(w)
    if bias is None:
        b = torch.zeros(n, dtype=torch.float32, device=w.device)
    else:
        if bias.shape != (n,):
            raise ValueError(f"bias: expected shape ({n},), got {tuple(bias.shape)}")
        b = bias.detach().float().contiguous()
    packed = _pack(qweight, scale, b) if cpp.C is not None and w.device.type == "cpu" else None
    return Int8Weight(qweight, scale, b, packed, inv_smooth, rotate)


def smooth_factors(act_amax: torch.Tensor, weight: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """SmoothQuant's factors: ``s[k] = act_amax[k]^alpha / max_n |weight[n, k]|^(1 - alpha)``.

    ``act_amax (K,)``: each input channel's largest |activation| on calibration text; ``weight
    (N, K)``. Channels never active (or all-zero weight columns) get 1; factors are clamped to
    [1e-4, 1e4] of their median so no channel's weight column overflows or vanishes. Returns (K,)
    float32.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha: expected a value in [0, 1], got {alpha}")
    if weight.ndim != 2 or act_amax.shape != (weight.shape[1],):
        raise ValueError(
            f"act_amax: expected shape ({weight.shape[-1]},) for weight {tuple(weight.shape)}, "
            f"got {tuple(act_amax.shape)}"
        )
    a = act_amax.detach().float().cpu()
    wmax = weight.detach().float().abs().amax(0).cpu()
    live = (a > 0) & (wmax > 0) & torch.isfinite(a)
    s = torch.ones_like(a)
    s[live] = a[live].pow(alpha) / wmax[live].pow(1.0 - alpha)
    if bool(live.any()):
        mid = s[live].median()
        s = torch.where(live, s.clamp(mid * 1e-4, mid * 1e4), torch.ones_like(s))
    return s


def _pack(
    qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The C++ kernel's layout of the weights, and scale and bias zero-padded to its blocks."""
    blocks = torch.from_numpy(cpp.C.int8_linear_pack(qweight.cpu().contiguous().numpy()))
    padded = blocks.shape[0] * blocks.shape[2]

    def pad(t: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(padded, dtype=torch.float32)
        out[: t.shape[0]] = t.cpu()
        return out

    return blocks, pad(scale), pad(bias)


def int8_linear(
    x: torch.Tensor,
    weight: Int8Weight,
    post: str = "none",
    other: torch.Tensor | None = None,
    backend: str | None = None,
    norm: tuple[torch.Tensor, torch.Tensor | None, float] | None = None,
) -> torch.Tensor:
    """y[m, n] = float32(Σ_k qx[m, k] · qw[n, k]) · (sx[m] · sw[n]) + bias[n], then ``y + other``
    (post "add") or ``y · other`` (post "mul"); post "geglu": ``GELU(y[:, :N/2]) · y[:, N/2:]``
    (ModernBERT's MLP input in one pass; the erf GELU), ``(M, N/2)``.

    ``qx, sx`` quantise each row of ``x' = (LN(x) · inv_smooth) H`` (``LN(x) = x`` without ``norm``,
    no factor without smoothing, ``H`` the weight's Hadamard blocks or 1) to int8 at call time
    (``qx = round(x' · 127 / amax_m)``, ``sx = amax_m / 127``); ``qw, sw, bias, inv_smooth`` and
    the blocks come from :func:`quantize_weight`.

    ``norm = (weight, bias, eps)``: the layer norm in front of the layer, fused (a transformer's
    pre-norm): ``LN(x) = (x − mean) / sqrt(var + eps) · weight + bias`` over each row's K elements
    in float32 (torch.nn.functional.layer_norm's formula; ``bias`` may be None), never rounded to
    ``x``'s dtype: the norm's own pass over the rows and its output tensor are saved.

    ``x`` may be bfloat16 (a bf16 model's layer): its rows are widened as they are quantised,
    ``other`` (bf16 too) widened in the epilogue, and ``y`` rounded to bf16 once.

    Args:
        x: (M, K) float32 or bfloat16, K = ``weight.in_features``.
        weight: an :class:`Int8Weight`.
        post: "none", "add" or "mul".
        other: (M, N) of x's dtype for "add" / "mul", N = ``weight.out_features``.
        backend: "cpp" or "reference"; None picks by device.
        norm: ``(weight (K,), bias (K,) or None, eps)`` float tensors and a float, or None.

    Returns:
        (M, N) of x's dtype; (M, N / 2) for "geglu".
    """
    if not isinstance(weight, Int8Weight):
        raise TypeError(f"weight: expected an Int8Weight (quantize_weight), got {type(weight).__name__}")
    if not isinstance(x, torch.Tensor) or x.ndim != 2 or x.shape[1] != weight.in_features:
        got = getattr(x, "shape", type(x).__name__)
        raise ValueError(f"x: expected a 2-D tensor (rows, {weight.in_features}), got {got}")
    if x.dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"x: expected float32 or bfloat16, got {x.dtype}")
    if post not in POSTS:
        raise ValueError(f"post: expected one of {POSTS}, got {post!r}")
    if post == "geglu" and weight.out_features % 2:
        n = weight.out_features
        raise ValueError(f"weight: 'geglu' needs an even out_features (two halves), got {n}")
    if post in ("none", "geglu"):
        other = None
    elif other is None or other.shape != (x.shape[0], weight.out_features) or other.dtype != x.dtype:
        raise ValueError(
            f"other: expected a {str(x.dtype).removeprefix('torch.')} tensor of shape "
            f"({x.shape[0]}, {weight.out_features}) for post "
            f"{post!r}, got {None if other is None else (tuple(other.shape), other.dtype)}"
        )
    if norm is not None:
        norm = _check_norm(norm, weight.in_features)
    return resolve("int8_linear", x.device, backend)(x, weight, post, other, norm)


def _check_norm(
    norm: tuple[torch.Tensor, torch.Tensor | None, float], k: int
) -> tuple[torch.Tensor, torch.Tensor | None, float]:
    """``norm`` as float32 contiguous tensors and a float eps, or a ValueError naming the part."""
    if not isinstance(norm, tuple) or len(norm) != 3:
        raise ValueError(f"norm: expected a tuple (weight, bias or None, eps), got {type(norm).__name__}")
    w, b, eps = norm
    if not isinstance(w, torch.Tensor) or w.shape != (k,):
        got = getattr(w, "shape", type(w).__name__)
        raise ValueError(f"norm: expected a weight of shape ({k},), got {got}")
    if b is not None and (not isinstance(b, torch.Tensor) or b.shape != (k,)):
        got = getattr(b, "shape", type(b).__name__)
        raise ValueError(f"norm: expected a bias of shape ({k},) or None, got {got}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"norm: expected eps a non-negative number, got {eps!r}")
    w = w.detach().float().contiguous()
    b = None if b is None else b.detach().float().contiguous()
    return w, b, float(eps)


Norm = tuple[torch.Tensor, torch.Tensor | None, float] | None


def _reference(
    x: torch.Tensor, w: Int8Weight, post: str, other: torch.Tensor | None, norm: Norm
) -> torch.Tensor:
    wide = None if other is None else other.float()
    y = reference.int8_linear(x, w.qweight, w.scale, w.bias, post, wide, w.inv_smooth, norm, w.rotate)
    return y.to(x.dtype)


def _cpp(x: torch.Tensor, w: Int8Weight, post: str, other: torch.Tensor | None, norm: Norm) -> torch.Tensor:
    # Quantised on another device: laid out now (not cached: the bundle is frozen).
    blocks, scale, bias = w.packed if w.packed is not None else _pack(w.qweight, w.scale, w.bias)
    if post == "geglu" and w.out_features % (2 * blocks.shape[2]):  # the kernel pairs whole blocks
        # rounded once, as the kernel
        return reference.geglu(_cpp(x.float(), w, "none", None, norm)).to(x.dtype)
    nw, nb, eps = (None, None, 1e-5) if norm is None else norm
    out = cpp.C.int8_linear(
        cpp.host(x.contiguous()),
        blocks.numpy(),
        scale.numpy(),
        bias.numpy(),
        w.out_features,
        post,
        None if other is None else cpp.host(other.contiguous()),
        None if w.inv_smooth is None else w.inv_smooth.cpu().contiguous().numpy(),
        None if nw is None else nw.cpu().numpy(),
        None if nb is None else nb.cpu().numpy(),
        eps,
        w.rotate,
    )
    out = torch.from_numpy(out)
    return out.view(torch.bfloat16) if x.dtype == torch.bfloat16 else out


register("int8_linear", "reference", _reference)
register("int8_linear", "cpp", _cpp)
