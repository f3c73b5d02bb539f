"""Execution plans (structlayers/plan.py, execute.py) against the reference einsum program."""

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode

import structlayers as sl
from structlayers import buffers
from structlayers.plan import make_plan
from structlayers.precision.policy import Policy


def outputs_and_grads(layer, x, grad_y, backend):
    """y, grad x (None if x needs none) and the grad of every parameter that needs one."""
    x = x.detach().requires_grad_(x.requires_grad)
    layer.zero_grad(set_to_none=True)
    with sl.backend(backend):
        y = layer(x)
    y.backward(grad_y)
    grads = [None if p.grad is None else p.grad.clone() for p in layer.parameters()]
    return y.detach(), x.grad, grads


def assert_plan_matches_einsum(layer, x, atol=1e-10):
    torch.manual_seed(1)
    grad_y = torch.randn(*x.shape[:-1], layer.out_features, dtype=x.dtype)
    y_ref, gx_ref, g_ref = outputs_and_grads(layer, x, grad_y, "einsum")
    y, gx, g = outputs_and_grads(layer, x, grad_y, "torch")
    torch.testing.assert_close(y, y_ref, atol=atol, rtol=0)
    if gx_ref is None:
        assert gx is None
    else:
        torch.testing.assert_close(gx, gx_ref, atol=atol, rtol=0)
    for a, b in zip(g, g_ref, strict=True):
        if b is None:
            assert a is None
        else:
            torch.testing.assert_close(a, b, atol=atol, rtol=0)


STRUCTURE = st.one_of(
    st.builds(lambda r, d: f"btt:rank={r},cores={d}", st.integers(1, 3), st.integers(2, 4)),
    st.builds(lambda r, d: f"tt:cores={d},rank={r}", st.integers(1, 4), st.integers(2, 4)),
    st.builds(lambda f, d: f"tucker:rank={f},modes={d}", st.sampled_from([0.1, 0.3, 0.6]),
              st.integers(2, 3)),
    st.builds(lambda r: f"lowrank:rank={r}", st.integers(1, 6)),
    st.sampled_from(["dense", "monarch", "kronecker"]),
)


@settings(max_examples=60, deadline=None)
@given(spec=STRUCTURE, i=st.integers(6, 130), o=st.integers(6, 130),
       lead=st.sampled_from([(0,), (1,), (7,), (3, 5), (2, 0, 3)]), bias=st.booleans(),
       transposed=st.booleans(), seed=st.integers(0, 3))
def test_plans_match_the_einsum_program(spec, i, o, lead, bias, transposed, seed):
    """Forward and every gradient, float64, any sizes (padding included), ranks, core counts,
    batch dims, empty batches, and non-contiguous inputs."""
    torch.manual_seed(seed)
    try:
        layer = sl.build(spec, i, o, bias=bias, dtype=torch.float64)
    except ValueError as error:  # a rank above what these sizes allow: not a plan question
        assume("out of range" not in str(error))
        raise
    x = torch.randn(*lead, i, dtype=torch.float64)
    if transposed and len(lead) == 2:
        x = torch.randn(i, *lead, dtype=torch.float64).movedim(0, -1)  # strides are not contiguous
        assert not x.is_contiguous()
    x.requires_grad_(True)
    assert_plan_matches_einsum(layer, x)


@pytest.mark.parametrize("spec,i,o", [("monarch", 1024, 4096), ("btt:rank=2", 4096, 1024),
                                      ("btt:rank=2,cores=3", 1024, 4096),
                                      ("tt:cores=3,rank=8", 1024, 4096),
                                      ("tucker:rank=0.05", 4096, 1024)])
def test_plans_match_at_the_benchmark_sizes(spec, i, o):
    """The layouts chosen for big token counts (the ones the benchmark times) are exact too."""
    layer = sl.build(spec, i, o, dtype=torch.float64)
    assert_plan_matches_einsum(layer, torch.randn(1024, i, dtype=torch.float64, requires_grad=True),
                               atol=1e-9)


