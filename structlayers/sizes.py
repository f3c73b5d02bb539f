"""Factor sizes into near-equal factors, padding sizes that factor badly.

A structured layer tensorizes its input size `i` into factors i_0 * ... * i_{k-1}. A size such as
a prime cannot be split, so the layer pads to the nearest size that factors well (zero-padded
input, cropped output); the padding is kept small (typically well under 15% extra FLOPs).
"""

from functools import lru_cache
from math import prod


def check_size(name: str, value) -> int:
    """A positive int, or a TypeError/ValueError naming the argument."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a positive int, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be a positive int (>= 1), got {value}")
    return value


@lru_cache(maxsize=4096)
def balanced_factors(n: int, k: int) -> tuple[int, ...]:
    """The factorization n = f_0 * ... * f_{k-1} (ascending) with the smallest largest factor.

    Ties are broken by the smallest sum of factors (the cost of most structures grows with it).
    """
    if k == 1:
        return (n,)
    best = None

    def search(rest, k_left, low, acc):
        nonlocal best
        if k_left == 1:
            if rest >= low:
                cand = (*acc, rest)
                key = (max(cand), sum(cand))
                if best is None or key < best[0]:
                    best = (key, cand)
            return
        f = low
        while f ** k_left <= rest:
            if rest % f == 0:
                search(rest // f, k_left - 1, f, (*acc, f))
            f += 1

    search(n, k, 1, ())
    return best[1]


CHEAP_ENOUGH = 1.10  # prefer less padding when the cost is within 10% of the cheapest


def padded_factors(n: int, k: int) -> tuple[int, ...]:
    """Factors (ascending) of the smallest size m >= n whose cost m * sum(factors) is within 10%
    of the cheapest (so powers of two never pad).

    The cost of the structures grows with both the padded size and the factors' sizes (for BTT
    with 2 cores it is proportional to m * (m_0 + m_1)), so e.g. 97 with 3 factors pads to
    100 = 4 * 5 * 5 rather than 98 = 2 * 7 * 7, while 1000 with 2 stays (25, 40). The scan stops
    when even equal factors (sum >= k * m^(1/k)) could not beat the cheapest cost found.
    """
    costs, cheapest, m = {}, float("inf"), n
    while k * m ** (1 + 1 / k) < cheapest * (1 + 1e-12):
        costs[m] = m * sum(balanced_factors(m, k))
        cheapest, m = min(cheapest, costs[m]), m + 1
    m = min(m for m, cost in costs.items() if cost <= CHEAP_ENOUGH * cheapest)
    return balanced_factors(m, k)


def padded_multiple(n: int, block: int) -> int:
    """The smallest multiple of `block` that is >= n."""
    return -(-n // block) * block


def resolve_factors(name: str, factors, size: int, k: int) -> tuple[int, ...]:
    """User-given factors (product >= size, padding the rest) or the default near-equal ones."""
    if factors is None:
        return padded_factors(size, k)
    factors = (factors,) if isinstance(factors, int) and k == 1 else factors
    if not isinstance(factors, list | tuple):
        raise TypeError(f"{name} must be a sequence of {k} positive ints, got {factors!r}")
    factors = tuple(factors)
    if len(factors) != k or not all(isinstance(f, int) and f >= 1 for f in factors):
        raise ValueError(f"{name} must be {k} positive ints, got {factors!r}")
    if prod(factors) < size:
        raise ValueError(f"{name}={factors} multiply to {prod(factors)} < {size}; "
                         f"their product must be at least the size")
    return factors


def check_ranks(name: str, rank, bonds: int, max_rank, default: int = 1) -> tuple[int, ...]:
    """An int (the same on every bond) or a sequence with one rank per bond.

    max_rank(k, left) is the largest rank bond k can use when the bond before it has rank `left`
    (1 before the first bond); each rank must be in 1..max_rank. rank=None is the layer's
    `default`, capped on every bond at what the sizes allow.
    """
    if rank is None:
        ranks, left = [], 1
        for k in range(bonds):
            ranks.append(min(default, max_rank(k, left)))
            left = ranks[-1]
        return tuple(ranks)
    if isinstance(rank, int) and not isinstance(rank, bool):
        ranks = (rank,) * bonds
    elif isinstance(rank, list | tuple) and all(
            isinstance(r, int) and not isinstance(r, bool) for r in rank):
        ranks = tuple(rank)
        if len(ranks) != bonds:
            raise ValueError(f"{name} must be an int or {bonds} ints (one per bond), got {rank!r}")
    else:
        raise TypeError(f"{name} must be an int or a sequence of {bonds} ints, got {rank!r}")
    left = 1
    for k, r in enumerate(ranks):
        top = max_rank(k, left)
        if not 1 <= r <= top:
            where = f"{name}[{k}]" if bonds > 1 else name
            raise ValueError(f"{where}={r} is out of range: valid is 1..{top} for these sizes")
        left = r
    return ranks
