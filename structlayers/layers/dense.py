"""Dense: the baseline, y = x W^T + b with W (out, in), exactly nn.Linear's parameters."""

from ..base import StructuredLinear
from ..program import make_program, make_step


class Dense(StructuredLinear):
    """weight: (out, in). One step: (T, i) x (o, i) -> (T, o)."""

    name = "dense"

    def __init__(self, in_features, out_features, bias=True, device=None, dtype=None):
        super().__init__(in_features, out_features)
        sizes = {"i": self.in_features, "o": self.out_features}
        step = make_step("weight", ("i",), ("o", "i"), ("o",), sizes)
        self._build(make_program(("i",), [step], sizes), {"weight": (sizes["o"], sizes["i"])},
                    sizes["i"], sizes["o"], bias, device, dtype)

    def _project(self, weight):
        return {"weight": weight}
