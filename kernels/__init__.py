"""Triton kernels for the fused Monarch/BTT contractions (installed as structlayers.kernels).

Importing this package imports Triton. Set TRITON_INTERPRET=1 before the import to run the
kernels on CPU tensors (Triton's interpreter: slow, exact, what CI tests).

    btt_matmul(x, w0, w1, rank)      the differentiable 2-core BTT/Monarch op (btt.py)
    two_core.two_core(...)           its fused forward / grad-input kernel (two_core.py)
    block_grad.block_grad(...)       its weight-gradient kernel (block_grad.py)
    btt_dims / fused_dims(program)   whether a layer's program is one the kernels fuse
    aot.compile_for_gpu(...)         compile for an H100 without one, and read its resources
"""

from .btt import btt_matmul
from .dispatch import btt_dims, fused_dims, fused_forward
from .tuning import DTYPES, INTERPRET

__all__ = ["DTYPES", "INTERPRET", "btt_dims", "btt_matmul", "fused_dims", "fused_forward"]
