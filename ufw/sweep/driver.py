"""Running a sweep: start (or join) Ray, build the Tune experiment, and at its end give
every trial its Parquet parts and print the best configurations."""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from pathlib import Path

from ufw import cli
from ufw.config import ConfigError
from ufw.rerun import rerun_command
from ufw.results import ResultsWriter, join, read_epochs, read_trials
from ufw.space import Objective, parameter_column
from ufw.study import journal_storage
from ufw.sweep import callback, out_of_space, searchers
from ufw.sweep.callback import error_line, unrecorded_failed_rows
from ufw.sweep.lock import SweepLock
from ufw.sweep.members import SPEC
from ufw.sweep.plan import (
    Plan,
    _check_resources,
    _concurrency,
    _save_plan,
    build_parser,
    can_restore,
    make_plan,
)
from ufw.sweep.repair import (
    drop_torn_journal_record,
    repair_experiment_state,
    set_aside_damaged_parts,
)
from ufw.sweep.searchers import DefineByRun
from ufw.sweep.study_service import start_service
from ufw.sweep.trainable import run_trial, trial_dirname


def _init_ray(plan: Plan) -> None:
    if not plan.address:
        # A local Ray serves this machine only. With this setting (Ray's own, meant for macOS
        # and Windows) its node address is loopback and its servers listen on 127.0.0.1
        # alone. Ray reads it on import; its processes inherit it from this environment.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    if ray.is_initialized():  # e.g. tests, notebooks: use the running instance
        return
    common = {"include_dashboard": False, "logging_level": logging.WARNING,
              "log_to_driver": False}
    if plan.address:
        try:
            ray.init(address=plan.address, **common)
        except (ConnectionError, ValueError, RuntimeError) as e:
            # Ray >= 2.59 turns token authentication on for clusters that `ray start` makes
            # on one machine; a driver without RAY_AUTH_MODE=token sends no token.
            hint = ("; if the cluster uses token authentication, set RAY_AUTH_MODE=token "
                    "(the token is read from ~/.ray/auth_token or RAY_AUTH_TOKEN)"
                    if not os.environ.get("RAY_AUTH_MODE") else "")
            raise ConfigError(f"--address {plan.address}: cannot connect to a Ray cluster "
                              f"({error_line(str(e))}){hint}") from None
    else:
        ray.init(address="local", num_cpus=os.cpu_count(), **common)


def _trainable(plan: Plan):
    from ray import tune

    resources = {"cpu": plan.cpus_per_trial}
    if plan.gpus_per_trial > 0:
        resources["gpu"] = plan.gpus_per_trial
    resources.update(plan.resources_per_trial)  # custom resources: one bundle with the rest
    return tune.with_resources(run_trial, resources)


def make_tuner(plan: Plan):
    import optuna
    from ray import tune
    from ray.tune import CheckpointConfig, FailureConfig, RunConfig

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = plan.space
    spec = plan.spec()
    objectives = space.objectives
    metric = [o.metric for o in objectives]
    mode = [o.mode for o in objectives]
    if len(objectives) == 1:
        metric, mode = metric[0], mode[0]
    if not plan.study_actor:
        storage = journal_storage(plan.study_file)  # kept beside the Parquet: ufw/study.py
        search = searchers.StudySearch(space=DefineByRun(space), metric=metric, mode=mode,
                                       sampler=space.make_sampler(), storage=storage,
                                       study_name=plan.name)
    else:  # explicit points are handed out by the cohort searcher (see SearchSpace.points)
        search = searchers.CohortSearcher(space, plan.name, plan.cohort)
    # max_concurrent_trials also sets how many trials Ray keeps pending (not just 1).
    concurrency = _concurrency(plan)
    sweep_callback = callback.SweepCallback(spec, plan.root, plan.num_trials)
    return tune.Tuner(
        _trainable(plan),
        param_space={SPEC: spec},
        tune_config=tune.TuneConfig(search_alg=search, num_samples=plan.num_trials,
                                    scheduler=ray_scheduler(plan, metric, mode),
                                    max_concurrent_trials=concurrency, reuse_actors=True,
                                    trial_dirname_creator=trial_dirname),
        run_config=RunConfig(name="ray", storage_path=plan.sweep_uri, verbose=0,
                             failure_config=FailureConfig(max_failures=2),
                             checkpoint_config=CheckpointConfig(num_to_keep=1),
                             callbacks=[sweep_callback]))


