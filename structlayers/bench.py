"""The main job: every structure against dense nn.Linear at one realistic size.

A transformer-MLP-like pair of layers, d -> hidden -> d (e.g. 1024 -> 4096 -> 1024), on `tokens`
rows, in three modes: forward (autograd recording), forward+backward, and inference (no_grad).
Per structure: parameters, forward FLOPs / dense, time / dense of the default path (on CPU the
execution plans, or the dense map where a plan decides that is faster), of the reference einsum
path, and for Monarch of the published two-bmm algorithm; all candidates are timed interleaved in
this one process, median of `repeats` runs after a warm-up.
"""

import csv
import math
import os
import platform
import statistics
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from datetime import date
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from .program import backend
from .spec import build

DEFAULT_SPECS = (
    "dense", "lowrank:rank=128", "kronecker", "monarch", "btt:rank=1", "btt:rank=2",
    "btt:rank=2,cores=3", "tt:cores=3,rank=8", "tucker:rank=0.05",
)
MODES = ("fwd", "fwd+bwd", "inference")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
NAN = float("nan")


@dataclass
class BenchRow:
    size: str  # "d->hidden->d"
    tokens: int
    dtype: str
    mode: str
    spec: str
    params: int
    fwd_gflops: float
    flops_vs_dense: float
    ms: float  # the torch path (execution plans)
    time_vs_dense: float  # ms / the nn.Linear pair's, same mode, same process
    einsum_vs_dense: float  # the reference einsum path
    two_bmm_vs_dense: float  # Monarch only: the two-bmm-with-transposes algorithm
    fused_vs_dense: float  # CUDA only: the fused Triton kernel (2-core Monarch/BTT)
    projection_error: float  # relative error projecting a random dense matrix (nan: not measured)
    padded: bool
    load: float  # 1-minute load average when the group started
    device: str
    date: str


class TwoBmmMonarch(nn.Module):
    """The published Monarch multiply (Dao et al. 2022, fly's blockdiag_butterfly_multiply),
    written from its description: x (B, k*p) viewed (k, B, p) -> bmm with k blocks (p -> q) ->
    (B, k*q) regrouped as (l, B, r) -> bmm with l blocks (r -> s) -> (B, s, l) -> (B, s*l); autograd
    backward. Holds copies of a Monarch layer's cores in its (blocks, out, in) layout; computes
    the same map up to a fixed permutation of the outputs."""

    def __init__(self, monarch):
        super().__init__()
        first, second = monarch.core_steps[0][1], monarch.core_steps[1][1]
        self.w1 = nn.Parameter(first.detach().transpose(1, 2).contiguous())  # (k, q, p)
        self.w2 = nn.Parameter(second.detach().transpose(1, 2).contiguous())  # (l, s, r)
        self.bias = None if monarch.bias is None else nn.Parameter(monarch.bias.detach().clone())
        self.in_features, self.out_features = monarch.in_features, monarch.out_features
        if (monarch.padded_in, monarch.padded_out) != (self.in_features, self.out_features):
            raise ValueError("TwoBmmMonarch takes unpadded Monarch layers only")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = x.shape[:-1]
        x = x.reshape(-1, x.shape[-1])
        (k, _, p), (l, s, r) = self.w1.shape, self.w2.shape
        h = torch.bmm(x.reshape(-1, k, p).transpose(0, 1), self.w1.transpose(1, 2))  # (k, B, q)
        h = h.transpose(0, 1).reshape(-1, r, l).permute(2, 0, 1)  # (l, B, r)
        y = torch.bmm(h, self.w2.transpose(1, 2))  # (l, B, s)
        y = y.permute(1, 2, 0).reshape(*batch, s * l)
        return y if self.bias is None else y + self.bias


