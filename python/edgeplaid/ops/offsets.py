"""doc_offsets from per-document lengths: the packed layout every op over documents takes."""

from __future__ import annotations

import torch


def offsets_from_lengths(lengths: torch.Tensor) -> torch.Tensor:
    """offsets[0] = 0, offsets[i + 1] = Σ_{j <= i} lengths[j].

    Args:
        lengths: (nd,) integer token counts (doclens), any device.

    Returns:
        (nd + 1,) int64 on the CPU, document i spanning [offsets[i], offsets[i + 1]).
    """
    offsets = torch.zeros(lengths.shape[0] + 1, dtype=torch.int64)
    torch.cumsum(lengths.to(torch.int64).cpu(), 0, out=offsets[1:])
    return offsets
