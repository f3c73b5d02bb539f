"""Compute-efficiency sweeps and their summaries: loss vs training FLOPs, LR transfer, wall-clock.

`sweep` trains a list of jobs (structure, width, lr, parameterization, steps, seed), appending each
finished run to a CSV (one row per curve point) and skipping the runs already there, so a killed
sweep resumes where it stopped (efficiency_suite.py builds the jobs of the compute and LR suites).
The summaries read those runs:
    compute_to_reach   FLOPs at which a structure's runs first reach a loss (log-interpolated)
    compute_ratios     "compute needed to reach dense's final loss", dense / structure
    frontier           the (FLOPs, loss) points no cheaper point beats
    power_law          loss ~ a * FLOPs^-b fitted to the final points of a structure's runs
    best_lrs           best LR per (structure, parameterization, width) and its drift in grid steps
    tuned_lrs          each structure's best muP LR at the base width, to transfer
    wall_clock         step time per structure and width next to its FLOP ratio to dense
"""

import math
import statistics
from collections import defaultdict
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .bench import append_rows, read_rows
from .training import Run, Task, check_sweep, train_run

FIELDS = ["task", "structure", "width", "lr", "parameterization", "steps", "seed", "params",
          "flops_per_step", "step_ms", "step", "flops", "train_loss", "val_loss"]
_KEY = ("task", "structure", "width", "lr", "parameterization", "steps", "seed")


def _key(values) -> tuple:
    return tuple(str(values[k]) for k in _KEY)


def load_runs(path: Path) -> list[Run]:
    """The runs recorded in a results CSV, curves in step order."""
    runs = {}
    for row in read_rows(Path(path)):
        key = _key(row)
        if key not in runs:
            runs[key] = Run(row["task"], row["structure"], int(row["width"]), float(row["lr"]),
                            row["parameterization"], int(row["steps"]), int(row["seed"]),
                            int(row["params"]), int(row["flops_per_step"]), float(row["step_ms"]))
        runs[key].curve.append((int(row["step"]), int(row["flops"]), float(row["train_loss"]),
                                float(row["val_loss"])))
    for run in runs.values():
        run.curve.sort()
    return list(runs.values())


def _run_key(run: Run) -> tuple:
    return _key(vars(run))


def _job_key(task: Task, job) -> tuple:
    return _key(dict(zip(_KEY, (task.name, *job), strict=True)))


def sweep(task: Task, jobs, path: Path, progress: bool = True, points: int = 12) -> list[Run]:
    """Train every (structure, width, lr, parameterization, steps, seed) job not yet in the CSV at
    `path`, appending each run's curve (~`points` evaluations) when it finishes. Returns all runs
    of these jobs."""
    jobs = list(jobs)
    for structure, width in sorted({job[:2] for job in jobs}):  # each pair a job trains, nothing more
        check_sweep(task, [structure], [width])
    path = Path(path)
    done = {_run_key(r) for r in load_runs(path)}
    with append_rows(path, FIELDS) as write:
        for job in tqdm(jobs, desc=f"{task.name} runs", unit="run", disable=None if progress else True):
            if _job_key(task, job) in done:
                continue
            structure, width, lr, parameterization, steps, seed = job
            try:
                run = train_run(task, structure, width, lr, steps, parameterization, seed, points)
            except FloatingPointError:  # a diverged run (too high an LR) scores as infinite loss
                run = Run(task.name, *job, curve=[(steps, 0, math.inf, math.inf)])
            fixed = {k: v for k, v in vars(run).items() if k in FIELDS} | {"step_ms": f"{run.step_ms:.3f}"}
            for step, flops, train_loss, val_loss in run.curve:
                write(fixed | {"step": step, "flops": flops, "train_loss": f"{train_loss:.5f}",
                               "val_loss": f"{val_loss:.5f}"})
            done.add(_job_key(task, job))
    # read back from the CSV, so a fresh run and a resumed one report the same rounded numbers
    wanted = {_job_key(task, job) for job in jobs}
    return [r for r in load_runs(path) if _run_key(r) in wanted]


# --- summaries -------------------------------------------------------------------------------
def compute_to_reach(runs: list[Run], loss: float, which: str = "val") -> float:
    """The fewest training FLOPs at which any of `runs` first has loss <= `loss`, interpolated
    linearly in (log FLOPs, loss) between evaluations; inf if none gets there."""
    column = 3 if which == "val" else 2
    best = math.inf
    for run in runs:
        previous = None
        for point in run.curve:
            flops, value = point[1], point[column]
            if value <= loss:
                if previous is None or previous[1] <= loss:
                    reach = flops
                else:  # between the previous evaluation (above) and this one (below)
                    t = (previous[1] - loss) / (previous[1] - value)
                    reach = math.exp(math.log(previous[0]) + t * (math.log(flops) - math.log(previous[0])))
                best = min(best, reach)
                break
            previous = (flops, value)
    return best


