"""The layer benchmark harness (structlayers/bench.py): its baselines compute the right map and
its rows say what was timed. Speed itself is measured in benchmarks/, not here."""

import math

import pytest
import torch

import structlayers as sl
from structlayers.bench import TwoBmmMonarch, format_table, run_bench


@pytest.mark.parametrize("i,o", [(64, 256), (256, 64), (64, 64), (1024, 4096)])
def test_two_bmm_monarch_is_the_monarch_map_up_to_its_output_permutation(i, o):
    """fly's algorithm writes output (s, l) where the layer writes (l, s): same map otherwise,
    gradients included (checked against the layer's materialised dense matrix)."""
    torch.manual_seed(0)
    layer = sl.Monarch(i, o, dtype=torch.float64)
    baseline = TwoBmmMonarch(layer)
    x = torch.randn(3, 5, i, dtype=torch.float64, requires_grad=True)
    l, s = layer.core_steps[1][1].shape[0], layer.core_steps[1][1].shape[2]
    y = baseline(x)
    unpermuted = (y - baseline.bias).view(3, 5, s, l).transpose(-1, -2).reshape(3, 5, o)
    dense = x @ layer.to_dense().T
    torch.testing.assert_close(unpermuted, dense)
    torch.testing.assert_close(layer(x), dense + layer.bias)
    if i == 64 and o == 64:
        assert torch.autograd.gradcheck(baseline, (x[0, :2],))


def test_two_bmm_monarch_rejects_padded_layers():
    with pytest.raises(ValueError, match="unpadded"):
        TwoBmmMonarch(sl.Monarch(60, 64, blocks=8))


def test_run_bench_rows_cover_every_mode_and_path():
    rows = run_bench(64, 128, 32, ["dense", "monarch", "tt:cores=3,rank=2"], repeats=1,
                     progress=False, project=False)
    assert [(r.mode, r.spec) for r in rows] == [
        (mode, spec) for mode in ("fwd", "fwd+bwd", "inference")
        for spec in ("nn.Linear", "dense", "monarch", "tt:cores=3,rank=2")]
    for r in rows:
        assert r.ms > 0 and r.time_vs_dense > 0 and math.isnan(r.projection_error)
        assert math.isnan(r.two_bmm_vs_dense) == (r.spec != "monarch")
        assert math.isnan(r.einsum_vs_dense) == (r.spec == "nn.Linear")
        assert r.load >= 0 and r.date and r.device
    monarch = next(r for r in rows if r.spec == "monarch")
    # a rank-1 two-core BTT does one multiply-add per core entry per token
    entries = sum(p.numel() for m in (sl.Monarch(64, 128), sl.Monarch(128, 64))
                  for name, p, _ in m.core_steps)
    assert monarch.flops_vs_dense == pytest.approx(2 * entries * 32 / (2 * 2 * 64 * 128 * 32))
    text = format_table(rows)
    assert text.count("| monarch |") == 3 and "two-bmm / dense" in text


def test_run_bench_bad_arguments():
    with pytest.raises(ValueError, match="dtype must be one of"):
        run_bench(64, 128, 32, ["dense"], dtype="int8")
    with pytest.raises(ValueError, match="modes must be"):
        run_bench(64, 128, 32, ["dense"], modes=["backward"])
