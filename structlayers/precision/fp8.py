"""FP8 simulation at every core contraction, with per-tensor scaling.

For each contraction y = einsum(x, core) the policy quantizes the activation x and the core to
E4M3 (by default) in the forward pass and the gradient dL/dy to E5M2 in the backward pass, each
with its own TensorScaler. The backward einsums then see exactly the operands an FP8 GEMM would:
the quantized x and core (saved by the forward) and the quantized gradient.
"""

from math import prod

import torch

from .formats import MAX_MARGIN, get_format
from .fp8_gemm import fp8_contract, gemm_plan
from .policy import Policy, map_gradient
from .scaler import SCALINGS, TensorScaler

KINDS = ("activation", "weight", "gradient")
GEMMS = ("auto", "simulate", "scaled_mm")


class FP8(Policy):
    """FP8(forward="e4m3", backward="e5m2", scaling="dynamic", margin=0, history=16, record=True,
    gemm="auto").

    scaling: "dynamic", "delayed" (amax history of `history` steps) or "none" (naive casting).
    margin: extra powers of two of headroom below the format's max (0..16).
    record: keep every (amax, scale) per tensor for `scale_history` / `plot_scales`.
    gemm: "simulate" (quantize, then a full-precision einsum: exact FP8 rounding anywhere),
    "scaled_mm" (real FP8 GEMMs, torch._scaled_mm, for every contraction that is one GEMM; block
    contractions of Monarch/BTT are simulated) or "auto" (scaled_mm on GPUs with FP8 tensor cores,
    compute capability 8.9+, where the GEMM's dims are multiples of 16; else simulate).
    """

    def __init__(self, forward: str = "e4m3", backward: str = "e5m2", scaling: str = "dynamic",
                 margin: int = 0, history: int = 16, record: bool = True, gemm: str = "auto"):
        self.forward_format, self.backward_format = get_format(forward), get_format(backward)
        if scaling not in SCALINGS:
            raise ValueError(f"scaling must be one of {SCALINGS}, got {scaling!r}")
        if isinstance(margin, bool) or not isinstance(margin, int) or not 0 <= margin <= MAX_MARGIN:
            raise ValueError(f"margin must be an int in 0..{MAX_MARGIN}, got {margin!r}")
        if isinstance(history, bool) or not isinstance(history, int) or history < 1:
            raise ValueError(f"history must be a positive int, got {history!r}")
        if not isinstance(record, bool):
            raise TypeError(f"record must be a bool, got {record!r}")
        if gemm not in GEMMS:
            raise ValueError(f"gemm must be one of {GEMMS}, got {gemm!r}")
        self.scaling, self.margin, self.history, self.record = scaling, margin, history, record
        self.gemm = gemm
        self.scalers = {}  # (core name, kind) -> TensorScaler

    def settings(self) -> dict:
        return {"forward": self.forward_format.name, "backward": self.backward_format.name,
                "scaling": self.scaling, "margin": self.margin, "history": self.history,
                "record": self.record, "gemm": self.gemm}

    def scaler(self, core: str, kind: str) -> TensorScaler:
        if (core, kind) not in self.scalers:
            fmt = self.backward_format if kind == "gradient" else self.forward_format
            self.scalers[core, kind] = TensorScaler(fmt, self.scaling, self.margin, self.history,
                                                    self.record)
        return self.scalers[core, kind]

    # The scalers' state lives in Python (and is appended to every call), which torch.compile
    # cannot capture: compiled models run this contraction eagerly (a graph break), correctly.
    @torch.compiler.disable
    def contract(self, x, core, step):
        plan = gemm_plan(step) if self.gemm != "simulate" else None
        if plan is not None and (self.gemm == "scaled_mm" or _fp8_tensor_cores(x, plan, x.shape[0])):
            return fp8_contract(x, core, plan, *(self.scaler(step.core, kind) for kind in KINDS))
        x = _StraightThrough.apply(x, self.scaler(step.core, "activation"))
        core = _StraightThrough.apply(core, self.scaler(step.core, "weight"))
        y = torch.einsum(step.equation, x, core)
        return map_gradient(y, self.scaler(step.core, "gradient"))  # gradients to E5M2


def _fp8_tensor_cores(x, plan, tokens) -> bool:
    """Whether torch._scaled_mm runs this GEMM on FP8 tensor cores (sm_89+, dims % 16 == 0)."""
    if not x.is_cuda or torch.cuda.get_device_capability(x.device) < (8, 9):
        return False
    rows = tokens * prod(plan.carried)
    return rows % 16 == 0 and plan.k % 16 == 0 and plan.n % 16 == 0


class _StraightThrough(torch.autograd.Function):
    """Quantizes in the forward pass; the gradient passes through unchanged (STE)."""

    @staticmethod
    def forward(ctx, t, scaler):
        return scaler(t)

    @staticmethod
    def backward(ctx, grad):
        return grad, None
