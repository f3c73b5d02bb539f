"""Linear-like modules: what `structurize` may replace, and how to read their W and b.

A module is linear-like when its exact type is registered here. Two are built in:
    torch.nn.Linear                   y = x W^T + b, weight (out, in)
    transformers.pytorch_utils.Conv1D y = x W + b,   weight (in, out)   (GPT-2's projections)
They are matched by qualified class name, so transformers is never imported for it.

Register any other module type (a subclass of nn.Linear included: subclasses are not matched on
their own, since their forward may not be x W^T + b):

    sl.register_linear_like(MyProj, weight=lambda m: m.w.T, bias=lambda m: m.b)

`call` says how the replacement is called when the module's forward is not plain y = f(x): the
module is then replaced by an `AdaptedLinear` holding the structured layer, whose forward is
call(layer, *args, **kwargs).
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .base import StructuredLinear


@dataclass(frozen=True)
class LinearLike:
    """How to read one module type as a linear map; weight(m) is (out, in), bias(m) (out,) or None."""

    weight: Callable[[nn.Module], torch.Tensor]
    bias: Callable[[nn.Module], torch.Tensor | None]
    call: Callable | None = None  # call(layer, *args, **kwargs) -> output; None: layer(x)


_REGISTRY: dict[str, LinearLike] = {
    "torch.nn.modules.linear.Linear": LinearLike(lambda m: m.weight, lambda m: m.bias),
    "transformers.pytorch_utils.Conv1D": LinearLike(lambda m: m.weight.t(), lambda m: m.bias),
}


def qualified_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def register_linear_like(cls: type | str, weight: Callable[[nn.Module], torch.Tensor],
                         bias: Callable[[nn.Module], torch.Tensor | None] | None = None,
                         call: Callable | None = None):
    """Declare modules of exactly type `cls` (a class or its qualified name) linear-like.

    weight(module) -> the (out_features, in_features) matrix of the map; bias(module) -> (out,)
    or None (bias=None: the module has none); call(layer, *args, **kwargs) -> what the module's
    forward returns, when that is not layer(x). Registering a type again replaces its entry.
    """
    key = _key(cls)
    for argument, value in (("weight", weight), ("bias", bias), ("call", call)):
        if value is not None and not callable(value):
            raise TypeError(f"{argument} must be a function of the module, got {type(value).__name__}")
    if weight is None:
        raise TypeError("weight must be a function module -> (out, in) tensor, got None")
    _REGISTRY[key] = LinearLike(weight, bias or (lambda module: None), call)


def unregister_linear_like(cls: type | str):
    key = _key(cls)
    if key not in _REGISTRY:
        raise KeyError(f"{key} is not registered as linear-like; registered: {sorted(_REGISTRY)}")
    del _REGISTRY[key]


def adapter_of(module: nn.Module) -> LinearLike | None:
    """The adapter of `module`'s exact type, or None (StructuredLinear layers are never linear-like)."""
    if isinstance(module, StructuredLinear | AdaptedLinear):
        return None
    return _REGISTRY.get(qualified_name(type(module)))


def read_linear(module: nn.Module, adapter: LinearLike) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight (out, in), bias (out,) or None) of a linear-like module, checked."""
    weight, bias = adapter.weight(module), adapter.bias(module)
    name = qualified_name(type(module))
    if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
        raise TypeError(f"the adapter of {name} returned a weight that is not a 2-D tensor: "
                        f"{type(weight).__name__} {getattr(weight, 'shape', '')}")
    if bias is not None and (not isinstance(bias, torch.Tensor) or bias.shape != weight.shape[:1]):
        raise TypeError(f"the adapter of {name} returned a bias of shape "
                        f"{tuple(getattr(bias, 'shape', ()))}, expected ({weight.shape[0]},)")
    return weight, bias


class AdaptedLinear(nn.Module):
    """A structured layer in place of a linear-like module whose forward is not y = f(x)."""

    def __init__(self, structured: StructuredLinear, call: Callable):
        super().__init__()
        self.structured = structured
        self._call = call

    def forward(self, *args, **kwargs):
        return self._call(self.structured, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"call={getattr(self._call, '__name__', self._call)!r}"


def _key(cls) -> str:
    if isinstance(cls, str):
        return cls
    if isinstance(cls, type) and issubclass(cls, nn.Module):
        return qualified_name(cls)
    raise TypeError(f"cls must be an nn.Module subclass or its qualified name, got {cls!r}")
