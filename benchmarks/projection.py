"""Projection speed: structurize(project=True) of tiny transformers models, and one 4096x1024 layer,
for every structure; Tucker against the previous projection (tensorly's HOOI) at the same sizes.

    python benchmarks/projection.py            # about 2 minutes on 2 CPU cores

Models are built from configs with random weights (GPT-2 with its Conv1D projections, Llama with
intermediate size 344, which pads, BERT, and a ViT: timm's where timm imports, else transformers'
ViT). Writes benchmarks/results/projection.{csv,md}.
"""

import argparse
import csv
import os
import re
import sys
import time
import warnings
from datetime import date
from pathlib import Path

# this folder's kernels.py would shadow Hugging Face's `kernels`, which transformers imports
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).parent.resolve()]

import torch  # noqa: E402

import structlayers as sl  # noqa: E402
from structlayers.bench import machine, write_markdown  # noqa: E402

RESULTS = Path(__file__).parent / "results"
SPECS = ("dense", "lowrank:rank=16", "kronecker", "monarch", "btt:rank=1", "btt:rank=2",
         "btt:rank=2,cores=3", "tt:cores=3,rank=8", "tucker:rank=0.25")
BIG_SPECS = SPECS[:1] + ("lowrank:rank=128",) + SPECS[2:] + ("tucker:rank=0.05",)
TARGET_SECONDS = 5.0
HEADS = r"lm_head|decoder|head$|classifier"  # readouts (often tied to the embedding) stay dense


def tiny_models():
    import transformers as tf

    models = {
        "gpt2": lambda: tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=2, n_embd=128, n_head=4,
                                                         vocab_size=512, n_positions=64)),
        "llama": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(
            vocab_size=512, hidden_size=128, intermediate_size=344, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)),
        "bert": lambda: tf.BertForMaskedLM(tf.BertConfig(
            vocab_size=512, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=512, max_position_embeddings=64)),
    }
    try:
        import timm

        models["vit (timm)"] = lambda: timm.create_model(
            "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, num_classes=10)
    except ImportError:
        models["vit (transformers)"] = lambda: tf.ViTForImageClassification(tf.ViTConfig(
            hidden_size=192, num_hidden_layers=2, num_attention_heads=3, intermediate_size=768,
            image_size=32, patch_size=8, num_labels=10))
    return models


class TensorlyTucker(sl.Tucker):
    """The previous Tucker projection: tensorly's HOOI, SVD start (+2 random starts when small),
    100 sweeps, and a fresh HOOI at every padding-imputation step."""

    def _project(self, weight):
        import numpy as np
        import tensorly
        from tensorly.decomposition import tucker

        tensor = weight.reshape(*self.out_factors, *self.in_factors).cpu().numpy()
        small = tensor.size <= 2**16
        starts = (("svd", None), ("random", 0), ("random", 1)) if small else (("svd", None),)
        best, best_error = None, float("inf")
        with tensorly.backend_context("numpy", local_threadsafe=True):
            for init, seed in starts:
                core, factors = tucker(tensor, rank=list(self.ranks), init=init, random_state=seed,
                                       n_iter_max=100, tol=1e-10 if small else 1e-5)
                error = np.linalg.norm(tensorly.tucker_to_tensor((core, factors)) - tensor)
                if error < best_error:
                    best, best_error = (core, factors), error
        core, factors = best
        return self._named(torch.from_numpy(np.asarray(core)).to(weight),
                           [torch.from_numpy(np.asarray(f)).to(weight) for f in factors])

    def _reproject(self, weight, previous):
        return self._project(weight)


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return time.perf_counter() - start, result


def previous_tucker(weights):
    return [TensorlyTucker(w.shape[1], w.shape[0], rank=0.25, bias=False).project_(w)
            for w in weights]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-reference", action="store_true",
                        help="do not run the previous (tensorly) Tucker projection")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows, load = [], os.getloadavg()[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for model_name, make in tiny_models().items():
            for spec in SPECS:
                torch.manual_seed(0)  # the same weights for every structure and the reference
                model = make()
                seconds, report = timed(sl.structurize, model, spec, project=True, exclude=HEADS)
                errors = [r.projection_error for r in report.rows]
                rows.append(dict(case=model_name, layers=len(errors), spec=spec,
                                 seconds=round(seconds, 3), mean_error=round(sum(errors) / len(errors), 5)))
                print(rows[-1], flush=True)
            if not args.skip_reference:  # previous Tucker, layer by layer at the same sizes
                torch.manual_seed(0)
                seconds, errors = timed(previous_tucker, [w for w, _ in _weights(make()).values()])
                rows.append(dict(case=model_name, layers=len(errors), spec="tucker:rank=0.25 (previous)",
                                 seconds=round(seconds, 3), mean_error=round(sum(errors) / len(errors), 5)))
                print(rows[-1], flush=True)
    weight = torch.randn(1024, 4096) / 64
    for spec in BIG_SPECS + (() if args.skip_reference else ("previous tucker:rank=0.25",)):
        if spec.startswith("previous"):
            layer = TensorlyTucker(4096, 1024, rank=0.25, bias=False)
        else:
            layer = sl.build(spec, 4096, 1024, bias=False)
        seconds, error = timed(layer.project_, weight)
        rows.append(dict(case="4096 -> 1024", layers=1, spec=spec, seconds=round(seconds, 3),
                         mean_error=round(error, 5)))
        print(rows[-1], flush=True)
    write(rows, load)


def _weights(model):
    from structlayers.linear_like import adapter_of, read_linear

    return {n: read_linear(m, adapter_of(m)) for n, m in model.named_modules()
            if adapter_of(m) is not None and not re.search(HEADS, n)}


def write(rows, load):
    RESULTS.mkdir(exist_ok=True)
    with (RESULTS / "projection.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = ["# Projection speed", "",
             f"{machine()}; {date.today()}; load average {load:.2f} at the start. "
             f"`python benchmarks/projection.py`. Seconds to structurize (project=True) every "
             f"projection of the model except its head, or to project the one 4096x1024 layer; "
             f"mean relative error ||W - W_hat|| / ||W||. Target: under {TARGET_SECONDS:.0f} s "
             f"for every row, at an error no worse than the previous projection's.", "",
             "| case | layers | structure | seconds | target met | mean error |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        met = "yes" if r["seconds"] < TARGET_SECONDS else "NO"
        if "previous" in r["spec"]:
            met = "(reference)"
        lines.append(f"| {r['case']} | {r['layers']} | {r['spec']} | {r['seconds']:.2f} | {met} | "
                     f"{r['mean_error']:.5f} |")
    print(write_markdown(RESULTS / "projection.md", lines))


if __name__ == "__main__":
    main()