@pytest.mark.parametrize("spec", ["monarch", "btt:rank=2,cores=3", "tt:cores=3,rank=2",
                                  "tucker:rank=0.3", "lowrank:rank=3"])
def test_plan_gradcheck(spec):
    layer = sl.build(spec, 12, 18, dtype=torch.float64)
    x = torch.randn(5, 12, dtype=torch.float64, requires_grad=True)
    params = tuple(layer.parameters())

    def f(x, *cores):
        for p, c in zip(params, cores, strict=True):
            p.data = c.detach()
        with sl.backend("torch"):
            return torch.func.functional_call(layer, dict(zip(
                [n for n, _ in layer.named_parameters()], cores, strict=True)), (x,))

    assert torch.autograd.gradcheck(f, (x, *(p.detach().clone().requires_grad_(True) for p in params)))


@pytest.mark.parametrize("spec", ["btt:rank=2,cores=3", "tt:cores=3,rank=3", "tucker:rank=0.3"])
def test_frozen_cores_and_inputs_without_grad(spec):
    """Frozen cores get no gradient (their matmuls are skipped), the others the reference's."""
    layer = sl.build(spec, 40, 60, dtype=torch.float64)
    names = [n for n, _ in layer.named_parameters() if n != "bias"]
    getattr(layer, names[0]).requires_grad_(False)
    getattr(layer, names[-1]).requires_grad_(False)
    assert_plan_matches_einsum(layer, torch.randn(9, 40, dtype=torch.float64))  # x: no grad
    assert getattr(layer, names[0]).grad is None


@pytest.mark.parametrize("spec", ["dense", "monarch", "tt:cores=3,rank=3"])
def test_only_the_bias_trains(spec):
    """Frozen cores, an input without grad, a trainable bias: the plan adds the bias into its own
    output buffer and still gives the bias its gradient (the sum of grad_y over tokens)."""
    layer = sl.build(spec, 24, 40, dtype=torch.float64)
    for name, p in layer.named_parameters():
        p.requires_grad_(name == "bias")
    x, grad_y = torch.randn(2, 7, 24, dtype=torch.float64), torch.randn(2, 7, 40, dtype=torch.float64)
    with sl.backend("torch"):
        y = layer(x)
    y.backward(grad_y)
    torch.testing.assert_close(y, x @ layer.to_dense().T + layer.bias, atol=1e-10, rtol=0)
    torch.testing.assert_close(layer.bias.grad, grad_y.sum((0, 1)), atol=1e-12, rtol=0)


def test_bias_goes_into_the_plan_output_without_a_new_tensor():
    """The forward's output is the plan's own (pooled) buffer with the bias added in place, not
    a fresh (T, out) sum (whose page faults cost more than the matmuls on CPU)."""
    layer = sl.Monarch(64, 64)
    with sl.backend("torch"), torch.no_grad():
        y = layer(torch.randn(32, 64))
        ptr = y.untyped_storage().data_ptr()
        del y
        y = layer(torch.randn(32, 64))
    assert y.untyped_storage().data_ptr() == ptr  # the same pooled buffer, reused
    assert y.untyped_storage().data_ptr() in {b.untyped_storage().data_ptr()
                                             for bs in buffers._pool.values() for b in bs}


def test_frozen_cores_skip_their_matmuls():
    """A frozen layer fed data that needs no gradient runs no backward matmul at all, and one whose
    only trainable core is the last skips every input-gradient matmul."""
    layer = sl.BTT(512, 512, rank=2, cores=3)  # large enough that no plan materialises W
    x = torch.randn(64, 512)

    def counted(train):
        for name, p in layer.named_parameters():
            p.requires_grad_(name in train)
        with FlopCounterMode(display=False) as counter:
            y = layer(x)
            if y.requires_grad:
                y.sum().backward()
        return counter.get_total_flops()

    forward = layer.flops(64)
    assert counted(set()) == forward
    assert counted({"W2"}) == forward + make_plan(layer.program, 64).matmuls[-1].step.flops(64)


@pytest.mark.parametrize("spec", ["monarch", "btt:rank=2,cores=3", "tt:cores=3,rank=8",
                                  "tucker:rank=0.1", "lowrank:rank=16"])
