"""sl.structurize: which modules it swaps, what the new layers hold, what the report says, and
that a bad argument leaves the model untouched."""

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import structlayers as sl
from structlayers.gpt import GPT, GPTConfig

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

BLOCK_LINEARS = r"(mlp\.(fc|proj)|attn\.(q|k|v|proj))$"
VOCAB = 20


def small_gpt(dtype=torch.float32, n_embd=32) -> GPT:
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=VOCAB, block_size=16, n_layer=2, n_head=4, n_embd=n_embd)
    return GPT(config).to(dtype)


def block_linear_names(model) -> list[str]:
    return [f"blocks.{b}.{layer}" for b in range(len(model.blocks))
            for layer in ("attn.q", "attn.k", "attn.v", "attn.proj", "mlp.fc", "mlp.proj")]


def linear_snapshot(model) -> dict:
    """name -> (module, weight copy, bias copy) for every nn.Linear."""
    def copy(p):
        return None if p is None else p.detach().clone()

    return {name: (m, copy(m.weight), copy(m.bias))
            for name, m in model.named_modules() if type(m) is nn.Linear}


def tokens(batch=3, length=16, seed=1):
    return torch.randint(VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


# --- which modules are swapped ------------------------------------------------------------------
def test_swaps_exactly_the_matching_modules():
    model = small_gpt()
    wte, lm_head = model.wte, model.lm_head
    report = sl.structurize(model, "btt:rank=2", include=BLOCK_LINEARS)
    expected = block_linear_names(model)
    assert [row.name for row in report.rows] == expected
    for name, module in model.named_modules():
        if name in expected:
            assert type(module).__name__ == "BTT", name
        elif name:
            assert not isinstance(module, sl.StructuredLinear), name
    assert model.lm_head is lm_head and model.wte is wte and model.lm_head.weight is wte.weight


def test_exclude_and_callable_include():
    model = small_gpt()
    report = sl.structurize(model, "lowrank:rank=4", include=lambda name, m: ".mlp." in name,
                            exclude=r"^blocks\.1\.")
    assert [row.name for row in report.rows] == ["blocks.0.mlp.fc", "blocks.0.mlp.proj"]
    assert isinstance(model.blocks[0].mlp.fc, sl.LowRank)
    assert type(model.blocks[1].mlp.fc) is nn.Linear


def test_callable_spec_strings_instances_and_none():
    model = small_gpt()
    given = sl.Monarch(32, 32, blocks=4)

    def choose(name, linear):
        if name == "blocks.0.attn.proj":
            return given
        if name.endswith("mlp.fc"):
            return "tucker:rank=0.5"
        return None  # everything else stays dense

    report = sl.structurize(model, choose, include=BLOCK_LINEARS)
    assert model.blocks[0].attn.proj is given
    assert [type(m).__name__ for m in (model.blocks[0].mlp.fc, model.blocks[1].mlp.fc)] == [
        "Tucker", "Tucker"]
    assert type(model.blocks[1].attn.proj) is nn.Linear
    assert type(model.blocks[0].attn.q) is nn.Linear
    assert [r.name for r in report.rows] == ["blocks.0.attn.proj", "blocks.0.mlp.fc",
                                             "blocks.1.mlp.fc"]
    assert report.rows[0].structure == "monarch:blocks=4"


def test_sequential_modulelist_moduledict_children():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(),
                          nn.ModuleDict({"head": nn.Linear(16, 4)}),
                          nn.ModuleList([nn.Linear(16, 16)]))
    report = sl.structurize(model, "lowrank:rank=2")
    assert [r.name for r in report.rows] == ["0", "2.head", "3.0"]
    assert isinstance(model[0], sl.LowRank)
    assert isinstance(model[2]["head"], sl.LowRank) and isinstance(model[3][0], sl.LowRank)


def test_shared_linear_is_replaced_once_everywhere():
    shared = nn.Linear(16, 16)
    model = nn.Module()
    model.a, model.b, model.seq = shared, shared, nn.Sequential(shared)
    report = sl.structurize(model, "monarch:blocks=4")
    assert len(report) == 1 and report.rows[0].aliases == ("b", "seq.0")
    assert isinstance(model.a, sl.Monarch) and model.a is model.b is model.seq[0]
    assert "(= seq.0)" in str(report)
    assert report.model_params_after == model.a.num_params

    model.c, model.d = nn.Linear(4, 4), nn.Linear(4, 4)
    model.d = model.c
    with pytest.raises(ValueError, match="untie"):
        sl.structurize(model, "dense", include="^c$")
    assert type(model.c) is nn.Linear


def test_broken_parameter_tie_warns():
    model = small_gpt()  # lm_head.weight is wte.weight
    with pytest.warns(UserWarning, match="lm_head.weight .* wte.weight"):
        sl.structurize(model, "lowrank:rank=4")
    assert isinstance(model.lm_head, sl.LowRank)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sl.structurize(small_gpt(), "lowrank:rank=4", include=BLOCK_LINEARS)


