"""Model surgery: swap the linear layers of a model for structured layers, in place.

    report = sl.structurize(model, "btt:rank=2", include=r"mlp\\.", project=True)
    print(report)   # per-layer params and FLOPs before/after, projection errors, totals
    report.plan     # {qualified name: full spec}, JSON-serialisable
    sl.restructure(fresh_model, report.plan)   # same modules, no projection: load_state_dict fits

It works in two phases so that a bad argument never leaves a half-converted model: first every
replacement is built (and projected), collecting all failures; only if none failed are the
modules swapped into their parents.

Only linear-like modules are considered (linear_like.py): exactly nn.Linear, transformers'
Conv1D, and the types a user registers with `register_linear_like`. Subclasses of nn.Linear are
skipped unless registered: their forward may differ from x W^T + b (LoRA, quantized layers), and
some parents read the weight directly instead of calling the module
(nn.MultiheadAttention.out_proj is such a subclass).
StructuredLinear layers are left alone, so structurizing twice does not restructure a layer.
Hooks registered on a replaced module are not carried over to its replacement.
"""

import re
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .base import StructuredLinear
from .linear_like import AdaptedLinear, adapter_of, read_linear
from .spec import build, parse_spec

_SET_BY_SURGERY = ("bias", "device", "dtype")  # taken from each module, not from the spec


@dataclass
class LayerChange:
    """One replaced linear layer (FLOPs per token: forward matmul, 2 x multiply-adds)."""

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

    @property
    def plan(self) -> dict[str, str]:
        """{qualified name: full spec} of the replaced modules, for `restructure`."""
        return {r.name: r.structure for r in self.rows}

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


SpecFn = Callable[[str, nn.Module], "str | StructuredLinear | None"]
NameFilter = str | re.Pattern | Callable[[str, nn.Module], bool]


def structurize(model: nn.Module, spec_or_fn, include: NameFilter | None = None,
                exclude: NameFilter | None = None, project: bool = False) -> StructurizeReport:
    """Replace the linear-like layers of `model` (in place) by structured layers.

    spec_or_fn: a spec string ("btt:rank=2") used for every selected layer; a function
        (name, module) -> spec string | StructuredLinear | None (None keeps that layer dense);
        or a model-wide allocation such as `sl.search.budget(0.25)`, which picks every layer's
        spec from the weights of all the selected layers at once.
    include / exclude: a regex (re.search on the qualified name, e.g. r"mlp\\.") or a function
        (name, module) -> bool. include=None selects every linear-like module; exclude is applied
        after.
    project: initialise each new layer with the projection of the old weight (and record the
        relative error); otherwise keep its fresh muP init. The old bias is copied either way.

    A module shared at several places (tied) is replaced by one new module at all of them.
    Raises ValueError/TypeError (naming the layer) before anything is replaced if a filter is bad,
    the filters select no linear-like module, or a replacement cannot be built for some layer.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(project, bool):
        raise TypeError(f"project must be a bool, got {project!r}")
    allocate = getattr(spec_or_fn, "allocate", None)
    choose = None if callable(allocate) else _spec_chooser(spec_or_fn)
    included = _name_filter("include", include, default=True)
    excluded = _name_filter("exclude", exclude, default=False)

    targets = []  # (module, names) in model order
    linears = _linear_places(model)
    for module, names in linears:
        selected = [included(n, module) and not excluded(n, module) for n in names]
        if any(selected) and not all(selected):
            raise ValueError(
                f"a linear layer is shared at {names} but include/exclude select only "
                f"{[n for n, s in zip(names, selected, strict=True) if s]}; replacing it at some "
                f"places would untie it: make the filters select all of its names or none")
        if all(selected):
            targets.append((module, names))
    if not targets:
        raise ValueError(_nothing_selected(model, linears, include, exclude))
    if "" in targets[0][1]:
        raise ValueError("model is itself a linear layer and cannot be replaced in place; use "
                         "sl.build(spec, ...) or Cls.from_dense(weight, bias) instead")
    if choose is None:  # a model-wide allocation: every layer's spec at once
        specs = allocate([(names[0], *read_linear(m, adapter_of(m))) for m, names in targets])
        choose = _spec_chooser(lambda name, module: specs[name])
    return _swap(model, targets, choose, project, "structurize")


def restructure(model: nn.Module, plan: dict[str, str]) -> StructurizeReport:
    """Rebuild exactly the structured modules of `plan` ({qualified name: spec}) in `model`.

    No projection: the new layers keep their fresh init, with the same parameter names and
    shapes as the model the plan came from, so that model's state_dict loads with strict=True.
    A name whose module is already a StructuredLinear of the same spec is left as it is.
    Raises ValueError/TypeError naming the module (nothing is replaced) if a name does not exist,
    is not linear-like, or its spec does not fit the module's sizes.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    plan = check_plan(plan)
    places = {name: (module, names) for module, names in _linear_places(model) for name in names}
    targets, seen = [], set()
    for name, spec in plan.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"plan names {name!r}, but the model has no module of that "
                             f"name") from None
        current = module.structured if isinstance(module, AdaptedLinear) else module
        if isinstance(current, StructuredLinear):
            if _same_spec(current.spec, spec):
                continue
            raise ValueError(f"plan gives {name!r} the spec {spec!r}, but it is already a "
                             f"structured layer {current.spec!r}")
        if name not in places:
            raise TypeError(f"plan names {name!r}, a {type(module).__name__}, which is not "
                            f"linear-like (register its type with sl.register_linear_like)")
        module, names = places[name]
        if id(module) not in seen:
            seen.add(id(module))
            targets.append((module, names))
    if not targets:
        return StructurizeReport(model_params_before=_count_params(model),
                                 model_params_after=_count_params(model))
    specs = {}
    for _, names in targets:
        given = {plan[n] for n in names if n in plan}
        if len(given) > 1:
            raise ValueError(f"plan gives the module shared at {names} different specs: {given}")
        specs[names[0]] = given.pop()
    return _swap(model, targets, lambda name, module: specs[name], False, "restructure")


