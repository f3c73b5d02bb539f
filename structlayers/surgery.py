"""Model surgery: swap the nn.Linear layers of a model for structured layers, in place.

    report = sl.structurize(model, "btt:rank=2", include=r"mlp\\.", project=True)
    print(report)   # per-layer params and FLOPs before/after, projection errors, totals

It works in two phases so that a bad argument never leaves a half-converted model: first every
replacement is built (and projected), collecting all failures; only if none failed are the
modules swapped into their parents.

Only modules whose type is exactly nn.Linear are considered. Subclasses are skipped on purpose:
their forward may differ from x W^T + b (LoRA, quantized layers), and some parents read the weight
directly instead of calling the module (nn.MultiheadAttention.out_proj is such a subclass).
StructuredLinear layers are left alone, so structurizing twice does not restructure a layer.
Hooks registered on a replaced nn.Linear are not carried over to its replacement.
"""

import re
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .base import StructuredLinear
from .spec import build, parse_spec

_SET_BY_SURGERY = ("bias", "device", "dtype")  # taken from each nn.Linear, not from the spec


@dataclass
class LayerChange:
    """One replaced nn.Linear (FLOPs per token: forward matmul, 2 x multiply-adds)."""

    name: str
    structure: str  # the new layer's full spec string
    in_features: int
    out_features: int
    params_before: int  # bias included
    params_after: int
    flops_before: int
    flops_after: int
    projection_error: float | None  # ||W - W_hat||_F / ||W||_F when project=True
    aliases: tuple[str, ...] = ()  # other names of the same (shared) module


@dataclass
class StructurizeReport:
    """What `structurize` replaced: one row per replaced module, and totals."""

    rows: list[LayerChange] = field(default_factory=list)
    model_params_before: int = 0  # every (distinct) parameter of the model, not only the layers
    model_params_after: int = 0

    @property
    def params_before(self) -> int:
        return sum(r.params_before for r in self.rows)

    @property
    def params_after(self) -> int:
        return sum(r.params_after for r in self.rows)

    @property
    def flops_before(self) -> int:
        return sum(r.flops_before for r in self.rows)

    @property
    def flops_after(self) -> int:
        return sum(r.flops_after for r in self.rows)

    def to_dicts(self) -> list[dict]:
        """One flat dict per row (for csv.DictWriter or json); aliases joined by ';'."""
        return [asdict(r) | {"aliases": ";".join(r.aliases)} for r in self.rows]

    def __len__(self) -> int:
        return len(self.rows)

    def __str__(self) -> str:
        header = ("layer", "structure", "in", "out", "params", "new params", "flops/tok",
                  "new flops/tok", "proj. error")
        table = [header]
        for r in self.rows:
            name = r.name + "".join(f" (= {a})" for a in r.aliases)
            error = "-" if r.projection_error is None else f"{r.projection_error:.4f}"
            table.append((name, r.structure, str(r.in_features), str(r.out_features),
                          f"{r.params_before:,}", f"{r.params_after:,}", f"{r.flops_before:,}",
                          f"{r.flops_after:,}", error))
        table.append((f"total ({len(self.rows)} layers)", "", "", "",
                      f"{self.params_before:,}", f"{self.params_after:,}",
                      f"{self.flops_before:,}", f"{self.flops_after:,}", ""))
        widths = [max(len(row[k]) for row in table) for k in range(len(header))]

        def line(row):
            cells = [c.ljust(w) if k < 2 else c.rjust(w)  # names left, numbers right
                     for k, (c, w) in enumerate(zip(row, widths, strict=True))]
            return "  ".join(cells).rstrip()

        rule = "-" * len(line(header))
        lines = [line(header), rule, *map(line, table[1:-1]), rule, line(table[-1])]
        lines.append(f"replaced layers: params {_ratio(self.params_after, self.params_before)}, "
                     f"FLOPs/token {_ratio(self.flops_after, self.flops_before)}; "
                     f"model params {self.model_params_before:,} -> "
                     f"{self.model_params_after:,} "
                     f"({_ratio(self.model_params_after, self.model_params_before)})")
        return "\n".join(lines)


SpecFn = Callable[[str, nn.Linear], "str | StructuredLinear | None"]
NameFilter = str | re.Pattern | Callable[[str, nn.Module], bool]


