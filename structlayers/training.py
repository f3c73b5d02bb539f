"""Training runs for the compute-efficiency benchmarks: two tasks, one run with exact FLOPs.

A task builds a model whose hidden linear layers have a given structure at a given width, draws
training batches, and measures validation loss:
    MLPTask   mnist1d (generated, no download): 40 -> w -> w -> w -> 10, GELU; the two
              hidden-to-hidden layers are structured, input and readout stay nn.Linear
    GPTTask   a character-level GPT (structlayers.gpt) on the standard library's source or a
              user's text file; every block projection (attn q/k/v/proj, mlp fc/proj) is structured;
              lm_head untied; under muP, 1/head_dim attention, N(0, 1) embeddings and an lm_head
              whose init shrinks like 1/width (sl.mup.init_'s readout rule)
`train_run` trains one model with Adam and the muP per-core learning rates (or the standard
parameterization) and returns its loss curve against training FLOPs: the FLOPs of one
forward+backward step, counted by torch's FlopCounterMode on the real step (attention included),
times the steps taken. Optimizer arithmetic is not counted (it is linear in the parameters).
"""

import functools
import math
import statistics
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

from . import mup
from .data import mnist1d, text_corpus
from .gpt import BLOCK_PROJECTIONS, GPT, GPTConfig
from .program import backend
from .spec import build
from .surgery import structurize

# the structures compared; "{lowrank}" is filled in per width (rank w/8: a quarter of dense FLOPs)
STRUCTURES = {
    "dense": "dense", "lowrank": "lowrank:rank={lowrank}", "kronecker": "kronecker",
    "monarch": "monarch", "btt1": "btt:rank=1", "btt2": "btt:rank=2", "tt": "tt:cores=3,rank=4",
    "tucker": "tucker:rank=0.25",
}


