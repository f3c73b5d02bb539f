"""The `structlayers` command line: `structlayers bench [layers|compute|lr|all]`, `show`, `search`."""

import argparse
import sys
from pathlib import Path

import torch

from .bench import DEFAULT_SPECS, DTYPES, MODES, format_table, machine, run_bench, write_results
from .sizes import check_size
from .spec import build
from .training import STRUCTURES


def _positive(text: str) -> int:
    try:
        return check_size("value", int(text))
    except (ValueError, TypeError):
        raise argparse.ArgumentTypeError(f"must be a positive int, got {text!r}") from None


def _bench(args):
    if args.suite != "layers":
        return _efficiency(args)
    if args.quick:
        args.d, args.hidden, args.tokens = 256, 1024, 512
    specs = args.specs or list(DEFAULT_SPECS)
    for spec in specs:  # bad specs fail here, before anything is timed
        build(spec, args.d, args.hidden)
    rows = run_bench(args.d, args.hidden, args.tokens, specs, args.repeats, progress=not args.quiet,
                     dtype=args.dtype, modes=args.modes)
    title = f"Structures vs dense nn.Linear: {args.d} -> {args.hidden} -> {args.d}, {args.tokens} tokens"
    print(f"{title}\n{machine()}\n\n{format_table(rows)}")
    if args.out:
        for path in write_results(rows, Path(args.out), title):
            print(f"wrote {path}")
    if args.suite == "all":
        _efficiency(args)


def _efficiency(args):
    """compute / lr / all: the compute-efficiency suites (structlayers/efficiency_suite.py)."""
    from dataclasses import replace

    from .efficiency_suite import FULL, QUICK, check_lr, make_task, run_compute, run_lr

    out = Path(args.out or "structlayers-bench")
    plans = []
    for name in args.task:  # settings and checks for every task before any data or training
        settings = (QUICK if args.quick else FULL)[name]
        overrides = {}  # given structures/widths replace the defaults of both suites, extras too
        if args.structures:
            overrides |= {"structures": tuple(args.structures), "lr_structures": None}
        if args.widths:
            overrides |= {"widths": tuple(args.widths), "lr_widths": tuple(args.widths), "wide": {}}
        if args.steps:
            overrides |= {"steps": args.steps, "lr_steps": args.steps}
        if args.seeds:
            overrides["seeds"] = args.seeds
        plans.append((name, replace(settings, **overrides)))
    if args.lr not in ("task", "tuned"):
        check_lr(args.lr)
    if args.corpus and not Path(args.corpus).is_file():
        raise ValueError(f"--corpus {args.corpus!r} is not a file")
    tasks = [(make_task(name, args.quick, args.corpus), settings) for name, settings in plans]
    for task, settings in tasks:  # every task's jobs are checked before any of them trains
        settings.check(task)
    for task, settings in tasks:
        if args.suite in ("lr", "all"):
            print("\n".join(run_lr(task, settings, out, progress=not args.quiet)))
        if args.suite in ("compute", "all"):
            print("\n".join(run_compute(task, settings, out, args.lr, progress=not args.quiet)))
    print(f"results in {out}/")


def _show(args):
    layer = build(args.spec, args.in_features, args.out_features)
    print(layer)
    for name, core, step in layer.core_steps:
        print(f"  {name}: {tuple(core.shape)}  fan_in={step.fan_in} fan_out={step.fan_out} "
              f"blocks={step.blocks}  einsum {step.equation}")
    print(f"params={layer.num_params:,}  flops/token={layer.flops(1):,}  "
          f"dense params={args.in_features * args.out_features + args.out_features:,}")
    print(_gpu_path(layer))
    print(_cpu_path(layer, args.tokens))
    if args.measure is not None:
        print(_measured_paths(layer, args.tokens, args.measure or ["float32"]))


def _measured_paths(layer, tokens: int, dtypes) -> str:
    """What the first call of each plan measures and chooses, for a forward+backward and for
    inference at `tokens` on random data, in each of `dtypes`."""
    from .execute import HALF, _half_is_slow
    from .plan import make_plan
    from .tune import measured, tuning

    lines = []
    for name in dtypes:
        dtype = getattr(torch, name)
        timed = layer.to(dtype)
        x = torch.randn(tokens, layer.in_features, dtype=dtype)
        with tuning(min_seconds=0):
            timed(x.requires_grad_()).sum().backward()
            with torch.no_grad():
                timed(x)
        precision = "half" if dtype in HALF and not _half_is_slow(dtype) else "float32"
        for training in (True, False):
            m = measured().get(make_plan(layer.program, tokens, training, precision))
            kind = "forward+backward" if training else "inference"
            lines.append(f"{name} {kind}, " + ("the cost model's plan (one candidate)" if m is None
                                               else m.describe()))
    return "\n".join(lines)


