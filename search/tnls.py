"""TNLS (Li et al. 2022), the local-sampling baseline TnALE is measured against.

Each iteration samples `samples` structures around the centre: every rank moves by a rounded
Gaussian step (std `sigma`) within [1, max_rank], and with probability `swap_probability` two
cores exchange their modes. The centre moves to the best sample if it is no worse. sigma and the
swap probability decay by `decay` per iteration; the search ends after `patience` iterations
without a move, or when the budget runs out.
"""

import numpy as np

from .result import SearchResult, check_search_args, finish, ring_structure
from .runner import BudgetExhausted, Evaluator


def tnls(target, topology: str = "tr", max_rank: int = 6, init_rank: int = 2, samples: int | None = None,
         sigma: float = 1.0, swap_probability: float = 0.5, decay: float = 0.97, patience: int = 10,
         permute: bool = True, seed: int = 0, evaluator: Evaluator | None = None,
         **evaluator_args) -> SearchResult:
    """Local sampling search of a ring's (or train's) ranks and permutation; see the module doc."""
    evaluator = evaluator or Evaluator(target, **evaluator_args)
    bonds = check_search_args(evaluator.target.shape, topology, max_rank, init_rank)
    if not (0 <= swap_probability <= 1 and 0 < decay <= 1 and sigma > 0):
        raise ValueError("need sigma > 0, 0 <= swap_probability <= 1 and 0 < decay <= 1")
    sizes, n = evaluator.target.shape, evaluator.target.ndim
    samples = samples or 2 * n
    rng = np.random.default_rng(seed)
    ranks, perm = np.full(bonds, init_rank), np.arange(n)
    try:
        best = evaluator(ring_structure(sizes, topology, ranks.tolist(), perm.tolist())).objective
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
            evaluations = evaluator.evaluate([ring_structure(sizes, topology, r.tolist(), p.tolist())
                                              for r, p in candidates])
            choice = int(np.argmin([e.objective for e in evaluations]))
            if evaluations[choice].objective <= best:
                moved = evaluations[choice].objective < best
                ranks, perm = candidates[choice]
                best = evaluations[choice].objective
                still = 0 if moved else still + 1
            else:
                still += 1
            sigma, swap_probability = max(0.3, sigma * decay), swap_probability * decay
    except BudgetExhausted:
        pass
    return finish(evaluator, "tnls")
