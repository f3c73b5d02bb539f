"""Structure search benchmarks: TnALE vs TNLS vs greedy on hidden tensor rings, natural images,
and Tucker core shapes on real tensors (CPU; needs the `bench` extra for scikit-image).

    python benchmarks/search.py synthetic      # orders 4, 6, 8 x 10 seeds x 3 methods (long)
    python benchmarks/search.py images         # camera, moon, brick as 4^8 tensors
    python benchmarks/search.py tucker         # core shapes vs budget: IP, greedy, refit greedy
    python benchmarks/search.py all --quick    # a smoke run of all three

synthetic: the TnALE protocol. A tensor ring with mode sizes 3 or 4, ranks drawn from 1..4 and a
hidden permutation of its modes; success = a structure with RSE <= 1e-4 and at least the ground
truth's compression. Reported per method: success rate, evaluations until the first success
(from the search's log), evaluations and wall time used. Every run appends a row to
search_synthetic.csv as it ends, and a rerun skips the rows there (kill it any time).
"""

import argparse
import json
import math
import statistics
import time
from datetime import date
from pathlib import Path

import numpy as np

from structlayers.bench import append_rows, machine, read_rows, write_markdown
from structlayers.search import Structure, greedy, tnale, tnls, tr_svd, tt_svd, tucker_error, tucker_ranks

RESULTS = Path(__file__).parent / "results"
METHODS = {"tnale": tnale, "tnls": tnls, "greedy": greedy}
BUDGETS = {4: 600, 6: 1500, 8: 2500}  # evaluations per run
SUCCESS_RSE = 1e-4


def hidden_ring(order: int, seed: int):
    rng = np.random.default_rng(1000 * order + seed)
    sizes = tuple(int(s) for s in rng.choice([3, 4], order))
    ranks = tuple(int(r) for r in rng.integers(1, 5, order))
    truth = Structure.tensor_ring(sizes, ranks, tuple(int(p) for p in rng.permutation(order)))
    return truth, truth.contract(truth.random_cores(rng))


def first_success(log: Path, truth: Structure) -> int | None:
    """1-based index of the first logged evaluation that meets the success criterion."""
    for index, line in enumerate(log.read_text().splitlines()[1:], start=1):
        row = json.loads(line)
        structure = Structure.from_key(row["key"])
        if row["rse"] <= SUCCESS_RSE and structure.num_params <= truth.num_params:
            return index
    return None


