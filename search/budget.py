"""One parameter budget for a whole model, spent where it buys the most accuracy.

    report = sl.structurize(model, budget(0.25, kinds=("btt", "lowrank", "tucker")), project=True)
    print(report)     # each layer's chosen structure, params and projection error

For every selected layer, candidates of each kind at a ladder of sizes are projected (lowrank:
every rank from one SVD; btt: a ladder of bond ranks; tt: `layer_ranks` at a ladder of budget
fractions; tucker: the same share of every mode at each fraction; monarch: its block counts)
and priced by (parameters, relative error^2). The allocation minimises the sum over layers of
the relative squared projection error within the budget: greedy on each layer's lower convex
hull of (params, error^2), always buying the step with the largest error decrease per parameter
that still fits. Layers are weighted equally (relative errors): a small layer's error counts as
much as a big one's.

The budget counts weights only (no bias): a fraction in (0, 1] of the selected layers' dense
weight parameters, or an int number of parameters.
"""

from dataclasses import dataclass, field

import torch

from .layers import _budget, layer_ranks

KINDS = ("lowrank", "btt", "tt", "tucker", "monarch", "dense")
FRACTIONS = (0.02, 0.04, 0.07, 0.1, 0.15, 0.2, 0.3, 0.4, 0.55, 0.7)


@dataclass(frozen=True)
class Candidate:
    spec: str
    params: int  # weights only
    error: float  # ||W - W_hat||_F / ||W||_F


@dataclass
class Allocation:
    """What `ModelBudget.allocate` chose: {layer: Candidate}, and the budget it had."""

    budget: int = 0
    dense_params: int = 0
    chosen: dict[str, Candidate] = field(default_factory=dict)

    @property
    def params(self) -> int:
        return sum(c.params for c in self.chosen.values())

    @property
    def mean_error(self) -> float:
        return sum(c.error for c in self.chosen.values()) / max(1, len(self.chosen))


class ModelBudget:
    """A structurize argument that picks every layer's spec from all selected weights at once."""

    def __init__(self, fraction, kinds=("btt", "lowrank", "tucker"), fractions=FRACTIONS):
        if isinstance(fraction, bool) or not isinstance(fraction, int | float) or fraction <= 0 \
                or (isinstance(fraction, float) and fraction > 1):
            raise ValueError(f"budget must be a fraction in (0, 1] of the selected layers' "
                             f"weights or a positive int of parameters, got {fraction!r}")
        if isinstance(kinds, str) or not kinds or any(k not in KINDS for k in kinds):
            raise ValueError(f"kinds must be a non-empty sequence of {KINDS}, got {kinds!r}")
        self.fraction, self.kinds, self.fractions = fraction, tuple(kinds), tuple(fractions)
        self.last: Allocation | None = None  # the latest allocation, for inspection

    def __repr__(self) -> str:
        return f"budget({self.fraction!r}, kinds={self.kinds!r})"

    def allocate(self, layers: list[tuple[str, torch.Tensor, torch.Tensor | None]]) -> dict[str, str]:
        """{name: spec} for layers [(name, weight (out, in), bias)] within the budget."""
        dense = sum(w.numel() for _, w, _ in layers)
        limit = _budget(self.fraction, dense)
        hulls = {name: _lower_hull(self.candidates(weight)) for name, weight, _ in layers}
        chosen = {name: 0 for name in hulls}  # index on each hull
        spent = sum(hull[0].params for hull in hulls.values())
        if spent > limit:
            raise ValueError(f"budget {self.fraction!r} ({limit:,} params) is below the smallest "
                             f"allocation of kinds {self.kinds}: {spent:,} params")
        while True:
            steps = []
            for name, hull in hulls.items():
                k = chosen[name]
                if k + 1 < len(hull) and spent + hull[k + 1].params - hull[k].params <= limit:
                    gain = hull[k].error ** 2 - hull[k + 1].error ** 2
                    steps.append((gain / (hull[k + 1].params - hull[k].params), name))
            if not steps:
                break
            _, name = max(steps)
            spent += hulls[name][chosen[name] + 1].params - hulls[name][chosen[name]].params
            chosen[name] += 1
        self.last = Allocation(limit, dense, {n: hulls[n][k] for n, k in chosen.items()})
        return {name: c.spec for name, c in self.last.chosen.items()}

    def candidates(self, weight: torch.Tensor) -> list[Candidate]:
        """Every (spec, params, error) this budget may choose for `weight` (out, in)."""
        found = []
        for kind in self.kinds:
            found += _CANDIDATES[kind](weight, self.fractions)
        return found


