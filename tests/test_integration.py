"""The layers behave like nn.Linear in the places users rely on: state_dict, dtype/device,
torch.compile, DistributedDataParallel, and training."""

import io
import os
import socket
import tempfile
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import structlayers as sl

SPECS = ["dense", "lowrank:rank=4", "kronecker", "monarch", "btt:rank=2", "btt:rank=2,cores=3",
         "tt:cores=3,rank=3", "tucker:rank=0.5"]
SIZES = [(24, 30), (29, 23)]  # the second pads every structure that factors its sizes


def _randomize_bias_(layer):
    if layer.bias is not None:
        with torch.no_grad():
            layer.bias.normal_()
    return layer


# --- state_dict and parameter names --------------------------------------------------------------
@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("i,o", SIZES)
def test_state_dict_round_trip(spec, i, o):
    torch.manual_seed(0)
    layer = _randomize_bias_(sl.build(spec, i, o))
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)

    torch.manual_seed(1)
    fresh = sl.build(spec, i, o)
    x = torch.randn(5, i)
    assert not torch.equal(fresh(x), layer(x))  # a different seed gives a different layer
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    torch.testing.assert_close(fresh(x), layer(x), rtol=0, atol=0)
    assert list(fresh.state_dict()) == list(layer.state_dict())


@pytest.mark.parametrize("spec", SPECS)
def test_parameter_names_are_stable(spec):
    a, b = sl.build(spec, 24, 30), sl.build(spec, 24, 30)
    names = [n for n, _ in a.named_parameters()]
    assert names == [n for n, _ in b.named_parameters()]
    assert names[-1] == "bias" and len(names) == len(set(names))
    core_names = [name for name, _, _ in a.core_steps]
    assert names[:-1] == core_names
    no_bias = sl.build(spec, 24, 30, bias=False)
    assert [n for n, _ in no_bias.named_parameters()] == core_names


def test_expected_core_names():
    expected = {"dense": ["weight"], "lowrank:rank=4": ["U", "V"], "kronecker": ["G0", "G1"],
                "monarch": ["W0", "W1"], "btt:rank=2,cores=3": ["W0", "W1", "W2"],
                "tt:cores=3,rank=3": ["G0", "G1", "G2"],
                "tucker:rank=0.5": ["in_factor0", "in_factor1", "core", "out_factor0",
                                    "out_factor1"]}
    for spec, names in expected.items():
        assert [n for n, _ in sl.build(spec, 24, 30).named_parameters()] == [*names, "bias"]


def test_dense_loads_an_nn_linear_state_dict():
    linear = nn.Linear(24, 30)
    dense = sl.Dense(24, 30)
    dense.load_state_dict(linear.state_dict())
    x = torch.randn(4, 24)
    torch.testing.assert_close(dense(x), linear(x))


# --- dtype / device ----------------------------------------------------------------------------
@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_dtype_like_nn_linear(spec, dtype):
    layer = sl.build(spec, 29, 23, dtype=dtype, device="cpu")
    assert all(p.dtype == dtype and p.device.type == "cpu" for p in layer.parameters())
    y = layer(torch.randn(3, 29, dtype=dtype))
    assert y.dtype == dtype and y.shape == (3, 23)
    assert torch.isfinite(y).all()
    assert layer.to_dense().dtype == dtype


@pytest.mark.parametrize("spec", SPECS)
def test_to_dtype_and_no_bias(spec):
    torch.manual_seed(0)
    layer = _randomize_bias_(sl.build(spec, 29, 23))
    x = torch.randn(3, 29, dtype=torch.float64)
    expected = layer(x.float()).double()
    layer64 = layer.to(torch.float64)
    assert all(p.dtype == torch.float64 for p in layer64.parameters())
    torch.testing.assert_close(layer64(x), expected, rtol=1e-5, atol=1e-5)

    no_bias = sl.build(spec, 29, 23, bias=False)
    assert no_bias.bias is None
    assert "bias" not in dict(no_bias.named_parameters())
    assert "bias=False" in repr(no_bias)
    torch.testing.assert_close(no_bias(x.float()), x.float() @ no_bias.to_dense().T)