def _cpu_path(layer, tokens: int) -> str:
    """The torch path's execution plan at `tokens`, and what it does with bf16/fp16 here."""
    from .execute import _half_is_slow
    from .plan import make_plan
    from .tune import CANDIDATES, MIN_SECONDS

    text = (f"torch path: {make_plan(layer.program, tokens).describe()}\n  layouts: where the cost model "
            f"prices a plan at {MIN_SECONDS * 1e3:g} ms or more, its first call times the model's "
            f"{CANDIDATES} cheapest (and to_dense() + F.linear under backend 'auto') and keeps the "
            f"fastest (--measure shows it)")
    half = [dt for dt in (torch.bfloat16, torch.float16) if not _half_is_slow(dt)]
    slow = [str(dt).removeprefix("torch.") for dt in (torch.bfloat16, torch.float16) if dt not in half]
    if half:
        names = " and ".join(str(dt).removeprefix("torch.") for dt in half)
        text += (f"\n{names} on this CPU (native half matmuls), "
                 f"{make_plan(layer.program, tokens, precision='half').describe()}"
                 f"\n  plan or to_dense() + F.linear: measured once at the first call of each plan "
                 f"(backend 'auto'), not by the cost model")
    if slow:
        text += (f"\n  {' and '.join(slow)} inputs on this CPU: the matmuls run in float32 (its "
                 f"{'/'.join(slow)} batched matmul is slower), the output is rounded back")
    return text


def _gpu_path(layer) -> str:
    try:
        from .kernels import fused_dims
    except ImportError:
        return "GPU path: torch (triton is not installed)"
    dims = fused_dims(layer.program)
    if dims is None:
        return "GPU path: torch (no fused kernel for this structure)"
    return f"GPU path: fused Triton kernel, (m1, m0, n0, r, n1) = {dims}"


