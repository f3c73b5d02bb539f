"""Unit scaling (Blake et al. 2023) for every core contraction.

Cores are initialised with std 1, and each contraction y = einsum(x, core) gets its own scales:
    forward      y       = alpha   * einsum(x, core)      alpha   = 1 / sqrt(fan_in)
    grad input   dL/dx   = beta_x  * einsum(dL/dy, core)  beta_x  = 1 / sqrt(fan_out)
    grad core    dL/dw   = beta_w  * einsum(x, dL/dy)     beta_w  = 1 / sqrt(terms summed)
(fan_in / fan_out: the sizes the core sums / produces, as for muP; the core's gradient sums over
the tokens and every mode the core is shared across). With unit-variance inputs, activations,
input gradients and core gradients all start at about unit variance: the range FP8/FP16 handle.
The gradients are the true ones up to a positive per-core factor, which Adam does not see.
"""

from math import sqrt

import torch

from .policy import Policy, map_gradient

INITS = ("unit", "preserve")


class UnitScaled(Policy):
    """UnitScaled(init="unit"): when applied, cores get std 1 ("unit"), or are rescaled so the
    layer computes the same function as before ("preserve": for pretrained weights)."""

    def __init__(self, init: str = "unit"):
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        self.init = init

    def settings(self) -> dict:
        return {"init": self.init}

    @torch.no_grad()
    def prepare_(self, layer):
        for _, core, step in layer.core_steps:
            if self.init == "unit":
                core.normal_(0.0, 1.0)
            else:
                core.mul_(sqrt(step.fan_in))  # undoes alpha: same map, unit-scaled parameters

    def contract(self, x, core, step):
        alpha, beta_x = 1 / sqrt(step.fan_in), 1 / sqrt(step.fan_out)
        shared = [m for m in (*step.x_modes, *step.out_modes) if m not in step.core_modes]
        beta_w = 1 / sqrt(max(1, x.shape[0] * step.size(set(shared))))
        x = map_gradient(x, lambda grad: grad * (beta_x / alpha))
        core = map_gradient(core, lambda grad: grad * (beta_w / alpha))
        return alpha * torch.einsum(step.equation, x, core)
