"""Execution plans: how a program's contractions run fast, derived once and cached.

A `Program` says what to contract; a `Plan` says how, for one (program, token bucket, training or
inference):

- order: the activation absorbs the cores in an order with the fewest FLOPs, or within 10% of
  them (`_contraction_orders`; for TT 1024 -> 4096 the fixed step order costs 1.9x the best, which runs the
  cores from the other end), the one whose layouts the cost model prices cheapest;
- layouts: every activation-core contraction is one strided batched matmul
  out[b, m, n] = x[b, m, k] @ core[b, k, n] over the modes it carries as blocks (b), as rows (m:
  the tokens and the modes the core does not touch), sums (k) and produces (n). The activation is
  read in place when each of those groups is one run of its physical modes; the output is written
  in whatever physical order the next matmul reads best (`_layouts`: a shortest path over the
  orders, priced by the cost model below, backward matmuls included when training), and it is
  copied only where that is cheaper than a slow layout or no order can be read in place. The
  cores, being small, are reordered freely.

`structlayers show` prints a plan (`Plan.describe`). The cost model's numbers were measured on the
2-core dev machine (fp32, preallocated outputs): batched matmuls of 32-128-wide blocks run at
40-120 GFLOP/s depending on layout (`_LAYOUT_EFFICIENCY`), copies at 67 GB/s contiguous, 20 GB/s
moving rows of 16+ elements, 17 GB/s as per-token transposes, 5 GB/s across tokens. Only the
ratios steer the choice, and every choice computes the same map.
"""

from dataclasses import dataclass
from functools import lru_cache
from itertools import permutations, product
from math import prod

from .program import Program, Step, dense_flops, make_step

TOKEN = "_T"  # the token mode in physical orders

_GEMM_RATE = 190e9       # FLOP/s of a large fp32 GEMM
_COPY_RATES = {"same": 67e9, "chunks": 20e9, "per token": 17e9, "across tokens": 5e9}  # bytes/s
_CALL_SECONDS = 10e-6    # fixed cost of one torch call from Python
_BEAM = 24               # activation orders kept between matmuls (the cheapest so far)
_ORDERS = 4              # contraction orders the layout search prices
_FLOP_SLACK = 1.1        # ... each within this factor of the fewest FLOPs
_PATHS_PER_STATE = 3     # layouts kept per activation order when candidates are wanted (tune.py)


@dataclass(frozen=True)
class Matmul:
    """One activation-core contraction as a strided batched matmul.

    The activation arrives in physical order `source` (a contiguous tensor, TOKEN among its
    modes); it is copied to `x_order` first when the two differ. The output is a contiguous tensor
    in physical order `out_order`. `blocks`/`rows`/`sums`/`made` are the b/m/k/n mode groups, each
    in the order it has in x_order (made: in out_order).
    """

    step: Step
    source: tuple[str, ...]
    x_order: tuple[str, ...]
    out_order: tuple[str, ...]
    blocks: tuple[str, ...]
    rows: tuple[str, ...]
    sums: tuple[str, ...]
    made: tuple[str, ...]

    @property
    def copies_input(self) -> bool:
        return self.source != self.x_order


