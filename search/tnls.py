"""TNLS (Li et al. 2022), the local-sampling baseline TnALE is measured against.

Each iteration samples `samples` structures around the centre: every rank moves by a rounded
Gaussian step (std `sigma`) within [1, max_rank], and with probability `swap_probability` two
cores exchange their modes. The centre moves to the best sample if it is no worse. sigma and the
swap probability decay by `decay` per iteration; a descent ends after `patience` iterations
without a move. Then the search restarts from a perturbation of the best centre (sigma and the
swap probability reset), as TnALE does: until the budget, `restarts` restarts (None: no limit)
or `restart_patience` descents in a row without improvement; a final pass prunes single ranks.
"""

import numpy as np

from .result import Descents, SearchResult, check_search_args, prune_ring, ring_structure
from .runner import BudgetExhausted, Evaluator


def tnls(target, topology: str = "tr", max_rank: int = 6, init_rank: int = 2, samples: int | None = None,
         sigma: float = 1.0, swap_probability: float = 0.5, decay: float = 0.97, patience: int = 10,
         permute: bool = True, restarts: int | None = None, restart_patience: int = 4,
         prune: bool = True, seed: int = 0, evaluator: Evaluator | None = None,
         **evaluator_args) -> SearchResult:
    """Local sampling search of a ring's (or train's) ranks and permutation; see the module doc."""
    evaluator = evaluator or Evaluator(target, **evaluator_args)
    bonds = check_search_args(evaluator.target.shape, topology, max_rank, init_rank)
    if not (0 <= swap_probability <= 1 and 0 < decay <= 1 and sigma > 0):
        raise ValueError("need sigma > 0, 0 <= swap_probability <= 1 and 0 < decay <= 1")
    runs = Descents(evaluator, restarts, restart_patience)
    sizes, n = evaluator.target.shape, evaluator.target.ndim
    samples = samples or 2 * n
    rng = np.random.default_rng(seed)
    ranks, perm = np.full(bonds, init_rank), np.arange(n)

    def evaluate(candidates):
        return evaluator.evaluate([ring_structure(sizes, topology, list(map(int, r)),
                                                  list(map(int, p))) for r, p in candidates])

    try:
        best = evaluate([(ranks, perm)])[0].objective
        runs.start(best, ranks, perm)
        while True:
            best, ranks, perm = _descend(evaluate, ranks, perm, best, rng, samples, sigma,
                                         swap_probability, decay, patience, max_rank, permute)
            if not runs.ended(best, ranks, perm):
                break
            ranks = np.clip(runs.anchor[1] + rng.integers(-1, 2, bonds), 1, max_rank)
            perm = runs.anchor[2].copy()
            if permute:
                i, j = rng.choice(n, 2, replace=False)
                perm[[i, j]] = perm[[j, i]]
            best = evaluate([(ranks, perm)])[0].objective
        if prune:
            objective, ranks, perm = runs.anchor
            prune_ring(evaluate, [int(r) for r in ranks], [int(p) for p in perm], objective)
    except BudgetExhausted:
        pass
    return runs.finish(evaluator, "tnls")


def _descend(evaluate, ranks, perm, best, rng, samples, sigma, swap_probability, decay,
             patience, max_rank, permute):
    """One local-sampling descent from (ranks, perm): (objective, ranks, perm) where it ended."""
    bonds, n = len(ranks), len(perm)
    still = 0
    while still < patience:
        candidates = []
        for _ in range(samples):
            step = np.rint(rng.normal(0, sigma, bonds)).astype(int)
            new_ranks = np.clip(ranks + step, 1, max_rank)
            new_perm = perm.copy()
            if permute and rng.random() < swap_probability:
                i, j = rng.choice(n, 2, replace=False)
                new_perm[[i, j]] = new_perm[[j, i]]
            candidates.append((new_ranks, new_perm))
        evaluations = evaluate(candidates)
        choice = int(np.argmin([e.objective for e in evaluations]))
        if evaluations[choice].objective <= best:
            moved = evaluations[choice].objective < best
            ranks, perm = candidates[choice]
            best = evaluations[choice].objective
            still = 0 if moved else still + 1
        else:
            still += 1
        sigma, swap_probability = max(0.3, sigma * decay), swap_probability * decay
    return best, ranks, perm