def run_synthetic(args):
    out = args.out / "search_synthetic.csv"
    fields = ["order", "seed", "method", "success", "first_success", "evaluations", "seconds", "rse",
              "compression", "truth_compression", "ranks", "truth_ranks"]
    done = _done(out, ("order", "seed", "method"))
    orders, seeds = ((4, 6), 2) if args.quick else (tuple(args.orders), args.seeds)
    with append_rows(out, fields) as write:
        first = args.first_seed  # seed-major: a cut run covers every order
        for seed in range(first, first if args.report_only else first + seeds):
            for order in orders:
                truth, target = hidden_ring(order, seed)
                for method, search in METHODS.items():
                    if (str(order), str(seed), method) in done:
                        continue
                    log = args.out / "logs" / f"ring{order}_seed{seed}_{method}.jsonl"
                    log.parent.mkdir(parents=True, exist_ok=True)
                    log.unlink(missing_ok=True)  # a run that did not reach the CSV starts over
                    budget = BUDGETS[order] // (4 if args.quick else 1)
                    start = time.perf_counter()
                    result = search(target, max_evaluations=budget, max_seconds=args.seconds,
                                    workers=args.workers, log=log, progress=False)
                    hit = first_success(log, truth)
                    write({
                        "order": order, "seed": seed, "method": method, "success": hit is not None,
                        "first_success": hit or "", "evaluations": result.evaluations,
                        "seconds": f"{time.perf_counter() - start:.1f}", "rse": f"{result.rse:.3g}",
                        "compression": f"{result.compression:.2f}",
                        "truth_compression": f"{truth.compression:.2f}",
                        "ranks": _edges(result.structure),
                        "truth_ranks": _edges(truth)})
                    print(f"order {order} seed {seed} {method}: {result.summary()} "
                          f"(first success at {hit})", flush=True)
    rows = read_rows(out)
    lines = [f"# Structure search on hidden tensor rings ({date.today().isoformat()}, {machine()})", "",
             f"Mode sizes 3 or 4, ranks 1..4, hidden permutation; success = RSE <= {SUCCESS_RSE} at "
             f"no more parameters than the truth. Budgets: {BUDGETS} evaluations, workers "
             f"{args.workers}.", "",
             "ERT (expected running time, the COCO benchmarking measure) = all fits spent over all "
             "runs, up to the first success or to the end of a failed run, divided by the number of "
             "successes: the expected fits to reach the truth when failed runs are restarted. It "
             "counts greedy's warm-started scoring fits.", "",
             "| order | method | runs | success rate | ERT (fits per success) | evaluations to success "
             "(median of successes) | evaluations used (median) | all fits incl. greedy's scoring "
             "(median) | seconds (median) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for order in sorted({int(r["order"]) for r in rows}):
        for method in METHODS:
            mine = [r for r in rows if int(r["order"]) == order and r["method"] == method]
            if not mine:
                continue
            hits = [int(r["first_success"]) for r in mine if r["success"] == "True"]
            spent = sum(_all_fits(r, r["first_success"] if r["success"] == "True" else r["evaluations"])
                        for r in mine)
            lines.append(f"| {order} | {method} | {len(mine)} | {len(hits) / len(mine):.0%} "
                         f"| {spent / len(hits) if hits else math.inf:.0f} "
                         f"| {statistics.median(hits) if hits else '-'} "
                         f"| {statistics.median(int(r['evaluations']) for r in mine):.0f} "
                         f"| {statistics.median(_all_fits(r) for r in mine):.0f} "
                         f"| {statistics.median(float(r['seconds']) for r in mine):.1f} |")
    _report(args.out / "search_synthetic.md", lines)


def _all_fits(row, evaluations=None) -> int:
    """`evaluations` (default: all the run used) plus greedy's warm-started scoring fits, which
    every greedy step makes for all N(N-1)/2 pairs (no pair reaches max_rank in these runs)."""
    evaluations = int(row["evaluations"] if evaluations is None else evaluations)
    steps = evaluations - 1 if row["method"] == "greedy" else 0
    order = int(row["order"])
    return evaluations + steps * order * (order - 1) // 2


def _with_objective(row, lam):
    return row | {"objective": f"{1 / float(row['compression']) + lam * float(row['rse']):.4f}"}


def _images(names, size=256):
    from skimage import data
    from skimage.transform import resize

    for name in names:
        image = resize(getattr(data, name)().astype(float) / 255.0, (size, size), anti_aliasing=True)
        yield name, image.reshape((4,) * 8)


def run_images(args):
    out = args.out / "search_images.csv"
    fields = ["image", "method", "rse", "compression", "evaluations", "seconds", "ranks"]
    done = _done(out, ("image", "method"))
    names = ["camera"] if args.quick else ["camera", "moon", "brick"]
    budget = 100 if args.quick else 500
    with append_rows(out, fields) as write:
        for name, target in _images([] if args.report_only else names):
            for method in [*METHODS, "tt-svd", "tr-svd"]:
                if (name, method) in done:
                    continue
                start = time.perf_counter()
                if method in METHODS:
                    result = METHODS[method](target, max_evaluations=budget, max_seconds=args.seconds,
                                             workers=args.workers, progress=False, lam=args.lam)
                else:
                    result = (tt_svd if method == "tt-svd" else tr_svd)(target, eps=args.eps)
                write({"image": name, "method": method, "rse": f"{result.rse:.4g}",
                                 "compression": f"{result.compression:.2f}",
                                 "evaluations": result.evaluations,
                                 "seconds": f"{time.perf_counter() - start:.1f}",
                                 "ranks": _edges(result.structure)})
                print(f"{name} {method}: {result.summary()}", flush=True)
    rows = read_rows(out)
    lines = [f"# Structure search on natural images ({date.today().isoformat()}, {machine()})", "",
             f"256 x 256 grayscale scikit-image samples reshaped to 4^8 tensors; searches with "
             f"lambda = {args.lam} and {budget} evaluations; TT-SVD/TR-SVD at eps = {args.eps}. "
             "RSE is squared.", "",
             f"Objective = 1 / compression + {args.lam} x RSE (lower is better).", "",
             *_table(sorted((_with_objective(r, args.lam) for r in rows), key=lambda r: r["image"]),
                     ["image", "method", "objective", "rse", "compression", "evaluations", "seconds"])]
    _report(args.out / "search_images.md", lines)
    _plot(rows, "compression", "rse", "image", args.out / "search_images.png",
          "natural images as 4^8 tensors", log_x=True)


def _tucker_targets():
    from skimage import data
    from skimage.transform import resize

    rgb = np.stack([resize(getattr(data, n)() / 255.0, (128, 128, 3), anti_aliasing=True)
                    for n in ("astronaut", "chelsea", "coffee", "rocket")])  # (4, 128, 128, 3)
    camera = resize(data.camera() / 255.0, (160, 160), anti_aliasing=True)
    video = np.stack([camera[2 * t: 2 * t + 128, t: t + 128] for t in range(16)])  # (16, 128, 128)
    return {"rgb stack 4x128x128x3": rgb, "shifted frames 16x128x128": video}


def run_tucker(args):
    out = args.out / "search_tucker.csv"
    fields = ["tensor", "budget", "method", "ranks", "params", "error", "seconds"]
    done = _done(out, ("tensor", "budget", "method"))
    with append_rows(out, fields) as write:
        for name, target in ({} if args.report_only else _tucker_targets()).items():
            full = target.size
            for fraction in ((0.01, 0.05) if args.quick else (0.002, 0.005, 0.01, 0.02, 0.05, 0.1)):
                budget = int(fraction * full)
                for method in ("ip", "greedy", "refit"):
                    if (name, str(budget), method) in done or (method == "refit" and args.quick):
                        continue
                    shape = tucker_ranks(target, budget, method)
                    write({"tensor": name, "budget": budget, "method": method,
                                     "ranks": "x".join(map(str, shape.ranks)), "params": shape.params,
                                     "error": f"{tucker_error(target, shape.ranks):.5f}",
                                     "seconds": f"{shape.seconds:.3f}"})
                    print(f"{name} budget {budget} {method}: {shape}", flush=True)
    rows = read_rows(out)
    lines = [f"# Tucker core shapes ({date.today().isoformat()}, {machine()})", "",
             "Relative error of a Tucker fit (HOSVD + 5 HOOI sweeps) with the chosen ranks, and the "
             "time to choose them.", "",
             *_table(rows, ["tensor", "budget", "method", "ranks", "params", "error", "seconds"])]
    _report(args.out / "search_tucker.md", lines)
    _plot(rows, "budget", "error", "method", args.out / "search_tucker.png",
          "Tucker core shapes: error vs parameter budget", log_x=True, split="tensor")


# --- small helpers ------------------------------------------------------------------------------
def _edges(structure) -> str:
    return " ".join(f"{a}-{b}:{r}" for (a, b), r in structure.edges().items()) + \
        f" perm {','.join(map(str, structure.perm))}"



def _table(rows, columns) -> list[str]:
    """A markdown table of these CSV columns."""
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns),
            *("| " + " | ".join(r[c] for c in columns) + " |" for r in rows)]


