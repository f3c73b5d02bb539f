"""Put a precision policy on every structured layer of a model."""

from torch import nn

from ..base import StructuredLinear
from .policy import Policy


def apply(model: nn.Module, policy: Policy | None, linear: bool = False) -> list[str]:
    """Give every structured layer of `model` its own instance of `policy` (None removes them).

    linear=True first converts the plain nn.Linear layers to sl.Dense (same weights, exactly),
    so they are covered too. Returns the names of the layers the policy is on. Raises before
    changing anything if the policy is not a Policy or the model has no layer to apply it to.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if policy is not None and not isinstance(policy, Policy):
        raise TypeError(f"policy must be an sl.precision policy (FP8, UnitScaled) or None, "
                        f"got {type(policy).__name__}")
    if not isinstance(linear, bool):
        raise TypeError(f"linear must be a bool, got {linear!r}")
    plain = [n for n, m in model.named_modules() if type(m) is nn.Linear] if linear else []
    if not plain and not any(isinstance(m, StructuredLinear) for m in model.modules()):
        hint = "" if linear else " (pass linear=True to convert its nn.Linear layers)"
        raise ValueError(f"model has no structured layer to apply a precision policy to{hint}")
    if plain:
        from ..surgery import structurize

        structurize(model, "dense", include=lambda name, module: type(module) is nn.Linear,
                    project=True)
    names = []
    for name, module in model.named_modules():
        if isinstance(module, StructuredLinear):
            module.precision = None if policy is None else policy.for_layer(name)
            if policy is not None:
                module.precision.prepare_(module)
            names.append(name)
    return names