def ray_scheduler(plan: Plan, metric: str, mode: str):
    """Ray Tune's trial scheduler for --pruner with one configuration per trial (None: FIFO).
    Trials report every epoch's objective (the mean over seeds of the best so far)."""
    if not plan.ray_scheduler:
        return None
    from ray.tune.schedulers import ASHAScheduler, HyperBandScheduler, MedianStoppingRule

    p = plan.pruning
    common = {"time_attr": "epoch", "metric": metric, "mode": mode}
    if p["pruner"] == "asha":
        return ASHAScheduler(**common, max_t=p["max_resource"], grace_period=p["min_resource"],
                             reduction_factor=p["reduction_factor"])
    if p["pruner"] == "hyperband":
        return HyperBandScheduler(**common, max_t=p["max_resource"],
                                  reduction_factor=p["reduction_factor"])
    return MedianStoppingRule(**common, grace_period=p["min_resource"], min_samples_required=5)


def finalize(plan: Plan, grid, lock: SweepLock | None = None,
             budget_spent: bool = False) -> bool:
    """Give every trial of the experiment its parts, drop parts of unknown trials (only
    while this driver holds the sweep's lock).

    Returns whether the sweep is complete (every trial finished or failed).
    """
    spec = plan.spec()
    writer = ResultsWriter(plan.root, plan.name)
    written = writer.trial_ids()
    known, complete = set(), True
    for result in grid:
        trial_id = Path(str(result.path)).name
        known.add(trial_id)
        if trial_id in written:
            continue
        metrics = result.metrics or {}
        if "rows" in metrics:
            writer.write(trial_id, json.loads(metrics["rows"]),
                         json.loads(metrics.get("epoch_rows", "[]")), metrics.get("rows_part"))
        elif result.error is not None:
            writer.write(trial_id, unrecorded_failed_rows(
                writer, spec, trial_id, result.config or {SPEC: spec},
                error_line(str(result.error)), {"trial_id": trial_id}), [])
        else:
            complete = False
    if lock is not None and not lock.held():
        print(f"[{plan.name}] lost the sweep's lock to another driver: deleting nothing",
              file=sys.stderr, flush=True)
        return False
    for trial_id in writer.trials_with_parts() - known:
        writer.delete(trial_id)  # a trial the experiment forgot (driver killed before saving)
    writer.clean_temporary()
    # Refilled slots train more than a cohort per trial: fewer Ray trials may spend the budget.
    return complete and (len(known) >= plan.num_trials or budget_spent)


def pareto_front(table, objectives: list[Objective]) -> list[bool]:
    """Whether each row is on the Pareto front (no other row at least as good on every
    objective and better on one)."""
    signs = [1 if o.direction == "minimize" else -1 for o in objectives]
    points = [[s * float(v) for s, v in zip(signs, row)]
              for row in table[[o.metric for o in objectives]].itertuples(index=False)]
    front = []
    for p in points:
        dominated = any(all(a <= b for a, b in zip(q, p)) and any(a < b for a, b in zip(q, p))
                        for q in points)
        front.append(not dominated and all(math.isfinite(v) for v in p))
    return front


