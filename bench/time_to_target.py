"""Time to a good configuration: a sweep without pruning against the same sweep with ASHA.

    python bench/time_to_target.py --num-samples 4096 --cohort 256 --gpus 1 \
        [--sweep-args "--precision bf16 --compile"] [--pruner-args "--reduction-factor 3"]
    python bench/time_to_target.py --quick      # a tiny CPU run, to check the script

Runs `python -m ufw.sweep` twice as subprocesses, one after the other, on the reference
benchmark (as bench/sweep_throughput.py does): (a) `--pruner none`, every configuration trained
to its own early stop; (b) `--pruner asha`. In both, the slot of a configuration that is done
(early-stopped, or pruned in (b)) is refilled with a new configuration. Both get the same
space (default alpha_lr.yaml), --num-samples, sampler seed, cohort and --sweep-args. A space
without a sampler seed is run from a copy that sets one (--sampler-seed), since otherwise the
two sweeps would draw different configurations.

From each sweep's trials Parquet it reports (compare()):

- GPU seconds, counted as wall seconds since the sweep's process was launched times the GPUs
  the sweep was given (--gpus; a CPU run counts as 1 device), so Ray's start, scheduling and
  everything else the sweep spends count too, and idle GPUs count as used;
- (a)'s best final PPL among completed configurations over time (its improvements);
- the GPU seconds until each sweep finished a *completed* configuration within 1% of (a)'s
  overall best PPL (the target), and (b)'s over (a)'s (target: <= 1/3);
- of (a)'s top 1% configurations (completed, by PPL), how many (b) drew at all (same sampler
  seed: the same first configurations; TPE's later draws depend on results) and how many of
  those it pruned, matched by config_id;
- since TPE's draws in the two sweeps soon part, also how many of (a)'s top 1% successive
  halving would stop when replayed on (a)'s own learning curves with (b)'s rungs (every
  configuration of (a) at every rung: the rule with full information);
- configurations evaluated per GPU-hour (rows with a result, any status except failed).

A row's time is `ended_at` (when that configuration completed or was pruned: with refill one
Ray trial trains many configurations one after another) where the sweep writes it, else
`finished_at` (its Ray trial's end, later than or equal to the configuration's own).
Writes bench/results/time_to_target_<device>.json.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import yaml
from common import SHARED, device_label, save, training_share

from ufw.analysis import completed

ROOT = Path(__file__).resolve().parents[1]
TARGET_WITHIN = 0.01  # the target: within 1% of (a)'s best PPL
TOP_SHARE = 0.01  # (a)'s top 1% configurations
QUICK = ["--num-samples", "16", "--cohort", "4", "--sweep-args",
         "--train-chars 20000 --val-chars 4000 --set max_epochs=4 --set dim=16 "
         "--set num_heads=2 --set batch_size=8 --set seq_len=32"]


@dataclass
class SweepRun:
    """One sweep's trials rows and how it ran: ``launched_at`` (Unix time its process was
    started), ``wall_seconds`` (launch to exit), ``gpus`` (devices it was given) and its
    epochs rows (learning curves) where kept."""

    trials: pd.DataFrame
    launched_at: float
    wall_seconds: float
    gpus: float
    epochs: pd.DataFrame | None = None

    def gpu_seconds(self, at: pd.Series) -> pd.Series:
        """GPU seconds from launch until the Unix times ``at``."""
        return (at - self.launched_at) * self.gpus


def row_ended_at(trials: pd.DataFrame) -> pd.Series:
    """When each row's configuration ended: ``ended_at`` where written, else ``finished_at``."""
    if "ended_at" in trials.columns:
        return trials["ended_at"].fillna(trials["finished_at"])
    return trials["finished_at"]


def _completed_by_time(run: SweepRun) -> pd.DataFrame:
    """Completed rows with their GPU seconds (``gpu_seconds``), earliest first."""
    done = completed(run.trials)
    done = done.assign(gpu_seconds=run.gpu_seconds(row_ended_at(done)))
    return done.sort_values("gpu_seconds", kind="stable")