@dataclass(frozen=True)
class Plan:
    """The matmuls (activation with core, in the searched order), then the output's order.

    The input is x (T, *program.in_modes) contiguous; the last matmul writes `out_order`, copied
    to (T, *program.out_modes) when it differs.
    """

    program: Program
    tokens: int  # the bucket (a power of two) the plan was derived for
    training: bool  # planned for forward+backward (else for a forward alone)
    matmuls: tuple[Matmul, ...]
    seconds: float  # the cost model's estimate of one forward (+ backward when training)
    dense_seconds: float = float("inf")  # ... of building W = to_dense() and one F.linear instead
    precision: str = "float32"  # whose cost model chose the layouts (`PRECISIONS`)

    @property
    def materialise(self) -> bool:
        """Whether W and one F.linear are cheaper (tiny layers); done under backend "auto", the
        default, while "torch" runs the matmuls."""
        return self.dense_seconds < self.seconds

    @property
    def out_order(self) -> tuple[str, ...]:
        return (TOKEN, *self.program.out_modes)

    def contraction_flops(self, tokens: int) -> int:
        """Forward matmul FLOPs of the structured contraction in this plan's order (linear in the
        tokens; what `StructuredLinear.flops` reports even where the plan materialises)."""
        return sum(mm.step.flops(tokens) for mm in self.matmuls)

    def flops(self, tokens: int) -> int:
        """Forward matmul FLOPs of what this plan runs for `tokens` rows (materialised: building W
        along opt_einsum's path, then the GEMM)."""
        if self.materialise:
            n_out, n_in = self.program.dense_shape
            return dense_flops(self.program) + 2 * tokens * n_in * n_out
        return self.contraction_flops(tokens)

    def describe(self) -> str:
        kind = "forward+backward" if self.training else "forward"
        lines = [f"plan for {self.tokens} tokens, {kind}, {self.precision} (cost model: "
                 f"{self.seconds * 1e3:.3f} ms; to_dense + F.linear: {self.dense_seconds * 1e3:.3f} ms):"]
        if self.materialise:
            lines.append("  materialise (backend 'auto', the default): W = to_dense() (cores contracted "
                         "by opt_einsum), then one F.linear; the matmuls below run under backend('torch')")
        for mm in self.matmuls:
            copy = f"copy {_show(mm.source)} -> {_show(mm.x_order)}, " if mm.copies_input else ""
            lines.append(f"  {mm.step.core}: {copy}bmm blocks={_show(mm.blocks)} rows={_show(mm.rows)} "
                         f"sums={_show(mm.sums)} makes={_show(mm.made)} -> {_show(mm.out_order)}")
        if self.matmuls[-1].out_order != self.out_order:
            lines.append(f"  copy {_show(self.matmuls[-1].out_order)} -> {_show(self.out_order)}")
        return "\n".join(lines)


def token_bucket(tokens: int) -> int:
    """The power of two at or above `tokens` (at least 1): plans are cached per bucket."""
    return 1 << max(0, tokens - 1).bit_length()


