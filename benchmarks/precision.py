"""FP8 training with per-core scaling vs fp32 vs naive FP8 casting, on mnist1d (CPU).

    python benchmarks/precision.py                 # 4 structures x 4 modes x 3 seeds (~8 min)
    python benchmarks/precision.py --quick         # a smoke run

Model: MLP 40 -> w -> w -> w -> 10 (GELU), the two hidden-to-hidden layers structured (dense,
Monarch, BTT rank 2, TT rank 4), trained with Adam and the muP per-core learning rates on the
mnist1d data set (generated procedurally by the `mnist1d` package, no download; 20000 samples,
16000 for training: 1000 steps of 128 are 8 epochs, short of overfitting). Modes:
    fp32         no policy
    fp8          sl.precision.FP8() on every layer (input/output nn.Linear converted to Dense):
                 E4M3 activations and weights, E5M2 gradients, dynamic per-tensor scaling
    fp8-delayed  the same with delayed scaling (amax history of 16)
    fp8-naive    FP8(scaling="none"): plain casts, no scaling
Rows are appended to benchmarks/results/precision.csv as runs finish (a rerun skips them); the
summary goes to precision.md and the scales of one FP8 BTT run to precision_scales.png.
"""

import argparse
import math
import statistics
from datetime import date
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

import structlayers as sl
from structlayers.bench import append_rows, machine, read_rows, write_markdown
from structlayers.data import mnist1d

RESULTS = Path(__file__).parent / "results"
STRUCTURES = ("dense", "monarch", "btt:rank=2", "tt:rank=4")
MODES = {"fp32": None, "fp8": {}, "fp8-delayed": {"scaling": "delayed"}, "fp8-naive": {"scaling": "none"}}
FIELDS = ["structure", "mode", "seed", "width", "steps", "train_loss", "test_loss", "test_acc"]
# train_loss / test_loss: cross-entropy over the whole split after training, in the run's precision


def make_model(structure: str, width: int) -> nn.Module:
    return nn.Sequential(nn.Linear(40, width), nn.GELU(), sl.build(structure, width, width), nn.GELU(),
                         sl.build(structure, width, width), nn.GELU(), nn.Linear(width, 10))


def train(structure, mode, seed, width, steps, data, batch=128, lr=3e-3):
    """Train one model; returns (row, model)."""
    x, y, x_test, y_test = data
    torch.manual_seed(seed)
    model = make_model(structure, width)
    if MODES[mode] is not None:
        sl.precision.apply(model, sl.precision.FP8(**MODES[mode]), linear=True)
    optimizer = torch.optim.Adam(sl.mup.param_groups(model, lr=lr, base_width=64))
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (batch,), generator=gen)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        train_loss = nn.functional.cross_entropy(model(x), y).item()
        logits = model(x_test)
        test_loss = nn.functional.cross_entropy(logits, y_test).item()
        test_acc = (logits.argmax(1) == y_test).float().mean().item()
    return {"structure": structure, "mode": mode, "seed": seed, "width": width, "steps": steps,
            "train_loss": f"{train_loss:.4f}", "test_loss": f"{test_loss:.4f}",
            "test_acc": f"{test_acc:.4f}"}, model


def summarize(rows) -> list[str]:
    """Mean over seeds per (structure, mode), each mode's losses relative to fp32's, and the
    seed-to-seed spread of fp32's test loss (what a 2% difference is measured against)."""
    def values(structure, mode, key):
        return [float(r[key]) for r in rows if r["structure"] == structure and r["mode"] == mode]

    lines = ["| structure | mode | train loss | test loss | test acc | train / fp32 | test / fp32 |",
             "|---|---|---|---|---|---|---|"]
    for structure in dict.fromkeys(r["structure"] for r in rows):
        ref_train = statistics.fmean(values(structure, "fp32", "train_loss") or [math.nan])
        ref_test = statistics.fmean(values(structure, "fp32", "test_loss") or [math.nan])
        for mode in MODES:
            if not values(structure, mode, "test_loss"):
                continue
            train_loss, test_loss = (statistics.fmean(values(structure, mode, k))
                                     for k in ("train_loss", "test_loss"))
            spread = values(structure, mode, "test_loss")
            note = f" (seed spread {min(spread):.3f}-{max(spread):.3f})" if mode == "fp32" else ""
            lines.append(f"| {structure} | {mode} | {train_loss:.4f} | {test_loss:.4f}{note} "
                         f"| {statistics.fmean(values(structure, mode, 'test_acc')):.3f} "
                         f"| {train_loss / ref_train:.3f} | {test_loss / ref_test:.3f} |")
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--structures", nargs="+", default=list(STRUCTURES))
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--quick", action="store_true", help="2 structures, 200 steps, 1 seed")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.quick:
        args.structures, args.steps, args.seeds = ["dense", "btt:rank=2"], 200, 1
    for structure in args.structures:  # bad names fail before any training
        sl.build(structure, args.width, args.width)
    data = mnist1d(samples=20000)
    csv_path = args.out / "precision.csv"
    done = {(r["structure"], r["mode"], r["seed"], r["width"], r["steps"]) for r in read_rows(csv_path)}
    jobs = [(s, m, seed) for s in args.structures for m in args.modes for seed in range(args.seeds)]
    with append_rows(csv_path, FIELDS) as write:
        for structure, mode, seed in tqdm(jobs, desc="training", unit="run", disable=None):
            if (structure, mode, str(seed), str(args.width), str(args.steps)) in done:
                continue
            row, model = train(structure, mode, seed, args.width, args.steps, data)
            write(row)
            if structure == "btt:rank=2" and mode == "fp8" and seed == 0:
                sl.precision.plot_scales(model, args.out / "precision_scales.png",
                                         title=f"FP8 scales, mnist1d MLP with BTT rank 2 (w={args.width})")
    rows = [r for r in read_rows(csv_path) if r["width"] == str(args.width) and r["steps"] == str(args.steps)]
    lines = [f"# FP8 training on mnist1d ({date.today().isoformat()}, {machine()})", "",
             f"MLP 40 -> {args.width} -> {args.width} -> {args.width} -> 10, hidden layers structured, "
             f"Adam with muP per-core LRs, {args.steps} steps of 128 on 16000 samples, mean of "
             f"{args.seeds} seed(s). Losses: cross-entropy over the whole train / test split after "
             "training, evaluated in the run's own precision.", "", *summarize(rows)]
    write_markdown(args.out / "precision.md", lines)
    print("\n".join(lines))
    print("wrote", csv_path, args.out / "precision.md", args.out / "precision_scales.png")


if __name__ == "__main__":
    main()
