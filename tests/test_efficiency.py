"""Compute-efficiency benchmarks: exact FLOP counts, the data, training runs, the summaries
against hand-computed curves, resumable sweeps, and bad input before any training."""

import csv
import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import structlayers.training  # noqa: F401  (registers the CPU attention FLOP formulas)
from structlayers import efficiency
from structlayers.data import stdlib_source_files, text_corpus
from structlayers.efficiency import (
    Run,
    best_lrs,
    compute_ratios,
    compute_to_reach,
    frontier,
    load_runs,
    power_law,
    sweep,
    tuned_lrs,
    wall_clock,
)
from structlayers.efficiency_suite import FULL, QUICK
from structlayers.training import (
    STRUCTURES,
    GPTTask,
    MLPTask,
    check_sweep,
    count_flops,
    eval_steps,
    train_run,
)

BENCHMARKS = Path(__file__).parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def mlp_task():
    return MLPTask(samples=1000)


@pytest.fixture(scope="module")
def gpt_task():
    return GPTTask(max_bytes=50_000, batch_size=4, val_batches=2, block_size=16)


def _run(structure, curve, width=64, lr=1e-3, parameterization="mup", step_ms=1.0, flops_per_step=1):
    run = Run("t", structure, width, lr, parameterization, curve[-1][0], 0, 10, flops_per_step, step_ms)
    run.curve = list(curve)
    return run


# --- FLOPs ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("structure", ["dense", "lowrank", "kronecker", "btt2", "tt", "tucker"])
def test_training_flops_are_three_forwards_less_the_input_gradient(mlp_task, structure):
    """Forward+backward of the MLP: every matmul runs three times (forward, grad input, grad
    weight) except the first layer's grad input (the data needs none). The forward FLOPs come
    from the layers' own counts, checked elsewhere against the materialised structure."""
    width, batch = 64, 128
    model = mlp_task.model(structure, width)
    linears = [m for m in model if hasattr(m, "flops") or isinstance(m, nn.Linear)]
    forward = sum(m.flops(batch) if hasattr(m, "flops") else 2 * batch * m.in_features * m.out_features
                  for m in linears)
    first = 2 * batch * 40 * width
    x, y = mlp_task.data[0][:batch], mlp_task.data[1][:batch]
    assert count_flops(mlp_task, model, (x, y)) == 3 * forward - first
    assert all(p.grad is None for p in model.parameters())


def test_cpu_attention_flops_match_a_matmul_attention():
    """F.scaled_dot_product_attention on CPU is counted like the same attention written as two
    matmuls (which FlopCounterMode counts natively) in the forward pass; its backward counts five
    matmuls, torch's convention for flash attention (it recomputes the scores), one more than
    autograd through the two matmuls."""
    q, k, v = (torch.randn(2, 4, 32, 8, requires_grad=True) for _ in range(3))
    matmul = 2 * 2 * 4 * 32 * 32 * 8  # (batch, heads, T, T, head dim)

    def flops(attend, backward):
        with FlopCounterMode(display=False) as counter:
            out = attend(q, k, v)
            if backward:
                out.sum().backward()
        return counter.get_total_flops()

    def by_matmuls(q, k, v):
        return torch.softmax(q @ k.transpose(-1, -2) / 8 ** 0.5, -1) @ v

    assert flops(F.scaled_dot_product_attention, False) == flops(by_matmuls, False) == 2 * matmul
    assert flops(by_matmuls, True) == 6 * matmul
    assert flops(F.scaled_dot_product_attention, True) == 7 * matmul


def test_gpt_flops_include_attention(gpt_task):
    model = gpt_task.model("dense", 32)
    batch = gpt_task.batch(torch.Generator().manual_seed(0))
    linear_params = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    tokens = batch[0].numel()
    linear_only = 3 * 2 * tokens * linear_params  # every weight's matmul, three times
    assert count_flops(gpt_task, model, batch) > linear_only


def test_gpt_task_models_follow_their_parameterization(gpt_task):
    """muP (base width 64, 4 heads): attention scaled sqrt(16)/head_dim, readout std 8/width,
    N(0, 1) embeddings; SP: 1/sqrt(head_dim), 1/sqrt(fan_in) readout, nanoGPT's 0.02 embeddings.
    Both untied (the same architecture)."""
    torch.manual_seed(0)
    mup_model, sp_model = gpt_task.model("btt2", 128, "mup"), gpt_task.model("btt2", 128, "standard")
    for model in (mup_model, sp_model):
        assert model.lm_head.weight is not model.wte.weight
    assert mup_model.lm_head.weight.std().item() == pytest.approx(8 / 128, rel=0.05)
    assert sp_model.lm_head.weight.std().item() == pytest.approx(1 / math.sqrt(128), rel=0.05)
    assert mup_model.wte.weight.std().item() == pytest.approx(1.0, rel=0.05)
    assert sp_model.wte.weight.std().item() == pytest.approx(0.02, rel=0.05)
    mup_model, sp_model = gpt_task.model("btt2", 32, "mup"), gpt_task.model("btt2", 32, "standard")
    assert mup_model.blocks[0].attn.scale == pytest.approx(4 / 8)
    assert sp_model.blocks[0].attn.scale == pytest.approx(1 / math.sqrt(8))


