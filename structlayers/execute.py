"""Run a `Plan` (plan.py): forward, a custom backward, and an inference path that saves nothing.

Every matmul is one `torch.bmm` on views of contiguous buffers (see `Matmul`), written into a
buffer allocated in the order the next matmul reads. The backward runs, per matmul, at most its
two matmuls in the same layouts (the core's gradient needs no copy of the activation, the input's
gradient is written in the order the forward read it) and skips what nobody needs: frozen cores
and inputs without grad, and the input gradient of the first matmul when x needs none.
"""

from functools import lru_cache
from math import prod

import torch
import torch.nn.functional as F

from . import buffers, tune
from .plan import TOKEN, Plan, make_plan, same_runs
from .program import Program, current_backend, dense, run

HALF = (torch.bfloat16, torch.float16)


def _shape(order, sizes) -> list[int]:
    return [sizes[m] for m in order]


def _perm(source, target) -> list[int]:
    """Dims of a tensor in order `source` that put it in order `target` (for permute)."""
    where = {m: k for k, m in enumerate(source)}
    return [where[m] for m in target]


def _as_bmm(buffer, order, parts, sizes) -> torch.Tensor:
    """A view (b, m, n) of a contiguous buffer in physical `order`, the parts being runs of it."""
    flat = buffer.permute(_perm(order, [m for p in parts for m in p]))
    return flat.view([prod(sizes[m] for m in p) for p in parts])


def _copy_to(h, source, target, sizes) -> torch.Tensor:
    if source == target:
        return h
    out = buffers.empty(_shape(target, sizes), h.dtype, h.device)
    out.copy_(h.permute(_perm(source, target)))
    return out


def _batch_major(t: torch.Tensor) -> torch.Tensor:
    """t (b, m, k) itself if each block is one contiguous-ish matrix (blocks outermost), else a
    copy into a pooled buffer: torch's half-precision CPU bmm copies such an operand itself, into
    a fresh buffer (page faults; plan.py prices this copy)."""
    b, m, k = t.shape
    if b == 1 or t.stride(0) >= m * k:
        return t
    out = buffers.empty(t.shape, t.dtype, t.device)
    out.copy_(t)
    return out


def _core_operand(core, step, mm) -> torch.Tensor:
    """The core as (b, k, n) in the matmul's group orders (a copy when it needs reordering)."""
    core = core.view(step.core_shape)
    target = (*mm.blocks, *mm.sums, *mm.made)
    sizes = dict(step.sizes)
    return core.permute(_perm(step.core_modes, target)).reshape(
        prod(sizes[m] for m in mm.blocks), prod(sizes[m] for m in mm.sums),
        prod(sizes[m] for m in mm.made))


def _forward(plan: Plan, x: torch.Tensor, bias, cores, save: bool):
    """y (T, prod out) (+ bias, added in place) and, if `save`, what the backward needs: per
    matmul (x3, w3)."""
    tokens = x.shape[0]
    sizes = dict(plan.program.sizes) | {TOKEN: tokens}
    h, order, saved = x.view(_shape((TOKEN, *plan.program.in_modes), sizes)), None, []
    order = (TOKEN, *plan.program.in_modes)
    fused_bias = None
    for j, (mm, core) in enumerate(zip(plan.matmuls, cores, strict=True)):
        h = _copy_to(h, order, mm.x_order, sizes)
        x3 = _as_bmm(h, mm.x_order, (mm.blocks, mm.rows, mm.sums), sizes)
        if plan.precision == "half":
            x3 = _batch_major(x3)
        w3 = _core_operand(core, mm.step, mm)
        out = buffers.empty(_shape(mm.out_order, sizes), h.dtype, h.device)
        out3 = _as_bmm(out, mm.out_order, (mm.blocks, mm.rows, mm.made), sizes)
        if j == len(plan.matmuls) - 1 and plan.precision == "half" and bias is not None:
            fused_bias = _bias_operand(bias, mm, plan, sizes)
        if fused_bias is not None:
            torch.baddbmm(fused_bias, x3, w3, out=out3)
        else:
            torch.bmm(x3, w3, out=out3)
        if save:
            saved.append((x3, w3))
        h, order = out, mm.out_order
    y = _copy_to(h, order, plan.out_order, sizes).view(tokens, -1)
    if bias is not None and fused_bias is None:  # into the plan's own buffer: a fresh (T, out)
        y.add_(bias)                               # sum costs page faults
    return y, saved


