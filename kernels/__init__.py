"""Triton kernels for the fused Monarch/BTT contractions (installed as structlayers.kernels).

Importing this package imports Triton. Set TRITON_INTERPRET=1 before the import to run the
kernels on CPU tensors (Triton's interpreter: slow, exact, what CI tests).

    btt_matmul(x, w0, w1, rank)    the differentiable 2-core BTT/Monarch op
    two_core / block_grad          its forward and weight-gradient kernels
    btt_dims(program)              whether a layer's program is one the kernels fuse
"""

from .block_grad import block_grad
from .btt import btt_matmul
from .dispatch import btt_dims, fused_forward
from .tuning import DTYPES, INTERPRET
from .two_core import two_core

__all__ = ["DTYPES", "INTERPRET", "block_grad", "btt_dims", "btt_matmul", "fused_forward", "two_core"]
