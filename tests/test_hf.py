"""Third-party models (transformers; timm where it imports): structurize with every structure,
train, generate, compile, save and reload with nothing lost. Models are built from tiny configs
with random weights; every reference is the original model or its own saved outputs."""

import json
import os
import warnings

import pytest
import torch
from torch import nn

import structlayers as sl

transformers = pytest.importorskip("transformers")

STRUCTURES = ["dense", "lowrank:rank=8", "kronecker", "monarch", "btt:rank=2",
              "btt:rank=1,cores=3", "tt:cores=2,rank=4", "tucker:rank=0.3"]
BLOCKS = r"(layers|layer|\.h)\.\d+\."  # the transformer blocks of Llama, BERT and GPT-2


def gpt2():
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=96, n_positions=32,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config)


def llama():
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=32,
                                      bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return transformers.LlamaForCausalLM(config)


def bert():
    config = transformers.BertConfig(vocab_size=96, hidden_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=128,
                                     max_position_embeddings=32)
    return transformers.BertForMaskedLM(config)


MODELS = {"gpt2": gpt2, "llama": llama, "bert": bert}


def build(name, seed=0):
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return MODELS[name]().eval()


def tokens(seed=1, batch=2, length=12):
    return torch.randint(1, 96, (batch, length), generator=torch.Generator().manual_seed(seed))


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def dense_weights(model) -> dict[str, torch.Tensor]:
    """(out, in) weight of every projection, read by hand: Conv1D stores W as (in, out)."""
    found = {}
    for name, module in model.named_modules():
        if type(module) is nn.Linear:
            found[name] = module.weight.detach().clone()
        elif type(module).__name__ == "Conv1D":
            found[name] = module.weight.detach().t().clone()
    return found


@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_every_linear_like_projection_is_found_including_gpt2_conv1d(model_name):
    model = build(model_name)
    before = dense_weights(model)
    reference = logits(model, tokens())
    report = sl.structurize(model, "dense", include=BLOCKS, project=True)
    expected = sorted(n for n in before if __import__("re").search(BLOCKS, n))
    assert sorted(report.plan) == expected and len(expected) >= 8
    # the dense structure is exact: the model computes what it did (Conv1D's transpose is right)
    torch.testing.assert_close(logits(model, tokens()), reference, rtol=1e-5, atol=1e-5)
    for row in report.rows:
        assert (row.out_features, row.in_features) == tuple(before[row.name].shape)


@pytest.mark.parametrize("model_name", sorted(MODELS))
@pytest.mark.parametrize("spec", STRUCTURES)
def test_structurized_model_trains_and_its_projection_errors_are_true(model_name, spec):
    model = build(model_name)
    before = dense_weights(model)
    report = sl.structurize(model, spec, include=BLOCKS, project=True)
    for row in report.rows:  # the reported error against the original weight, computed here
        layer = model.get_submodule(row.name)
        truth = before[row.name]
        error = (layer.to_dense().double() - truth.double()).norm() / truth.double().norm()
        assert abs(error.item() - row.projection_error) < 1e-4, row.name
    model.train()
    ids = tokens()
    labels = ids.clone()
    loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    structured = [p for m in model.modules() if isinstance(m, sl.StructuredLinear)
                  for p in m.parameters()]
    assert structured and all(p.grad is not None and torch.isfinite(p.grad).all() for p in structured)
    assert any(p.grad.abs().sum() > 0 for p in structured)


@pytest.mark.parametrize("model_name", ["gpt2", "llama"])
def test_structurized_language_models_generate(model_name):
    model = build(model_name)
    sl.structurize(model, "btt:rank=2", include=BLOCKS, project=True)
    prompt = tokens(length=4)
    out = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 10) and torch.equal(out[:, :4], prompt)
    # greedy decoding picks what the logits say at each step
    with torch.no_grad():
        step = model(input_ids=out[:, :4]).logits[:, -1].argmax(-1)
    assert torch.equal(out[:, 4], step)


@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_save_pretrained_then_from_pretrained_gives_identical_logits(model_name, tmp_path):
    model = build(model_name)
    sl.structurize(model, "monarch", include=r"mlp|intermediate|output\.dense", project=True)
    sl.structurize(model, "btt:rank=2", include=BLOCKS, project=True)  # the rest of the blocks
    ids = tokens()
    reference = logits(model, ids)
    plan = sl.save_pretrained(model, tmp_path)
    assert plan == sl.plan_of(model) and json.loads((tmp_path / sl.hf.PLAN_FILE).read_text())
    reloaded = sl.from_pretrained(type(model), tmp_path)
    assert not reloaded.training
    torch.testing.assert_close(logits(reloaded, ids), reference, rtol=0, atol=0)
    assert sl.plan_of(reloaded) == plan
    for name, spec in plan.items():
        assert reloaded.get_submodule(name).spec == spec


