"""structlayers: tensor-network and structured-matrix layers that replace nn.Linear."""

from .base import StructuredLinear
from .layers import BTT, TT, Dense, Kronecker, LowRank, Monarch, Tucker
from .program import backend
from .spec import STRUCTURES, build, parse_spec
from .surgery import structurize
