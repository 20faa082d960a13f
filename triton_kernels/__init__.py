"""Triton GPU kernels of edgeplaid (installed as edgeplaid.triton_kernels); see the Triton issue."""
