"""Does replaying an epoch as a CUDA graph train exactly as eager launches do, at a size?

    python bench/graphs_vs_eager.py --size 512 --epochs 2 [--precision fp32] [--train-chars N]

Trains ufw K = 1 twice from the same initialisation, with and without CUDA graphs, and
records each epoch's train loss and validation PPL side by side (fp32 without compilation
is deterministic up to the order of floating-point reductions, so the two should agree to
~1e-5 for the first epochs). Writes bench/results/graphs_vs_eager_cuda.json.
"""

from __future__ import annotations

import torch
from common import save
from scale import SIZES, config_for, load_texts

from ufw.cli import ArgumentParser
from ufw.config import PRECISIONS
from ufw.data import make_corpus
from ufw.train import Population


def main() -> None:
    parser = ArgumentParser(prog="python bench/graphs_vs_eager.py")
    parser.add_argument("--size", type=int, default=512, choices=list(SIZES))
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--precision", default="fp32", choices=PRECISIONS)
    parser.add_argument("--train-chars", type=int)
    parser.add_argument("--text"), parser.add_argument("--val-text")
    args = parser.parse_args()
    name, train_text, val_text = load_texts(args)
    if args.train_chars:
        train_text = train_text[:args.train_chars]
    size = SIZES[args.size]
    corpus = make_corpus(name, train_text, val_text, batch_size=32, seq_len=size[3])
    config = config_for(size, max_epochs=args.epochs)
    curves = {}
    for graphs in (True, False):
        population = Population([config], corpus, "cuda", cuda_graphs=graphs,
                                precision=args.precision)
        curves["graphs" if graphs else "eager"] = [
            {k: row[k] for k in ("epoch", "train_loss", "val_ppl")}
            for _ in range(args.epochs) for row in population.run_epoch()]
        del population
        torch.cuda.empty_cache()
    for g, e in zip(curves["graphs"], curves["eager"]):
        print(f"epoch {g['epoch']}: train loss {g['train_loss']:.6f} vs {e['train_loss']:.6f}, "
              f"val PPL {g['val_ppl']:.6f} vs {e['val_ppl']:.6f} (graphs vs eager)")
    save("graphs_vs_eager_cuda.json", {"size": list(size), "precision": args.precision,
                                       "train_chars": len(train_text), **curves})


if __name__ == "__main__":
    main()
