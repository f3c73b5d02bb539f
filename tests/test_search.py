"""Structure search: the structure type, the ALS fitter, the evaluator (cache, executors, budgets,
resumable log) and the searches on tensors with known ground truth."""

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

import numpy as np
import pytest

from structlayers.search import (
    BudgetExhausted,
    Evaluator,
    Structure,
    fit_als,
    greedy,
    tnale,
    tnls,
)

# Tests of restarts and logs, not of fit quality: one start per fit and no LM polish keep them fast.
MECHANICS = {"contender_starts": 1, "fit": {"polish": False}}


def ring_target(sizes, ranks, perm, seed=0):
    truth = Structure.tensor_ring(sizes, ranks, perm)
    rng = np.random.default_rng(seed)
    return truth, truth.contract(truth.random_cores(rng))


# --- the structure ------------------------------------------------------------------------------
def test_tensor_ring_contracts_like_the_written_out_einsum():
    truth = Structure.tensor_ring((2, 3, 4), (2, 3, 4), perm=(1, 2, 0))
    rng = np.random.default_rng(0)
    g0, g1, g2 = truth.random_cores(rng)
    # core a carries mode perm[a]: core 0 -> mode 1, core 1 -> mode 2, core 2 -> mode 0
    # bonds: 0-1 rank 2, 1-2 rank 3, 0-2 rank 4; a core's bonds follow its neighbours' order
    assert g0.shape == (3, 2, 4) and g1.shape == (4, 2, 3) and g2.shape == (2, 4, 3)
    want = np.einsum("jac,kab,icb->ijk", g0, g1, g2)
    assert np.allclose(truth.contract([g0, g1, g2]), want)
    assert truth.num_params == 3 * 2 * 4 + 4 * 2 * 3 + 2 * 4 * 3


def test_structure_keys_round_trip_and_bad_structures():
    s = Structure.from_edges((3, 4, 5, 2), {(0, 2): 3, (1, 3): 2, (2, 3): 4}, perm=(3, 1, 0, 2))
    assert Structure.from_key(s.key()) == s and s.edges() == {(0, 2): 3, (1, 3): 2, (2, 3): 4}
    assert Structure.tensor_train((2, 2, 2), (3, 1)).edges() == {(0, 1): 3}
    with pytest.raises(ValueError, match="at least 2"):
        Structure.from_edges((4,), {})
    with pytest.raises(ValueError, match="permutation"):
        Structure.from_edges((2, 2), {}, perm=(0, 0))
    with pytest.raises(ValueError, match="symmetric"):
        Structure((2, 2), ((1, 2), (3, 1)), (0, 1))
    with pytest.raises(ValueError, match="ranks"):
        Structure.tensor_ring((2, 2, 2), (2, 2))


# --- the fitter ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["ring", "train", "graph"])
def test_als_recovers_tensors_that_have_the_structure(kind):
    rng = np.random.default_rng(1)
    sizes = (3, 4, 3, 4, 2)
    structure = {"ring": Structure.tensor_ring(sizes, (2, 3, 2, 2, 3), perm=(4, 2, 0, 1, 3)),
                 "train": Structure.tensor_train(sizes, (3, 4, 3, 2)),
                 "graph": Structure.from_edges(sizes, {(0, 2): 2, (0, 4): 3, (1, 2): 2, (3, 4): 2,
                                                       (1, 3): 2})}[kind]
    target = structure.contract(structure.random_cores(rng))
    fit = fit_als(target, structure, max_sweeps=300, restarts=3)
    actual = np.sum((structure.contract(fit.cores) - target) ** 2) / np.sum(target**2)
    assert fit.rse < 1e-8 and abs(actual - fit.rse) < 1e-9  # reported error = real error


