"""Training throughput at seed scale: model-epochs per second and peak memory per member.

    python bench/throughput.py --device cuda --K 1 16 64 256 [--eager] [--epochs 3]
    python bench/throughput.py --device cpu --interleave --K --epochs 6 [--compile]
    python bench/throughput.py --device cuda --K 256 --precision bf16 --compile \
        --attention sdpa softmax --no-naive

Modes: `naive` is the straightforward single-model eager loop (bench/naive.py), `single` is
ufw with K = 1, `population` is ufw with K members of different seeds and learning rates.
A model-epoch is one member trained for one epoch (48 steps) plus its evaluation.
Writes bench/results/throughput_<device>.json.
"""

from __future__ import annotations

import argparse
import time

import torch
from common import device_label, population_configs, reference_corpus, save

from ufw.config import preset
from ufw.train import Population


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(run_epoch, epochs: int, device: str):
    """Seconds for `epochs` epochs after one warm-up (allocator, kernels, graph capture), the
    peak GPU memory meanwhile, and the last epoch's output."""
    run_epoch()
    sync(device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(epochs):
        out = run_epoch()
    sync(device)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None
    return time.perf_counter() - start, peak, out


def measure_population(K: int, corpus, device: str, epochs: int, graphs: bool,
                       compile: bool = False, precision: str = "fp32",
                       attention: str = "auto") -> dict:
    population = Population(population_configs(K), corpus, device, cuda_graphs=graphs,
                            compile=compile, precision=precision, attention=attention)
    seconds, peak, rows = timed(population.run_epoch, epochs, device)
    return {"mode": "single" if K == 1 else "population", "K": K, "cuda_graphs": graphs,
            "compile": compile, "precision": precision,
            "attention": population.model.attention,
            "last_val_ppl": [r["val_ppl"] for r in rows[:4]],
            "model_epochs_per_s": K * epochs / seconds, "seconds_per_epoch": seconds / epochs,
            "peak_mem_per_member_gib": peak / K if peak is not None else None}


def measure_naive(corpus, device: str, epochs: int) -> dict:
    from naive import NaiveTrainer

    trainer = NaiveTrainer(preset("asymmetric_best").with_overrides({"patience": 100}),
                           corpus, device)
    seconds, peak, _ = timed(trainer.run_epoch, epochs, device)
    return {"mode": "naive", "K": 1, "cuda_graphs": False, "model_epochs_per_s": epochs / seconds,
            "seconds_per_epoch": seconds / epochs, "peak_mem_per_member_gib": peak}


def measure_interleaved(corpus, epochs: int, compile: bool = False) -> list[dict]:
    """Naive and ufw K = 1 on the CPU, epoch by epoch in turn, the same configuration: drift
    of a shared machine (other jobs, clocks) hits both alike. With `compile`, also ufw K = 1
    with its loss compiled (the warm-up epoch compiles; a sweep's worker compiles once)."""
    from naive import NaiveTrainer

    config = preset("asymmetric_best").with_overrides({"patience": 100})
    runs = {("naive", False): NaiveTrainer(config, corpus, "cpu").run_epoch,
            ("single", False): Population([config], corpus, "cpu").run_epoch}
    if compile:
        runs["single", True] = Population([config], corpus, "cpu", compile=True).run_epoch
    times: dict[tuple[str, bool], list[float]] = {name: [] for name in runs}
    warm_up = {}
    for name, run_epoch in runs.items():
        start = time.perf_counter()
        run_epoch()
        warm_up[name] = time.perf_counter() - start
    for _ in range(epochs):
        for name, run_epoch in runs.items():
            start = time.perf_counter()
            run_epoch()
            times[name].append(time.perf_counter() - start)
    return [{"mode": mode, "K": 1, "compile": compiled, "interleaved": True,
             "warm_up_seconds": warm_up[mode, compiled], "epoch_seconds": t,
             "seconds_per_epoch": sum(t) / len(t), "model_epochs_per_s": len(t) / sum(t),
             "peak_mem_per_member_gib": None} for (mode, compiled), t in times.items()]


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
    parser.add_argument("--interleave", action="store_true",
                        help="CPU: naive and ufw K=1 epoch by epoch in turn (then --K runs)")
    parser.add_argument("--attention", nargs="+", default=["auto"],
                        choices=["auto", "sdpa", "softmax"],
                        help="the population's attention kernel(s) to measure, in turn")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    corpus = reference_corpus()
    if args.interleave:
        records = measure_interleaved(corpus, args.epochs, args.compile)
    else:
        records = [] if args.no_naive else [measure_naive(corpus, args.device, args.epochs)]
    for r in records:
        print(r, flush=True)
    for K in args.K:
        cuda = args.device.startswith("cuda")
        for graphs in ([False, True] if cuda and args.eager else [cuda]):
            for attention in args.attention:
                records.append(measure_population(K, corpus, args.device, args.epochs, graphs,
                                                  args.compile, args.precision, attention))
                print(records[-1], flush=True)
    device = device_label(args.device)
    for r in records:
        r["device"] = device
    save(args.out or f"throughput_{args.device.split(':')[0]}.json",
         {"device": device, "records": records})


if __name__ == "__main__":
    main()