def _search(args):
    import numpy as np

    from .search import greedy as greedy_search
    from .search import tnale, tnls, tucker_ranks

    path = Path(args.target)
    if not path.is_file():
        raise ValueError(f"target file {str(path)!r} does not exist")
    try:
        target = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as error:
        raise ValueError(f"cannot read {str(path)!r} as a .npy array: {error}") from None
    if args.method == "tucker":
        shape = tucker_ranks(target, args.budget, "ip")
        print(f"tucker: ranks {shape.ranks}, {shape.params:,} params (budget {args.budget:,}), "
              f"energy kept {shape.kept_energy:.6f}, {shape.seconds:.2f} s")
        return
    common = {"max_evaluations": args.budget, "max_seconds": args.seconds, "workers": args.workers,
              "log": args.log, "lam": args.lam, "progress": False if args.quiet else None}
    if args.method == "greedy":
        result = greedy_search(target, max_rank=args.max_rank, **common)
    else:
        search = tnale if args.method == "tnale" else tnls
        result = search(target, topology=args.topology, max_rank=args.max_rank, **common)
    print(result.summary())
    out = Path(args.out) if args.out else path.with_suffix(".cores.npz")
    np.savez(out, structure=result.structure.key(),
             **{f"core_{k}": core for k, core in enumerate(result.cores)})
    print(f"wrote {out}")


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="structlayers", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    bench = commands.add_parser(
        "bench", help="compare every structure against dense: layers (params, FLOPs, time, "
                      "projection), compute (loss vs training FLOPs), lr (muP LR transfer)",
        description="layers (default): every structure vs dense at one size. compute: train every "
                    "structure at several widths (muP) and compare validation loss per training FLOP. "
                    "lr: LR sweeps at 3 widths, muP vs standard parameterization. all: the three. "
                    "compute/lr resume from their CSVs in --out.")
    bench.add_argument("suite", nargs="?", default="layers", choices=["layers", "compute", "lr", "all"])
    bench.add_argument("--d", type=_positive, default=1024, help="model width (default 1024)")
    bench.add_argument("--hidden", type=_positive, default=4096, help="hidden width (default 4096)")
    bench.add_argument("--tokens", type=_positive, default=2048, help="rows per batch (2048)")
    bench.add_argument("--specs", nargs="+", metavar="SPEC",
                       help=f"structures to compare, the first is the reference "
                            f"(default: {' '.join(DEFAULT_SPECS)})")
    bench.add_argument("--repeats", type=_positive, default=2,
                       help="timed runs after a warm-up (median; default 2: the main job stays under 2 min)")
    bench.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                       help="layers: parameter and activation dtype (float32)")
    bench.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES),
                       help="layers: fwd, fwd+bwd and/or inference (no_grad) (all three)")
    bench.add_argument("--quick", action="store_true",
                       help="small sizes (layers: 256 -> 1024, 512 tokens; compute/lr: few "
                            "structures, widths and steps) for a fast smoke run")
    bench.add_argument("--out", metavar="DIR",
                       help="layers: also write layers.csv and layers.md here; compute/lr: results "
                            "directory (default structlayers-bench/)")
    bench.add_argument("--task", nargs="+", choices=["mlp", "gpt"], default=["mlp", "gpt"],
                       help="compute/lr: mnist1d MLP and/or char-level GPT (default both)")
    bench.add_argument("--structures", nargs="+", metavar="NAME",
                       help=f"compute/lr: structure names ({' '.join(STRUCTURES)})")
    bench.add_argument("--widths", nargs="+", type=_positive, help="compute/lr: hidden widths")
    bench.add_argument("--steps", type=_positive, help="compute/lr: training steps per run")
    bench.add_argument("--seeds", type=_positive, help="compute: seeds per (structure, width)")
    bench.add_argument("--lr", default="task",
                       help='compute: base muP LR, "task" (its default) or "tuned" (best muP LR of '
                            "each structure from the lr suite's results in --out)")
    bench.add_argument("--corpus", metavar="FILE",
                       help="gpt: a text file (default: the Python standard library's source)")
    bench.add_argument("--quiet", action="store_true", help="no progress bar")
    bench.set_defaults(run=_bench)

    show = commands.add_parser(
        "show", help="print a layer's cores, fans, einsums, params, FLOPs and execution plan")
    show.add_argument("spec", help='e.g. "btt:rank=2"')
    show.add_argument("in_features", type=_positive)
    show.add_argument("out_features", type=_positive)
    show.add_argument("--tokens", type=_positive, default=2048,
                      help="token count whose execution plan to print (2048)")
    show.add_argument("--measure", nargs="*", choices=("float32", "bfloat16", "float16"), metavar="DTYPE",
                      help="also time the candidate plans on random data as the first call does, "
                           "and print what is chosen (DTYPE: float32, bfloat16, float16; default float32)")
    show.set_defaults(run=_show)

    search = commands.add_parser(
        "search", help="find a tensor-network structure (ranks, permutation) for a tensor in a .npy file")
    search.add_argument("target", help="a .npy file with the tensor")
    search.add_argument("--method", choices=["tnale", "tnls", "greedy", "tucker"], default="tnale")
    search.add_argument("--topology", choices=["tr", "tt"], default="tr",
                        help="tensor ring or train (tnale/tnls; greedy searches the full graph)")
    search.add_argument("--budget", type=_positive, default=500,
                        help="evaluations (fits) at most; for --method tucker: parameters at most")
    search.add_argument("--seconds", type=float, help="time budget")
    search.add_argument("--max-rank", type=_positive, default=6, help="largest bond rank (6)")
    search.add_argument("--lam", type=float, default=200.0,
                        help="objective = params/entries + lam * squared RSE (200)")
    search.add_argument("--workers", type=_positive, default=1, help="fitting processes")
    search.add_argument("--log", help="JSON-lines log to append to and resume from")
    search.add_argument("--out", help="where to write the cores (.npz; default TARGET.cores.npz)")
    search.add_argument("--quiet", action="store_true", help="no progress bar (shown on a terminal only)")
    search.set_defaults(run=_search)
    return parser


def main(argv=None) -> int:
    args = make_parser().parse_args(argv)
    try:
        args.run(args)
    except (ValueError, TypeError) as error:
        print(f"structlayers: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