def make_plan(program: Program, tokens: int, training: bool = True, precision: str = "float32") -> Plan:
    """The plan for `program` at `tokens` (rounded up to its bucket), for a forward+backward
    (training) or a forward alone, its matmuls in `precision` ("float32", or "half": bf16 / fp16
    run natively, whose CPU matmuls prefer other layouts)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    return _plan(program, token_bucket(tokens), training, PRECISIONS[precision])


@lru_cache(maxsize=1024)
def _plan(program: Program, tokens: int, training: bool, p: "Precision") -> Plan:
    return _candidates(program, tokens, training, p, 1)[0]


def candidate_plans(plan: Plan, count: int = 8, slack: float = 3.0) -> tuple[Plan, ...]:
    """`plan` (the cost model's choice) and up to `count - 1` other plans for the same layer,
    cheapest estimate first, each priced within `slack` times `plan`'s estimate: what a one-time
    measurement picks from (tune.py), as the cost model's ranking of layouts is far from exact."""
    p = PRECISIONS[plan.precision]
    ranked = _candidates(plan.program, plan.tokens, plan.training, p, _PATHS_PER_STATE)
    others = [c for c in ranked if c.matmuls != plan.matmuls and c.seconds <= slack * plan.seconds]
    return (plan, *others[:count - 1])


@lru_cache(maxsize=256)
def _candidates(program: Program, tokens: int, training: bool, p: "Precision",
                paths: int) -> tuple[Plan, ...]:
    """Plans over every contraction order (`_contraction_orders`), cheapest estimate first, the
    `paths` cheapest layouts kept per activation order between matmuls."""
    sizes = dict(program.sizes) | {TOKEN: tokens}
    dense_seconds = _dense_seconds(program, tokens, training, p)
    laid_out = [(seconds, matmuls) for steps in _contraction_orders(program)
                for seconds, matmuls in _layouts(steps, program, sizes, training, p, paths)]
    laid_out.sort(key=lambda seconds_matmuls: seconds_matmuls[0])
    return tuple(Plan(program, tokens, training, matmuls, seconds, dense_seconds, p.name)
                 for seconds, matmuls in laid_out)


def _dense_seconds(program: Program, tokens: int, training: bool, p: "Precision") -> float:
    """Cost model of materialising W (out, in) from the cores and running one GEMM with it
    (training: the two backward GEMMs and the backward of the materialisation too)."""
    n_out, n_in = program.dense_shape
    gemm = _bmm_seconds(1, tokens, n_in, n_out, rate=p.gemm_rate)
    # small einsums of cores run far below GEMM rate; W is a fresh buffer each call
    build = (dense_flops(program) / (0.25 * p.bmm_rate)
             + p.element_bytes * n_in * n_out / p.copy_rates["chunks"] + len(program.steps) * _CALL_SECONDS)
    return 3 * (gemm + build) if training else gemm + build


# --- order ---------------------------------------------------------------------------------------
def _contraction_orders(program: Program) -> list[tuple[Step, ...]]:
    """Orders in which the activation absorbs the cores, fewest FLOPs per token first: those
    within `_FLOP_SLACK` of the fewest (at most `_ORDERS`), for the layout search to price.

    A shortest path over the sets of cores absorbed so far (2^cores states, the `_ORDERS`
    cheapest paths kept per state): the activation's modes after absorbing a set are the input's
    and the set's modes that the output or a core still to come needs. Only cores that share a
    mode with the activation are absorbed (no outer products). Ties keep the program's own step
    order first. Cores never meet each other first, so the FLOPs stay linear in the tokens. Orders
    of equal FLOPs can differ in speed (Tucker: absorbing the input factor of the innermost input
    mode first reads the input in place, the other one needs a copy of it).
    """
    cores = {s.core: s.core_modes for s in program.steps}
    sizes = dict(program.sizes)
    out = set(program.out_modes)

    def modes_after(absorbed):
        needed = out | {m for name, modes in cores.items() if name not in absorbed for m in modes}
        have = dict.fromkeys((*program.in_modes, *(m for n in cores if n in absorbed for m in cores[n])))
        return tuple(m for m in have if m in needed)

    best = {frozenset(): [(0, ())]}  # absorbed set -> [(flops per token, steps)], cheapest first
    for _ in cores:
        grown = {}
        for absorbed, paths in best.items():
            x_modes = modes_after(absorbed)
            for name, core_modes in cores.items():
                if name in absorbed or not set(core_modes) & set(x_modes):
                    continue
                after = absorbed | {name}
                step = make_step(name, x_modes, core_modes, modes_after(after), sizes)
                grown.setdefault(after, []).extend((flops + step.flops(1), (*steps, step))
                                                   for flops, steps in paths)
        best = {key: sorted(paths, key=lambda path: path[0])[:_ORDERS] for key, paths in grown.items()}
    (paths,) = best.values()
    fewest = min(paths[0][0], program.flops(1))
    orders = [steps for flops, steps in paths if flops <= fewest * _FLOP_SLACK]
    if program.flops(1) <= fewest * _FLOP_SLACK and program.steps not in orders:
        orders.append(program.steps)
    return orders


# --- layouts -------------------------------------------------------------------------------------
def groups(step: Step) -> dict[str, tuple[str, ...]]:
    """The matmul's mode groups (in the step's own mode order): blocks, rows, sums, made."""
    x, core, out = set(step.x_modes), set(step.core_modes), set(step.out_modes)
    return {"blocks": tuple(m for m in step.x_modes if m in core and m in out),
            "rows": (TOKEN, *(m for m in step.x_modes if m in out and m not in core)),
            "sums": tuple(m for m in step.x_modes if m in core and m not in out),
            "made": tuple(m for m in step.core_modes if m in out and m not in x)}


def _runs(order, parts) -> bool:
    """Whether every part (a tuple of modes) is one run of consecutive positions in `order`."""
    where = {m: k for k, m in enumerate(order)}
    return all(not part or [where[m] for m in part] == list(range(where[part[0]], where[part[0]] + len(part)))
               for part in parts)


def _readable(order, blocks, rows, sums, sizes) -> tuple | None:
    """(blocks, rows, sums) in their physical order within `order` when the matmul reads it in
    place: each group one run, and the blocks not the innermost run (a GEMM operand needs one
    unit stride within each block). None otherwise."""
    ordered = [tuple(m for m in order if m in group) for group in (blocks, rows, sums)]
    if not _runs(order, ordered):
        return None
    if blocks and order[-1] in blocks and prod(sizes[m] for m in blocks) > 1:
        return None
    return tuple(ordered)


def _orders(parts, source) -> list[tuple[str, ...]]:
    """The orders that keep each part one run: any order of the parts; within a part of up to
    two modes either order, in a longer one the `source` order (a copy that keeps neighbours
    together moves longer chunks)."""
    where = {m: k for k, m in enumerate(source)}
    inner = [list(permutations(p)) if len(p) <= 2 else [tuple(sorted(p, key=where.__getitem__))]
             for p in parts if p]
    return [tuple(m for p in chosen for m in p) for part_order in permutations(inner)
            for chosen in product(*part_order)]


def _group_orders(parts, sizes) -> list[tuple[str, ...]]:
    """The orders that put the parts (each in its own order) one after another, blocks (the
    first part) not innermost."""
    orders = {tuple(m for p in part_order for m in p) for part_order in permutations(parts)}
    return sorted(o for o in orders if _readable(o, *parts, sizes) is not None)


# How fast a batched matmul runs, relative to its best layout, by the layout of an operand or the
# output: "B" when the blocks are the outermost mode (else "M": a block mode sits inside another),
# "R" when its last dim is innermost (row-major), "C" when its first is (column-major). float32:
# fitted (log-linear, 11% rms error) to 216 layout combinations of (32 x 2048 x 32) @ (32 x 32 x 64)
# and (32 x 32 x 2048) @ (32 x 2048 x 64) batched matmuls with preallocated outputs, dev CPU.
# half (bf16 on a CPU with AMX, oneDNN): read off 64 combinations of (32 x 2048 x 32) @
# (32 x 32 x 128) and (32 x 32 x 2048) @ (32 x 2048 x 64) on a 2-core Xeon; a column-major output
# runs at 0.2-0.4 GFLOP/s there (a reference loop, against 750 row-major), so the search never
# picks one: a copy is always cheaper. An operand whose blocks are not outermost ("M") is copied
# inside torch.bmm into a fresh buffer (page faults: 10 GB/s, a third of a pooled copy's rate), so
# the plan copies it into a pooled buffer first (`_operand_copy_seconds`).
_LAYOUT_EFFICIENCY = {
    "float32": {"matmul": {"a": {"BR": 1.0, "BC": 0.95, "MR": 0.84, "MC": 0.73},
                           "out": {"BR": 1.0, "MR": 0.81, "BC": 0.65, "MC": 0.61}},
                "reduce": {"a": {"BC": 1.0, "BR": 0.96, "MR": 0.99, "MC": 0.78},  # the core's gradient
                           "b": {"BC": 1.0, "BR": 0.96, "MC": 0.95, "MR": 0.68}}},
    "half": {"matmul": {"a": {"BR": 1.0, "BC": 0.5},  # "M" operands are copied first
                        "out": {"BR": 1.0, "MR": 0.8, "BC": 5e-4, "MC": 5e-4}},
             "reduce": {"a": {"BC": 0.96, "BR": 1.0}, "b": {"BC": 1.0, "BR": 1.0}}},
}


@dataclass(frozen=True, eq=False)  # hashed by identity: one instance per name (`PRECISIONS`)
class Precision:
    """The cost model's rates for one compute precision (both measured on the dev CPUs)."""

    name: str  # "float32" or "half" (bf16 / fp16 where the CPU's matmuls run them natively)
    bmm_rate: float  # FLOP/s of a large batched matmul in its best layout
    gemm_rate: float  # FLOP/s of one large dense GEMM (the materialised layer's F.linear)
    element_bytes: int
    copy_rates: dict  # bytes/s of the copy kinds (`_copy_seconds`)
    layouts: dict  # batched-matmul efficiency by layout (`_LAYOUT_EFFICIENCY`)


PRECISIONS = {"float32": Precision("float32", _GEMM_RATE, _GEMM_RATE, 4, _COPY_RATES,
                                   _LAYOUT_EFFICIENCY["float32"]),
              # bf16 on the AMX Xeon: 750 GFLOP/s batched, 2.9 TFLOP/s dense; torch's bf16 copy
              # that moves single elements across tokens ran at 1.2 GB/s (fp32: 5-18)
              "half": Precision("half", 600e9, 2400e9, 2,
                                {"same": 58e9, "chunks": 30e9, "per token": 20e9, "across tokens": 1.5e9},
                                _LAYOUT_EFFICIENCY["half"])}


def _layout(order, blocks, rows, cols) -> str:
    """The layout class ("BR", "BC", "MR", "MC") of a (blocks, rows, cols) view of `order`."""
    first = [m for m in order if m in (*blocks, *rows, *cols)]
    outer = "B" if not blocks or first[0] in blocks else "M"
    inner = "R" if not cols or first[-1] in cols else "C"
    return outer + inner


def _bmm_seconds(b, m, k, n, *efficiencies, rate: float = _GEMM_RATE) -> float:
    """Cost model of one batched matmul (b, m, k) @ (b, k, n): small matrices run slower."""
    efficiency = 1 / (1 + 16 / max(k, 1) + 16 / max(n, 1) + 16 / max(m, 1))
    for e in efficiencies:
        efficiency *= e
    return 2 * b * m * k * n / (rate * efficiency) + _CALL_SECONDS


def _matmul_seconds(x_order, out_order, blocks, rows, sums, made, sizes, training: bool,
                    p: Precision) -> float:
    """Forward, and for training the two backward matmuls, of one activation-core matmul."""
    b, m, k, n = (prod(sizes[mode] for mode in part) for part in (blocks, rows, sums, made))
    table, rate = p.layouts, p.bmm_rate
    x_layout = _layout(x_order, blocks, rows, sums)
    out_layout = _layout(out_order, blocks, rows, made)
    seconds = 0.0
    # the input's gradient is written in the x layout; in half precision an operand whose
    # blocks are not outermost is first copied batch-major
    dx_layout, g_layout = x_layout, out_layout
    if p.name == "half":
        seconds += _operand_copy_seconds(x_layout, b * m * k, p)
        x_layout = "B" + x_layout[1]
    seconds += _bmm_seconds(b, m, k, n, table["matmul"]["a"][x_layout], table["matmul"]["out"][out_layout],
                            rate=rate)
    if training:
        if p.name == "half":
            seconds += _operand_copy_seconds(g_layout, b * m * n, p)
            g_layout = "B" + g_layout[1]
        # grad core: x3^T (b, k, m) @ g3 (b, m, n); grad input: g3 @ core^T, written like x
        transposed = {"BR": "BC", "BC": "BR", "MR": "MC", "MC": "MR"}
        seconds += _bmm_seconds(b, k, m, n, table["reduce"]["a"][transposed[x_layout]],
                                table["reduce"]["b"][g_layout], rate=rate)
        seconds += _bmm_seconds(b, m, n, k, table["matmul"]["a"][g_layout],
                                table["matmul"]["out"][dx_layout], rate=rate)
    return seconds


def _operand_copy_seconds(layout: str, numel: int, p: Precision) -> float:
    """Half precision: an activation operand whose blocks are not outermost is copied to a
    batch-major pooled buffer before the matmul (`execute._batch_major`), as torch's bf16 bmm
    would otherwise do itself into a fresh buffer (page faults: 2.5x slower)."""
    if layout[0] != "M":
        return 0.0
    return 2 * p.element_bytes * numel / p.copy_rates["chunks"] + _CALL_SECONDS


def _core_seconds(step: Step, blocks, sums, made, sizes, training: bool, p: Precision) -> float:
    """Cost model of reordering the core to (blocks, sums, made) for the matmul (a copy unless
    the orders agree), and for training of adding its gradient back in the core's order (free
    where (blocks, sums, made) or (blocks, made, sums) agrees with it). Small for most cores; a
    large Tucker core reordered at every call is not."""
    target = (*blocks, *sums, *made)
    in_place = same_runs(target, step.core_modes, sizes)
    seconds = 0.0 if in_place else _copy_seconds(step.core_modes, target, sizes, False, p)
    if training and not (in_place or same_runs((*blocks, *made, *sums), step.core_modes, sizes)):
        seconds += _copy_seconds(target, step.core_modes, sizes, False, p)
    return seconds


def same_runs(grouped, core_modes, sizes) -> bool:
    """Whether `grouped` and `core_modes` order the modes of size > 1 alike (then the permute
    between them is a view)."""
    big = [m for m in grouped if sizes[m] > 1]
    return big == [m for m in core_modes if sizes[m] > 1]


def _copy_seconds(source, target, sizes, training: bool, p: Precision) -> float:
    """Cost model of copying a tensor from physical order `source` to `target` (training:
    its gradient is copied back too)."""
    if source == target:
        return 0.0
    numel = prod(sizes[m] for m in source)
    chunk = 1  # the elements that move together: the innermost modes both orders share
    for a, b in zip(reversed(source), reversed(target), strict=True):
        if a != b:
            break
        chunk *= sizes[a]
    if chunk >= 4096:
        kind = "same"
    elif chunk >= 16:
        kind = "chunks"
    elif source[0] == target[0] == TOKEN and numel // sizes[TOKEN] <= 2**16:
        kind = "per token"
    else:
        kind = "across tokens"
    return (2 if training else 1) * (2 * p.element_bytes * numel / p.copy_rates[kind] + _CALL_SECONDS)


def _layouts(steps, program: Program, sizes: dict, training: bool, p: Precision,
             paths: int = 1) -> list[tuple[float, tuple[Matmul, ...]]]:
    """Physical orders for every matmul: the cheapest paths through the cost model, cheapest
    first (the `paths` cheapest kept per state; 1: the cheapest path alone).

    States are the activation's physical order between matmuls; from each, a matmul reads it in
    place if it can, else copies it to an order it can read; it writes any order whose groups are
    runs. The input is (T, *in_modes); the output must end as (T, *out_modes). The _BEAM
    cheapest states survive each matmul, so many-core programs plan in milliseconds.
    """
    start = (TOKEN, *program.in_modes)
    best = {start: [(0.0, ())]}  # order -> [(seconds, matmuls so far)], cheapest first
    for step in steps:
        g = groups(step)
        candidates = {}
        for source, (seconds, done) in ((s, path) for s, kept in best.items() for path in kept):
            read = _readable(source, g["blocks"], g["rows"], g["sums"], sizes)
            reads = [] if read is None else [(source, read, 0.0)]
            if read is None or (p.name == "half" and _layout(source, *read) != "BR"):
                # half precision also prices copies where it could read in place: the input's
                # gradient is written in the order the input is read (column-major: 1000x
                # slower), and half matmuls copy "M" operands themselves
                for order in _orders((g["blocks"], g["rows"], g["sums"]), source):
                    grouped = _readable(order, g["blocks"], g["rows"], g["sums"], sizes)
                    if grouped is not None and order != source:
                        reads.append((order, grouped, _copy_seconds(source, order, sizes, training, p)))
            for x_order, (blocks, rows, sums), copy in reads:
                for made in _made_orders(g["made"]):
                    for out_order in _group_orders((blocks, rows, made), sizes):
                        cost = (seconds + copy + _core_seconds(step, blocks, sums, made, sizes, training, p)
                                + _matmul_seconds(x_order, out_order, blocks, rows, sums, made, sizes,
                                                  training, p))
                        kept = candidates.setdefault(out_order, [])
                        if len(kept) < paths or cost < kept[-1][0]:
                            matmul = Matmul(step, source, x_order, out_order, blocks, rows, sums, made)
                            kept.append((cost, (*done, matmul)))
                            kept.sort(key=lambda path: path[0])
                            del kept[paths:]
        best = dict(sorted(candidates.items(), key=lambda item: item[1][0][0])[:_BEAM])
    end = (TOKEN, *program.out_modes)
    return sorted(((cost + _copy_seconds(order, end, sizes, training, p), done)
                   for order, kept in best.items() for cost, done in kept), key=lambda path: path[0])


def _made_orders(made) -> list[tuple[str, ...]]:
    """Orders to try for the modes a matmul makes: all of them for up to 3 modes."""
    return list(permutations(made)) if len(made) <= 3 else [tuple(made)]


def _show(modes) -> str:
    return "(" + ",".join("T" if m == TOKEN else m for m in modes) + ")"
