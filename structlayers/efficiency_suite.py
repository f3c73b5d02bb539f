"""`structlayers bench compute|lr`: the compute-efficiency suites with their default settings.

Files under `out` (every suite resumes from its CSV):
    efficiency_{task}_compute.{csv,md,png}   loss vs training FLOPs, compute-to-dense ratios,
                                             wall-clock per step
    efficiency_{task}_lr.{csv,md,png}        muP vs SP learning-rate transfer
"""

from dataclasses import dataclass, field
from pathlib import Path

from .bench import write_markdown
from .efficiency import load_runs, sweep, tuned_lrs
from .efficiency_report import (
    compute_table,
    header,
    lr_table,
    plot_compute,
    plot_lr,
    wall_clock_table,
)
from .training import STRUCTURES, TASKS, GPTTask, MLPTask, check_sweep


@dataclass
class Settings:
    structures: tuple
    widths: tuple  # compute sweep
    steps: int
    lr_widths: tuple  # LR sweep: 3+ widths over a 4x range
    lr_steps: int
    lrs: tuple  # a factor-2 grid
    seeds: int = 1
    lr_structures: tuple | None = None  # LR sweep (None: the same as `structures`)
    wide: dict = field(default_factory=dict)  # compute sweep: {structure: more widths} beyond `widths`

    def compute_jobs(self, rates: dict) -> list[tuple]:
        """(structure, width, lr, "mup", steps, seed) of the compute sweep; rates: {structure: lr}."""
        return [(s, w, rates[s], "mup", self.steps, seed) for s in self.structures
                for w in (*self.widths, *self.wide.get(s, ())) for seed in range(self.seeds)]

    def lr_jobs(self) -> list[tuple]:
        """(structure, width, lr, parameterization, steps, 0) of the LR sweep, muP and SP."""
        return [(s, w, lr, p, self.lr_steps, 0) for p in ("mup", "standard")
                for s in self.lr_structures or self.structures for w in self.lr_widths for lr in self.lrs]

    def check(self, task):
        """Raise before any training if a job of either suite names an unknown structure or a
        width that structure would have to pad."""
        rates = dict.fromkeys(self.structures, 1.0)
        for structure, width in sorted({job[:2] for job in self.compute_jobs(rates) + self.lr_jobs()}):
            check_sweep(task, [structure], [width])


FULL = {
    # cheap structures also run wider, where their FLOPs per step meet dense's at 256..1024
    "mlp": Settings(tuple(STRUCTURES), (64, 128, 256, 512, 1024), 2000, (64, 128, 256, 512, 1024), 300,
                    lrs=tuple(2.0 ** -k for k in range(11, 4, -1)),
                    wide={"btt1": (2048, 4096), "btt2": (2048, 4096), "lowrank": (2048,)}),
    # the GPT costs ~50x the MLP per step on a CPU: fewer structures, widths and LRs
    # muP's best LR is 2^-6..2^-7 and SP's falls to 2^-10..2^-11 at width 256: the grid holds both
    "gpt": Settings(("dense", "lowrank", "btt1", "btt2"), (64, 128, 256), 400, (64, 128, 256), 100,
                    lrs=tuple(2.0 ** -k for k in range(11, 3, -1))),
}
QUICK = {
    "mlp": Settings(("dense", "lowrank", "btt1", "btt2"), (64, 128, 256), 150, (64, 128, 256), 60,
                    lrs=(2.0 ** -10, 2.0 ** -8, 2.0 ** -6)),
    "gpt": Settings(("dense", "btt1"), (32, 64), 20, (32, 64, 128), 8, lrs=(2.0 ** -9, 2.0 ** -6),
                    lr_structures=("dense",)),
}


def check_lr(lr) -> float:
    """A base LR from the command line: a positive number ("task" and "tuned" are handled apart)."""
    try:
        value = float(lr)
    except (TypeError, ValueError):
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise ValueError(f'lr must be a positive number, "task" or "tuned", got {lr!r}')
    return value


