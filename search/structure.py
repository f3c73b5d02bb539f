"""A tensor-network structure: N cores on a graph, each carrying one mode of the target.

    sizes  (I_0, ..., I_{N-1})   the target's mode sizes
    ranks  N x N symmetric       ranks[a][b] = bond dimension between cores a and b; 1 = no edge
    perm   (N,)                  perm[a] = the target mode that core a carries
Core a has shape (I_{perm[a]}, *(ranks[a][b] for each neighbour b > 1, in order of b)).
Tensor train (TT) and tensor ring (TR) are the path and the cycle; any graph works. The tensor it
represents is the contraction of all cores, with its modes in the target's order.
"""

from dataclasses import dataclass
from functools import cached_property, lru_cache
from math import prod

import numpy as np
import opt_einsum


@dataclass(frozen=True)
class Structure:
    sizes: tuple[int, ...]
    ranks: tuple[tuple[int, ...], ...]
    perm: tuple[int, ...]

    def __post_init__(self):
        n = len(self.sizes)
        if n < 2:
            raise ValueError(f"a tensor network needs at least 2 modes, got sizes {self.sizes}")
        if any(not isinstance(s, int) or s < 1 for s in self.sizes):
            raise ValueError(f"sizes must be positive ints, got {self.sizes}")
        if len(self.ranks) != n or any(len(row) != n for row in self.ranks):
            raise ValueError(f"ranks must be an {n} x {n} matrix")
        for a in range(n):
            for b in range(n):
                r = self.ranks[a][b]
                if a != b and (not isinstance(r, int) or r < 1 or r != self.ranks[b][a]):
                    raise ValueError(f"ranks must be symmetric positive ints; ranks[{a}][{b}] = {r}")
        if sorted(self.perm) != list(range(n)):
            raise ValueError(f"perm must be a permutation of 0..{n - 1}, got {self.perm}")

    # --- constructors ---------------------------------------------------------------------------
    @classmethod
    def from_edges(cls, sizes, edges: dict, perm=None) -> "Structure":
        """edges: {(a, b): rank}; missing pairs have rank 1 (no edge)."""
        n = len(sizes)
        ranks = [[1] * n for _ in range(n)]
        for (a, b), r in edges.items():
            if a == b or not (0 <= a < n and 0 <= b < n):
                raise ValueError(f"edge {(a, b)} is not between two of the {n} cores")
            ranks[a][b] = ranks[b][a] = int(r)
        return cls(tuple(int(s) for s in sizes), tuple(map(tuple, ranks)),
                   tuple(range(n)) if perm is None else tuple(int(p) for p in perm))

    @classmethod
    def tensor_ring(cls, sizes, ranks, perm=None) -> "Structure":
        """ranks[k]: the bond between core k and core k+1 (mod N)."""
        n = len(sizes)
        if len(ranks) != n:
            raise ValueError(f"a tensor ring of {n} cores has {n} ranks, got {len(ranks)}")
        return cls.from_edges(sizes, {tuple(sorted((k, (k + 1) % n))): r for k, r in enumerate(ranks)}, perm)

    @classmethod
    def tensor_train(cls, sizes, ranks, perm=None) -> "Structure":
        """ranks[k]: the bond between core k and core k+1, k < N-1."""
        n = len(sizes)
        if len(ranks) != n - 1:
            raise ValueError(f"a tensor train of {n} cores has {n - 1} ranks, got {len(ranks)}")
        return cls.from_edges(sizes, {(k, k + 1): r for k, r in enumerate(ranks)}, perm)

    # --- what it is --------------------------------------------------------------------------------
    @property
    def order(self) -> int:
        return len(self.sizes)

    def neighbours(self, a: int) -> tuple[int, ...]:
        return tuple(b for b in range(self.order) if b != a and self.ranks[a][b] > 1)

    def core_shape(self, a: int) -> tuple[int, ...]:
        return (self.sizes[self.perm[a]], *(self.ranks[a][b] for b in self.neighbours(a)))

    @cached_property
    def num_params(self) -> int:
        return sum(prod(self.core_shape(a)) for a in range(self.order))

    @property
    def num_entries(self) -> int:
        return prod(self.sizes)

    @property
    def compression(self) -> float:
        """Entries of the target per parameter (> 1 compresses)."""
        return self.num_entries / self.num_params

    def edges(self) -> dict:
        """{(a, b): rank} for a < b with rank > 1."""
        return {(a, b): self.ranks[a][b] for a in range(self.order) for b in range(a + 1, self.order)
                if self.ranks[a][b] > 1}

    def key(self) -> str:
        """A canonical text key (cache and log): sizes, upper-triangle ranks, perm."""
        upper = ",".join(str(self.ranks[a][b]) for a in range(self.order) for b in range(a + 1, self.order))
        return f"{'x'.join(map(str, self.sizes))}|{upper}|{','.join(map(str, self.perm))}"

    @classmethod
    def from_key(cls, key: str) -> "Structure":
        sizes_text, upper_text, perm_text = key.split("|")
        sizes = tuple(int(s) for s in sizes_text.split("x"))
        upper = iter(int(r) for r in upper_text.split(",")) if upper_text else iter(())
        n = len(sizes)
        ranks = [[1] * n for _ in range(n)]
        for a in range(n):
            for b in range(a + 1, n):
                ranks[a][b] = ranks[b][a] = next(upper)
        return cls(sizes, tuple(map(tuple, ranks)), tuple(int(p) for p in perm_text.split(",")))

    def with_rank(self, a: int, b: int, rank: int) -> "Structure":
        ranks = [list(row) for row in self.ranks]
        ranks[a][b] = ranks[b][a] = rank
        return Structure(self.sizes, tuple(map(tuple, ranks)), self.perm)

    # --- contraction -------------------------------------------------------------------------------
    def contract(self, cores) -> np.ndarray:
        """The full tensor (sizes) of these cores."""
        return _full_expression(self)(*cores)

    def random_cores(self, rng: np.random.Generator, norm: float = 1.0) -> list[np.ndarray]:
        """Gaussian cores scaled so the represented tensor has about the given Frobenius norm."""
        cores = [rng.standard_normal(self.core_shape(a)) for a in range(self.order)]
        full = np.linalg.norm(self.contract(cores))
        factor = (norm / full) ** (1 / self.order) if full > 0 else 1.0
        return [c * factor for c in cores]

    def einsum_terms(self, skip: int | None = None):
        """(operand index strings, mode symbol per target mode, bond symbols per edge) for an
        opt_einsum equation over the cores (all but `skip`)."""
        mode = [opt_einsum.get_symbol(m) for m in range(self.order)]
        bond, next_symbol = {}, self.order
        for edge in self.edges():
            bond[edge] = opt_einsum.get_symbol(next_symbol)
            next_symbol += 1
        terms = []
        for a in range(self.order):
            if a == skip:
                continue
            own_bonds = "".join(bond[tuple(sorted((a, b)))] for b in self.neighbours(a))
            terms.append(mode[self.perm[a]] + own_bonds)
        return terms, mode, bond


@lru_cache(maxsize=512)
def _full_expression(structure: Structure):
    terms, mode, _ = structure.einsum_terms()
    shapes = [structure.core_shape(a) for a in range(structure.order)]
    return opt_einsum.contract_expression(f"{','.join(terms)}->{''.join(mode)}", *shapes)
