"""Low-precision policies applied at every core contraction (`program.contract`).

    sl.precision.apply(model, sl.precision.FP8())          # FP8 simulation, dynamic scaling
    sl.precision.apply(model, sl.precision.UnitScaled())   # unit scaling (cores re-initialised)
    sl.precision.plot_scales(model, "scales.png")          # scale distributions over training
"""

from .apply import apply
from .formats import FORMATS, quantize, scale_from_amax
from .fp8 import FP8
from .plot import plot_scales, scale_history
from .policy import Policy
from .unit_scaling import UnitScaled

__all__ = ["FORMATS", "FP8", "Policy", "UnitScaled", "apply", "plot_scales", "quantize",
           "scale_from_amax", "scale_history"]
