"""The main job: every structure against dense at one realistic size.

A transformer-MLP-like pair of layers, d -> hidden -> d (e.g. 1024 -> 4096 -> 1024), on `tokens`
rows: parameters, forward FLOPs, measured forward+backward time, time ratio vs dense, and the
relative error of projecting a random dense matrix onto the structure.
"""

import csv
import platform
import statistics
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import date
from pathlib import Path

import torch
from tqdm import tqdm

from .spec import build

DEFAULT_SPECS = (
    "dense", "lowrank:rank=128", "kronecker", "monarch", "btt:rank=1", "btt:rank=2",
    "btt:rank=2,cores=3", "tt:cores=3,rank=8", "tucker:rank=0.05",
)


@dataclass
class BenchRow:
    spec: str
    params: int
    fwd_gflops: float
    fwd_bwd_ms: float
    time_vs_dense: float
    flops_vs_dense: float
    projection_error: float
    padded: bool


def time_fwd_bwd(layers, x: torch.Tensor, repeats: int) -> float:
    """Median seconds of one forward+backward through `layers` (after one warm-up run)."""
    times = []
    for k in range(repeats + 1):
        start = time.perf_counter()
        y = x
        for layer in layers:
            y = layer(y)
        y.square().mean().backward()
        if k:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_bench(d: int = 1024, hidden: int = 4096, tokens: int = 2048, specs=DEFAULT_SPECS,
              repeats: int = 3, seed: int = 0, progress: bool = True) -> list[BenchRow]:
    """Benchmark every spec as the pair d -> hidden -> d (see module docstring)."""
    torch.manual_seed(seed)
    x = torch.randn(tokens, d, requires_grad=True)
    random_weight = torch.randn(hidden, d) / d**0.5
    layers_by_spec = {spec: (build(spec, d, hidden), build(spec, hidden, d)) for spec in specs}
    rows, dense_time, dense_flops = [], None, None
    for spec, layers in tqdm(layers_by_spec.items(), desc="bench", disable=not progress):
        seconds = time_fwd_bwd(layers, x, repeats)
        flops = sum(layer.flops(tokens) for layer in layers)
        error = layers[0].project_(random_weight)
        if dense_time is None:  # the first spec is the reference
            dense_time, dense_flops = seconds, flops
        rows.append(BenchRow(
            spec=spec, params=sum(layer.num_params for layer in layers),
            fwd_gflops=flops / 1e9, fwd_bwd_ms=seconds * 1e3, time_vs_dense=seconds / dense_time,
            flops_vs_dense=flops / dense_flops, projection_error=error,
            padded=any(layer.padded for layer in layers)))
    return rows


def machine() -> str:
    return (f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
            f"torch {torch.__version__}")


def format_table(rows: list[BenchRow]) -> str:
    """A markdown table (readable as plain text too)."""
    header = ("| structure | params | fwd GFLOPs | fwd+bwd ms | time / dense | FLOPs / dense "
              "| proj. error (random W) |")
    lines = [header, "|" + "---|" * 7]
    for r in rows:
        spec = r.spec + (" (padded)" if r.padded else "")
        lines.append(f"| {spec} | {r.params:,} | {r.fwd_gflops:.2f} | {r.fwd_bwd_ms:.1f} "
                     f"| {r.time_vs_dense:.3f} | {r.flops_vs_dense:.4f} | {r.projection_error:.3f} |")
    return "\n".join(lines)


def write_results(rows: list[BenchRow], out_dir: Path, title: str) -> tuple[Path, Path]:
    """CSV and markdown (with machine and date) under out_dir."""
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
