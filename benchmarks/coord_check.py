"""muP coordinate check for every structure: hidden-layer output RMS and the RMS of its change after
a few Adam steps, across widths, under muP and under the standard parameterization (SP).

    python benchmarks/coord_check.py            # widths 128..2048, about a minute on 2 CPU cores

Writes benchmarks/results/coord_check.{csv,md,png}: with muP the curves are flat (spread = max/min
across widths close to 1); with SP and one global LR the change grows with width.
"""

import argparse
import csv
from datetime import date
from pathlib import Path

import torch
from torch import nn

import structlayers as sl
from structlayers.bench import machine, write_markdown

RESULTS = Path(__file__).parent / "results"
SPECS = ("dense", "lowrank:rank={w16}", "kronecker", "monarch", "btt:rank=1", "btt:rank=2",
         "tt:cores=3,rank=4", "tucker:rank=0.25")


def make_mlp(spec: str):
    """32 -> w (dense input), w -> w structured, w -> w structured, w -> 10 readout."""
    def make(width):
        hidden = spec.format(w16=max(1, width // 16))
        return nn.Sequential(nn.Linear(32, width), nn.GELU(), sl.build(hidden, width, width),
                             nn.GELU(), sl.build(hidden, width, width), nn.GELU(),
                             nn.Linear(width, 10))
    return make


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[128, 256, 512, 1024, 2048])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    data = (torch.randn(64, 32), torch.randint(0, 10, (64,)))
    rows, curves = [], {}
    for spec in SPECS:
        for parameterization in ("mup", "standard"):
            check = sl.mup.coord_check(make_mlp(spec), args.widths, data, steps=args.steps,
                                       lr=args.lr, parameterization=parameterization,
                                       n_seeds=args.seeds)
            for layer in ("2", "4"):  # the two structured hidden layers
                rows.append({"structure": spec.format(w16="w/16"), "parameterization": parameterization,
                             "layer": layer, "init_spread": check.spread(layer, "init"),
                             "delta_spread": check.spread(layer, "delta"),
                             **{f"delta@{w}": check.rms_delta[layer][w] for w in args.widths}})
            curves[spec, parameterization] = check.rms_delta["4"]
            print(f"{spec:20s} {parameterization:8s} delta spread "
                  f"{check.spread('2'):.2f} {check.spread('4'):.2f}", flush=True)
    RESULTS.mkdir(exist_ok=True)
    with open(RESULTS / "coord_check.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = [f"# Coordinate check ({args.steps} Adam steps, lr {args.lr}, {args.seeds} seeds)", "",
             f"Machine: {machine()}. Date: {date.today()}. Widths {args.widths}.", "",
             "Spread = max/min across widths of the hidden layers' output RMS (init) and of the "
             "RMS of its change after the steps (delta). muP target: <= 2.", "",
             "| structure | layer | muP init | muP delta | SP init | SP delta |", "|---|---|---|---|---|---|"]
    by_key = {(r["structure"], r["parameterization"], r["layer"]): r for r in rows}
    for spec in SPECS:
        name = spec.format(w16="w/16")
        for layer in ("2", "4"):
            mup, sp = by_key[name, "mup", layer], by_key[name, "standard", layer]
            lines.append(f"| {name} | {layer} | {mup['init_spread']:.2f} | {mup['delta_spread']:.2f} "
                         f"| {sp['init_spread']:.2f} | {sp['delta_spread']:.2f} |")
    write_markdown(RESULTS / "coord_check.md", lines)
    plot(curves, args.widths, RESULTS / "coord_check.png")
    print("wrote", RESULTS / "coord_check.md")


def plot(curves, widths, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, parameterization in zip(axes, ("mup", "standard"), strict=True):
        for (spec, p), delta in curves.items():
            if p == parameterization:
                ax.plot(widths, [delta[w] for w in widths], marker="o",
                        label=spec.format(w16="w/16"))
        ax.set(xscale="log", yscale="log", xlabel="width",
               title=f"{parameterization}: RMS of the change, hidden layer 4")
    axes[0].set_ylabel("RMS")
    axes[1].legend(fontsize=7)
    fig.text(0.01, 0.01, machine(), fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
