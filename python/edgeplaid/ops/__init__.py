"""edgeplaid's ops: one public function per op, each with a pure-PyTorch twin in
:mod:`edgeplaid.ops.reference` and a backend picked by :func:`edgeplaid.ops.dispatch.resolve`.
"""

from edgeplaid.ops.attention import attention
from edgeplaid.ops.centroid_interaction import centroid_interaction, centroid_interaction_topk
from edgeplaid.ops.centroid_scores import centroid_scores, quantise_centroids
from edgeplaid.ops.compress_residuals import compress_residuals
from edgeplaid.ops.decompress_residuals import decompress_residuals
from edgeplaid.ops.dispatch import BackendUnavailableError, available_backends
from edgeplaid.ops.fused_decompress_maxsim import fused_decompress_maxsim, residual_inv_norms
from edgeplaid.ops.int8_linear import Int8Weight, int8_linear, quantize_weight, smooth_factors
from edgeplaid.ops.maxsim import maxsim
from edgeplaid.ops.maxsim_packed import maxsim_packed
from edgeplaid.ops.nearest_centroids import CentroidGroups, centroid_groups, nearest_centroids
from edgeplaid.ops.offsets import offsets_from_lengths
from edgeplaid.ops.rotary_embed import rotary_embed

__all__ = [
    "BackendUnavailableError",
    "CentroidGroups",
    "Int8Weight",
    "attention",
    "available_backends",
    "centroid_groups",
    "centroid_interaction",
    "centroid_interaction_topk",
    "centroid_scores",
    "compress_residuals",
    "decompress_residuals",
    "fused_decompress_maxsim",
    "int8_linear",
    "maxsim",
    "maxsim_packed",
    "nearest_centroids",
    "offsets_from_lengths",
    "quantise_centroids",
    "quantize_weight",
    "residual_inv_norms",
    "rotary_embed",
    "smooth_factors",
]
