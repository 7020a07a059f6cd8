"""Training throughput at seed scale: model-epochs per second and peak memory per member.

    python bench/throughput.py --device cuda --K 1 16 64 256 [--eager] [--epochs 3]

Modes: `naive` is the straightforward single-model eager loop (bench/naive.py), `single` is
ufw with K = 1, `population` is ufw with K members of different seeds and learning rates.
A model-epoch is one member trained for one epoch (48 steps) plus its evaluation.
Writes bench/results/throughput_<device>.json.
"""

from __future__ import annotations

import argparse
import time

import torch
from common import device_label, reference_corpus, save

from ufw.config import preset
from ufw.train import Population


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure_population(K: int, corpus, device: str, epochs: int, graphs: bool,
                       compile: bool = False, precision: str = "fp32") -> dict:
    # Different seeds and LRs, one shape; patience high so no member stops during timing.
    configs = [preset("asymmetric_best").with_overrides(
        {"seed": k, "lr": 1e-3 * (1 + k % 4) / 2, "patience": 100}) for k in range(K)]
    population = Population(configs, corpus, device, cuda_graphs=graphs, compile=compile,
                            precision=precision)
    population.run_epoch()  # warm-up: allocator, kernels, graph capture
    sync(device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(epochs):
        rows = population.run_epoch()
    sync(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None
    return {"mode": "single" if K == 1 else "population", "K": K, "cuda_graphs": graphs,
            "compile": compile, "precision": precision,
            "last_val_ppl": [r["val_ppl"] for r in rows[:4]],
            "model_epochs_per_s": K * epochs / seconds, "seconds_per_epoch": seconds / epochs,
            "peak_mem_per_member_gib": peak / K if peak is not None else None}


def measure_naive(corpus, device: str, epochs: int) -> dict:
    from naive import NaiveTrainer

    trainer = NaiveTrainer(preset("asymmetric_best").with_overrides({"patience": 100}),
                           corpus, device)
    trainer.run_epoch()
    sync(device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(epochs):
        trainer.run_epoch()
    sync(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None
    return {"mode": "naive", "K": 1, "cuda_graphs": False, "model_epochs_per_s": epochs / seconds,
            "seconds_per_epoch": seconds / epochs, "peak_mem_per_member_gib": peak}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--K", type=int, nargs="*", default=[1, 16, 64, 256])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--eager", action="store_true",
                        help="on a GPU, also measure without CUDA graphs")
    parser.add_argument("--no-naive", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile the loss")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "tf32", "bf16"])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    corpus = reference_corpus()
    records = [] if args.no_naive else [measure_naive(corpus, args.device, args.epochs)]
    if records:
        print(records[-1], flush=True)
    for K in args.K:
        cuda = args.device.startswith("cuda")
        for graphs in ([False, True] if cuda and args.eager else [cuda]):
            records.append(measure_population(K, corpus, args.device, args.epochs, graphs,
                                              args.compile, args.precision))
            print(records[-1], flush=True)
    device = device_label(args.device)
    for r in records:
        r["device"] = device
    save(args.out or f"throughput_{args.device.split(':')[0]}.json",
         {"device": device, "records": records})


if __name__ == "__main__":
    main()
