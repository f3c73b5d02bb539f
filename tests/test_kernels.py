"""The fused Monarch/BTT Triton kernels against the torch path.

On CPU the kernels run under Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1);
with TRITON_INTERPRET=0 on a GPU machine the same tests run the compiled kernels on CUDA.
References are independent of the kernels: einsum formulas written out here, and the layers'
torch path (itself tested against the dense matrix in test_layers.py), in float64.
"""

import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import structlayers as sl
from structlayers import kernels
from structlayers.kernels import btt_dims, btt_matmul
from structlayers.kernels.block_grad import block_grad
from structlayers.kernels.two_core import CONFIGS, _prune, two_core

if not kernels.INTERPRET and not torch.cuda.is_available():
    pytest.skip("TRITON_INTERPRET=0 and no CUDA device: nothing can run the kernels",
                allow_module_level=True)
DEVICE = "cpu" if kernels.INTERPRET else "cuda"
F64 = torch.float64


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def random_layer(cls, i, o, seed=0, dtype=torch.float32, **kwargs):
    torch.manual_seed(seed)
    layer = cls(i, o, device=DEVICE, **kwargs)
    with torch.no_grad():  # unit-scale cores: every entry matters, sums do not cancel to zero
        for p in layer.parameters():
            p.normal_()
    return layer.to(dtype)


def run_with_grads(layer, x, grad_y, backend):
    """y, grad x and grad of every parameter, under `backend`."""
    x = x.detach().clone().requires_grad_(True)
    layer.zero_grad()
    with sl.backend(backend):
        y = layer(x)
        y.backward(grad_y)
    return [y.detach(), x.grad, *(p.grad.clone() for p in layer.parameters())]


def reference(layer, x, grad_y):
    """The torch path in float64 on the same (rounded) values."""
    return run_with_grads(_as_f64(layer), x.double(), grad_y.double(), "torch")


def _as_f64(layer):
    twin = type(layer)(layer.in_features, layer.out_features, device=DEVICE, dtype=F64,
                       bias=layer.bias is not None, **layer.structure_args())
    twin.load_state_dict({k: v.double() for k, v in layer.state_dict().items()})
    return twin


# --- the raw kernels vs einsum ---------------------------------------------------------------
def two_core_reference(u, c1, c2, dims, v_features):
    P, Q, S, R, N = dims
    u = torch.nn.functional.pad(u.double(), (0, P * Q - u.shape[1])).reshape(-1, P, Q)
    h = torch.einsum("tpq,pqsr->tspr", u, c1.double().reshape(P, Q, S, R))
    v = torch.einsum("tspr,sprn->tsn", h, c2.double().reshape(S, P, R, N))
    return v.reshape(-1, S * N)[:, :v_features], h.reshape(-1, S, P * R)


# (P, Q, S, R, N): remainders in every dim; Q > 32 and N > 64 take several chunks/tiles
TWO_CORE_DIMS = [(8, 8, 8, 1, 8), (5, 7, 3, 1, 9), (20, 37, 17, 2, 70), (3, 16, 19, 3, 5),
                 (33, 4, 6, 5, 16), (2, 3, 2, 8, 3)]


@pytest.mark.parametrize("dims", TWO_CORE_DIMS)
@pytest.mark.parametrize("tokens", [1, 19])
def test_two_core_matches_einsum(dims, tokens):
    P, Q, S, R, N = dims
    torch.manual_seed(0)
    u_features, v_features = P * Q - (P * Q) // 5, S * N - (S * N) // 7  # padded in, cropped out
    u = torch.randn(tokens, u_features, device=DEVICE)
    c1, c2 = torch.randn(P, Q, S * R, device=DEVICE), torch.randn(S, P * R, N, device=DEVICE)
    v, h = two_core(u, c1, c1.stride(), c2, c2.stride(), dims, v_features, store_h=True)
    v_ref, h_ref = two_core_reference(u, c1, c2, dims, v_features)
    assert v.shape == (tokens, v_features) and h.shape == (tokens, S, P * R)
    assert rel_err(v, v_ref) < 1e-5 and rel_err(h, h_ref) < 1e-5
    no_v, h_alone = two_core(u, c1, c1.stride(), c2, c2.stride(), dims, v_features, store_v=False,
                             store_h=True)  # the grad-input pass when x needs no grad
    assert no_v is None and torch.equal(h_alone, h)