def _bias_operand(bias, mm, plan: Plan, sizes) -> torch.Tensor | None:
    """The bias as a broadcast (b, 1, n) operand of the last matmul, where its output is the
    plan's output and the rows are the tokens alone; else None (added afterwards). In half
    precision on CPU, oneDNN adds it inside the matmul: 0.3 ms against 1.2-3 ms for a separate
    add_ over a (2048, 4096) bf16 output."""
    if mm.out_order != plan.out_order or mm.rows != (TOKEN,):
        return None
    full = bias.view(1, *_shape(plan.program.out_modes, sizes))  # (1, *out modes)
    order = (TOKEN, *plan.program.out_modes)
    grouped = full.permute(_perm(order, (*mm.blocks, TOKEN, *mm.made)))
    return grouped.reshape(prod(sizes[m] for m in mm.blocks), 1, prod(sizes[m] for m in mm.made))


def _core_grad(x3, g3, mm, sizes) -> torch.Tensor:
    """The core's gradient in the core's own mode order: x3^T @ g3 (b, k, n), or g3^T @ x3
    (b, n, k) when the core stores its fan-out before its fan-in (nn.Linear's (out, in)), so that
    the product is written in place instead of transposed by a copy afterwards."""
    made_first = (*mm.blocks, *mm.made, *mm.sums)
    if same_runs(made_first, mm.step.core_modes, sizes):
        dw, grouped = torch.bmm(g3.transpose(1, 2), x3), made_first
    else:
        dw, grouped = torch.bmm(x3.transpose(1, 2), g3), (*mm.blocks, *mm.sums, *mm.made)
    return dw.view(_shape(grouped, sizes)).permute(_perm(grouped, mm.step.core_modes))


class _PlannedContraction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, plan, x, bias, *cores):
        y, saved = _forward(plan, x, bias, cores, save=True)
        ctx.plan, ctx.tokens = plan, x.shape[0]
        ctx.shapes = [core.shape for core in cores]
        ctx.save_for_backward(*(t for pair in saved for t in pair))
        return y

    @staticmethod
    def backward(ctx, grad):
        plan, tokens = ctx.plan, ctx.tokens
        sizes = dict(plan.program.sizes) | {TOKEN: tokens}
        saved = ctx.saved_tensors
        needs_core = ctx.needs_input_grad[3:]
        # the input gradient of matmul j is needed if x or any core before j needs a gradient
        needs_input = [ctx.needs_input_grad[1] or any(needs_core[:j]) for j in range(len(needs_core))]
        grad_bias = grad.sum(0) if ctx.needs_input_grad[2] else None
        g = grad.contiguous().view(_shape(plan.out_order, sizes))
        g = _copy_to(g, plan.out_order, plan.matmuls[-1].out_order, sizes)
        grads = [None] * len(plan.matmuls)
        for j in reversed(range(len(plan.matmuls))):
            mm, (x3, w3) = plan.matmuls[j], saved[2 * j: 2 * j + 2]
            g3 = _as_bmm(g, mm.out_order, (mm.blocks, mm.rows, mm.made), sizes)
            if plan.precision == "half":
                g3 = _batch_major(g3)
            if needs_core[j]:
                grads[j] = _core_grad(x3, g3, mm, sizes).reshape(ctx.shapes[j])
            if not needs_input[j]:
                g = None
                break
            dx = buffers.empty(_shape(mm.x_order, sizes), g.dtype, g.device)
            torch.bmm(g3, w3.transpose(1, 2), out=_as_bmm(dx, mm.x_order, (mm.blocks, mm.rows, mm.sums),
                                                            sizes))
            g = _copy_to(dx, mm.x_order, mm.source, sizes)
        grad_x = g.view(tokens, -1) if ctx.needs_input_grad[1] else None
        return None, grad_x, grad_bias, *grads