def test_linear_subclasses_and_structured_layers_are_skipped():
    attention = nn.MultiheadAttention(16, 2)  # out_proj is a Linear subclass read by weight
    model = nn.Sequential(attention, sl.Dense(16, 16))
    with pytest.raises(ValueError, match="subclasses are not replaced unless registered.*out_proj.*already"):
        sl.structurize(model, "btt")


# --- what the new layers hold ------------------------------------------------------------------
def test_dense_projection_leaves_the_model_function_unchanged():
    model = small_gpt(torch.float64)
    idx = tokens()
    before = model(idx)[0]
    report = sl.structurize(model, "dense", include=BLOCK_LINEARS, project=True)
    torch.testing.assert_close(model(idx)[0], before, rtol=1e-12, atol=1e-12)
    assert all(row.projection_error < 1e-12 for row in report.rows)


@pytest.mark.parametrize("spec", ["btt:rank=2", "monarch", "lowrank:rank=5", "kronecker",
                                  "tt:cores=2,rank=3", "tt:cores=3,rank=2", "tucker:rank=0.3"])
def test_projection_equals_from_dense_and_error_is_reported(spec):
    torch.manual_seed(0)  # weights for which an early bug (cores != reported error) showed
    model = nn.Sequential(nn.Linear(24, 40), nn.GELU(), nn.Linear(40, 30, bias=False),
                          nn.Linear(30, 17)).double()  # 17, 30: sizes that pad
    old = linear_snapshot(model)
    report = sl.structurize(model, spec, project=True)
    cls, args = sl.parse_spec(spec)
    for row in report.rows:
        new = model.get_submodule(row.name)
        _, weight, bias = old[row.name]
        reference = cls.from_dense(weight, bias, **args)
        torch.testing.assert_close(new.to_dense(), reference.to_dense(), rtol=1e-9, atol=1e-12)
        error = (weight - new.to_dense()).norm() / weight.norm()
        assert row.projection_error == pytest.approx(error.item(), rel=1e-9, abs=1e-12)
        if bias is None:
            assert new.bias is None
        else:
            torch.testing.assert_close(new.bias, bias, rtol=0, atol=0)


def test_without_projection_fresh_init_but_original_bias():
    model = small_gpt()
    old = linear_snapshot(model)
    with torch.no_grad():
        model.blocks[0].mlp.fc.bias.uniform_()
    report = sl.structurize(model, "btt:rank=2", include=BLOCK_LINEARS)
    assert all(row.projection_error is None for row in report.rows)
    for name in block_linear_names(model):
        new = model.get_submodule(name)
        torch.testing.assert_close(new.bias, old[name][0].bias, rtol=0, atol=0)
        fresh = sl.BTT(new.in_features, new.out_features, rank=2)
        assert new.W0.std().item() == pytest.approx(fresh.W0.std().item(), rel=0.35)


def test_dtype_device_training_mode_and_frozen_weights_are_kept():
    model = small_gpt(torch.float64).eval()
    model.blocks[0].attn.q.weight.requires_grad_(False)
    model.blocks[0].attn.q.bias.requires_grad_(False)
    sl.structurize(model, "tt:cores=2,rank=4", include=BLOCK_LINEARS, project=True)
    for name in block_linear_names(model):
        new = model.get_submodule(name)
        assert all(p.dtype == torch.float64 and p.device == model.wte.weight.device
                   for p in new.parameters())
        assert not new.training
        frozen = name == "blocks.0.attn.q"
        assert all(p.requires_grad is not frozen for p in new.parameters()), name
    assert model(tokens())[0].dtype == torch.float64


# --- the report ----------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", ["btt:rank=2", "monarch", "tt:cores=3,rank=4", "tucker:rank=0.3"])
def test_report_numbers_match_a_recount(spec):
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 48, bias=False),
                          nn.Linear(48, 30))
    old = {name: module for name, module in model.named_children()}
    params_before = sum(p.numel() for p in model.parameters())
    report = sl.structurize(model, spec, project=True)

    def counted_flops(layer):  # the structure's own matmuls, not a materialised W
        with sl.backend("torch"), FlopCounterMode(display=False) as counter:
            layer(torch.randn(1, layer.in_features))
        return counter.get_total_flops()

    for row in report.rows:
        new, original = model.get_submodule(row.name), old[row.name]
        assert row.params_before == sum(p.numel() for p in original.parameters())
        assert row.params_after == sum(p.numel() for p in new.parameters())
        assert row.flops_before == counted_flops(original)
        assert row.flops_after == counted_flops(new)
        assert (row.in_features, row.out_features) == (original.in_features, original.out_features)
        assert row.structure == new.spec
    assert report.params_after == sum(r.params_after for r in report.rows)
    assert report.flops_before == sum(r.flops_before for r in report.rows)
    assert report.model_params_before == params_before
    assert report.model_params_after == sum(p.numel() for p in model.parameters())


