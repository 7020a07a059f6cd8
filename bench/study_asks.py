"""The study actor's cost in a pruned sweep, without GPUs: asks, reports and tells of
simulated populations, timed in the actor's own class (no Ray, one process).

    python bench/study_asks.py --num-samples 1024 [--sampler optuna] [--profile]

Two populations of `--slots` members (two trials sharing a GPU, as in the H200 runs) train
alpha_lr.yaml's configurations on made-up learning curves (a per-configuration quality plus
3/epoch), with ASHA (min resource 1, reduction factor 3, 20 epochs). Each epoch a population
reports every member, tells the ones that finished and asks for its freed slots, as
ufw.sweep's trials do. `--sampler optuna` swaps in Optuna's own TPESampler(constant_liar=
False) for ufw's BatchedTPESampler (the same values; the cost is the difference).
Writes bench/results/study_asks_<sampler>_<num_samples>.json.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import random
import tempfile
import time
from pathlib import Path

from common import save

from ufw.space import load_space
from ufw.sweep.study_service import StudyService

ROOT = Path(__file__).resolve().parents[1]
EPOCHS = 20


def simulate(num_samples: int, slots: int, sampler: str) -> dict[str, float]:
    space = load_space(ROOT / "search_spaces" / "alpha_lr.yaml")
    service = StudyService(space.to_dict(), str(Path(tempfile.mkdtemp()) / "study.journal"),
                           "bench", num_samples, {"pruner": "asha", "min_resource": 1,
                                                  "reduction_factor": 3,
                                                  "max_resource": EPOCHS})
    if sampler == "optuna":
        import optuna

        service.study.sampler = optuna.samplers.TPESampler(
            seed=space.sampler.get("seed"), constant_liar=False)
    seconds = {"ask": 0.0, "report": 0.0, "tell": 0.0}

    def timed(what, call, *args):
        start = time.perf_counter()
        result = call(*args)
        seconds[what] += time.perf_counter() - start
        return result

    quality = random.Random(0)
    populations: list[dict[int, list]] = [{}, {}]  # trial number -> [epoch, quality]
    while True:
        running = False
        for holder, members in enumerate(populations):
            for number, _ in timed("ask", service.ask, slots - len(members), f"t{holder}"):
                members[number] = [0, quality.gauss(0, 1)]
            running = running or bool(members)
            for member in members.values():
                member[0] += 1
            curve = {n: 7.3 + 0.3 * q + 3.0 / epoch for n, (epoch, q) in members.items()}
            pruned = set(timed("report", service.report,
                               [(n, members[n][0], v) for n, v in curve.items()]))
            done = [n for n, (epoch, _) in members.items() if epoch >= EPOCHS and n not in pruned]
            if done:
                timed("tell", service.tell, [(n, [curve[n]]) for n in done])
            for n in pruned | set(done):
                del members[n]
        if not running:
            return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-samples", type=int, default=1024)
    parser.add_argument("--slots", type=int, default=256, help="members per population")
    parser.add_argument("--sampler", choices=["batched", "optuna"], default="batched")
    parser.add_argument("--profile", action="store_true", help="print where the time goes")
    args = parser.parse_args()
    profile = cProfile.Profile() if args.profile else None
    if profile:
        profile.enable()
    seconds = simulate(args.num_samples, args.slots, args.sampler)
    if profile:
        profile.disable()
        pstats.Stats(profile).sort_stats("cumulative").print_stats(20)
    record = {"num_samples": args.num_samples, "slots": args.slots, "sampler": args.sampler,
              "seconds": {k: round(v, 2) for k, v in seconds.items()},
              "ms_per_configuration_asked": round(1000 * seconds["ask"] / args.num_samples, 2)}
    print(record)
    save(f"study_asks_{args.sampler}_{args.num_samples}.json", record)


if __name__ == "__main__":
    main()
