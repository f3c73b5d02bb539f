"""Every structure vs dense nn.Linear: time / dense and FLOPs / dense, three modes, fp32 and bf16.

    python benchmarks/layers.py                       # the full table (resumes; ~30 min on 2 cores)
    python benchmarks/layers.py --dtypes float32 --sizes 1024,4096,2048
    python benchmarks/layers.py --fresh               # start over

Per (size, dtype) group, every structure's torch path (execution plans), its einsum path, the
two-bmm Monarch and the nn.Linear pair are timed interleaved in this process (median of
--repeats after a warm-up); each finished group is appended to benchmarks/results/layers.csv, so
a killed run loses at most the group it was in and a rerun skips the finished ones. Then
layers.md (tables and the issue-12 targets, met or not) and layers.png (time ratio vs FLOP ratio).
"""

import argparse
import math
from dataclasses import asdict, fields
from pathlib import Path

from structlayers.bench import (
    DEFAULT_SPECS,
    DTYPES,
    BenchRow,
    append_rows,
    format_table,
    machine,
    read_rows,
    run_bench,
)

RESULTS = Path(__file__).parent / "results"
SIZES = ((1024, 4096, 2048), (4096, 4096, 2048), (8192, 8192, 512))  # (d, hidden, tokens)
MAIN = "1024->4096->1024"
# issue 12: the largest time / dense on the main pair, fwd+bwd and inference (fp32 and bf16)
FP32_BOUNDS = {"monarch": 0.15, "btt:rank=1": 0.15, "btt:rank=2": 0.25, "btt:rank=2,cores=3": 0.2,
               "tucker:rank=0.05": 0.2, "tt:cores=3,rank=8": 0.8}


def load_rows(path: Path) -> list[BenchRow]:
    types = {f.name: f.type for f in fields(BenchRow)}
    convert = {int: int, float: float, bool: lambda v: v == "True", str: str}
    return [BenchRow(**{k: convert[types[k]](v) for k, v in row.items()})
            for row in read_rows(path)]


def targets(rows: list[BenchRow]) -> list[str]:
    """The issue's targets, each with its measured value and met / NOT met."""
    def find(spec, dtype, mode, size=MAIN):
        return next((r for r in rows if (r.spec, r.dtype, r.mode, r.size) == (spec, dtype, mode,
                                                                               size)), None)

    lines = []
    for mode in ("fwd+bwd", "inference"):
        for spec, bound in FP32_BOUNDS.items():
            r = find(spec, "float32", mode)
            if r:
                lines.append(_verdict(f"float32 {mode} {spec} <= {bound}", r.time_vs_dense, bound))
        for r in rows:
            if (r.dtype, r.mode, r.size) == ("bfloat16", mode, MAIN) and r.spec != "nn.Linear" \
                    and r.flops_vs_dense <= 0.1:
                lines.append(_verdict(f"bfloat16 {mode} {r.spec} <= 0.5", r.time_vs_dense, 0.5))
    for r in rows:
        if not math.isnan(r.two_bmm_vs_dense):
            lines.append(_verdict(f"{r.size} {r.dtype} {r.mode} monarch 2x faster than two-bmm "
                                  f"(plan / two-bmm <= 0.5)", r.time_vs_dense / r.two_bmm_vs_dense,
                                  0.5))
    slower = [r for r in rows if not math.isnan(r.einsum_vs_dense)
              and r.time_vs_dense > r.einsum_vs_dense]
    lines.append(f"- no structure slower than its einsum path: "
                 f"{'met' if not slower else 'NOT met: ' + ', '.join(_where(r) for r in slower)}")
    return lines


def _verdict(name: str, value: float, bound: float) -> str:
    return f"- {name}: {value:.3f} {'met' if value <= bound else 'NOT met'}"


def _where(r: BenchRow) -> str:
    return (f"{r.spec} {r.size} {r.dtype} {r.mode} ({r.time_vs_dense:.3f} vs "
            f"{r.einsum_vs_dense:.3f})")


