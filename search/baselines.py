"""The classical, search-free baselines: TT-SVD and TR-SVD with an error tolerance.

TT-SVD (Oseledets 2011): sweep left to right, truncating each unfolding's SVD to the smallest
rank whose discarded energy is below (eps ||T||)^2 / (N - 1), so the total relative error is at
most eps. TR-SVD (Zhao et al. 2016): the first unfolding's rank R is split into the ring's closing
bond r_0 and r_1 (r_0 r_1 = R, r_0 as close to sqrt(R) as divides it), then TT-SVD on the rest.
Both return a SearchResult (evaluations = 0: nothing is fitted by trial).
"""

import time

import numpy as np

from .fit import check_target
from .result import SearchResult
from .runner import objective
from .structure import Structure


def tt_svd(target, eps: float = 1e-6, lam: float = 200.0) -> SearchResult:
    start = time.perf_counter()
    target, eps = check_target(target), _check_eps(eps)
    cores, ranks, _ = _sweep(target[None], 1, eps / np.sqrt(max(1, target.ndim - 1)))
    structure = Structure.tensor_train(target.shape, ranks)
    return _result(target, structure, _to_structure_layout(cores, ring=False), lam, start, "tt-svd")


def tr_svd(target, eps: float = 1e-6, lam: float = 200.0) -> SearchResult:
    start = time.perf_counter()
    target, eps = check_target(target), _check_eps(eps)
    n = target.ndim
    if n < 3:
        raise ValueError(f"a tensor ring needs at least 3 modes, got shape {target.shape}")
    delta = eps / np.sqrt(n)
    first = target.reshape(target.shape[0], -1)
    u, s, vh = np.linalg.svd(first, full_matrices=False)
    rank = _truncation_rank(s, delta * np.linalg.norm(s))
    r0 = max(d for d in range(1, int(np.sqrt(rank)) + 1) if rank % d == 0)
    r1 = rank // r0
    core0 = u[:, :rank].reshape(target.shape[0], r0, r1).transpose(1, 0, 2)  # (r0, I0, r1)
    rest = (s[:rank, None] * vh[:rank]).reshape(r0, r1, *target.shape[1:])
    rest = np.moveaxis(rest, 0, -1).reshape(r1, *target.shape[1:-1], target.shape[-1] * r0)
    tail, ranks, _ = _sweep(rest, r1, delta, last_size=target.shape[-1], closing=r0)
    cores = [core0, *tail]
    structure = Structure.tensor_ring(target.shape, [r1, *ranks, r0])
    return _result(target, structure, _to_structure_layout(cores, ring=True), lam, start, "tr-svd")


def _check_eps(eps) -> float:
    if not (isinstance(eps, int | float) and 0 < eps < 1):
        raise ValueError(f"eps (relative error tolerance) must be in (0, 1), got {eps!r}")
    return float(eps)


def _truncation_rank(s, tolerance) -> int:
    """Smallest rank whose discarded singular values have norm <= tolerance."""
    tails = np.sqrt(np.cumsum(s[::-1] ** 2))[::-1]  # tails[k] = norm of s[k:]
    keep = [k for k in range(1, len(s) + 1) if k == len(s) or tails[k] <= tolerance]
    return keep[0]


def _sweep(tensor, left_rank, delta, last_size=None, closing=1):
    """TT-SVD of `tensor` (left_rank, I_1, ..., I_k[*closing]); cores (r, I, r')."""
    norm = np.linalg.norm(tensor)
    sizes = list(tensor.shape[1:])
    if last_size is not None:
        sizes[-1] = last_size
    cores, ranks, r = [], [], left_rank
    rest = tensor.reshape(r * sizes[0], -1)
    for k, size in enumerate(sizes[:-1]):
        u, s, vh = np.linalg.svd(rest, full_matrices=False)
        rank = _truncation_rank(s, delta * norm)
        cores.append(u[:, :rank].reshape(r, size, rank))
        ranks.append(rank)
        r = rank
        rest = (s[:rank, None] * vh[:rank]).reshape(r * sizes[k + 1], -1)
    cores.append(rest.reshape(r, sizes[-1], closing))
    return cores, ranks, r


def _to_structure_layout(cores, ring: bool):
    """Cores (r_left, I, r_right) -> Structure's layout: (I, bonds to the neighbours in index
    order), bonds of rank 1 (no edge) dropped."""
    n = len(cores)
    out = []
    for k, core in enumerate(cores):
        core = core.transpose(1, 0, 2)  # (I, left, right)
        left, right = (k - 1) % n, (k + 1) % n
        bonds = [(b, axis) for b, axis in ((left, 1), (right, 2))
                 if core.shape[axis] > 1 and (ring or b == k + 1 or b == k - 1)]
        order = [axis for _, axis in sorted(bonds)]
        out.append(core.transpose(0, *order, *(a for a in (1, 2) if a not in order))
                   .reshape(core.shape[0], *(core.shape[a] for a in order)))
    return out


def _result(target, structure, cores, lam, start, method) -> SearchResult:
    rse = float(np.sum((structure.contract(cores) - target) ** 2) / np.sum(target**2))
    return SearchResult(structure, cores, rse, objective(structure, rse, lam), 0,
                        time.perf_counter() - start, method)
