"""Fused Triton Monarch/BTT kernels vs the torch bmm path vs dense nn.Linear (cuBLAS), on GPU.

    python benchmarks/kernels.py                       # the full grid below, bf16 (GPU)
    python benchmarks/kernels.py --dims 4096 --tokens 16384
    python benchmarks/kernels.py --resources           # no GPU needed: compile every kernel
                                                       # config for sm_90, registers/spills/smem
    TRITON_INTERPRET=1 python benchmarks/kernels.py --dry-run --dims 4096   # every case once, CPU

Timing: for each d in --dims (square d x d layers, no bias), tokens in --tokens and structure
(Monarch with its default, about sqrt(d), blocks: 32, 64, 64, 128 for d = 1024..8192; BTT rank
1, 2, 4): forward and forward+backward time of the fused kernel (sl.backend("triton")), the torch
path (sl.backend("torch")) and nn.Linear, speedups, and the memory roofline. The roofline counts
the bytes a perfect kernel moves once:
    forward           x, y, cores
    forward+backward  x, y, cores; then grad y, x, cores in and grad x, grad cores out
and reports time / (bytes / peak bandwidth): 1.0 is the roofline.

Rows are appended to benchmarks/results/kernels.csv as they are measured; a rerun skips the
rows already there for this device (kill it any time, nothing is lost), then rewrites
kernels.md from the CSV.
"""

import argparse
import csv
import sys
from datetime import date
from pathlib import Path

import torch
from tqdm import tqdm

import structlayers as sl
from structlayers.bench import append_rows, read_rows, write_markdown

RESULTS = Path(__file__).parent / "results"
STRUCTURES = ("monarch", "btt:rank=1", "btt:rank=2", "btt:rank=4")
# HBM bandwidth from the vendors' data sheets, bytes/s; other devices: a measured large copy
PEAK_BANDWIDTH = {"H100 SXM": 3.35e12, "H100 80GB HBM3": 3.35e12, "H100 PCIe": 2.0e12,
                  "H100 NVL": 3.9e12, "H200": 4.8e12, "A100-SXM4-80GB": 2.039e12,
                  "A100-SXM4-40GB": 1.555e12, "A100 80GB PCIe": 1.935e12}
FIELDS = ["device", "date", "d", "tokens", "structure", "pass", "fused_ms", "torch_ms", "dense_ms",
          "speedup_vs_dense", "speedup_vs_torch", "roofline_ms", "x_roofline", "bandwidth_fraction"]


def build_layer(structure: str, d: int, device, dtype):
    """A d x d layer without bias; Monarch gets its default, about sqrt(d) blocks (64 at 4096)."""
    return sl.build(structure, d, d, bias=False, device=device, dtype=dtype)


def roofline_bytes(layer, tokens: int, with_backward: bool, element_size: int) -> int:
    cores = sum(p.numel() for p in layer.parameters())
    x, y = tokens * layer.in_features, tokens * layer.out_features
    moved = x + y + cores
    if with_backward:
        moved += y + x + cores + x + cores  # read grad y, x, cores; write grad x, grad cores
    return moved * element_size


def peak_bandwidth(device) -> tuple[float, str]:
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BANDWIDTH.items():
        if key in name:
            return value, "data sheet"
    from triton.testing import do_bench

    src = torch.empty(1 << 28, dtype=torch.uint8, device=device)  # 256 MiB
    dst = torch.empty_like(src)
    seconds = do_bench(lambda: dst.copy_(src)) / 1e3
    return 2 * src.numel() / seconds, "measured copy"


def time_ms(fn) -> float:
    from triton.testing import do_bench

    fn()  # compile and autotune outside the timing
    return do_bench(fn, warmup=25, rep=100)


def measure(layer, dense, tokens: int, with_backward: bool, timer=None) -> dict:
    """Milliseconds of the fused kernel, the torch path and dense for one pass."""
    x = torch.randn(tokens, layer.in_features, device=layer.W0.device, dtype=layer.W0.dtype)
    grad_y = torch.randn(tokens, layer.out_features, device=x.device, dtype=x.dtype)
    if with_backward:
        x.requires_grad_(True)

    def run(module, backend):
        def step():
            with sl.backend(backend):
                y = module(x)
            if with_backward:
                x.grad = None
                module.zero_grad(set_to_none=True)
                y.backward(grad_y)
        return step

    timer = timer or time_ms
    with torch.set_grad_enabled(with_backward):
        return {"fused_ms": timer(run(layer, "triton")), "torch_ms": timer(run(layer, "torch")),
                "dense_ms": timer(run(dense, "torch"))}


