"""muP for structured layers: per-core learning rates, init, RMS cap and the coordinate check.

Every core is treated as a dense matrix with its own (d_in, d_out), the dims of its batched matmul
(`Step.fan_in`, `Step.fan_out`; DESIGN.md, "muP for structured layers"). For a layer of n cores:
    init std          sqrt(min(d_in, d_out)) / d_in          (spectral norm ~ sqrt(d_out / d_in))
    Adam LR           lr * base_width / (n * d_in)           (dense: lr * base_width / fan_in)
    SGD LR            lr * (d_out / d_in) / (out_features / in_features)
    weight decay      weight_decay * lr / core_lr            (core_lr * decay is width-independent)
A plain nn.Linear is a one-core dense layer, so the input layer (fixed fan-in) keeps an O(1) Adam LR
and the readout (fan-in = width) gets muP's 1/width init and LR. Vectors (biases, norm gains),
scalars and embedding tables keep `lr` and get no weight decay.

Typical use:
    sl.mup.init_(model)
    opt = torch.optim.AdamW(sl.mup.param_groups(model, lr=3e-3, base_width=256, weight_decay=0.1))
"""

import math
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .base import PARAMETERIZATIONS, StructuredLinear, core_init_std

OPTIMIZERS = ("adam", "adamw", "sgd")


@dataclass(frozen=True)
class _Core:
    """A matrix-like parameter seen as one core of a linear layer of `n_cores` cores."""

    param: nn.Parameter
    fan_in: int
    fan_out: int
    n_cores: int
    layer_in: int  # the layer's (padded) in/out sizes, for the SGD rule
    layer_out: int


def _cores(module: nn.Module) -> list[_Core]:
    """The cores of a StructuredLinear or a plain nn.Linear (one dense core); [] otherwise."""
    if isinstance(module, StructuredLinear):
        steps = module.core_steps
        return [_Core(p, s.fan_in, s.fan_out, len(steps), module.padded_in, module.padded_out)
                for _, p, s in steps]
    if isinstance(module, nn.Linear):
        i, o = module.in_features, module.out_features
        return [_Core(module.weight, i, o, 1, i, o)]
    return []


def _linear_modules(model: nn.Module):
    """(qualified name, module) of every StructuredLinear and plain nn.Linear in the model."""
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, StructuredLinear | nn.Linear)]