def test_two_core_every_config_and_transposed_cores():
    """Every config the autotuner may pick gives the same answer (masks and tiling are right for
    each block size), and cores passed transposed through strides read correctly."""
    dims = P, Q, S, R, N = (19, 12, 21, 2, 70)
    torch.manual_seed(1)
    u = torch.randn(37, P * Q, device=DEVICE)
    c1 = torch.randn(P, S * R, Q, device=DEVICE).transpose(1, 2)  # a (P, Q, S*R) view
    c2 = torch.randn(S, N, P * R, device=DEVICE).transpose(1, 2)
    v_ref, _ = two_core_reference(u, c1, c2, dims, S * N)
    configs = [c for c in CONFIGS if c.kwargs["BLOCK_SR"] >= 2]  # all that can run rank 2
    assert len(configs) == len(CONFIGS) and _prune(CONFIGS, {"RP": 2, "S": S, "N": N})
    for config in configs:
        v, _ = two_core(u, c1, c1.stride(), c2, c2.stride(), dims, S * N, config=config)
        assert rel_err(v, v_ref) < 1e-5, config


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("dims", [(4, 8, 8), (3, 20, 70), (7, 1, 17)])
def test_block_grad_matches_einsum(dims, splits):
    blocks, K, N = dims
    torch.manual_seed(0)
    T = 600  # more than one split's token range (256) so splits really divide the work
    a = torch.randn(T, blocks * K - 1, device=DEVICE)  # the last feature is padding
    b = torch.randn(blocks * N + 3, T, device=DEVICE).T[:, : blocks * N - 2]  # strided, cropped
    g, column_sums = block_grad(a, b, dims, splits=splits, sum_b=True)
    a_full = torch.nn.functional.pad(a.double(), (0, 1)).reshape(T, blocks, K)
    b_full = torch.nn.functional.pad(b.double(), (0, 2)).reshape(T, blocks, N)
    assert g.shape == dims and g.dtype == a.dtype
    assert rel_err(g, torch.einsum("tbk,tbn->bkn", a_full, b_full)) < 1e-5
    assert column_sums.shape == (b.shape[1],) and rel_err(column_sums, b.double().sum(0)) < 1e-5
    assert torch.equal(block_grad(a, b, dims, splits=splits), g)


def test_block_grad_of_no_tokens_is_zero():
    g = block_grad(torch.empty(0, 12, device=DEVICE), torch.empty(0, 6, device=DEVICE), (3, 4, 2))
    assert g.shape == (3, 4, 2) and not g.any()


# --- the layers under backend("triton") vs the torch path ------------------------------------
LAYERS = [
    (sl.Monarch, 64, 64, {}),  # square, sqrt(n) blocks
    (sl.Monarch, 48, 80, {"blocks": 4}),
    (sl.Monarch, 37, 53, {}),  # padded in and out
    (sl.BTT, 64, 64, {"rank": 1}),
    (sl.BTT, 40, 96, {"rank": 2}),
    (sl.BTT, 40, 96, {"rank": 2, "bias": False}),
    (sl.BTT, 37, 53, {"rank": 3}),  # padded, odd rank
    (sl.BTT, 128, 72, {"rank": 4}),
    (sl.BTT, 96, 96, {"rank": 5}),  # rank rounded up to 8 inside the kernel
]


