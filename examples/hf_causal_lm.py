"""A Hugging Face Llama, structurized under one parameter budget, fine-tuned, saved and reloaded.

    python examples/hf_causal_lm.py                    # about 2 minutes on 2 CPU cores
    python examples/hf_causal_lm.py --budget 0.2 --steps 400 --finetune 200

A tiny LlamaForCausalLM is built from a config (random weights, nothing downloaded) and trained
briefly on the Python standard library's source (byte-level, `structlayers.data.text_corpus`).
Then its block projections are structurized four ways at (at most) the same parameter count:
`sl.search.budget` (per-layer structure and rank, allocated by projection error per parameter)
and one uniform spec for each of btt, lowrank and tucker. Each is fine-tuned as long (and so is
the dense model, for reference); the script
prints params, FLOPs/token, mean projection error and validation loss before and after. The
budget model is saved with sl.save_pretrained, reloaded with sl.from_pretrained (identical
logits) and generates text.
"""

import argparse
import copy
import tempfile
import time
import warnings

import torch

import structlayers as sl
from structlayers.data import text_corpus

BLOCKS = r"layers\.\d+\.(self_attn|mlp)\."


def tiny_llama(vocab_size: int, width: int, layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=width, intermediate_size=width * 8 // 3,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, bos_token_id=0, eos_token_id=0,
                         pad_token_id=0, tie_word_embeddings=False)
    return LlamaForCausalLM(config)


@torch.no_grad()
def evaluate(model, batches) -> float:
    model.eval()
    loss = sum(model(input_ids=x, labels=x).loss.item() for x in batches) / len(batches)
    model.train()
    return loss


def train(model, corpus, steps: int, lr: float, args, generator):
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        x, _ = corpus.batch("train", args.batch_size, args.block_size, generator)
        loss = model(input_ids=x, labels=x).loss  # transformers shifts the labels itself
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return model


def uniform_spec(model, kind: str, limit: int) -> str:
    """The largest uniform spec of `kind` whose block projections fit `limit` weight params."""
    ladders = {"btt": [f"btt:rank={r}" for r in range(1, 65)],
               "lowrank": [f"lowrank:rank={r}" for r in range(1, 257)],
               "tucker": [f"tucker:rank={f / 100}" for f in range(1, 101)]}
    best = None
    for spec in ladders[kind]:
        probe = copy.deepcopy(model)
        try:
            report = sl.structurize(probe, spec, include=BLOCKS)
        except ValueError:
            break
        if sum(r.params_after - r.out_features * _has_bias(probe, r.name) for r in report.rows) > limit:
            break
        best = spec
    return best


def _has_bias(model, name) -> int:
    return int(model.get_submodule(name).bias is not None)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=0.25,
                        help="fraction of the block projections' weights to keep (0, 1]")
    parser.add_argument("--kinds", default="btt,lowrank,tucker")
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=300, help="dense training steps")
    parser.add_argument("--finetune", type=int, default=150, help="fine-tuning steps after projection")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message=".*generation flags.*")

    torch.manual_seed(args.seed)
    corpus = text_corpus(max_bytes=2_000_000)
    generator = torch.Generator().manual_seed(args.seed)
    val = [corpus.batch("val", args.batch_size, args.block_size, generator)[0] for _ in range(8)]
    dense = tiny_llama(corpus.vocab_size, args.width, args.layers)
    start = time.time()
    train(dense, corpus, args.steps, args.lr, args, generator)
    dense_loss = evaluate(dense, val)
    print(f"corpus: {corpus.source}\ndense Llama: {sum(p.numel() for p in dense.parameters()):,} "
          f"params, {args.steps} steps in {time.time() - start:.0f} s, val loss {dense_loss:.3f}")

    allocation = sl.search.budget(args.budget, kinds=tuple(args.kinds.split(",")))
    candidates = {"budget": copy.deepcopy(dense)}
    start = time.time()
    reports = {"budget": sl.structurize(candidates["budget"], allocation, include=BLOCKS, project=True)}
    print(f"\nbudget allocation ({time.time() - start:.1f} s):\n{reports['budget']}")
    limit = allocation.last.budget
    for kind in ("btt", "lowrank", "tucker"):
        spec = uniform_spec(dense, kind, limit)
        if spec is None:
            print(f"no uniform {kind} spec fits {limit:,} params")
            continue
        candidates[spec] = copy.deepcopy(dense)
        reports[spec] = sl.structurize(candidates[spec], spec, include=BLOCKS, project=True)

    dense_flops = reports["budget"].flops_before
    print(f"\nblock projections: {reports['budget'].params_before:,} params dense, budget "
          f"{args.budget} = {limit:,} weight params; fine-tuning {args.finetune} steps each\n")
    print(f"{'structure':<22}{'params':>10}{'FLOPs/tok':>11}{'mean err':>10}"
          f"{'val (proj.)':>13}{'val (tuned)':>13}")
    continued = train(copy.deepcopy(dense), corpus, args.finetune, args.lr / 3, args,
                      torch.Generator().manual_seed(args.seed + 1))  # dense, trained as long
    print(f"{'dense':<22}{reports['budget'].params_before:>10,}{dense_flops:>11,}{0:>10.3f}"
          f"{dense_loss:>13.3f}{evaluate(continued, val):>13.3f}")
    for name, model in candidates.items():
        report = reports[name]
        projected = evaluate(model, val)
        tuned = evaluate(train(model, corpus, args.finetune, args.lr / 3, args,
                               torch.Generator().manual_seed(args.seed + 1)), val)
        mean_error = sum(r.projection_error for r in report.rows) / len(report.rows)
        print(f"{name:<22}{report.params_after:>10,}{report.flops_after:>11,}{mean_error:>10.3f}"
              f"{projected:>13.3f}{tuned:>13.3f}")

    model = candidates["budget"].eval()
    prompt = torch.tensor([list(b"def ")])
    with tempfile.TemporaryDirectory() as directory:
        sl.save_pretrained(model, directory)
        reloaded = sl.from_pretrained(type(model), directory)
    with torch.no_grad():
        same = torch.equal(model(input_ids=prompt).logits, reloaded(input_ids=prompt).logits)
    text = reloaded.generate(prompt, max_new_tokens=80, do_sample=False, pad_token_id=0)[0]
    print(f"\nsaved and reloaded with sl.save_pretrained / sl.from_pretrained: identical logits: {same}")
    print("greedy sample:", repr(bytes(text.tolist()).decode("utf-8", errors="replace")))


if __name__ == "__main__":
    main()
