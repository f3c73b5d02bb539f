"""Which programs the fused kernels compute, and the forward that runs one on them."""

import torch

from .btt import btt_matmul
from .tuning import DTYPES
from .two_core import MAX_RANK


def btt_dims(program) -> tuple[int, int, int, int, int] | None:
    """(m1, m0, n0, r, n1) when `program` is a 2-core BTT (Monarch included), else None.

    Read off the steps' modes, so any structure with this contraction pattern is fused:
        step 1: x (m1, m0)  x  core (m1, m0, n0[, r])  ->  (n0, m1[, r])
        step 2:               x  core (n0, m1[, r], n1) ->  (n0, n1)
    """
    if len(program.steps) != 2 or len(program.steps[0].x_modes) != 2:
        return None
    first, second = program.steps
    (p, q), (s, *rank) = first.x_modes, first.out_modes[:1] + first.out_modes[2:]
    if len(rank) > 1 or first.out_modes != (s, p, *rank) or first.core_modes != (p, q, s, *rank):
        return None
    n = second.out_modes[-1]
    if second.out_modes != (s, n) or second.core_modes != (s, p, *rank, n):
        return None
    sizes = dict(program.sizes)
    return sizes[p], sizes[q], sizes[s], sizes[rank[0]] if rank else 1, sizes[n]


def fused_dims(program) -> tuple[int, int, int, int, int] | None:
    """btt_dims(program) when the fused kernels compute this program (rank <= MAX_RANK), else None."""
    dims = btt_dims(program)
    return dims if dims is not None and dims[3] <= MAX_RANK else None


def fused_forward(program, x: torch.Tensor, forced: bool):
    """A function (x (T, in_features), cores, out_features, bias or None) -> y (T, out_features)
    running the fused kernel for `program`, or None where the torch path must run: programs without a fused
    kernel, and (unless `forced`, which lets btt_matmul raise a clear error) dtypes it lacks."""
    dims = fused_dims(program)
    if dims is None or (not forced and x.dtype not in DTYPES):
        return None
    m1, m0, n0, r, n1 = dims
    first, second = program.steps

    def forward(x, cores, out_features, bias):
        w0 = cores[first.core].reshape(m1, m0, n0 * r)
        w1 = cores[second.core].reshape(n0, m1 * r, n1)
        if torch.is_autocast_enabled(x.device.type):  # what autocast does to the torch path's einsum
            dtype = torch.get_autocast_dtype(x.device.type)
            x, w0, w1 = x.to(dtype), w0.to(dtype), w1.to(dtype)
        if bias is not None:
            bias = bias.to(x.dtype)
        return btt_matmul(x, w0, w1, r, out_features, bias)

    return forward
