"""doc_offsets from per-document lengths: the packed layout every op over documents takes."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def offsets_from_lengths(
    lengths: torch.Tensor | Sequence[int], device: str | torch.device | None = None
) -> torch.Tensor:
    """offsets[0] = 0, offsets[i + 1] = Σ_{j <= i} lengths[j].

    Args:
        lengths: (nd,) integer token counts (doclens), a tensor on any device or a sequence of ints.
        device: where the offsets go; None: the lengths' device (the CPU for a sequence), so
            offsets of GPU doclens are computed on the GPU without a round trip through the host.

    Returns:
        (nd + 1,) int64 on ``device``, document i spanning [offsets[i], offsets[i + 1]).
    """
    lengths = (
        torch.as_tensor(lengths, dtype=torch.int64) if not isinstance(lengths, torch.Tensor) else lengths
    )
    if lengths.dim() != 1:
        raise ValueError(f"lengths: expected a 1-D tensor (n_docs,), got shape {tuple(lengths.shape)}")
    target = lengths.device if device is None else torch.device(device)
    offsets = torch.zeros(lengths.shape[0] + 1, dtype=torch.int64, device=target)
    torch.cumsum(lengths.to(device=target, dtype=torch.int64), 0, out=offsets[1:])
    return offsets