def _done(path: Path, keys) -> set:
    return {tuple(r[k] for k in keys) for r in read_rows(path)}


def _report(path: Path, lines):
    write_markdown(path, lines)
    print("\n".join(lines))
    print("wrote", path)


def _plot(rows, x, y, group, path, title, log_x=False, split=None):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({r[split] for r in rows}) if split else [None]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=True):
        mine = [r for r in rows if split is None or r[split] == panel]
        for name in dict.fromkeys(r[group] if group != "image" else r["method"] for r in mine):
            pts = sorted((float(r[x]), float(r[y])) for r in mine
                         if (r[group] if group != "image" else r["method"]) == name)
            ax.plot(*zip(*pts, strict=True), "o-" if split else "o", label=name, alpha=0.8)
        ax.set(xlabel=x, ylabel=y, title=panel or title, yscale="log" if y == "rse" else "linear")
        if log_x:
            ax.set_xscale("log")
        ax.legend(fontsize=8)
    fig.suptitle(f"{title} ({machine()})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print("wrote", path)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=["synthetic", "images", "tucker", "all"])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--first-seed", type=int, default=0,
                        help="synthetic: seeds first..first+seeds-1 (fresh ones: 100 and up)")
    parser.add_argument("--orders", type=int, nargs="+", default=[4, 6, 8], help="synthetic: ring orders")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=600, help="time budget per search run")
    parser.add_argument("--lam", type=float, default=5.0, help="objective weight of the RSE for images")
    parser.add_argument("--eps", type=float, default=0.1, help="TT-SVD/TR-SVD tolerance for images")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--report-only", action="store_true",
                        help="no new runs: rewrite the markdown and plots from the CSVs")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    parts = ["synthetic", "images", "tucker"] if args.part == "all" else [args.part]
    for part in parts:
        {"synthetic": run_synthetic, "images": run_images, "tucker": run_tucker}[part](args)


if __name__ == "__main__":
    main()