def compute_ratios(runs: list[Run], reference: str = "dense") -> list[dict]:
    """Per structure: dense's final validation loss at its largest width (the target), the FLOPs
    each structure needs to reach it, and dense's FLOPs / the structure's (> 1: cheaper)."""
    by_structure = defaultdict(list)
    for run in runs:
        by_structure[run.structure].append(run)
    if reference not in by_structure:
        raise ValueError(f"no {reference!r} runs to compare against")
    widest = max(by_structure[reference], key=lambda r: r.width)
    target = widest.final_val_loss
    dense_flops = compute_to_reach(by_structure[reference], target)
    rows = []
    for structure, mine in by_structure.items():
        flops = compute_to_reach(mine, target)
        best = min(mine, key=lambda r: r.final_val_loss)
        rows.append({"structure": structure, "target_loss": target, "flops_to_target": flops,
                     "ratio": dense_flops / flops, "best_loss": best.final_val_loss,
                     "best_width": best.width, "widths": sorted({r.width for r in mine})})
    return rows


def frontier(runs: list[Run]) -> list[tuple[float, float]]:
    """(FLOPs, loss) points of the runs' curves that no cheaper point beats: the compute frontier."""
    points = sorted((p[1], p[3]) for r in runs for p in r.curve if p[1] > 0)
    front, best = [], math.inf
    for flops, loss in points:
        if loss < best:
            front.append((flops, loss))
            best = loss
    return front


def power_law(runs: list[Run]) -> tuple[float, float]:
    """(a, b) of loss ~ a * FLOPs^-b, least squares in log-log on the final points of the runs
    (one per width), the usual compute-scaling fit; nan if fewer than 2 widths."""
    finals = [(r.total_flops, r.final_val_loss) for r in runs if math.isfinite(r.final_val_loss)]
    if len({f for f, _ in finals}) < 2:
        return math.nan, math.nan
    logc, logl = np.log([f for f, _ in finals]), np.log([v for _, v in finals])
    slope, intercept = np.polyfit(logc, logl, 1)
    return float(math.exp(intercept)), float(-slope)


def final_loss(run: Run) -> float:
    """The loss an LR sweep ranks by: the smoothed training loss at the end."""
    return run.final_train_loss


def best_lrs(runs: list[Run]) -> list[dict]:
    """Per (structure, parameterization): the best LR at each width and how far it moves, in
    factor-of-2 grid steps (|log2| of a ratio of best LRs): over any two widths at most 4x apart
    ("drift_4x"; "transfers" if it is at most one step) and over all widths ("drift_steps")."""
    groups = defaultdict(lambda: defaultdict(list))
    for run in runs:
        groups[(run.structure, run.parameterization)][run.width].append(run)
    rows = []
    for (structure, parameterization), widths in groups.items():
        best = {w: min(rs, key=final_loss).lr for w, rs in sorted(widths.items())}
        drift = math.log2(max(best.values()) / min(best.values()))
        drift_4x = max(abs(math.log2(best[a] / best[b])) for a in best for b in best if a <= b <= 4 * a)
        rows.append({"structure": structure, "parameterization": parameterization, "best_lr": best,
                     "drift_steps": drift, "drift_4x": drift_4x, "transfers": drift_4x <= 1 + 1e-9})
    return rows


def tuned_lrs(runs: list[Run], width: int) -> dict[str, float]:
    """{structure: best muP LR at `width` (the muP base width) in an LR sweep}: the LR to transfer."""
    return {row["structure"]: row["best_lr"][width]
            for row in best_lrs([r for r in runs if r.parameterization == "mup"]) if width in row["best_lr"]}


def wall_clock(runs: list[Run], reference: str = "dense") -> list[dict]:
    """Per (structure, width): median step time, its ratio to dense's at the same width, and the
    FLOP ratio to dense (so the gap between the two shows how well the FLOP cut turns into time)."""
    cells = defaultdict(list)
    for run in runs:
        if run.step_ms > 0:
            cells[(run.structure, run.width)].append(run)
    rows = []
    for (structure, width), mine in sorted(cells.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        ref = cells.get((reference, width))
        step_ms = statistics.median(r.step_ms for r in mine)
        ref_ms = statistics.median(r.step_ms for r in ref) if ref else math.nan
        ref_flops = ref[0].flops_per_step if ref else math.nan
        rows.append({"structure": structure, "width": width, "step_ms": step_ms,
                     "flops_per_step": mine[0].flops_per_step, "time_vs_dense": step_ms / ref_ms,
                     "flops_vs_dense": mine[0].flops_per_step / ref_flops})
    return rows