def spec_for(structure: str, in_features: int, out_features: int) -> str:
    """The layer spec of a benchmark structure name for one layer ("lowrank" 512 -> 2048: rank 64)."""
    if structure not in STRUCTURES:
        raise ValueError(f"unknown structure {structure!r}; valid: {list(STRUCTURES)}")
    return STRUCTURES[structure].format(lowrank=max(1, min(in_features, out_features) // 8))


class Task:
    """What a training run needs from a task (see MLPTask, GPTTask)."""

    name: str
    base_width: int  # muP base width: `lr` is the Adam LR of a dense hidden layer of this width
    lr: float  # default base LR (muP)
    source: str  # where the data came from

    def layer_shapes(self, width: int) -> list[tuple[int, int]]:
        """(in, out) of every structured layer at this width (for the checks before training)."""
        raise NotImplementedError

    def model(self, structure: str, width: int, parameterization: str = "mup") -> nn.Module:
        """The model with `structure` layers at `width`, initialised for `parameterization`."""
        raise NotImplementedError

    def batch(self, generator: torch.Generator):
        raise NotImplementedError

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        raise NotImplementedError

    def val_loss(self, model: nn.Module) -> float:
        raise NotImplementedError


class MLPTask(Task):
    name, base_width, lr = "mlp", 128, 3e-3

    def __init__(self, samples: int = 60000, batch_size: int = 128, val_samples: int | None = None):
        """samples: generated in all, 80% for training; val_samples: keep only the first this
        many of the other 20% (a large set made for fresh training data need not all be scored)."""
        for name, value, least in (("samples", samples, 10), ("batch_size", batch_size, 1),
                                   ("val_samples", val_samples, 1)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < least):
                raise ValueError(f"{name} must be an int >= {least}, got {value!r}")
        self.samples, self.batch_size = samples, batch_size
        train = int(0.8 * samples)
        self.val_samples = min(samples - train, val_samples or samples)
        self.source = f"mnist1d, {train} train / {self.val_samples} validation samples"

    @functools.cached_property
    def data(self):
        """(x, y, x_val, y_val), generated on first use (seconds; ~0.6 ms a sample), so bad
        sweeps fail fast."""
        x, y, x_val, y_val = mnist1d(self.samples)
        return x, y, x_val[:self.val_samples], y_val[:self.val_samples]

    def layer_shapes(self, width):
        return [(width, width)] * 2

    def model(self, structure, width, parameterization="mup"):
        spec = spec_for(structure, width, width)
        model = nn.Sequential(nn.Linear(40, width), nn.GELU(), build(spec, width, width), nn.GELU(),
                              build(spec, width, width), nn.GELU(), nn.Linear(width, 10))
        return mup.init_(model, parameterization)  # readout 10 < width: the spectral rule is 1/width

    def batch(self, generator):
        x, y, _, _ = self.data
        idx = torch.randint(0, len(x), (self.batch_size,), generator=generator)
        return x[idx], y[idx]

    def loss(self, model, batch):
        x, y = batch
        return F.cross_entropy(model(x), y)

    @torch.no_grad()
    def val_loss(self, model):
        _, _, x_val, y_val = self.data
        return F.cross_entropy(model(x_val), y_val).item()


class GPTTask(Task):
    name, base_width, lr = "gpt", 64, 3e-3

    def __init__(self, corpus=None, n_layer: int = 2, n_head: int = 4, block_size: int = 64,
                 batch_size: int = 32, val_batches: int = 16, max_bytes: int = 4_000_000):
        self.corpus = text_corpus(corpus, max_bytes)
        self.n_layer, self.n_head, self.block_size, self.batch_size = n_layer, n_head, block_size, batch_size
        generator = torch.Generator().manual_seed(1234)  # the same validation windows for every run
        self.val = [self.corpus.batch("val", batch_size, block_size, generator) for _ in range(val_batches)]
        self.source = self.corpus.source

    def layer_shapes(self, width):
        if width % self.n_head:
            raise ValueError(f"GPT width must be a multiple of n_head={self.n_head}, got {width}")
        return [(width, width), (width, 4 * width), (4 * width, width)]

    def model(self, structure, width, parameterization="mup"):
        # untied under both parameterizations, so muP and SP train the same architecture
        mup_head_dim = self.base_width // self.n_head if parameterization == "mup" else None
        config = GPTConfig(vocab_size=self.corpus.vocab_size, block_size=self.block_size,
                           n_layer=self.n_layer, n_head=self.n_head, n_embd=width, tie_weights=False,
                           mup_base_head_dim=mup_head_dim)
        model = GPT(config)
        structurize(model, lambda name, linear: spec_for(structure, linear.in_features, linear.out_features),
                    include=BLOCK_PROJECTIONS)
        mup.init_(model, parameterization, readout="lm_head", base_width=self.base_width)
        if parameterization == "mup":  # muP's input layer: O(1) entries at every width
            for embedding in (model.wte, model.wpe):
                nn.init.normal_(embedding.weight, std=1.0)
        return model

    def batch(self, generator):
        return self.corpus.batch("train", self.batch_size, self.block_size, generator)

    def loss(self, model, batch):
        return model(*batch)[1]

    @torch.no_grad()
    def val_loss(self, model):
        return statistics.fmean(model(x, y)[1].item() for x, y in self.val)


TASKS = {"mlp": MLPTask, "gpt": GPTTask}


def check_sweep(task: Task, structures, widths):
    """Raise ValueError before any training if a structure name is unknown or a width cannot be
    factored by a structure without padding (its FLOPs would not be the structure's own)."""
    for structure in structures:
        spec_for(structure, 64, 64)
    for width in widths:
        if isinstance(width, bool) or not isinstance(width, int) or width < 16:
            raise ValueError(f"widths must be ints >= 16, got {width!r}")
        for structure in structures:
            for i, o in task.layer_shapes(width):
                layer = build(spec_for(structure, i, o), i, o)
                if layer.padded:
                    raise ValueError(f"width {width} cannot be factored for {structure} "
                                     f"({layer!r} pads its {i} -> {o} layer); pick widths such as "
                                     "powers of 2")


@dataclass
class Run:
    """One training run: its settings, sizes and loss curve."""

    task: str
    structure: str
    width: int
    lr: float
    parameterization: str
    steps: int
    seed: int
    params: int = 0  # all trainable parameters of the model
    flops_per_step: int = 0  # forward + backward, FlopCounterMode
    step_ms: float = 0.0  # median wall time of a training step (forward, backward, Adam)
    curve: list = field(default_factory=list)  # (step, flops, train_loss, val_loss)

    @property
    def final_val_loss(self) -> float:
        return self.curve[-1][3]

    @property
    def final_train_loss(self) -> float:
        return self.curve[-1][2]

    @property
    def total_flops(self) -> int:
        return self.flops_per_step * self.steps


def eval_steps(steps: int, points: int) -> list[int]:
    """About `points` log-spaced steps in 1..steps, the last one included."""
    raw = {max(1, round(steps ** (k / (points - 1)))) for k in range(points)} if points > 1 else set()
    return sorted(raw | {steps})


def count_flops(task: Task, model: nn.Module, batch) -> int:
    """FLOPs of one forward+backward of `model` on `batch` (gradients are cleared after): the
    structures' own matmuls (backend "torch": not a fused kernel, which FlopCounterMode cannot
    see, nor the dense map a tiny layer may materialise under "auto")."""
    with backend("torch"), FlopCounterMode(display=False) as counter:
        task.loss(model, batch).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def train_run(task: Task, structure: str, width: int, lr: float, steps: int,
              parameterization: str = "mup", seed: int = 0, points: int = 12) -> Run:
    """Train one model (Adam, per-core muP LRs scaled from `lr` at task.base_width, or one LR for
    every parameter under "standard"); validation loss at ~`points` log-spaced steps."""
    torch.manual_seed(seed)
    model = task.model(structure, width, parameterization)
    groups = mup.param_groups(model, lr, task.base_width, parameterization=parameterization)
    optimizer = torch.optim.Adam(groups)
    generator = torch.Generator().manual_seed(seed)
    run = Run(task.name, structure, width, lr, parameterization, steps, seed,
              params=sum(p.numel() for p in model.parameters()))
    run.flops_per_step = count_flops(task, model, task.batch(generator))
    checkpoints, times, losses = set(eval_steps(steps, points)), [], []
    for step in range(1, steps + 1):
        start = time.perf_counter()
        loss = task.loss(model, task.batch(generator))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            raise FloatingPointError(f"{structure} at width {width}, lr {lr:g}: loss is "
                                     f"{losses[-1]} at step {step}")
        if step in checkpoints:
            model.eval()
            val = task.val_loss(model)
            model.train()
            recent = losses[-max(1, min(len(losses), steps // 20)):]  # smooth the batch noise
            run.curve.append((step, step * run.flops_per_step, statistics.fmean(recent), val))
    run.step_ms = 1e3 * statistics.median(times[1:] or times)
    return run


# --- FLOP counts for CPU attention -------------------------------------------------------------
# FlopCounterMode knows the CUDA flash/efficient attention ops but not the CPU one that
# F.scaled_dot_product_attention dispatches to here; give it the same formulas (full, non-causal
# attention FLOPs, as torch counts them on GPU).

@flop_counter.register_flop_formula(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu)
def _cpu_attention_flop(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(query, key, value)


@flop_counter.register_flop_formula(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward)
def _cpu_attention_backward_flop(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_backward_flop_count(grad_out, query, key, value)