@pytest.mark.parametrize("cls,i,o,kwargs", LAYERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_layer_forward_and_all_grads_match_torch(cls, i, o, kwargs, dtype):
    layer = random_layer(cls, i, o, dtype=dtype, **kwargs)
    torch.manual_seed(1)
    x = torch.randn(23, i, device=DEVICE).to(dtype)
    grad_y = torch.randn(23, o, device=DEVICE).to(dtype)
    fused = run_with_grads(layer, x, grad_y, "triton")
    same_dtype_torch = run_with_grads(layer, x, grad_y, "torch")
    exact = reference(layer, x, grad_y)
    names = ["y", "x", *(name for name, _ in layer.named_parameters())]
    for name, got, torch_path, want in zip(names, fused, same_dtype_torch, exact, strict=True):
        assert got.dtype == dtype and got.shape == want.shape, name
        # as accurate as the torch path in the same dtype (it rounds h and y the same way)
        assert rel_err(got, want) <= 1.5 * rel_err(torch_path, want) + 1e-6, name


@settings(max_examples=12, deadline=None)
@given(i=st.integers(2, 90), o=st.integers(2, 90), rank=st.integers(1, 4), tokens=st.integers(0, 40),
       seed=st.integers(0, 2**16))
def test_random_btt_layers_match_torch(i, o, rank, tokens, seed):
    layer = random_layer(sl.BTT, i, o, seed=seed, rank=min(rank, *_max_rank(i, o)))
    x = torch.randn(tokens, i, device=DEVICE)
    grad_y = torch.randn(tokens, o, device=DEVICE)
    for got, want in zip(run_with_grads(layer, x, grad_y, "triton"), reference(layer, x, grad_y),
                         strict=True):
        assert got.shape == want.shape
        scale = 1 + want.abs().amax() if want.numel() else 1
        assert torch.allclose(got.double(), want, rtol=0, atol=1e-4 * scale)


def _max_rank(i, o):
    probe = sl.BTT(i, o, rank=1)
    return probe.in_factors[0], probe.out_factors[1]


@pytest.mark.parametrize("make_x", [
    lambda t: torch.randn(t.shape[1], t.shape[0]).T,  # transposed
    lambda t: torch.randn(t.shape[0], 2 * t.shape[1])[:, ::2],  # strided features
    lambda t: torch.randn(2 * t.shape[0], t.shape[1])[1::2],  # strided tokens
], ids=["transposed", "strided-features", "strided-tokens"])
def test_non_contiguous_inputs(make_x):
    layer = random_layer(sl.BTT, 40, 30, rank=2)
    x = make_x(torch.empty(13, 40)).to(DEVICE)
    assert not x.is_contiguous()
    grad_y = torch.randn(13, 30, device=DEVICE).T.contiguous().T  # and a non-contiguous grad
    for got, want in zip(run_with_grads(layer, x, grad_y, "triton"), reference(layer, x, grad_y),
                         strict=True):
        assert rel_err(got, want) < 1e-5


def test_leading_batch_dims_and_empty_batch():
    layer = random_layer(sl.Monarch, 36, 20)
    x = torch.randn(2, 3, 5, 36, device=DEVICE)
    with sl.backend("triton"):
        y = layer(x)
    with sl.backend("torch"):
        y_ref = layer(x)
    assert y.shape == (2, 3, 5, 20) and rel_err(y, y_ref) < 1e-5
    empty = torch.randn(0, 7, 36, device=DEVICE, requires_grad=True)
    with sl.backend("triton"):
        out = layer(empty)
        out.sum().backward()
    assert out.shape == (0, 7, 20) and empty.grad.shape == empty.shape
    assert not layer.W0.grad.any() and not layer.W1.grad.any()


def test_only_the_needed_grads():
    """Frozen cores or an input that needs no grad: the other grads are still right."""
    layer = random_layer(sl.BTT, 24, 24, rank=2)
    x = torch.randn(9, 24, device=DEVICE)
    grad_y = torch.randn(9, 24, device=DEVICE)
    want = reference(layer, x, grad_y)
    for frozen in ("W0", "W1"):
        getattr(layer, frozen).requires_grad_(False)
        layer.zero_grad()
        with sl.backend("triton"):
            layer(x).backward(grad_y)  # x needs no grad
        for name, p in layer.named_parameters():
            if name == frozen:
                assert p.grad is None
            else:
                assert rel_err(p.grad, want[2 + ["W0", "W1", "bias"].index(name)]) < 1e-5, name
        getattr(layer, frozen).requires_grad_(True)


def test_training_steps_match_torch():
    """The same Adam steps on a Monarch/BTT MLP give the same weights on either path."""

    def train(backend):
        torch.manual_seed(0)
        model = torch.nn.Sequential(sl.Monarch(32, 48, device=DEVICE), torch.nn.GELU(),
                                    sl.BTT(48, 32, rank=2, device=DEVICE))
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        gen = torch.Generator().manual_seed(1)
        for _ in range(5):
            x = torch.randn(16, 32, generator=gen).to(DEVICE)
            with sl.backend(backend):
                loss = (model(x) - x).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    assert rel_err(train("triton"), train("torch")) < 1e-5


def test_torch_compile_calls_the_kernel_as_an_opaque_op():
    layer = random_layer(sl.BTT, 48, 40, rank=2)
    x = torch.randn(12, 48, device=DEVICE)
    grad_y = torch.randn(12, 40, device=DEVICE)
    want = reference(layer, x, grad_y)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    got = run_with_grads(compiled, x, grad_y, "triton")
    for g, w in zip(got, want, strict=True):
        assert rel_err(g, w) < 1e-5
    assert _ran_kernel(compiled, x, "triton")


def test_autocast_runs_the_kernel_in_the_autocast_dtype():
    layer = random_layer(sl.BTT, 32, 32, rank=2)
    x = torch.randn(8, 32, device=DEVICE)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        with sl.backend("triton"):
            y = layer(x)
        with sl.backend("torch"):
            y_ref = layer(x)
    assert y.dtype == y_ref.dtype == torch.bfloat16
    assert rel_err(y, y_ref) < 2e-2


# --- which layers run the kernel --------------------------------------------------------------
def _ran_kernel(layer, x, backend):
    """Whether a forward under `backend` called the fused op (as the profiler records it)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        with sl.backend(backend):
            layer(x)
    return any(event.name == "structlayers::btt_forward" for event in prof.events())


def test_dispatch():
    x = torch.randn(4, 16, device=DEVICE)
    monarch, btt = sl.Monarch(16, 16, device=DEVICE), sl.BTT(16, 16, rank=2, device=DEVICE)
    assert _ran_kernel(monarch, x, "triton") and _ran_kernel(btt, x, "triton")
    assert not _ran_kernel(btt, x, "torch")
    assert _ran_kernel(btt, x, "auto") == (DEVICE == "cuda")  # auto: the kernels only on CUDA
    for other in (sl.BTT(16, 16, cores=3, device=DEVICE), sl.TT(16, 16, rank=2, device=DEVICE),
                  sl.Kronecker(16, 16, device=DEVICE), sl.Dense(16, 16, device=DEVICE)):
        assert btt_dims(other.program) is None
        with sl.backend("torch"):
            want = other(x)
        assert not _ran_kernel(other, x, "triton")  # no kernel: the torch path, same answer
        with sl.backend("triton"):
            assert torch.equal(other(x), want)
    btt.precision = _CountingPolicy()  # a precision policy hooks into the torch path: it wins
    assert not _ran_kernel(btt, x, "triton") and btt.precision.calls == 2


class _CountingPolicy:
    """A precision policy that changes nothing and counts the contractions it sees."""

    calls = 0

    def contract(self, x, core, step):
        self.calls += 1
        return torch.einsum(step.equation, x, core)


def test_btt_dims_reads_the_layer_shapes():
    layer = sl.BTT(40, 96, rank=3)
    (m0, m1), (n0, n1) = layer.in_factors, layer.out_factors
    assert btt_dims(layer.program) == (m1, m0, n0, 3, n1)
    monarch = sl.Monarch(48, 80, blocks=4)
    assert btt_dims(monarch.program) == (4, 12, 20, 1, 4)


# --- bad input --------------------------------------------------------------------------------
def test_unsupported_dtypes_raise_under_triton_and_fall_back_under_auto():
    layer = sl.BTT(16, 16, rank=2, device=DEVICE, dtype=F64)
    x = torch.randn(3, 16, device=DEVICE, dtype=F64)
    with sl.backend("triton"), pytest.raises(TypeError, match="float64"):
        layer(x)
    with sl.backend("auto"):
        assert layer(x).dtype == F64  # the torch path
    w0, w1 = torch.randn(4, 4, 8, device=DEVICE), torch.randn(4, 8, 4, device=DEVICE)
    with pytest.raises(TypeError, match="share a dtype"):
        btt_matmul(torch.randn(3, 16, device=DEVICE).half(), w0, w1, 2)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        btt_matmul([[1.0]], w0, w1, 2)
    with pytest.raises(TypeError, match="int64"):
        btt_matmul(torch.ones(3, 16, dtype=torch.int64, device=DEVICE), w0, w1, 2)


@pytest.mark.parametrize("x_shape,w0_shape,w1_shape,rank,word", [
    ((3, 16), (4, 4, 8), (4, 8, 4), 3, "do not chain"),
    ((3, 17), (4, 4, 8), (4, 8, 4), 2, "features"),
    ((3, 4, 4), (4, 4, 8), (4, 8, 4), 2, "expected x"),
    ((3, 16), (4, 4, 8), (4, 8, 4), 0, "rank"),
])
def test_bad_shapes(x_shape, w0_shape, w1_shape, rank, word):
    x, w0, w1 = (torch.randn(s, device=DEVICE) for s in (x_shape, w0_shape, w1_shape))
    with pytest.raises(ValueError, match=word):
        btt_matmul(x, w0, w1, rank)
    with pytest.raises(ValueError, match="out_features"):
        btt_matmul(torch.randn(3, 16, device=DEVICE), torch.randn(4, 4, 8, device=DEVICE),
                   torch.randn(4, 8, 4, device=DEVICE), 2, out_features=17)


def test_kernels_compile_for_h100_without_spilling():
    """The real compiler pipeline for sm_90 (no GPU needed): catches code that the interpreter
    runs but that does not lower for a GPU in any dtype, and tile configs that spill registers."""
    code = """
import torch
from structlayers.kernels import aot
for dtype in (torch.bfloat16, torch.float16, torch.float32):
    launches = aot.btt_launches((32, 32, 32, 2, 32), 4096, dtype)
    for role, (module, kernel, args) in launches.items():
        for config in module.CONFIGS[:: 4 if dtype == torch.bfloat16 else 99]:
            usage = aot.resources(aot.compile_for_gpu(kernel, args, config))
            print(dtype, role, usage["registers"], usage["spill_bytes"], usage["shared_bytes"])
"""
    env = dict(os.environ, TRITON_INTERPRET="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300)
    rows = [line.split() for line in out.stdout.splitlines()]
    assert len(rows) >= 16 and {row[0] for row in rows} == {"torch.bfloat16", "torch.float16",
                                                             "torch.float32"}, out.stdout + out.stderr
    for dtype, *role, _registers, spill, shared in rows:
        # 16-bit tiles are the ones the configs were sized for; fp32 tiles are twice as big and
        # may spill a little (the autotuner then picks another config): they only have to lower
        assert int(spill) == 0 or dtype == "torch.float32", (dtype, role)
        assert int(shared) <= 227 * 1024, role  # an H100 program's shared-memory limit


def test_bad_bias():
    x, w0, w1 = (torch.randn(s, device=DEVICE) for s in ((3, 16), (4, 4, 8), (4, 8, 4)))
    with pytest.raises(ValueError, match="bias must have shape"):
        btt_matmul(x, w0, w1, 2, bias=torch.zeros(15, device=DEVICE))
    with pytest.raises(TypeError, match="bias"):
        btt_matmul(x, w0, w1, 2, bias=torch.zeros(16, device=DEVICE, dtype=torch.float16))


def test_cpu_tensors_without_the_interpreter_get_a_clear_error():
    code = ("import torch, structlayers as sl\n"
            "layer = sl.Monarch(16, 16)\n"
            "with sl.backend('triton'):\n"
            "    try:\n"
            "        layer(torch.randn(2, 16))\n"
            "    except RuntimeError as e:\n"
            "        print('RuntimeError:', e)\n")
    env = dict(os.environ, TRITON_INTERPRET="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)
    assert "RuntimeError:" in out.stdout and "CUDA" in out.stdout and "TRITON_INTERPRET" in out.stdout, \
        out.stdout + out.stderr
