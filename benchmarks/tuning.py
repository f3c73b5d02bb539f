"""Measured plans (structlayers/tune.py) vs the cost model's plans vs dense, on the main pair.

    python benchmarks/tuning.py                        # fp32 and bf16, ~5 min on 2 cores
    python benchmarks/tuning.py --dtypes float32 --repeats 3

For each structure the 1024 -> 4096 -> 1024 pair (2048 tokens) runs its first call (which
measures, as any first call does), then the pair with the cost model's plans, the pair with the
measured choices and the nn.Linear pair are timed interleaved in this process (median of
--repeats after a warm-up), forward+backward and inference. Writes benchmarks/results/tuning.md.
"""

import argparse
import datetime
import os
from pathlib import Path

import torch

import structlayers as sl
from structlayers import execute, tune
from structlayers.bench import DTYPES, machine, time_interleaved, write_markdown
from structlayers.plan import make_plan

RESULTS = Path(__file__).parent / "results"
SPECS = ("monarch", "btt:rank=1", "btt:rank=2", "btt:rank=2,cores=3", "tucker:rank=0.05", "tt:cores=3,rank=8")
D, HIDDEN, TOKENS = 1024, 4096, 2048


def pair_runner(layers, plans, x, grad_y, training: bool):
    """One forward (+ backward) of the layers, each through its given (plan, materialise)."""
    def run():
        h = x.detach().requires_grad_(training)
        with torch.set_grad_enabled(training):
            for layer, (plan, materialise) in zip(layers, plans, strict=True):
                cores = layer._cores()
                operands = [cores[mm.step.core] for mm in plan.matmuls]
                path = execute._materialised if materialise else execute._planned
                h = path(plan, h, operands, layer.bias)
            if training:
                h.backward(grad_y)
    return run


def dense_runner(layers, x, grad_y, training: bool):
    def run():
        h = x.detach().requires_grad_(training)
        with torch.set_grad_enabled(training):
            y = layers[1](layers[0](h))
            if training:
                y.backward(grad_y)
    return run


def compare(dtype, training: bool, repeats: int) -> tuple[list[str], list[tuple]]:
    """(measurement lines, rows (spec, model s, measured s, dense s))."""
    torch.manual_seed(0)
    x, grad_y = torch.randn(TOKENS, D, dtype=dtype), torch.randn(TOKENS, D, dtype=dtype)
    dense = [torch.nn.Linear(D, HIDDEN, dtype=dtype), torch.nn.Linear(HIDDEN, D, dtype=dtype)]
    runners, notes = {"dense": dense_runner(dense, x, grad_y, training)}, []
    precision = "half" if dtype != torch.float32 and not execute._half_is_slow(dtype) else "float32"
    for spec in SPECS:
        layers = [sl.build(spec, D, HIDDEN, dtype=dtype), sl.build(spec, HIDDEN, D, dtype=dtype)]
        dense_runner(layers, x, grad_y, training)()  # the first call measures
        model, measured = [], []
        for layer in layers:
            plan = make_plan(layer.program, TOKENS, training, precision)
            m = tune.measured().get(plan)
            model.append((plan, plan.materialise))
            measured.append((plan, plan.materialise) if m is None else (m.chosen, m.materialise))
            if m is not None:
                best = min(s for _, s in m.seconds)
                notes.append(f"- {spec} {layer.in_features}->{layer.out_features}: " + ", ".join(
                    f"{name} {s * 1e3:.1f} ms" + (" (chosen)" if s == best else "") for name, s in m.seconds))
        runners[spec + " model"] = pair_runner(layers, model, x, grad_y, training)
        runners[spec + " measured"] = pair_runner(layers, measured, x, grad_y, training)
    seconds = time_interleaved(runners, repeats)
    rows = [(spec, seconds[spec + " model"], seconds[spec + " measured"], seconds["dense"]) for spec in SPECS]
    return notes, rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per candidate (median)")
    parser.add_argument("--out", type=Path, default=RESULTS / "tuning.md")
    args = parser.parse_args()
    lines = ["# Measured plans vs the cost model's plans (1024->4096->1024 pair, 2048 tokens)", "",
             f"Machine: {machine()}. {datetime.date.today()}. Median of {args.repeats} interleaved runs "
             "in one process.", ""]
    for name in args.dtypes:
        for training in (True, False):
            notes, rows = compare(DTYPES[name], training, args.repeats)
            mode = "fwd+bwd" if training else "inference"
            lines += [f"## {name}, {mode} (nn.Linear pair: {rows[0][3] * 1e3:.1f} ms; "
                      f"load {os.getloadavg()[0]:.2f})", "",
                      "| structure | cost model's plans / dense | measured plans / dense | speedup |",
                      "|---|---|---|---|"]
            lines += [f"| {spec} | {m / d:.3f} | {t / d:.3f} | {m / t:.2f}x |" for spec, m, t, d in rows]
            lines += ["", "What the first calls measured (best of 3 runs each):", "", *notes, ""]
            print("\n".join(lines[-len(rows) - len(notes) - 6:]), flush=True)
    write_markdown(args.out, lines)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