def budget(fraction, kinds=("btt", "lowrank", "tucker"), fractions=FRACTIONS) -> ModelBudget:
    """A model-wide budget for `sl.structurize`: see the module docstring."""
    return ModelBudget(fraction, kinds, fractions)


def _lowrank(weight, fractions):
    singular = torch.linalg.svdvals(weight.detach().double().cpu())
    out_features, in_features = weight.shape
    tail = singular.square().flip(0).cumsum(0).flip(0)  # tail[r] = sum_{k >= r} s_k^2
    total = tail[0].clamp_min(1e-300)
    found = []
    for rank in range(1, len(singular) + 1):
        params = rank * (in_features + out_features)
        if params > weight.numel():
            break
        rest = tail[rank].item() if rank < len(singular) else 0.0
        found.append(Candidate(f"lowrank:rank={rank}", params, (rest / total.item()) ** 0.5))
    return found


def _projected(spec: str, weight) -> Candidate:
    import structlayers as sl

    out_features, in_features = weight.shape
    layer = sl.build(spec, in_features, out_features, bias=False, dtype=torch.float64)
    error = layer.project_(weight.detach().double().cpu())
    return Candidate(layer.spec, layer.num_params, error)


def _btt(weight, fractions):
    found, rank = [], 1
    while True:
        try:
            candidate = _projected(f"btt:rank={rank}", weight)
        except ValueError:  # beyond the largest rank these sizes allow
            break
        if candidate.params > weight.numel():
            break
        found.append(candidate)
        rank = rank + 1 if rank < 4 else int(rank * 1.5)
    return found


def _by_fraction(kind):
    def candidates(weight, fractions):
        found = {}
        for fraction in fractions:
            try:
                spec = layer_ranks(weight, kind, fraction)
            except ValueError:  # the smallest layer of this kind is above this fraction
                continue
            if spec not in found:
                found[spec] = _projected(spec, weight)
        return list(found.values())
    return candidates


def _ladder(specs, weight) -> list[Candidate]:
    """The projections of `specs` that build for this weight and fit within dense, one per
    distinct full spec."""
    found = {}
    for spec in specs:
        try:
            candidate = _projected(spec, weight)
        except ValueError:  # not buildable at these sizes
            continue
        if candidate.params <= weight.numel():
            found.setdefault(candidate.spec, candidate)
    return list(found.values())


def _tucker(weight, fractions):
    """The Tucker layer's own ranks for each fraction (every mode the same share of its size):
    the packing program of `layer_ranks` takes seconds per call, too slow for a ladder."""
    return _ladder([f"tucker:rank={float(f)}" for f in fractions], weight)


def _monarch(weight, fractions):
    return _ladder([f"monarch:blocks={b}" for b in (2, 4, 8, 16, 32, 64)], weight)


def _dense(weight, fractions):
    return [Candidate("dense", weight.numel(), 0.0)]


_CANDIDATES = {"lowrank": _lowrank, "btt": _btt, "tt": _by_fraction("tt"),
               "tucker": _tucker, "monarch": _monarch, "dense": _dense}


def _lower_hull(candidates: list[Candidate]) -> list[Candidate]:
    """The candidates on the lower convex hull of (params, error^2), by increasing params: the
    only ones a greedy marginal allocation can end on."""
    if not candidates:
        raise ValueError("no candidate structure fits this layer")
    ordered = sorted(candidates, key=lambda c: (c.params, c.error))
    hull: list[Candidate] = []
    for c in ordered:
        if hull and c.error >= hull[-1].error:  # more params for no gain
            continue
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]  # drop b if it lies above the chord a -> c
            if (b.error**2 - a.error**2) * (c.params - a.params) >= \
                    (c.error**2 - a.error**2) * (b.params - a.params):
                hull.pop()
            else:
                break
        hull.append(c)
    return hull