def dry_run(args):
    """Every case of the grid once on CPU, 16 tokens, fused kernels under Triton's interpreter
    (TRITON_INTERPRET=1): checks the layers, the paths and the roofline count; times nothing."""
    from structlayers.kernels import INTERPRET

    if not INTERPRET:
        sys.exit("--dry-run runs the kernels on CPU: set TRITON_INTERPRET=1")
    cases = 0
    for d in args.dims:
        for structure in args.structures:
            layer = build_layer(structure, d, "cpu", torch.float32)
            dense = torch.nn.Linear(d, d, bias=False)
            for with_backward in (False, True):
                ms = measure(layer, dense, 16, with_backward, timer=_once)
                assert roofline_bytes(layer, max(args.tokens), with_backward, 2) > 0 and len(ms) == 3
                cases += 1
    print(f"dry run: {cases} cases ran once on CPU (fused, torch, dense); nothing timed")


def _once(fn) -> float:
    fn()
    return float("nan")


def run_timings(args):
    if not torch.cuda.is_available():
        sys.exit("benchmarks/kernels.py times GPU kernels and needs a CUDA device; none is visible. "
                 "(--resources runs without one.)")
    device = torch.device("cuda")
    dtype = getattr(torch, args.dtype)
    name = torch.cuda.get_device_name(device)
    peak, peak_source = peak_bandwidth(device)
    csv_path = args.out / "kernels.csv"
    done = {(r["d"], r["tokens"], r["structure"], r["pass"]) for r in read_rows(csv_path)
            if r["device"] == name}
    jobs = [(d, t, s, p) for d in args.dims for s in args.structures for t in args.tokens
            for p in ("forward", "forward+backward")]
    with append_rows(csv_path, FIELDS) as write:
        for d, tokens, structure, pass_ in tqdm(jobs, desc="kernels", unit="case", disable=None):
            if (str(d), str(tokens), structure, pass_) in done:
                continue
            torch.manual_seed(0)
            layer = build_layer(structure, d, device, dtype)
            dense = torch.nn.Linear(d, d, bias=False, device=device, dtype=dtype)
            with_backward = pass_ == "forward+backward"
            ms = measure(layer, dense, tokens, with_backward)
            roofline_ms = roofline_bytes(layer, tokens, with_backward, x_size(dtype)) / peak * 1e3
            write({"device": name, "date": date.today().isoformat(), "d": d, "tokens": tokens,
                             "structure": structure, "pass": pass_, **{k: f"{v:.4f}" for k, v in ms.items()},
                             "speedup_vs_dense": f"{ms['dense_ms'] / ms['fused_ms']:.2f}",
                             "speedup_vs_torch": f"{ms['torch_ms'] / ms['fused_ms']:.2f}",
                             "roofline_ms": f"{roofline_ms:.4f}",
                             "x_roofline": f"{ms['fused_ms'] / roofline_ms:.2f}",
                             "bandwidth_fraction": f"{roofline_ms / ms['fused_ms']:.2f}"})
            del layer, dense
            torch.cuda.empty_cache()
    write_timings_md(csv_path, args.out / "kernels.md", name, f"{peak / 1e12:.2f} TB/s ({peak_source})")


