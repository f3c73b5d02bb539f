"""What a precision policy is: an object the layers call at every core contraction.

A layer holds its own policy instance (`layer.precision`); `program.contract` calls
`policy.contract(x, core, step)` instead of the plain einsum, for every core of the layer.
`apply` makes one instance per layer with `for_layer`, so per-core state is never shared.
"""

import torch


class Policy:
    """Base class. Subclasses implement `contract` and may keep per-core state."""

    layer_name = ""

    def contract(self, x: torch.Tensor, core: torch.Tensor, step) -> torch.Tensor:
        """(T, *step.x_modes) x core (*step.core_modes) -> (T, *step.out_modes)."""
        raise NotImplementedError

    def for_layer(self, name: str) -> "Policy":
        """A fresh instance with the same settings and no state, for the layer called `name`."""
        fresh = type(self)(**self.settings())
        fresh.layer_name = name
        return fresh

    def settings(self) -> dict:
        """The constructor arguments that rebuild this policy."""
        return {}

    def prepare_(self, layer) -> None:
        """Adjust a layer when the policy is applied to it (e.g. re-initialise its cores)."""

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.settings().items())
        return f"{type(self).__name__}({args})"


def map_gradient(t: torch.Tensor, fn) -> torch.Tensor:
    """t unchanged in the forward pass; its gradient replaced by fn(gradient) in the backward."""
    return _MapGradient.apply(t, fn)


class _MapGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, fn):
        ctx.fn = fn
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad):
        return ctx.fn(grad), None
