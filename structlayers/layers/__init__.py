"""The structured linear layers, one per file."""

from .btt import BTT
from .dense import Dense
from .kronecker import Kronecker
from .lowrank import LowRank
from .monarch import Monarch
from .tt import TT
from .tucker import Tucker

__all__ = ["BTT", "TT", "Dense", "Kronecker", "LowRank", "Monarch", "Tucker"]