def run_plan(program: Program, x: torch.Tensor, cores: dict, bias: torch.Tensor | None = None,
             training: bool = True) -> torch.Tensor:
    """x (T, prod(in_shape)) -> (T, prod(out sizes)) (+ bias, of the program's full output
    width) through the program's plan for T tokens and the dtype the matmuls run in (training:
    planned for forward+backward); cores: name -> parameter."""
    if x.shape[0] == 0:  # no tokens: the reference gives the empty output and zero gradients
        y = run(program, x, cores)
        return y if bias is None else y + bias.to(y.dtype)
    operands = [cores[step.core] for step in program.steps]
    device = x.device.type
    if torch.is_autocast_enabled(device):  # what autocast does to the einsum path's matmuls
        dtype = torch.get_autocast_dtype(device)
        x, operands = x.to(dtype), [c.to(dtype) for c in operands]
    if bias is not None:
        bias = bias.to(x.dtype)  # as nn.Linear's: under autocast in the autocast dtype
    dtype = x.dtype
    if any(c.dtype != dtype for c in operands):
        raise TypeError(f"input dtype {dtype} does not match the cores' {operands[0].dtype}: "
                        f"convert the layer (layer.to({dtype})) or the input")
    if dtype in HALF and device == "cpu" and _half_is_slow(dtype):
        x, operands = x.float(), [c.float() for c in operands]
        bias = None if bias is None else bias.float()
    # half on a CPU with native half matmuls: oneDNN's layouts differ from fp32's (see plan.py)
    precision = "half" if x.dtype in HALF and device == "cpu" else "float32"
    plan = make_plan(program, x.shape[0], training, precision)
    named = dict(zip((step.core for step in program.steps), operands, strict=True))
    allow_dense = current_backend() == "auto"
    plan, materialise = tune.choose(plan, _runner(plan, x, named, bias), allow_dense, x.device)
    operands = [named[mm.step.core] for mm in plan.matmuls]
    y = _materialised(plan, x, operands, bias) if materialise else _planned(plan, x, operands, bias)
    return y.to(dtype)


def _runner(plan: Plan, x, cores: dict, bias):
    """run(candidate) for tune.choose: one forward (+ backward, for a training plan) of a
    candidate plan, or of to_dense() + F.linear for None, on detached copies of the call's
    tensors."""
    grad_y = []  # one output gradient for every run: a fresh one would page-fault each time

    def run(candidate: Plan | None) -> None:
        chosen = candidate or plan
        xs = x.detach().requires_grad_(x.requires_grad)
        cs = {n: c.detach().requires_grad_(c.requires_grad) for n, c in cores.items()}
        bs = None if bias is None else bias.detach().requires_grad_(bias.requires_grad)
        operands = [cs[mm.step.core] for mm in chosen.matmuls]
        path = _planned if candidate is not None else _materialised
        with torch.enable_grad() if chosen.training else torch.no_grad():
            y = path(chosen, xs, operands, bs)
            wants = [t for t in (xs, *operands, bs) if t is not None and t.requires_grad]
            if chosen.training and wants:
                if not grad_y:
                    grad_y.append(torch.ones_like(y))
                torch.autograd.grad(y, wants, grad_y[0])

    return run


def _materialised(plan: Plan, x, operands, bias) -> torch.Tensor:
    """A tiny layer: W from the cores (autograd through opt_einsum), one GEMM."""
    with torch.autocast(x.device.type, enabled=False):
        w = dense(plan.program, {mm.step.core: c for mm, c in zip(plan.matmuls, operands, strict=True)})
        return F.linear(x, w, bias)


def _planned(plan: Plan, x, operands, bias) -> torch.Tensor:
    x = x.contiguous()
    tensors = [x, *operands] + ([] if bias is None else [bias])
    with torch.autocast(x.device.type, enabled=False):
        if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
            return _PlannedContraction.apply(plan, x, bias, *operands)
        return _forward(plan, x, bias, operands, save=False)[0]


@lru_cache(maxsize=8)
def _half_is_slow(dtype) -> bool:
    """Whether this CPU's batched matmul in `dtype` is slower than in float32 (one measurement,
    cached): without AMX / AVX-512-BF16 torch emulates half-precision GEMMs at a few GFLOP/s,
    so the plan computes in float32 (exact products, fp32 accumulation) and rounds the output."""
    import time

    def seconds(dt):
        a, b = torch.randn(16, 256, 64, dtype=dt), torch.randn(16, 64, 64, dtype=dt)
        out = torch.empty(16, 256, 64, dtype=dt)
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            torch.bmm(a, b, out=out)
            best = min(best, time.perf_counter() - start)
        return best

    return seconds(dtype) > seconds(torch.float32)