def test_inference_path_equals_training_path(spec):
    layer = sl.build(spec, 256, 512)
    x = torch.randn(33, 256)
    training = layer(x)
    with torch.no_grad():
        no_grad = layer(x)
    with torch.inference_mode():
        inference = layer(x)
    assert training.grad_fn is not None and no_grad.grad_fn is None
    # the same matmuls give the same bits; where one of the two plans materialises W, rounding only
    same_path = not any(make_plan(layer.program, 33, t).materialise for t in (True, False))
    exact = {"atol": 0, "rtol": 0} if same_path else {}
    torch.testing.assert_close(no_grad, training.detach(), **exact)
    torch.testing.assert_close(inference, training.detach(), **exact)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("spec", ["monarch", "btt:rank=2,cores=3", "tt:cores=3,rank=4",
                                  "tucker:rank=0.2"])
def test_half_precision_within_the_einsum_paths_error(spec, dtype):
    """bf16/fp16 plans are at least as accurate (vs float64) as the einsum path in the same dtype."""
    torch.manual_seed(0)
    exact = sl.build(spec, 128, 192, dtype=torch.float64)
    half = sl.build(spec, 128, 192, dtype=dtype)
    half.load_state_dict(exact.state_dict())
    exact.load_state_dict(half.state_dict())  # both hold the same half-representable values
    x = torch.randn(50, 128, dtype=dtype)
    reference = exact(x.double())
    scale = reference.abs().max()
    errors = {}
    for backend in ("einsum", "torch"):
        with sl.backend(backend):
            y = half(x)
        assert y.dtype == dtype
        errors[backend] = ((y.double() - reference).abs().max() / scale).item()
    assert errors["torch"] <= 1.5 * errors["einsum"] + 1e-3


def test_the_policy_path_sees_every_contraction():
    """A layer with a precision policy runs `program.contract` for every core, as before."""

    class Counting(Policy):
        def __init__(self):
            self.cores = []

        def contract(self, x, core, step):
            self.cores.append(step.core)
            return torch.einsum(step.equation, x, core)

    layer = sl.TT(64, 64, cores=3, rank=4)
    layer.precision = Counting()
    with sl.backend("torch"):
        layer(torch.randn(8, 64))
    assert layer.precision.cores == ["G0", "G1", "G2"]


def test_compile_fullgraph_with_plans():
    layer = sl.BTT(64, 96, rank=2, cores=3)
    x = torch.randn(16, 64, requires_grad=True)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    y = compiled(x)
    y.square().sum().backward()
    torch.testing.assert_close(y, layer(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.complex64])
def test_unsupported_dtypes_raise(dtype):
    layer = sl.Monarch(16, 16)
    with pytest.raises(TypeError, match=str(dtype).removeprefix("torch.")):
        layer(torch.ones(2, 16, dtype=dtype))


def test_mismatched_dtype_raises():
    layer = sl.BTT(16, 16)
    with pytest.raises(TypeError, match="float64"):
        layer(torch.ones(2, 16, dtype=torch.float64))


def test_tt_plan_is_cheaper_than_the_step_order_and_counts_what_runs():
    """The searched order needs fewer FLOPs than the fixed step order for TT 1024 -> 4096
    (hand count below), and `flops` reports what FlopCounterMode sees the forward do."""
    layer = sl.TT(1024, 4096, cores=3, rank=8)
    (i0, i1, i2), (o0, o1, o2), r = layer.in_factors, layer.out_factors, 8
    step_order = 2 * (i0 * o0 * r * i1 * i2 + o0 * r * i1 * o1 * r * i2 + o0 * o1 * r * i2 * o2)
    assert layer.program.flops(1) == step_order
    assert layer.flops(256) < 0.6 * layer.program.flops(256)
    with FlopCounterMode(display=False) as counter:
        layer(torch.randn(256, 1024))
    assert counter.get_total_flops() == layer.flops(256)


