"""Tensor-network structure search (installed as structlayers.search)."""
