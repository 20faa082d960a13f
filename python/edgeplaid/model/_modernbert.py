"""A leaner inference forward for transformers' ``ModernBertModel`` (same weights, same maths).

Why not ``model(...)``: on CPU, transformers' ModernBERT spends about a quarter of its time outside
the matrix products — rotary embeddings recomputed per layer with ``cat``/``neg``/float copies, 4-D
masks rebuilt per call — and runs every linear layer on padding. Here the linear layers, norms and
the GLU run on packed tokens ``(T, hidden)`` (no padding at all), rotary tables are cached per
length, and only attention sees a padded ``(B, H, L, head_dim)`` view with one boolean mask per
layer type per batch. Outputs match transformers to float32 rounding (the parity tests pin it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PackedModernBert(nn.Module):
    """Wraps a ``transformers.ModernBertModel`` (weights shared, not copied)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        cfg = model.config
        self.n_heads = cfg.num_attention_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.window = cfg.local_attention // 2  # |q - k| <= window, as transformers' mask
        self.layer_types = list(cfg.layer_types)
        self._rope: dict[tuple[str, torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    @staticmethod
    def supports(model: nn.Module) -> bool:
        """Whether ``model`` has the transformers 5.x ModernBERT layout this forward reads (shared
        rotary module with per-layer-type tables, ``layer_types``); otherwise use ``model(...)``."""
        cfg = getattr(model, "config", None)
        if getattr(cfg, "model_type", None) != "modernbert" or not getattr(cfg, "layer_types", None):
            return False
        rot = getattr(model, "rotary_emb", None)
        if rot is None or not all(hasattr(rot, f"{lt}_inv_freq") for lt in cfg.layer_types):
            return False
        layer = model.layers[0]
        return all(hasattr(layer, a) for a in ("attn_norm", "attn", "mlp_norm", "mlp")) and hasattr(
            layer.attn, "Wqkv"
        )

    def _rope_table(
        self, layer_type: str, length: int, ref: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin ``(length, head_dim // 2)`` in ``ref.dtype``: the first half of transformers'
        ``cat(freqs, freqs)`` tables (both halves are equal), grown on demand and cached."""
        key = (layer_type, ref.device, ref.dtype)
        cached = self._rope.get(key)
        if cached is None or cached[0].shape[0] < length:
            rot = self.model.rotary_emb
            inv_freq = getattr(rot, f"{layer_type}_inv_freq").float().to(ref.device)
            scaling = getattr(rot, f"{layer_type}_attention_scaling")
            n = max(length, 512)
            freqs = torch.arange(n, device=ref.device, dtype=torch.float32)[:, None] * inv_freq[None, :]
            cached = ((freqs.cos() * scaling).to(ref.dtype), (freqs.sin() * scaling).to(ref.dtype))
            self._rope[key] = cached
        return cached[0][:length], cached[1][:length]

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
        b, length = input_ids.shape
        flat = compute_mask.reshape(-1).nonzero().squeeze(1)  # (T,) positions in the (B*L) grid
        positions = flat % length
        h = m.embeddings.norm(m.embeddings.tok_embeddings(input_ids.reshape(-1)[flat]))
        t, hidden = h.shape
        nh, hd = self.n_heads, self.head_dim
        half = hd // 2

        # Masks: keys everywhere allowed by key_mask; sliding layers add the band |q - k| <= window.
        all_keys = bool(key_mask.all())
        key4 = None if all_keys else key_mask[:, None, None, :]
        masks: dict[str, torch.Tensor | None] = {"full_attention": key4}
        if length > self.window + 1:
            ar = torch.arange(length, device=input_ids.device)
            band = (ar[:, None] - ar[None, :]).abs() <= self.window
            masks["sliding_attention"] = band[None, None] if all_keys else band[None, None] & key4
        else:
            masks["sliding_attention"] = key4
        ropes = {}
        for lt in set(self.layer_types):
            cos, sin = self._rope_table(lt, length, h)
            ropes[lt] = (cos[positions][:, None, None], sin[positions][:, None, None])  # (T, 1, 1, hd/2)

        # (B*L, 3, H, hd) buffer that attention reads; padding rows stay zero.
        grid = h.new_zeros((b * length, 3, nh, hd))
        for layer, lt in zip(m.layers, self.layer_types, strict=True):
            x = layer.attn_norm(h)
            qkv = layer.attn.Wqkv(x).view(t, 3, nh, hd)
            cos, sin = ropes[lt]
            # Rotary on q and k together: rotate_half(x) * sin == cat(-x2, x1) * sin.
            qk = qkv[:, :2]
            x1, x2 = qk[..., :half], qk[..., half:]
            grid[flat, :2] = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
            grid[flat, 2] = qkv[:, 2]
            g = grid.view(b, length, 3, nh, hd)
            q, k, v = (g[:, :, i].transpose(1, 2) for i in range(3))  # (B, H, L, hd)
            attn = F.scaled_dot_product_attention(q, k, v, attn_mask=masks[lt], scale=hd**-0.5)
            attn = attn.transpose(1, 2).reshape(b * length, hidden)[flat]
            h = h + layer.attn.Wo(attn)
            mlp = layer.mlp
            inp, gate = mlp.Wi(layer.mlp_norm(h)).chunk(2, dim=-1)
            h = h + mlp.Wo(mlp.act(inp) * gate)
        return m.final_norm(h)