@pytest.mark.parametrize("model_name", ["gpt2", "llama"])
def test_plain_from_pretrained_refuses_a_structurized_directory(model_name, tmp_path):
    model = build(model_name)
    sl.structurize(model, "lowrank:rank=4", include=BLOCKS)
    sl.save_pretrained(model, tmp_path)
    with pytest.raises(Exception, match=r"structlayers\.from_pretrained"):
        type(model).from_pretrained(tmp_path)
    with pytest.raises(Exception, match=r"structlayers\.from_pretrained"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path)


def test_restructure_makes_a_fresh_model_load_the_state_dict_strictly():
    model = build("llama")
    report = sl.structurize(model, "tt:cores=2,rank=4", include=r"mlp\.", project=True)
    sl.structurize(model, "tucker:rank=0.3", include=r"self_attn\.", project=True)
    plan = json.loads(json.dumps(sl.plan_of(model)))  # JSON-serialisable
    assert set(report.plan) < set(plan)
    fresh = build("llama", seed=5)
    sl.restructure(fresh, plan)
    fresh.load_state_dict(model.state_dict(), strict=True)
    torch.testing.assert_close(logits(fresh, tokens()), logits(model, tokens()), rtol=0, atol=0)
    sl.restructure(fresh, plan)  # already structured by the same plan: nothing changes
    assert sl.plan_of(fresh) == plan


def test_save_and_load_any_module_with_its_plan(tmp_path):
    model = build("bert")
    sl.structurize(model, "kronecker", include=r"intermediate|output\.dense", project=True)
    reference = logits(model, tokens())
    sl.save(model, tmp_path / "bert.pt")
    loaded = sl.load(build("bert", seed=3), tmp_path / "bert.pt").eval()
    torch.testing.assert_close(logits(loaded, tokens()), reference, rtol=0, atol=0)


def test_structurized_model_compiles():
    model = build("gpt2")
    sl.structurize(model, "btt:rank=2", include=BLOCKS, project=True)
    ids = tokens()
    compiled = torch.compile(model)  # inductor: about 10 s here
    torch.testing.assert_close(logits(compiled, ids), logits(model, ids), rtol=1e-5, atol=1e-5)


# --- bad input --------------------------------------------------------------------------------

def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, sl.plan_of(model)


@pytest.mark.parametrize("plan, error, match", [
    ({"model.layers.0.mlp.nope": "lowrank:rank=2"}, ValueError, r"model\.layers\.0\.mlp\.nope"),
    ({"model.norm": "lowrank:rank=2"}, TypeError, r"model\.norm.*not linear-like"),
    ({"model.layers.0.mlp.up_proj": "lowrank:rank=1000"}, ValueError, r"up_proj \(64 -> 96\).*rank"),
    ({"model.layers.0.mlp.up_proj": "lowrank:rank=2,bias=False"}, ValueError, r"bias"),
    ({"model.layers.0.mlp.up_proj": "circulant"}, ValueError, r"unknown structure"),
    (["model.layers.0.mlp.up_proj"], TypeError, r"plan must be a dict"),
])
def test_bad_plans_raise_naming_the_module_and_change_nothing(plan, error, match):
    model = build("llama")
    sl.structurize(model, "lowrank:rank=2", include=r"self_attn\.q_proj")
    state, before = _state(model)
    with pytest.raises(error, match=match):
        sl.restructure(model, {"model.layers.1.mlp.down_proj": "monarch", **plan}
                       if isinstance(plan, dict) else plan)
    assert sl.plan_of(model) == before
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_a_plan_that_conflicts_with_a_structured_layer_is_refused():
    model = build("llama")
    sl.structurize(model, "lowrank:rank=2", include=r"layers\.0\.self_attn\.q_proj")
    with pytest.raises(ValueError, match=r"q_proj.*already a structured layer"):
        sl.restructure(model, {"model.layers.0.self_attn.q_proj": "monarch"})


