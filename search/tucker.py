"""Tucker core shapes under a parameter budget (Ghadiri et al. 2023, "Approximately optimal core
shapes for tensor decompositions").

The surrogate: keeping the leading R_n singular vectors of every mode-n unfolding keeps
    sum_n sum_{i <= R_n} sigma_{n,i}^2
of the target's energy, and the Tucker tensor with ranks R costs prod(R) + sum_n I_n R_n
parameters. Maximise the kept energy within the budget:
    "greedy"  add one to the mode with the largest energy gain per extra parameter (about 1 ms)
    "ip"      the packing integer program, solved with scipy.optimize.milp: for a grid of core
              sizes c, one-hot ranks per mode with sum log(R_n) <= log(c) and
              sum I_n R_n <= budget - c (both linear), the best over the grid
    "refit"   the baseline: greedy where each move is scored by a real Tucker fit (HOSVD), by
              error decrease per extra parameter (slow; the paper's comparison)
`tucker_error` fits a Tucker tensor of given ranks (HOSVD, then HOOI sweeps) and returns its
relative error.
"""

import time
from dataclasses import dataclass
from math import log, prod

import numpy as np

from .fit import check_target

METHODS = ("ip", "greedy", "refit")


@dataclass
class TuckerShape:
    ranks: tuple[int, ...]
    params: int
    kept_energy: float  # surrogate: fraction of ||T||^2 kept by the mode-wise truncations
    seconds: float
    method: str


def tucker_params(sizes, ranks) -> int:
    return prod(ranks) + sum(i * r for i, r in zip(sizes, ranks, strict=True))


def tucker_ranks(target, budget: int, method: str = "ip") -> TuckerShape:
    """Ranks (R_1..R_N) for a Tucker decomposition of `target` with at most `budget` params."""
    target = check_target(target)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    sizes = target.shape
    smallest = tucker_params(sizes, (1,) * len(sizes))
    if isinstance(budget, bool) or not isinstance(budget, int | np.integer) or budget < smallest:
        raise ValueError(f"budget must be an int >= {smallest} (all ranks 1), got {budget!r}")
    start = time.perf_counter()
    energy = _mode_energies(target)
    if method == "greedy":
        ranks = _greedy(sizes, energy, budget)
    elif method == "ip":
        ranks = _integer_program(sizes, energy, budget)
    else:
        ranks = _refit_greedy(target, budget)
    kept = sum(float(np.sum(e[:r])) for e, r in zip(energy, ranks, strict=True))
    total = float(np.sum(target**2)) * len(sizes)
    return TuckerShape(tuple(int(r) for r in ranks), tucker_params(sizes, ranks), kept / total,
                       time.perf_counter() - start, method)


def _mode_energies(target) -> list[np.ndarray]:
    """Squared singular values of every mode-n unfolding, largest first."""
    energies = []
    for n in range(target.ndim):
        unfolding = np.moveaxis(target, n, 0).reshape(target.shape[n], -1)
        energies.append(np.linalg.svd(unfolding, compute_uv=False) ** 2)
    return energies


def _greedy(sizes, energy, budget):
    ranks = [1] * len(sizes)
    while True:
        best, best_gain = None, 0.0
        for n in range(len(sizes)):
            if ranks[n] >= len(energy[n]):
                continue
            grown = ranks[:n] + [ranks[n] + 1] + ranks[n + 1:]
            extra = tucker_params(sizes, grown) - tucker_params(sizes, ranks)
            if tucker_params(sizes, grown) > budget:
                continue
            gain = energy[n][ranks[n]] / extra
            if gain > best_gain:
                best, best_gain = n, gain
        if best is None:
            return ranks
        ranks[best] += 1


def _integer_program(sizes, energy, budget):
    from scipy.optimize import Bounds, LinearConstraint, milp

    choices = [(n, r) for n in range(len(sizes)) for r in range(1, len(energy[n]) + 1)]
    value = np.array([float(np.sum(energy[n][:r])) for n, r in choices])
    one_hot = np.array([[1.0 if n == m else 0.0 for n, _ in choices] for m in range(len(sizes))])
    log_rank = np.array([log(r) for _, r in choices])
    factor_cost = np.array([sizes[n] * r for n, r in choices], dtype=float)
    best, best_value = [1] * len(sizes), -1.0
    for core in _core_sizes([len(e) for e in energy], budget - sum(sizes)):
        constraints = [LinearConstraint(one_hot, 1, 1),
                       LinearConstraint(log_rank[None], -np.inf, log(core) + 1e-9),
                       LinearConstraint(factor_cost[None], -np.inf, budget - core)]
        result = milp(-value, constraints=constraints, integrality=np.ones(len(choices)),
                      bounds=Bounds(0, 1))
        if result.status != 0 or -result.fun <= best_value:
            continue
        picked = [r for (n, r), y in zip(choices, result.x, strict=True) if y > 0.5]
        if tucker_params(sizes, picked) <= budget:
            best, best_value = picked, -result.fun
    return best


def _core_sizes(max_ranks, max_core: int, exact_up_to: int = 400) -> list[int]:
    """The core sizes to solve the program for: every achievable prod(R) <= max_core when there
    are few (then the program is exact), else a geometric grid of them (the paper's (1+eps) grid)."""
    products = {1}
    for top in max_ranks:
        products = {p * r for p in products for r in range(1, top + 1) if p * r <= max_core}
        if len(products) > 20 * exact_up_to:
            break
    if len(products) <= exact_up_to:
        return sorted(products)
    return sorted({int(c) for c in np.geomspace(1, max_core, 80)})


def _refit_greedy(target, budget):
    sizes = target.shape
    ranks = [1] * len(sizes)
    error = tucker_error(target, ranks, sweeps=0)
    while True:
        best, best_gain = None, 0.0
        for n in range(len(sizes)):
            grown = ranks[:n] + [ranks[n] + 1] + ranks[n + 1:]
            if grown[n] > min(sizes[n], prod(sizes) // sizes[n]) or tucker_params(sizes, grown) > budget:
                continue
            gain = (error**2 - tucker_error(target, grown, sweeps=0) ** 2) / (
                tucker_params(sizes, grown) - tucker_params(sizes, ranks))
            if gain > best_gain:
                best, best_gain = n, gain
        if best is None:
            return ranks
        ranks[best] += 1
        error = tucker_error(target, ranks, sweeps=0)


def tucker_error(target, ranks, sweeps: int = 5) -> float:
    """Relative Frobenius error of a Tucker fit with these ranks (HOSVD, then HOOI sweeps)."""
    target = check_target(target)
    factors = []
    for n, r in enumerate(ranks):
        unfolding = np.moveaxis(target, n, 0).reshape(target.shape[n], -1)
        factors.append(np.linalg.svd(unfolding, full_matrices=False)[0][:, :r])
    for _ in range(sweeps):
        for n in range(target.ndim):
            projected = target
            for m, u in enumerate(factors):
                if m != n:
                    projected = np.moveaxis(np.tensordot(projected, u, axes=([m], [0])), -1, m)
            unfolding = np.moveaxis(projected, n, 0).reshape(target.shape[n], -1)
            factors[n] = np.linalg.svd(unfolding, full_matrices=False)[0][:, : ranks[n]]
    core = target
    for m, u in enumerate(factors):
        core = np.moveaxis(np.tensordot(core, u, axes=([m], [0])), -1, m)
    # with orthonormal factors, ||T - X||^2 = ||T||^2 - ||core||^2
    total = float(np.sum(target**2))
    return float(np.sqrt(max(0.0, total - float(np.sum(core**2))) / total))
