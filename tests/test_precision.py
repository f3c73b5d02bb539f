"""Low-precision policies: FP8 rounding and scaling, unit scaling, apply, scale plots.

References are independent of the code under test: FP8 rounding by enumerating every code of
the format, scales by the formula written out with Python floats, layer maps from `to_dense`.
"""

import math

import pytest
import torch
from torch import nn

import structlayers as sl
from structlayers.precision import FORMATS, FP8, UnitScaled, quantize, scale_from_amax

F64 = torch.float64
STRUCTURES = {"dense": {}, "lowrank": {"rank": 16}, "kronecker": {}, "monarch": {}, "btt": {"rank": 2},
              "tt": {"rank": 4}, "tucker": {"rank": 0.25}}
CLASSES = {"dense": sl.Dense, "lowrank": sl.LowRank, "kronecker": sl.Kronecker, "monarch": sl.Monarch,
           "btt": sl.BTT, "tt": sl.TT, "tucker": sl.Tucker}


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# --- formats and scales -------------------------------------------------------------------------
def _nearest_code(x: torch.Tensor, fmt) -> torch.Tensor:
    """Round to the nearest finite value of the format, ties to the even code, saturating:
    by enumerating all 256 bit patterns (no cast involved)."""
    codes = torch.arange(256, dtype=torch.uint8).view(fmt.dtype).to(F64)
    finite = codes[torch.isfinite(codes)]
    values, order = torch.sort(torch.unique(finite))
    x = x.to(F64).clamp(-fmt.max, fmt.max)
    idx = torch.searchsorted(values, x).clamp(1, len(values) - 1)
    lo, hi = values[idx - 1], values[idx]
    pick_hi = (hi - x) < (x - lo)
    tie = (hi - x) == (x - lo)
    # ties: the value whose mantissa's last bit is 0 (even code)
    hi_bits = hi.to(fmt.dtype).view(torch.uint8) & 1
    pick_hi = pick_hi | (tie & (hi_bits == 0))
    return torch.where(pick_hi, hi, lo)


@pytest.mark.parametrize("name", ["e4m3", "e5m2"])
def test_quantize_rounds_like_the_format(name):
    fmt = FORMATS[name]
    gen = torch.Generator().manual_seed(0)
    magnitudes = torch.exp2(torch.randint(-12, 12, (20000,), generator=gen).to(F64))
    x = torch.randn(20000, generator=gen, dtype=F64) * magnitudes
    for scale in (1.0, 2.0**5, 2.0**-7):
        got = quantize(x, torch.tensor(scale), fmt)
        want = _nearest_code(x * scale, fmt) / scale
        assert torch.equal(got, want), (name, scale)
    exact = torch.arange(256, dtype=torch.uint8).view(fmt.dtype).to(F64)
    exact = exact[torch.isfinite(exact)]
    assert torch.equal(quantize(exact, 1.0, fmt), exact)  # representable values round-trip


def test_scale_formula():
    for name, fmt in FORMATS.items():
        for amax in (1e-7, 0.3, 1.0, 3.0, 448.0, 1e4):
            for margin in (0, 2):
                s = scale_from_amax(torch.tensor(amax), fmt, margin).item()
                assert s == 2.0 ** (math.floor(math.log2(fmt.max / amax)) - margin), (name, amax)
                assert amax * s <= fmt.max / 2**margin < 2 * amax * s


def _fp8_error(x, policy):
    """Relative error of a contraction under `policy` vs exact, for a Dense layer."""
    torch.manual_seed(0)  # the same weights every time
    layer = sl.Dense(x.shape[1], 32, bias=False)
    with torch.no_grad():
        layer.weight.normal_()
    exact = layer(x)
    layer.precision = policy.for_layer("probe")
    return rel_err(layer(x), exact)


def test_dynamic_scaling_keeps_accuracy_across_magnitudes_and_naive_casting_does_not():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 48, generator=gen)
    base = _fp8_error(x, FP8())
    assert 0 < base < 0.05  # e4m3 has 3 mantissa bits
    for magnitude in (1e-6, 1e6):  # not powers of two: the rounding pattern differs a little
        assert _fp8_error(x * magnitude, FP8()) <= 1.25 * base
    # naive casting: 1e-6 underflows below e4m3's smallest subnormal, 1e6 saturates at 448
    assert _fp8_error(x * 1e-6, FP8(scaling="none")) > 0.9
    assert _fp8_error(x * 1e6, FP8(scaling="none")) > 0.9
    assert _fp8_error(x, FP8(scaling="none")) < 0.05