# --- data ----------------------------------------------------------------------------------------
def test_mlp_task_scores_the_first_val_samples():
    full, cut = MLPTask(samples=200), MLPTask(samples=200, val_samples=15)
    assert torch.equal(cut.data[0], full.data[0]) and torch.equal(cut.data[1], full.data[1])
    assert torch.equal(cut.data[2], full.data[2][:15]) and torch.equal(cut.data[3], full.data[3][:15])
    assert "160 train / 15 validation" in cut.source and "160 train / 40 validation" in full.source


@pytest.mark.parametrize("kwargs", [{"samples": 5}, {"samples": True}, {"batch_size": 0},
                                    {"val_samples": 2.5}])
def test_mlp_task_bad_sizes(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        MLPTask(**kwargs)


def test_stdlib_corpus_is_deterministic_and_traceable():
    a, b = text_corpus(max_bytes=20_000), text_corpus(max_bytes=20_000)
    assert torch.equal(a.train, b.train) and torch.equal(a.val, b.val)
    assert len(a.train) + len(a.val) == 20_000 and len(a.val) == 2_000
    assert sys.version.split()[0] in a.source
    files = stdlib_source_files()
    assert files == sorted(files)
    assert bytes(a.train[:100].tolist()) == files[0].read_bytes()[:100]


def test_corpus_batches_are_shifted_windows(tmp_path):
    path = tmp_path / "text.txt"
    path.write_bytes(bytes(range(256)) * 10)
    corpus = text_corpus(path)
    x, y = corpus.batch("train", 5, 12, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (5, 12) and x.dtype == torch.int64
    assert torch.equal(y[:, :-1], x[:, 1:])
    assert torch.equal((x + 1) % 256, y)  # consecutive bytes in this file


def test_missing_or_tiny_corpus_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        text_corpus(tmp_path / "missing.txt")
    (tmp_path / "tiny.txt").write_text("short")
    with pytest.raises(ValueError, match="at least 1000"):
        text_corpus(tmp_path / "tiny.txt")


# --- training runs -------------------------------------------------------------------------------
def test_eval_steps_are_log_spaced_and_end_at_the_last_step():
    steps = eval_steps(1000, 12)
    assert steps[0] == 1 and steps[-1] == 1000 and steps == sorted(set(steps))
    ratios = [b / a for a, b in zip(steps[4:], steps[5:], strict=False)]
    assert max(ratios) / min(ratios) < 1.5  # geometric, not linear
    assert eval_steps(5, 12) == [1, 2, 3, 4, 5]


@pytest.mark.parametrize("structure", ["dense", "btt1"])
def test_a_run_learns_and_counts_its_flops(mlp_task, structure):
    run = train_run(mlp_task, structure, 64, 3e-3, steps=120, points=6)
    assert run.curve[-1][0] == 120 and run.step_ms > 0
    assert [p[1] for p in run.curve] == [p[0] * run.flops_per_step for p in run.curve]
    assert run.final_train_loss < 0.6 * math.log(10)  # chance level is ln 10
    assert min(p[3] for p in run.curve) < 0.8 * math.log(10)  # and it generalises (before it overfits)
    model = mlp_task.model(structure, 64)
    assert run.params == sum(p.numel() for p in model.parameters())


def test_gpt_run_trains_with_structured_projections(gpt_task):
    model = gpt_task.model("btt2", 32)
    assert type(model.blocks[0].mlp.fc).__name__ == "BTT"
    run = train_run(gpt_task, "btt2", 32, 1e-2, steps=15, points=3)
    assert run.curve[-1][3] < math.log(256)


def test_standard_parameterization_runs(mlp_task):
    run = train_run(mlp_task, "monarch", 64, 1e-3, steps=20, parameterization="standard", points=2)
    assert math.isfinite(run.final_val_loss)


# --- summaries against hand-computed curves ------------------------------------------------------
def test_compute_to_reach_interpolates_in_log_flops():
    run = _run("a", [(1, 1e9, 3.0, 2.0), (10, 1e10, 2.0, 1.0)])
    assert compute_to_reach([run], 1.5) == pytest.approx(10 ** 9.5)
    assert compute_to_reach([run], 2.0) == 1e9  # reached at the first evaluation
    assert compute_to_reach([run], 0.5) == math.inf
    faster = _run("a", [(1, 2e8, 3.0, 1.2)])
    assert compute_to_reach([run, faster], 1.5) == 2e8  # the fewest FLOPs over all runs


def test_compute_ratios_against_the_widest_dense_run():
    dense = [_run("dense", [(1, 1e9, 0, 2.0), (2, 4e10, 0, 1.0)], width=256),
             _run("dense", [(1, 1e9, 0, 2.5), (2, 1e10, 0, 1.5)], width=64)]
    btt = [_run("btt1", [(1, 1e9, 0, 1.5), (2, 1e10, 0, 1.0)], width=256)]
    tt = [_run("tt", [(1, 1e9, 0, 3.0), (2, 1e10, 0, 2.0)], width=256)]
    rows = {r["structure"]: r for r in compute_ratios(dense + btt + tt)}
    assert rows["dense"]["target_loss"] == 1.0  # the widest dense run's final loss
    assert rows["dense"]["ratio"] == pytest.approx(1.0)
    assert rows["btt1"]["ratio"] == pytest.approx(4.0)
    assert rows["tt"]["ratio"] == 0 and rows["tt"]["flops_to_target"] == math.inf
    with pytest.raises(ValueError, match="dense"):
        compute_ratios(btt)


def test_frontier_and_power_law_recover_a_known_law():
    runs = [_run("a", [(1, c / 2, 0, 5 * (c / 2) ** -0.1), (2, c, 0, 5 * c ** -0.1)], flops_per_step=c / 2)
            for c in (1e9, 1e10, 1e11)]
    a, b = power_law(runs)
    assert a == pytest.approx(5) and b == pytest.approx(0.1)
    front = frontier(runs)
    assert [f for f, _ in front] == sorted(f for f, _ in front)
    assert all(l2 < l1 for (_, l1), (_, l2) in zip(front, front[1:], strict=False))


def test_best_lrs_drift_in_grid_steps():
    def sweep_runs(parameterization, best):
        return [_run("btt1", [(10, 1, 1.0 + abs(math.log2(lr / best[w])), 0)], width=w, lr=lr,
                     parameterization=parameterization)
                for w in best for lr in (2.0 ** -k for k in range(4, 12))]

    runs = sweep_runs("mup", {64: 2 ** -7, 128: 2 ** -7, 256: 2 ** -8, 1024: 2 ** -9}) + \
        sweep_runs("standard", {64: 2 ** -6, 128: 2 ** -8, 256: 2 ** -10, 1024: 2 ** -11})
    rows = {r["parameterization"]: r for r in best_lrs(runs)}
    assert rows["mup"]["drift_4x"] == pytest.approx(1) and rows["mup"]["transfers"]
    assert rows["mup"]["drift_steps"] == pytest.approx(2)
    assert rows["standard"]["drift_4x"] == pytest.approx(4) and not rows["standard"]["transfers"]
    assert rows["standard"]["drift_steps"] == pytest.approx(5)
    assert tuned_lrs(runs, 128) == {"btt1": 2 ** -7}
    assert tuned_lrs(runs, 512) == {}


def test_wall_clock_ratios():
    runs = [_run("dense", [(1, 1, 0, 0)], width=64, step_ms=4.0, flops_per_step=100),
            _run("btt1", [(1, 1, 0, 0)], width=64, step_ms=3.0, flops_per_step=25)]
    rows = {r["structure"]: r for r in wall_clock(runs)}
    assert rows["btt1"]["time_vs_dense"] == pytest.approx(0.75)
    assert rows["btt1"]["flops_vs_dense"] == pytest.approx(0.25)


# --- sweeps: resumable, and checked before training ----------------------------------------------
def test_sweep_resumes_without_retraining(mlp_task, tmp_path, monkeypatch):
    path = tmp_path / "runs.csv"
    jobs = [("dense", 64, 3e-3, "mup", 10, 0), ("btt1", 64, 3e-3, "mup", 10, 0)]
    first = sweep(mlp_task, jobs, path, progress=False, points=3)
    before = path.read_text()
    trained = []
    real = efficiency.train_run
    monkeypatch.setattr(efficiency, "train_run", lambda *a, **k: trained.append(a[1]) or real(*a, **k))
    again = sweep(mlp_task, [*jobs, ("lowrank", 64, 3e-3, "mup", 10, 0)], path, progress=False, points=3)
    assert trained == ["lowrank"]
    assert path.read_text().startswith(before)
    finals = {(r.structure, r.final_val_loss) for r in again}
    assert {(r.structure, r.final_val_loss) for r in first} <= finals
    assert len(load_runs(path)) == 3


def test_a_huge_lr_loses_and_a_nan_run_is_recorded_as_infinite_loss(mlp_task, tmp_path):
    runs = sweep(mlp_task, [("dense", 64, lr, "standard", 30, 0) for lr in (1e-3, 1e6)],
                 tmp_path / "r.csv", progress=False)
    assert best_lrs(runs)[0]["best_lr"] == {64: 1e-3}

    class NaNLoss(MLPTask):  # a task whose loss turns NaN, as a diverging run's does
        def __init__(self):
            super().__init__(mlp_task.samples)
            self.data = mlp_task.data

        def loss(self, model, batch):
            return super().loss(model, batch) * math.nan

    with pytest.raises(FloatingPointError, match="loss is nan at step 1"):
        train_run(NaNLoss(), "dense", 64, 1e-3, steps=5)
    runs = sweep(NaNLoss(), [("dense", 64, 1e-3, "mup", 5, 0)], tmp_path / "nan.csv", progress=False)
    assert runs[0].final_train_loss == runs[0].final_val_loss == math.inf


def test_every_shipped_setting_passes_its_checks(mlp_task, gpt_task):
    """FULL, QUICK and the benchmark script's extra suites train only valid (structure, width)
    pairs, and every LR sweep spans 3+ widths over at least 4x, as the benchmark promises."""
    spec = importlib.util.spec_from_file_location("bench_efficiency", BENCHMARKS / "efficiency.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    tasks = {"mlp": mlp_task, "gpt": gpt_task}
    suites = [*FULL.items(), *QUICK.items(), ("gpt", script.GPT_LONG), ("mlp", script.MLP_FRESH)]
    for name, settings in suites:
        settings.check(tasks[name])
        assert settings.compute_jobs(dict.fromkeys(settings.structures, 1e-3))
    for settings in (*FULL.values(), *QUICK.values()):
        widths = settings.lr_widths
        assert len(widths) >= 3 and max(widths) >= 4 * min(widths)


def test_bad_sweeps_fail_before_training(mlp_task, gpt_task):
    with pytest.raises(ValueError, match="unknown structure 'bt'"):
        check_sweep(mlp_task, ["dense", "bt"], [64])
    with pytest.raises(ValueError, match="width 97 cannot be factored for monarch"):
        check_sweep(mlp_task, ["dense", "monarch"], [64, 97])
    with pytest.raises(ValueError, match="widths must be ints"):
        check_sweep(mlp_task, ["dense"], [8])
    with pytest.raises(ValueError, match="multiple of n_head"):
        check_sweep(gpt_task, ["dense"], [66])
    check_sweep(mlp_task, list(STRUCTURES), [64, 256])  # every structure factors powers of 2


def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "structlayers.cli", "bench", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("args, message", [
    (["compute", "--structures", "dense", "nope"], "unknown structure 'nope'"),
    (["compute", "--task", "gpt", "--corpus", "missing.txt"], "--corpus 'missing.txt' is not a file"),
    (["lr", "--widths", "64", "97", "--structures", "monarch"], "width 97 cannot be factored"),
    (["compute", "--lr", "fast"], "lr must be a positive number"),
])
def test_cli_bad_input_fails_before_training(tmp_path, args, message):
    result = _cli(*args, "--out", "res", cwd=tmp_path)
    assert result.returncode == 2 and message in result.stderr
    assert not (tmp_path / "res").exists() or not any((tmp_path / "res").iterdir())


def test_cli_compute_quick_writes_results_and_resumes(tmp_path):
    args = ["compute", "--task", "mlp", "--quick", "--structures", "dense", "btt1", "--widths", "64", "128",
            "--steps", "20", "--out", "res", "--quiet"]
    result = _cli(*args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = tmp_path / "res"
    assert {p.name for p in out.iterdir()} == {"efficiency_mlp_compute.csv", "efficiency_mlp_compute.md",
                                               "efficiency_mlp_compute.png"}
    rows = list(csv.DictReader((out / "efficiency_mlp_compute.csv").open()))
    assert {(r["structure"], r["width"]) for r in rows} == {("dense", "64"), ("dense", "128"),
                                                            ("btt1", "64"), ("btt1", "128")}
    assert "compute saved vs dense" in (out / "efficiency_mlp_compute.md").read_text()
    assert _cli(*args, cwd=tmp_path).returncode == 0
    assert len(list(csv.DictReader((out / "efficiency_mlp_compute.csv").open()))) == len(rows)


def test_cli_bench_help_lists_the_suites():
    result = subprocess.run([sys.executable, "-m", "structlayers.cli", "bench", "--help"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    for word in ("layers", "compute", "lr", "--task", "--corpus", "--widths", "tuned"):
        assert word in result.stdout
