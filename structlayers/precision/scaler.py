"""The scale state of one tensor (e.g. the activation entering one core's contraction)."""

import torch

from .formats import Format, quantize, scale_from_amax

SCALINGS = ("dynamic", "delayed", "none")


class TensorScaler:
    """Quantizes one tensor per call at a per-tensor scale, and keeps its state.

    scaling: "dynamic" (scale from this tensor's amax), "delayed" (from the max of the last
    `history` amaxes, then this one is added: the recipe that needs no extra pass on hardware),
    or "none" (scale 1: naive casting). A scale is only ever replaced by one computed from a
    positive, finite amax, so a batch with NaN/inf (or all zeros) keeps the previous scale.
    Everything stays on the tensor's device; nothing syncs with the host.
    """

    def __init__(self, fmt: Format, scaling: str, margin: int, history: int, record: bool):
        self.fmt, self.scaling, self.margin, self.record = fmt, scaling, margin, record
        self.amax_history = None  # (history,) of past amaxes, newest first
        self.history_len = history
        self.scale = None  # the scale used by the last call
        self.records = []  # (amax, scale) tensors, one pair per call

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x quantized at the updated scale, in x's dtype."""
        return quantize(x, self.update(x), self.fmt)

    def update(self, x: torch.Tensor) -> torch.Tensor:
        """Take x's amax into the state and return the scale to quantize x with (a 0-d tensor)."""
        if self.scaling == "none":
            return torch.ones((), device=x.device)
        amax = x.detach().abs().amax().float() if x.numel() else x.new_zeros((), dtype=torch.float32)
        finite_amax = torch.where(torch.isfinite(amax), amax, torch.zeros_like(amax))
        if self.scaling == "delayed":
            if self.amax_history is None:  # first call: nothing to delay with yet
                self.amax_history = finite_amax.expand(self.history_len).clone()
            self.amax_history = self.amax_history.to(amax.device)
            basis = self.amax_history.max()
            self.amax_history = torch.cat([finite_amax[None], self.amax_history[:-1]])
        else:
            basis = amax
        previous = self.scale.to(amax.device) if self.scale is not None else torch.ones_like(amax)
        usable = torch.isfinite(basis) & (basis > 0)
        self.scale = torch.where(usable, scale_from_amax(torch.where(usable, basis, 1.0), self.fmt,
                                                         self.margin), previous)
        if self.record:
            self.records.append((amax, self.scale))
        return self.scale