def x_size(dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def write_timings_md(csv_path: Path, md_path: Path, device: str, peak: str):
    rows = [r for r in read_rows(csv_path) if r["device"] == device]
    lines = [f"# Fused Monarch/BTT kernels on {device}", "",
             f"{max(r['date'] for r in rows)}, torch {torch.__version__}, bf16, square d x d layers "
             f"without bias, peak bandwidth {peak}. x roofline = time / (bytes moved once / peak).",
             "", "| d | tokens | structure | pass | fused ms | torch ms | dense ms | vs dense | vs torch "
             "| x roofline |", "|" + "---|" * 10]
    for r in rows:
        lines.append(f"| {r['d']} | {r['tokens']} | {r['structure']} | {r['pass']} | {r['fused_ms']} "
                     f"| {r['torch_ms']} | {r['dense_ms']} | {r['speedup_vs_dense']}x "
                     f"| {r['speedup_vs_torch']}x | {r['x_roofline']} |")
    write_markdown(md_path, lines)
    print("wrote", csv_path, "and", md_path)


def run_resources(args):
    """Compile every config of every kernel at every benchmark shape for sm_90; no GPU needed."""
    from structlayers.kernels import INTERPRET, aot, btt_dims
    from structlayers.kernels import two_core as fused_kernel

    if INTERPRET:
        sys.exit("--resources compiles the real kernels: run it without TRITON_INTERPRET=1")
    dtype = getattr(torch, args.dtype)
    tokens = max(args.tokens)
    rows = []
    cases = [(d, s) for d in args.dims for s in args.structures]
    for d, structure in tqdm(cases, desc="compiling for sm_90", unit="layer", disable=None):
        dims = btt_dims(build_layer(structure, d, "meta", dtype).program)
        for role, (module, kernel, kernel_args) in aot.btt_launches(dims, tokens, dtype).items():
            for config in module.CONFIGS:
                if module is fused_kernel and config.kwargs["BLOCK_SR"] < kernel_args["RP"]:
                    continue
                usage = aot.resources(aot.compile_for_gpu(kernel, kernel_args, config))
                rows.append({"d": d, "structure": structure, "kernel": role,
                             "config": _config_name(config), **usage})
    csv_path, md_path = args.out / "kernel_resources.csv", args.out / "kernel_resources.md"
    args.out.mkdir(parents=True, exist_ok=True)
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    spilling = [r for r in rows if r["spill_bytes"]]
    lines = [f"# Kernel resources for sm_90 (H100), compiled on a CPU host, {date.today().isoformat()}",
             "", f"{len(rows)} kernel builds: every tile config of every kernel (forward with bias, "
             f"grad x, grad W0, grad W1 with grad bias) for d x d layers, d in {args.dims}, "
             f"{', '.join(args.structures)}, {tokens} tokens, {args.dtype}, triton {_triton_version()}. "
             f"{len(spilling)} of them spill registers.", "",
             "| kernel | configs | registers (min-max) | max spill bytes | max shared KiB |",
             "|---|---|---|---|---|"]
    for role in ("forward", "grad x", "grad W0", "grad W1"):
        mine = [r for r in rows if r["kernel"] == role]
        registers = [r["registers"] for r in mine]
        lines.append(f"| {role} | {len({r['config'] for r in mine})} | {min(registers)}-{max(registers)} "
                     f"| {max(r['spill_bytes'] for r in mine)} "
                     f"| {max(r['shared_bytes'] for r in mine) / 1024:.0f} |")
    if spilling:
        lines += ["", "Spilling builds:", ""] + [f"- {r['kernel']} {r['structure']} d={r['d']}: "
                                                  f"{r['config']} ({r['spill_bytes']} B)" for r in spilling]
    write_markdown(md_path, lines)
    print("\n".join(lines))
    print("wrote", csv_path, "and", md_path)


def _config_name(config) -> str:
    tiles = ",".join(f"{k.removeprefix('BLOCK_')}={v}" for k, v in config.kwargs.items())
    return f"{tiles},warps={config.num_warps},stages={config.num_stages}"


def _triton_version() -> str:
    import triton

    return triton.__version__


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384, 65536])
    parser.add_argument("--structures", nargs="+", default=list(STRUCTURES))
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    parser.add_argument("--resources", action="store_true",
                        help="compile every kernel config for sm_90 and report registers, spills and "
                             "shared memory (runs on CPU, no GPU)")
    parser.add_argument("--dry-run", action="store_true",
                        help="run every case once on CPU under TRITON_INTERPRET=1; time nothing")
    args = parser.parse_args()
    if args.resources:
        run_resources(args)
    elif args.dry_run:
        dry_run(args)
    else:
        run_timings(args)


if __name__ == "__main__":
    main()
