"""What a search returns, and the search variables of ring/train topologies."""

from dataclasses import dataclass, field

from .runner import Evaluator
from .structure import Structure

TOPOLOGIES = ("tr", "tt")


@dataclass
class SearchResult:
    """The best structure a search evaluated, and how sure the search is of it.

    restarts: independent descents the search ran (its first included); agreeing: how many of
    them ended at the best objective (1 of 5: a lucky local optimum; 5 of 5: every descent
    found it). runners_up: the next best distinct structures evaluated, best first.
    """

    structure: Structure
    cores: list = field(repr=False)
    rse: float
    objective: float
    evaluations: int  # structures fitted (cache hits are free; log-resumed fits count)
    seconds: float
    method: str
    scoring_fits: int = 0  # cheap fits outside the evaluator (greedy's warm-started scoring)
    restarts: int = 1
    agreeing: int = 1
    runners_up: list = field(default_factory=list, repr=False)  # [Evaluation], best first

    @property
    def compression(self) -> float:
        """Entries of the target per parameter of the found structure."""
        return self.structure.compression

    def summary(self) -> str:
        edges = ", ".join(f"{a}-{b}:{r}" for (a, b), r in self.structure.edges().items())
        return (f"{self.method}: ranks {{{edges}}}, perm {list(self.structure.perm)}, "
                f"RSE {self.rse:.3g}, compression {self.compression:.1f}x "
                f"({self.structure.num_params:,} params), objective {self.objective:.4g}, "
                f"{self.evaluations} evaluations"
                + (f" + {self.scoring_fits} scoring fits" if self.scoring_fits else "")
                + f", {self.seconds:.1f} s; " + (f"{self.agreeing} of {self.restarts} descents "
                                                   f"reached it" if self.restarts else
                                                   "the budget ended the first descent")
                + "".join(f"\n  runner-up: {e.structure.num_params:,} params, RSE "
                                  f"{e.rse:.3g}, objective {e.objective:.4g}"
                                  for e in self.runners_up))


def same_objective(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-6 * max(1.0, abs(a), abs(b))


def finish(evaluator: Evaluator, method: str, scoring_fits: int = 0, restarts: int = 1,
           agreeing: int = 1, runners_up: int = 3) -> SearchResult:
    """The result: the evaluator's best, with the next `runners_up` distinct structures."""
    best = evaluator.best()
    ranked = sorted(evaluator.cache.values(), key=lambda e: e.objective)
    others = [e for e in ranked if e.structure.key() != best.structure.key()][:runners_up]
    result = SearchResult(best.structure, evaluator.cores_of(best), best.rse, best.objective,
                          evaluator.evaluations, evaluator.seconds, method, scoring_fits,
                          restarts, agreeing, others)
    evaluator.close()
    return result


class Descents:
    """The restarted descents of a local search (TnALE, TNLS): the best centre so far (`anchor`,
    (objective, ranks, perm)), whether to restart, and how many descents ended at the answer.

    A search restarts within `restarts` (None: no limit, the evaluator's budget ends it; with no
    budget at all, 2 x restart_patience) while fewer than `restart_patience` descents in a row
    did not improve the best.
    """

    def __init__(self, evaluator: Evaluator, restarts, restart_patience):
        if restarts is not None and (isinstance(restarts, bool) or not isinstance(restarts, int)
                                     or restarts < 0):
            raise ValueError(f"restarts must be None (until the budget or patience) or an int "
                             f">= 0, got {restarts!r}")
        if isinstance(restart_patience, bool) or not isinstance(restart_patience, int) \
                or restart_patience < 1:
            raise ValueError(f"restart_patience must be a positive int, got {restart_patience!r}")
        if restarts is None and evaluator.max_evaluations is None and evaluator.max_seconds is None:
            restarts = 2 * restart_patience  # no budget: patience alone might never end a flat search
        self.restarts, self.patience = restarts, restart_patience
        self.ends: list[float] = []  # the objective each descent ended at
        self.stale = 0  # descents in a row that did not improve the best
        self.anchor = None

    def start(self, objective: float, ranks, perm):
        self.anchor = (objective, ranks, perm)

    def ended(self, objective: float, ranks, perm) -> bool:
        """Record a descent that ended at (objective, ranks, perm); whether to restart."""
        self.ends.append(objective)
        self.stale = 0 if objective < self.anchor[0] - 1e-12 else self.stale + 1
        if objective < self.anchor[0]:
            self.anchor = (objective, ranks, perm)
        return (self.restarts is None or len(self.ends) <= self.restarts) \
            and self.stale < self.patience

    def finish(self, evaluator: Evaluator, method: str) -> SearchResult:
        """The result, with how many descents ended where the answer came from (the final
        pruning starts from the best descent, so each that reached it leads to the same answer)."""
        best = min(self.ends, default=float("nan"))
        return finish(evaluator, method, restarts=len(self.ends),
                      agreeing=sum(same_objective(d, best) for d in self.ends))


def prune_ring(evaluate, ranks, perm, best: float):
    """Lower one rank at a time while that lowers the objective: (ranks, best)."""
    while True:
        candidates = [(ranks[:k] + [r - 1] + ranks[k + 1:], perm) for k, r in enumerate(ranks) if r > 1]
        if not candidates:
            return ranks, best
        scores = [e.objective for e in evaluate(candidates)]
        choice = min(range(len(scores)), key=scores.__getitem__)
        if scores[choice] >= best - 1e-12:
            return ranks, best
        ranks, best = list(candidates[choice][0]), scores[choice]


def ring_structure(sizes, topology: str, ranks, perm) -> Structure:
    if topology == "tr":
        return Structure.tensor_ring(sizes, ranks, perm)
    return Structure.tensor_train(sizes, ranks, perm)


def check_search_args(target_shape, topology: str, max_rank: int, init_rank: int):
    if topology not in TOPOLOGIES:
        raise ValueError(f"topology must be one of {TOPOLOGIES}, got {topology!r}")
    for name, value in (("max_rank", max_rank), ("init_rank", init_rank)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if init_rank > max_rank:
        raise ValueError(f"rank bounds are inverted: init_rank={init_rank} > max_rank={max_rank}")
    return len(target_shape) if topology == "tr" else len(target_shape) - 1
