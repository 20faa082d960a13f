"""A leaner inference forward for transformers' ``ModernBertModel`` (same weights, same maths).

Where transformers' ModernBERT spends its time on CPU, and what this forward does instead:

* Matrix products through MKL, which on AMD CPUs runs its AVX2 code (about 210 GFLOP/s on two EPYC
  cores where oneDNN's AVX-512 kernels reach 500): here every linear layer runs through oneDNN with
  its weight packed once (:class:`PackedLinears`), with the GLU's GELU and product and the residual
  additions fused into the products.
* Attention over all ``L x L`` pairs in every layer, although the local layers only let a token see
  the tokens within ``local_attention // 2`` positions: here the C++ attention op on CPU (float32
  heads on the vector units, bf16 on AMX tiles or AVX512-BF16) takes the window into its loop, and elsewhere
  those layers run blocks of queries against only the keys in their reach (``O(L * (block +
  window))`` work instead of ``O(L^2)``).
* Rotary embeddings recomputed per layer with ``cat``/``neg``/copies, 4-D masks rebuilt per call:
  here the query and key rows of ``Wqkv`` are stored with each rotary pair side by side (dot
  products between queries and keys do not depend on the order of their dimensions), so the
  rotation is one in-place pass with cached tables (a complex product; the C++ ``rotary_embed`` op
  for bf16 on CPUs), and masks are made once per batch.

Outputs match transformers to float32 rounding (the parity tests pin PyLate's outputs to 1e-5).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from edgeplaid._native import C, cpu_has_bf16
from edgeplaid.model._precision import INT8_DTYPES, quantize_layer, record_amax, rotation_block, vnni_int8
from edgeplaid.ops.attention import amx_present, attention, cpp_ready
from edgeplaid.ops.int8_linear import int8_linear
from edgeplaid.ops.rotary_embed import rotary_embed

AttentionPieces = list[tuple[slice, slice, "torch.Tensor | None"]]


def _onednn_linear_available() -> bool:
    try:
        return bool(torch.backends.mkldnn.is_available()) and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    except (AttributeError, RuntimeError):
        return False


def _is_erf_gelu(act: nn.Module) -> bool:
    """transformers' ``GELUActivation`` running ``F.gelu`` (the erf form), as ModernBERT's "gelu"."""
    return type(act).__name__ == "GELUActivation" and getattr(act, "act", None) is F.gelu


class PackedLinears:
    """Linear layers through oneDNN on CPU in float32, and in bf16 on CPUs that multiply bf16
    themselves, weights reordered into oneDNN's blocked layout once and cached (re-made when a
    weight is replaced or modified in place); ``F.linear`` and plain torch ops elsewhere (other
    devices and dtypes, builds without oneDNN).

    ``int8 = True``: float32 and bf16 CPU inputs run through :func:`edgeplaid.ops.int8_linear`
    instead (int8 weights per channel, int8 activations per token, weights quantised once and
    cached the same way; outputs in the input's dtype), except calls made with ``no_int8=True``;
    ``rotate``: the rows rotated by Hadamard blocks of that size (the MLP's output projection);
    ``norm``: a layer norm in front of the layer, fused into int8's quantisation (else applied).

    ``weight`` may be a transformed copy of a layer's weight (``derive``, cached the same way).
    ``post``: ``"gelu"`` applies the erf GELU; ``("add" | "mul", other)`` adds or multiplies an
    equal-shaped tensor. Results equal the unfused torch ops' to float32 rounding (bf16: to bf16
    rounding; oneDNN rounds once where the unfused ops round after the product and again after
    the GELU).
    """

    fuse_norms = True  # int8: layer norms in the kernel's quantisation (False: applied first)

    def __init__(self) -> None:
        self.enabled = _onednn_linear_available()
        self.bf16 = self.enabled and cpu_has_bf16()
        self.int8 = False
        # Calibration (model/_precision.py: calibrate_int8): while ``calibrating``, each call that
        # int8 would take records its input channels' largest |x| here, keyed by the id of the
        # layer's weight (shared with transformers' forward's QuantizedLinear layers, which read
        # the same weights on the same inputs); int8 weights are quantised with smooth_factors of them.
        self.calibrating = False
        self.act_amax: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id -> (weight, ranges)
        self._cache: dict[tuple[int, str], tuple[torch.Tensor, int, Any]] = {}

    def uses_onednn(self, x: torch.Tensor) -> bool:
        if not self.enabled or x.device.type != "cpu":
            return False
        return x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and self.bf16)

    def uses_int8(self, x: torch.Tensor) -> bool:
        return self.int8 and x.device.type == "cpu" and x.dtype in INT8_DTYPES

    def fuses_geglu(self, x: torch.Tensor, source: torch.Tensor) -> bool:
        """GELU(x Wa^T + ba) * (x Wb^T + bb) for ``source = [Wa; Wb]`` in one int8_linear call
        (post "geglu"): int8 with the VNNI kernel, whose tile computes the GELU (the other ISAs'
        epilogue does it in scalar code: there the two products and torch's GELU stay). 17m on
        2 Zen 4 cores: one pass over x instead of two, none over the products (torch's GELU took
        54 ms of 1.9 s for 200 abstracts)."""
        return self.uses_int8(x) and source.dtype == x.dtype and vnni_int8()

    def weight(
        self,
        source: torch.Tensor,
        tag: str = "",
        derive: Callable[[torch.Tensor], torch.Tensor] | None = None,
        packed: bool = False,
        bias: torch.Tensor | None = None,
        rotate: int = 0,
    ) -> Any:
        """``derive(source)`` (or ``source``), oneDNN-packed when ``packed`` (``"int8"``: quantised
        with ``bias``, an :class:`~edgeplaid.ops.Int8Weight`, rotated by ``rotate``'s Hadamard
        blocks and then not smoothed); cached per source tensor and tag, refreshed when the
        source changes."""
        key = (id(source), f"{tag}|{packed}|{rotate}")
        entry = self._cache.get(key)
        if entry is None or entry[0] is not source or entry[1] != source._version:
            with torch.no_grad():
                w = source.detach()
                if derive is not None:
                    w = derive(w)
                if packed == "int8":
                    # Factors of the whole source weight (derived ones take rows of it): the same as
                    # transformers' forward's QuantizedLinear uses for it.
                    w = quantize_layer(source, bias, self.act_amax, rotate, weight=w)
                elif packed:
                    w = torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), None)
            entry = (source, source._version, w)
            self._cache[key] = entry
        return entry[2]

    def __call__(
        self,
        x: torch.Tensor,
        source: torch.Tensor,
        bias: torch.Tensor | None,
        tag: str = "",
        derive: Callable[[torch.Tensor], torch.Tensor] | None = None,
        post: str | tuple[str, torch.Tensor] | None = None,
        no_int8: bool = False,
        norm: nn.Module | None = None,
        rotate: int = 0,
    ) -> torch.Tensor:
        if bias is not None and derive is not None:
            bias = self.weight(bias, tag, derive)
        int8 = not no_int8 and self.uses_int8(x) and source.dtype == x.dtype
        fused_norm = None
        if norm is not None:
            # A layer norm in front of an int8 layer is applied by the kernel to the rows it
            # quantises (int8_linear's norm): no pass of its own and no rounded output (17m's
            # int8 encoding on 2 Zen 4 cores: torch.layer_norm took 0.09 of 2.0 s for 200 abstracts).
            if int8 and self.fuse_norms and isinstance(norm, nn.LayerNorm) and norm.weight is not None:
                fused_norm = (
                    self.weight(norm.weight, "norm", lambda w: w.float()),
                    None if norm.bias is None else self.weight(norm.bias, "norm", lambda b: b.float()),
                    float(norm.eps),
                )
            else:
                x = norm(x)
        calibrate = self.calibrating and not no_int8 and not rotate and x.device.type == "cpu"
        if calibrate and x.dtype == source.dtype and x.dtype in INT8_DTYPES:
            record_amax(self.act_amax, source, x)
        if int8:
            q = self.weight(source, tag, derive, packed="int8", bias=bias, rotate=rotate)
            x2 = x.reshape(-1, x.shape[-1])
            if post is None or post == "gelu" or post == "geglu":
                y = int8_linear(x2, q, "geglu" if post == "geglu" else "none", norm=fused_norm)
                return F.gelu(y) if post == "gelu" else y
            op, other = post
            return int8_linear(x2, q, op, other.reshape(x2.shape[0], -1).contiguous(), norm=fused_norm)
        # bf16 with a residual add stays addmm below (as fast as oneDNN's binary post-op on a Zen 4,
        # one rounding); bf16 with a product runs the packed GEMM then the product (the binary
        # post-op took 3.6-4.4 ms against 1.7-2.4 for 4,096 rows there).
        bf16_add = x.dtype == torch.bfloat16 and isinstance(post, tuple) and post[0] == "add"
        if not self.uses_onednn(x) or source.dtype != x.dtype or bf16_add:
            w = self.weight(source, tag, derive)
            if bias is None and isinstance(post, tuple) and post[0] == "add" and x.ndim == 2:
                # other + x w^T as one GEMM accumulating into other (beta = 1): bf16 on 2 Xeon
                # cores 0.35 against 0.45 ms for 4,096 x 256 x 256, and one rounding instead of two.
                return torch.addmm(post[1].reshape(x.shape[0], -1), x, w.t())
            y = F.linear(x, w, bias)
            if post == "gelu":
                return F.gelu(y)
            if post is not None:
                op, other = post
                return y + other if op == "add" else y * other
            return y
        w = self.weight(source, tag, derive, packed=True)
        x = x.contiguous()
        if post is None or post == "gelu":
            return torch.ops.mkldnn._linear_pointwise(x, w, bias, post or "none", [], "none" if post else "")
        op, other = post
        if x.dtype == torch.bfloat16:  # "mul" (see above)
            return torch.ops.mkldnn._linear_pointwise(x, w, bias, "none", [], "") * other
        return torch.ops.mkldnn._linear_pointwise(x, other.contiguous(), w, bias, op)

    def linear(self, layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        return self(x, layer.weight, layer.bias)

    def clear(self) -> None:
        self._cache.clear()
        self.act_amax.clear()  # keyed by the parameters' ids, which .to() and friends replace

    def drop_copies(self) -> None:
        """Forgets the packed and quantised weight copies (remade at next use, e.g. with new
        smoothing), keeping the calibration."""
        self._cache.clear()


def _pairs_interleaved(head_dim: int, n_heads: int, hidden: int) -> torch.Tensor:
    """Row order of ``Wqkv`` putting each rotary pair ``(i, i + head_dim / 2)`` of every query and
    key head side by side (values untouched)."""
    half = head_dim // 2
    within = torch.stack((torch.arange(half), torch.arange(half) + half), dim=1).reshape(-1)
    heads = (torch.arange(2 * n_heads)[:, None] * head_dim + within[None, :]).reshape(-1)
    return torch.cat((heads, torch.arange(2 * hidden, 3 * hidden)))


class PackedModernBert(nn.Module):
    """Wraps a ``transformers.ModernBertModel`` (weights shared; ``linears`` caches the oneDNN-packed
    copies of its linear layers)."""

    def __init__(self, model: nn.Module, linears: PackedLinears | None = None, block: int = 64) -> None:
        super().__init__()
        self.model = model
        cfg = model.config
        self.n_heads = cfg.num_attention_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.window = cfg.local_attention // 2  # |q - k| <= window, as transformers' mask
        self.layer_types = list(cfg.layer_types)
        self.block = block  # query rows per piece of sliding-window attention
        self.linears = linears if linears is not None else PackedLinears()
        order = _pairs_interleaved(self.head_dim, self.n_heads, cfg.hidden_size)
        self._qkv_order = order
        self._rope: dict[tuple[str, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}
        self._bands: dict[tuple, torch.Tensor] = {}

    @staticmethod
    def supports(model: nn.Module) -> bool:
        """Whether ``model`` has the transformers 5.x ModernBERT layout this forward reads (shared
        rotary module with per-layer-type tables, ``layer_types``); otherwise use ``model(...)``."""
        cfg = getattr(model, "config", None)
        if getattr(cfg, "model_type", None) != "modernbert" or not getattr(cfg, "layer_types", None):
            return False
        if set(cfg.layer_types) - {"full_attention", "sliding_attention"}:
            return False
        if cfg.hidden_size % cfg.num_attention_heads or (cfg.hidden_size // cfg.num_attention_heads) % 2:
            return False
        rot = getattr(model, "rotary_emb", None)
        if rot is None or not all(hasattr(rot, f"{lt}_inv_freq") for lt in cfg.layer_types):
            return False
        layer = model.layers[0]
        return all(hasattr(layer, a) for a in ("attn_norm", "attn", "mlp_norm", "mlp")) and hasattr(
            layer.attn, "Wqkv"
        )

    def _rope_table(
        self, layer_type: str, length: int, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)``, each ``(length, head_dim // 2) float32``: transformers' tables (times the
        attention scaling), grown on demand and cached."""
        key = (layer_type, device)
        cached = self._rope.get(key)
        if cached is None or cached[0].shape[0] < length:
            rot = self.model.rotary_emb
            inv_freq = getattr(rot, f"{layer_type}_inv_freq").float().to(device)
            scaling = getattr(rot, f"{layer_type}_attention_scaling")
            n = max(length, 512)
            freqs = torch.arange(n, device=device, dtype=torch.float32)[:, None] * inv_freq[None, :]
            cached = (freqs.cos() * scaling, freqs.sin() * scaling)
            self._rope[key] = cached
        return cached[0][:length], cached[1][:length]

    def _band(
        self, rows: int, k_off: int, span: int, dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        """Additive ``(1, 1, rows, span)`` mask of the band ``|q - k| <= window`` for queries
        ``0..rows-1`` against keys ``k_off..k_off+span-1`` (relative to the block start), cached."""
        key = (rows, k_off, span, dtype, device)
        band = self._bands.get(key)
        if band is None:
            q = torch.arange(rows, device=device)[:, None]
            k = torch.arange(k_off, k_off + span, device=device)[None, :]
            allowed = (q - k).abs() <= self.window
            band = torch.zeros(allowed.shape, dtype=dtype, device=device)
            band = band.masked_fill_(~allowed, torch.finfo(dtype).min)[None, None]
            self._bands[key] = band
        return band

    def _pieces(self, key_mask: torch.Tensor, dtype: torch.dtype) -> dict[str, AttentionPieces]:
        """Attention per layer type as (query rows, key span, additive mask) pieces.

        Full layers: all queries against all keys, masked by ``key_mask`` (no mask when every key
        is valid). Sliding layers (``|q - k| <= window``, transformers' inclusive band): blocks of
        ``block`` queries, each against the keys within ``window`` of the block only, masked by the
        band and, where the span reaches padding, by ``key_mask``. Masked entries get the dtype's
        lowest value (not ``-inf``), so padding queries whose keys are all masked stay finite.
        """
        length = key_mask.shape[1]
        lowest = torch.finfo(dtype).min
        valid = key_mask.sum(1)
        shortest = int(valid.min())

        def padding(k0: int, k1: int) -> torch.Tensor:
            pad = torch.zeros((key_mask.shape[0], 1, 1, k1 - k0), dtype=dtype, device=key_mask.device)
            return pad.masked_fill_(~key_mask[:, None, None, k0:k1], lowest)

        whole = slice(0, length)
        full = [(whole, whole, None if shortest == length else padding(0, length))]
        w = self.window
        if length <= w + 1:  # every pair is within the window: the band masks nothing
            return {"full_attention": full, "sliding_attention": full}
        sliding: AttentionPieces = []
        for start in range(0, length, self.block):
            end = min(start + self.block, length)
            k0, k1 = max(0, start - w), min(length, end + w)
            mask = self._band(end - start, k0 - start, k1 - k0, dtype, key_mask.device)
            if k1 > shortest:  # the span reaches some sequence's padding
                mask = mask.masked_fill(~key_mask[:, None, None, k0:k1], lowest)
            sliding.append((slice(start, end), slice(k0, k1), mask))
        return {"full_attention": full, "sliding_attention": sliding}

    def forward(
        self, input_ids: torch.Tensor, key_mask: torch.Tensor, compute_mask: torch.Tensor
    ) -> torch.Tensor:
        """Hidden states of the positions in ``compute_mask``.

        Args:
            input_ids: ``(B, L) int64``.
            key_mask: ``(B, L) bool`` — positions other tokens may attend to (the attention mask).
            compute_mask: ``(B, L) bool`` — positions whose output is wanted (a superset of
                ``key_mask`` when queries are expanded without attending to the expansion tokens).

        Returns:
            ``(T, hidden)`` in the model's dtype, ``T = compute_mask.sum()``, row-major order.
        """
        m = self.model
        lin = self.linears
        b, length = input_ids.shape
        h = m.embeddings.norm(m.embeddings.tok_embeddings(input_ids.reshape(-1)))  # (B*L, hidden)
        nh, hd = self.n_heads, self.head_dim
        hidden = nh * hd
        # bf16 on CPUs with AMX tiles or AVX512-BF16: the attention op in bf16 (both layer types,
        # the window in the kernel; AMX tiles, else vdpbf16ps: on a 2-core Zen 4 17m's 4,096-token
        # heads 1.65-1.8x the float32 kernel); float32 below; otherwise torch's SDPA over the pieces.
        bf16_op = h.dtype == torch.bfloat16 and h.device.type == "cpu" and cpp_ready(torch.bfloat16, hd)
        # bf16 on a CPU with neither (or a narrower ISA forced): attention runs in float32. torch's
        # bf16 SDPA kernel was the slower one on a Zen 4 EPYC (AVX512-BF16, no AMX): 1.06 s against
        # 0.74 s of attention for two 4,096-token documents on 17m, 79% of bf16's encoding time
        # there (CPUs with AMX keep bf16 SDPA when both kernels are off: not measured in float32).
        wide = h.dtype == torch.bfloat16 and h.device.type == "cpu" and not bf16_op and not amx_present()
        sdpa_dtype = torch.float32 if wide else h.dtype
        # float32 attention on CPU: the C++ op too (both layer types, the window in the kernel;
        # 17m on a 2-core Zen 4, 4,096-token documents: 6,226-6,811 -> 8,231-8,556 tokens/s in
        # fp32, 256-token ones unchanged: torch's SDPA ran the global layers at ~65% of the FMA
        # peak and the sliding ones as one masked call per 64-query block).
        vec = (
            not bf16_op
            and h.device.type == "cpu"
            and sdpa_dtype == torch.float32
            and cpp_ready(torch.float32, hd)
        )
        op_keys = None if (bf16_op or vec) and bool(key_mask.all()) else key_mask
        pieces = None if bf16_op or vec else self._pieces(key_mask, sdpa_dtype)
        ropes = {lt: self._rope_table(lt, length, h.device) for lt in set(self.layer_types)}
        # bf16 on CPUs: the C++ op rotates in place (torch has no bf16 complex product; rotating a
        # float32 copy made 17m's bf16 encoding 9% slower: 130.2 against 142.4 docs/s on 2 Xeon
        # cores). Otherwise torch's in-place complex product (float32: as fast as the op, 60.3 vs
        # 58.2 docs/s), broadcast as (1, L, 1, 1, hd/2) over batch, q/k and heads.
        rope_cpp = h.device.type == "cpu" and C is not None and h.dtype == torch.bfloat16
        if not rope_cpp:
            ropes_c = {lt: torch.complex(*cs)[None, :, None, None, :] for lt, cs in ropes.items()}
        order = self._qkv_order.to(h.device)
        attn_out = h.new_empty((b, length, nh, hd))
        for layer, lt in zip(m.layers, self.layer_types, strict=True):
            attn = layer.attn
            qkv = lin(h, attn.Wqkv.weight, attn.Wqkv.bias, "qkv", lambda w: w[order], norm=layer.attn_norm)
            qkv = qkv.view(b, length, 3, nh, hd)
            qk = qkv[:, :, :2]
            if rope_cpp:  # a (B, L, 2 * nh, hd) view: the op takes any strides but the last
                rotary_embed(qk.flatten(2, 3), *ropes[lt], backend="cpp")
            elif qk.dtype == torch.float32:
                torch.view_as_complex(qk.unflatten(-1, (hd // 2, 2))).mul_(ropes_c[lt])
            else:  # no complex half products: rotate a float32 copy
                wide = qk.float()
                torch.view_as_complex(wide.unflatten(-1, (hd // 2, 2))).mul_(ropes_c[lt])
                qk.copy_(wide)
            if bf16_op or vec:  # (B, L, H, hd) views straight into the kernel, which writes its output
                window = self.window if lt == "sliding_attention" else None
                if bf16_op or qkv.dtype == torch.float32:
                    q, k, v = qkv.unbind(2)
                    attention(q, k, v, op_keys, window, hd**-0.5, attn_out, backend="cpp")
                else:  # bf16 heads, float32 attention
                    q, k, v = qkv.float().unbind(2)
                    wide_out = attention(q, k, v, op_keys, window, hd**-0.5, backend="cpp")
                    attn_out.copy_(wide_out)
            else:
                q, k, v = (qkv[:, :, j].transpose(1, 2).to(sdpa_dtype) for j in range(3))  # (B, H, L, hd)
                for rows, keys, mask in pieces[lt]:
                    o = F.scaled_dot_product_attention(
                        q[:, :, rows], k[:, :, keys], v[:, :, keys], attn_mask=mask, scale=hd**-0.5
                    )
                    attn_out[:, rows] = o.transpose(1, 2)
            h = lin(attn_out.view(b * length, hidden), attn.Wo.weight, attn.Wo.bias, post=("add", h))
            mlp = layer.mlp
            wi, bi = mlp.Wi.weight, mlp.Wi.bias
            n = wi.shape[0] // 2
            if _is_erf_gelu(mlp.act) and lin.fuses_geglu(h, wi):
                gated = lin(h, wi, bi, post="geglu", norm=layer.mlp_norm)
            elif _is_erf_gelu(mlp.act):
                x = layer.mlp_norm(h)
                act = lin(x, wi, bi, "in", lambda w, n=n: w[:n], post="gelu")
                gated = lin(x, wi, bi, "gate", lambda w, n=n: w[n:], post=("mul", act))
            else:
                inp, gate = lin(layer.mlp_norm(h), wi, bi).chunk(2, dim=-1)
                gated = mlp.act(inp) * gate
            # The MLP's output projection: int8 rotated by Hadamard blocks (its input, GELU(a) * b,
            # is heavy tailed per token: the 32m test model's mean cosine to fp32 was 0.99897 with
            # it in plain int8, 0.99958 with it in bf16); in the model's dtype where no block fits.
            rotate = rotation_block(gated.shape[-1])
            h = lin(gated, mlp.Wo.weight, mlp.Wo.bias, post=("add", h), no_int8=not rotate, rotate=rotate)
        h = m.final_norm(h)
        return h[compute_mask.reshape(-1)]
