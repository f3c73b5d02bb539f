"""Fit a structure's cores to a target tensor by alternating least squares (ALS).

Each step solves one core exactly with the others fixed. With E the other cores contracted into
an (other entries x core bonds) matrix, the core G (I_k x B) solves G (E^T E) = T_(k) E. Neither E
nor the target's unfolding is formed: both sides are tensor-network contractions with cached
opt_einsum plans,
    rhs  = T contracted with every other core              (I_k, B)
    gram = the other cores contracted with their own copy  (B, B)   (E^T E, over the target modes)
and the fit's squared error follows from them without rebuilding the tensor:
    ||T - X||^2 = ||T||^2 - 2 <G, rhs> + <G gram, G>.
It is deterministic for a seed. A sweep visits the cores forwards, the next one backwards.

Proximal (damped) ALS: each core solve also pulls toward the core's previous value,
    G (E^T E + mu I) = T_(k) E + mu G_old,    mu = damping * 0.7^sweep * trace(E^T E) / B,
which decays to plain ALS within about 40 sweeps. On small, nearly saturated tensor rings (order
4, modes 3-4, ranks 2-3) plain ALS from a random start reached the true structure's exact fit in
10 of 36 tries, damping 1.0 in 21 of 36 (order 6: 33 and 36 of 36), at about the same time:
the early damping keeps a sweep from jumping into the swamps plain ALS gets stuck in.
If ALS breaks down numerically (a non-finite core), `fit_adam` (all cores jointly, torch autograd
through the same contraction) takes over.

Levenberg-Marquardt polish (`fit_lm`): where the Jacobian (entries x parameters) is small enough
to form (`LM_MAX_JACOBIAN`), an ALS run that ends above `rse_tol` is finished by damped
Gauss-Newton on all cores jointly. On nearly saturated order-4 rings (99 parameters for 108
entries) ALS crawls: from 20 random starts it reached the true structure's exact fit 0 times
(stuck at squared RSE 1e-5..1e-2), ALS then LM 8 times; on the other fresh order-4 rings 10 of 20
either way. The remaining failures sit at RSE ~1e-2, true local minima that only another start
leaves, so the Evaluator gives structures that could still win extra starts (`runner.py`).
"""

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import opt_einsum

from .structure import Structure, _full_expression

LM_MAX_JACOBIAN = 2**16  # entries x parameters of the largest Jacobian the polish forms (512 KiB):
# order-4 rings and the smallest order-5 ones; beyond, ALS rarely misses and the solves cost more
EXACT = 1e-10  # a squared RSE this low ends the restarts: the fit is exact to ALS's precision


@dataclass
class Fit:
    cores: list
    rse: float  # squared relative error ||X - T||^2 / ||T||^2
    sweeps: int


