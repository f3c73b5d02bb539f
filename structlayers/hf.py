"""Hugging Face transformers models: save and load structurized models the way transformers does.

    sl.save_pretrained(model, "out/")                        # model.save_pretrained + the plan
    model = sl.from_pretrained(LlamaForCausalLM, "out/")     # identical logits

The directory holds what `model.save_pretrained` writes (config.json, model.safetensors) plus
structlayers_plan.json. Plain `LlamaForCausalLM.from_pretrained("out/")` would build dense layers,
report the structured weights as unexpected and leave the projections random: a silently lost
model. So config.json also gets a `transformers_weights` entry that transformers refuses with an
error that names sl.from_pretrained; sl.from_pretrained removes it again.
transformers is imported only by the functions here that need it (safetensors likewise).
"""

import json
import os

import torch
from torch import nn

from .checkpoint import load_plan, load_structured_state, save_plan
from .surgery import plan_of

PLAN_FILE = "structlayers_plan.json"
REFUSAL = ("structured-layers-model: load this directory with "
           "structlayers.from_pretrained(ModelClass, directory), not ModelClass.from_pretrained")


def save_pretrained(model: nn.Module, directory, **kwargs) -> dict[str, str]:
    """`model.save_pretrained(directory, **kwargs)`, then the plan beside the weights; returns
    the plan. Raises ValueError for a model with no structured layer (use save_pretrained)."""
    if not hasattr(model, "save_pretrained") or not hasattr(model, "config"):
        raise TypeError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}; "
                        f"for any nn.Module use sl.save(model, path)")
    plan = plan_of(model)
    if not plan:
        raise ValueError("model has no structured layer; save it with model.save_pretrained")
    model.save_pretrained(directory, **kwargs)
    save_plan(plan, os.path.join(directory, PLAN_FILE))
    config_path = os.path.join(directory, "config.json")
    with open(config_path) as file:
        config = json.load(file)
    config["transformers_weights"] = REFUSAL
    with open(config_path, "w") as file:
        json.dump(config, file, indent=2, sort_keys=True)
    return plan


def from_pretrained(model_class, directory, dtype=None, device=None, strict: bool = True,
                    **config_kwargs):
    """The structurized model saved by `save_pretrained` in `directory`, in eval mode.

    model_class: the transformers class (LlamaForCausalLM, GPT2LMHeadModel, ...); config_kwargs
    go to its config's from_pretrained. dtype / device: where the model is put (default: the
    config's dtype, CPU). Local directories only (no hub download). Raises ValueError for a
    directory without a plan (load it with model_class.from_pretrained) or weights that do not
    fit the plan.
    """
    directory = os.fspath(directory)
    plan_path = os.path.join(directory, PLAN_FILE)
    if not os.path.isdir(directory):
        raise ValueError(f"directory {directory!r} does not exist (sl.from_pretrained reads local "
                         f"directories written by sl.save_pretrained)")
    if not os.path.isfile(plan_path):
        raise ValueError(f"{directory} has no {PLAN_FILE}: it was not written by "
                         f"sl.save_pretrained; load it with {model_class.__name__}.from_pretrained")
    plan = load_plan(plan_path)
    config = model_class.config_class.from_pretrained(directory, **config_kwargs)
    if getattr(config, "transformers_weights", None) == REFUSAL:
        del config.transformers_weights
    model = model_class(config)
    saved_dtype = getattr(config, "dtype", None)
    if isinstance(saved_dtype, str):  # "float32" in some versions' config.json
        saved_dtype = getattr(torch, saved_dtype, None)
    model.to(device=device, dtype=dtype or saved_dtype)
    load_structured_state(model, plan, _read_weights(directory), strict, directory)
    if os.path.isfile(os.path.join(directory, "generation_config.json")) \
            and getattr(model, "generation_config", None) is not None:
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(directory)
    return model.eval()


def _read_weights(directory: str) -> dict:
    """The state dict in `directory`: model.safetensors, its sharded index, or pytorch_model.bin."""
    from safetensors.torch import load_file

    single = os.path.join(directory, "model.safetensors")
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.isfile(single):
        return load_file(single)
    if os.path.isfile(index):
        with open(index) as file:
            shards = sorted(set(json.load(file)["weight_map"].values()))
        state = {}
        for shard in shards:
            state |= load_file(os.path.join(directory, shard))
        return state
    legacy = os.path.join(directory, "pytorch_model.bin")
    if os.path.isfile(legacy):
        return torch.load(legacy, map_location="cpu", weights_only=True)
    raise ValueError(f"{directory} has a plan but no weights (model.safetensors, its index, or "
                     f"pytorch_model.bin)")