def best_over_time(run: SweepRun) -> list[tuple[float, float]]:
    """(GPU seconds, best completed PPL so far) at each improvement of the best."""
    done = _completed_by_time(run)
    # rows that end together (one Ray trial's, without ended_at) are one point in time
    best = done.groupby("gpu_seconds")["best_ppl"].min().cummin()
    improved = best < best.shift(fill_value=math.inf)
    return [(float(s), float(b)) for s, b in best[improved].items()]


def gpu_seconds_to_target(run: SweepRun, target: float) -> float | None:
    """GPU seconds until the first completed row with ``best_ppl <= target``; None if none."""
    done = _completed_by_time(run)
    hits = done["gpu_seconds"][done["best_ppl"] <= target]
    return float(hits.iloc[0]) if len(hits) else None


def top_configurations_pruned(full: pd.DataFrame, pruning: pd.DataFrame,
                              share: float = TOP_SHARE) -> dict[str, float | int]:
    """Of ``full``'s best ``share`` of completed configurations (by mean best PPL, at least
    one): how many ``pruning`` drew (``in_pruning_sweep``) and how many of them it pruned
    (any row ``pruned``), with the fractions of all of them and of those drawn."""
    means = completed(full).groupby("config_id")["best_ppl"].mean()
    top = means.nsmallest(max(1, math.ceil(share * len(means))), keep="first").index
    statuses = pruning.groupby("config_id")["status"]
    drawn = [c for c in top if c in statuses.groups]
    pruned = [c for c in drawn if (statuses.get_group(c) == "pruned").any()]
    return {"top_configurations": len(top), "in_pruning_sweep": len(drawn),
            "pruned": len(pruned), "pruned_fraction": len(pruned) / len(top),
            "pruned_fraction_of_drawn": len(pruned) / len(drawn) if drawn else math.nan}


