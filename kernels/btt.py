"""A 2-core BTT (Monarch when rank = 1) as one autograd op on the fused kernels.

    x:  (T, in_features)           read as (T, m1, m0), zero-padded up to m1*m0 features
    w0: (m1, m0, n0*r)             block m1 maps m0 -> (n0, r)
    w1: (n0, m1*r, n1)             block n0 maps (m1, r) -> n1
    y:  (T, out_features)          the first out_features of (T, n0, n1), plus the bias
    y[t, n0, n1] = sum_{m1, r} w1[n0, (m1, r), n1] * sum_{m0} w0[m1, m0, (n0, r)] * x[t, m1, m0]

Passes over memory:
    forward   one fused kernel: reads x, writes y (and h (T, n0, m1*r) when w1 needs a grad)
    backward  one fused kernel for grad x, the same contraction run backwards on grad y with the
              cores' inner dims swapped (strides, no copies), writing grad h (T, m1, n0*r);
              then one token reduction per core: grad w0 from (x, grad h), grad w1 from (h, grad y)
              (with grad bias, the column sums of grad y, in the same pass).
"""

import torch
from torch import Tensor

from .block_grad import block_grad
from .tuning import DTYPES, INTERPRET
from .two_core import inner_swapped, two_core


# Custom ops, so torch.compile treats the kernels as opaque calls (no graph break, no tracing
# into Triton's launcher or interpreter); autograd is registered on the forward op.
@torch.library.custom_op("structlayers::btt_forward", mutates_args=())
def _forward(x: Tensor, w0: Tensor, w1: Tensor, bias: Tensor | None, rank: int, out_features: int,
             keep_h: bool) -> tuple[Tensor, Tensor]:
    """y (T, out_features) and h (T, n0, m1*r), or an empty h unless keep_h."""
    dims = (w0.shape[0], w0.shape[1], w1.shape[0], rank, w1.shape[2])  # (P, Q, S, R, N) = (m1, m0, n0, r, n1)
    y, h = two_core(x, w0, w0.stride(), w1, w1.stride(), dims, out_features, store_h=keep_h, bias=bias)
    return y, (h if keep_h else x.new_empty(0))


@_forward.register_fake
def _(x, w0, w1, bias, rank, out_features, keep_h):
    h_shape = (x.shape[0], w1.shape[0], w0.shape[0] * rank) if keep_h else (0,)
    return x.new_empty(x.shape[0], out_features), x.new_empty(h_shape)


