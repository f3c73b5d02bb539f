"""Triton kernels for the fused Monarch/BTT contractions (installed as structlayers.kernels)."""