def successive_halving_replay(epochs: pd.DataFrame, min_resource: int = 1,
                              reduction_factor: int = 3) -> set[str]:
    """The config_ids successive halving stops when it sees every configuration of a sweep
    without pruning at each rung (epochs min_resource, x reduction_factor, ...): at a rung,
    of the configurations still in that trained that far, those whose best validation PPL so
    far (mean over seeds) is not among the best 1/reduction_factor (at least one; ties kept,
    as Optuna's SuccessiveHalvingPruner keeps them) are stopped."""
    best = (epochs.groupby(["config_id", "epoch"])["val_ppl"].mean()
            .groupby(level="config_id").cummin())
    last_epoch = epochs.groupby("config_id")["epoch"].max()
    alive, stopped, rung = set(last_epoch.index), set(), min_resource
    while True:
        reached = sorted(c for c in alive if last_epoch[c] >= rung)
        if len(reached) < 2:
            return stopped
        values = best.xs(rung, level="epoch").reindex(reached)
        keep = max(1, len(reached) // reduction_factor)
        out = set(values[values > values.nsmallest(keep).max()].index)
        stopped |= out
        alive = set(reached) - out
        rung *= reduction_factor


def top_configurations_in_replay(full: SweepRun, min_resource: int, reduction_factor: int,
                                 share: float = TOP_SHARE) -> dict[str, float | int] | None:
    """Of ``full``'s best ``share`` of completed configurations, how many the replayed
    successive halving stops (None without ``full``'s learning curves)."""
    if full.epochs is None or full.epochs.empty:
        return None
    means = completed(full.trials).groupby("config_id")["best_ppl"].mean()
    top = set(means.nsmallest(max(1, math.ceil(share * len(means))), keep="first").index)
    stopped = successive_halving_replay(full.epochs, min_resource, reduction_factor)
    return {"top_configurations": len(top), "stopped": len(top & stopped),
            "stopped_fraction": len(top & stopped) / len(top),
            "all_stopped_fraction": len(stopped) / len(means) if len(means) else math.nan,
            "min_resource": min_resource, "reduction_factor": reduction_factor}


def configurations_per_gpu_hour(run: SweepRun) -> float:
    """Rows with a result (completed or pruned, not failed) per GPU-hour of the whole sweep."""
    evaluated = run.trials["best_ppl"].notna() & (run.trials["status"] != "failed")
    return float(evaluated.sum()) / (run.wall_seconds * run.gpus / 3600)


def compare(full: SweepRun, pruning: SweepRun, within: float = TARGET_WITHIN,
            min_resource: int = 1, reduction_factor: int = 3, slots: float = 1.0) -> dict:
    """The record's numbers for sweep (a) ``full`` (no pruning) against (b) ``pruning``."""
    best = float(completed(full.trials)["best_ppl"].min())
    target = best * (1 + within)
    to_target = {"no_pruning": gpu_seconds_to_target(full, target),
                 "asha": gpu_seconds_to_target(pruning, target)}
    a, b = to_target["no_pruning"], to_target["asha"]
    return {
        "best_ppl_no_pruning": best, "target_ppl": target,
        "gpu_seconds_to_target": to_target,
        # below 1/3 meets the target; None when (b) never reached it
        "asha_over_no_pruning": b / a if a and b is not None else None,
        "best_over_time_no_pruning": best_over_time(full),
        "best_over_time_asha": best_over_time(pruning),
        "top_1pct_of_no_pruning": top_configurations_pruned(full.trials, pruning.trials),
        "top_1pct_of_no_pruning_replayed": top_configurations_in_replay(full, min_resource,
                                                                        reduction_factor),
        "configurations_per_gpu_hour": {"no_pruning": configurations_per_gpu_hour(full),
                                        "asha": configurations_per_gpu_hour(pruning)},
        "rows": {name: {str(k): int(v) for k, v in run.trials["status"].value_counts().items()}
                 for name, run in (("no_pruning", full), ("asha", pruning))},
        "gpu_seconds_total": {"no_pruning": full.wall_seconds * full.gpus,
                              "asha": pruning.wall_seconds * pruning.gpus},
        "training_share": {name: training_share(run.trials, run.wall_seconds, slots)
                           for name, run in (("no_pruning", full), ("asha", pruning))},
    }


def seeded_space(space: Path, seed: int, where: Path) -> tuple[Path, int]:
    """The space itself when it fixes its sampler's seed, else a copy in ``where`` with
    ``seed``; and the seed both sweeps use."""
    text = yaml.safe_load(space.read_text())
    sampler = text.get("sampler") or {"type": "tpe"}
    sampler = {"type": sampler} if isinstance(sampler, str) else dict(sampler)
    if sampler.get("seed") is not None:
        return space, int(sampler["seed"])
    text["sampler"] = {**sampler, "seed": seed}
    copy = where / space.name
    copy.write_text(yaml.safe_dump(text, sort_keys=False))
    return copy, seed


def reference_data_flags() -> list[str]:
    """The reference benchmark's data (docs/design.md), or the offline corpus without it."""
    if (SHARED / "test.txt").exists():
        return ["--train-file", str(SHARED / "test.txt"), "--val-file",
                str(SHARED / "valid.txt"), "--train-chars", "100000", "--val-chars", "10000"]
    return ["--data", "python-docs", "--train-chars", "100000", "--val-chars", "10000"]


def save_run(run: SweepRun, where: Path, name: str) -> None:
    where.mkdir(parents=True, exist_ok=True)
    run.trials.to_parquet(where / f"{name}_trials.parquet")
    if run.epochs is not None:
        run.epochs.to_parquet(where / f"{name}_epochs.parquet")
    (where / f"{name}_launch.json").write_text(json.dumps(
        {"launched_at": run.launched_at, "wall_seconds": run.wall_seconds, "gpus": run.gpus}))


def load_run(where: Path, name: str) -> SweepRun:
    launch = json.loads((where / f"{name}_launch.json").read_text())
    epochs = where / f"{name}_epochs.parquet"
    return SweepRun(pd.read_parquet(where / f"{name}_trials.parquet"), **launch,
                    epochs=pd.read_parquet(epochs) if epochs.exists() else None)


def run_sweep(command: list[str], results: Path, name: str, gpus: float) -> SweepRun:
    """Run one sweep to its end and read its rows (exits, naming it, if the sweep fails)."""
    launched_at, start = time.time(), time.perf_counter()
    status = subprocess.run(command).returncode
    wall = time.perf_counter() - start
    if status:  # the sweep's own lines said why
        sys.exit(f"error: sweep {name!r} exited with status {status}: {shlex.join(command)}")
    trials = pd.read_parquet(results / name / "trials")
    return SweepRun(trials, launched_at, wall, gpus if gpus > 0 else 1.0,
                    epochs=pd.read_parquet(results / name / "epochs"))


def rungs(pruner_args: str) -> dict[str, int]:
    """--min-resource and --reduction-factor as the ASHA sweep gets them: read by ufw.sweep's
    own parser, so its defaults are the sweep's."""
    from ufw.sweep import build_parser

    known, _ = build_parser().parse_known_args(["space.yaml", *shlex.split(pruner_args)])
    return {"min_resource": known.min_resource, "reduction_factor": known.reduction_factor}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--space", type=Path, default=ROOT / "search_spaces" / "alpha_lr.yaml")
    parser.add_argument("--num-samples", type=int, default=4096)
    parser.add_argument("--cohort", default="256")
    parser.add_argument("--gpus", type=float, default=1.0, help="GPUs on this machine")
    parser.add_argument("--gpus-per-trial", type=float, default=1.0)
    parser.add_argument("--sampler-seed", type=int, default=0,
                        help="for a space that does not fix its sampler's seed")
    parser.add_argument("--sweep-args", default="", help="more flags for both sweeps")
    parser.add_argument("--pruner-args", default="",
                        help="more flags for the ASHA sweep only, e.g. --reduction-factor 3")
    parser.add_argument("--quick", action="store_true",
                        help="a tiny CPU run (16 configurations, 20k characters) to check this")
    parser.add_argument("--out", help="record name in bench/results")
    parser.add_argument("--runs", default="none,asha",
                        help="which sweeps to run here (none, asha, both, or '' for neither); "
                             "the others are "
                             "read from --runs-dir, where each run is also saved")
    parser.add_argument("--runs-dir", type=Path,
                        help="keep each run as <name>_trials.parquet + <name>_launch.json "
                             "here, so the two sweeps can run as separate jobs")
    argv = sys.argv[1:]
    args = parser.parse_args([*QUICK, "--gpus", "0", "--gpus-per-trial", "0", *argv]
                             if "--quick" in argv else argv)
    results = Path(tempfile.mkdtemp(prefix="ufw-ttt-"))
    space, seed = seeded_space(args.space, args.sampler_seed, results)
    common = [sys.executable, "-m", "ufw.sweep", str(space), "--num-samples",
              str(args.num_samples), "--cohort", args.cohort, "--seeds", "1",
              "--gpus-per-trial", str(args.gpus_per_trial), "--results", str(results),
              *reference_data_flags(), *shlex.split(args.sweep_args)]
    commands = {"none": [*common, "--name", "none", "--pruner", "none"],
                "asha": [*common, "--name", "asha", "--pruner", "asha",
                         *shlex.split(args.pruner_args)]}
    runs = {}
    for name in filter(None, args.runs.split(",")):
        runs[name] = run_sweep(commands[name], results, name, args.gpus)
        if args.runs_dir:
            save_run(runs[name], args.runs_dir, name)
    for name in set(commands) - set(runs):
        if args.runs_dir and (args.runs_dir / f"{name}_launch.json").exists():
            runs[name] = load_run(args.runs_dir, name)
    if len(runs) < 2:
        print(f"ran {', '.join(runs)}; compare once both runs are in --runs-dir")
        return
    record = {"device": device_label("cuda" if args.gpus else "cpu"), "gpus": args.gpus,
              "sampler_seed": seed, "num_samples": args.num_samples, "cohort": args.cohort,
              "gpu_seconds_counted_as": "wall seconds since the sweep's launch x GPUs given "
                                        "(1 for a CPU run)",
              **compare(runs["none"], runs["asha"], **rungs(args.pruner_args),
                        slots=max(1.0, args.gpus / args.gpus_per_trial)
                        if args.gpus_per_trial else 1.0),
              "sweep_commands": {k: " ".join(c[1:]) for k, c in commands.items()}}
    print(record)
    device = "cpu_quick" if args.quick else ("cuda" if args.gpus else "cpu")
    save(args.out or f"time_to_target_{device}.json", record)


if __name__ == "__main__":
    main()
