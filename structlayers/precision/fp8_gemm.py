"""Real FP8 GEMMs (torch._scaled_mm) for the core contractions that are one matrix product.

A step with no block modes (dense, low-rank, Kronecker, TT, Tucker steps; not Monarch/BTT) is a
single GEMM once the activation's carried modes are folded into the rows:
    x (T, *x_modes) -> (T * carried, K),  core -> (K, N),  (T * carried, N) -> (T, *out_modes)
Forward:  y  = scaled_mm(x8, w8)               x8, w8 in E4M3
Backward: dx = scaled_mm(g8, w8^T), dw = scaled_mm(x8^T, g8)   g8 in E5M2
with the per-tensor scales of the FP8 policy's scalers; FP8 x FP8 products accumulate in fp32.
"""

from dataclasses import dataclass
from functools import lru_cache
from math import prod

import torch

from .formats import to_fp8


@dataclass(frozen=True)
class GemmPlan:
    x_perm: tuple[int, ...]  # (tokens, carried, summed) order of x's dims
    core_perm: tuple[int, ...]  # (summed, produced) order of the core's dims
    out_perm: tuple[int, ...]  # from (tokens, carried, produced) to (tokens, *out_modes)
    carried: tuple[int, ...]
    produced: tuple[int, ...]
    k: int
    n: int


@lru_cache(maxsize=512)
def gemm_plan(step) -> GemmPlan | None:
    """How `step` is one GEMM, or None when it has block modes (a batched GEMM)."""
    if any(m in step.x_modes and m in step.out_modes for m in step.core_modes):
        return None
    sizes = dict(step.sizes)
    carried = [m for m in step.x_modes if m not in step.core_modes]
    summed = [m for m in step.x_modes if m in step.core_modes]
    produced = [m for m in step.core_modes if m not in step.x_modes]
    made = [*carried, *produced]
    return GemmPlan(
        x_perm=(0, *(1 + step.x_modes.index(m) for m in (*carried, *summed))),
        core_perm=tuple(step.core_modes.index(m) for m in (*summed, *produced)),
        out_perm=(0, *(1 + made.index(m) for m in step.out_modes)),
        carried=tuple(sizes[m] for m in carried), produced=tuple(sizes[m] for m in produced),
        k=prod(sizes[m] for m in summed), n=prod(sizes[m] for m in produced))


def fp8_contract(x, core, plan: GemmPlan, activation, weight, gradient):
    """The step's contraction as FP8 GEMMs; activation/weight/gradient are TensorScalers."""
    tokens = x.shape[0]
    x2 = x.permute(plan.x_perm).reshape(-1, plan.k)
    w2 = core.permute(plan.core_perm).reshape(plan.k, plan.n)
    y2 = _FP8Matmul.apply(x2, w2, activation, weight, gradient)
    return y2.view(tokens, *plan.carried, *plan.produced).permute(plan.out_perm)


class _FP8Matmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, activation, weight, gradient):
        sx, sw = activation.update(x), weight.update(w)
        x8, w8 = to_fp8(x, sx, activation.fmt), to_fp8(w, sw, weight.fmt)
        ctx.save_for_backward(x8, w8, sx, sw)
        ctx.gradient, ctx.dtypes = gradient, (x.dtype, w.dtype)
        return _scaled_mm(x8, w8, sx, sw, x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x8, w8, sx, sw = ctx.saved_tensors
        sg = ctx.gradient.update(grad)
        g8 = to_fp8(grad, sg, ctx.gradient.fmt)
        grad_x = _scaled_mm(g8, w8.t(), sg, sw, ctx.dtypes[0]) if ctx.needs_input_grad[0] else None
        grad_w = _scaled_mm(x8.t(), g8, sx, sg, ctx.dtypes[1]) if ctx.needs_input_grad[1] else None
        return grad_x, grad_w, None, None, None


def _scaled_mm(a8, b8, scale_a, scale_b, out_dtype):
    """(a8 / scale_a) @ (b8 / scale_b) with fp32 accumulation; a row-major, b column-major."""
    out = out_dtype if out_dtype in (torch.float32, torch.bfloat16, torch.float16) else torch.float32
    y = torch._scaled_mm(a8.contiguous(), b8.t().contiguous().t(), scale_a=scale_a.reciprocal().float(),
                         scale_b=scale_b.reciprocal().float(), out_dtype=out)
    return y.to(out_dtype)