def test_report_text_and_dicts():
    model = small_gpt()
    report = sl.structurize(model, "btt:rank=2", include=BLOCK_LINEARS, project=True)
    text = str(report)
    lines = text.splitlines()
    assert "blocks.1.mlp.proj" in text and "total (12 layers)" in text
    assert f"{report.params_after:,}" in lines[-2] and f"{report.flops_after:,}" in lines[-2]
    ratio = report.params_after / report.params_before
    assert f"params x{ratio:.3f}" in lines[-1]
    assert len({len(line) for line in lines[2:-3]}) == 1  # table rows are aligned
    rows = report.to_dicts()
    assert len(rows) == 12 and rows[0]["name"] == "blocks.0.attn.q"
    assert rows[0]["projection_error"] == report.rows[0].projection_error
    json.dumps(rows)


# --- bad input: clear errors, nothing half-applied ------------------------------------------------
def assert_untouched(model, snapshot):
    for name, (module, weight, bias) in snapshot.items():
        current = model.get_submodule(name)
        assert current is module and type(current) is nn.Linear, name
        assert torch.equal(current.weight, weight)
        assert bias is None or torch.equal(current.bias, bias)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"include": "mlp\\.(fc"}, ValueError, "include=.*regular expression"),
    ({"exclude": "["}, ValueError, "exclude=.*regular expression"),
    ({"include": 3}, TypeError, "include must be"),
    ({"include": lambda name, m: "yes"}, TypeError, "include function must return a bool"),
    ({"spec_or_fn": 3}, TypeError, "spec_or_fn must be"),
    ({"spec_or_fn": "sparse:rank=2"}, ValueError, "unknown structure"),
    ({"spec_or_fn": "btt:rank=2,bias=False"}, ValueError, "leave them out of the spec"),
    ({"spec_or_fn": lambda name, m: nn.Linear(32, 32)}, TypeError, "returned Linear"),
    ({"spec_or_fn": lambda name, m: sl.BTT(32, 33)}, ValueError, "blocks.0.attn.q .*given layer"),
    ({"project": "yes"}, TypeError, "project must be a bool"),
    ({"include": r"mpl\."}, ValueError, r"mpl\\\\\.'.*select no linear layer.*blocks.0.attn.q"),
])
def test_bad_arguments_raise_before_anything_changes(kwargs, error, match):
    model = small_gpt()
    snapshot = linear_snapshot(model)
    kwargs = {"spec_or_fn": "btt:rank=2", "include": BLOCK_LINEARS} | kwargs
    with pytest.raises(error, match=match):
        sl.structurize(model, **kwargs)
    assert_untouched(model, snapshot)


def test_spec_invalid_for_some_layers_names_them_and_changes_nothing():
    model = small_gpt()  # rank 8 fits the 32 -> 128 MLP layers but not the 32 x 32 attention
    snapshot = linear_snapshot(model)
    with pytest.raises(ValueError, match=r"8 layer\(s\)") as raised:
        sl.structurize(model, "tt:cores=3,rank=8", include=BLOCK_LINEARS, project=True)
    assert "blocks.1.attn.v (32 -> 32): rank[0]=8 is out of range" in str(raised.value)
    assert "mlp" not in str(raised.value)
    assert_untouched(model, snapshot)


def test_the_same_instance_for_two_layers_is_refused():
    model = small_gpt()
    snapshot = linear_snapshot(model)
    layer = sl.Dense(32, 32)
    with pytest.raises(ValueError, match="same layer"):
        sl.structurize(model, lambda name, m: layer, include=r"attn\.(q|k)$")
    assert_untouched(model, snapshot)


def test_a_model_that_is_a_linear_cannot_be_replaced_in_place():
    with pytest.raises(ValueError, match="itself a linear layer"):
        sl.structurize(nn.Linear(8, 8), "dense")


def test_structurizing_twice_says_nothing_is_left():
    model = small_gpt()
    sl.structurize(model, "btt:rank=2", include=BLOCK_LINEARS)
    with pytest.raises(ValueError, match="12 layer.*already StructuredLinear"):
        sl.structurize(model, "btt:rank=2", include=BLOCK_LINEARS)


# --- the structurized GPT trains ------------------------------------------------------------------
@pytest.mark.parametrize("project", [False, True])
def test_structurized_gpt_trains(project):
    model = small_gpt()
    sl.structurize(model, "btt:rank=2", include=BLOCK_LINEARS, project=project)
    data = tokens(batch=8, length=17, seed=2)
    x, y = data[:, :-1], data[:, 1:]
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        loss = model(x, y)[1]
        optimizer.zero_grad()
        loss.backward()
        losses.append(loss.item())
        optimizer.step()
    assert all(p.grad is not None for p in model.parameters())
    assert losses[-1] < 0.8 * losses[0]


def test_example_script_runs():
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "structurize_gpt.py"), "--steps", "3",
         "--finetune-steps", "2", "--n-embd", "32", "--block-size", "16", "--batch-size", "4"],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "total (12 layers)" in result.stdout and "fine-tuned" in result.stdout
