"""Markdown tables and matplotlib figures for the compute-efficiency suites (efficiency.py)."""

import math
from datetime import date
from pathlib import Path

from .bench import machine
from .efficiency import best_lrs, compute_ratios, final_loss, frontier, power_law, wall_clock
from .training import Run


def _flops(value: float) -> str:
    return "not reached" if not math.isfinite(value) else f"{value:.3g}"


def _ratio(value: float) -> str:
    return "not reached" if value == 0 else f"{value:.2f}x"


def compute_table(runs: list[Run]) -> list[str]:
    """Markdown: per structure, FLOPs to reach dense's final validation loss (at dense's largest
    width), the ratio dense / structure, its best loss and the power-law exponent."""
    rows = sorted(compute_ratios(runs), key=lambda r: -r["ratio"])
    by_structure = {s: [r for r in runs if r.structure == s] for s in {r.structure for r in runs}}
    target = rows[0]["target_loss"]
    lines = [f"Target: dense's final validation loss at its largest width, {target:.4f}.", "",
             "| structure | widths | FLOPs to reach target | compute saved vs dense | best val loss (width) "
             "| loss ~ FLOPs^-b, b |", "|---|---|---|---|---|---|"]
    for r in rows:
        _, b = power_law(by_structure[r["structure"]])
        widths = ", ".join(map(str, r["widths"]))
        lines.append(f"| {r['structure']} | {widths} | {_flops(r['flops_to_target'])} | {_ratio(r['ratio'])} "
                     f"| {r['best_loss']:.4f} ({r['best_width']}) | {b:.3f} |")
    return lines


def lr_table(runs: list[Run]) -> list[str]:
    """Markdown: best LR per width and its drift in factor-2 grid steps, muP next to SP."""
    rows = sorted(best_lrs(runs), key=lambda r: (r["structure"], r["parameterization"]))
    widths = sorted({w for r in rows for w in r["best_lr"]})
    span = f"{widths[-1] // widths[0]}x" if widths else ""
    lines = ["| structure | parameterization | " + " | ".join(f"best LR at w={w}" for w in widths)
             + f" | drift within 4x of width | drift over all widths ({span}) | within one step (4x) |",
             "|---|---|" + "---|" * (len(widths) + 3)]
    for r in rows:
        lrs = " | ".join(f"{r['best_lr'][w]:.3g}" if w in r["best_lr"] else "-" for w in widths)
        lines.append(f"| {r['structure']} | {r['parameterization']} | {lrs} | {r['drift_4x']:.0f} "
                     f"| {r['drift_steps']:.0f} | {'yes' if r['transfers'] else 'no'} |")
    return lines


def wall_clock_table(runs: list[Run]) -> list[str]:
    lines = ["| structure | width | step ms | time / dense | FLOPs / dense |", "|---|---|---|---|---|"]
    for r in wall_clock(runs):
        time_ratio, flop_ratio = (f"{r[k]:{spec}}" if math.isfinite(r[k]) else "- (no dense)"
                                  for k, spec in (("time_vs_dense", ".2f"), ("flops_vs_dense", ".3f")))
        lines.append(f"| {r['structure']} | {r['width']} | {r['step_ms']:.1f} | {time_ratio} "
                     f"| {flop_ratio} |")
    return lines