def check_target(target) -> np.ndarray:
    """The target as a float64 array, or a clear error."""
    array = np.asarray(target, dtype=np.float64)
    if array.ndim < 2:
        raise ValueError(f"target must have at least 2 modes, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError("target contains NaN or inf")
    if not np.any(array):
        raise ValueError("target is all zeros: there is no structure to find")
    return array


def fit_als(target, structure: Structure, max_sweeps: int = 60, tol: float = 1e-7,
            rse_tol: float = 1e-12, seed: int = 0, restarts: int = 1, cores=None,
            damping: float = 1.0, polish: bool = True) -> Fit:
    """Best of `restarts` ALS runs (each from Gaussian cores, or from `cores` for the first);
    the restarts end early once one is exact (squared RSE <= `EXACT`).

    Stops a run after `max_sweeps`, when the squared RSE drops below `rse_tol`, or when a sweep
    improves it by less than `tol` (relative) once the damping has decayed below 1e-6.
    damping: the initial proximal weight (0: plain ALS), see the module doc. polish: finish a run
    that ends above `rse_tol` with `fit_lm` where its Jacobian is small enough.
    """
    if not (isinstance(damping, int | float) and 0 <= damping < float("inf")):
        raise ValueError(f"damping must be a finite number >= 0, got {damping!r}")
    target = check_target(target)
    if target.shape != structure.sizes:
        raise ValueError(f"target shape {target.shape} does not match the structure's sizes "
                         f"{structure.sizes}")
    best = None
    rng = np.random.default_rng(seed)
    norm2 = float(np.sum(target * target))
    for attempt in range(restarts):
        start = cores if attempt == 0 and cores is not None else \
            structure.random_cores(rng, np.sqrt(norm2))
        result = _als(target, norm2, structure, [np.array(c, dtype=np.float64) for c in start],
                      max_sweeps, tol, rse_tol, damping)
        if polish and np.isfinite(result.rse) and result.rse > rse_tol \
                and target.size * structure.num_params <= LM_MAX_JACOBIAN:
            polished = fit_lm(target, structure, result.cores)
            if polished.rse < result.rse:
                result = Fit(polished.cores, polished.rse, result.sweeps + polished.sweeps)
        if best is None or result.rse < best.rse:
            best = result
        if best.rse <= max(rse_tol, EXACT):
            break
    if not np.isfinite(best.rse):  # ALS broke down: gradient descent on all cores instead
        return fit_adam(target, structure, seed=seed)
    return best


def fit_lm(target, structure: Structure, cores, max_iter: int = 40, rse_tol: float = 1e-14,
           stall: int = 10) -> Fit:
    """Levenberg-Marquardt on all cores jointly from `cores` (float64): each step solves
    (J^T J + lam diag(J^T J)) d = -J^T r with J the Jacobian of the contracted tensor in every
    core entry, r the residual; lam shrinks after a step that lowers the error and grows until
    one does. The gauge freedom of the bonds makes J^T J singular, which the damping absorbs.
    Stops after `max_iter` Jacobians, at `rse_tol`, or when `stall` steps lowered the error by
    less than 3% (a local minimum: on fresh order-4 rings LM left ALS's swamps within 25 steps
    or not at all). `sweeps` counts the Jacobians formed. Forms J (entries x parameters): for
    small structures."""
    target = check_target(target)
    norm2 = float(np.sum(target * target))
    shapes = [structure.core_shape(a) for a in range(structure.order)]
    splits = np.cumsum([int(np.prod(s)) for s in shapes])[:-1]

    def unpack(v):
        return [part.reshape(shape) for part, shape in zip(np.split(v, splits), shapes, strict=True)]

    def residual_of(v):
        return (structure.contract(unpack(v)) - target).ravel()

    v = np.concatenate([np.asarray(c, dtype=np.float64).ravel() for c in cores])
    residual = residual_of(v)
    error, lam, formed = float(residual @ residual), 1e-3, 0
    history = [error]
    while formed < max_iter and error > rse_tol * norm2 \
            and not (len(history) > stall and error > 0.97 * history[-1 - stall]):
        jac = _jacobian(structure, unpack(v))
        formed += 1
        gram, grad = jac.T @ jac, jac.T @ residual
        diag = np.diag(gram) + 1e-12 * max(float(np.max(np.diag(gram))), 1e-300)
        while lam < 1e12:
            try:
                trial = v + np.linalg.solve(gram + lam * np.diag(diag), -grad)
            except np.linalg.LinAlgError:
                lam *= 4
                continue
            trial_residual = residual_of(trial)
            trial_error = float(trial_residual @ trial_residual)
            if trial_error < error:
                v, residual, error, lam = trial, trial_residual, trial_error, max(lam / 3, 1e-12)
                break
            lam *= 4
        else:
            break  # no step lowers the error: a local minimum
        history.append(error)
    return Fit(unpack(v), max(0.0, error / norm2), formed)


def _jacobian(structure: Structure, cores) -> np.ndarray:
    """d(contracted tensor) / d(core entries): (entries, parameters), the cores' blocks side by
    side. Core a's block is its environment (every other core contracted, the bonds of a left
    open) placed on the diagonal of the mode a carries."""
    blocks = []
    for a, expression in enumerate(_environment_expressions(structure)):
        mode = structure.perm[a]
        size, bonds = structure.sizes[mode], int(np.prod(cores[a].shape[1:]))
        env = expression(*(c for b, c in enumerate(cores) if b != a))  # (other modes..., a's bonds...)
        env = env.reshape(*env.shape[:structure.order - 1], bonds)
        block = np.zeros((size, *env.shape[:-1], size, bonds))
        block[np.arange(size), ..., np.arange(size), :] = env
        # (mode, other modes..., mode', bonds) -> target mode order, then (entries, size * bonds)
        blocks.append(np.moveaxis(block, 0, mode).reshape(-1, size * bonds))
    return np.concatenate(blocks, axis=1)


@lru_cache(maxsize=512)
def _environment_expressions(structure: Structure):
    """Per core a: opt_einsum plan of the other cores -> (target modes but a's, a's bonds)."""
    terms, mode, _ = structure.einsum_terms()
    expressions = []
    for a in range(structure.order):
        others = [t for b, t in enumerate(terms) if b != a]
        out = "".join(m for m in mode if m != mode[structure.perm[a]]) + terms[a][1:]
        shapes = [structure.core_shape(b) for b in range(structure.order) if b != a]
        expressions.append(opt_einsum.contract_expression(f"{','.join(others)}->{out}", *shapes))
    return expressions


def fit_adam(target, structure: Structure, steps: int = 2000, lr: float = 0.02, seed: int = 0) -> Fit:
    """Adam on all cores jointly (float64), minimising the squared relative error; slower than
    ALS but immune to its numerical breakdowns. `sweeps` counts Adam steps."""
    import torch

    target = torch.as_tensor(check_target(target))
    norm2 = target.square().sum()
    rng = np.random.default_rng(seed)
    cores = [torch.tensor(c, requires_grad=True)
             for c in structure.random_cores(rng, float(norm2.sqrt()))]
    optimizer = torch.optim.Adam(cores, lr=lr)
    expression = _full_expression(structure)
    taken = 0
    while taken < steps:
        taken += 1
        optimizer.zero_grad()
        loss = (expression(*cores, backend="torch") - target).square().sum() / norm2
        loss.backward()
        optimizer.step()
        if loss.item() < 1e-14:
            break
    with torch.no_grad():
        rse = float((expression(*cores, backend="torch") - target).square().sum() / norm2)
    return Fit([c.detach().numpy() for c in cores], rse, taken)


def _als(target, norm2, structure, cores, max_sweeps, tol, rse_tol, damping) -> Fit:
    order = list(range(structure.order))
    rse, previous = 1.0, np.inf
    for sweep in range(1, max_sweeps + 1):
        mu = damping * 0.7**sweep
        for k in order if sweep % 2 else order[::-1]:
            rhs_expr, gram_expr = _core_expressions(structure, k)
            others = [c for a, c in enumerate(cores) if a != k]
            shape = structure.core_shape(k)
            bonds = int(np.prod(shape[1:]))
            rhs = rhs_expr(target, *others).reshape(shape[0], bonds)
            gram = gram_expr(*others, *others).reshape(bonds, bonds)
            scale = max(np.trace(gram) / bonds, 1e-300)
            ridge = max(mu, 1e-12) * scale
            pull = rhs + mu * scale * cores[k].reshape(shape[0], bonds) if mu > 1e-12 else rhs
            core = np.linalg.solve(gram + ridge * np.eye(bonds), pull.T).T
            cores[k] = core.reshape(shape)
            fitted2 = float(np.einsum("ib,bc,ic->", core, gram, core))
            rse = max(0.0, (norm2 - 2 * float(np.sum(core * rhs)) + fitted2) / norm2)
        if not np.isfinite(rse) or rse <= rse_tol:
            break
        if mu < 1e-6 and previous - rse < tol * max(previous, 1e-300):
            break
        previous = rse
    if not all(np.isfinite(c).all() for c in cores):
        rse = np.inf
    return Fit(cores, float(rse), sweep)


@lru_cache(maxsize=1024)
def _core_expressions(structure: Structure, k: int):
    """opt_einsum plans for rhs (target with the other cores) and gram (the other cores twice)."""
    terms, mode, bond = structure.einsum_terms(skip=k)
    own = [bond[tuple(sorted((k, b)))] for b in structure.neighbours(k)]
    out = mode[structure.perm[k]] + "".join(own)
    shapes = [structure.core_shape(a) for a in range(structure.order) if a != k]
    rhs = opt_einsum.contract_expression(f"{''.join(mode)},{','.join(terms)}->{out}",
                                         structure.sizes, *shapes)
    # the copy: every bond symbol primed (a fresh symbol), the target modes shared
    fresh = {s: opt_einsum.get_symbol(structure.order + len(bond) + i) for i, s in enumerate(bond.values())}
    copies = ["".join(fresh.get(ch, ch) for ch in term) for term in terms]
    gram = opt_einsum.contract_expression(
        f"{','.join(terms)},{','.join(copies)}->{''.join(own)}{''.join(fresh[s] for s in own)}",
        *shapes, *shapes)
    return rhs, gram
