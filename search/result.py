"""What a search returns, and the search variables of ring/train topologies."""

from dataclasses import dataclass, field

from .runner import Evaluator
from .structure import Structure

TOPOLOGIES = ("tr", "tt")


@dataclass
class SearchResult:
    structure: Structure
    cores: list = field(repr=False)
    rse: float
    objective: float
    evaluations: int  # structures fitted (cache hits are free; log-resumed fits count)
    seconds: float
    method: str
    scoring_fits: int = 0  # cheap fits outside the evaluator (greedy's warm-started scoring)

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
                + f", {self.seconds:.1f} s")


def finish(evaluator: Evaluator, method: str, scoring_fits: int = 0) -> SearchResult:
    best = evaluator.best()
    result = SearchResult(best.structure, evaluator.cores_of(best), best.rse, best.objective,
                          evaluator.evaluations, evaluator.seconds, method, scoring_fits)
    evaluator.close()
    return result


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
