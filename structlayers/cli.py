"""The `structlayers` command line: `structlayers bench`, `structlayers show`."""

import argparse
import sys
from pathlib import Path

from .bench import DEFAULT_SPECS, format_table, machine, run_bench, write_results
from .sizes import check_size
from .spec import build


def _positive(text: str) -> int:
    try:
        return check_size("value", int(text))
    except (ValueError, TypeError):
        raise argparse.ArgumentTypeError(f"must be a positive int, got {text!r}") from None


def _bench(args):
    specs = args.specs or list(DEFAULT_SPECS)
    for spec in specs:  # bad specs fail here, before anything is timed
        build(spec, args.d, args.hidden)
    rows = run_bench(args.d, args.hidden, args.tokens, specs, args.repeats, progress=not args.quiet)
    title = f"Structures vs dense: {args.d} -> {args.hidden} -> {args.d}, {args.tokens} tokens"
    print(f"{title}\n{machine()}\n\n{format_table(rows)}")
    if args.out:
        for path in write_results(rows, Path(args.out), title):
            print(f"wrote {path}")


def _show(args):
    layer = build(args.spec, args.in_features, args.out_features)
    print(layer)
    for name, core, step in layer.core_steps:
        print(f"  {name}: {tuple(core.shape)}  fan_in={step.fan_in} fan_out={step.fan_out} "
              f"blocks={step.blocks}  einsum {step.equation}")
    print(f"params={layer.num_params:,}  flops/token={layer.flops(1):,}  "
          f"dense params={args.in_features * args.out_features + args.out_features:,}")
    print(_gpu_path(layer))


def _gpu_path(layer) -> str:
    try:
        from .kernels import fused_dims
    except ImportError:
        return "GPU path: torch (triton is not installed)"
    dims = fused_dims(layer.program)
    if dims is None:
        return "GPU path: torch (no fused kernel for this structure)"
    return f"GPU path: fused Triton kernel, (m1, m0, n0, r, n1) = {dims}"


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="structlayers", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    bench = commands.add_parser(
        "bench", help="compare every structure against dense (params, FLOPs, time, projection)")
    bench.add_argument("--d", type=_positive, default=1024, help="model width (default 1024)")
    bench.add_argument("--hidden", type=_positive, default=4096, help="hidden width (default 4096)")
    bench.add_argument("--tokens", type=_positive, default=2048, help="rows per batch (2048)")
    bench.add_argument("--specs", nargs="+", metavar="SPEC",
                       help=f"structures to compare, the first is the reference "
                            f"(default: {' '.join(DEFAULT_SPECS)})")
    bench.add_argument("--repeats", type=_positive, default=3, help="timed runs (median)")
    bench.add_argument("--quick", action="store_true",
                       help="small sizes (256 -> 1024, 512 tokens) for a fast smoke run")
    bench.add_argument("--out", metavar="DIR", help="also write layers.csv and layers.md here")
    bench.add_argument("--quiet", action="store_true", help="no progress bar")
    bench.set_defaults(run=_bench)

    show = commands.add_parser("show", help="print a layer's cores, fans, einsums, params, FLOPs")
    show.add_argument("spec", help='e.g. "btt:rank=2"')
    show.add_argument("in_features", type=_positive)
    show.add_argument("out_features", type=_positive)
    show.set_defaults(run=_show)
    return parser


def main(argv=None) -> int:
    args = make_parser().parse_args(argv)
    if getattr(args, "quick", False):
        args.d, args.hidden, args.tokens = 256, 1024, 512
    try:
        args.run(args)
    except (ValueError, TypeError) as error:
        print(f"structlayers: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