def _check_number(name: str, value, minimum: float, strict: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    ok = value > minimum if strict else value >= minimum
    if not ok or not math.isfinite(value):
        raise ValueError(f"{name} must be finite and {'>' if strict else '>='} {minimum}, "
                         f"got {value}")
    return float(value)


def _check_choice(name: str, value, valid: tuple[str, ...]) -> str:
    if value not in valid:
        raise ValueError(f"{name} must be one of {valid}, got {value!r}")
    return value


def param_groups(model: nn.Module, lr: float, base_width: float = 256, optimizer: str = "adam",
                 weight_decay: float = 0.0, parameterization: str = "mup") -> list[dict]:
    """Parameter groups for torch.optim with the muP learning rate and weight decay of every core.

    base_width: the width at which `lr` is the Adam LR of a dense hidden layer (fan_in =
    base_width); tune `lr` on a model of that width and reuse it at every width.
    optimizer: "adam"/"adamw" (use with torch.optim.Adam/AdamW; decay is meant as AdamW's decoupled
    decay) or "sgd". The SGD rule is a core's multiplier relative to a dense layer of the same
    shape: a one-core layer (any nn.Linear, input and readout included) keeps `lr`, so width
    scaling of the input/readout LR under SGD is left to the caller. parameterization="standard"
    gives the SP baseline: one group, `lr` and `weight_decay` for every parameter.

    Returns dicts with "params", "lr", "weight_decay", a readable "name" and "param_names";
    parameters with the same kind, lr and decay share a group. Every parameter appears once.
    Parameters that are neither cores, vectors nor embeddings (e.g. a raw 2-D nn.Parameter or a
    conv kernel) keep `lr` and `weight_decay`, with a warning: their width dims are unknown.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    lr = _check_number("lr", lr, 0.0, strict=True)
    base_width = _check_number("base_width", base_width, 0.0, strict=True)
    weight_decay = _check_number("weight_decay", weight_decay, 0.0, strict=False)
    optimizer = _check_choice("optimizer", optimizer, OPTIMIZERS)
    _check_choice("parameterization", parameterization, PARAMETERIZATIONS)
    names = {id(p): name for name, p in model.named_parameters()}
    if not names:
        raise ValueError("model has no parameters")
    if parameterization == "standard":
        params = list(model.parameters())
        return [{"params": params, "lr": lr, "weight_decay": weight_decay, "name": "all",
                 "param_names": [names[id(p)] for p in params]}]

    settings = {}  # id(param) -> (kind, lr, weight decay); a tied linear weight follows the linear
    for _, module in _linear_modules(model):
        for core in _cores(module):
            if optimizer == "sgd":
                core_lr = lr * (core.fan_out / core.fan_in) / (core.layer_out / core.layer_in)
            else:
                core_lr = lr * base_width / (core.n_cores * core.fan_in)
            settings.setdefault(id(core.param), ("matrix", core_lr, weight_decay * lr / core_lr))
    for module in model.modules():
        if isinstance(module, nn.Embedding | nn.EmbeddingBag):
            settings.setdefault(id(module.weight), ("vector", lr, 0.0))  # vector-like in muP
    unknown = []
    for name, p in model.named_parameters():
        if id(p) not in settings:
            if p.ndim <= 1:
                settings[id(p)] = ("vector", lr, 0.0)
            else:
                settings[id(p)] = ("other", lr, weight_decay)
                unknown.append(name)
    if unknown:
        warnings.warn(f"muP has no rule for parameters {unknown} (not a core of a StructuredLinear "
                      f"or nn.Linear, an embedding or a vector); they keep lr={lr}", stacklevel=2)

    groups = {}
    for name, p in model.named_parameters():
        group = groups.setdefault(settings[id(p)], {"params": [], "param_names": []})
        group["params"].append(p)
        group["param_names"].append(name)
    return [{"params": g["params"], "lr": group_lr, "weight_decay": wd,
             "name": f"{kind}: {_short_list(g['param_names'])}", "param_names": g["param_names"]}
            for (kind, group_lr, wd), g in groups.items()]


def _short_list(names: list[str], keep: int = 3) -> str:
    if len(names) <= keep + 1:
        return ", ".join(names)
    return ", ".join(names[:keep]) + f", ... ({len(names)} params)"


@torch.no_grad()
def init_(model: nn.Module, parameterization: str = "mup", readout: str | None = None,
          base_width: float | None = None) -> nn.Module:
    """Re-initialise every StructuredLinear (per-core std) and plain nn.Linear (a dense core:
    std sqrt(min(fan_in, fan_out)) / fan_in for muP, 1 / sqrt(fan_in) standard); zero biases.
    Other modules (embeddings, norms) are left as they are. Returns the model.

    readout, base_width: the qualified name of the output layer (e.g. "lm_head") and the muP base
    width. muP wants the readout's init to shrink like 1/width; the spectral rule above only does
    so once width > its out_features (a vocabulary is wider than small models), so under muP the
    readout gets std sqrt(base_width) / fan_in instead: the standard 1/sqrt(fan_in) at the base
    width, 1/width-like above it. It must not share its weight with an embedding. Under
    "standard" it gets the usual init."""
    _check_choice("parameterization", parameterization, PARAMETERIZATIONS)
    head = _readout(model, readout, parameterization == "mup")
    if head is not None:
        if base_width is None:
            raise ValueError(f"readout={readout!r} needs base_width, the muP base width")
        base_width = _check_number("base_width", base_width, 0.0, strict=True)
    for _, module in _linear_modules(model):
        if isinstance(module, StructuredLinear):
            module.reset_parameters(parameterization)
            continue
        std = (math.sqrt(base_width) / module.in_features if module is head
               else core_init_std(module.in_features, module.out_features, parameterization))
        module.weight.normal_(0.0, std)
        if module.bias is not None:
            module.bias.zero_()
    return model


def _readout(model: nn.Module, readout: str | None, mup_init: bool) -> nn.Linear | None:
    """The layer named `readout` if it gets muP's readout init (else None), checked before
    anything changes."""
    if readout is None:
        return None
    modules = dict(model.named_modules())
    if not isinstance(modules.get(readout), nn.Linear):
        raise ValueError(f"readout must name an nn.Linear of the model, got {readout!r}; linear "
                         f"layers: {[name for name, _ in _linear_modules(model)]}")
    if not mup_init:
        return None
    weight = modules[readout].weight
    tied = [name for name, m in modules.items() if name != readout
            and any(p is weight for p in m.parameters(recurse=False))]
    if tied:
        raise ValueError(f"readout {readout!r} shares its weight with {tied}; its muP init would "
                         "overwrite theirs: untie it (e.g. GPTConfig(tie_weights=False))")
    return modules[readout]


@torch.no_grad()
def rms_cap_(model: nn.Module, target="init") -> nn.Module:
    """Rescale every core of every StructuredLinear by 1 / max(1, rms(core) / target).

    The "btt_norm" of Compute Better Spent: a core whose RMS drifted above its target is scaled
    back, one below is untouched. target: a positive float for all cores, or "init" for each
    core's muP init std. Call it after optimizer.step(). Plain nn.Linear layers are left alone.
    """
    if target != "init":
        target = _check_number("target", target, 0.0, strict=True)
    for _, module in _linear_modules(model):
        if not isinstance(module, StructuredLinear):
            continue
        for _, core, step in module.core_steps:
            cap = core_init_std(step.fan_in, step.fan_out) if target == "init" else target
            rms = core.float().pow(2).mean().sqrt().item()
            if rms > cap:
                core.mul_(cap / rms)
    return model


@dataclass
class CoordCheck:
    """Output RMS of every linear module per width: at init and of its change after training.

    rms_init[name][width]: RMS of the module's output on x at init.
    rms_delta[name][width]: RMS of (output after `steps` steps - output at init), same x.
    losses[width]: training loss before each step.
    """

    widths: tuple[int, ...]
    rms_init: dict[str, dict[int, float]] = field(default_factory=dict)
    rms_delta: dict[str, dict[int, float]] = field(default_factory=dict)
    losses: dict[int, list[float]] = field(default_factory=dict)

    def spread(self, name: str, kind: str = "delta") -> float:
        """max / min across widths of rms_init (kind="init") or rms_delta (kind="delta")."""
        values = list(self._table(kind)[name].values())
        return max(values) / min(values) if min(values) > 0 else math.inf

    def _table(self, kind: str) -> dict[str, dict[int, float]]:
        return {"init": self.rms_init, "delta": self.rms_delta}[_check_choice(
            "kind", kind, ("init", "delta"))]

    def table(self) -> str:
        """One row per (module, kind): the RMS at each width and the spread."""
        head = f"{'module':<24}{'kind':<7}" + "".join(f"{w:>10}" for w in self.widths)
        rows = [head + f"{'spread':>9}"]
        for name in self.rms_init:
            for kind in ("init", "delta"):
                values = self._table(kind)[name]
                cells = "".join(f"{values[w]:>10.3g}" if w in values else f"{'-':>10}"
                                for w in self.widths)
                rows.append(f"{name:<24}{kind:<7}{cells}{self.spread(name, kind):>9.2f}")
        return "\n".join(rows)


def coord_check(make_model, widths, data, steps: int = 5, lr: float = 1e-2,
                optimizer: str = "adam", parameterization: str = "mup", base_width=None,
                loss_fn=F.cross_entropy, seed: int = 0, n_seeds: int = 1) -> CoordCheck:
    """Train `make_model(width)` for `steps` full-batch steps on data = (x, y) at every width and
    record each StructuredLinear / nn.Linear output's RMS at init and the RMS of its change.

    With muP both stay flat across widths (the coordinate check); with the standard
    parameterization and one global `lr` the change grows with width. base_width defaults to the
    smallest width, where muP and the standard parameterization give dense hidden layers the same
    LR. Each run starts from torch.manual_seed(seed + k), k < n_seeds, and the RMS values are
    averaged over the n_seeds runs (as the mup package does) to damp finite-width noise.
    """
    widths = tuple(widths)
    if not widths or any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in widths):
        raise ValueError(f"widths must be a non-empty sequence of positive ints, got {widths!r}")
    for name, value in (("steps", steps), ("n_seeds", n_seeds)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    _check_choice("parameterization", parameterization, PARAMETERIZATIONS)
    _check_choice("optimizer", optimizer, OPTIMIZERS)
    if not (isinstance(data, tuple | list) and len(data) == 2):
        raise ValueError("data must be a tuple (x, y)")
    base_width = min(widths) if base_width is None else base_width
    result = CoordCheck(widths)
    for width in widths:
        runs = [_train_once(make_model, width, data, steps, lr, optimizer, parameterization,
                            base_width, loss_fn, seed + k) for k in range(n_seeds)]
        result.losses[width] = [sum(r[2][i] for r in runs) / n_seeds for i in range(steps)]
        for name in runs[0][0]:
            result.rms_init.setdefault(name, {})[width] = sum(r[0][name] for r in runs) / n_seeds
            result.rms_delta.setdefault(name, {})[width] = sum(r[1][name] for r in runs) / n_seeds
    return result


def _train_once(make_model, width, data, steps, lr, optimizer, parameterization, base_width,
                loss_fn, seed):
    """One coord-check run: ({name: init RMS}, {name: RMS of the change}, losses)."""
    x, y = data
    torch.manual_seed(seed)
    model = init_(make_model(width), parameterization)
    groups = param_groups(model, lr, base_width, optimizer, parameterization=parameterization)
    opt = torch.optim.SGD(groups) if optimizer == "sgd" else torch.optim.AdamW(groups)
    before, losses = _outputs(model, x), []
    for _ in range(steps):
        model.train()
        loss = loss_fn(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    after = _outputs(model, x)
    return ({name: _rms(out) for name, out in before.items()},
            {name: _rms(after[name] - out) for name, out in before.items()}, losses)


@torch.no_grad()
def _outputs(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Output of every StructuredLinear / nn.Linear on x (eval mode), by qualified name."""
    outputs = {}

    def hook(name):
        def save(module, inputs, output):
            outputs[name] = output.detach().float().clone()
        return save

    handles = [m.register_forward_hook(hook(name)) for name, m in _linear_modules(model)]
    try:
        model.eval()
        model(x)
    finally:
        for handle in handles:
            handle.remove()
    return outputs


def _rms(t: torch.Tensor) -> float:
    return t.pow(2).mean().sqrt().item()