def structurize(model: nn.Module, spec_or_fn: str | SpecFn, include: NameFilter | None = None,
                exclude: NameFilter | None = None, project: bool = False) -> StructurizeReport:
    """Replace the nn.Linear layers of `model` (in place) by structured layers.

    spec_or_fn: a spec string ("btt:rank=2") used for every selected layer, or a function
        (name, linear) -> spec string | StructuredLinear | None (None keeps that layer dense).
    include / exclude: a regex (re.search on the qualified name, e.g. r"mlp\\.") or a function
        (name, module) -> bool. include=None selects every nn.Linear; exclude is applied after.
    project: initialise each new layer with the projection of the old weight (and record the
        relative error); otherwise keep its fresh muP init. The old bias is copied either way.

    A module shared at several places (tied) is replaced by one new module at all of them.
    Raises ValueError/TypeError (naming the layer) before anything is replaced if a filter is bad,
    the filters select no nn.Linear, or a replacement cannot be built for some layer.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(project, bool):
        raise TypeError(f"project must be a bool, got {project!r}")
    choose = _spec_chooser(spec_or_fn)
    included = _name_filter("include", include, default=True)
    excluded = _name_filter("exclude", exclude, default=False)

    targets = []  # (linear, names) in model order
    linears = _linear_places(model)
    for linear, names in linears:
        selected = [included(n, linear) and not excluded(n, linear) for n in names]
        if any(selected) and not all(selected):
            raise ValueError(
                f"an nn.Linear is shared at {names} but include/exclude select only "
                f"{[n for n, s in zip(names, selected, strict=True) if s]}; replacing it at some "
                f"places would untie it: make the filters select all of its names or none")
        if all(selected):
            targets.append((linear, names))
    if not targets:
        raise ValueError(_nothing_selected(model, linears, include, exclude))
    if "" in targets[0][1]:
        raise ValueError("model is itself an nn.Linear and cannot be replaced in place; use "
                         "sl.build(spec, ...) or Cls.from_dense(weight, bias) instead")

    # phase 1: build (and project) every replacement; nothing in the model changes yet
    built, failures = [], []
    for linear, names in targets:
        try:
            new, error = _replacement(names[0], linear, choose, project)
        except (ValueError, TypeError) as failure:
            failures.append((names[0], linear, failure))
            continue
        if new is not None:
            built.append((linear, names, new, error))
    if failures:
        details = "\n".join(f"  {name} ({lin.in_features} -> {lin.out_features}): {failure}"
                            for name, lin, failure in failures)
        kind = ValueError if isinstance(failures[0][2], ValueError) else TypeError
        raise kind(f"structurize: no layer was replaced, because the replacement failed for "
                   f"{len(failures)} layer(s):\n{details}") from failures[0][2]
    _check_distinct([(names[0], new) for _, names, new, _ in built])
    _warn_broken_ties(model, built)

    # phase 2: swap
    report = StructurizeReport(model_params_before=_count_params(model))
    for linear, names, new, error in built:
        for name in names:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, new)
        report.rows.append(LayerChange(
            names[0], new.spec, linear.in_features, linear.out_features,
            _count_params(linear), new.num_params, 2 * linear.in_features * linear.out_features,
            new.flops(1), error, tuple(names[1:])))
    report.model_params_after = _count_params(model)
    return report


def _spec_chooser(spec_or_fn) -> SpecFn:
    """A function (name, linear) -> spec | layer | None; a spec string is checked right away."""
    if isinstance(spec_or_fn, str):
        _check_spec(spec_or_fn)
        return lambda name, linear: spec_or_fn
    if callable(spec_or_fn):
        return spec_or_fn
    raise TypeError(f"spec_or_fn must be a spec string such as 'btt:rank=2' or a function "
                    f"(name, linear) -> spec | StructuredLinear | None, "
                    f"got {type(spec_or_fn).__name__}")


def _check_spec(spec: str):
    _, args = parse_spec(spec)  # ValueError for an unknown structure or a malformed spec
    fixed = sorted(set(args) & set(_SET_BY_SURGERY))
    if fixed:
        raise ValueError(f"spec {spec!r} sets {fixed}: structurize takes bias, device and dtype "
                         f"from each nn.Linear, so leave them out of the spec")


def _name_filter(which: str, rule, default: bool) -> Callable[[str, nn.Module], bool]:
    if rule is None:
        return lambda name, module: default
    if isinstance(rule, str):
        try:
            rule = re.compile(rule)
        except re.error as error:
            raise ValueError(f"{which}={rule!r} is not a valid regular expression: "
                             f"{error}") from None
    if isinstance(rule, re.Pattern):
        return lambda name, module: rule.search(name) is not None
    if callable(rule):
        def call(name, module):
            result = rule(name, module)
            if not isinstance(result, bool):
                raise TypeError(f"{which} function must return a bool, got {result!r} for {name!r}")
            return result
        return call
    raise TypeError(f"{which} must be None, a regex string or a function (name, module) -> bool, "
                    f"got {type(rule).__name__}")


def _linear_places(model: nn.Module) -> list[tuple[nn.Linear, list[str]]]:
    """Every module of type exactly nn.Linear, with all the names it is reachable by."""
    places: dict[int, tuple[nn.Linear, list[str]]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if type(module) is nn.Linear:
            places.setdefault(id(module), (module, []))[1].append(name)
    return list(places.values())


def _replacement(name: str, linear: nn.Linear, choose: SpecFn, project: bool):
    """(new layer, projection error or None), or (None, None) to keep `linear` dense."""
    choice = choose(name, linear)
    if choice is None:
        return None, None
    weight, bias = linear.weight, linear.bias
    if isinstance(choice, str):
        _check_spec(choice)
        new = build(choice, linear.in_features, linear.out_features, bias=bias is not None,
                    device=weight.device, dtype=weight.dtype)
    elif isinstance(choice, StructuredLinear):
        shape = (choice.in_features, choice.out_features, choice.bias is not None)
        if shape != (linear.in_features, linear.out_features, bias is not None):
            raise ValueError(f"the given layer has (in, out, bias) = {shape}, the nn.Linear has "
                             f"{(linear.in_features, linear.out_features, bias is not None)}")
        new = choice.to(device=weight.device, dtype=weight.dtype)
    else:
        raise TypeError(f"spec_or_fn returned {type(choice).__name__}; it must return a spec "
                        f"string, a StructuredLinear or None")
    error = None
    if project:
        error = new.project_(weight, bias)
    elif bias is not None:
        with torch.no_grad():
            new.bias.copy_(bias)
    new.train(linear.training)
    for p in new.parameters():  # a frozen layer stays frozen
        p.requires_grad_(weight.requires_grad)
    if bias is not None:
        new.bias.requires_grad_(bias.requires_grad)
    return new, error


def _check_distinct(built: list[tuple[str, StructuredLinear]]):
    seen: dict[int, str] = {}
    for name, new in built:
        if id(new) in seen:
            raise ValueError(f"spec_or_fn returned the same layer for {seen[id(new)]!r} and "
                             f"{name!r}; that would tie two separate layers: return a new one each")
        seen[id(new)] = name


def _warn_broken_ties(model: nn.Module, built):
    """Warn when a replaced weight is also used elsewhere (e.g. lm_head tied to the embedding)."""
    replaced = {id(p): names[0] + "." + pname
                for linear, names, _, _ in built for pname, p in linear.named_parameters()}
    ignore = {id(linear) for linear, *_ in built}
    for name, module in model.named_modules():
        if id(module) in ignore:
            continue
        for pname, p in module.named_parameters(recurse=False):
            if id(p) in replaced:
                warnings.warn(f"{replaced[id(p)]} is the same parameter as {name}.{pname}; its "
                              f"structured replacement does not share it, so the tie is broken",
                              stacklevel=3)


def _nothing_selected(model, linears, include, exclude) -> str:
    names = [names[0] for _, names in linears]
    skipped = [n for n, m in model.named_modules()
               if isinstance(m, nn.Linear) and type(m) is not nn.Linear]
    structured = sum(isinstance(m, StructuredLinear) for m in model.modules())
    shown = ", ".join(names[:8]) + (f", ... ({len(names)} in all)" if len(names) > 8 else "")
    message = (f"structurize: include={include!r}, exclude={exclude!r} select no nn.Linear; "
               f"the model's nn.Linear layers are: {shown or 'none'}")
    if skipped:
        message += f"; nn.Linear subclasses are never replaced: {skipped[:8]}"
    if structured:
        message += f"; {structured} layer(s) are already StructuredLinear"
    return message


def _count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _ratio(after: int, before: int) -> str:
    return f"x{after / before:.3f}" if before else "n/a"
