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

from . import buffers
from .plan import TOKEN, Plan
from .program import run

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


def _core_operand(core, step, mm) -> torch.Tensor:
    """The core as (b, k, n) in the matmul's group orders (a copy when it needs reordering)."""
    core = core.view(step.core_shape)
    target = (*mm.blocks, *mm.sums, *mm.made)
    sizes = dict(step.sizes)
    return core.permute(_perm(step.core_modes, target)).reshape(
        prod(sizes[m] for m in mm.blocks), prod(sizes[m] for m in mm.sums),
        prod(sizes[m] for m in mm.made))


def _forward(plan: Plan, x: torch.Tensor, cores, save: bool):
    """y (T, prod out) and, if `save`, what the backward needs: per matmul (x3, w3)."""
    tokens = x.shape[0]
    sizes = dict(plan.program.sizes) | {TOKEN: tokens}
    h, order, saved = x.view(_shape((TOKEN, *plan.program.in_modes), sizes)), None, []
    order = (TOKEN, *plan.program.in_modes)
    for mm, core in zip(plan.matmuls, cores, strict=True):
        h = _copy_to(h, order, mm.x_order, sizes)
        x3 = _as_bmm(h, mm.x_order, (mm.blocks, mm.rows, mm.sums), sizes)
        w3 = _core_operand(core, mm.step, mm)
        out = buffers.empty(_shape(mm.out_order, sizes), h.dtype, h.device)
        torch.bmm(x3, w3, out=_as_bmm(out, mm.out_order, (mm.blocks, mm.rows, mm.made), sizes))
        if save:
            saved.append((x3, w3))
        h, order = out, mm.out_order
    y = _copy_to(h, order, plan.out_order, sizes)
    return y.view(tokens, -1), saved


class _PlannedContraction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, plan, x, *cores):
        y, saved = _forward(plan, x, cores, save=True)
        ctx.plan, ctx.tokens = plan, x.shape[0]
        ctx.shapes = [core.shape for core in cores]
        ctx.save_for_backward(*(t for pair in saved for t in pair))
        return y

    @staticmethod
    def backward(ctx, grad):
        plan, tokens = ctx.plan, ctx.tokens
        sizes = dict(plan.program.sizes) | {TOKEN: tokens}
        saved = ctx.saved_tensors
        needs_core = ctx.needs_input_grad[2:]
        # the input gradient of matmul j is needed if x or any core before j needs a gradient
        needs_input = [ctx.needs_input_grad[1] or any(needs_core[:j]) for j in range(len(needs_core))]
        g = grad.contiguous().view(_shape(plan.out_order, sizes))
        g = _copy_to(g, plan.out_order, plan.matmuls[-1].out_order, sizes)
        grads = [None] * len(plan.matmuls)
        for j in reversed(range(len(plan.matmuls))):
            mm, (x3, w3) = plan.matmuls[j], saved[2 * j: 2 * j + 2]
            g3 = _as_bmm(g, mm.out_order, (mm.blocks, mm.rows, mm.made), sizes)
            if needs_core[j]:
                dw = torch.bmm(x3.transpose(1, 2), g3)  # (b, k, n)
                grouped = (*mm.blocks, *mm.sums, *mm.made)
                dw = dw.view(_shape(grouped, sizes)).permute(_perm(grouped, mm.step.core_modes))
                grads[j] = dw.reshape(ctx.shapes[j])
            if not needs_input[j]:
                g = None
                break
            dx = buffers.empty(_shape(mm.x_order, sizes), g.dtype, g.device)
            torch.bmm(g3, w3.transpose(1, 2), out=_as_bmm(dx, mm.x_order, (mm.blocks, mm.rows, mm.sums),
                                                            sizes))
            g = _copy_to(dx, mm.x_order, mm.source, sizes)
        grad_x = g.view(tokens, -1) if ctx.needs_input_grad[1] else None
        return None, grad_x, *grads


def run_plan(plan: Plan, x: torch.Tensor, cores: dict) -> torch.Tensor:
    """x (T, prod(in_shape)) -> (T, prod(out sizes)) through `plan`; cores: name -> parameter."""
    if x.shape[0] == 0:  # no tokens: the reference gives the empty output and zero gradients
        return run(plan.program, x, cores)
    operands = [cores[mm.step.core] for mm in plan.matmuls]
    device = x.device.type
    if torch.is_autocast_enabled(device):  # what autocast does to the einsum path's matmuls
        dtype = torch.get_autocast_dtype(device)
        x, operands = x.to(dtype), [c.to(dtype) for c in operands]
    dtype = x.dtype
    if any(c.dtype != dtype for c in operands):
        raise TypeError(f"input dtype {dtype} does not match the cores' {operands[0].dtype}: "
                        f"convert the layer (layer.to({dtype})) or the input")
    if dtype in HALF and device == "cpu" and _half_is_slow(dtype):
        x, operands = x.float(), [c.float() for c in operands]
    x = x.contiguous()
    with torch.autocast(device, enabled=False):
        if torch.is_grad_enabled() and (x.requires_grad or any(c.requires_grad for c in operands)):
            y = _PlannedContraction.apply(plan, x, *operands)
        else:
            y = _forward(plan, x, operands, save=False)[0]
    return y.to(dtype)


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