def make_task(name: str, quick: bool = False, corpus=None):
    """The task `name` ("mlp" or "gpt") at full or quick size; raises before any data is made
    for an unknown name or a missing corpus file."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; valid: {list(TASKS)}")
    if name == "mlp":
        # 48000 training samples: 2000 steps of 128 see each about 5 times (see MLP_FRESH for
        # the fresh-data regime)
        return MLPTask(samples=4000 if quick else 60000)
    if quick:
        return GPTTask(corpus, max_bytes=300_000, batch_size=16, val_batches=4)
    return GPTTask(corpus)


def run_compute(task, settings: Settings, out: Path, lr="task", progress: bool = True,
                lr_dir: Path | None = None) -> list[str]:
    """Every structure at every width with muP; lr: a number, "task" (the task's default) or
    "tuned" (each structure's best muP LR at the base width in this task's LR sweep in `out`; a
    structure the sweep left out takes dense's, and the report says so; the sweep's CSV is read
    from `lr_dir`, default `out`)."""
    out = Path(out)
    if lr == "tuned":
        lr_dir = Path(lr_dir or out)
        found = tuned_lrs(load_runs(lr_dir / f"efficiency_{task.name}_lr.csv"), task.base_width)
        missing = [s for s in settings.structures if s not in found]
        if missing and "dense" not in found:
            raise ValueError(f"lr='tuned' needs an LR sweep of {missing} (or of dense) in {lr_dir} "
                             f"(run `structlayers bench lr --task {task.name}` first)")
        rates = {s: found.get(s, found.get("dense")) for s in settings.structures}
        origin = {s: "" if s in found else " (dense's)" for s in settings.structures}
    else:
        rate = task.lr if lr == "task" else check_lr(lr)
        rates = dict.fromkeys(settings.structures, rate)
        origin = dict.fromkeys(settings.structures, "")
    stem = out / f"efficiency_{task.name}_compute"
    runs = sweep(task, settings.compute_jobs(rates), stem.with_suffix(".csv"), progress)
    title = f"Loss vs training compute, {task.name} (muP)"
    lrs = ", ".join(f"{s} {rates[s]:.3g}{origin[s]}" for s in settings.structures)
    widths_text = ", ".join(map(str, settings.widths)) + "".join(
        f" (+ {s} at {', '.join(map(str, w))})" for s, w in settings.wide.items())
    lines = [*header(title, task.source),
             f"{settings.steps} Adam steps per run, widths {widths_text}, "
             f"base LRs (muP, base width {task.base_width}): {lrs}. FLOPs: forward+backward of the "
             "whole model per step (torch FlopCounterMode) x steps.", "", *compute_table(runs), "",
             "## Wall-clock per training step (CPU)", "", *wall_clock_table(runs), "",
             f"![loss vs compute]({stem.name}.png)"]
    write_markdown(stem.with_suffix(".md"), lines)
    plot_compute(runs, stem.with_suffix(".png"), title)
    return lines


def run_lr(task, settings: Settings, out: Path, progress: bool = True) -> list[str]:
    """LR grid x widths x structures, muP and SP; best LR per width and its drift."""
    stem = Path(out) / f"efficiency_{task.name}_lr"
    # points=2: an LR sweep ranks by the end of each run only
    runs = sweep(task, settings.lr_jobs(), stem.with_suffix(".csv"), progress, points=2)
    title = f"Learning-rate transfer across widths, {task.name}"
    lines = [*header(title, task.source),
             f"{settings.lr_steps} Adam steps per run; loss = smoothed training loss at the end; LR grid "
             f"{', '.join(f'{lr:.3g}' for lr in settings.lrs)} (factor 2). muP: per-core LRs from "
             f"`sl.mup.param_groups` (base width {task.base_width}) and muP init; SP: one LR for every "
             "parameter and 1/sqrt(fan_in) init.", "", *lr_table(runs), "",
             f"![LR transfer]({stem.name}.png)"]
    write_markdown(stem.with_suffix(".md"), lines)
    plot_lr(runs, stem.with_suffix(".png"), title)
    return lines
