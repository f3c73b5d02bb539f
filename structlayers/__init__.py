"""structlayers: tensor-network and structured-matrix layers that replace nn.Linear."""

from . import mup, precision, tune
from .base import StructuredLinear
from .checkpoint import load, load_plan, save, save_plan
from .hf import from_pretrained, save_pretrained
from .layers import BTT, TT, Dense, Kronecker, LowRank, Monarch, Tucker
from .linear_like import register_linear_like, unregister_linear_like
from .program import backend
from .spec import STRUCTURES, build, parse_spec
from .surgery import plan_of, restructure, structurize

__all__ = [
    "BTT", "STRUCTURES", "TT", "Dense", "Kronecker", "LowRank", "Monarch", "StructuredLinear",
    "Tucker", "backend", "build", "from_pretrained", "load", "load_plan", "mup", "parse_spec",
    "plan_of", "precision", "register_linear_like", "restructure", "save", "save_plan",
    "save_pretrained", "structurize", "tune", "unregister_linear_like",
]
__version__ = "0.1.0"


def __getattr__(name):  # sl.search without importing the search package at `import structlayers`
    if name == "search":
        import importlib

        return importlib.import_module(".search", __name__)
    raise AttributeError(f"module 'structlayers' has no attribute {name!r}")
