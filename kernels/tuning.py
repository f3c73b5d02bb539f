"""How the kernels are launched: autotuned on a GPU, a fixed config under Triton's interpreter.

`TRITON_INTERPRET=1` must be set before this package is imported (triton.jit reads it when the
kernels are defined); the kernels then run on CPU tensors, which is how CI tests them.
"""

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 operands follow torch's own TF32 switch, so the kernel matches the torch path."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def launch(kernel, tuned, grid, args: dict, config: triton.Config | None, prune):
    """Run `kernel` with `config`, or autotuned (`tuned`) when no config is given.

    The interpreter cannot benchmark, so there the first config that `prune` keeps runs.
    """
    if config is None and INTERPRET:
        config = prune(tuned.configs, args)[0]
    if config is None:
        return tuned[grid](**args)
    return kernel[grid](**args, **config.kwargs, num_warps=config.num_warps,
                        num_stages=config.num_stages)


def autotune(configs, key, prune):
    """triton.autotune with an early prune; `prune(configs, args)` drops configs that cannot run."""

    def early_prune(configs, named_args, **kwargs):
        kept = prune(configs, named_args | kwargs)
        if not kept:
            raise ValueError("no kernel config fits these sizes")
        return kept

    return triton.autotune(configs, key=key, prune_configs_by={"early_config_prune": early_prune})


@triton.jit
def mma(a, b, acc, DOT_PRECISION: tl.constexpr, INTERPRETED: tl.constexpr):
    """acc + a @ b (batched when 3-D), accumulating in fp32.

    Under the interpreter (INTERPRETED), whose dot multiplies bf16 operands as raw bit patterns,
    the operands go to fp32 first: exact, and the same products a tensor core forms.
    """
    if INTERPRETED:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def round_to(x, dtype: tl.constexpr, INTERPRETED: tl.constexpr):
    """x (fp32) rounded to nearest-even in `dtype`, as a GPU's conversion does.

    The interpreter truncates fp32 -> bf16 instead, so there the rounding is done on the bits:
    add half an ulp of bf16 (ties to even), then the truncating cast is exact.
    """
    if dtype == tl.bfloat16 and INTERPRETED:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)
