"""The command line: `structlayers show` and argument errors."""

import numpy as np
import pytest

from structlayers.cli import main


def test_show_prints_cores_counts_and_the_gpu_path(capsys):
    assert main(["show", "monarch", "64", "64"]) == 0
    out = capsys.readouterr().out
    assert "W0: (8, 8, 8)" in out and "W1: (8, 8, 8)" in out
    assert "params=1,088" in out  # 2 * 8^3 cores + 64 bias
    assert "fused Triton kernel, (m1, m0, n0, r, n1) = (8, 8, 8, 1, 8)" in out
    assert main(["show", "tt:rank=2", "64", "64"]) == 0
    assert "GPU path: torch (no fused kernel" in capsys.readouterr().out


def test_bad_arguments_exit_with_a_message(capsys):
    assert main(["show", "nonsense", "8", "8"]) == 2
    assert "nonsense" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["show", "monarch", "0", "8"])
    assert "positive" in capsys.readouterr().err


def test_search_writes_cores_that_rebuild_the_target(tmp_path, capsys):
    from structlayers.search import Structure

    truth = Structure.tensor_ring((4, 4, 4, 4), (2, 3, 1, 2), (2, 0, 3, 1))
    target = truth.contract(truth.random_cores(np.random.default_rng(0)))
    np.save(tmp_path / "ring.npy", target)
    args = ["search", str(tmp_path / "ring.npy"), "--budget", "300", "--log", str(tmp_path / "run.jsonl"),
            "--quiet"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert out.startswith("tnale: ") and "wrote" in out
    saved = np.load(tmp_path / "ring.cores.npz")
    structure = Structure.from_key(str(saved["structure"]))
    cores = [saved[f"core_{k}"] for k in range(structure.order)]
    assert np.allclose(structure.contract(cores), target, atol=1e-6)
    assert main(["search", str(tmp_path / "ring.npy"), "--method", "tucker", "--budget", "100"]) == 0
    assert "tucker: ranks" in capsys.readouterr().out


def test_search_bad_input(tmp_path, capsys):
    assert main(["search", str(tmp_path / "missing.npy")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "text.npy").write_text("not an array")
    assert main(["search", str(tmp_path / "text.npy")]) == 2
    assert "cannot read" in capsys.readouterr().err
    np.save(tmp_path / "nan.npy", np.full((3, 3), np.nan))
    assert main(["search", str(tmp_path / "nan.npy")]) == 2
    assert "NaN" in capsys.readouterr().err
