"""Every preset on the seed benchmark, one single run each (issue 2's reference table).

    python bench/reference.py [--device cpu] [--seed 42]

Writes bench/results/reference_<device>.json and prints the markdown table for README.md.
"""

from __future__ import annotations

import argparse

from common import device_label, reference_corpus, save

from ufw.config import PRESETS, preset
from ufw.train import train


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--presets", nargs="*", default=list(PRESETS))
    args = parser.parse_args()
    corpus = reference_corpus()
    rows = []
    print("| preset | best PPL | best epoch | shallow ratio | compute cost | s/epoch |")
    print("|---|---|---|---|---|---|")
    for name in args.presets:
        r = train([preset(name).with_overrides({"seed": args.seed})], corpus, args.device)[0]
        row = {"preset": name, "best_ppl": r["best_ppl"], "best_epoch": r["best_epoch"],
               "shallow_ratio": r["shallow_ratio"], "compute_cost": r["compute_cost"],
               "epochs_run": r["epochs_run"],
               "seconds_per_epoch": r["train_seconds"] / r["epochs_run"]}
        rows.append(row)
        print(f"| {name} | {row['best_ppl']:.3f} | {row['best_epoch']} | "
              f"{row['shallow_ratio']:.3f} | {row['compute_cost']:.3f} | "
              f"{row['seconds_per_epoch']:.2f} |", flush=True)
    save(f"reference_{args.device.split(':')[0]}.json",
         {"device": device_label(args.device), "dataset": corpus.name, "seed": args.seed,
          "rows": rows})


if __name__ == "__main__":
    main()
