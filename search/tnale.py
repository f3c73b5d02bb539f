"""TnALE (Li et al. 2023): alternating local enumeration over the ranks and the mode permutation.

The variables are the bond ranks r_0..r_{B-1} (B = N bonds for a ring, N-1 for a train) in
[1, max_rank] and the permutation of modes to cores. A sweep visits r_0..r_{B-1}, the
permutation, then r_{B-1}..r_0; for each variable it evaluates every candidate in its window with
the other variables fixed and moves to the best:
    a rank r:         {r-L, ..., r+L}, shifted to stay in [1, max_rank]
    the permutation:  the current one and every single transposition
Early sweeps use radius L = `radius` and fit only the window's ends and centre, interpolating the
objective in between (an interpolated winner is fitted before it is taken); once a sweep stops
improving, radius 1 with every candidate fitted. Two additions to the paper save evaluations on
the permutation: the transpositions that improve are composed, best first, while each composition
still improves (one fit each; a hidden permutation needs several disjoint swaps, and one
enumeration already ranks them), and after a fruitless enumeration the next one waits until the
ranks stop moving. When a radius-1 sweep finds nothing, one joint
move is tried as well (an addition to the paper): a bond one rank lower together with a
transposition that moves a mode onto or off one of that bond's cores; a local optimum with a rank
too high often needs exactly that. When that stalls too, the search restarts from a random
perturbation of the best structure: until the evaluation or time budget runs out, `restarts`
restarts were made (None: no limit) or `restart_patience` descents in a row did not improve the
best. The restarts draw from `seed`, so a rerun with the log retraces the same path without
refitting. A final pruning pass lowers single ranks of the answer while that lowers the
objective. The result says how many descents reached the answer (`agreeing` of `restarts`).
"""

import numpy as np

from .result import Descents, SearchResult, check_search_args, prune_ring, ring_structure
from .runner import BudgetExhausted, Evaluator


def tnale(target, topology: str = "tr", max_rank: int = 6, init_rank: int = 2, radius: int = 2,
          permute: bool = True, restarts: int | None = None, restart_patience: int = 4,
          prune: bool = True, seed: int = 0, evaluator: Evaluator | None = None,
          **evaluator_args) -> SearchResult:
    """Search ranks (and the permutation, if `permute`) of a tensor ring or train for `target`.

    evaluator_args go to Evaluator (lam, rse, fit, workers, executor, log, max_evaluations,
    max_seconds, progress), or pass a ready `evaluator`.
    """
    evaluator = evaluator or Evaluator(target, **evaluator_args)
    bonds = check_search_args(evaluator.target.shape, topology, max_rank, init_rank)
    if isinstance(radius, bool) or not isinstance(radius, int) or radius < 1:
        raise ValueError(f"radius must be a positive int, got {radius!r}")
    runs = Descents(evaluator, restarts, restart_patience)
    sizes, n = evaluator.target.shape, evaluator.target.ndim
    rng = np.random.default_rng(seed)
    ranks, perm = [init_rank] * bonds, list(range(n))

    def evaluate(candidates):
        return evaluator.evaluate([ring_structure(sizes, topology, r, p) for r, p in candidates])

    try:
        best = evaluate([(ranks, perm)])[0].objective
        runs.start(best, ranks, perm)
        while True:
            perm_productive = True  # did the last permutation enumeration move?
            for sweep_radius, interpolate in ((radius, radius > 1), (1, False)):
                while True:
                    improved = False
                    for var in [*range(bonds), "perm", *reversed(range(bonds))]:
                        if var == "perm":
                            # an enumeration costs ~N^2/2 fits: after a fruitless one, wait until
                            # the ranks stop moving (a sweep's first half finds nothing)
                            if not permute or (improved and not perm_productive):
                                continue
                            candidates, scores = _transpositions(evaluate, ranks, perm)
                            perm_productive = min(scores) < best - 1e-12
                        else:
                            candidates, scores = _rank_window(evaluate, ranks, perm, var, sweep_radius,
                                                              max_rank, interpolate)
                        choice = int(np.argmin(scores))
                        if scores[choice] < best - 1e-12:
                            ranks, perm = list(candidates[choice][0]), list(candidates[choice][1])
                            best, improved = scores[choice], True
                    if not improved and sweep_radius == 1 and permute:
                        # converged one variable at a time: try lowering a bond's rank together
                        # with moving a mode onto or off one of that bond's two cores
                        candidates = _joint_moves(ranks, perm, topology)
                        if candidates:
                            scores = [e.objective for e in evaluate(candidates)]
                            choice = int(np.argmin(scores))
                            if scores[choice] < best - 1e-12:
                                ranks, perm = list(candidates[choice][0]), list(candidates[choice][1])
                                best, improved = scores[choice], True
                    if not improved:
                        break
            if not runs.ended(best, ranks, perm):
                break
            # stalled: restart from a random perturbation of the best centre this search reached
            # (its own path, not the evaluator's cache, which a resumed log fills in advance)
            ranks = [int(np.clip(r + rng.integers(-1, 2), 1, max_rank)) for r in runs.anchor[1]]
            perm = list(runs.anchor[2])
            i, j = rng.choice(n, 2, replace=False)
            perm = _swap(perm, i, j) if permute else perm
            best = evaluate([(ranks, perm)])[0].objective
        if prune:
            objective, ranks, perm = runs.anchor
            prune_ring(evaluate, list(ranks), list(perm), objective)
    except BudgetExhausted:
        pass
    return runs.finish(evaluator, "tnale")


