"""Peak memory of forward+backward: the execution plans vs the einsum path (CPU, fp32).

    python benchmarks/memory.py                  # 1024 -> 4096 -> 1024, 2048 tokens
    python benchmarks/memory.py --tokens 512 --d 8192 --hidden 8192

Every (structure, path) runs in a fresh process: build the pair and the input, note the resident
set's high-water mark (ru_maxrss), run three forward+backward passes, note it again; the growth
is the peak memory the passes needed above the model and the input (activations, gradients, the
plans' pooled buffers, allocator slack). Writes benchmarks/results/memory.{csv,md}.
"""

import argparse
import csv
import json
import os
import subprocess
import sys
from datetime import date
from pathlib import Path

from structlayers.bench import DEFAULT_SPECS, machine, write_markdown

RESULTS = Path(__file__).parent / "results"

CHILD = """
import json, resource, sys, torch
import structlayers as sl
spec, path, d, hidden, tokens = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:6])
torch.manual_seed(0)
pair = (sl.build(spec, d, hidden), sl.build(spec, hidden, d))
x = torch.randn(tokens, d, requires_grad=True)
grad_y = torch.randn(tokens, d)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
with sl.backend(path):
    for _ in range(3):
        y = pair[1](pair[0](x))
        y.backward(grad_y)
        del y
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"peak_mib": (after - before) / 1024}))
"""


def peak_mib(spec: str, path: str, d: int, hidden: int, tokens: int) -> float:
    result = subprocess.run([sys.executable, "-c", CHILD, spec, path, str(d), str(hidden),
                             str(tokens)], capture_output=True, text=True, check=True,
                            env=dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS",
                                                                                "2")))
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_mib"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--specs", nargs="+", default=list(DEFAULT_SPECS))
    args = parser.parse_args()
    rows = []
    for spec in args.specs:
        plan = peak_mib(spec, "torch", args.d, args.hidden, args.tokens)
        einsum = peak_mib(spec, "einsum", args.d, args.hidden, args.tokens)
        rows.append({"spec": spec, "plan_mib": round(plan, 1), "einsum_mib": round(einsum, 1),
                     "plan_vs_einsum": round(plan / einsum, 3) if einsum else float("nan")})
        print(rows[-1], flush=True)
    RESULTS.mkdir(exist_ok=True)
    with (RESULTS / "memory.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    size = f"{args.d} -> {args.hidden} -> {args.d}, {args.tokens} tokens"
    lines = [f"# Forward+backward peak memory: plans vs einsum path ({size}, fp32)", "",
             f"{machine()}, {date.today()}. Growth of the resident set's high-water mark over "
             "three forward+backward passes, one fresh process per cell.", "",
             "| structure | plans MiB | einsum MiB | plans / einsum |", "|---|---|---|---|"]
    lines += [f"| {r['spec']} | {r['plan_mib']} | {r['einsum_mib']} | {r['plan_vs_einsum']} |"
              for r in rows]
    write_markdown(RESULTS / "memory.md", lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
