"""Per-tensor FP8 scale statistics over training, as a table and as a plot."""

from pathlib import Path

import torch

from ..base import StructuredLinear
from .fp8 import FP8, KINDS


def scale_history(model) -> list[dict]:
    """Rows {layer, core, tensor, call, amax, scale}: every recorded call of every FP8 scaler.

    `call` counts the tensor's quantizations (forward passes for activations and weights,
    backward passes for gradients).
    """
    rows = []
    for name, module in model.named_modules():
        policy = getattr(module, "precision", None) if isinstance(module, StructuredLinear) else None
        if not isinstance(policy, FP8):
            continue
        for (core, kind), scaler in sorted(policy.scalers.items()):
            if not scaler.records:
                continue
            amax = torch.stack([a for a, _ in scaler.records]).cpu().tolist()
            scale = torch.stack([s for _, s in scaler.records]).cpu().tolist()
            rows += [{"layer": name, "core": core, "tensor": kind, "call": call, "amax": a, "scale": s}
                     for call, (a, s) in enumerate(zip(amax, scale, strict=True))]
    return rows


def plot_scales(history, path=None, title: str = "FP8 per-tensor scales"):
    """Distribution of log2(scale) over training for weights, activations and gradients.

    history: a model with FP8 layers, or rows from `scale_history`. One panel per tensor kind:
    every (layer, core) tensor is a thin line, the median over tensors a thick one. Saves a PNG
    to `path` if given; returns the matplotlib figure.
    """
    rows = history if isinstance(history, list) else scale_history(history)
    if not rows:
        raise ValueError("no recorded scales: apply an FP8 policy with record=True and run some steps")
    try:
        import matplotlib
    except ImportError:
        raise ImportError("plots need matplotlib: pip install 'structlayers[bench]'") from None
    if path is not None:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, len(KINDS), figsize=(4.2 * len(KINDS), 3.6), sharey=True)
    for ax, kind in zip(axes, KINDS, strict=True):
        mine = [r for r in rows if r["tensor"] == kind]
        tensors = sorted({(r["layer"], r["core"]) for r in mine})
        for tensor in tensors:
            calls = [r["call"] for r in mine if (r["layer"], r["core"]) == tensor]
            log_scales = [np.log2(r["scale"]) for r in mine if (r["layer"], r["core"]) == tensor]
            ax.plot(calls, log_scales, lw=0.6, alpha=0.5)
        if mine:
            calls = sorted({r["call"] for r in mine})
            median = [np.median([np.log2(r["scale"]) for r in mine if r["call"] == c]) for c in calls]
            ax.plot(calls, median, "k", lw=2, label="median")
            ax.legend(fontsize=7)
        ax.set(title=f"{kind}s ({len(tensors)} tensors)", xlabel="step")
    axes[0].set_ylabel("log2(scale)")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=130)
    return fig
