"""Every structure vs dense at transformer-MLP sizes: params, FLOPs, fwd+bwd time, projection.

    python benchmarks/layers.py                 # 1024 -> 4096 -> 1024, 2048 tokens
    python benchmarks/layers.py --d 2048 --hidden 8192

Writes benchmarks/results/layers.{csv,md} and layers.png (time ratio vs FLOP ratio, log-log):
points below the diagonal turn FLOP savings into more than proportional time savings.
"""

import argparse
from pathlib import Path

from structlayers.bench import DEFAULT_SPECS, format_table, machine, run_bench, write_results

RESULTS = Path(__file__).parent / "results"


def plot(rows, path: Path, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 5))
    for r in rows:
        ax.scatter(r.flops_vs_dense, r.time_vs_dense)
        ax.annotate(r.spec, (r.flops_vs_dense, r.time_vs_dense), fontsize=7,
                    xytext=(3, 3), textcoords="offset points")
    lims = [min(min(r.flops_vs_dense, r.time_vs_dense) for r in rows) / 1.5, 10]
    ax.plot(lims, lims, "k--", lw=0.8, label="time ratio = FLOP ratio")
    ax.set(xscale="log", yscale="log", xlabel="forward FLOPs / dense",
           ylabel="measured fwd+bwd time / dense", title=title)
    ax.legend(fontsize=8)
    fig.text(0.01, 0.01, machine(), fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=130)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--specs", nargs="+", default=list(DEFAULT_SPECS))
    args = parser.parse_args()
    rows = run_bench(args.d, args.hidden, args.tokens, args.specs, args.repeats)
    title = f"{args.d} -> {args.hidden} -> {args.d}, {args.tokens} tokens"
    print(format_table(rows))
    for path in write_results(rows, RESULTS, f"Structures vs dense: {title}"):
        print("wrote", path)
    plot(rows, RESULTS / "layers.png", title)
    print("wrote", RESULTS / "layers.png")


if __name__ == "__main__":
    main()
