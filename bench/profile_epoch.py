"""Where an epoch's time goes: torch.profiler's top CUDA kernels for a population epoch.

    python bench/profile_epoch.py --device cuda --K 256 [--tf32]
"""

from __future__ import annotations

import argparse

import torch
from common import reference_corpus

from ufw.config import preset
from ufw.train import Population


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--K", type=int, default=256)
    parser.add_argument("--tf32", action="store_true")
    args = parser.parse_args()
    if args.tf32:
        torch.set_float32_matmul_precision("high")
    configs = [preset("asymmetric_best").with_overrides({"seed": k, "patience": 100})
               for k in range(args.K)]
    population = Population(configs, reference_corpus(), args.device, cuda_graphs=False)
    population.run_epoch()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        population.run_epoch()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25,
                                      max_name_column_width=70)
    print(table)


if __name__ == "__main__":
    main()
