"""Monarch (Dao et al. 2022): M = P2 B2 P1 B1, two block-diagonal factors with a transpose
permutation between them; the BTT with 2 cores and rank 1.

With b blocks: B1 has b blocks of (in/b -> out/b), B2 has out/b blocks of (b -> b); for a square
n x n layer with b = sqrt(n) both are b blocks of sqrt(n) x sqrt(n) (the paper's case). Any sizes:
in and out are padded up to multiples of b. Projection: the closed-form blockwise rank-1 SVD.
"""

from math import log, prod, sqrt

from ..sizes import CHEAP_ENOUGH, check_size, padded_multiple
from .btt import BTT


class Monarch(BTT):
    """W0: (b, in/b, out/b) and W1: (out/b, b, b) (padded sizes); see BTT."""

    name = "monarch"

    def __init__(self, in_features, out_features, blocks=None, bias=True, device=None,
                 dtype=None):
        i = check_size("in_features", in_features)
        o = check_size("out_features", out_features)
        if blocks is None:
            blocks = default_blocks(i, o)
        b = check_size("blocks", blocks)
        if b > min(i, o):
            raise ValueError(f"blocks={b} is out of range: valid is 1..min(in, out) = {min(i, o)}")
        self.blocks = b
        super().__init__(i, o, rank=1, cores=2, bias=bias, device=device, dtype=dtype,
                         in_factors=(padded_multiple(i, b) // b, b),
                         out_factors=(padded_multiple(o, b) // b, b))

    def structure_args(self):
        return {"blocks": self.blocks}


def default_blocks(in_features: int, out_features: int) -> int:
    """About sqrt(in) blocks: among the counts whose FLOPs, 2 * (i o / b + o b) on the padded
    sizes, are within 10% of the fewest, the one that pads least, then the closest to sqrt(in)."""

    def padded(b):
        return padded_multiple(in_features, b), padded_multiple(out_features, b)

    def flops(b):
        i, o = padded(b)
        return i * o / b + o * b

    counts = range(1, min(in_features, out_features) + 1)
    cheapest = min(flops(b) for b in counts)
    return min((b for b in counts if flops(b) <= CHEAP_ENOUGH * cheapest),
               key=lambda b: (prod(padded(b)), abs(log(b / sqrt(in_features)))))
