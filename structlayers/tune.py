"""Measured plan choice: the cost model ranks layouts, one measurement at the first call picks.

The cost model (plan.py) prices layouts from rates fitted to a few shapes, and the same batched
matmul runs up to 5x faster or slower with a layout in ways the fit misses. On the AMX Xeon dev
machine, Monarch 1024 -> 4096's second matmul writing (T, n0, n1) directly ran at 47 GFLOP/s,
writing (n0, T, n1) and copying at 240 GFLOP/s; the cost model ranks the first cheaper. So where
a layer is large enough for it to pay (the model's estimate at least `min_seconds`), or it runs
in half precision on CPU (where the model is off by 2-3x, plan.py), the first call of each plan
times the cost model's cheapest few layouts (`plan.candidate_plans`) and, under backend "auto",
to_dense() + F.linear, taking turns, and keeps the fastest for that (layer shape, token bucket,
forward or forward+backward, precision). Every candidate computes the same map; only the time
differs. `measured()` and `structlayers show --measure` say what was timed and chosen.
"""

import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from .plan import Plan, candidate_plans

MIN_SECONDS = 2e-3  # measure plans the cost model prices at least this (tiny layers: the model)
BUDGET_SECONDS = 2.0  # time one measurement may take, after its first two rounds
CANDIDATES = 6  # layouts timed per plan (the cost model's cheapest)
_ROUNDS = 4  # the first fills the buffer pool; the best of the others counts

_settings = {"enabled": True, "min_seconds": MIN_SECONDS, "budget": BUDGET_SECONDS}


@dataclass(frozen=True)
class Measurement:
    """What the first call of a plan measured: the plan to run (`chosen`), whether
    to_dense() + F.linear ran faster (`materialise`), and each candidate's best seconds."""

    chosen: Plan
    materialise: bool
    seconds: tuple[tuple[str, float], ...]  # (candidate, best seconds), in the order timed

    def describe(self) -> str:
        best = min(s for _, s in self.seconds)
        lines = [f"measured at the first call ({len(self.seconds)} candidates, best of up to "
                 f"{_ROUNDS - 1} runs each):"]
        for name, s in self.seconds:
            lines.append(f"  {name}: {s * 1e3:.3f} ms" + ("  <- chosen" if s == best else ""))
        if not self.materialise:
            lines.append(self.chosen.describe())
        return "\n".join(lines)


_measured: dict[Plan, Measurement] = {}  # the cost model's plan -> what measuring it chose


@contextmanager
def tuning(enabled: bool = True, min_seconds: float = MIN_SECONDS, budget: float = BUDGET_SECONDS):
    """Set, inside a `with` block, whether plans are measured at their first call (`enabled`;
    off: the cost model alone decides, as it does for tiny layers), from which cost-model
    estimate on (`min_seconds`, seconds of one forward(+backward)) and for how long at most
    (`budget`, seconds after the first two rounds). Plans measured before keep their choice."""
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {type(enabled).__name__}")
    if not min_seconds >= 0:
        raise ValueError(f"min_seconds must be >= 0, got {min_seconds!r}")
    if not budget > 0:
        raise ValueError(f"budget must be > 0 seconds, got {budget!r}")
    previous = dict(_settings)
    _settings.update(enabled=enabled, min_seconds=min_seconds, budget=budget)
    try:
        yield
    finally:
        _settings.update(previous)


def measured() -> dict[Plan, Measurement]:
    """The plans measured so far in this process (keyed by the cost model's plan) and what each
    measurement chose."""
    return dict(_measured)


def forget() -> None:
    """Drop every measurement (the next call of each plan measures again)."""
    _measured.clear()


def chosen(plan: Plan) -> Plan:
    """The plan that runs for the cost model's `plan`: the measured choice once measured."""
    m = _measured.get(plan)
    return plan if m is None else m.chosen


def wants_measuring(plan: Plan, device: torch.device | None = None) -> bool:
    """Whether `plan`'s first call measures: tuning on, the layer large enough for it to pay or
    in half precision on CPU (there the dense-or-plan choice is always measured), real tensors
    (CPU or CUDA) and no dispatch mode active (FlopCounterMode, fake tensors: the timing runs
    would be counted or mean nothing)."""
    if device is not None and device.type not in ("cpu", "cuda"):
        return False
    if _get_current_dispatch_mode() is not None:
        return False
    return _settings["enabled"] and (plan.precision == "half" or plan.seconds >= _settings["min_seconds"])


def choose(plan: Plan, run: Callable[[Plan | None], None], allow_dense: bool,
           device: torch.device) -> tuple[Plan, bool]:
    """(plan to run, whether to materialise) for the cost model's `plan`: measured once by
    `run(candidate)` (one forward(+backward) of a candidate plan, or of to_dense() + F.linear for
    None) where `wants_measuring`, else the cost model's choice."""
    if plan in _measured:
        m = _measured[plan]
        return m.chosen, m.materialise and allow_dense
    if not wants_measuring(plan, device):
        return plan, plan.materialise and allow_dense
    layouts = [plan] if plan.seconds < _settings["min_seconds"] else list(candidate_plans(plan, CANDIDATES))
    names = [f"layout {k + 1}" + (" (cost model's choice)" if k == 0 else "") for k in range(len(layouts))]
    runs: list[tuple[str, Plan | None]] = list(zip(names, layouts, strict=True))
    if allow_dense:
        runs.append(("to_dense() + F.linear", None))
    if len(runs) == 1:
        return plan, False
    best = _time_in_turns(runs, run, device)
    fastest = min(range(len(runs)), key=best.__getitem__)
    chosen = runs[fastest][1]
    _measured[plan] = Measurement(plan if chosen is None else chosen, chosen is None,
                                  tuple((name, s) for (name, _), s in zip(runs, best, strict=True)))
    return _measured[plan].chosen, chosen is None


def _time_in_turns(runs, run, device: torch.device) -> list[float]:
    """Best seconds of each run, the runs taking turns (round 0 fills the buffer pool and is not
    counted); rounds stop once the budget is spent."""
    best = [float("inf")] * len(runs)
    start = time.perf_counter()
    for round_ in range(_ROUNDS):
        for k, (_, candidate) in enumerate(runs):
            synchronize(device)
            began = time.perf_counter()
            run(candidate)
            synchronize(device)
            if round_ > 0:
                best[k] = min(best[k], time.perf_counter() - began)
        if round_ > 0 and time.perf_counter() - start > _settings["budget"]:
            break
    return best


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so a timed run is over when the clock is read."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
