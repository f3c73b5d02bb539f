"""Compile a kernel for a GPU architecture on a machine without a GPU, and read its resources.

Triton ships the NVIDIA toolchain (ptxas, cuobjdump), so the full pipeline (TTIR -> TTGIR ->
LLVM -> PTX -> cubin) runs anywhere. This catches what the interpreter cannot: code that does not
lower for the target, and tile configs that spill registers or overflow shared memory.

    compiled = compile_for_gpu(kernel, args, config)        # sm_90 (H100) by default
    resources(compiled) -> {"registers": 168, "spill_bytes": 0, "shared_bytes": 40960}

`args` are the launch arguments (tensors may live on the meta device: only dtype and alignment
are read); ints are specialised as the JIT does (1 becomes a constant, multiples of 16 are
marked divisible), so the code matches what a real launch compiles.
"""

import re
import subprocess
import tempfile
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import block_grad as grad_kernel
from . import two_core as fused_kernel

_TRITON_TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
_DIVISIBLE = [["tt.divisibility", 16]]


def compile_for_gpu(kernel, args: dict, config: triton.Config, arch: int = 90):
    """The kernel compiled for CUDA compute capability `arch` (90: H100/H200).

    Needs the compiled (not interpreted) kernels: TRITON_INTERPRET unset when they were imported.
    """
    if not isinstance(kernel, triton.runtime.JITFunction):
        raise RuntimeError("compile_for_gpu needs kernels defined without TRITON_INTERPRET=1")
    constexpr_names = {kernel.arg_names[i] for i in kernel.constexprs}
    values = args | config.kwargs
    signature, constants, attrs = {}, {}, {}
    for index, name in enumerate(kernel.arg_names):
        value = values[name]
        if isinstance(value, torch.Tensor):
            signature[name] = "*" + _TRITON_TYPES[value.dtype]
            attrs[(index,)] = _DIVISIBLE  # torch allocations are 16-byte aligned
        elif isinstance(value, int) and not isinstance(value, bool) and name not in constexpr_names:
            signature[name] = "i32"
            if value == 1:
                signature[name], constants[(index,)] = "constexpr", 1
            elif value % 16 == 0:
                attrs[(index,)] = _DIVISIBLE
        else:
            signature[name], constants[(index,)] = "constexpr", value
    source = ASTSource(kernel, signature, constexprs=constants, attrs=attrs)
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)


def resources(compiled) -> dict:
    """Registers per thread, bytes spilled to local memory (stack), shared memory per program."""
    cuobjdump = Path(triton.backends.nvidia.__file__).parent / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        report = subprocess.run([str(cuobjdump), "-res-usage", cubin.name], capture_output=True,
                                text=True, check=True).stdout
    usage = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+)", report)
    if usage is None:
        raise RuntimeError(f"cuobjdump reported no resource usage:\n{report}")
    registers, stack, static_shared = map(int, usage.groups())
    return {"registers": registers, "spill_bytes": stack,
            "shared_bytes": static_shared + compiled.metadata.shared}


def btt_launches(dims, tokens: int, dtype) -> dict:
    """role -> (kernel module, kernel, launch arguments on the meta device) of every kernel a
    2-core BTT layer with dims (m1, m0, n0, r, n1) and a bias runs for `tokens` rows."""
    m1, m0, n0, r, n1 = dims

    def meta(*shape):
        return torch.empty(*shape, device="meta", dtype=dtype)

    x, y = meta(tokens, m1 * m0), meta(tokens, n0 * n1)
    w0, w1 = meta(m1, m0, n0 * r), meta(n0, m1 * r, n1)
    fused, grad = fused_kernel._two_core_kernel, grad_kernel._block_grad_kernel
    swapped = fused_kernel.inner_swapped
    return {
        "forward": (fused_kernel, fused, fused_kernel.kernel_args(
            x, w0, w0.stride(), w1, w1.stride(), (m1, m0, n0, r, n1), y, meta(tokens, n0, m1 * r),
            meta(n0 * n1))),
        "grad x": (fused_kernel, fused, fused_kernel.kernel_args(
            y, w1, swapped(w1), w0, swapped(w0), (n0, n1, m1, r, m0), x, meta(tokens, m1, n0 * r))),
        "grad W0": (grad_kernel, grad, grad_kernel.kernel_args(
            x, meta(tokens, m1 * n0 * r), (m1, m0, n0 * r), 1)),
        "grad W1": (grad_kernel, grad, grad_kernel.kernel_args(
            meta(tokens, n0 * m1 * r), y, (n0, m1 * r, n1), 1, sum_b=True)),
    }
