"""Run the Triton kernels under Triton's interpreter on CPU tensors.

Set before anything imports structlayers.kernels (triton.jit reads it when a kernel is defined).
An explicit TRITON_INTERPRET=0 (on a GPU machine) keeps the compiled kernels.

`python -m pytest` puts the repository root on sys.path, where our top-level kernels/ and
search/ folders would shadow the PyPI packages of those names (transformers imports Hugging
Face's `kernels`). structlayers is installed, so the root is not needed there: drop it.
"""

import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _ROOT]
