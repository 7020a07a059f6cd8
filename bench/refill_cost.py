"""What a pruned sweep's epoch boundary costs on the host: a refilling cohort's bookkeeping.

    python bench/refill_cost.py [--K 256] [--epochs 12]

One Ray trial's `Cohort` (ufw/sweep/cohort.py) of K members drawn from alpha_lr.yaml's space,
with a tiny model (dim 16) so that training is cheap, on the CPU. After each epoch it does
what a trial with `--pruner` does between epochs, without Ray or the study actor: each
point's objective (the report), about two thirds of the trained points pruned (ASHA's rung
1 keeps a third), the finished results gathered (the tell), and every freed slot refilled
with a new configuration. Timed: everything but the epoch itself and the drawing of the new
configurations. Writes bench/results/refill_cost_cpu.json (or --out).
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import optuna
import torch
from common import device_label, save

from ufw.data import make_corpus, python_docs_text
from ufw.space import load_space
from ufw.sweep.cohort import Cohort
from ufw.train import Population

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--K", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--out", default="refill_cost_cpu.json",
                        help="record name in bench/results")
    args = parser.parse_args()
    torch.set_num_threads(1)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = load_space(ROOT / "search_spaces" / "alpha_lr.yaml")
    text = python_docs_text()
    corpus = make_corpus("python-docs-slice", text[:3000], text[-1500:], batch_size=4,
                         seq_len=16)
    tiny = {"dim": 16, "num_heads": 2, "batch_size": 4, "seq_len": 16}
    spec = {"sweep": "bench", "fixed": {**space.fixed, **tiny}, "overrides": {}, "seeds": 1,
            "objectives": [["best_ppl", "minimize"]], "data": {}}
    cohort = Cohort(spec, lambda configs: Population(configs, corpus, "cpu"))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    asked = 0

    def draw(n: int) -> tuple[list[dict], list[int]]:
        nonlocal asked
        points = [space.sample(study.ask()) for _ in range(n)]
        asked += n
        return points, list(range(asked - n, asked))

    cohort.add(*draw(args.K))
    rng = random.Random(0)
    seconds, refilled = 0.0, 0
    for _ in range(args.epochs):
        rows = cohort.run_epoch()
        start = time.perf_counter()
        trained = sorted({cohort.members[r["member"]].point for r in rows})
        [cohort.objective(p) for p in trained]
        cohort.prune([p for p in trained if rng.random() < 2 / 3])
        cohort.told.update(cohort.untold_values())
        free = cohort.free_slots()
        seconds += time.perf_counter() - start
        points, numbers = draw(len(free))
        start = time.perf_counter()
        cohort.add(points, numbers, free)
        seconds += time.perf_counter() - start
        refilled += len(free)
    record = {"device": device_label("cpu"), "K": args.K, "epochs": args.epochs,
              "slots_refilled": refilled,
              "seconds_per_epoch_boundary": round(seconds / args.epochs, 3),
              "ms_per_refilled_slot": round(1000 * seconds / max(1, refilled), 2)}
    print(record)
    save(args.out, record)


if __name__ == "__main__":
    main()
