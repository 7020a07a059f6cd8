"""Where an epoch's time goes: torch.profiler's top CUDA kernels for a population epoch.

    python bench/profile_epoch.py --device cuda --K 256 [--tf32 | --precision bf16] [--compile]
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
    parser.add_argument("--precision", default="fp32", choices=["fp32", "tf32", "bf16"])
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()
    if args.tf32:
        torch.set_float32_matmul_precision("high")
    configs = [preset("asymmetric_best").with_overrides({"seed": k, "patience": 100})
               for k in range(args.K)]
    # Eager launches (no CUDA graph) so that the profiler sees every kernel.
    population = Population(configs, reference_corpus(), args.device, cuda_graphs=False,
                            precision=args.precision, compile=args.compile)
    population.run_epoch()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        population.run_epoch()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25,
                                      max_name_column_width=70)
    print(table)
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy = sum(getattr(e, "device_time", 0.0) for e in kernels) / 1e6
    print(f"{len(kernels)} kernels in one epoch of K = {args.K}, {busy:.3f} s of kernel time")


if __name__ == "__main__":
    main()