@torch.library.custom_op("structlayers::btt_backward", mutates_args=())
def _backward(grad_y: Tensor, x: Tensor, w0: Tensor, w1: Tensor, h: Tensor, rank: int,
              need_x: bool, need_w0: bool, need_w1: bool,
              need_bias: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """grad x, grad w0, grad w1, grad bias (empty where not needed)."""
    m1, m0, n0, n1, r = w0.shape[0], w0.shape[1], w1.shape[0], w1.shape[2], rank
    grad_x, grad_w0, grad_w1, grad_bias = (x.new_empty(0) for _ in range(4))
    if need_x or need_w0:
        # grad h[t, m1, n0, r] = sum_n1 grad_y[t, n0, n1] w1[n0, (m1, r), n1]
        # grad x[t, m1, m0]    = sum_{n0, r} grad h[t, m1, n0, r] w0[m1, m0, (n0, r)]
        v, grad_h = two_core(grad_y, w1, inner_swapped(w1), w0, inner_swapped(w0), (n0, n1, m1, r, m0),
                             x.shape[1], store_v=need_x, store_h=need_w0)
        grad_x = v if need_x else grad_x
        if need_w0:
            grad_w0 = block_grad(x, grad_h.flatten(1), (m1, m0, n0 * r))
    if need_w1:  # grad bias = column sums of grad y, read in the same pass
        grad_w1, grad_bias = block_grad(h.flatten(1), grad_y, (n0, m1 * r, n1), sum_b=True)
    elif need_bias:
        grad_bias = grad_y.sum(0)
    return grad_x, grad_w0, grad_w1, grad_bias


@_backward.register_fake
def _(grad_y, x, w0, w1, h, rank, need_x, need_w0, need_w1, need_bias):
    def like(t, needed):
        return t.new_empty(t.shape) if needed else t.new_empty(0)

    return (like(x, need_x), like(w0, need_w0), like(w1, need_w1),
            grad_y.new_empty(grad_y.shape[1:]) if need_bias else grad_y.new_empty(0))


def _setup_context(ctx, inputs, output):
    x, w0, w1, _, rank, _, _ = inputs
    ctx.save_for_backward(x, w0, w1, output[1])
    ctx.rank = rank


def _autograd_backward(ctx, grad_y, _grad_h):
    x, w0, w1, h = ctx.saved_tensors
    needed = ctx.needs_input_grad[:4]  # x, w0, w1, bias
    grads = _backward(grad_y, x, w0, w1, h, ctx.rank, *needed)
    return (*(g if need else None for g, need in zip(grads, needed, strict=True)), None, None, None)


_forward.register_autograd(_autograd_backward, setup_context=_setup_context)


def btt_matmul(x: torch.Tensor, w0: torch.Tensor, w1: torch.Tensor, rank: int,
               out_features: int | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = the 2-core BTT map of x (see the module docstring) + bias, differentiable in x, w0,
    w1 and bias.

    x may have any strides; in_features = x.shape[1] <= m1*m0 (missing features are zero
    padding) and out_features <= n0*n1 (default n0*n1; extra outputs are cropped).
    bias: (out_features,), added in the kernel's epilogue.
    """
    _check(x, w0, w1, rank)
    n0, n1 = w1.shape[0], w1.shape[2]
    out_features = n0 * n1 if out_features is None else out_features
    if not 1 <= out_features <= n0 * n1:
        raise ValueError(f"out_features must be in 1..n0*n1 = {n0 * n1}, got {out_features}")
    if bias is not None:
        _check_bias(bias, x, out_features)
    keep_h = torch.is_grad_enabled() and w1.requires_grad
    return _forward(x, w0, w1, bias, rank, out_features, keep_h)[0]


def _check_bias(bias, x, out_features):
    if not isinstance(bias, torch.Tensor) or bias.dtype != x.dtype or bias.device != x.device:
        raise TypeError(f"bias must be a tensor of x's dtype and device ({x.dtype}, {x.device}), "
                        f"got {bias.dtype if isinstance(bias, torch.Tensor) else type(bias).__name__}")
    if bias.shape != (out_features,):
        raise ValueError(f"bias must have shape (out_features,) = ({out_features},), got {tuple(bias.shape)}")


def _check(x, w0, w1, rank):
    for name, t in (("x", x), ("w0", w0), ("w1", w1)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in DTYPES:
            raise TypeError(f"{name}: the fused BTT kernel supports {', '.join(map(str, DTYPES))}, "
                            f"got {t.dtype}; use sl.backend('torch') for other dtypes")
    if not (x.dtype == w0.dtype == w1.dtype):
        raise TypeError(f"x, w0 and w1 must share a dtype, got {x.dtype}, {w0.dtype}, {w1.dtype}")
    if not (x.device == w0.device == w1.device):
        raise ValueError(f"x, w0 and w1 must be on one device, got {x.device}, {w0.device}, {w1.device}")
    if x.device.type != "cuda" and not INTERPRET:
        raise RuntimeError(f"the fused BTT kernel runs on CUDA tensors (or on CPU under "
                           f"TRITON_INTERPRET=1, set before import), got a {x.device.type} tensor")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive int, got {rank!r}")
    if x.ndim != 2 or w0.ndim != 3 or w1.ndim != 3:
        raise ValueError(f"expected x (T, in), w0 (m1, m0, n0*r), w1 (n0, m1*r, n1), got shapes "
                         f"{tuple(x.shape)}, {tuple(w0.shape)}, {tuple(w1.shape)}")
    m1, m0, n0 = w0.shape[0], w0.shape[1], w1.shape[0]
    if w0.shape[2] != n0 * rank or w1.shape[1] != m1 * rank:
        raise ValueError(f"core shapes do not chain at rank {rank}: w0 {tuple(w0.shape)} must be "
                         f"(m1, m0, n0*r) and w1 {tuple(w1.shape)} (n0, m1*r, n1)")
    if not 1 <= x.shape[1] <= m1 * m0:
        raise ValueError(f"x has {x.shape[1]} features; the cores take 1..m1*m0 = {m1 * m0}")
