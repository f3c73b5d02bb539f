"""TT (tensor-train matrix, MPO; Novikov et al. 2015).

in = i_0 * ... * i_{d-1}, out = o_0 * ... * o_{d-1}; core k: (r_{k-1}, i_k, o_k, r_k), r_{-1} = r_d = 1.
W[(o_0..o_{d-1}), (i_0..i_{d-1})] = G_0[:, i_0, o_0, :] @ G_1[:, i_1, o_1, :] @ ... (a 1x1 result).
Step k contracts (r_{k-1}, i_k) and produces (o_k, r_k): its muP fans are
(r_{k-1} i_k, o_k r_k). Projection: TT-SVD.
"""

from math import prod

import torch

from ..base import StructuredLinear
from ..program import make_program, make_step
from ..sizes import check_ranks, check_size, resolve_factors


class TT(StructuredLinear):
    """cores G0..G{d-1}, G_k: (r_{k-1}, in_factors[k], out_factors[k], r_k).

    rank: an int, one int per bond, or None (8, capped per bond at what the sizes allow).
    """

    name = "tt"

    def __init__(self, in_features, out_features, cores=3, rank=None, bias=True, device=None,
                 dtype=None, in_factors=None, out_factors=None):
        super().__init__(in_features, out_features)
        d = check_size("cores", cores)
        self.in_factors = resolve_factors("in_factors", in_factors, self.in_features, d)
        self.out_factors = resolve_factors("out_factors", out_factors, self.out_features, d)
        pairs = [i * o for i, o in zip(self.in_factors, self.out_factors, strict=True)]
        # the largest useful r_k: rows (r_{k-1} i_k o_k) or columns of the TT-SVD unfolding
        self.ranks = check_ranks("rank", rank, d - 1,
                                 lambda k, left: min(left * pairs[k], prod(pairs[k + 1:])),
                                 default=8)
        full_ranks = (1, *self.ranks, 1)

        sizes = {f"i{k}": s for k, s in enumerate(self.in_factors)}
        sizes |= {f"o{k}": s for k, s in enumerate(self.out_factors)}
        sizes |= {f"r{k}": r for k, r in enumerate(self.ranks)}
        bond = [None, *(f"r{k}" for k in range(d - 1)), None]  # bond[k]: left rank of core k

        def modes(*names):
            return tuple(m for m in names if m is not None)

        in_modes = tuple(f"i{k}" for k in range(d))
        steps, x = [], in_modes
        for k in range(d):
            out = modes(*(f"o{j}" for j in range(k + 1)), bond[k + 1], *in_modes[k + 1:])
            steps.append(make_step(f"G{k}", x, modes(bond[k], f"i{k}", f"o{k}", bond[k + 1]),
                                   out, sizes))
            x = out
        shapes = {f"G{k}": (full_ranks[k], self.in_factors[k], self.out_factors[k], full_ranks[k + 1])
                  for k in range(d)}
        self._build(make_program(in_modes, steps, sizes), shapes, prod(self.in_factors),
                    prod(self.out_factors), bias, device, dtype)

    @property
    def projection_is_optimal(self):  # TT-SVD is optimal up to 2 cores, quasi-optimal beyond
        return len(self.in_factors) <= 2

    def structure_args(self):
        rank = {"rank": self.ranks} if self.ranks else {}  # one core has no bond to give a rank
        return {"cores": len(self.in_factors), **rank,
                "in_factors": self.in_factors, "out_factors": self.out_factors}

    def _project(self, weight):
        """TT-SVD of W tensorized to (i_0 o_0, i_1 o_1, ...): truncated SVDs left to right."""
        d = len(self.in_factors)
        w = weight.reshape(*self.out_factors, *self.in_factors)
        w = w.permute(*[p for k in range(d) for p in (d + k, k)])  # (i0, o0, i1, o1, ...)
        cores, rest, left = {}, w.reshape(1, -1), 1
        for k in range(d - 1):
            rest = rest.reshape(left * self.in_factors[k] * self.out_factors[k], -1)
            u, s, vh = torch.linalg.svd(rest, full_matrices=False)
            r = self.ranks[k]
            cores[f"G{k}"] = u[:, :r].reshape(left, self.in_factors[k], self.out_factors[k], r)
            rest, left = s[:r, None] * vh[:r], r
        cores[f"G{d - 1}"] = rest.reshape(left, self.in_factors[-1], self.out_factors[-1], 1)
        return cores