def _rank_window(evaluate, ranks, perm, k, radius, max_rank, interpolate):
    """Candidates for rank k and their objectives (window ends and centre fitted if interpolating)."""
    low = max(1, min(ranks[k] - radius, max_rank - 2 * radius))
    values = list(range(low, min(max_rank, low + 2 * radius) + 1))
    candidates = [(_set(ranks, k, v), perm) for v in values]
    if not interpolate or len(values) <= 3:
        return candidates, [e.objective for e in evaluate(candidates)]
    fitted = sorted({0, values.index(ranks[k]) if ranks[k] in values else 0, len(values) - 1})
    known = dict(zip(fitted, (e.objective for e in evaluate([candidates[i] for i in fitted])), strict=True))
    scores = list(np.interp(range(len(values)), list(known), list(known.values())))
    choice = int(np.argmin(scores))
    if choice not in known:  # never move on an interpolated value
        scores[choice] = evaluate([candidates[choice]])[0].objective
    return candidates, scores


def _transpositions(evaluate, ranks, perm):
    """The current perm and every single transposition, then compound moves: the improving
    transpositions, best first, composed one at a time while each composition still improves
    (one fit each). A hidden permutation typically needs several disjoint transpositions, and
    one enumeration already ranks them all, so this saves a full enumeration per extra swap."""
    n = len(perm)
    swaps = [(i, j) for i in range(n) for j in range(i + 1, n)]
    candidates = [(ranks, perm)] + [(ranks, _swap(perm, i, j)) for i, j in swaps]
    scores = [e.objective for e in evaluate(candidates)]
    improving = sorted((s, k) for k, s in enumerate(scores[1:]) if s < scores[0] - 1e-12)
    if len(improving) < 2:
        return candidates, scores
    best_score, first = improving[0]
    composed, used = candidates[first + 1][1], set(swaps[first])
    for _, k in improving[1:]:
        if used & set(swaps[k]):
            continue  # compose disjoint transpositions only: each keeps its own meaning
        trial = _swap(composed, *swaps[k])
        score = evaluate([(ranks, trial)])[0].objective
        if score < best_score - 1e-12:
            best_score, composed, used = score, trial, used | set(swaps[k])
    candidates.append((ranks, composed))
    scores.append(best_score)
    return candidates, scores


def _joint_moves(ranks, perm, topology):
    """(ranks, perm) with bond k one rank lower and a transposition involving core k or k+1."""
    n = len(perm)
    moves = []
    for k, r in enumerate(ranks):
        if r == 1:
            continue
        lowered = _set(ranks, k, r - 1)
        ends = {k, (k + 1) % n}
        swaps = {tuple(sorted((a, b))) for a in ends for b in range(n) if b != a}
        moves += [(lowered, _swap(perm, a, b)) for a, b in sorted(swaps)]
    return moves


def _set(values, k, v):
    values = list(values)
    values[k] = v
    return values


def _swap(perm, i, j):
    perm = list(perm)
    perm[i], perm[j] = perm[j], perm[i]
    return perm
