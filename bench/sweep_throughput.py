"""End-to-end sweep throughput on one machine: Ray Tune + Optuna + Parquet, real trials.

    python bench/sweep_throughput.py --num-samples 1024 --cohort 256 --gpus 1 \
        [--sweep-args "--precision bf16 --compile"]

Runs `python -m ufw.sweep` on the seed benchmark (alpha_lr.yaml: alpha schedule, layer-wise
LR, routing threshold; seed-scale model) as a subprocess and measures, from launch to exit:
completed trials (one trial = one configuration trained to its early stop) per GPU-hour,
and the share of wall time spent training (the sum over Ray trials of their populations'
training-and-evaluation time, divided by wall time x concurrent trials). Everything else
(Ray start, scheduling, Optuna, checkpoints, Parquet) is the overhead.
Writes bench/results/sweep_<device>.json.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
from common import SHARED, device_label, save, training_share

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--space", default=str(ROOT / "search_spaces" / "alpha_lr.yaml"))
    parser.add_argument("--num-samples", type=int, default=1024)
    parser.add_argument("--cohort", default="256")
    parser.add_argument("--gpus", type=float, default=1.0, help="GPUs on this machine")
    parser.add_argument("--gpus-per-trial", type=float, default=1.0)
    parser.add_argument("--sweep-args", default="", help="more flags for ufw.sweep")
    parser.add_argument("--out", help="record name in bench/results")
    args = parser.parse_args()
    results = Path(tempfile.mkdtemp(prefix="ufw-bench-"))
    command = [sys.executable, "-m", "ufw.sweep", args.space, "--num-samples",
               str(args.num_samples), "--cohort", args.cohort, "--seeds", "1",
               "--gpus-per-trial", str(args.gpus_per_trial), "--results", str(results),
               "--name", "bench", "--train-file", str(SHARED / "test.txt"),
               "--val-file", str(SHARED / "valid.txt"), "--train-chars", "100000",
               "--val-chars", "10000", *shlex.split(args.sweep_args)]
    start, launched = time.perf_counter(), time.time()
    subprocess.run(command, check=True)
    wall = time.perf_counter() - start
    trials = pd.read_parquet(results / "bench" / "trials")
    completed = int((trials["status"] == "completed").sum())
    slots = max(1.0, args.gpus / args.gpus_per_trial) if args.gpus_per_trial else 1.0
    # Where the rest goes: each Ray trial's set-up before its first epoch, its waits on the
    # driver for its reports, the rest of its time outside its epochs (after_training: the
    # final report, and between epochs a refilling trial's refills and study calls), and wall
    # time when no trial was running at all (Ray's start and stop, scheduling, Optuna, the
    # driver's writes).
    per_trial = trials.groupby("trial_id").agg(
        started=("started_at", "min"), finished=("finished_at", "max"),
        setup=("setup_seconds", "max"), train=("trial_train_seconds", "max"),
        report=("report_seconds", "max"))
    busy, end = 0.0, -float("inf")
    for started, finished in sorted(zip(per_trial["started"], per_trial["finished"])):
        busy += max(0.0, finished - max(started, end))
        end = max(end, finished)
    # The first epoch of each population also compiles (--compile) and captures its CUDA
    # graph; counted as training above, and its excess over a typical epoch shown here.
    epochs = pd.read_parquet(results / "bench" / "epochs").groupby(
        ["trial_id", "epoch"])["epoch_seconds"].first().unstack()
    first = epochs.columns.min()  # epochs are counted from 1 (docs/design.md)
    first_epoch_excess = float((epochs[first] - epochs.drop(columns=first).median(axis=1)).sum())
    breakdown = {"setup_seconds": float(per_trial["setup"].sum()),
                 # waiting on the driver to take each epoch's report (and checkpoints)
                 "report_seconds": float(per_trial["report"].sum()),
                 "after_training_seconds": float((per_trial["finished"] - per_trial["started"]
                                                  - per_trial["setup"] - per_trial["train"]
                                                  - per_trial["report"]).sum()),
                 "no_trial_running_seconds": float(wall - busy),
                 # of which: from the launch to the first trial's set-up (the driver's imports,
                 # Ray's start, Tune's, the study's first asks, the trial processes' imports),
                 # and from the last trial's end to the driver's exit
                 "launch_to_first_trial_seconds": float(per_trial["started"].min() - launched),
                 "last_trial_to_exit_seconds": float(launched + wall
                                                     - per_trial["finished"].max()),
                 "first_epoch_excess_seconds": first_epoch_excess}
    record = {"device": device_label("cuda" if args.gpus else "cpu"), "gpus": args.gpus,
              "trials": len(trials),
              "completed": completed, "wall_seconds": wall,
              "trials_per_gpu_hour": completed / (wall / 3600) / max(args.gpus, 1e-9),
              "training_share": training_share(trials, wall, slots),
              "overhead": breakdown, "cohort": args.cohort,
              "ray_trials": int(trials["trial_id"].nunique()),
              "mean_epochs_run": float(trials["epochs_run"].mean()),
              "best_ppl": float(trials["best_ppl"].min()),
              # which GPU(s) Ray gave each trial, and how many configurations each trained
              "configurations_per_gpu": {str(k): int(v) for k, v in
                                         trials.groupby("gpu", dropna=False).size().items()},
              "complete_rows": bool(trials["best_ppl"].notna().all()
                                    and trials[["config_id", "seed"]].value_counts().max() == 1),
              "sweep_command": " ".join(command[1:])}
    print(record)
    save(args.out or f"sweep_{'cuda' if args.gpus else 'cpu'}.json", record)


if __name__ == "__main__":
    main()