def plan_of(model: nn.Module) -> dict[str, str]:
    """{qualified name: full spec} of every structured layer in `model` (first name of a shared one)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    plan, inside = {}, set()
    for name, module in model.named_modules():
        if isinstance(module, AdaptedLinear):
            plan[name] = module.structured.spec
            inside.add(id(module.structured))
        elif isinstance(module, StructuredLinear) and id(module) not in inside:
            plan[name] = module.spec
    return plan


def check_plan(plan) -> dict[str, str]:
    """`plan` as a {name: spec} dict, every spec parsed; TypeError/ValueError naming the entry."""
    if not isinstance(plan, dict):
        raise TypeError(f"plan must be a dict {{qualified name: spec string}}, got "
                        f"{type(plan).__name__}")
    for name, spec in plan.items():
        if not isinstance(name, str) or not isinstance(spec, str):
            raise TypeError(f"plan entries must be name (str) -> spec (str), got {name!r}: {spec!r}")
        try:
            _check_spec(spec)
        except ValueError as error:
            raise ValueError(f"plan entry {name!r}: {error}") from None
    return plan


def _same_spec(a: str, b: str) -> bool:
    return parse_spec(a) == parse_spec(b)


def _swap(model, targets, choose: SpecFn, project: bool, what: str) -> StructurizeReport:
    """Build (and project) every replacement, then swap them in only if all succeeded."""
    built, failures = [], []
    for module, names in targets:
        try:
            new, error = _replacement(names[0], module, choose, project)
        except (ValueError, TypeError) as failure:
            failures.append((names[0], module, failure))
            continue
        if new is not None:
            built.append((module, names, new, error))
    if failures:
        details = "\n".join(f"  {name} ({_sizes(module)}): {failure}"
                            for name, module, failure in failures)
        kind = ValueError if isinstance(failures[0][2], ValueError) else TypeError
        raise kind(f"{what}: no layer was replaced, because the replacement failed for "
                   f"{len(failures)} layer(s):\n{details}") from failures[0][2]
    _check_distinct([(names[0], new) for _, names, new, _ in built])
    _warn_broken_ties(model, built)

    report = StructurizeReport(model_params_before=_count_params(model))
    for module, names, new, error in built:
        adapter = adapter_of(module)
        weight, _ = read_linear(module, adapter)
        out_features, in_features = weight.shape
        placed = new if adapter.call is None else AdaptedLinear(new, adapter.call)
        for name in names:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, placed)
        report.rows.append(LayerChange(
            names[0], new.spec, in_features, out_features, _count_params(module), new.num_params,
            2 * in_features * out_features, new.flops(1), error, tuple(names[1:])))
    report.model_params_after = _count_params(model)
    return report


def _sizes(module) -> str:
    weight, _ = read_linear(module, adapter_of(module))
    return f"{weight.shape[1]} -> {weight.shape[0]}"


def _spec_chooser(spec_or_fn) -> SpecFn:
    """A function (name, module) -> spec | layer | None; a spec string is checked right away."""
    if isinstance(spec_or_fn, str):
        _check_spec(spec_or_fn)
        return lambda name, module: spec_or_fn
    if callable(spec_or_fn):
        return spec_or_fn
    raise TypeError(f"spec_or_fn must be a spec string such as 'btt:rank=2' or a function "
                    f"(name, module) -> spec | StructuredLinear | None, or sl.search.budget(...), "
                    f"got {type(spec_or_fn).__name__}")


def _check_spec(spec: str):
    _, args = parse_spec(spec)  # ValueError for an unknown structure or a malformed spec
    fixed = sorted(set(args) & set(_SET_BY_SURGERY))
    if fixed:
        raise ValueError(f"spec {spec!r} sets {fixed}: structurize takes bias, device and dtype "
                         f"from each replaced module, so leave them out of the spec")


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


def _linear_places(model: nn.Module) -> list[tuple[nn.Module, list[str]]]:
    """Every linear-like module (see linear_like.py), with all the names it is reachable by."""
    places: dict[int, tuple[nn.Module, list[str]]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if adapter_of(module) is not None:
            places.setdefault(id(module), (module, []))[1].append(name)
    return list(places.values())


def _replacement(name: str, module: nn.Module, choose: SpecFn, project: bool):
    """(new layer, projection error or None), or (None, None) to keep `module` dense."""
    choice = choose(name, module)
    if choice is None:
        return None, None
    weight, bias = read_linear(module, adapter_of(module))
    out_features, in_features = weight.shape
    if isinstance(choice, str):
        _check_spec(choice)
        new = build(choice, in_features, out_features, bias=bias is not None,
                    device=weight.device, dtype=weight.dtype)
    elif isinstance(choice, StructuredLinear):
        shape = (choice.in_features, choice.out_features, choice.bias is not None)
        if shape != (in_features, out_features, bias is not None):
            raise ValueError(f"the given layer has (in, out, bias) = {shape}, the module has "
                             f"{(in_features, out_features, bias is not None)}")
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
    new.train(module.training)
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
               if isinstance(m, nn.Linear) and adapter_of(m) is None
               and not isinstance(m, StructuredLinear)]
    structured = sum(isinstance(m, StructuredLinear) for m in model.modules())
    shown = ", ".join(names[:8]) + (f", ... ({len(names)} in all)" if len(names) > 8 else "")
    message = (f"structurize: include={include!r}, exclude={exclude!r} select no linear layer; "
               f"the model's linear-like layers are: {shown or 'none'}")
    if skipped:
        message += (f"; nn.Linear subclasses are not replaced unless registered with "
                    f"sl.register_linear_like: {skipped[:8]}")
    if structured:
        message += f"; {structured} layer(s) are already StructuredLinear"
    return message


def _count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _ratio(after: int, before: int) -> str:
    return f"x{after / before:.3f}" if before else "n/a"
