"""Gradient of a block-diagonal core: a token reduction per block.

With a (T, BLOCKS*K) read as (T, BLOCKS, K) and b (T, BLOCKS*N) read as (T, BLOCKS, N),
    g[blk, k, n] = sum_t a[t, blk, k] * b[t, blk, n]        g: (BLOCKS, K, N)
and optionally the column sums of b, sum_t b[t, :] (the bias gradient when b is grad y).
For a BTT layer: grad W0 = block_grad(x, grad h) and grad W1 = block_grad(h, grad y).

The reduction is long (all tokens) and the output small, so the tokens are split over SPLITS
program rows that each write an fp32 partial sum; the partials are added in a fixed order
(deterministic, unlike atomics).
"""

import torch
import triton
import triton.language as tl

from .tuning import INTERPRET, autotune, dot_precision, launch, mma, next_pow2

CONFIGS = [triton.Config({"BLOCK_T": bt}, num_warps=w, num_stages=st)
           for bt, w in ((32, 4), (64, 4), (128, 8)) for st in (2, 3, 4)]
_TOKENS_PER_SPLIT_MULTIPLE = 256  # every BLOCK_T divides it, so splits never share a token tile


def _prune(configs, args):
    return sorted(configs, key=lambda c: c.kwargs["BLOCK_T"])


@triton.jit
def _block_grad_kernel(
    a_ptr, b_ptr, g_ptr, b_sum_ptr,
    T, A_FEATURES, B_FEATURES, TOKENS_PER_SPLIT, T_BUCKET,
    stride_at, stride_af, stride_bt, stride_bf,
    BLOCKS: tl.constexpr, K: tl.constexpr, N: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr, SUM_B: tl.constexpr,
    DOT_PRECISION: tl.constexpr, INTERPRETED: tl.constexpr,
):
    tiles_k = tl.cdiv(K, BLOCK_K)
    tiles_n = tl.cdiv(N, BLOCK_N)
    pid = tl.program_id(0)
    split = tl.program_id(1)
    blk = pid // (tiles_k * tiles_n)
    pid_k = (pid // tiles_n) % tiles_k
    k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    n = pid % tiles_n * BLOCK_N + tl.arange(0, BLOCK_N)
    a_feature = blk * K + k
    b_feature = blk * N + n
    a_ok = (k < K) & (a_feature < A_FEATURES)
    b_ok = (n < N) & (b_feature < B_FEATURES)

    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    b_sum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    t_start = split.to(tl.int64) * TOKENS_PER_SPLIT
    t_end = tl.minimum(t_start + TOKENS_PER_SPLIT, T)
    for t0 in range(t_start, t_end, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        t_ok = t < t_end
        a_t = tl.load(a_ptr + t[None, :] * stride_at + a_feature[:, None] * stride_af,
                      mask=a_ok[:, None] & t_ok[None, :], other=0.0)  # (BK, BT): a transposed
        b = tl.load(b_ptr + t[:, None] * stride_bt + b_feature[None, :] * stride_bf,
                    mask=t_ok[:, None] & b_ok[None, :], other=0.0)  # (BT, BN)
        acc = mma(a_t, b, acc, DOT_PRECISION, INTERPRETED)
        if SUM_B:
            b_sum += tl.sum(b.to(tl.float32), axis=0)
    g_offset = ((split * BLOCKS + blk) * K + k[:, None]).to(tl.int64) * N + n[None, :]
    tl.store(g_ptr + g_offset, acc, mask=(k < K)[:, None] & (n < N)[None, :])
    if SUM_B:
        if pid_k == 0:  # one k tile writes the column sums
            tl.store(b_sum_ptr + split.to(tl.int64) * BLOCKS * N + b_feature, b_sum, mask=n < N)


_tuned_kernel = autotune(CONFIGS, key=["BLOCKS", "K", "N", "T_BUCKET"], prune=_prune)(_block_grad_kernel)


def block_grad(a, b, dims, splits=None, config=None, sum_b=False):
    """g (BLOCKS, K, N) in a's dtype, and with sum_b also b's column sums (b_features,) in b's
    dtype; dims = (BLOCKS, K, N).

    a: (T, a_features <= BLOCKS*K) and b: (T, b_features <= BLOCKS*N), any strides; missing
    features count as zero. splits: how many token ranges run in parallel (default: enough
    programs to fill the GPU). config: a triton.Config to force, else autotuned.
    """
    args = kernel_args(a, b, dims, splits, sum_b)
    launch(_block_grad_kernel, _tuned_kernel, grid(args), args, config, _prune)
    g = args["g_ptr"].sum(0).to(a.dtype)
    if not sum_b:
        return g
    return g, args["b_sum_ptr"].sum(0).flatten()[: b.shape[1]].to(b.dtype)


def kernel_args(a, b, dims, splits=None, sum_b=False) -> dict:
    """The kernel's arguments but the tile sizes; g_ptr (and b_sum_ptr) are the fp32 partial
    sums to fill, one row per split."""
    blocks, K, N = dims
    T = a.shape[0]
    block_k, block_n = min(max(next_pow2(K), 16), 64), min(max(next_pow2(N), 16), 64)
    programs = blocks * triton.cdiv(K, block_k) * triton.cdiv(N, block_n)
    if splits is None:
        splits = max(1, min(triton.cdiv(4 * _sm_count(a.device), programs),
                            triton.cdiv(T, 4 * _TOKENS_PER_SPLIT_MULTIPLE)))
    per_split = triton.cdiv(triton.cdiv(max(T, 1), splits), _TOKENS_PER_SPLIT_MULTIPLE) \
        * _TOKENS_PER_SPLIT_MULTIPLE
    partial = torch.empty(splits, blocks, K, N, device=a.device, dtype=torch.float32)
    return dict(
        a_ptr=a, b_ptr=b, g_ptr=partial,
        b_sum_ptr=torch.empty(splits, blocks, N, device=a.device, dtype=torch.float32) if sum_b else partial,
        T=T, A_FEATURES=a.shape[1], B_FEATURES=b.shape[1], TOKENS_PER_SPLIT=per_split,
        T_BUCKET=min(next_pow2(T), 1 << 16),
        stride_at=a.stride(0), stride_af=a.stride(1), stride_bt=b.stride(0), stride_bf=b.stride(1),
        BLOCKS=blocks, K=K, N=N, BLOCK_K=block_k, BLOCK_N=block_n, SUM_B=sum_b,
        DOT_PRECISION=dot_precision(a.dtype), INTERPRETED=INTERPRET,
    )


def grid(args: dict) -> tuple[int, int]:
    tiles = triton.cdiv(args["K"], args["BLOCK_K"]) * triton.cdiv(args["N"], args["BLOCK_N"])
    return args["BLOCKS"] * tiles, args["g_ptr"].shape[0]


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count
