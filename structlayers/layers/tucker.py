"""Tucker layer: W tensorized to (o_0..o_{d-1}, i_0..i_{d-1}) is a Tucker tensor
    W = core x_0 U_out0 ... x_{d-1} U_out{d-1} x_d U_in0 ... (a factor per mode).
Forward contracts x with the input factors, then the core, then the output factors; W is never
materialized. Projection: HOOI in torch (`hooi`, from the HOSVD start).
"""

from math import prod

import torch

from ..base import StructuredLinear
from ..program import make_program, make_step
from ..sizes import check_size, resolve_factors


class Tucker(StructuredLinear):
    """in_factor{k}: (i_k, p_k); core: (q_0..q_{d-1}, p_0..p_{d-1}); out_factor{k}: (o_k, q_k).

    rank: int (the same on every mode; must fit every mode), a sequence of 2d ranks
    (output modes then input modes, the order of the tensorized weight), a float (the fraction of
    the dense parameter count to spend) or 'same' (as many parameters as dense).
    """

    name = "tucker"

    def __init__(self, in_features, out_features, rank=0.25, modes=2, bias=True, device=None,
                 dtype=None, in_factors=None, out_factors=None):
        super().__init__(in_features, out_features)
        d = check_size("modes", modes)
        self.in_factors = resolve_factors("in_factors", in_factors, self.in_features, d)
        self.out_factors = resolve_factors("out_factors", out_factors, self.out_features, d)
        self.rank = rank
        self.ranks = tucker_ranks(rank, (*self.out_factors, *self.in_factors),
                                  self.in_features * self.out_features)
        q, p = self.ranks[:d], self.ranks[d:]

        sizes = {f"i{k}": s for k, s in enumerate(self.in_factors)}
        sizes |= {f"o{k}": s for k, s in enumerate(self.out_factors)}
        sizes |= {f"p{k}": r for k, r in enumerate(p)} | {f"q{k}": r for k, r in enumerate(q)}
        in_modes = tuple(f"i{k}" for k in range(d))
        steps, shapes, x = [], {}, in_modes
        for k in range(d):
            out = tuple(f"p{k}" if mode == f"i{k}" else mode for mode in x)
            steps.append(make_step(f"in_factor{k}", x, (f"i{k}", f"p{k}"), out, sizes))
            shapes[f"in_factor{k}"] = (self.in_factors[k], p[k])
            x = out
        core_out = tuple(f"q{k}" for k in range(d))
        steps.append(make_step("core", x, (*core_out, *x), core_out, sizes))
        shapes["core"] = (*q, *p)
        x = core_out
        for k in range(d):
            out = tuple(f"o{k}" if mode == f"q{k}" else mode for mode in x)
            steps.append(make_step(f"out_factor{k}", x, (f"o{k}", f"q{k}"), out, sizes))
            shapes[f"out_factor{k}"] = (self.out_factors[k], q[k])
            x = out
        self._build(make_program(in_modes, steps, sizes), shapes, prod(self.in_factors),
                    prod(self.out_factors), bias, device, dtype)

    def structure_args(self):
        return {"rank": self.ranks, "modes": len(self.in_factors),
                "in_factors": self.in_factors, "out_factors": self.out_factors}

    def _project(self, weight):
        """HOOI from the HOSVD start. Small tensors also start from four random orthonormal
        factor sets (HOOI stops at local optima the HOSVD start does not always avoid), keeping
        the best; large ones sweep in float32 (2x the speed; on unstructured weights HOOI creeps
        for 100 sweeps) and finish with two float64 sweeps."""
        d = len(self.in_factors)
        tensor = weight.reshape(*self.out_factors, *self.in_factors)
        groups = (range(d), range(d, 2 * d))  # output modes, input modes
        if tensor.numel() <= 2**16:
            generator = torch.Generator(device="cpu").manual_seed(0)
            starts = [None] + [_random_factors(tensor.shape, self.ranks, generator) for _ in range(4)]
            fits = [hooi(tensor, self.ranks, start, tol=1e-10, groups=groups) for start in starts]
            core, factors = max(fits, key=lambda fit: fit[0].norm())  # orthonormal factors: the
        else:                                                          # largest core fits best
            _, rough = hooi(tensor.float(), self.ranks, tol=1e-7, groups=groups)
            core, factors = hooi(tensor, self.ranks, [f.to(tensor) for f in rough], max_sweeps=2,
                                 tol=0.0, groups=groups)
        return self._named(core, factors)

    def _reproject(self, weight, previous):
        """One HOOI from the previous factors: the padding changed a little, so this is the EM
        step of Tucker with missing entries, not a new search from scratch."""
        d = len(self.in_factors)
        tensor = weight.reshape(*self.out_factors, *self.in_factors)
        start = [previous[f"out_factor{k}"] for k in range(d)] + [previous[f"in_factor{k}"]
                                                                    for k in range(d)]
        return self._named(*hooi(tensor, self.ranks, start, tol=1e-10,
                                 groups=(range(d), range(d, 2 * d))))

    def _named(self, core, factors) -> dict:
        d = len(self.in_factors)
        cores = {"core": core} | {f"out_factor{k}": factors[k] for k in range(d)}
        return cores | {f"in_factor{k}": factors[d + k] for k in range(d)}