def test_bad_batches_do_not_poison_the_scale_state():
    for scaling in ("dynamic", "delayed"):
        policy = FP8(scaling=scaling, history=4).for_layer("l")
        layer = sl.Dense(16, 8, bias=False)
        layer.precision = policy
        x = torch.randn(10, 16)
        want = layer(x)
        scales = {k: s.scale.clone() for k, s in policy.scalers.items() if s.scale is not None}
        for bad in (float("nan"), float("inf"), 0.0):
            poisoned = x.clone()
            poisoned[3, 5] = bad
            if bad == 0.0:
                poisoned.zero_()
            layer(poisoned)
            activation = policy.scalers["weight", "activation"]
            assert torch.isfinite(activation.scale) and activation.scale > 0, (scaling, bad)
            if scaling == "dynamic" and bad != 0.0:
                assert torch.equal(activation.scale, scales["weight", "activation"])
        assert torch.equal(layer(x), want), scaling  # clean batches quantize exactly as before
        if scaling == "delayed":
            assert torch.isfinite(policy.scalers["weight", "activation"].amax_history).all()


def test_delayed_scaling_uses_the_amax_history():
    policy = FP8(scaling="delayed", history=3).for_layer("l")
    layer = sl.Dense(8, 8, bias=False)
    layer.precision = policy
    scaler = lambda: policy.scalers["weight", "activation"]  # noqa: E731
    e4m3 = FORMATS["e4m3"]
    layer(torch.full((2, 8), 100.0))  # a spike on the first call: it fills the history
    for step in range(4):
        layer(torch.full((2, 8), 1.0))
        basis = 100.0 if step < 3 else 1.0  # the spike leaves the 3-long history after 3 steps
        assert scaler().scale.item() == scale_from_amax(torch.tensor(basis), e4m3).item(), step


def test_gradients_are_quantized_to_e5m2_in_the_backward_pass():
    layer = sl.Dense(16, 8, bias=False)
    layer.precision = FP8().for_layer("l")
    x = torch.randn(4, 16, requires_grad=True)
    grad_y = torch.randn(4, 8) * 1e-3
    layer(x).backward(grad_y)
    scaler = layer.precision.scalers["weight", "gradient"]
    q = quantize(grad_y, scaler.scale, FORMATS["e5m2"])
    w = quantize(layer.weight.detach(), layer.precision.scalers["weight", "weight"].scale, FORMATS["e4m3"])
    assert torch.allclose(x.grad, q @ w, rtol=1e-6, atol=0)
    assert not torch.equal(q, grad_y)  # e5m2 really rounded it


@pytest.mark.parametrize("name", list(STRUCTURES))
def test_fp8_layers_stay_close_to_full_precision(name):
    torch.manual_seed(0)
    layer = CLASSES[name](64, 48, **STRUCTURES[name])
    x = torch.randn(32, 64, requires_grad=True)
    y = layer(x)
    y.square().mean().backward()
    grads = [x.grad.clone(), *(p.grad.clone() for p in layer.parameters())]
    x.grad = None
    layer.zero_grad()
    sl.precision.apply(layer, FP8())
    y8 = layer(x)
    y8.square().mean().backward()
    assert rel_err(y8, y) < 0.1
    for got, want in zip([x.grad, *(p.grad for p in layer.parameters())], grads, strict=True):
        assert rel_err(got, want) < 0.2