def test_als_is_deterministic_and_reports_the_real_error_on_misfits():
    _, target = ring_target((4, 4, 4, 4), (3, 3, 3, 3), (0, 1, 2, 3))
    small = Structure.tensor_ring((4, 4, 4, 4), (2, 1, 2, 1))
    a, b = fit_als(target, small, seed=7), fit_als(target, small, seed=7)
    assert a.rse == b.rse and all(np.array_equal(x, y) for x, y in zip(a.cores, b.cores, strict=True))
    actual = np.sum((small.contract(a.cores) - target) ** 2) / np.sum(target**2)
    assert 0.01 < a.rse and abs(actual - a.rse) < 1e-9


def test_lm_jacobian_matches_finite_differences():
    from structlayers.search.fit import _jacobian

    structure = Structure.from_edges((3, 4, 2), {(0, 1): 2, (1, 2): 3, (0, 2): 2}, perm=(2, 0, 1))
    cores = structure.random_cores(np.random.default_rng(0))
    base, columns = structure.contract(cores).ravel(), []
    for a, core in enumerate(cores):
        for index in np.ndindex(core.shape):
            moved = [c.copy() for c in cores]
            moved[a][index] += 1e-6
            columns.append((structure.contract(moved).ravel() - base) / 1e-6)
    assert np.abs(_jacobian(structure, cores) - np.stack(columns, axis=1)).max() < 1e-7


def test_lm_polish_finishes_fits_that_als_leaves_in_a_swamp():
    """A nearly saturated ring (96 parameters, 108 entries): ALS alone misses its exact fit from
    all 6 starts; ALS then Levenberg-Marquardt reaches it from some, and reports the real error."""
    rng = np.random.default_rng(324)
    sizes = tuple(int(s) for s in rng.choice([3, 4], 4))
    truth = Structure.tensor_ring(sizes, tuple(int(r) for r in rng.integers(2, 4, 4)))
    target = truth.contract(truth.random_cores(rng))
    plain = [fit_als(target, truth, seed=k, polish=False) for k in range(6)]
    polished = [fit_als(target, truth, seed=k) for k in range(6)]
    assert all(f.rse > 1e-6 for f in plain)
    assert sum(f.rse <= 1e-10 for f in polished) >= 2
    for fit in polished:
        actual = np.sum((truth.contract(fit.cores) - target) ** 2) / np.sum(target**2)
        assert abs(actual - fit.rse) < 1e-9


def test_contenders_get_more_starts_and_a_resumed_log_refits_the_same_cores(tmp_path):
    truth, target = ring_target((3, 4, 3, 4), (2, 2, 2, 2), (0, 1, 2, 3))
    log = tmp_path / "fits.jsonl"
    evaluator = Evaluator(target, log=log, progress=False)
    assert evaluator.contender_starts == 4  # a small target
    first = evaluator(truth)  # nothing to beat yet: a contender
    huge = Structure.tensor_ring(truth.sizes, (4, 4, 4, 4))  # more parameters than entries
    assert huge.num_params / huge.num_entries > first.objective
    second = evaluator(huge)
    assert (first.starts, second.starts) == (4, 1)
    rows = [json.loads(line) for line in log.read_text().splitlines()[1:]]
    assert [row["starts"] for row in rows] == [4, 1]
    resumed = Evaluator(target, log=log, progress=False)
    again = resumed.cache[truth.key()]
    assert again.starts == 4 and again.cores is None
    for x, y in zip(resumed.cores_of(again), first.cores, strict=True):
        np.testing.assert_array_equal(x, y)  # the same starts give the same cores
    with pytest.raises(ValueError, match="contender_starts"):
        Evaluator(target, contender_starts=0, progress=False)
    assert Evaluator(np.ones((4,) * 6), progress=False).contender_starts == 1  # 4096 entries


def test_greedy_exchanges_move_one_rank_and_save_parameters():
    from structlayers.search.greedy import _exchanges

    structure = Structure.from_edges((3, 4, 3, 4, 2), {(0, 1): 3, (1, 2): 2, (2, 4): 2, (0, 3): 4})
    moves = _exchanges(structure, max_rank=4)
    assert moves
    for moved in moves:
        upper = (np.array(moved.ranks) - np.array(structure.ranks))[np.triu_indices(5, 1)]
        assert sorted(upper[upper != 0].tolist()) == [-1, 1]  # one bond down, one pair up
        assert moved.num_params < structure.num_params and np.max(moved.ranks) <= 4


