"""A layer is cores plus a contraction program.

The activation is a tensor (T, *modes) with T tokens and named modes. A `Step` contracts it with one
core: the modes shared by the activation and the core but not the output are summed (the core's
fan-in), the core's modes that appear only in the output are produced (its fan-out), and modes in
all three are block (batch) dims of a batched matmul. Everything else about a layer follows from
its steps: forward, `to_dense` (the cores contracted as one network), FLOPs, and muP fans.

`contract` is the single choke point where an activation meets a core; the precision policies
hook in there. A program that a fused kernel computes whole (2-core Monarch/BTT) skips the steps
altogether when the backend picks the kernel (`fused_forward`).
"""

import importlib.util
import string
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from math import prod

import opt_einsum
import torch

_BACKENDS = ("torch", "einsum", "triton", "auto")
_backend = "auto"


@contextmanager
def backend(name: str):
    """Choose the contraction path inside a `with` block.

    "torch": the execution plans (plan.py: strided batched matmuls in chosen layouts, a custom
    backward) on every layer, always as the structure's own matmuls. "einsum": one torch.einsum
    per step, the reference the plans are tested against (and what a precision policy or
    torch.compile runs). "triton": the fused Triton kernels on every layer that has one (2-core
    Monarch/BTT), the torch path elsewhere; inputs the kernels cannot take raise an error.
    "auto" (the default): the kernels for CUDA inputs of a dtype they support when Triton is
    installed, else torch, except that a tiny layer whose plan prices the dense map cheaper
    materialises W = to_dense() and runs one F.linear. A layer with a precision policy always
    runs the einsum path, where the policy hooks in.
    """
    global _backend
    if name not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {name!r}")
    if name == "triton" and not _triton_installed():
        raise RuntimeError("backend 'triton' needs the triton package (Linux): "
                           "pip install 'structlayers[gpu]'")
    previous, _backend = _backend, name
    try:
        yield
    finally:
        _backend = previous


def current_backend() -> str:
    return _backend


def uses_plans() -> bool:
    """Whether the torch path runs execution plans (plan.py) rather than the reference einsums:
    everywhere but under backend("einsum") and while torch.compile traces (inductor plans the
    einsums itself)."""
    return _backend != "einsum" and not torch.compiler.is_compiling()


@lru_cache(maxsize=1)
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def fused_forward(program, x: torch.Tensor, policy=None):
    """The fused kernel's forward (x, cores, out_features, bias) -> y for this program under the
    current backend, or None where the torch path runs (see `backend`)."""
    if _backend in ("torch", "einsum") or policy is not None:
        return None
    if _backend == "auto" and not (x.is_cuda and _triton_installed()):
        return None
    from structlayers import kernels  # imports triton: only when a kernel may run

    return kernels.fused_forward(program, x, forced=_backend == "triton")


@dataclass(frozen=True)
class Step:
    """Contract the activation (T, *x_modes) with core `core` viewed as (*core_modes).

    The result is (T, *out_modes). `sizes` maps every mode name to its size.
    """

    core: str
    x_modes: tuple[str, ...]
    core_modes: tuple[str, ...]
    out_modes: tuple[str, ...]
    sizes: tuple[tuple[str, int], ...]
    equation: str  # torch.einsum equation, the token dim is 'a'

    def size(self, modes) -> int:
        sizes = dict(self.sizes)
        return prod(sizes[m] for m in modes)

    @property
    def core_shape(self) -> tuple[int, ...]:
        sizes = dict(self.sizes)
        return tuple(sizes[m] for m in self.core_modes)

    @property
    def fan_in(self) -> int:
        """Size of the summed modes: the d_in of this core as a (batched) dense matrix."""
        return self.size(m for m in self.core_modes if m in self.x_modes and m not in self.out_modes)

    @property
    def fan_out(self) -> int:
        """Size of the modes the core produces: its d_out as a (batched) dense matrix."""
        return self.size(m for m in self.core_modes if m in self.out_modes and m not in self.x_modes)

    @property
    def blocks(self) -> int:
        """Number of independent blocks (block-diagonal structure) of this core."""
        return self.size(m for m in self.core_modes if m in self.x_modes and m in self.out_modes)

    def flops(self, tokens: int) -> int:
        """Multiply-adds x 2 of the batched matmul: 2 * T * (product of all distinct mode sizes)."""
        modes = set(self.x_modes) | set(self.core_modes) | set(self.out_modes)
        return 2 * tokens * self.size(modes)


