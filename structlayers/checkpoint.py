"""Saving and loading structurized models: the weights and the plan that rebuilds their modules.

Any nn.Module:
    sl.save(model, "model.pt")              # torch.save of {plan, state_dict}
    model = sl.load(MyModel(config), "model.pt")   # restructure by the plan, strict load
The plan alone (JSON, {qualified name: spec}):
    sl.save_plan(sl.plan_of(model), "plan.json"); sl.restructure(fresh, sl.load_plan("plan.json"))
Hugging Face transformers models: hf.py (sl.save_pretrained / sl.from_pretrained).
"""

import json
import os

import torch
from torch import nn

from .surgery import check_plan, plan_of, restructure

FORMAT = "structlayers"
VERSION = 1


def save(model: nn.Module, path) -> dict[str, str]:
    """torch.save(model's state_dict and plan) to `path`; returns the plan."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    plan = plan_of(model)
    torch.save({"format": FORMAT, "version": VERSION, "plan": plan,
                "state_dict": model.state_dict()}, path)
    return plan


def load(model: nn.Module, path, map_location="cpu", strict: bool = True) -> nn.Module:
    """Restructure `model` (a fresh instance of the saved architecture) by the plan saved at
    `path` and load its weights (strict by default); returns `model`, in place.

    The file is read with weights_only=True (no code runs). Raises ValueError, with the model
    unchanged, for a file that `save` did not write or whose plan does not fit the model.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != FORMAT:
        raise ValueError(f"{path} is not a structlayers checkpoint (written by sl.save): for a "
                         f"plain state_dict use model.load_state_dict(torch.load(path))")
    if checkpoint.get("version") != VERSION:
        raise ValueError(f"{path} has checkpoint version {checkpoint.get('version')!r}; this "
                         f"structlayers reads version {VERSION}")
    load_structured_state(model, checkpoint["plan"], checkpoint["state_dict"], strict, str(path))
    return model


def load_structured_state(model: nn.Module, plan: dict, state_dict: dict, strict: bool,
                          source: str):
    """restructure(model, plan) then load_state_dict; on a failed load the model is restored."""
    check_plan(plan)
    planned = {id(model.get_submodule(name)) for name in plan if _has(model, name)}
    backup = {name: module for name, module in model.named_modules(remove_duplicate=False)
              if name and id(module) in planned}  # every name of a shared module
    restructure(model, plan)
    try:
        expected = model.state_dict()
        tied = _tied_names(model, state_dict)
        missing = [k for k in expected if k not in state_dict and k not in tied]
        unexpected = [k for k in state_dict if k not in expected]
        misfit = [f"{k} {tuple(v.shape)} != {tuple(expected[k].shape)}"
                  for k, v in state_dict.items() if k in expected and v.shape != expected[k].shape]
        if misfit or (strict and (missing or unexpected)):  # checked before anything is copied
            raise ValueError(f"the weights in {source} do not fit the model restructured by "
                             f"their plan: shapes {misfit[:8]}, missing {missing[:8]}, "
                             f"unexpected {unexpected[:8]}")
        model.load_state_dict(state_dict, strict=False)
    except Exception:
        for name, module in backup.items():  # leave the model as it was given
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, module)
        raise


def save_plan(plan: dict[str, str], path):
    check_plan(plan)
    with open(path, "w") as file:
        json.dump({"format": FORMAT, "version": VERSION, "plan": plan}, file, indent=1)


def load_plan(path) -> dict[str, str]:
    if not os.path.isfile(path):
        raise ValueError(f"no structlayers plan at {path}")
    with open(path) as file:
        data = json.load(file)
    if not isinstance(data, dict) or data.get("format") != FORMAT or "plan" not in data:
        raise ValueError(f"{path} is not a structlayers plan file (written by sl.save_plan)")
    return check_plan(data["plan"])


def _tied_names(model: nn.Module, state_dict: dict) -> set[str]:
    """Parameter names absent from `state_dict` whose tensor is also under a name it has (ties
    that save_pretrained writes once)."""
    by_tensor: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_tensor.setdefault(id(p), []).append(name)
    return {name for names in by_tensor.values() if any(n in state_dict for n in names)
            for name in names if name not in state_dict}


def _has(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
        return True
    except AttributeError:
        return False