@pytest.mark.parametrize("target,word", [
    (np.full((3, 3), np.nan), "NaN"),
    (np.zeros((3, 3)), "zeros"),
    (np.ones(5), "at least 2 modes"),
    (np.ones((3, 4)), "shape"),
])
def test_bad_targets(target, word):
    with pytest.raises(ValueError, match=word):
        fit_als(target, Structure.tensor_train((3, 3), (2,)))


# --- the evaluator ------------------------------------------------------------------------------
def test_evaluator_objective_cache_and_budget():
    _, target = ring_target((3, 3, 3), (2, 2, 2), (0, 1, 2))
    ev = Evaluator(target, lam=10.0, max_evaluations=3, progress=False)
    s = Structure.tensor_ring((3, 3, 3), (2, 2, 2))
    e = ev(s)
    assert e.objective == pytest.approx(s.num_params / 27 + 10.0 * e.rse)
    assert ev(s) is e and ev.evaluations == 1  # cached: no second fit
    others = [Structure.tensor_ring((3, 3, 3), (r, 1, 1)) for r in (1, 2, 3)]
    with pytest.raises(BudgetExhausted):
        ev.evaluate(others)
    assert ev.evaluations == 3  # what fitted before the budget ran out is kept


@pytest.mark.parametrize("make_executor", [
    lambda: ThreadPoolExecutor(2),
    lambda: ProcessPoolExecutor(2),
], ids=["threads", "processes"])
def test_executors_give_the_serial_results(make_executor):
    _, target = ring_target((3, 4, 3, 4), (2, 2, 3, 2), (1, 0, 3, 2))
    structures = [Structure.tensor_ring((3, 4, 3, 4), (r, 2, 2, q)) for r in (1, 2, 3) for q in (1, 2)]
    serial = [e.rse for e in Evaluator(target, progress=False).evaluate(structures)]
    with make_executor() as executor:
        parallel = [e.rse for e in Evaluator(target, executor=executor, progress=False).evaluate(structures)]
    assert np.allclose(parallel, serial, rtol=1e-9, atol=1e-15)  # BLAS may sum in another order


def test_a_dask_distributed_client_is_an_executor():
    import distributed  # the test extra installs it
    _, target = ring_target((3, 3, 3), (2, 2, 2), (0, 1, 2))
    structures = [Structure.tensor_ring((3, 3, 3), (r, 2, 2)) for r in (1, 2, 3)]
    serial = [e.rse for e in Evaluator(target, progress=False).evaluate(structures)]
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                                  dashboard_address=None) as cluster, distributed.Client(cluster) as client:
        result = Evaluator(target, executor=client.get_executor(), progress=False).evaluate(structures)
    assert np.allclose([e.rse for e in result], serial, rtol=1e-9, atol=1e-15)


def test_killed_search_resumes_from_its_log_without_refitting(tmp_path):
    _, target = ring_target((3, 4, 3, 4), (2, 3, 1, 2), (2, 0, 3, 1))
    log = tmp_path / "run.jsonl"
    full = tnale(target, max_evaluations=400, progress=False, **MECHANICS)
    first = tnale(target, max_evaluations=25, log=log, progress=False, **MECHANICS)  # "killed" by its budget
    assert first.evaluations == 25 and len(log.read_text().splitlines()) == 26  # header + 25
    resumed_ev = Evaluator(target, max_evaluations=400, log=log, progress=False, **MECHANICS)
    assert resumed_ev.evaluations == 25  # read back, not refitted
    resumed = tnale(target, evaluator=resumed_ev)
    assert resumed.structure == full.structure and resumed.evaluations == full.evaluations
    assert len(log.read_text().splitlines()) == 1 + full.evaluations  # each structure fitted once
    # a finished search, rerun
    again = tnale(target, max_evaluations=400, log=log, progress=False, **MECHANICS)
    assert again.structure == full.structure and len(log.read_text().splitlines()) == 1 + full.evaluations