def header(title: str, source: str) -> list[str]:
    return [f"# {title}", "", f"{date.today().isoformat()}, {machine()}. Data: {source}.", ""]


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend; matplotlib is in the `bench` extra."""
    try:
        import matplotlib
    except ImportError:
        raise ImportError("plots need matplotlib: pip install 'structlayers[bench]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _colors(names):
    plt = pyplot()
    cmap = plt.get_cmap("tab10")
    return {name: cmap(k % 10) for k, name in enumerate(sorted(names))}


def plot_compute(runs: list[Run], path: Path, title: str) -> Path:
    """Validation loss vs training FLOPs (log x): every run thin, each structure's frontier thick,
    its power-law fit dashed, dense's target loss as a horizontal line."""
    plt = pyplot()
    colors = _colors({r.structure for r in runs})
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for structure, color in colors.items():
        mine = [r for r in runs if r.structure == structure]
        for run in mine:
            ax.plot([p[1] for p in run.curve], [p[3] for p in run.curve], color=color, alpha=0.25, lw=0.8)
        front = frontier(mine)
        ax.plot(*zip(*front, strict=True), color=color, lw=2, label=structure)
        a, b = power_law(mine)
        if math.isfinite(b):
            xs = [min(r.total_flops for r in mine), max(r.total_flops for r in mine)]
            ax.plot(xs, [a * x ** -b for x in xs], color=color, ls="--", lw=1)
    target = compute_ratios(runs)[0]["target_loss"]
    ax.axhline(target, color="black", lw=0.8, ls=":", label="dense final (largest width)")
    ax.set(xscale="log", yscale="log", xlabel="training FLOPs", ylabel="validation loss", title=title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_lr(runs: list[Run], path: Path, title: str) -> Path:
    """Final training loss vs LR, one line per width; a column per structure, muP and SP rows."""
    plt = pyplot()
    structures = sorted({r.structure for r in runs})
    params = [p for p in ("mup", "standard") if any(r.parameterization == p for r in runs)]
    widths = sorted({r.width for r in runs})
    fig, axes = plt.subplots(len(params), len(structures), figsize=(2.6 * len(structures), 2.6 * len(params)),
                             squeeze=False, sharey=True)
    colors = _colors(map(str, widths))
    for row, parameterization in enumerate(params):
        for col, structure in enumerate(structures):
            ax = axes[row][col]
            for width in widths:
                mine = sorted((r for r in runs if (r.structure, r.parameterization, r.width)
                               == (structure, parameterization, width)), key=lambda r: r.lr)
                if mine:
                    losses = [final_loss(r) if math.isfinite(final_loss(r)) else math.nan for r in mine]
                    ax.plot([r.lr for r in mine], losses, "o-", ms=3, color=colors[str(width)],
                            label=f"w={width}")
            ax.set(xscale="log", title=f"{structure} ({'muP' if parameterization == 'mup' else 'SP'})")
            ax.title.set_fontsize(9)
            if row == len(params) - 1:
                ax.set_xlabel("base LR")
            if col == 0:
                ax.set_ylabel("final train loss")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def headline_table(compute_runs: list[Run], lr_runs: list[Run]) -> list[str]:
    """Markdown, one row per structure: compute saved vs dense at dense's final loss, best loss,
    the muP and SP best-LR drift within 4x of width, and step time vs dense at the widest width
    both ran."""
    ratios = {r["structure"]: r for r in compute_ratios(compute_runs)}
    drifts = {(r["structure"], r["parameterization"]): r["drift_4x"] for r in best_lrs(lr_runs)}
    clock = wall_clock(compute_runs)
    lines = ["| structure | compute saved vs dense (at dense's final loss) | best val loss (width) "
             "| muP best-LR drift, grid steps (4x width) | SP drift | step time / dense (width) |",
             "|---|---|---|---|---|---|"]
    for structure, r in sorted(ratios.items(), key=lambda kv: -kv[1]["ratio"]):
        timed = [c for c in clock if c["structure"] == structure and math.isfinite(c["time_vs_dense"])]
        widest = max(timed, key=lambda c: c["width"]) if timed else None
        drift = [f"{drifts[(structure, p)]:.0f}" if (structure, p) in drifts else "-"
                 for p in ("mup", "standard")]
        lines.append(f"| {structure} | {_ratio(r['ratio'])} | {r['best_loss']:.3f} ({r['best_width']}) "
                     f"| {drift[0]} | {drift[1]} | "
                     + (f"{widest['time_vs_dense']:.2f} ({widest['width']}) |" if widest else "- |"))
    return lines