def test_tucker_plan_reads_the_input_in_place():
    """Both Tucker input factors cost the same FLOPs first; the plan must pick the one over the
    innermost input mode, which reads x (T, i0, i1) as (T*i0, i1) rows without a copy."""
    for i, o in ((1024, 4096), (4096, 1024)):
        layer = sl.build("tucker:rank=0.05", i, o)
        plan = make_plan(layer.program, 2048, training=False)
        first = plan.matmuls[0]
        assert first.step.core == "in_factor1" and not first.copies_input
        x = torch.randn(64, i, dtype=torch.float64)
        assert torch.allclose(layer.double()(x), x @ layer.to_dense().T + layer.bias)


def test_tiny_layers_materialise_the_dense_map_and_stay_exact():
    """A 64 x 64 TT costs more FLOPs than its dense map: the plan builds W = to_dense() and runs
    one F.linear (forward and gradients still equal the einsum program's); at 1024 -> 4096 it
    does not. `show` says which, and `flops` counts what runs."""
    layer = sl.TT(64, 64, cores=3, rank=8, dtype=torch.float64)
    assert make_plan(layer.program, 512).materialise and make_plan(layer.program, 512, False).materialise
    assert not make_plan(sl.TT(1024, 4096, cores=3, rank=8).program, 2048).materialise
    x = torch.randn(512, 64, dtype=torch.float64, requires_grad=True)
    with sl.backend("einsum"):
        reference = layer(x)
        ref_grads = torch.autograd.grad(reference.square().sum(), [x, *layer.parameters()])
    y = layer(x)
    grads = torch.autograd.grad(y.square().sum(), [x, *layer.parameters()])
    torch.testing.assert_close(y, reference)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r)
    with FlopCounterMode(display=False) as counter:
        layer(x)
    plan = make_plan(layer.program, 512)
    assert counter.get_total_flops() == plan.flops(512) < plan.contraction_flops(512) == layer.flops(512)
    with sl.backend("torch"), FlopCounterMode(display=False) as counter:  # the structure's matmuls
        torch.testing.assert_close(layer(x), reference)
    assert counter.get_total_flops() == layer.flops(512)
    assert "materialise" in make_plan(layer.program, 512).describe()
    assert make_plan(layer.program, 4).materialise
    assert torch.autograd.gradcheck(layer, (x[:4].detach().requires_grad_(),))


def test_pooled_buffers_are_never_shared_while_held():
    first = buffers.empty((1000,), torch.float32, torch.device("cpu"))
    second = buffers.empty((1000,), torch.float32, torch.device("cpu"))
    assert first.data_ptr() != second.data_ptr()  # first is still held
    pointer = first.data_ptr()
    view = first[10:]
    del first
    third = buffers.empty((1000,), torch.float32, torch.device("cpu"))
    assert third.data_ptr() != pointer  # a view still holds the storage
    del view, third
    assert buffers.empty((1000,), torch.float32, torch.device("cpu")).data_ptr() in (
        pointer, second.data_ptr())


def test_saved_activations_survive_a_second_forward():
    """Buffers saved for one backward are not reused by another forward before it runs."""
    layer = sl.BTT(256, 256, rank=2, cores=3, dtype=torch.float64)
    x1, x2 = (torch.randn(40, 256, dtype=torch.float64, requires_grad=True) for _ in range(2))
    y1 = layer(x1)
    y2 = layer(x2)
    (g1,) = torch.autograd.grad(y1.sum(), x1)
    (g2,) = torch.autograd.grad(y2.sum(), x2)
    with sl.backend("einsum"):
        (r1,) = torch.autograd.grad(layer(x1).sum(), x1)
        (r2,) = torch.autograd.grad(layer(x2).sum(), x2)
    torch.testing.assert_close(g1, r1)
    torch.testing.assert_close(g2, r2)


def test_show_prints_the_plan(capsys):
    from structlayers.cli import main

    assert main(["show", "tt:cores=3,rank=8", "1024", "4096"]) == 0
    out = capsys.readouterr().out
    assert "plan for 2048 tokens" in out and "bmm" in out


