"""`run_trial`: the Ray Tune function trainable that trains one trial's members.

Members that can share one model (the same shapes) train together as one population
(ufw.train.Population); the trial reports every epoch (or every --checkpoint-seconds) with a
checkpoint of its populations, so that a retried or resumed trial continues from its last
epoch, and its final report carries every member's rows.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from typing import Any

import torch

from ufw import tensorfile
from ufw.config import ConfigError
from ufw.data import load_corpus
from ufw.sweep.members import (
    SPEC,
    TRIAL_TIMES,
    Member,
    expand_members,
    failed_rows,
    point_objectives,
    summary_metrics,
    sweep_columns,
    trial_points,
)

HEAVY_KEYS = ("rows", "epoch_rows")  # final-result keys the driver removes once written
STATE_FILE = "population.safetensors"


def _device() -> tuple[str, str | None]:
    import ray

    gpu_ids = ",".join(str(g) for g in ray.get_gpu_ids()) or None  # what Ray assigned
    return ("cuda" if gpu_ids and torch.cuda.is_available() else "cpu"), gpu_ids


def run_trial(config: dict[str, Any]) -> None:
    """Ray Tune function trainable: train the trial's members epoch by epoch, report, resume.

    A ConfigError (a teacher or checkpoint that is not a ufw file, a population too large for
    the device) would fail every retry alike: the trial ends at once, its members recorded
    as failed with the error, instead of raising for Ray Tune to retry.
    """
    try:
        _train_members(config)
    except ConfigError as e:
        _report_failed(config, str(e))


def _report_failed(config: dict[str, Any], error: str) -> None:
    import ray
    from ray import tune

    spec = config[SPEC]
    members = expand_members(spec, trial_points(config))
    rows = failed_rows(spec, members, error, {
        "trial_id": tune.get_context().get_trial_id(), "node": ray.util.get_node_ip_address(),
        "node_id": ray.get_runtime_context().get_node_id(), "finished_at": time.time()})
    values = point_objectives(spec, members, rows)
    tune.report({**summary_metrics(spec, values), "epoch": 0, "members_running": 0,
                 "rows": json.dumps(rows), "epoch_rows": "[]",
                 "objective_values": json.dumps(values)})


def _train_members(config: dict[str, Any]) -> None:
    import ray
    from ray import tune
    from ray.tune import Checkpoint

    from ufw.train import Population

    started = time.time()
    spec = config[SPEC]
    torch.set_num_threads(max(1, int(spec.get("cpus_per_trial", 1))))
    members = expand_members(spec, trial_points(config))
    device, gpu = _device()
    context = ray.get_runtime_context()
    extra = {**sweep_columns(spec), "trial_id": tune.get_context().get_trial_id(),
             "node": ray.util.get_node_ip_address(), "node_id": context.get_node_id(), "gpu": gpu,
             "resumed_from_epoch": 0,  # > 0: restarted from a checkpoint of that many epochs
             # where a trial's wall time goes (bench/sweep_throughput.py sums it up)
             **TRIAL_TIMES, "started_at": started}
    trainable = [m for m in members if m.config is not None]
    groups: dict[tuple, list[Member]] = {}
    for m in trainable:  # members that can share one model (same shapes) train together
        groups.setdefault(m.config.shape_key, []).append(m)
    groups_list = list(groups.values())
    corpora: dict[tuple[int, int], Any] = {}
    populations = []
    for group in groups_list:
        c = group[0].config
        key = (c.batch_size, c.seq_len)
        if key not in corpora:
            corpora[key] = load_corpus(**spec["data"], batch_size=c.batch_size, seq_len=c.seq_len)
        populations.append(Population([m.config for m in group], corpora[key], device,
                                      compile=spec.get("compile", False),
                                      precision=spec.get("precision", "fp32")))

    epoch_rows: list[dict[str, Any]] = []
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            # safetensors + JSON: a checkpoint planted under <results> cannot run code here
            # (a damaged or foreign one fails the trial, with the reason, and is not retried).
            state = tensorfile.load(os.path.join(d, STATE_FILE), tensorfile.CHECKPOINT, device,
                                    what="checkpoint")
        for population, saved in zip(populations, state["populations"]):
            population.load_state_dict(saved)
        epoch_rows = state["epoch_rows"]
        # Retried (a failure, a lost node) or resumed: how many epochs the checkpoint held.
        extra["resumed_from_epoch"] = max((p.epoch for p in populations), default=0)

    def result_rows() -> list[dict[str, Any]]:
        by_index: dict[int, dict[str, Any]] = {}
        for group, population in zip(groups_list, populations):
            for m, row in zip(group, population.results()):
                row.update(member=m.index, cohort_size=len(members), preset=m.preset, **extra)
                row["torch_version"] = str(row.get("torch_version"))
                by_index[m.index] = row
        failed = failed_rows(spec, [m for m in members if m.config is None], "", extra)
        for m, row in zip([m for m in members if m.config is None], failed):
            row["cohort_size"] = len(members)
            by_index[m.index] = row
        return [by_index[i] for i in range(len(members))]

    last_checkpoint = [time.monotonic()]

    def report(final: bool) -> None:
        """Report to Ray: every epoch, or with --checkpoint-seconds only when a checkpoint
        is due, and at the end. A function trainable's report waits until the driver has taken
        it, and checkpoints of big populations are costly."""
        start = time.monotonic()
        if not final and start - last_checkpoint[0] < spec.get("checkpoint_seconds", 0):
            return
        if final:
            extra["finished_at"] = time.time()
        rows = result_rows()
        values = point_objectives(spec, members, rows)
        metrics: dict[str, Any] = {
            **summary_metrics(spec, values),
            "epoch": max((p.epoch for p in populations), default=0),
            "members_running": sum(m.status == "running" for p in populations
                                   for m in p.members)}
        if final:  # no checkpoint: Ray would keep these rows with it in its experiment state
            metrics.update(rows=json.dumps(rows), epoch_rows=json.dumps(epoch_rows),
                           objective_values=json.dumps(values))
            tune.report(metrics)
            return
        last_checkpoint[0] = start
        with tempfile.TemporaryDirectory() as d:
            tensorfile.save(os.path.join(d, STATE_FILE),
                            {"populations": [p.state_dict() for p in populations],
                             "epoch_rows": epoch_rows}, tensorfile.CHECKPOINT)
            tune.report(metrics, checkpoint=Checkpoint.from_directory(d))
        extra["report_seconds"] += time.monotonic() - start

    extra["setup_seconds"] = time.time() - started  # corpus, model, checkpoint loading
    extra["report_seconds"] = 0.0
    trained = False
    while not all(p.finished for p in populations):
        for group, population in zip(groups_list, populations):
            if population.finished:
                continue
            for row in population.run_epoch():
                m = group[row["member"]]
                row.update(member=m.index, seed=m.config.seed, config_id=m.config.config_id,
                           sweep=spec["sweep"], trial_id=extra["trial_id"])
                epoch_rows.append(row)
        trained = True
        report(final=all(p.finished for p in populations))
    if not trained:  # restored after the last epoch, or nothing could be trained
        report(final=True)
    if device == "cuda":
        torch.cuda.empty_cache()


def trial_dirname(trial) -> str:
    return trial.trial_id