def _graph_ops(y):
    seen, stack = set(), [y.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is not None and fn not in seen:
            seen.add(fn)
            stack += [f for f, _ in fn.next_functions]
    return {type(fn).__name__ for fn in seen}


@pytest.mark.parametrize("name", list(STRUCTURES))
def test_real_fp8_gemms_match_the_simulation(name):
    """torch._scaled_mm (FP8 x FP8, fp32 accumulation; it runs on CPU too) gives what the
    simulation gives, forward and backward, wherever a contraction is one GEMM."""
    from structlayers.precision.fp8_gemm import gemm_plan

    torch.manual_seed(0)
    simulated = CLASSES[name](48, 40, **STRUCTURES[name])
    real = CLASSES[name](48, 40, **STRUCTURES[name])
    real.load_state_dict(simulated.state_dict())
    sl.precision.apply(simulated, FP8(gemm="simulate"))
    sl.precision.apply(real, FP8(gemm="scaled_mm"))
    x = torch.randn(6, 48)
    grad_y = torch.randn(6, 40) * 1e-3
    results = []
    for layer in (simulated, real):
        xg = x.clone().requires_grad_(True)
        y = layer(xg)
        y.backward(grad_y)
        results.append((y, xg.grad, *(p.grad for p in layer.parameters()), _graph_ops(y)))
    one_gemm = [gemm_plan(step) is not None for _, _, step in real.core_steps]
    assert all(one_gemm) == (name not in ("monarch", "btt"))  # block steps are batched GEMMs
    assert ("_FP8MatmulBackward" in results[1][-1]) == any(one_gemm)
    for got, want in zip(results[1][:-1], results[0][:-1], strict=True):
        assert rel_err(got, want) < 1e-5


# --- unit scaling -------------------------------------------------------------------------------
@pytest.mark.parametrize("width", [256, 1024, 4096])
@pytest.mark.parametrize("name", list(STRUCTURES))
def test_unit_scaled_layers_have_unit_activations_and_gradients(name, width):
    torch.manual_seed(0)
    layer = CLASSES[name](width, width, bias=False, **STRUCTURES[name])
    sl.precision.apply(layer, UnitScaled())
    assert all(0.9 < p.std().item() < 1.1 for p in layer.parameters() if p.numel() > 100)
    x = torch.randn(64, width, requires_grad=True)
    y = layer(x)
    y.backward(torch.randn_like(y))
    assert 0.5 <= y.std().item() <= 2, "activation"
    assert 0.5 <= x.grad.std().item() <= 2, "input gradient"
    for p in layer.parameters():
        assert 0.5 <= p.grad.std().item() <= 2, "core gradient"


@pytest.mark.parametrize("name", list(STRUCTURES))
def test_unit_scaling_computes_the_layer_map_times_its_scales(name):
    torch.manual_seed(0)
    layer = CLASSES[name](24, 20, **STRUCTURES[name]).double()
    with torch.no_grad():
        layer.bias.normal_()
    x = torch.randn(5, 24, dtype=F64)
    alpha = math.prod(1 / math.sqrt(step.fan_in) for _, _, step in layer.core_steps)
    sl.precision.apply(layer, UnitScaled())
    want = alpha * x @ layer.to_dense().T + layer.bias
    assert torch.allclose(layer(x), want, rtol=1e-10, atol=1e-10)


def test_unit_scaling_gradients_for_dense():
    layer = sl.Dense(12, 7, bias=False).double()
    sl.precision.apply(layer, UnitScaled())
    x = torch.randn(5, 12, dtype=F64, requires_grad=True)
    g = torch.randn(5, 7, dtype=F64)
    layer(x).backward(g)
    w = layer.weight.detach()
    assert torch.allclose(x.grad, g @ w / math.sqrt(7))  # beta_x = 1/sqrt(fan_out)
    assert torch.allclose(layer.weight.grad, g.T @ x.detach() / math.sqrt(5))  # 1/sqrt(tokens)


def test_unit_scaling_preserve_keeps_the_function():
    torch.manual_seed(0)
    layer = sl.BTT(36, 40, rank=2).double()
    x = torch.randn(6, 36, dtype=F64)
    before = layer(x)
    sl.precision.apply(layer, UnitScaled(init="preserve"))
    assert torch.allclose(layer(x), before, rtol=1e-10, atol=1e-12)


# --- apply and plots ----------------------------------------------------------------------------
def test_apply_gives_each_layer_its_own_policy_and_converts_linear_on_request():
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), sl.Monarch(32, 32), nn.ReLU(), nn.Linear(32, 4))
    x = torch.randn(3, 16)
    want = model(x)
    names = sl.precision.apply(model, FP8(), linear=True)
    assert names == ["0", "2", "4"]
    assert isinstance(model[0], sl.Dense) and isinstance(model[4], sl.Dense)
    policies = [model[i].precision for i in (0, 2, 4)]
    assert all(isinstance(p, FP8) for p in policies) and len({id(p) for p in policies}) == 3
    assert rel_err(model(x), want) < 0.1
    assert sl.precision.apply(model, None) == names and model[2].precision is None
    assert torch.allclose(model(x), want, atol=1e-6)  # the converted Dense layers are exact