def test_log_errors_and_a_torn_last_line(tmp_path):
    _, target = ring_target((3, 3, 3), (2, 2, 2), (0, 1, 2))
    log = tmp_path / "run.jsonl"
    ev = Evaluator(target, log=log, progress=False)
    ev.evaluate([Structure.tensor_ring((3, 3, 3), (r, 2, 2)) for r in (1, 2, 3)])
    ev.close()
    with log.open("a") as f:
        f.write('{"key": "3x3x3|2,')  # killed mid-write
    with pytest.warns(UserWarning, match="last line"):
        assert Evaluator(target, log=log, progress=False).evaluations == 3
    assert json.loads(log.read_text().splitlines()[-1])["key"]  # the torn line is gone
    with pytest.raises(ValueError, match="another search"):
        Evaluator(target * 2, log=log, progress=False)
    header, *rows = log.read_text().splitlines()
    older = header.replace('"fitter": "proximal-als-0.7+lm"', '"fitter": "als"')
    log.write_text("\n".join([older, *rows]) + "\n")
    with pytest.raises(ValueError, match="its fitter is 'als'"):  # fits of another fitter
        Evaluator(target, log=log, progress=False)
    log.write_text("\n".join([header, *rows]) + "\n")
    with pytest.raises(ValueError, match="lam"):
        Evaluator(target, lam=5.0, log=log, progress=False)
    lines = log.read_text().splitlines()
    log.write_text("\n".join([lines[0], "garbage", *lines[1:]]) + "\n")
    with pytest.raises(ValueError, match="line 2 is corrupt"):
        Evaluator(target, log=log, progress=False)
    (tmp_path / "other.jsonl").write_text("hello\n")
    with pytest.raises(ValueError, match="not a structlayers search log"):
        Evaluator(target, log=tmp_path / "other.jsonl", progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a clean log resumes silently
        Evaluator(target, log=tmp_path / "fresh.jsonl", progress=False).close()


@pytest.mark.parametrize("kwargs,word", [
    ({"max_evaluations": 0}, "max_evaluations"),
    ({"max_seconds": -1}, "max_seconds"),
    ({"lam": -1.0}, "lam"),
    ({"rse": "cubic"}, "rse"),
    ({"workers": 0}, "workers"),
])
def test_bad_evaluator_arguments(kwargs, word):
    with pytest.raises(ValueError, match=word):
        Evaluator(np.ones((2, 2)), progress=False, **kwargs)


def test_bad_search_arguments():
    target = np.random.default_rng(0).standard_normal((3, 3, 3))
    with pytest.raises(ValueError, match="inverted"):
        tnale(target, init_rank=5, max_rank=3, progress=False)
    with pytest.raises(ValueError, match="topology"):
        tnls(target, topology="mera", progress=False)
    with pytest.raises(ValueError, match="max_rank"):
        greedy(target, max_rank=0, progress=False)


# --- searches on known ground truth -------------------------------------------------------------
@pytest.mark.parametrize("search", [tnale, tnls, greedy], ids=["tnale", "tnls", "greedy"])
def test_searches_reach_the_ground_truth_of_a_hidden_ring(search):
    truth, target = ring_target((4, 4, 4, 4), (2, 3, 1, 2), (2, 0, 3, 1))
    result = search(target, max_evaluations=300, progress=False)
    assert result.rse <= 1e-4 and result.compression >= truth.compression * (1 - 1e-9)
    fitted = result.structure.contract(result.cores)
    assert np.sum((fitted - target) ** 2) / np.sum(target**2) <= 1e-4  # the cores are the real fit


def test_tnale_permutation_search_beats_a_fixed_permutation():
    """Under a hidden permutation the identity needs larger ranks: searching the permutation
    finds an exact fit that compresses better, at the same budget."""
    _, target = ring_target((3, 4, 3, 4, 3, 4), (2, 3, 2, 1, 3, 2), (4, 1, 5, 0, 2, 3), seed=2)
    fixed = tnale(target, max_evaluations=300, restarts=1, permute=False, progress=False)
    searched = tnale(target, max_evaluations=300, restarts=1, progress=False)
    assert fixed.rse <= 1e-4 and searched.rse <= 1e-4
    assert searched.compression > 1.3 * fixed.compression


def test_tnale_reaches_the_order_6_ground_truth():
    """Without the joint rank+permutation move this run stalls at 13.5x of the truth's 17.5x
    (a rank-4 bond that no single-variable window removes)."""
    truth, target = ring_target((3, 4, 3, 4, 3, 4), (2, 3, 2, 1, 3, 2), (4, 1, 5, 0, 2, 3), seed=2)
    result = tnale(target, max_evaluations=300, restarts=1, progress=False)
    assert result.rse <= 1e-4 and result.compression >= truth.compression * (1 - 1e-9)


# --- Tucker core shapes --------------------------------------------------------------------------
def _tucker_tensor(sizes, ranks, noise=0.0, seed=0):
    rng = np.random.default_rng(seed)
    core = rng.standard_normal(ranks)
    factors = [np.linalg.qr(rng.standard_normal((s, r)))[0] for s, r in zip(sizes, ranks, strict=True)]
    x = np.einsum("abc,ia,jb,kc->ijk", core, *factors)
    return x + noise * rng.standard_normal(sizes)


@pytest.mark.parametrize("method", ["ip", "greedy", "refit"])
def test_tucker_ranks_find_the_exact_multilinear_rank(method):
    from structlayers.search import tucker_error, tucker_params, tucker_ranks

    sizes, ranks = (12, 15, 10), (3, 5, 2)
    target = _tucker_tensor(sizes, ranks)
    shape = tucker_ranks(target, tucker_params(sizes, ranks), method)
    assert shape.ranks == ranks and shape.params == tucker_params(sizes, ranks)
    # the error comes from ||T||^2 - ||core||^2: float cancellation leaves ~1e-8 after the sqrt
    assert tucker_error(target, shape.ranks) < 1e-6 and shape.kept_energy > 1 - 1e-12


def test_tucker_integer_program_is_optimal_on_small_problems():
    """Against brute force over every rank tuple within the budget (the surrogate objective)."""
    import itertools

    from structlayers.search import tucker_params, tucker_ranks

    noise = np.random.default_rng(3).standard_normal((5, 6, 4))
    target = noise + _tucker_tensor((5, 6, 4), (2, 2, 2), seed=1)
    energy = [np.linalg.svd(np.moveaxis(target, n, 0).reshape(target.shape[n], -1), compute_uv=False) ** 2
              for n in range(3)]
    for budget in (30, 45, 60, 90):
        best = max(sum(float(np.sum(e[:r])) for e, r in zip(energy, ranks, strict=True))
                   for ranks in itertools.product(*(range(1, s + 1) for s in target.shape))
                   if tucker_params(target.shape, ranks) <= budget)
        ip, greedy_shape = tucker_ranks(target, budget, "ip"), tucker_ranks(target, budget, "greedy")
        total = 3 * float(np.sum(target**2))
        assert ip.kept_energy * total == pytest.approx(best, rel=1e-12), budget
        assert greedy_shape.kept_energy <= ip.kept_energy + 1e-12 and ip.params <= budget


def test_tucker_bad_input():
    from structlayers.search import tucker_ranks

    target = np.ones((3, 4, 5))
    with pytest.raises(ValueError, match="budget"):
        tucker_ranks(target, 0)
    with pytest.raises(ValueError, match="method"):
        tucker_ranks(target, 100, "anneal")
    with pytest.raises(ValueError, match="NaN"):
        tucker_ranks(np.full((3, 3), np.inf), 100)


# --- TT-SVD / TR-SVD baselines -------------------------------------------------------------------
def test_tt_svd_recovers_a_tensor_train_with_its_ranks():
    from structlayers.search import tt_svd

    truth = Structure.tensor_train((3, 4, 5, 3), (2, 3, 2))
    target = truth.contract(truth.random_cores(np.random.default_rng(0)))
    result = tt_svd(target, eps=1e-8)
    assert result.structure == truth and result.rse < 1e-20
    assert np.allclose(result.structure.contract(result.cores), target)


@pytest.mark.parametrize("eps", [0.05, 0.3, 0.6])
def test_svd_baselines_respect_the_tolerance(eps):
    from structlayers.search import tr_svd, tt_svd

    target = np.random.default_rng(1).standard_normal((4, 5, 6, 3))
    for baseline in (tt_svd, tr_svd):
        result = baseline(target, eps=eps)
        actual = np.sum((result.structure.contract(result.cores) - target) ** 2) / np.sum(target**2)
        assert actual <= eps**2 * (1 + 1e-9) and actual == pytest.approx(result.rse, abs=1e-12)
    with pytest.raises(ValueError, match="eps"):
        tt_svd(target, eps=0)


# --- ranks for a layer that replaces a dense weight ---------------------------------------------
def test_layer_ranks_recover_a_tt_weight_and_respect_budgets():
    import torch

    import structlayers as sl
    from structlayers.search import layer_ranks

    torch.manual_seed(0)
    truth = sl.TT(64, 64, cores=3, rank=(2, 5), bias=False)
    weight = truth.to_dense().detach()
    assert layer_ranks(weight, "tt", budget=truth.num_params, cores=3) == "tt:cores=3,rank=2x5"
    random_weight = torch.randn(48, 40)
    for kind, cores in (("tt", 3), ("btt", 3), ("tucker", 2)):
        errors = []
        for budget in (0.35, 0.7):
            layer = sl.build(layer_ranks(random_weight, kind, budget, cores), 40, 48, bias=False)
            assert layer.num_params <= budget * random_weight.numel(), kind
            errors.append(layer.project_(random_weight))
        assert errors[1] <= errors[0] + 1e-9, kind  # more budget, no worse


def test_auto_ranks_in_structurize():
    import torch

    import structlayers as sl
    from structlayers.search import auto

    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 32))
    sizes = [m.weight.numel() for m in model if isinstance(m, torch.nn.Linear)]
    sl.structurize(model, auto("tucker", 0.25), project=True)
    for layer, size in zip([model[0], model[2]], sizes, strict=True):
        assert isinstance(layer, sl.Tucker) and layer.num_params - layer.out_features <= 0.25 * size