def summary(plan: Plan, top: int = 10) -> str:
    import pandas as pd

    frame = read_trials(plan.sweep_uri)
    epochs = read_epochs(plan.sweep_uri)
    lines = []
    objectives = plan.space.objectives
    if len(frame):
        # only finished configurations are ranked: a pruned row's metrics are those of a
        # partly trained model (the Rows line below still counts pruned and failed rows)
        ok = frame[frame["status"] == "completed"]
        params = [c for c in (parameter_column(p.name) for p in plan.space.parameters)
                  if c and c in frame]
        metrics = [o.metric for o in objectives]
        extra = [m for m in ("best_ppl", "compute_cost", "acc") if m not in metrics]
        if len(ok):
            grouped = ok.groupby("config_id", dropna=False, sort=False)
            table = grouped[[*metrics, *extra]].mean()
            table["seeds"] = grouped.size()
            for p in params:
                table[p] = grouped[p].first()
            if len(objectives) > 1:
                table.insert(0, "pareto", pareto_front(table, objectives))
            table = table.sort_values(metrics[0], ascending=objectives[0].direction ==
                                      "minimize").head(top).reset_index()
            title = " and ".join(f"{o.metric} ({o.direction})" for o in objectives)
            lines.append(f"Top {len(table)} configurations by {metrics[0]}"
                         f"{' (mean over seeds)' if plan.seeds > 1 else ''}"
                         f"{'; pareto: not dominated on ' + title if len(objectives) > 1 else ''}"
                         ":")
            with pd.option_context("display.width", 160, "display.max_columns", 30,
                                   "display.float_format", "{:.4g}".format):
                lines.append(table.to_string(index=False))
            best = table["config_id"].iloc[0]
            on_gpu = (ok.loc[ok["config_id"] == best, "device"] != "cpu").any()
            lines.append("Re-train the best configuration: "
                         + rerun_command(plan.sweep_uri, best, device="cuda" if on_gpu else None))
        counts = frame["status"].value_counts().to_dict()
        lines.append("Rows: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
    lines.append(f"Parquet: {join(plan.sweep_uri, 'trials')} ({len(frame)} rows), "
                 f"{join(plan.sweep_uri, 'epochs')} ({len(epochs)} rows)")
    return "\n".join(lines)


class _QuietTune(logging.Filter):
    """Drop Tune's end-of-run list of failed trials: the progress lines reported each one."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Trials did not complete")


def _quiet_ray_logs() -> None:
    for name in ("ray.tune", "ray.train"):
        logging.getLogger(name).setLevel(logging.ERROR)
    tune_logger = logging.getLogger("ray.tune.tune")
    if not any(isinstance(f, _QuietTune) for f in tune_logger.filters):
        tune_logger.addFilter(_QuietTune())


def run(plan: Plan) -> int:
    lock = SweepLock(plan.sweep_uri)
    with cli.user_errors():
        lock.acquire()  # also the first write under --results: unwritable fails here
    try:
        return _run_locked(plan, lock)
    except KeyboardInterrupt:  # Ctrl-C before Tune runs (during Ray's start); Tune handles
        # it itself while trials run, and the summary then says how to resume
        if can_restore(plan.experiment_path):
            how = f"continue it with: {resume_command(plan)}"
        else:  # a new sweep: Tune has not saved anything to resume from
            how = "no trial had started; run the same command again to start it"
        print(f"[{plan.name}] interrupted; {how}", file=sys.stderr, flush=True)
        return 130
    except Exception as e:
        why = out_of_space.reason(e)
        if not why:
            raise
        stopped = out_of_space.find(e)
        what = stopped.what if stopped else f"under {plan.sweep_uri}"
        print(f"[{plan.name}] out of space: cannot write {what} ({why}); everything "
              f"written before is intact: free space and resume with: {resume_command(plan)}",
              file=sys.stderr, flush=True)
        return 1
    finally:
        lock.release()


def resume_command(plan: Plan) -> str:
    return (f"python -m ufw.sweep {plan.space_path} --resume --name {plan.name} "
            f"--results {plan.root}")


def _run_locked(plan: Plan, lock: SweepLock) -> int:
    with cli.user_errors():  # before Ray starts
        if not plan.resume:  # a full or unwritable disk stops it here
            _save_plan(plan)
        elif repaired := repair_experiment_state(plan.experiment_path):
            print(f"[{plan.name}] {repaired}", file=sys.stderr, flush=True)
    with cli.user_errors():
        _init_ray(plan)  # first of what touches Ray: it sets what Ray reads when imported
        _check_resources(plan)
    from ray import tune

    _quiet_ray_logs()
    if plan.resume:
        print(f"[{plan.name}] resuming {plan.experiment_path}", flush=True)
        damaged = set_aside_damaged_parts(plan.root, plan.name, plan.experiment_path)
        for part, what in damaged.items():
            print(f"[{plan.name}] trial {part.split('.')[0]}: damaged part ({what}); set "
                  f"aside as _damaged-part-{part}.parquet", file=sys.stderr, flush=True)
        if drop_torn_journal_record(plan.study_file):
            print(f"[{plan.name}] {plan.study_file}: dropped its last record, cut short",
                  file=sys.stderr, flush=True)
        tuner = tune.Tuner.restore(plan.experiment_path, trainable=_trainable(plan),
                                   resume_errored=True)
    else:
        at_most = "at most " if plan.refill else ""  # refills spend the budget too
        print(f"[{plan.name}] {plan.num_samples} configurations x {plan.seeds} seed(s), "
              f"cohort {plan.cohort} -> {at_most}{plan.num_trials} trials; results in "
              f"{plan.sweep_uri}",
              flush=True)
        if plan.address and plan.study_actor and not plan.max_concurrent and plan.num_trials > 1:
            print(f"[{plan.name}] note: with --address and no --max-concurrent all "
                  f"{plan.num_trials} trials are submitted at once, each with its cohort: "
                  f"Optuna samples every configuration before any result, and none is left to "
                  f"refill freed slots with; --max-concurrent N (the trials the cluster runs "
                  f"at once) lets it learn as it goes", file=sys.stderr, flush=True)
        tuner = make_tuner(plan)
    service = None
    if plan.study_actor:  # the study, where every trial reaches it
        service = start_service(plan.spec(), plan.space.to_dict(), plan.study_file,
                                plan.num_samples, plan.resume)
    print(f"[{plan.name}] Optuna study: optuna-dashboard {plan.study_file}", flush=True)
    grid = tuner.fit()
    budget_spent = False
    if service is not None:
        import ray

        budget_spent = ray.get(service.remaining.remote()) <= 0
        busy = ray.get(service.load.remote())
        if sum(seconds for _, seconds in busy.values()) >= 1.0:  # else not worth a line
            print(f"[{plan.name}] study actor, time per phase: " + "; ".join(
                f"{phase}: {calls} calls, {seconds:.1f} s" for phase, (calls, seconds)
                in busy.items()), file=sys.stderr, flush=True)
    complete = finalize(plan, grid, lock, budget_spent)
    if complete and service is not None:
        ray.get(service.finish.remote())  # nothing left open in the study
    print(summary(plan), flush=True)
    if not complete:
        print(f"[{plan.name}] the sweep did not finish; continue it with: "
              f"{resume_command(plan)}", flush=True)
        return 1
    return failure_status(plan)


def failure_status(plan: Plan) -> int:
    """0 unless rows failed: a line saying how many (stderr) and 1 if all of them did."""
    trials = read_trials(plan.sweep_uri)
    failed = trials[trials["status"] == "failed"] if len(trials) else trials
    if not len(failed):
        return 0
    first = failed["error"].dropna()
    reason = f" (first error: {first.iloc[0]})" if len(first) else ""
    if len(failed) == len(trials):
        print(f"[{plan.name}] every row failed: {len(failed)} of {len(trials)}{reason}",
              file=sys.stderr, flush=True)
        return 1
    print(f"[{plan.name}] {len(failed)} of {len(trials)} rows failed{reason}",
          file=sys.stderr, flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with cli.user_errors():
        plan = make_plan(args)
    return run(plan)
