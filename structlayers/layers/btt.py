"""BTT (block tensor-train; Qiu et al. 2024, "Compute Better Spent").

in = m_0 * ... * m_{d-1}, out = n_0 * ... * n_{d-1}, bond ranks r_0..r_{d-2}.
x is viewed as (m_{d-1}, ..., m_0); core k contracts (m_k, r_{k-1}) and produces (n_k, r_k), with a
separate block for every value of the modes it does not touch: the outputs already made (n_<k) and
the inputs not yet used (m_>k). Stored as a batched matmul operand:
    core k: (prod(n_<k) * prod(m_>k), m_k * r_{k-1}, n_k * r_k)
For d = 2: W0 (m1, m0, n0*r), W1 (n0, m1*r, n1) and
    y[n0, n1] = sum_{m1, r} W1[n0, (m1, r), n1] * sum_{m0} W0[m1, m0, (n0, r)] * x[m1, m0].
With r = 1 it is Monarch. FLOPs per token = 2 * (number of core entries).
Projection: for d = 2 the closed form (a rank-r SVD of every (n0, m1) slice); for d > 2 the
same blockwise SVD applied core by core (a TT-SVD with blocks).
"""

from math import prod

import torch

from ..base import StructuredLinear
from ..program import make_program, make_step
from ..sizes import check_ranks, check_size, resolve_factors


class BTT(StructuredLinear):
    """cores W0..W{d-1}; W_k: (blocks_k, m_k * r_{k-1}, n_k * r_k)."""

    name = "btt"

    def __init__(self, in_features, out_features, rank=1, cores=2, bias=True, device=None,
                 dtype=None, in_factors=None, out_factors=None):
        super().__init__(in_features, out_features)
        d = check_size("cores", cores)
        if d < 2:
            raise ValueError(f"cores must be >= 2 for BTT, got {d} (use Dense for one core)")
        # ascending factors: m_{d-1} (the first core's block count) and n_0 are the big ones, so
        # the intermediate (m_1 n_0 r for 2 cores) can reach full rank
        m = self.in_factors = resolve_factors("in_factors", in_factors, self.in_features, d)
        n = self.out_factors = resolve_factors("out_factors", out_factors, self.out_features, d)
        # the largest useful r_k: rows (m_k r_{k-1}) or columns (n_>k) of the blockwise SVD
        self.ranks = check_ranks("rank", rank, d - 1,
                                 lambda k, left: min(m[k] * left, prod(n[k + 1:])))

        sizes = {f"m{k}": s for k, s in enumerate(m)} | {f"n{k}": s for k, s in enumerate(n)}
        sizes |= {f"r{k}": r for k, r in enumerate(self.ranks)}
        bond = [None, *(f"r{k}" for k in range(d - 1)), None]  # bond[k]: left rank of core k
        in_modes = tuple(f"m{k}" for k in reversed(range(d)))
        steps, shapes, x = [], {}, in_modes
        for k in range(d):
            blocks = _block_modes(k, d)
            summed = [b for b in (f"m{k}", bond[k]) if b is not None]
            made = [b for b in (f"n{k}", bond[k + 1]) if b is not None]
            out = (*(f"n{j}" for j in range(k + 1)), *(f"m{j}" for j in reversed(range(k + 1, d))),
                   *made[1:])
            steps.append(make_step(f"W{k}", x, (*blocks, *summed, *made), out, sizes))
            shapes[f"W{k}"] = tuple(prod(sizes[s] for s in group) for group in (blocks, summed, made))
            x = out
        self._build(make_program(in_modes, steps, sizes), shapes, prod(m), prod(n),
                    bias, device, dtype)

    @property
    def projection_is_optimal(self):  # the blockwise SVD is optimal up to 2 cores, quasi-optimal beyond
        return len(self.in_factors) <= 2

    def structure_args(self):
        args = {"rank": self.ranks if len(set(self.ranks)) > 1 else self.ranks[0]}
        return args | {"cores": len(self.in_factors), "in_factors": self.in_factors,
                       "out_factors": self.out_factors}

    def _project(self, weight):
        """Blockwise SVD, core by core. `rest` carries modes (blocks, rows, cols) per step."""
        m, n, d = self.in_factors, self.out_factors, len(self.in_factors)
        # rest: (n_<k, m_>k | m_k, r_{k-1} | n_k, n_>k) ; start: W as (n_0..n_{d-1}, m_{d-1}..m_0)
        rest = weight.reshape(*n, *reversed(m))
        rest = rest.permute(*range(d, 2 * d - 1), 2 * d - 1, *range(d))  # (m_>0, m_0, n_0, n_>0)
        rest = rest.reshape(prod(m[1:]), m[0], n[0], prod(n[1:]))
        cores = {}
        for k in range(d - 1):
            blocks_in, rows = rest.shape[0], rest.shape[1]
            # batch (blocks, n_k): (rows, n_>k) slices of rank r_k
            sliced = rest.permute(0, 2, 1, 3)  # (blocks, n_k, rows, n_>k)
            u, s, vh = torch.linalg.svd(sliced, full_matrices=False)
            r = self.ranks[k]
            root = s[..., :r].sqrt()
            core = u[..., :r] * root[..., None, :]  # (blocks, n_k, rows, r)
            cores[f"W{k}"] = core.permute(0, 2, 1, 3).reshape(blocks_in, rows, n[k] * r)
            right = root[..., :, None] * vh[..., :r, :]  # (m_>k, n_<k; n_k, r_k, n_>k)
            # next blocks are (n_<=k, m_>k+1): move n_k next to n_<k, split m_{k+1} off m_>k
            right = right.reshape(prod(n[:k]), prod(m[k + 2:]), m[k + 1], n[k], r, n[k + 1],
                                  prod(n[k + 2:]))
            # (n_<k, n_k, m_>k+1 | m_{k+1}, r_k | n_{k+1} | n_>k+1)
            rest = right.permute(0, 3, 1, 2, 4, 5, 6).reshape(
                prod(n[: k + 1]) * prod(m[k + 2:]), m[k + 1] * r, n[k + 1], prod(n[k + 2:]))
        cores[f"W{d - 1}"] = rest.reshape(rest.shape[0], rest.shape[1], n[d - 1])
        return cores


def _block_modes(k: int, d: int) -> tuple[str, ...]:
    """Modes over which core k is block-diagonal: outputs made so far, inputs not yet used."""
    return (*(f"n{j}" for j in range(k)), *(f"m{j}" for j in reversed(range(k + 1, d))))
