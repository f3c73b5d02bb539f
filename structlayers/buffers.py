"""Reused activation buffers for the execution plans.

On CPU a fresh large tensor costs page faults on its first write: glibc serves allocations above
its mmap threshold (at most 32 MiB) with new pages every time, and filling a fresh 32 MiB buffer
took 11.7 ms on the 2-core dev machine against 0.86 ms for a reused one, more than the matmul
that writes it. So the plans take their intermediates from this pool: a buffer is handed out
again, in any shape of its size, once nothing but the pool refers to its storage (no tensor,
view, autograd-saved tensor or returned output), so reuse is never visible to anyone. The pool
keeps at most `MAX_BYTES`; `clear()` drops it (like torch.cuda.empty_cache). Only CPU tensors are
pooled: CUDA has its own caching allocator.
"""

from math import prod

import torch

MAX_BYTES = 2 << 30  # what the pool may keep alive in all

_pool: dict[tuple, list[torch.Tensor]] = {}
_bytes = 0


def _storage_refs(t: torch.Tensor) -> int:
    return torch._C._storage_Use_Count(t.untyped_storage()._cdata)


_ALONE = _storage_refs(torch.empty(1))  # the count of a storage held by one tensor only


def empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised contiguous tensor, reusing a pooled one that nobody else holds."""
    if device.type != "cpu":
        return torch.empty(shape, dtype=dtype, device=device)
    global _bytes
    numel = prod(shape)  # pooled flat, so that buffers of one size serve every shape of it
    key = (numel, dtype, torch.is_inference_mode_enabled())
    free = _pool.setdefault(key, [])
    for buffer in free:
        if _storage_refs(buffer) == _ALONE:
            return buffer.view(shape)  # a new tensor on the storage: its holders count as refs
    buffer = torch.empty(numel, dtype=dtype, device=device)
    size = buffer.numel() * buffer.element_size()
    if _bytes + size <= MAX_BYTES:
        free.append(buffer)
        _bytes += size
        return buffer.view(shape)
    return buffer


def clear() -> None:
    """Drop every pooled buffer (memory that no tensor uses goes back to the allocator)."""
    global _bytes
    _pool.clear()
    _bytes = 0


def pooled_bytes() -> int:
    return _bytes
