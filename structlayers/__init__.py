"""structlayers: tensor-network and structured-matrix layers that replace nn.Linear."""

from . import mup, precision
from .base import StructuredLinear
from .layers import BTT, TT, Dense, Kronecker, LowRank, Monarch, Tucker
from .program import backend
from .spec import STRUCTURES, build, parse_spec
from .surgery import structurize

__all__ = [
    "BTT", "STRUCTURES", "TT", "Dense", "Kronecker", "LowRank", "Monarch", "StructuredLinear",
    "Tucker", "backend", "build", "mup", "parse_spec", "precision", "structurize",
]
__version__ = "0.1.0"