def _runner(layers, x: torch.Tensor, grad_y: torch.Tensor, mode: str, path: str | None):
    """A function doing one `mode` pass of x through `layers` on `path` ("torch"/"einsum"/None)."""
    params = [p for layer in layers for p in layer.parameters()]

    def run():
        for p in params:
            p.grad = None
        x.grad = None
        with backend(path) if path else nullcontext(), torch.set_grad_enabled(mode != "inference"):
            y = x
            for layer in layers:
                y = layer(y)
            if mode == "fwd+bwd":
                y.backward(grad_y)
    return run


def time_interleaved(runners: dict, repeats: int, device: str = "cpu") -> dict:
    """name -> median seconds of its runner; the runners take turns (one warm-up round first), so
    load and frequency changes hit every candidate alike."""
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    times = {name: [] for name in runners}
    for k in range(repeats + 1):
        for name, run in runners.items():
            sync()
            start = time.perf_counter()
            run()
            sync()
            if k:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def run_bench(d: int = 1024, hidden: int = 4096, tokens: int = 2048, specs=DEFAULT_SPECS,
              repeats: int = 3, seed: int = 0, progress: bool = True, dtype: str = "float32",
              modes=MODES, project: bool = True, einsum: bool = True,
              device: str = "cpu") -> list[BenchRow]:
    """Benchmark every spec as the pair d -> hidden -> d against the nn.Linear pair (see the
    module docstring). project: also measure the projection error (fp32, before timing). On
    CUDA the layers with a fused Triton kernel are timed on it too (fused_vs_dense)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise ValueError(f"modes must be a non-empty subset of {MODES}, got {list(modes)!r}")
    torch.manual_seed(seed)
    dt = DTYPES[dtype]
    load = os.getloadavg()[0]
    x = torch.randn(tokens, d, dtype=dt, device=device, requires_grad=True)
    grad_y = torch.randn(tokens, d, dtype=dt, device=device)
    random_weight = torch.randn(hidden, d) / d**0.5
    dense = (nn.Linear(d, hidden, dtype=dt, device=device),
             nn.Linear(hidden, d, dtype=dt, device=device))
    layers, errors = {}, {}
    for spec in tqdm(specs, desc="build", disable=None if progress else True):
        pair = (build(spec, d, hidden), build(spec, hidden, d))
        errors[spec] = pair[0].project_(random_weight) if project else NAN
        layers[spec] = tuple(layer.to(device, dt) for layer in pair)
    two_bmm = {spec: tuple(TwoBmmMonarch(layer) for layer in pair) for spec, pair in layers.items()
               if pair[0].name == "monarch" and not any(layer.padded for layer in pair)}
    fused = {spec for spec, pair in layers.items()
             if torch.device(device).type == "cuda" and all(_has_kernel(m) for m in pair)}
    dense_flops = 2 * 2 * d * hidden * tokens
    rows = []
    for mode in tqdm(modes, desc=f"time {dtype}", disable=None if progress else True):
        runners = {("nn.Linear", "torch"): _runner(dense, x, grad_y, mode, None)}
        # the default path a user gets: on CPU "auto" (plans, or the dense map where the plan
        # decides it is faster); on CUDA "torch" (the plans; the kernels have their own column)
        default = "auto" if torch.device(device).type == "cpu" else "torch"
        for spec, pair in layers.items():
            runners[spec, "torch"] = _runner(pair, x, grad_y, mode, default)
            if einsum:
                runners[spec, "einsum"] = _runner(pair, x, grad_y, mode, "einsum")
            if spec in two_bmm:
                runners[spec, "two-bmm"] = _runner(two_bmm[spec], x, grad_y, mode, None)
            if spec in fused:
                runners[spec, "triton"] = _runner(pair, x, grad_y, mode, "triton")
        seconds = time_interleaved(runners, repeats, device)
        base = seconds["nn.Linear", "torch"]
        common = {"size": f"{d}->{hidden}->{d}", "tokens": tokens, "dtype": dtype, "mode": mode,
                  "load": load, "device": machine(device), "date": str(date.today())}
        rows.append(BenchRow(spec="nn.Linear", params=sum(p.numel() for m in dense for p in
                                                          m.parameters()),
                             fwd_gflops=dense_flops / 1e9, flops_vs_dense=1.0, ms=base * 1e3,
                             time_vs_dense=1.0, einsum_vs_dense=NAN, two_bmm_vs_dense=NAN,
                             fused_vs_dense=NAN,
                             projection_error=0.0 if project else NAN, padded=False, **common))
        for spec, pair in layers.items():
            flops = sum(layer.flops(tokens) for layer in pair)
            rows.append(BenchRow(
                spec=spec, params=sum(layer.num_params for layer in pair),
                fwd_gflops=flops / 1e9, flops_vs_dense=flops / dense_flops,
                ms=seconds[spec, "torch"] * 1e3, time_vs_dense=seconds[spec, "torch"] / base,
                einsum_vs_dense=seconds.get((spec, "einsum"), NAN) / base,
                two_bmm_vs_dense=seconds.get((spec, "two-bmm"), NAN) / base,
                fused_vs_dense=seconds.get((spec, "triton"), NAN) / base,
                projection_error=errors[spec], padded=any(layer.padded for layer in pair),
                **common))
    return rows


def _has_kernel(layer) -> bool:
    try:
        from .kernels import fused_dims
    except ImportError:  # no triton
        return False
    return fused_dims(layer.program) is not None


def machine(device: str = "cpu") -> str:
    if torch.device(device).type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    return (f"{_cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
            f"{torch.backends.cpu.get_cpu_capability()}")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ratio(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.3f}"


def format_table(rows: list[BenchRow]) -> str:
    """Markdown tables (readable as plain text too), one per (size, dtype, mode)."""
    blocks = []
    for key in dict.fromkeys((r.size, r.tokens, r.dtype, r.mode) for r in rows):
        group = [r for r in rows if (r.size, r.tokens, r.dtype, r.mode) == key]
        base = group[0]
        lines = [f"{key[0]}, {key[1]} tokens, {key[2]}, {key[3]} (nn.Linear pair: {base.ms:.1f} "
                 f"ms; load {base.load:.2f})", "",
                 "| structure | params | FLOPs / dense | ms | time / dense | einsum path / dense "
                 "| two-bmm / dense | fused / dense | proj. error (random W) |", "|" + "---|" * 9]
        for r in group:
            spec = r.spec + (" (padded)" if r.padded else "")
            error = "-" if math.isnan(r.projection_error) else f"{r.projection_error:.3f}"
            lines.append(f"| {spec} | {r.params:,} | {r.flops_vs_dense:.4f} | {r.ms:.1f} "
                         f"| {r.time_vs_dense:.3f} | {_ratio(r.einsum_vs_dense)} "
                         f"| {_ratio(r.two_bmm_vs_dense)} | {_ratio(r.fused_vs_dense)} | {error} |")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def write_results(rows: list[BenchRow], out_dir: Path, title: str) -> tuple[Path, Path]:
    """CSV and markdown (with machine, date and load) under out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / "layers"
    with open(stem.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(rows[0])))
        writer.writeheader()
        writer.writerows(asdict(r) for r in rows)
    stem.with_suffix(".md").write_text(
        f"# {title}\n\nMachine: {machine()}. Date: {date.today()}.\n\n{format_table(rows)}\n")
    return stem.with_suffix(".csv"), stem.with_suffix(".md")


def write_markdown(path: Path, lines: list[str]) -> Path:
    """Write markdown lines to `path` (its folder made if needed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def read_rows(path: Path) -> list[dict]:
    """The rows of a results CSV; [] when it does not exist yet."""
    if not path.exists():
        return []
    with path.open() as f:
        return list(csv.DictReader(f))


@contextmanager
def append_rows(path: Path, fields):
    """Yields write(row), which appends one row to the CSV at `path` and flushes it, so a killed
    benchmark keeps every finished row; the header goes in when the file is new or empty."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fields)
        if f.tell() == 0:
            writer.writeheader()

        def write(row):
            writer.writerow(row)
            f.flush()

        yield write
