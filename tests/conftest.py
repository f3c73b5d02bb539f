"""Run the Triton kernels under Triton's interpreter on CPU tensors.

Set before anything imports structlayers.kernels (triton.jit reads it when a kernel is defined).
An explicit TRITON_INTERPRET=0 (on a GPU machine) keeps the compiled kernels.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
