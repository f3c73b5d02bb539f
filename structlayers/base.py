"""StructuredLinear: the common base of every layer, a drop-in replacement for nn.Linear.

A subclass only says which cores it has and which contraction `Program` runs them
(see program.py), and how to project a dense matrix onto its cores (`_project`). This base does
the rest: padding/cropping, leading batch dims, bias, `to_dense`, FLOPs, init, `from_dense`.
"""

from math import prod, sqrt

import torch
import torch.nn.functional as F
from torch import nn

from .execute import run_plan
from .plan import make_plan
from .program import Program, Step, dense, fused_forward, run, uses_plans
from .sizes import check_size
from .tune import chosen

PARAMETERIZATIONS = ("mup", "standard")


def core_init_std(fan_in: int, fan_out: int, parameterization: str = "mup") -> float:
    """muP (spectral) init: sqrt(min(d_in, d_out)) / d_in; standard: 1 / sqrt(d_in)."""
    if parameterization == "mup":
        return sqrt(min(fan_in, fan_out)) / fan_in
    if parameterization == "standard":
        return 1.0 / sqrt(fan_in)
    raise ValueError(f"parameterization must be one of {PARAMETERIZATIONS}, got {parameterization!r}")


class StructuredLinear(nn.Module):
    """y = x W^T + b with W (out_features, in_features) held as structured cores.

    x: (..., in_features) -> y: (..., out_features). Subclasses call `_build` in `__init__`.
    """

    name = "structured"  # the spec-string name, e.g. "btt"
    projection_is_optimal = True  # False where `_project` is only quasi-optimal: L-BFGS polishes it

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features = check_size("in_features", in_features)
        self.out_features = check_size("out_features", out_features)
        self.precision = None  # a precision policy applied at every core contraction

    def _build(self, program: Program, core_shapes: dict, padded_in: int, padded_out: int,
               bias: bool, device, dtype, parameterization: str = "mup"):
        """Register the cores (stored with shapes `core_shapes`) and the bias, then initialise."""
        self.program = program
        self.padded_in, self.padded_out = padded_in, padded_out
        if prod(program.in_shape) != padded_in:
            raise ValueError(f"program input {program.in_shape} does not multiply to {padded_in}")
        factory = {"device": device, "dtype": dtype}
        for step in program.steps:
            shape = core_shapes[step.core]
            if prod(shape) != prod(step.core_shape):
                raise ValueError(f"core {step.core!r}: shape {shape} != step view {step.core_shape}")
            self.register_parameter(step.core, nn.Parameter(torch.empty(shape, **factory)))
        self.bias = nn.Parameter(torch.empty(self.out_features, **factory)) if bias else None
        self.reset_parameters(parameterization)

    # --- the structure -----------------------------------------------------------------------
    @property
    def core_steps(self) -> list[tuple[str, nn.Parameter, Step]]:
        """(name, parameter, step) of every core, in contraction order."""
        return [(s.core, getattr(self, s.core), s) for s in self.program.steps]

    @property
    def padded(self) -> bool:
        return (self.padded_in, self.padded_out) != (self.in_features, self.out_features)

    @property
    def num_params(self) -> int:
        """Number of parameters, bias included (as for nn.Linear: in*out + out)."""
        return sum(p.numel() for p in self.parameters())

    def flops(self, tokens: int) -> int:
        """Forward matmul FLOPs (2 x multiply-adds) for `tokens` rows, bias and padding copies
        excluded, of the structured contraction the forward runs (the execution plan's order,
        which for TT can be cheaper than the step order; the measured one once measured,
        tune.py); what FlopCounterMode reports. A tiny
        layer whose plan materialises W instead (`Plan.materialise`) still reports the
        structure's FLOPs; `make_plan(layer.program, tokens).flops(tokens)` counts what runs."""
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
            raise ValueError(f"tokens must be a non-negative int, got {tokens!r}")
        if tokens and self.precision is None and uses_plans():  # the plan may reorder (TT)
            return chosen(make_plan(self.program, tokens)).contraction_flops(tokens)
        return self.program.flops(tokens)

    def structure_args(self) -> dict:
        """The keyword arguments that rebuild this structure (for repr and spec strings)."""
        return {}

    @property
    def spec(self) -> str:
        args = ",".join(f"{k}={_spec_value(v)}" for k, v in self.structure_args().items())
        return f"{self.name}:{args}" if args else self.name

    def extra_repr(self) -> str:
        parts = [f"in_features={self.in_features}", f"out_features={self.out_features}"]
        parts += [f"{k}={v}" for k, v in self.structure_args().items()]
        parts.append(f"bias={self.bias is not None}")
        if self.padded:
            parts.append(f"padded=({self.in_features}->{self.padded_in} in, "
                         f"{self.out_features}->{self.padded_out} out)")
        return ", ".join(parts)

    # --- init -----------------------------------------------------------------------------
    @torch.no_grad()
    def reset_parameters(self, parameterization: str = "mup"):
        """Gaussian init of every core with the std of its own (fan_in, fan_out); zero bias."""
        for _, core, step in self.core_steps:
            core.normal_(0.0, core_init_std(step.fan_in, step.fan_out, parameterization))
        if self.bias is not None:
            self.bias.zero_()

    # --- compute --------------------------------------------------------------------------
    def _cores(self) -> dict:
        return {name: core for name, core, _ in self.core_steps}

    def _run_padded(self, x: torch.Tensor, cores: dict) -> torch.Tensor:
        """(T, in_features) -> (T, out_features) through the program, padding and cropping, plus
        the bias (which the plans add in place, into their own output buffer)."""
        if self.padded_in != self.in_features:
            x = F.pad(x, (0, self.padded_in - self.in_features))
        if self.precision is None and uses_plans():
            training = torch.is_grad_enabled() and (
                x.requires_grad or any(c.requires_grad for c in cores.values()))
            bias = self.bias if self.padded_out == self.out_features else None
            y = run_plan(self.program, x, cores, bias, training)
        else:
            y, bias = run(self.program, x, cores, self.precision), None
        if self.padded_out != self.out_features:
            y = y[:, : self.out_features]
        if self.bias is not None and bias is None:  # under autocast y is in the autocast dtype
            y = y + self.bias.to(y.dtype)
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 0 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"input last dim must be in_features={self.in_features}, got shape {tuple(x.shape)}"
            )
        if not x.is_floating_point():
            raise TypeError(f"input must be a real floating-point tensor (float32, float64, bfloat16, "
                            f"float16), got dtype {x.dtype}")
        lead, x = x.shape[:-1], x.reshape(-1, self.in_features)
        kernel = fused_forward(self.program, x, self.precision)
        if kernel is not None:  # the fused GPU kernel: padding, cropping and bias included
            y = kernel(x, self._cores(), self.out_features, self.bias)
        else:
            y = self._run_padded(x, self._cores())
        return y.reshape(*lead, self.out_features)

    def to_dense(self) -> torch.Tensor:
        """The exact (out_features, in_features) matrix of the map, bias excluded.

        Computed by contracting the cores as a tensor network (an opt_einsum plan cached per
        structure), not by the forward's step-by-step program, so the two check each other.
        """
        return dense(self.program, self._cores())[: self.out_features, : self.in_features]

    # --- projection of a dense matrix ---------------------------------------------------------
    @classmethod
    def from_dense(cls, weight: torch.Tensor, bias: torch.Tensor | None = None, **structure_args):
        """The layer of this structure closest to `weight` (out, in) (see `project_`)."""
        out_features, in_features = _check_matrix(weight)
        layer = cls(in_features, out_features, bias=bias is not None,
                    device=weight.device, dtype=weight.dtype, **structure_args)
        layer.project_(weight, bias)
        return layer

    @torch.no_grad()
    def project_(self, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 impute_iters: int = 10) -> float:
        """Set the cores to the projection of `weight` (out, in); return the relative error.

        The projection runs in float64. When the layer is padded, the padded rows/columns are
        "don't care": they are filled in by alternating projection (start at zero, then repeatedly
        copy the projection's values there and project again), which never increases the error on
        the real entries.
        """
        if _check_matrix(weight) != (self.out_features, self.in_features):
            raise ValueError(f"weight must have shape (out_features, in_features) = "
                             f"({self.out_features}, {self.in_features}), got {tuple(weight.shape)}")
        target = weight.detach().to(torch.float64)
        full = target.new_zeros(self.padded_out, self.padded_in)
        full[: self.out_features, : self.in_features] = target
        cores = self._project(full)
        error = self._dense_of(cores) - target
        for _ in range(impute_iters if self.padded else 0):
            full.copy_(self._dense_of(cores, crop=False))
            full[: self.out_features, : self.in_features] = target
            candidate = self._reproject(full, cores)
            new_error = self._dense_of(candidate) - target
            if new_error.norm() >= error.norm():
                break
            converged = new_error.norm() > error.norm() * (1 - 1e-6)
            cores, error = candidate, new_error
            if converged:
                break
        if not self.projection_is_optimal:
            iters = 100 if self.padded_in * self.padded_out <= 2**20 else 30  # big layers stay fast
            refined = self._refine(cores, target, iters)
            refined_error = self._dense_of(refined) - target
            if refined_error.norm() < error.norm():
                cores, error = refined, refined_error
        for name, core in self._cores().items():
            core.copy_(cores[name].reshape(core.shape))
        if bias is not None:
            if self.bias is None or bias.shape != self.bias.shape:
                raise ValueError(f"bias must have shape ({self.out_features},) and the layer a bias")
            self.bias.copy_(bias)
        return (error.norm() / target.norm().clamp_min(1e-300)).item()

    def _dense_of(self, cores: dict, crop: bool = True) -> torch.Tensor:
        """Dense (out, in) matrix of given cores; (padded_out, padded_in) if not crop."""
        full = dense(self.program, cores)
        return full[: self.out_features, : self.in_features] if crop else full

    def _refine(self, cores: dict, target: torch.Tensor, max_iter: int) -> dict:
        """Polish a quasi-optimal projection: L-BFGS on all cores jointly, minimising the error on
        the real (cropped) entries from the closed-form start, so it only ever improves it."""
        cores = {name: core.clone(memory_format=torch.contiguous_format).requires_grad_(True)
                 for name, core in cores.items()}
        optimizer = torch.optim.LBFGS(list(cores.values()), max_iter=max_iter, history_size=20,
                                      tolerance_grad=1e-12, tolerance_change=1e-15,
                                      line_search_fn="strong_wolfe")

        def closure():
            optimizer.zero_grad()
            loss = (self._dense_of(cores) - target).square().sum()
            loss.backward()
            return loss

        with torch.enable_grad():
            optimizer.step(closure)
        return {name: core.detach() for name, core in cores.items()}

    def _project(self, weight: torch.Tensor) -> dict:
        """Cores (name -> float64 tensor) approximating weight (padded_out, padded_in)."""
        raise NotImplementedError(f"{type(self).__name__} has no projection")

    def _reproject(self, weight: torch.Tensor, previous: dict) -> dict:
        """The projection again, after the padding was refilled from `previous` (an iterative
        projection may start from it)."""
        return self._project(weight)


def _check_matrix(weight) -> tuple[int, int]:
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.ndim != 2:
        raise ValueError(f"weight must be a 2-D (out_features, in_features) matrix, "
                         f"got shape {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise TypeError(f"weight must be a floating-point tensor, got {weight.dtype}")
    if not torch.isfinite(weight).all():
        raise ValueError("weight contains NaN or inf")
    return tuple(weight.shape)


def _spec_value(value) -> str:
    if isinstance(value, tuple | list):
        return "x".join(str(v) for v in value)
    return str(value)
