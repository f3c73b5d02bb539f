"""The fused two-core contraction: both block-diagonal matmuls of a Monarch/BTT layer in one kernel.

With u (T, P*Q) read as (T, P, Q) and two cores
    c1: (P, Q, S*R)   block p maps q -> (s, r)
    c2: (S, P*R, N)   block s maps (p, r) -> n
it computes
    h[t, s, p, r] = sum_q u[t, p, q] * c1[p, q, s*R + r]
    v[t, s, n]    = sum_{p, r} h[t, s, p, r] * c2[s, p*R + r, n]
and returns v as (T, S*N). A BTT layer's forward is this with u = x, (P, Q) = (m1, m0),
(S, N) = (n0, n1); its grad input is this too, on dy with the cores' two inner dims swapped.

One program owns BLOCK_T tokens x BLOCK_S output blocks x BLOCK_N output columns. It walks over
the input blocks p in chunks: a batched dot over the chunk's blocks makes its slice of h, a
register transpose regroups h by output block, and a second batched dot adds the slice's share of
v. h never leaves the chip unless it is asked for (STORE_H: the backward needs it).
Both dots run on tensor cores with the tokens as their M; the second dot's K (input blocks x
rank) is 16, which caps the rank at MAX_RANK.
"""

import triton
import triton.language as tl

from .tuning import INTERPRET, autotune, dot_precision, launch, mma, next_pow2, round_to

MAX_RANK = 16

# Tile sizes: BLOCK_T tokens; BLOCK_SR = (output blocks x rank) columns of the first dot;
# BLOCK_PR = (input blocks x rank) = the K of the second dot (tensor cores need >= 16);
# BLOCK_N output columns. Each config was compiled for sm_90 (H100) and none spills registers at
# the benchmark's shapes (benchmarks/kernel_resources.py). The x-tile re-reads (from L2) and the
# weight re-reads trade off against each other; the autotuner measures which wins.
CONFIGS = [
    triton.Config({"BLOCK_T": bt, "BLOCK_SR": sr, "BLOCK_PR": 16, "BLOCK_N": bn}, num_warps=w, num_stages=2)
    for bt, sr, bn, w in (
        (16, 16, 64, 8), (16, 16, 32, 8), (16, 8, 64, 8),
        (32, 8, 64, 8), (32, 8, 32, 8), (32, 16, 16, 8), (32, 4, 64, 8), (32, 4, 32, 4),
        (64, 4, 64, 8), (64, 4, 32, 8), (64, 8, 32, 8),
    )
]


def _prune(configs, args):
    """The configs that can run these sizes, without those whose blocks are wider than the
    (rounded-up) sizes they cover when narrower ones exist; smallest token tile first."""
    rp = args["RP"]
    runnable = [c for c in configs if c.kwargs["BLOCK_SR"] >= rp and c.kwargs["BLOCK_PR"] >= rp]

    def waste(c):
        return (c.kwargs["BLOCK_N"] > max(16, next_pow2(args["N"]))
                or c.kwargs["BLOCK_SR"] > max(4, rp, next_pow2(args["S"]) * rp))

    kept = [c for c in runnable if not waste(c)] or runnable
    return sorted(kept, key=lambda c: (c.kwargs["BLOCK_T"], -c.kwargs["BLOCK_SR"], -c.kwargs["BLOCK_N"]))


