"""The command line: `structlayers show` and argument errors."""

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
