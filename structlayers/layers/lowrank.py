"""LowRank: W = (U V)^T with U (in, rank), V (rank, out); projection by truncated SVD."""

import torch

from ..base import StructuredLinear
from ..program import make_program, make_step
from ..sizes import check_ranks


class LowRank(StructuredLinear):
    """U: (in, rank), V: (rank, out). Steps: (T, i) x U -> (T, r); (T, r) x V -> (T, o).

    rank: an int in 1..min(in, out), or None (64, capped at min(in, out)).
    """

    name = "lowrank"

    def __init__(self, in_features, out_features, rank=None, bias=True, device=None, dtype=None):
        super().__init__(in_features, out_features)
        i, o = self.in_features, self.out_features
        (self.rank,) = check_ranks("rank", rank, 1, lambda k, left: min(i, o), default=64)
        sizes = {"i": i, "o": o, "r": self.rank}
        steps = [make_step("U", ("i",), ("i", "r"), ("r",), sizes),
                 make_step("V", ("r",), ("r", "o"), ("o",), sizes)]
        self._build(make_program(("i",), steps, sizes), {"U": (i, self.rank), "V": (self.rank, o)},
                    i, o, bias, device, dtype)

    def structure_args(self):
        return {"rank": self.rank}

    def _project(self, weight):
        left, s, right = torch.linalg.svd(weight, full_matrices=False)
        root = s[: self.rank].sqrt()
        return {"U": (root[:, None] * right[: self.rank]).T, "V": (left[:, : self.rank] * root).T}