def plot(rows: list[BenchRow], path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    size = MAIN if any(r.size == MAIN for r in rows) else rows[0].size
    dtypes = [dt for dt in DTYPES if any((r.dtype, r.size) == (dt, size) for r in rows)]
    fig, axes = plt.subplots(1, len(dtypes), figsize=(6 * len(dtypes), 5), squeeze=False)
    for ax, dtype in zip(axes[0], dtypes, strict=True):
        group = [r for r in rows if (r.dtype, r.size, r.mode) == (dtype, size, "fwd+bwd")
                 and r.spec != "nn.Linear"]
        for k, r in enumerate(group):
            color = f"C{k}"
            ax.scatter(r.flops_vs_dense, r.time_vs_dense, color=color, label=r.spec)
            ax.scatter(r.flops_vs_dense, r.einsum_vs_dense, facecolors="none", edgecolors=color)
            ax.plot([r.flops_vs_dense] * 2, [r.time_vs_dense, r.einsum_vs_dense], color=color,
                    lw=0.6)
            if not math.isnan(r.two_bmm_vs_dense):
                ax.scatter(r.flops_vs_dense, r.two_bmm_vs_dense, color=color, marker="x")
        ax.plot([0.01, 10], [0.01, 10], "k--", lw=0.8, label="time ratio = FLOP ratio")
        ax.axhline(1, color="grey", lw=0.6)
        ax.set(xscale="log", yscale="log", xlabel="forward FLOPs / dense",
               ylabel="fwd+bwd time / nn.Linear", title=f"{size}, {dtype}: plan (filled), einsum "
               "(hollow), two-bmm (x)")
        ax.title.set_fontsize(9)
        ax.legend(fontsize=7)
    fig.text(0.01, 0.01, f"{group[0].device}, {group[0].date}, load {group[0].load:.2f}",
             fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=130)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=[",".join(map(str, s)) for s in SIZES],
                        help="d,hidden,tokens triples (default: the three of issue 12)")
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES),
                        default=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per candidate (median)")
    parser.add_argument("--specs", nargs="+", default=list(DEFAULT_SPECS))
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    parser.add_argument("--fresh", action="store_true", help="discard earlier results")
    args = parser.parse_args()
    sizes = []
    for text in args.sizes:
        try:
            d, hidden, tokens = (int(v) for v in text.split(","))
        except ValueError:
            parser.error(f"--sizes takes d,hidden,tokens triples, got {text!r}")
        sizes.append((d, hidden, tokens))
    csv_path = args.out / "layers.csv"
    if args.fresh:
        csv_path.unlink(missing_ok=True)
    done = {(r.size, r.tokens, r.dtype) for r in load_rows(csv_path)
            if r.device == machine(args.device)}
    with append_rows(csv_path, [f.name for f in fields(BenchRow)]) as write:
        for dtype in args.dtypes:
            for d, hidden, tokens in sizes:
                if (f"{d}->{hidden}->{d}", tokens, dtype) in done:
                    continue
                rows = run_bench(d, hidden, tokens, args.specs, args.repeats, dtype=dtype,
                                 project=(d, hidden) == (1024, 4096), device=args.device,
                                 progress=False)
                print(format_table(rows), flush=True)
                for r in rows:
                    write(asdict(r))
    rows = [r for r in load_rows(csv_path) if r.device == machine(args.device)]
    title = ("Structures vs dense nn.Linear (default path: execution plans, or the dense map where the "
             "plan finds it faster)")
    text = [f"# {title}", "", f"Machine: {machine(args.device)}.", "", "## Issue 12 targets", "",
            *targets(rows), "", "## Tables", "", format_table(rows)]
    (args.out / "layers.md").write_text("\n".join(text) + "\n")
    plot(rows, args.out / "layers.png")
    print("\n".join(targets(rows)))
    print(f"wrote {csv_path}, {args.out / 'layers.md'}, {args.out / 'layers.png'}")


if __name__ == "__main__":
    main()
