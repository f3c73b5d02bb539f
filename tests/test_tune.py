"""Measured plan choice (structlayers/tune.py): every candidate is exact, the first call measures
once, the settings and the command line."""

import pytest
import torch

import structlayers as sl
from structlayers import tune
from structlayers.execute import _planned
from structlayers.plan import candidate_plans, make_plan

SPECS = ["monarch", "btt:rank=2", "btt:rank=2,cores=3", "tt:cores=3,rank=3", "tucker:rank=0.3", "kronecker",
         "lowrank:rank=5"]


def reference(layer, x, grad_y):
    """y and the gradients of x and every parameter, float64, through the einsum program."""
    x = x.detach().requires_grad_()
    with sl.backend("einsum"):
        y = layer(x)
    return (y, *torch.autograd.grad(y, [x, *layer.parameters()], grad_y))


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("training", [True, False])
def test_every_candidate_plan_equals_the_einsum_program(spec, training):
    """Whichever candidate the measurement picks computes the layer: forward and every gradient
    of each one, float64, against the reference einsums (a token count off its bucket)."""
    torch.manual_seed(0)
    layer = sl.build(spec, 96, 160, dtype=torch.float64)
    x = torch.randn(200, 96, dtype=torch.float64)
    grad_y = torch.randn(200, 160, dtype=torch.float64)
    expected = reference(layer, x, grad_y)
    cores = layer._cores()
    plans = candidate_plans(make_plan(layer.program, 200, training), count=64)
    assert len(plans) >= 2 and len({p.matmuls for p in plans}) == len(plans)
    for plan in plans:
        xs = x.clone().requires_grad_()
        operands = [cores[mm.step.core] for mm in plan.matmuls]
        y = _planned(plan, xs, operands, layer.bias)
        got = (y, *torch.autograd.grad(y, [xs, *layer.parameters()], grad_y))
        for a, b in zip(got, expected, strict=True):
            torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


def test_candidates_start_with_the_cost_models_plan_and_stay_within_the_slack():
    plan = make_plan(sl.build("monarch", 1024, 4096).program, 2048)
    plans = candidate_plans(plan, count=6, slack=2.0)
    assert plans[0] is plan and 2 <= len(plans) <= 6
    assert all(p.seconds <= 2.0 * plan.seconds for p in plans)
    assert [p.seconds for p in plans[1:]] == sorted(p.seconds for p in plans[1:])


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_the_first_call_measures_once_and_the_layer_stays_exact(backend):
    torch.manual_seed(0)
    layer = sl.build("btt:rank=2,cores=3", 128, 192, dtype=torch.float64)
    x = torch.randn(300, 128, dtype=torch.float64)
    grad_y = torch.randn(300, 192, dtype=torch.float64)
    expected = reference(layer, x, grad_y)
    tune.forget()
    with tune.tuning(min_seconds=0), sl.backend(backend):
        xs = x.clone().requires_grad_()
        y = layer(xs)
        got = (y, *torch.autograd.grad(y, [xs, *layer.parameters()], grad_y))
        key = make_plan(layer.program, 300, True)
        first = tune.measured()[key]
        layer(xs)  # the second call reuses the measurement
        assert tune.measured()[key] is first
    names = [name for name, _ in first.seconds]
    assert ("to_dense() + F.linear" in names) == (backend == "auto")
    assert len(names) >= 3 and all(0 < s < float("inf") for _, s in first.seconds)
    assert first.materialise == (min(first.seconds, key=lambda n_s: n_s[1])[0] == "to_dense() + F.linear")
    assert not (backend == "torch" and first.materialise)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


def test_training_and_inference_plans_are_measured_apart():
    layer = sl.build("monarch", 256, 256)
    x = torch.randn(512, 256)
    tune.forget()
    with tune.tuning(min_seconds=0):
        layer(x.requires_grad_()).sum().backward()
        assert set(tune.measured()) == {make_plan(layer.program, 512, True)}
        with torch.no_grad():
            layer(x)
    assert set(tune.measured()) == {make_plan(layer.program, 512, t) for t in (True, False)}


def test_no_measurement_when_off_or_below_min_seconds():
    layer = sl.build("monarch", 64, 64)
    x = torch.randn(32, 64)
    tune.forget()
    with torch.no_grad():
        assert make_plan(layer.program, 32, False).seconds < tune.MIN_SECONDS
        layer(x)  # a tiny layer: the cost model decides
        with tune.tuning(enabled=False, min_seconds=0):
            layer(x)
    assert tune.measured() == {}


def test_a_tiny_budget_still_times_every_candidate():
    layer = sl.build("tt:cores=3,rank=4", 64, 96)
    tune.forget()
    with tune.tuning(min_seconds=0, budget=1e-9), torch.no_grad():
        layer(torch.randn(100, 64))
    (m,) = tune.measured().values()
    assert all(0 < s < float("inf") for _, s in m.seconds)


@pytest.mark.parametrize("kwargs, error", [({"enabled": 1}, TypeError), ({"min_seconds": -1.0}, ValueError),
                                           ({"min_seconds": float("nan")}, ValueError),
                                           ({"budget": 0}, ValueError)])
def test_bad_tuning_settings_raise(kwargs, error):
    with pytest.raises(error, match=next(iter(kwargs))), tune.tuning(**kwargs):
        pass
    assert tune.wants_measuring(make_plan(sl.build("monarch", 1024, 4096).program, 2048))  # unchanged


def test_show_measure_prints_the_timed_candidates_and_the_choice(capsys):
    from structlayers.cli import main

    assert main(["show", "btt:rank=2", "128", "256", "--tokens", "256", "--measure"]) == 0
    out = capsys.readouterr().out
    assert "float32 forward+backward, measured at the first call" in out
    assert "float32 inference, measured at the first call" in out
    assert out.count("<- chosen") == 2 and "layout 1 (cost model's choice)" in out
    with pytest.raises(SystemExit) as exit_:
        main(["show", "monarch", "64", "64", "--measure", "int8"])
    assert exit_.value.code == 2 and "invalid choice: 'int8'" in capsys.readouterr().err


def test_no_measurement_under_a_dispatch_mode():
    """FlopCounterMode sees the layer's own matmuls only, not timing runs."""
    from torch.utils.flop_counter import FlopCounterMode

    layer = sl.build("tt:cores=3,rank=4", 64, 96)
    tune.forget()
    with tune.tuning(min_seconds=0), sl.backend("torch"), FlopCounterMode(display=False) as counter:
        layer(torch.randn(100, 64))
    assert tune.measured() == {} and counter.get_total_flops() == layer.flops(100)
