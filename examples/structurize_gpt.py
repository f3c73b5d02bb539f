"""Train a small character-level GPT, swap its linear layers for structured ones, fine-tune.

    python examples/structurize_gpt.py --spec btt:rank=2 --steps 200

The text is the Python standard library's own source (or --corpus FILE), so nothing is downloaded. The script
prints the structurize report and the validation loss of the dense model, of the structured model
right after projection, and after fine-tuning it next to the dense model trained as long.
"""

import argparse
import copy
import time

import torch

import structlayers as sl
from structlayers.data import text_corpus
from structlayers.gpt import BLOCK_PROJECTIONS, GPT, GPTConfig


@torch.no_grad()
def evaluate(model, batches) -> float:
    model.eval()
    loss = sum(model(x, y)[1].item() for x, y in batches) / len(batches)
    model.train()
    return loss


def train(model, corpus, args, steps, generator):
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    for step in range(steps):
        x, y = corpus.batch("train", args.batch_size, args.block_size, generator)
        _, loss = model(x.to(args.device), y.to(args.device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % max(1, steps // 4) == 0 or step == steps - 1:
            print(f"  step {step:4d}  train loss {loss.item():.3f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default="btt:rank=2", help="structure of the swapped layers")
    parser.add_argument("--steps", type=int, default=300, help="dense training steps")
    parser.add_argument("--finetune-steps", type=int, default=100)
    parser.add_argument("--n-embd", type=int, default=64)
    parser.add_argument("--n-layer", type=int, default=2)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--corpus", help="a text file (default: the Python standard library's source)")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)

    corpus = text_corpus(args.corpus, max_bytes=1_000_000)
    val_batches = [tuple(t.to(args.device) for t in corpus.batch("val", args.batch_size,
                                                                 args.block_size, generator))
                   for _ in range(8)]
    print(corpus.source)

    config = GPTConfig(vocab_size=corpus.vocab_size, block_size=args.block_size, n_layer=args.n_layer,
                       n_head=4, n_embd=args.n_embd)
    model = GPT(config).to(args.device)
    start = time.time()
    print(f"training the dense model ({args.steps} steps)")
    train(model, corpus, args, args.steps, generator)
    dense_loss = evaluate(model, val_batches)
    dense = copy.deepcopy(model)  # the baseline: keep training it as long as the structured one

    report = sl.structurize(model, args.spec, include=BLOCK_PROJECTIONS, project=True)
    print(report)
    projected_loss = evaluate(model, val_batches)
    print(f"fine-tuning the structured model ({args.finetune_steps} steps)")
    train(model, corpus, args, args.finetune_steps, generator)
    finetuned_loss = evaluate(model, val_batches)
    print(f"the dense baseline, trained for the same {args.finetune_steps} more steps")
    train(dense, corpus, args, args.finetune_steps, generator)

    print(f"validation loss after {args.steps} steps: dense {dense_loss:.3f}, {args.spec} "
          f"projected {projected_loss:.3f}")
    print(f"after {args.finetune_steps} more: dense {evaluate(dense, val_batches):.3f}, "
          f"{args.spec} fine-tuned {finetuned_loss:.3f}   ({time.time() - start:.1f} s)")


if __name__ == "__main__":
    main()