def test_layer_ranks_bad_input():
    import torch

    from structlayers.search import auto, layer_ranks

    weight = torch.randn(16, 16)
    with pytest.raises(ValueError, match="kind"):
        layer_ranks(weight, "mera", 0.5)
    with pytest.raises(ValueError, match="budget"):
        layer_ranks(weight, "tt", 1.5)
    with pytest.raises(ValueError, match="below the smallest"):
        layer_ranks(weight, "btt", 10)
    with pytest.raises(TypeError, match="weight"):
        layer_ranks(weight.numpy(), "tt", 0.5)
    with pytest.raises(ValueError, match="kind"):
        auto("cp", 0.5)


def test_adam_fallback_fits_and_takes_over_when_als_breaks_down(monkeypatch):
    from structlayers.search import fit as fit_module
    from structlayers.search import fit_adam

    truth = Structure.tensor_train((3, 4, 3), (2, 2))
    target = truth.contract(truth.random_cores(np.random.default_rng(0)))
    adam = fit_adam(target, truth, steps=3000)
    actual = np.sum((truth.contract(adam.cores) - target) ** 2) / np.sum(target**2)
    assert adam.rse < 1e-6 and actual == pytest.approx(adam.rse, rel=1e-6, abs=1e-12)

    def broken_als(*args, **kwargs):
        return fit_module.Fit([], float("nan"), 1)

    monkeypatch.setattr(fit_module, "_als", broken_als)  # simulate a numerical breakdown
    rescued = fit_als(target, truth)
    assert rescued.rse < 1e-6 and len(rescued.cores) == 3