def hooi(tensor: torch.Tensor, ranks, factors=None, max_sweeps: int = 100, tol: float = 1e-10,
         groups=None):
    """Higher-order orthogonal iteration: (core (r_0..), [U_n (I_n, r_n)]) with orthonormal U_n,
    a local optimum of ||tensor - core x_0 U_0 ... ||_F. Starts from the leading singular vectors
    of each unfolding (HOSVD) unless `factors` are given; stops when the core's norm (which
    every sweep increases) grows by less than tol relative.

    groups: a partition of the modes (default: each mode alone). Each group's modes are updated
    from one product of the tensor with the factors of every other mode, shared within the
    group: the (output modes, input modes) of a weight halve the big contractions of a sweep.
    """
    d = tensor.ndim
    groups = [[n] for n in range(d)] if groups is None else [list(g) for g in groups]
    if factors is None:
        factors = [_leading(tensor, n, r) for n, r in enumerate(ranks)]
    factors, previous = list(factors), None
    for _ in range(max_sweeps):
        for group in groups:
            shared = tensor
            for m in range(d):
                if m not in group:
                    shared = _mode_product(shared, factors[m].T, m)
            for n in group:
                projected = shared
                for m in group:
                    if m != n:
                        projected = _mode_product(projected, factors[m].T, m)
                factors[n] = _leading(projected, n, ranks[n])
        core = _mode_product(projected, factors[n].T, n)  # n: the mode updated last
        norm = core.norm().item()
        if previous is not None and norm - previous <= tol * norm:
            break
        previous = norm
    return core, factors


def _mode_product(tensor: torch.Tensor, matrix: torch.Tensor, mode: int) -> torch.Tensor:
    """tensor x_mode matrix: mode `mode` of size I becomes matrix.shape[0] (matrix (J, I))."""
    return torch.movedim(torch.tensordot(tensor, matrix, dims=([mode], [1])), -1, mode)


def _leading(tensor: torch.Tensor, mode: int, rank: int) -> torch.Tensor:
    """The `rank` leading left singular vectors of the mode-`mode` unfolding, (I_mode, rank)."""
    unfolding = torch.movedim(tensor, mode, 0).reshape(tensor.shape[mode], -1)
    _, vectors = torch.linalg.eigh(unfolding @ unfolding.T)  # ascending eigenvalues
    return vectors[:, -rank:].flip(-1)


def _random_factors(shape, ranks, generator) -> list[torch.Tensor]:
    return [torch.linalg.qr(torch.randn(size, rank, generator=generator, dtype=torch.float64))[0]
            for size, rank in zip(shape, ranks, strict=True)]


def tucker_ranks(rank, shape: tuple[int, ...], budget_full: int) -> tuple[int, ...]:
    """Multilinear ranks (one per mode of `shape`) from an int, sequence, float or 'same'.

    A float f (or 'same' = 1.0) spends about f * budget_full parameters: every rank is the same
    fraction a of its mode size, with a the largest that stays within the budget.
    """
    if rank == "same":
        rank = 1.0
    if isinstance(rank, bool) or not isinstance(rank, int | float | list | tuple):
        raise TypeError(f"rank must be an int, a sequence of {len(shape)} ints, a float or "
                        f"'same', got {rank!r}")
    if isinstance(rank, float):
        if not 0.0 < rank <= 1.0:  # above 1 the layer would have more parameters than dense
            raise ValueError(f"rank as a float is a fraction of the dense parameters: must be in "
                             f"(0, 1], got {rank}")
        return _ranks_for_budget(shape, rank * budget_full)
    ranks = (rank,) * len(shape) if isinstance(rank, int) else tuple(rank)
    if len(ranks) != len(shape) or not all(isinstance(r, int) for r in ranks):
        raise ValueError(f"rank must be an int or {len(shape)} ints (output modes then input "
                         f"modes), got {rank!r}")
    for k, (r, size) in enumerate(zip(ranks, shape, strict=True)):
        if not 1 <= r <= min(size, prod(shape) // size):
            raise ValueError(f"rank[{k}]={r} is out of range: valid is "
                             f"1..{min(size, prod(shape) // size)} for mode size {size}")
    return ranks


def _ranks_for_budget(shape, budget) -> tuple[int, ...]:
    def ranks_at(a):
        return tuple(min(size, max(1, round(a * size))) for size in shape)

    def params(ranks):
        return prod(ranks) + sum(s * r for s, r in zip(shape, ranks, strict=True))

    low, high = 0.0, 1.0
    for _ in range(50):
        mid = (low + high) / 2
        low, high = (mid, high) if params(ranks_at(mid)) <= budget else (low, mid)
    return ranks_at(low)