def make_step(core, x_modes, core_modes, out_modes, sizes: dict) -> Step:
    """Build a Step, checking that every mode is summed, produced, or carried consistently."""
    x_modes, core_modes, out_modes = tuple(x_modes), tuple(core_modes), tuple(out_modes)
    for m in set(x_modes) | set(core_modes) | set(out_modes):
        where = (m in x_modes) + (m in core_modes) + (m in out_modes)
        if where < 2:
            raise ValueError(f"step for core {core!r}: mode {m!r} appears in only one operand")
    used = {m: sizes[m] for m in set(x_modes) | set(core_modes) | set(out_modes)}
    letter = dict(zip(sorted(used), string.ascii_letters[1:], strict=False))  # 'a' is for tokens

    def subs(modes):
        return "".join(letter[m] for m in modes)

    equation = f"a{subs(x_modes)},{subs(core_modes)}->a{subs(out_modes)}"
    return Step(core, x_modes, core_modes, out_modes, tuple(sorted(used.items())), equation)


@dataclass(frozen=True)
class Program:
    """Reshape x (T, i_padded) to (T, *in_modes), run the steps, flatten (T, *out_modes)."""

    in_modes: tuple[str, ...]
    steps: tuple[Step, ...]
    sizes: tuple[tuple[str, int], ...]

    @property
    def in_shape(self) -> tuple[int, ...]:
        sizes = dict(self.sizes)
        return tuple(sizes[m] for m in self.in_modes)

    @property
    def out_modes(self) -> tuple[str, ...]:
        return self.steps[-1].out_modes

    @property
    def dense_shape(self) -> tuple[int, int]:
        """(out, in) of the dense map W: the products of the output and the input mode sizes."""
        sizes = dict(self.sizes)
        return prod(sizes[m] for m in self.out_modes), prod(sizes[m] for m in self.in_modes)

    def flops(self, tokens: int) -> int:
        return sum(step.flops(tokens) for step in self.steps)


def _dense_equation(program: Program) -> tuple[str, list[tuple[int, ...]]]:
    symbol = {m: opt_einsum.get_symbol(k) for k, (m, _) in enumerate(program.sizes)}
    inputs = ",".join("".join(symbol[m] for m in step.core_modes) for step in program.steps)
    output = "".join(symbol[m] for m in (*program.out_modes, *program.in_modes))
    return f"{inputs}->{output}", [step.core_shape for step in program.steps]


@lru_cache(maxsize=256)
def dense_flops(program: Program) -> int:
    """FLOPs of contracting the cores to W along opt_einsum's path (for the plans' cost model)."""
    equation, shapes = _dense_equation(program)
    return int(opt_einsum.contract_path(equation, *shapes, shapes=True)[1].opt_cost)


@lru_cache(maxsize=256)
def dense_expression(program: Program):
    """A cached opt_einsum expression: cores -> W as (*out_modes, *in_modes).

    The program read as a tensor network: the input and final output modes stay open, every other
    mode (ranks, intermediate modes) is summed. opt_einsum picks the contraction order once, which
    is far cheaper than running the program on an identity matrix (e.g. for TT).
    """
    equation, shapes = _dense_equation(program)
    return opt_einsum.contract_expression(equation, *shapes)


def dense(program: Program, cores: dict) -> torch.Tensor:
    """(prod(out sizes), prod(in sizes)) matrix of the program with these cores."""
    operands = [cores[step.core].reshape(step.core_shape) for step in program.steps]
    w = dense_expression(program)(*operands, backend="torch")
    return w.reshape(program.dense_shape)


def make_program(in_modes, steps, sizes: dict) -> Program:
    """Check that the steps chain (each step's x_modes = previous out_modes)."""
    modes = tuple(in_modes)
    for step in steps:
        if tuple(step.x_modes) != modes:
            raise ValueError(f"step {step.core!r} expects modes {step.x_modes}, gets {modes}")
        modes = step.out_modes
    return Program(tuple(in_modes), tuple(steps), tuple(sorted(sizes.items())))


def contract(x: torch.Tensor, core: torch.Tensor, step: Step, policy=None) -> torch.Tensor:
    """The choke point: (T, *x_modes) x core(*core_modes) -> (T, *out_modes).

    `policy` (a precision policy) may scale/quantize both operands of this one contraction.
    """
    core = core.view(step.core_shape)
    if policy is not None:
        return policy.contract(x, core, step)
    return torch.einsum(step.equation, x, core)


def run(program: Program, x: torch.Tensor, cores: dict, policy=None) -> torch.Tensor:
    """x: (T, prod(in_shape)) -> (T, prod(out sizes)), running every step through `contract`."""
    h = x.reshape(x.shape[0], *program.in_shape)
    for step in program.steps:
        h = contract(h, cores[step.core], step, policy)
    return h.flatten(1)
