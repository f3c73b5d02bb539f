"""sl.search.budget: one parameter budget for a whole model, allocated by projection error."""

import pytest
import torch
from torch import nn

import structlayers as sl


def unequal_model(seed=0):
    """Two 64x64 layers: one exactly rank 4, one full rank. A uniform spec wastes parameters on
    the first; an allocation should move them to the second."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                          nn.Linear(64, 32))
    with torch.no_grad():
        model[0].weight.copy_(torch.randn(64, 4) @ torch.randn(4, 64) / 8)
    return model


def true_errors(model, before, names):
    return {n: ((model.get_submodule(n).to_dense().double() - before[n]).norm()
                / before[n].norm()).item() for n in names}


def weights(model):
    return {n: m.weight.detach().double().clone() for n, m in model.named_modules()
            if type(m) is nn.Linear}


def test_allocation_respects_the_budget_and_beats_a_uniform_spec():
    model, uniform = unequal_model(), unequal_model()
    before = weights(model)
    allocation = sl.search.budget(0.25, kinds=("lowrank",))
    report = sl.structurize(model, allocation, include=r"^[02]$", project=True)
    limit = 0.25 * (64 * 64 * 2)
    weight_params = sum(row.params_after - row.out_features for row in report.rows)
    assert weight_params <= limit and allocation.last.params == weight_params
    errors = true_errors(model, before, ["0", "2"])
    for row in report.rows:
        assert abs(row.projection_error - errors[row.name]) < 1e-6
    assert errors["0"] < 1e-6  # the rank-4 layer gets (no more than) its rank
    assert model[0].rank == 4

    # one uniform spec with the same parameter count: rank 8 for both
    uniform_report = sl.structurize(uniform, "lowrank:rank=8", include=r"^[02]$", project=True)
    assert sum(r.params_after for r in uniform_report.rows) == sum(r.params_after for r in report.rows)
    uniform_mean = sum(r.projection_error for r in uniform_report.rows) / 2
    assert sum(errors.values()) / 2 < uniform_mean - 0.03  # 0.350 vs 0.395


def test_mixed_kinds_on_a_model_with_unequal_layers():
    model = unequal_model()
    allocation = sl.search.budget(0.3, kinds=("btt", "lowrank", "tucker"))
    report = sl.structurize(model, allocation, project=True)
    assert len(report) == 3
    assert {spec.split(":")[0] for spec in report.plan.values()} <= {"btt", "lowrank", "tucker"}
    assert allocation.last.params <= 0.3 * (64 * 64 * 2 + 64 * 32)
    assert report.rows[0].projection_error < 1e-6  # exact structure found for the rank-4 layer


def test_greedy_allocation_is_optimal_on_convex_costs():
    """Against brute force over every pair of lowrank ranks for two layers."""
    from structlayers.search.budget import _lowrank
    model = unequal_model(seed=3)
    layers = [(n, model.get_submodule(n).weight.detach(), None) for n in ("2", "4")]
    allocation = sl.search.budget(600 + 10 * 96, kinds=("lowrank",))
    chosen = allocation.allocate(layers)
    best = min((a.error**2 + b.error**2, a.spec, b.spec)
               for a in _lowrank(layers[0][1], ()) for b in _lowrank(layers[1][1], ())
               if a.params + b.params <= allocation.last.budget)
    got = sum(c.error**2 for c in allocation.last.chosen.values())
    assert got <= best[0] + 1e-9, (chosen, best)


@pytest.mark.parametrize("fraction", [0, 0.0, -0.5, 1.5, True, "0.25", None])
def test_a_budget_outside_0_1_is_refused(fraction):
    with pytest.raises(ValueError, match="budget must be a fraction in"):
        sl.search.budget(fraction)


@pytest.mark.parametrize("kinds", [("circulant",), (), "btt"])
def test_unknown_kinds_are_refused(kinds):
    with pytest.raises(ValueError, match="kinds must be"):
        sl.search.budget(0.25, kinds=kinds)


def test_a_budget_below_the_smallest_allocation_changes_nothing():
    model = unequal_model()
    before = weights(model)
    with pytest.raises(ValueError, match="below the smallest allocation"):
        sl.structurize(model, sl.search.budget(10, kinds=("lowrank",)), project=True)
    assert all(type(m) is nn.Linear for m in (model[0], model[2], model[4]))
    assert all(torch.equal(before[n], w) for n, w in weights(model).items())
