"""Kronecker: W = A (x) B, the TT matrix with 2 cores of rank 1.

Projection is TT-SVD with rank 1, which for two cores is exactly Van Loan's nearest Kronecker
product (the best rank-1 SVD of the rearranged matrix).
"""

from .tt import TT


class Kronecker(TT):
    """G0: (1, i_0, o_0, 1) = A^T, G1: (1, i_1, o_1, 1) = B^T; W = A (x) B."""

    name = "kronecker"

    def __init__(self, in_features, out_features, bias=True, device=None, dtype=None,
                 in_factors=None, out_factors=None):
        super().__init__(in_features, out_features, cores=2, rank=1, bias=bias, device=device,
                         dtype=dtype, in_factors=in_factors, out_factors=out_factors)

    def structure_args(self):
        return {"in_factors": self.in_factors, "out_factors": self.out_factors}