def test_apply_bad_input_changes_nothing():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    with pytest.raises(ValueError, match="no structured layer"):
        sl.precision.apply(model, FP8())
    assert type(model[0]) is nn.Linear
    with pytest.raises(ValueError, match="no structured layer"):
        sl.precision.apply(nn.Sequential(nn.ReLU()), FP8(), linear=True)
    with pytest.raises(TypeError, match="policy"):
        sl.precision.apply(nn.Sequential(sl.Dense(4, 4)), "fp8")
    with pytest.raises(TypeError, match="model"):
        sl.precision.apply("model", FP8())


@pytest.mark.parametrize("kwargs,error,word", [
    ({"forward": "e3m4"}, ValueError, "e4m3"),
    ({"backward": "fp8"}, ValueError, "format"),
    ({"scaling": "static"}, ValueError, "scaling"),
    ({"margin": -1}, ValueError, "margin"),
    ({"margin": 17}, ValueError, "margin"),
    ({"margin": 1.5}, ValueError, "margin"),
    ({"history": 0}, ValueError, "history"),
    ({"record": "yes"}, TypeError, "record"),
    ({"gemm": "cublas"}, ValueError, "gemm"),
])
def test_bad_fp8_settings(kwargs, error, word):
    with pytest.raises(error, match=word):
        FP8(**kwargs)


def test_bad_unit_scaling_init():
    with pytest.raises(ValueError, match="init"):
        UnitScaled(init="zeros")


def test_scale_history_and_plot(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(sl.BTT(32, 32, rank=2), nn.GELU(), sl.TT(32, 10, rank=2))
    sl.precision.apply(model, FP8())
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(4):
        loss = nn.functional.cross_entropy(model(torch.randn(16, 32)), torch.randint(0, 10, (16,)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    rows = sl.precision.scale_history(model)
    cores = 2 + 3  # BTT W0, W1; TT with 3 default cores
    assert len(rows) == cores * 3 * 4  # 3 tensors per core, 4 steps
    for r in rows:
        fmt = FORMATS["e5m2" if r["tensor"] == "gradient" else "e4m3"]
        assert r["scale"] == scale_from_amax(torch.tensor(r["amax"]), fmt).item()
    fig = sl.precision.plot_scales(model, tmp_path / "scales.png")
    assert (tmp_path / "scales.png").stat().st_size > 10_000 and len(fig.axes) == 3
    with pytest.raises(ValueError, match="no recorded scales"):
        sl.precision.plot_scales([])


def test_kernels_step_aside_for_a_policy():
    """Under backend("triton") a layer with a policy still runs the policy (the torch path)."""
    layer = sl.Monarch(16, 16)
    sl.precision.apply(layer, FP8())
    with sl.backend("triton"):
        layer(torch.randn(2, 16))
    used = [key for key, scaler in layer.precision.scalers.items() if scaler.records]
    assert sorted(used) == [("W0", "activation"), ("W0", "weight"), ("W1", "activation"), ("W1", "weight")]


@pytest.mark.parametrize("policy", [FP8(), UnitScaled()], ids=["fp8", "unit"])
def test_policies_under_torch_compile(policy):
    layer = sl.BTT(48, 40, rank=2)
    sl.precision.apply(layer, policy)
    compiled = torch.compile(layer, backend="aot_eager")
    x = torch.randn(6, 48, requires_grad=True)
    compiled(x).sum().backward()
    got = x.grad.clone()
    x.grad = None
    want = layer(x)
    want.sum().backward()
    assert torch.allclose(compiled(x), want) and torch.allclose(got, x.grad)