# --- torch.compile -----------------------------------------------------------------------------
@pytest.mark.parametrize("spec", SPECS)
def test_compile_fullgraph_matches_eager(spec):
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = _randomize_bias_(sl.build(spec, 29, 23))
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 3, 29)
    torch.testing.assert_close(compiled(x), layer(x), rtol=1e-6, atol=1e-6)
    x.requires_grad_(True)
    compiled(x).sum().backward()
    grads = [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()
    x_eager = x.detach().requires_grad_(True)
    layer(x_eager).sum().backward()
    for grad, p in zip(grads, layer.parameters(), strict=True):
        torch.testing.assert_close(grad, p.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, x_eager.grad, rtol=1e-5, atol=1e-5)


def test_inductor_compile_btt():
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = _randomize_bias_(sl.build("btt:rank=2", 29, 23))
    start = time.perf_counter()
    compiled = torch.compile(layer, fullgraph=True)
    x = torch.randn(4, 29)
    y = compiled(x)
    assert time.perf_counter() - start < 120
    torch.testing.assert_close(y, layer(x), rtol=1e-5, atol=1e-5)


# --- DistributedDataParallel -------------------------------------------------------------------
DDP_SPECS = ["btt:rank=2", "tt:cores=3,rank=3"]
DDP_BATCH = 8


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, folder):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        torch.set_num_threads(1)
        data = torch.load(os.path.join(folder, "data.pt"), weights_only=True)
        grads = {}
        for spec in DDP_SPECS:
            torch.manual_seed(100 + rank)  # ranks start different: DDP must broadcast rank 0's
            layer = sl.build(spec, 29, 23)
            if rank == 0:
                layer.load_state_dict(data[spec])
            model = nn.parallel.DistributedDataParallel(layer)
            half = DDP_BATCH // world
            x = data["x"][rank * half:(rank + 1) * half]
            target = data["target"][rank * half:(rank + 1) * half]
            loss = (model(x) - target).pow(2).mean()
            loss.backward()
            grads[spec] = {n: p.grad for n, p in model.module.named_parameters()}
            grads[spec]["state"] = model.module.state_dict()
        torch.save(grads, os.path.join(folder, f"rank{rank}.pt"))
        dist.barrier()  # neither rank tears gloo down while the other still talks to it
    finally:
        dist.destroy_process_group()


def test_ddp_gradients_equal_single_process():
    torch.manual_seed(0)
    data = {"x": torch.randn(DDP_BATCH, 29), "target": torch.randn(DDP_BATCH, 23)}
    single = {}
    for spec in DDP_SPECS:
        layer = _randomize_bias_(sl.build(spec, 29, 23))
        data[spec] = layer.state_dict()
        (layer(data["x"]) - data["target"]).pow(2).mean().backward()
        single[spec] = {n: p.grad for n, p in layer.named_parameters()}
    with tempfile.TemporaryDirectory() as folder:
        torch.save(data, os.path.join(folder, "data.pt"))
        mp.spawn(_ddp_worker, args=(2, _free_port(), folder), nprocs=2, join=True)
        results = [torch.load(os.path.join(folder, f"rank{r}.pt"), weights_only=True)
                   for r in range(2)]
    for spec in DDP_SPECS:
        for result in results:
            for name, value in data[spec].items():  # rank 0's parameters were broadcast
                torch.testing.assert_close(result[spec]["state"][name], value, rtol=0, atol=0)
            for name, grad in single[spec].items():
                torch.testing.assert_close(result[spec][name], grad, rtol=1e-5, atol=1e-6)


# --- training ----------------------------------------------------------------------------------
def test_training_a_stack_of_structured_layers_reduces_loss():
    torch.manual_seed(0)
    model = nn.Sequential(sl.BTT(32, 48, rank=2), nn.GELU(), sl.TT(48, 36, cores=3, rank=3),
                          nn.GELU(), sl.Monarch(36, 36), nn.GELU(), sl.Tucker(36, 24, rank=0.5),
                          nn.GELU(), sl.LowRank(24, 16, rank=4), sl.Kronecker(16, 8),
                          sl.Dense(8, 4))
    teacher = nn.Sequential(nn.Linear(32, 16), nn.Tanh(), nn.Linear(16, 4))
    x = torch.randn(256, 32)
    with torch.no_grad():
        y = teacher(x)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(150):
        optimizer.zero_grad()
        loss = (model(x) - y).pow(2).mean()
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all()
                   for p in model.parameters())
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