def test_from_pretrained_needs_a_plan(tmp_path):
    model = build("gpt2")
    model.save_pretrained(tmp_path)  # a plain transformers directory
    with pytest.raises(ValueError, match=r"no structlayers_plan\.json.*GPT2LMHeadModel\.from_pretrained"):
        sl.from_pretrained(transformers.GPT2LMHeadModel, tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        sl.from_pretrained(transformers.GPT2LMHeadModel, tmp_path / "missing")
    with pytest.raises(ValueError, match="no structured layer"):
        sl.save_pretrained(model, tmp_path / "dense")


def test_weights_that_do_not_fit_the_plan_leave_the_model_unchanged(tmp_path):
    model = build("llama")
    sl.structurize(model, "btt:rank=2", include=r"mlp\.")
    sl.save(model, tmp_path / "m.pt")
    checkpoint = torch.load(tmp_path / "m.pt", weights_only=True)
    checkpoint["plan"]["model.layers.0.mlp.up_proj"] = "btt:rank=3"  # weights are rank 2
    torch.save(checkpoint, tmp_path / "bad.pt")
    fresh = build("llama", seed=2)
    state, plan = _state(fresh)
    with pytest.raises((ValueError, RuntimeError), match="up_proj"):
        sl.load(fresh, tmp_path / "bad.pt")
    assert sl.plan_of(fresh) == plan == {}
    assert all(torch.equal(v, state[k]) for k, v in fresh.state_dict().items())
    torch.save(model.state_dict(), tmp_path / "plain.pt")
    with pytest.raises(ValueError, match="not a structlayers checkpoint"):
        sl.load(fresh, tmp_path / "plain.pt")


# --- user-declared linear-like modules --------------------------------------------------------

class TransposedProjection(nn.Module):
    """y = x @ w + b, with a scale argument its parent passes: not an nn.Linear."""

    def __init__(self, n_in, n_out):
        super().__init__()
        self.w = nn.Parameter(torch.randn(n_in, n_out) / n_in**0.5)
        self.b = nn.Parameter(torch.randn(n_out))

    def forward(self, x, scale=1.0):
        return scale * (x @ self.w + self.b)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = TransposedProjection(32, 48)
        self.head = nn.Linear(48, 8)

    def forward(self, x):
        return self.head(self.proj(x, scale=0.5))


def _scaled_call(layer, x, scale=1.0):
    return scale * layer(x)


@pytest.fixture
def registered():
    sl.register_linear_like(TransposedProjection, weight=lambda m: m.w.t(), bias=lambda m: m.b,
                            call=_scaled_call)
    yield
    sl.unregister_linear_like(TransposedProjection)


def test_a_registered_module_is_structurized_saved_and_reloaded(registered, tmp_path):
    torch.manual_seed(0)
    model, x = Net(), torch.randn(5, 32)
    reference = model(x)
    report = sl.structurize(model, "dense", include="proj", project=True)
    assert report.plan == {"proj": "dense"}
    torch.testing.assert_close(model(x), reference)  # exact structure, the call passes scale
    sl.structurize(Net(), "btt:rank=2", include="proj", project=True)
    sl.save(model, tmp_path / "net.pt")
    loaded = sl.load(Net(), tmp_path / "net.pt")
    torch.testing.assert_close(loaded(x), reference)


def test_unregistered_modules_and_linear_subclasses_are_refused():
    class MyLinear(nn.Linear):
        pass

    model = nn.Sequential(MyLinear(8, 8), TransposedProjection(8, 8))
    with pytest.raises(ValueError, match=r"subclasses are not replaced unless registered.*'0'"):
        sl.structurize(model, "dense")
    with pytest.raises(TypeError, match=r"'1'.*not linear-like"):
        sl.restructure(model, {"1": "dense"})


def test_timm_vit_structurize_save_reload(tmp_path):
    timm = pytest.importorskip("timm", reason="timm needs a torchvision that imports beside CPU torch")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8,
                              num_classes=10).eval()
    images = torch.randn(2, 3, 32, 32)
    sl.structurize(model, "btt:rank=2", include=r"blocks\.", project=True)
    reference = model(images)
    sl.save(model, tmp_path / "vit.pt")
    torch.manual_seed(1)
    fresh = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8,
                              num_classes=10)
    torch.testing.assert_close(sl.load(fresh, tmp_path / "vit.pt").eval()(images), reference)
    assert os.path.getsize(tmp_path / "vit.pt") > 0


def test_the_hf_causal_lm_example_runs_end_to_end():
    import subprocess
    import sys
    from pathlib import Path

    example = Path(__file__).resolve().parents[1] / "examples" / "hf_causal_lm.py"
    result = subprocess.run([sys.executable, str(example), "--steps", "3", "--finetune", "2",
                             "--width", "32", "--layers", "1", "--batch-size", "2",
                             "--block-size", "16", "--kinds", "lowrank,btt"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "total (7 layers)" in result.stdout
    assert "identical logits: True" in result.stdout