def test_tnale_composes_disjoint_improving_transpositions():
    """With a hidden permutation two disjoint swaps away, one enumeration of the transpositions
    ranks both as improving, and composing them reaches the truth with one extra fit."""
    from types import SimpleNamespace

    from structlayers.search.tnale import _transpositions

    truth = [1, 0, 2, 4, 3, 5]
    fitted = []

    def evaluate(candidates):
        fitted.extend(candidates)
        return [SimpleNamespace(objective=sum(a != b for a, b in zip(perm, truth, strict=True)))
                for _, perm in candidates]

    candidates, scores = _transpositions(evaluate, [2] * 6, list(range(6)))
    best = candidates[int(np.argmin(scores))][1]
    assert best == truth and min(scores) == 0
    assert len(fitted) == 1 + 15 + 1  # current, every transposition, one composition


# --- the processes and the terminal -------------------------------------------------------------
def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                found.append(int(entry))
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_worker_processes_die_when_the_search_is_killed():
    script = ("import numpy as np\nfrom structlayers.search import Structure, tnale\n"
              "truth = Structure.tensor_ring((4,) * 8, (3,) * 8)\n"
              "target = truth.contract(truth.random_cores(np.random.default_rng(0)))\n"
              "tnale(target, max_evaluations=100000, workers=2, progress=False)\n")
    search = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.monotonic() + 60
        while len(workers := _children(search.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(workers) == 2, "the search did not start its 2 workers"
        time.sleep(0.5)  # workers busy fitting
    finally:
        search.kill()  # SIGKILL: no shutdown code runs in the search process
        search.wait()
    deadline = time.monotonic() + 5
    while any(map(_alive, workers)) and time.monotonic() < deadline:
        time.sleep(0.05)
    survivors = [w for w in workers if _alive(w)]
    for w in survivors:
        os.kill(w, signal.SIGKILL)
    assert not survivors, f"workers {survivors} outlived the killed search"


def test_progress_bar_only_on_a_terminal(tmp_path):
    _, target = ring_target((3, 3, 3), (2, 2, 2), (0, 1, 2))
    assert Evaluator(target).bar.disable  # pytest's stderr is not a terminal: no bar
    assert not Evaluator(target, progress=True).bar.disable
    with pytest.raises(ValueError, match="progress must be"):
        Evaluator(target, progress="yes")
    np.save(tmp_path / "t.npy", target)
    result = subprocess.run([sys.executable, "-m", "structlayers.cli", "search", str(tmp_path / "t.npy"),
                             "--budget", "300"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "\r" not in result.stderr and "evaluations" not in result.stderr
    assert "tnale: ranks" in result.stdout and "descents reached it" in result.stdout


# --- restarts, pruning, confidence ----------------------------------------------------------------
def test_pruning_shrinks_a_deliberately_oversized_exact_ring():
    from structlayers.search.result import prune_ring, ring_structure

    truth, target = ring_target((4, 4, 4, 4), (2, 2, 2, 2), (0, 1, 2, 3), seed=1)
    evaluator = Evaluator(target, fit={"restarts": 3}, progress=False)

    def evaluate(candidates):
        return evaluator.evaluate([ring_structure(truth.sizes, "tr", r, p) for r, p in candidates])

    start = [3, 3, 3, 3]  # exact, every bond one above the truth
    start_objective = evaluate([(start, [0, 1, 2, 3])])[0].objective
    ranks, objective = prune_ring(evaluate, start, [0, 1, 2, 3], start_objective)
    pruned = evaluator(ring_structure(truth.sizes, "tr", ranks, [0, 1, 2, 3]))
    assert ranks == [2, 2, 2, 2] and pruned.rse <= 1e-8
    assert objective == pruned.objective < start_objective


def test_greedy_does_not_stop_at_the_first_plateau():
    """On this ring the previous stop rule ended after 8 evaluations at squared RSE 4.4e-4."""
    rng = np.random.default_rng(777400)
    truth = Structure.tensor_ring((3, 4, 3, 4), (2, 2, 2, 3), (1, 2, 0, 3))
    target = truth.contract(truth.random_cores(rng))
    log_free = Evaluator(target, progress=False)
    result = greedy(target, evaluator=log_free, rse_target=1e-8, prune=False)
    reached = [e for e in log_free.cache.values() if e.rse <= 1e-8]
    assert reached, "greedy stopped before its loss target"
    assert result.objective == min(e.objective for e in log_free.cache.values())


def test_restarts_run_until_patience_and_report_agreement():
    truth, target = ring_target((4, 4, 4, 4), (2, 3, 1, 2), (2, 0, 3, 1))
    result = tnale(target, restart_patience=2, max_evaluations=3000, progress=False, **MECHANICS)
    assert result.restarts >= 3  # the first descent, then restarts until 2 in a row found nothing
    assert 1 <= result.agreeing <= result.restarts
    assert result.runners_up and all(e.objective >= result.objective for e in result.runners_up)
    assert "descents reached it" in result.summary() and "runner-up" in result.summary()
    single = tnale(target, restarts=0, max_evaluations=3000, progress=False, **MECHANICS)
    assert single.restarts == 1
    sampled = tnls(target, restart_patience=2, max_evaluations=600, progress=False, **MECHANICS)
    assert sampled.restarts >= 1 and sampled.agreeing <= sampled.restarts


def test_a_rerun_with_the_log_retraces_the_restarts_without_refitting(tmp_path):
    _, target = ring_target((3, 4, 3, 4), (2, 3, 1, 2), (2, 0, 3, 1))
    log = tmp_path / "run.jsonl"
    first = tnale(target, restart_patience=2, max_evaluations=2000, log=log, progress=False, **MECHANICS)
    lines = len(log.read_text().splitlines())
    again = tnale(target, restart_patience=2, max_evaluations=2000, log=log, progress=False, **MECHANICS)
    assert len(log.read_text().splitlines()) == lines  # nothing refitted
    assert (again.structure, again.restarts, again.agreeing) == (first.structure, first.restarts,
                                                                 first.agreeing)


@pytest.mark.parametrize("kwargs", [{"restarts": -1}, {"restarts": 1.5}, {"restart_patience": 0},
                                    {"restart_patience": True}])
def test_bad_restart_settings(kwargs):
    _, target = ring_target((3, 3, 3), (2, 2, 2), (0, 1, 2))
    for search in (tnale, tnls):
        with pytest.raises(ValueError, match="restart"):
            search(target, progress=False, **kwargs)


@pytest.mark.parametrize("topology, seed", [("tt", 0), ("tt", 1), ("tr", 1)])
def test_tnale_finds_hidden_order_5_trains_and_rings_on_several_seeds(topology, seed):
    """Mode sizes 3-4, ranks 2-3, a hidden permutation; seeds the benchmark never uses."""
    rng = np.random.default_rng(500 + seed)
    sizes = tuple(int(s) for s in rng.choice([3, 4], 5))
    ranks = tuple(int(r) for r in rng.integers(2, 4, 4 if topology == "tt" else 5))
    perm = tuple(int(p) for p in rng.permutation(5))
    make = Structure.tensor_train if topology == "tt" else Structure.tensor_ring
    truth = make(sizes, ranks, perm)
    target = truth.contract(truth.random_cores(rng))
    result = tnale(target, topology=topology, max_evaluations=400, restart_patience=1, progress=False)
    assert result.rse <= 1e-4 and result.structure.num_params <= truth.num_params
