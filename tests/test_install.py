"""`pip install .` without extras: the library core works without triton, matplotlib, mnist1d and
transformers (each blocked here as if not installed), and asking for what needs them says which
extra to install."""

import subprocess
import sys

SCRIPT = r'''
import sys
for name in ("triton", "matplotlib", "mnist1d", "transformers", "safetensors"):
    sys.modules[name] = None  # import of it raises ImportError, as if not installed
import torch
import numpy as np
import structlayers as sl
from structlayers.search import Structure, tnale

torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
x = torch.randn(8, 64)
report = sl.structurize(model, "btt:rank=2", include="0", project=True)
loss = model(x).square().mean()
loss.backward()
assert all(p.grad is not None for p in model.parameters())
dense = model[0].to_dense() @ x.T
torch.testing.assert_close(model[0](x) - model[0].bias, dense.T, rtol=1e-4, atol=1e-4)
sl.mup.param_groups(model, lr=1e-3)
sl.precision.apply(model, sl.precision.FP8())
assert torch.isfinite(model(x)).all()
truth = Structure.tensor_ring((3, 3, 3), (2, 2, 2))
result = tnale(truth.contract(truth.random_cores(np.random.default_rng(0))), max_evaluations=40)
for what, call in (("triton", lambda: sl.backend("triton").__enter__() or model[0](x)),
                   ("matplotlib", lambda: __import__("structlayers.efficiency_report",
                                                     fromlist=["pyplot"]).pyplot())):
    try:
        call()
    except (ImportError, RuntimeError) as error:
        assert "pip install 'structlayers[" in str(error), error
    else:
        raise AssertionError(what + " did not raise")
print("core ok")
'''


def test_the_core_runs_without_the_optional_dependencies():
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "core ok" in result.stdout