@triton.jit
def _two_core_kernel(
    u_ptr, c1_ptr, c2_ptr, v_ptr, h_ptr, bias_ptr,
    T, U_FEATURES, V_FEATURES, T_BUCKET,
    stride_ut, stride_uf,
    stride_c1p, stride_c1q, stride_c1c,
    stride_c2s, stride_c2k, stride_c2n,
    stride_vt, stride_vf,
    P: tl.constexpr, Q: tl.constexpr, S: tl.constexpr, R: tl.constexpr, N: tl.constexpr,
    RP: tl.constexpr, BLOCK_Q: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_SR: tl.constexpr, BLOCK_PR: tl.constexpr, BLOCK_N: tl.constexpr,
    STORE_V: tl.constexpr, STORE_H: tl.constexpr, HAS_BIAS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, INTERPRETED: tl.constexpr,
):
    BLOCK_S: tl.constexpr = BLOCK_SR // RP  # output blocks per program
    BLOCK_P: tl.constexpr = BLOCK_PR // RP  # input blocks per step of the walk
    # output blocks vary fastest, so the programs sharing a token tile run together (u stays in L2)
    tiles_s = tl.cdiv(S, BLOCK_S)
    tiles_n = tl.cdiv(N, BLOCK_N) if STORE_V else 1  # h alone needs no column tiles
    pid = tl.program_id(0)
    pid_t = pid // (tiles_s * tiles_n)
    pid_s = (pid // tiles_n) % tiles_s
    pid_n = pid % tiles_n

    t = pid_t.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = t < T
    # columns of h's first dot: j = (s, r) with s in this program's output blocks
    j = tl.arange(0, BLOCK_S * RP)
    s_j = pid_s * BLOCK_S + j // RP
    r_j = j % RP
    col_ok = (s_j < S) & (r_j < R)
    # rows of the second dot: i = (p, r) within the current input-block chunk
    i = tl.arange(0, BLOCK_P * RP)
    s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)

    acc = tl.zeros((BLOCK_S, BLOCK_T, BLOCK_N), dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        # first dot, batched over the chunk's input blocks: (BP, BT, Q) @ (BP, Q, BS*RP)
        h = tl.zeros((BLOCK_P, BLOCK_T, BLOCK_S * RP), dtype=tl.float32)
        for q0 in range(0, Q, BLOCK_Q):
            q = q0 + tl.arange(0, BLOCK_Q)
            u_feature = p[:, None, None] * Q + q[None, None, :]
            u_ok = t_ok[None, :, None] & (p[:, None, None] < P) & (q[None, None, :] < Q)
            a = tl.load(u_ptr + t[None, :, None] * stride_ut + u_feature * stride_uf,
                        mask=u_ok & (u_feature < U_FEATURES), other=0.0)
            c1_ok = (p[:, None, None] < P) & (q[None, :, None] < Q) & col_ok[None, None, :]
            b = tl.load(c1_ptr + p[:, None, None] * stride_c1p + q[None, :, None] * stride_c1q
                        + (s_j * R + r_j)[None, None, :] * stride_c1c, mask=c1_ok, other=0.0)
            h = mma(a, b, h, DOT_PRECISION, INTERPRETED)
        h = round_to(h, u_ptr.dtype.element_ty, INTERPRETED)  # rounded like the torch path's
        if STORE_H:  # h as (T, S, P*R), written once: by the first column tile
            if pid_n == 0:
                h_offset = t[None, :, None] * (S * P * R) + s_j[None, None, :] * (P * R) \
                    + p[:, None, None] * R + r_j[None, None, :]
                h_ok = t_ok[None, :, None] & (p[:, None, None] < P) & col_ok[None, None, :]
                tl.store(h_ptr + h_offset, h, mask=h_ok)
        if STORE_V:
            # regroup by output block: (BP, BT, BS, RP) -> (BS, BT, BP*RP)
            hb = tl.reshape(tl.permute(tl.reshape(h, (BLOCK_P, BLOCK_T, BLOCK_S, RP)), (2, 1, 0, 3)),
                            (BLOCK_S, BLOCK_T, BLOCK_P * RP))
            # second dot, batched over output blocks: (BS, BT, BP*RP) @ (BS, BP*RP, BN)
            p_i = p0 + i // RP
            r_i = i % RP
            c2_ok = (s[:, None, None] < S) & ((p_i < P) & (r_i < R))[None, :, None] \
                & (n[None, None, :] < N)
            c = tl.load(c2_ptr + s[:, None, None] * stride_c2s + (p_i * R + r_i)[None, :, None] * stride_c2k
                        + n[None, None, :] * stride_c2n, mask=c2_ok, other=0.0)
            acc = mma(hb, c, acc, DOT_PRECISION, INTERPRETED)
    if STORE_V:
        v_feature = s[:, None, None] * N + n[None, None, :]
        feature_ok = (s[:, None, None] < S) & (n[None, None, :] < N) & (v_feature < V_FEATURES)
        if HAS_BIAS:  # the epilogue adds the bias: no extra pass over v
            acc += tl.load(bias_ptr + v_feature, mask=feature_ok, other=0.0).to(tl.float32)
        v_ok = t_ok[None, :, None] & feature_ok
        tl.store(v_ptr + t[None, :, None] * stride_vt + v_feature * stride_vf,
                 round_to(acc, v_ptr.dtype.element_ty, INTERPRETED), mask=v_ok)


_tuned_kernel = autotune(CONFIGS, key=["P", "Q", "S", "R", "N", "T_BUCKET"], prune=_prune)(_two_core_kernel)


def two_core(u, c1, c1_strides, c2, c2_strides, dims, v_features, store_v=True, store_h=False,
             bias=None, config=None):
    """v (T, v_features) and h (T, S, P*R) (None unless store_h) of the fused contraction.

    u: (T, u_features) with u_features <= P*Q: missing input features count as zero (the layer's
    padding). v keeps its first v_features <= S*N columns (the layer's cropping).
    c1_strides / c2_strides: strides of c1 read as (P, Q, S*R) and of c2 as (S, P*R, N), so a
    transposed core is passed without a copy. dims: (P, Q, S, R, N). bias: (v_features,) added
    to v, or None. config: a triton.Config to force (tests sweep them), else autotuned.
    """
    P, Q, S, R, N = dims
    if not 1 <= R <= MAX_RANK:
        raise ValueError(f"the fused kernel takes ranks 1..{MAX_RANK}, got {R}")
    T = u.shape[0]
    v = u.new_empty(T, v_features) if store_v else None
    h = u.new_empty(T, S, P * R) if store_h else None
    if T > 0:
        args = kernel_args(u, c1, c1_strides, c2, c2_strides, dims, v, h, bias)
        launch(_two_core_kernel, _tuned_kernel, grid(args), args, config, _prune)
    return v, h


def inner_swapped(core) -> tuple[int, int, int]:
    """Strides that read a core (B, X, Y) as (B, Y, X): how the grad-input pass reads the cores."""
    return core.stride(0), core.stride(2), core.stride(1)


def kernel_args(u, c1, c1_strides, c2, c2_strides, dims, v, h, bias=None) -> dict:
    """The kernel's arguments but the tile sizes (v or h None: not stored; bias None: none)."""
    P, Q, S, R, N = dims
    return dict(
        u_ptr=u, c1_ptr=c1, c2_ptr=c2, v_ptr=u if v is None else v, h_ptr=u if h is None else h,
        bias_ptr=u if bias is None else bias,
        T=u.shape[0], U_FEATURES=u.shape[1], V_FEATURES=S * N if v is None else v.shape[1],
        T_BUCKET=min(next_pow2(u.shape[0]), 1 << 16),
        stride_ut=u.stride(0), stride_uf=u.stride(1),
        stride_c1p=c1_strides[0], stride_c1q=c1_strides[1], stride_c1c=c1_strides[2],
        stride_c2s=c2_strides[0], stride_c2k=c2_strides[1], stride_c2n=c2_strides[2],
        stride_vt=0 if v is None else v.stride(0), stride_vf=1,
        P=P, Q=Q, S=S, R=R, N=N, RP=next_pow2(R), BLOCK_Q=min(max(next_pow2(Q), 16), 32),
        STORE_V=v is not None, STORE_H=h is not None, HAS_BIAS=bias is not None,
        DOT_PRECISION=dot_precision(u.dtype), INTERPRETED=INTERPRET,
    )


def grid(args: dict):
    """One program per (token tile, output-block group, column tile)."""

    def programs(meta):
        blocks_per_program = meta["BLOCK_SR"] // args["RP"]
        column_tiles = triton.cdiv(args["N"], meta["BLOCK_N"]) if args["STORE_V"] else 1
        return (triton.cdiv(args["T"], meta["BLOCK_T"]) * triton.cdiv(args["S"], blocks_per_program)
                * column_tiles,)

    return programs