HALF_CASES = [("monarch", 1024, 4096), ("btt:rank=2,cores=3", 1024, 4096), ("tt:cores=3,rank=8", 4096, 1024),
              ("tucker:rank=0.05", 1024, 4096), ("btt:rank=1", 4096, 1024)]


@pytest.mark.parametrize("spec,i,o", HALF_CASES)
def test_half_plans_never_write_column_major(spec, i, o):
    """bf16 batched matmuls on CPU (oneDNN) run at 0.2-0.4 GFLOP/s into a column-major output, 1000x
    slower than row-major: half plans never write one, forward or (training) the input's gradient,
    which is written in the order the forward read the input."""
    from structlayers.plan import _layout

    program = sl.build(spec, i, o).program
    for training in (True, False):
        plan = make_plan(program, 2048, training, "half")
        assert plan.precision == "half"
        for mm in plan.matmuls:
            assert _layout(mm.out_order, mm.blocks, mm.rows, mm.made).endswith("R"), plan.describe()
            if training:
                assert _layout(mm.x_order, mm.blocks, mm.rows, mm.sums).endswith("R"), plan.describe()
    with pytest.raises(ValueError, match="precision"):
        make_plan(program, 2048, True, "bfloat16")


@pytest.mark.parametrize("spec", ["monarch", "btt:rank=2,cores=3", "tt:cores=3,rank=4", "tucker:rank=0.2"])
def test_half_plans_match_the_einsum_program(spec):
    """The half-precision layouts (and the bias added inside the last matmul) compute the same
    map: forward and every gradient in bf16 within bf16 rounding of the float64 einsum program
    (run directly, whichever dtype this CPU's plans would pick for bf16)."""
    from structlayers.execute import _planned

    torch.manual_seed(0)
    exact = sl.build(spec, 128, 192, dtype=torch.float64)
    with torch.no_grad():
        exact.bias.normal_()  # zero at init: a bias added in the wrong place would pass
    half = sl.build(spec, 128, 192, dtype=torch.bfloat16)
    half.load_state_dict(exact.state_dict())
    exact.load_state_dict(half.state_dict())
    x = torch.randn(64, 128, dtype=torch.bfloat16)
    grad_y = torch.randn(64, 192, dtype=torch.float64)
    xe = x.double().requires_grad_()
    with sl.backend("einsum"):
        ye = exact(xe)
    ref = torch.autograd.grad(ye, [xe, *exact._cores().values(), exact.bias], grad_y)
    plan = make_plan(half.program, 64, True, "half")
    cores = half._cores()
    xh = x.clone().requires_grad_()
    yh = _planned(plan, xh, [cores[mm.step.core] for mm in plan.matmuls], half.bias)  # bias fused
    got = torch.autograd.grad(yh, [xh, *cores.values(), half.bias], grad_y.bfloat16())
    for a, b in zip((yh, *got), (ye, *ref), strict=True):
        assert a.dtype == torch.bfloat16
        assert ((a.double() - b).abs().max() / b.abs().max()).item() < 0.03


def test_half_dense_or_not_is_measured_once_per_plan():
    """Where this CPU runs bf16 matmuls natively, the choice between the plan and to_dense() +
    F.linear is one measurement per plan, cached, and either way the output is the layer's."""
    from structlayers.execute import _half_is_slow
    from structlayers.tune import measured as measured_choices

    if _half_is_slow(torch.bfloat16):
        pytest.skip("bf16 runs in float32 on this CPU: the fp32 cost model decides")
    torch.manual_seed(0)
    layer = sl.build("btt:rank=2", 256, 512, dtype=torch.bfloat16)
    x = torch.randn(300, 256, dtype=torch.bfloat16)
    with torch.no_grad():
        y = layer(x)
        plan = make_plan(layer.program, 300, False, "half")
        assert plan in measured_choices()
        choices = measured_choices()
        torch.testing.assert_close(layer(x), y)
        assert measured_choices() == choices
        with sl.backend("einsum"):
            reference = layer.double()(x.double())
    assert ((y.double() - reference).abs().max() / reference.abs().max()).item() < 0.03
