"""muP: per-core learning rates and weight decay, init, RMS cap, and the coordinate check.

Expected learning rates are recomputed here from each layer's known factorization (in_factors,
ranks, blocks), never from the `Step` fans that the code under test uses.
"""

import math

import pytest
import torch
from torch import nn

import structlayers as sl
from structlayers import mup


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # small matmuls: one thread is faster and leaves the second core to other test runs
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Net(nn.Module):
    """A model with every kind of parameter: cores, plain linears, vectors, embedding, scalar."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 512)
        self.norm = nn.LayerNorm(512)
        self.btt = sl.BTT(512, 2048, rank=2)
        self.tt = sl.TT(2048, 512, cores=3, rank=4)
        self.lowrank = sl.LowRank(512, 512, rank=32)
        self.monarch = sl.Monarch(512, 512, blocks=16)
        self.tucker = sl.Tucker(512, 512, rank=0.25)
        self.dense = sl.Dense(512, 512)
        self.head = nn.Linear(512, 10)
        self.gain = nn.Parameter(torch.ones(()))


def expected_cores(net: Net) -> dict[str, tuple[int, int, int, float]]:
    """name -> (fan_in, fan_out, n_cores, out/in of the layer), from the known factorizations."""
    m, n = net.btt.in_factors, net.btt.out_factors  # BTT rank 2: W0 (m0 -> 2 n0), W1 (2 m1 -> n1)
    cores = {"btt.W0": (m[0], 2 * n[0], 2, 4.0), "btt.W1": (2 * m[1], n[1], 2, 4.0)}
    i, o, r = net.tt.in_factors, net.tt.out_factors, (1, 4, 4, 1)  # TT: (r_k-1 i_k -> o_k r_k)
    cores |= {f"tt.G{k}": (r[k] * i[k], o[k] * r[k + 1], 3, 0.25) for k in range(3)}
    cores |= {"lowrank.U": (512, 32, 2, 1.0), "lowrank.V": (32, 512, 2, 1.0)}
    cores |= {"monarch.W0": (512 // 16, 512 // 16, 2, 1.0), "monarch.W1": (16, 16, 2, 1.0)}
    # Tucker: in factors (i_k -> p_k), the core (p0 p1 -> q0 q1), out factors (q_k -> o_k)
    q, p = net.tucker.ranks[:2], net.tucker.ranks[2:]
    ti, to = net.tucker.in_factors, net.tucker.out_factors
    cores |= {f"tucker.in_factor{k}": (ti[k], p[k], 5, 1.0) for k in range(2)}
    cores |= {"tucker.core": (p[0] * p[1], q[0] * q[1], 5, 1.0)}
    cores |= {f"tucker.out_factor{k}": (q[k], to[k], 5, 1.0) for k in range(2)}
    cores |= {"dense.weight": (512, 512, 1, 1.0), "head.weight": (512, 10, 1, 10 / 512)}
    return cores


VECTORS = ["embed.weight", "norm.weight", "norm.bias", "btt.bias", "tt.bias", "lowrank.bias",
           "monarch.bias", "tucker.bias", "dense.bias", "head.bias", "gain"]


def settings(model, groups) -> dict[str, tuple[float, float]]:
    """param name -> (lr, weight_decay), checking that every parameter appears exactly once."""
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)), "a parameter is in two groups"
    assert set(ids) == {id(p) for p in model.parameters()}, "a parameter is missing"
    by_id = {id(p): (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}
    return {name: by_id[id(p)] for name, p in model.named_parameters()}


# --- param_groups ------------------------------------------------------------------------------
def test_adam_lr_and_decay_of_every_core():
    net, lr, base, wd = Net(), 1e-3, 256, 0.1
    got = settings(net, mup.param_groups(net, lr, base_width=base, weight_decay=wd))
    cores = expected_cores(net)
    assert set(cores) | set(VECTORS) == set(got)
    for name, (fan_in, _, n_cores, _) in cores.items():
        assert got[name][0] == pytest.approx(lr * base / (n_cores * fan_in), rel=1e-12), name
        assert got[name][1] == pytest.approx(wd * n_cores * fan_in / base, rel=1e-12), name
    for name in VECTORS:
        assert got[name] == (lr, 0.0), name


def test_sgd_lr_multipliers():
    net, lr = Net(), 0.1
    got = settings(net, mup.param_groups(net, lr, optimizer="sgd"))
    for name, (fan_in, fan_out, _, layer_ratio) in expected_cores(net).items():
        assert got[name][0] == pytest.approx(lr * fan_out / fan_in / layer_ratio, rel=1e-12), name
    assert got["dense.weight"][0] == got["head.weight"][0] == lr  # one-core dense: multiplier 1
    for name in VECTORS:
        assert got[name] == (lr, 0.0), name


def test_decay_times_lr_is_constant_across_widths():
    lr, wd = 3e-3, 0.1
    products, decays = set(), {}
    for width in (256, 1024, 4096):
        model = nn.Sequential(nn.Linear(32, width), sl.BTT(width, width, rank=2),
                              nn.Linear(width, 10))
        got = settings(model, mup.param_groups(model, lr, base_width=256, weight_decay=wd))
        products |= {round(lr_ * wd_ / (lr * wd), 9) for name, (lr_, wd_) in got.items()
                     if name.endswith(("weight", "W0", "W1"))}
        decays[width] = got["1.W0"][1]
        assert got["1.bias"] == (lr, 0.0)
    assert products == {1.0}
    # W0's fan-in is sqrt(width): 16x the width -> 4x the decay
    assert decays[4096] / decays[256] == pytest.approx(4.0)


def test_groups_drive_torch_adam():
    """One AdamW step moves every entry of a core by its group's lr (Adam's first step is
    lr * sign(grad)): the groups are what torch actually uses."""
    torch.manual_seed(0)
    net = Net().double()  # float64: the step is not lost in the rounding of the weights
    groups = mup.param_groups(net, 1e-4, base_width=128)
    opt = torch.optim.AdamW(groups)
    before = {name: p.detach().clone() for name, p in net.named_parameters()}
    x = torch.randn(8, 512, dtype=torch.float64)
    out = net.head(net.dense(net.tucker(net.monarch(net.lowrank(net.tt(net.btt(x)))))))
    (out.square().mean() * net.gain + net.embed.weight.sum() + net.norm(x).sum()).backward()
    opt.step()
    lrs = settings(net, groups)
    for name, p in net.named_parameters():
        step = (p.detach() - before[name]).abs().max().item()
        assert step == pytest.approx(lrs[name][0], rel=1e-3), name


def test_standard_parameterization_is_one_global_lr():
    net = Net()
    got = settings(net, mup.param_groups(net, 2e-3, weight_decay=0.05, parameterization="standard"))
    assert set(got.values()) == {(2e-3, 0.05)}


def test_tied_and_unknown_parameters_appear_once():
    model = nn.Sequential(nn.Embedding(10, 64), nn.Linear(64, 10, bias=False))
    model[1].weight = model[0].weight  # tied (10, 64): the linear's rule wins
    model.raw = nn.Parameter(torch.zeros(3, 4))
    with pytest.warns(UserWarning, match="raw"):
        got = settings(model, mup.param_groups(model, 1e-3, base_width=64, weight_decay=0.1))
    assert got["0.weight"] == (pytest.approx(1e-3), pytest.approx(0.1))  # fan_in 64 = base
    assert got["raw"] == (1e-3, 0.1)


@pytest.mark.parametrize("kwargs, match", [
    ({"optimizer": "lamb"}, "optimizer"), ({"parameterization": "ntk"}, "parameterization"),
    ({"lr": 0.0}, "lr"), ({"lr": -1.0}, "lr"), ({"lr": math.nan}, "lr"),
    ({"base_width": 0}, "base_width"), ({"weight_decay": -0.1}, "weight_decay"),
])
def test_param_groups_bad_arguments(kwargs, match):
    args = {"lr": 1e-3} | kwargs
    with pytest.raises(ValueError, match=match):
        mup.param_groups(sl.Dense(8, 8), **args)


def test_param_groups_bad_model():
    with pytest.raises(ValueError, match="no parameters"):
        mup.param_groups(nn.ReLU(), 1e-3)
    with pytest.raises(TypeError, match="nn.Module"):
        mup.param_groups([torch.zeros(3)], 1e-3)


# --- init_ and rms_cap_ ------------------------------------------------------------------------
@pytest.mark.parametrize("parameterization", ["mup", "standard"])
def test_init_std(parameterization):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2048, 256), nn.Linear(256, 2048),
                          sl.TT(2048, 512, cores=3, rank=4))
    for p in model.parameters():
        nn.init.constant_(p, 1.0)
    assert mup.init_(model, parameterization) is model
    i, o = model[2].in_factors, model[2].out_factors
    fans = {"0.weight": (2048, 256), "1.weight": (256, 2048), "2.G2": (4 * i[2], o[2])}
    for name, (fan_in, fan_out) in fans.items():
        std = dict(model.named_parameters())[name].std().item()
        want = math.sqrt(min(fan_in, fan_out)) / fan_in if parameterization == "mup" \
            else 1 / math.sqrt(fan_in)
        assert std == pytest.approx(want, rel=0.1), name
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            assert not p.any(), name
    with pytest.raises(ValueError, match="parameterization"):
        mup.init_(model, "xavier")


def test_rms_cap():
    torch.manual_seed(0)
    layer = sl.BTT(256, 256, rank=2)
    with torch.no_grad():
        layer.W0.mul_(10.0)
        layer.W1.mul_(0.01)
        layer.bias.fill_(5.0)
    w1 = layer.W1.detach().clone()
    mup.rms_cap_(layer, target=0.05)
    assert layer.W0.square().mean().sqrt().item() == pytest.approx(0.05, rel=1e-5)
    assert torch.equal(layer.W1, w1)  # below the cap: untouched
    assert (layer.bias == 5.0).all()
    layer.reset_parameters()
    with torch.no_grad():
        layer.W0.mul_(3.0)
    mup.rms_cap_(layer)  # "init": each core's muP init std, here sqrt(min(16, 32)) / 16
    assert layer.W0.square().mean().sqrt().item() == pytest.approx(0.25, rel=1e-5)
    with pytest.raises(ValueError, match="target"):
        mup.rms_cap_(layer, target=0.0)


# --- coordinate check --------------------------------------------------------------------------
WIDTHS = (128, 512, 2048)
HIDDEN = ("2", "4")  # the two structured w -> w layers of `mlp`


def mlp(spec: str, frozen_input: bool = False):
    """Linear(32 -> w), two structured (w -> w) layers, readout Linear(w -> 10); GELU between.
    "{r}" in spec is replaced by w // 16 (a rank that grows with width)."""
    def make(width):
        s = spec.format(r=width // 16)
        model = nn.Sequential(nn.Linear(32, width), nn.GELU(), sl.build(s, width, width),
                              nn.GELU(), sl.build(s, width, width), nn.GELU(),
                              nn.Linear(width, 10))
        model[0].requires_grad_(not frozen_input)  # no grad: Adam skips it
        return model
    return make


def batch(tokens: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(tokens, 32, generator=gen), torch.randint(0, 10, (tokens,), generator=gen)


STRUCTURES = ["dense", "lowrank:rank={r}", "kronecker", "monarch", "btt:rank=1", "btt:rank=2",
              "tt:cores=3,rank=4", "tucker:rank=0.25"]


@pytest.mark.parametrize("spec", STRUCTURES)
def test_coord_check_mup_is_flat(spec):
    """The acceptance test: with muP, output RMS at init and its change after a few Adam steps
    stay within 2x across widths 128..2048 for every structure."""
    check = mup.coord_check(mlp(spec), WIDTHS, batch(64), steps=3, lr=1e-3, n_seeds=3)
    for name in HIDDEN:
        assert check.spread(name, "init") <= 2.0, check.table()
    for name in ("0", *HIDDEN, "6"):
        assert check.spread(name, "delta") <= 2.0, check.table()
    # muP readout (init std ~ 1/width): logits at init shrink like 1/sqrt(width), 4x over 16x
    assert 2.5 < check.rms_init["6"][128] / check.rms_init["6"][2048] < 6.4, check.table()


@pytest.mark.parametrize("spec", ["dense", "lowrank:rank={r}", "tucker:rank=0.25"])
def test_coord_check_standard_blows_up(spec):
    """SP init with one global Adam lr: a core whose fan-in grows like the width (dense, low rank
    with rank ~ width, Tucker's core) changes its output ~ lr * fan_in, >> 2x over 16x width."""
    check = mup.coord_check(mlp(spec), WIDTHS, batch(64), steps=3, lr=1e-3,
                            parameterization="standard")
    for name in HIDDEN:
        assert check.spread(name, "delta") > 2.0, check.table()
        assert check.rms_delta[name][2048] > check.rms_delta[name][128], check.table()


SHARED_CORES = "its cores are shared across blocks, so their gradient rank grows with width and " \
               "Adam's 1/fan_in LR undershoots (update ~ width^-1/4 for Kronecker)"


@pytest.mark.parametrize("spec", [
    "dense", "lowrank:rank={r}", "monarch", "btt:rank=1", "btt:rank=2",
    pytest.param("kronecker", marks=pytest.mark.xfail(strict=True, reason=SHARED_CORES)),
    pytest.param("tt:cores=3,rank=4", marks=pytest.mark.xfail(strict=True, reason=SHARED_CORES)),
    pytest.param("tucker:rank=0.25", marks=pytest.mark.xfail(strict=True, reason=SHARED_CORES)),
])
def test_coord_check_own_update(spec):
    """Input layer frozen, so a hidden layer's change is its own cores' update; 8 tokens, one
    step, so Adam's update is aligned with the input. Then muP's change is flat while SP's grows
    like the core fan-in: width for dense/low rank, sqrt(width) for Monarch/BTT (4x here)."""
    data = batch(8)
    check = mup.coord_check(mlp(spec, frozen_input=True), WIDTHS, data, steps=1, lr=1e-3)
    standard = mup.coord_check(mlp(spec, frozen_input=True), WIDTHS, data, steps=1, lr=1e-3,
                               parameterization="standard")
    for name in HIDDEN:
        assert check.spread(name, "delta") <= 1.5, check.table()
        assert standard.spread(name, "delta") >= 2.5, standard.table()


def test_fixed_rank_is_a_bottleneck():
    """A fixed rank is a finite dim: U (width -> 16) is a readout-like core (init std ~ 1/width),
    so the layer's output at init shrinks like sqrt(16 / width) (4x over 16x width) while its
    change after training stays flat."""
    check = mup.coord_check(mlp("lowrank:rank=16"), WIDTHS, batch(64), steps=3, lr=1e-3)
    assert 3.0 < check.rms_init["2"][128] / check.rms_init["2"][2048] < 5.3, check.table()
    assert check.spread("2", "delta") <= 2.0, check.table()


def test_coord_check_result_and_determinism():
    data = batch(16)
    first = mup.coord_check(mlp("monarch"), (64, 256), data, steps=2)
    second = mup.coord_check(mlp("monarch"), (64, 256), data, steps=2)
    assert first.rms_init == second.rms_init and first.rms_delta == second.rms_delta
    assert set(first.rms_init) == {"0", "2", "4", "6"}
    values = first.rms_delta["2"]
    assert first.spread("2") == pytest.approx(max(values.values()) / min(values.values()))
    assert len(first.losses[64]) == 2 and first.losses[64][1] < first.losses[64][0]
    table = first.table()
    assert "spread" in table and "256" in table and len(table.splitlines()) == 1 + 4 * 2
    with pytest.raises(ValueError, match="kind"):
        first.spread("2", "grad")


@pytest.mark.parametrize("kwargs, match", [
    ({"widths": ()}, "widths"), ({"widths": (64, 0)}, "widths"), ({"steps": 0}, "steps"),
    ({"n_seeds": 0}, "n_seeds"), ({"optimizer": "rmsprop"}, "optimizer"),
    ({"parameterization": "ntk"}, "parameterization"), ({"data": torch.zeros(3)}, "data"),
])
def test_coord_check_bad_arguments(kwargs, match):
    args = {"make_model": mlp("dense"), "widths": (64,), "data": batch(4)} | kwargs
    with pytest.raises(ValueError, match=match):
        mup.coord_check(**args)


def _mlp_with_readout():
    return nn.Sequential(nn.Linear(8, 64), nn.GELU(), nn.Linear(64, 100))


def test_init_readout_shrinks_like_one_over_width_under_mup_only():
    """std sqrt(base) / fan_in: 1/sqrt(fan_in) at the base width, 1/width-like above it."""
    torch.manual_seed(0)
    for base_width, want in ((64, 1 / 8), (16, 4 / 64)):
        model = mup.init_(_mlp_with_readout(), "mup", readout="2", base_width=base_width)
        assert model[2].weight.std().item() == pytest.approx(want, rel=0.05)
    assert model[0].weight.std().item() == pytest.approx(math.sqrt(8) / 8, rel=0.1)  # the rest as usual
    standard = mup.init_(_mlp_with_readout(), "standard", readout="2")
    assert standard[2].weight.std().item() == pytest.approx(1 / 8, rel=0.05)


def test_init_readout_bad_input_changes_nothing():
    model = _mlp_with_readout()
    before = model[0].weight.detach().clone()
    with pytest.raises(ValueError, match="readout must name an nn.Linear"):
        mup.init_(model, readout="1", base_width=64)  # the GELU
    with pytest.raises(ValueError, match="needs base_width"):
        mup.init_(model, readout="2")
    assert torch.equal(model[0].weight, before)
    emb, head = nn.Embedding(100, 64), nn.Linear(64, 100, bias=False)
    head.weight = emb.weight
    tied = nn.ModuleDict({"emb": emb, "head": head})
    before = emb.weight.detach().clone()
    with pytest.raises(ValueError, match="shares its weight with"):
        mup.init_(tied, readout="head", base_width=64)
    assert torch.equal(emb.weight, before)
    mup.init_(tied, "standard", readout="head")  # the usual init: the tie is fine
    assert emb.weight.std().item() == pytest.approx(1 / 8, rel=0.1)
