"""Compute efficiency of every structure against dense, on CPU (the full suite; about an hour).

    python benchmarks/efficiency.py                  # mlp and gpt: LR sweeps, then loss vs compute
    python benchmarks/efficiency.py --task mlp       # one task
    python benchmarks/efficiency.py --quick          # the `structlayers bench all --quick` settings
    python benchmarks/efficiency.py --gpt-long       # dense vs BTT rank 2 GPTs, 1500 steps (~30 min)
    python benchmarks/efficiency.py --mlp-fresh      # the MLP on fresh data every step (~20 min)

For each task it first sweeps the learning rate (muP and standard parameterization, 3 widths over
a 4x range), then trains every structure at every width with muP at the LR it tuned at the
narrowest sweep width ("tuned": the muP LR transferred, as a user would), and writes
efficiency_{task}_{lr,compute}.{csv,md,png} under benchmarks/results/. Every run is appended to
the CSV as it ends; a rerun skips the runs there (kill it any time). Settings: FULL and QUICK in
structlayers/efficiency_suite.py.
"""

import argparse
from pathlib import Path

from structlayers.bench import write_markdown
from structlayers.efficiency import load_runs
from structlayers.efficiency_report import headline_table
from structlayers.efficiency_suite import FULL, QUICK, Settings, make_task, run_compute, run_lr
from structlayers.training import MLPTask

RESULTS = Path(__file__).parent / "results"
# longer GPT training for the two contenders, BTT also one width wider (its step costs about what
# dense's does one width narrower); LRs tuned by the main GPT sweep
GPT_LONG = Settings(("dense", "btt2"), (128, 256), 1500, (), 0, (), wide={"btt2": (512,)})
# the main MLP sweep trains on 48000 samples, about 5 passes: the structures' ranking there mixes
# compute efficiency with how much each overfits. Here no sample is seen twice (330000 generated,
# 264000 for training >= 2000 steps x 128), the compute-limited regime scaling laws assume
MLP_FRESH = Settings(("dense", "lowrank", "btt1", "btt2"), (64, 128, 256, 512, 1024), 2000, (), 0, (),
                     wide={"btt1": (2048, 4096), "btt2": (2048, 4096), "lowrank": (2048,)})
MLP_FRESH_SAMPLES = 330_000


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", nargs="+", choices=["mlp", "gpt"], default=["mlp", "gpt"])
    parser.add_argument("--suite", nargs="+", choices=["lr", "compute"], default=["lr", "compute"])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--corpus", help="gpt: a text file (default: the standard library's source)")
    parser.add_argument("--gpt-long", action="store_true", help="only the longer GPT runs (GPT_LONG)")
    parser.add_argument("--mlp-fresh", action="store_true",
                        help="only the MLP on fresh data (MLP_FRESH), at the main MLP sweep's tuned LRs")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.gpt_long:
        print("\n".join(run_compute(make_task("gpt"), GPT_LONG, args.out / "gpt_long", lr="tuned",
                                    lr_dir=args.out)))
        return
    if args.mlp_fresh:
        task = MLPTask(samples=MLP_FRESH_SAMPLES, val_samples=12000)
        print("\n".join(run_compute(task, MLP_FRESH, args.out / "mlp_fresh", lr="tuned", lr_dir=args.out)))
        return
    for name in args.task:
        settings = (QUICK if args.quick else FULL)[name]
        task = make_task(name, args.quick, args.corpus)
        if "lr" in args.suite:
            print("\n".join(run_lr(task, settings, args.out)))
        if "compute" in args.suite:
            print("\n".join(run_compute(task, settings, args.out, lr="tuned")))
    write_summary(args.out)


def write_summary(out: Path):
    """efficiency.md: the headline table of every task with results in `out`."""
    lines = ["# Compute efficiency of structured layers vs dense", "",
             "Date, machine, threads and data of each task: the first lines of its "
             "efficiency_{task}_{compute,lr}.md.", ""]
    for task in ("mlp", "gpt"):
        compute, lr = (out / f"efficiency_{task}_{suite}.csv" for suite in ("compute", "lr"))
        if compute.exists():
            lines += [f"## {task}", "", *headline_table(load_runs(compute), load_runs(lr)), "",
                      f"Details: efficiency_{task}_compute.md, efficiency_{task}_lr.md.", ""]
    print("\n".join(lines))
    write_markdown(out / "efficiency.md", lines)


if __name__ == "__main__":
    main()
