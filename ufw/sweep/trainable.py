"""`run_trial`: the Ray Tune function trainable that trains one trial's members.

Members that can share one model (the same shapes) train together as one population
(ufw.train.Population), kept by a Cohort (ufw/sweep/cohort.py). After each epoch a cohort
trial tells the sweep's study actor its results, and with a pruner reports each configuration's
objective and stops those the pruner stops; the slots of configurations that are done
(early-stopped, pruned) train new ones asked from the same actor. The trial reports to Ray
every epoch (or every --checkpoint-seconds) with a checkpoint, so that a retried or resumed
trial continues from its last epoch. A refilling trial's checkpoint reports carry the rows of
the configurations that ended since the last one (RowParts); its final report carries the
rest (every member's rows, for a trial that does not refill).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from typing import Any

import torch

from ufw import tensorfile
from ufw.config import ConfigError
from ufw.data import load_corpus
from ufw.sweep.cohort import Cohort
from ufw.sweep.members import (
    SPEC,
    TRIAL_TIMES,
    expand_members,
    failed_rows,
    objective_means,
    point_objectives,
    summary_metrics,
    sweep_columns,
    trial_numbers,
    trial_points,
)
from ufw.sweep.study_service import find_service

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
                 "final": True, "rows": json.dumps(rows), "epoch_rows": "[]"})


def _train_members(config: dict[str, Any]) -> None:
    import ray
    from ray import tune
    from ray.tune import Checkpoint

    from ufw.train import Population

    started = time.time()
    spec = config[SPEC]
    torch.set_num_threads(max(1, int(spec.get("cpus_per_trial", 1))))
    device, gpu = _device()
    context = ray.get_runtime_context()
    trial_id = tune.get_context().get_trial_id()
    extra = {**sweep_columns(spec), "trial_id": trial_id,
             "node": ray.util.get_node_ip_address(), "node_id": context.get_node_id(), "gpu": gpu,
             "resumed_from_epoch": 0,  # > 0: restarted from a checkpoint of that many epochs
             # where a trial's wall time goes (bench/sweep_throughput.py sums it up)
             **TRIAL_TIMES, "started_at": started}
    corpora: dict[tuple[int, int], Any] = {}

    def make_population(configs):
        c = configs[0]
        key = (c.batch_size, c.seq_len)
        if key not in corpora:
            corpora[key] = load_corpus(**spec["data"], batch_size=c.batch_size,
                                       seq_len=c.seq_len)
        return Population(configs, corpora[key], device, compile=spec.get("compile", False),
                          precision=spec.get("precision", "fp32"))

    cohort = Cohort(spec, make_population)
    numbers = trial_numbers(config)
    # Cohort trials reach the sweep's study actor (per-epoch pruning, tells, refills);
    # with one configuration per trial the study is Ray Tune's OptunaSearch's.
    service = find_service(spec["sweep"]) if any(n is not None for n in numbers) else None
    refilling = service is not None and spec.get("refill", False)  # plan.spec() says
    pruning = refilling and spec["pruning"]["pruner"] != "none"
    epoch_rows: list[dict[str, Any]] = []  # not yet sent to the driver
    parts = RowParts()
    refill = Refill(service, trial_id, extra)
    nothing_left = False  # the study has no configuration left for a refill
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            # safetensors + JSON: a checkpoint planted under <results> cannot run code here
            # (a damaged or foreign one fails the trial, with the reason, and is not retried).
            state = tensorfile.load(os.path.join(d, STATE_FILE), tensorfile.CHECKPOINT, device,
                                    what="checkpoint")
        cohort.load_state_dict(state["cohort"])
        epoch_rows, refill.exhausted = state["epoch_rows"], state["exhausted"]
        refill.spare = [tuple(p) for p in state["spare"]]
        parts.load_state_dict(state["parts"])
        # Retried (a failure, a lost node) or resumed: how many epochs the checkpoint held.
        extra["resumed_from_epoch"] = max((p.epoch for p in cohort.populations), default=0)
    else:
        cohort.add(trial_points(config), numbers)
    if service is not None:  # what it holds now; refills asked after its checkpoint: orphans
        held = [n for n in cohort.numbers if n is not None] + [n for n, _ in refill.spare]
        ray.get(service.hold.remote(trial_id, held))

    last_checkpoint = [time.monotonic()]
    report_rows = spec.get("report_rows", False)  # Ray Tune's scheduler may stop it any epoch

    def report(final: bool) -> None:
        """Report to Ray: every epoch, or with --checkpoint-seconds only when a checkpoint
        is due, and at the end. A function trainable's report waits until the driver has taken
        it, and checkpoints of big populations are costly."""
        start = time.monotonic()
        if not final and start - last_checkpoint[0] < spec.get("checkpoint_seconds", 0):
            return
        if final:
            extra["finished_at"] = time.time()
        values = [objective_means(spec, [cohort.row(m.index) for m in cohort.point_members(p)])
                  for p in range(len(cohort.points))]
        metrics: dict[str, Any] = {
            **summary_metrics(spec, values), "final": final,
            "epoch": max((p.epoch for p in cohort.populations), default=0),
            "configurations_ended": len(cohort.ended_at),
            "members_running": sum(cohort.status(m.index) == "running" for m in cohort.members)}
        if final or report_rows or refilling:
            # A refilling trial sends what ended since its last checkpoint with each one (the
            # driver writes it as part n), the rest at its end: rows reach Parquet as it runs.
            rows, epochs, number = parts.take(cohort.result_rows(extra), epoch_rows, final,
                                              everything=report_rows or not refilling)
            if rows or final:
                metrics.update(rows=json.dumps(rows), epoch_rows=json.dumps(epochs))
                if number is not None:
                    metrics["rows_part"] = number
        if final:  # no checkpoint: Ray would keep these rows with it in its experiment state
            tune.report(metrics)
            return
        last_checkpoint[0] = start
        with tempfile.TemporaryDirectory() as d:
            tensorfile.save(os.path.join(d, STATE_FILE),
                            {"cohort": cohort.state_dict(), "epoch_rows": epoch_rows,
                             "exhausted": refill.exhausted, "spare": refill.spare,
                             "parts": parts.state_dict()},
                            tensorfile.CHECKPOINT)
            tune.report(metrics, checkpoint=Checkpoint.from_directory(d))
        extra["report_seconds"] += time.monotonic() - start

    extra["setup_seconds"] = time.time() - started  # corpus, model, checkpoint loading
    extra["report_seconds"] = 0.0
    extra["study_seconds"] = 0.0  # waiting on the study actor: reports, tells, asks
    extra["trial_train_seconds"] = 0.0  # in its populations' epochs, all members together
    while True:
        trained = []
        if not cohort.finished:
            start = time.monotonic()
            rows = cohort.run_epoch()
            extra["trial_train_seconds"] += time.monotonic() - start
            for row in rows:
                row.update(sweep=spec["sweep"], trial_id=trial_id)
            epoch_rows.extend(rows)
            trained = sorted({cohort.members[r["member"]].point: r["epoch"] for r in rows}.items())
        if service is not None:
            if pruning and trained:
                reports = [(cohort.numbers[p], epoch, cohort.objective(p)) for p, epoch in trained]
                stopped = set(study_wait(service.report.remote(reports), extra))
                cohort.prune([p for p, _ in trained if cohort.numbers[p] in stopped])
            told = cohort.untold_values()
            if told:  # the study learns each result as soon as it is known
                study_wait(service.tell.remote([(cohort.numbers[p], v) for p, v in told.items()]),
                           extra)
                cohort.told.update(told)
            if refilling:  # freed slots train new configurations: the population keeps its size
                nothing_left = refill.fill(cohort)
        if cohort.finished and (nothing_left or not refilling):
            break
        report(final=False)
    report(final=True)
    if device == "cuda":
        torch.cuda.empty_cache()


class RowParts:
    """Which rows a refilling trial has sent to the driver, in numbered parts.

    Part n goes with checkpoint n: the rows of configurations that ended since part n - 1
    and the epoch rows since then. A trial restored from checkpoint n sends part n again, with
    what ended after it (the driver may have lost it, or written it: the same name is
    replaced), so that no row is lost or written twice."""

    def __init__(self) -> None:
        self.sent: set[int] = set()  # members whose rows are in a part
        self.number = 0  # of the next part
        self.last: dict[str, Any] | None = None  # the last part, sent again after a restore
        self.resend = self.last is not None

    def take(self, rows: list[dict[str, Any]], epoch_rows: list[dict[str, Any]], final: bool,
             everything: bool = False) -> tuple[list[dict], list[dict], int | None]:
        """(rows, epoch rows, part number) to send now; `epoch_rows` is emptied. Final: every
        row not sent yet. `everything`: all rows, unnumbered (trials that do not refill)."""
        if everything:
            return rows, list(epoch_rows), None
        new = [r for r in rows if r["member"] not in self.sent
               and (final or not math.isnan(r["ended_at"]))]
        epochs = list(epoch_rows)
        epoch_rows.clear()
        number = self.number
        if self.resend:
            new, epochs, number = self.last["rows"] + new, self.last["epochs"] + epochs, \
                self.last["number"]
        if not new and not final:  # nothing ended since the last part: keep the epoch rows
            epoch_rows.extend(epochs)
            return [], [], None
        self.sent.update(r["member"] for r in new)
        self.last = {"number": number, "rows": new, "epochs": epochs}
        self.number, self.resend = number + 1, False
        return new, epochs, number

    def state_dict(self) -> dict[str, Any]:
        return {"sent": sorted(self.sent), "number": self.number, "last": self.last}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sent, self.number, self.last = set(state["sent"]), state["number"], state["last"]
        self.resend = self.last is not None


class Refill:
    """New configurations for a trial's freed slots, asked from the study actor one epoch
    ahead: asking is slow in a large study (TPE: tens of ms per configuration after a few
    thousand), and a population waiting on it would leave its GPU idle. As many are asked
    for the next epoch as slots freed in this one; only a shortfall is asked and waited for.
    A configuration that fits no free slot (another shape) waits for one; once the trial's
    populations are all done, those still waiting train as populations of their own. The
    spare configurations are this trial's (they travel in its checkpoint)."""

    def __init__(self, service, holder: str, times: dict[str, Any]):
        self.service, self.holder, self.times = service, holder, times
        self.spare: list[tuple[int, dict[str, Any]]] = []  # (Optuna number, sampled values)
        self.asking = None  # (object ref, how many) of the ask for the next epoch
        self.exhausted = False

    def fill(self, cohort: Cohort) -> bool:
        """Refill `cohort`'s free slots; returns True once the study has nothing left."""
        import ray

        free = cohort.free_slots()
        if self.asking is not None and (free or self.exhausted
                                        or ray.wait([self.asking[0]], timeout=0)[0]):
            self._take(*self.asking)
            self.asking = None
        if len(self.spare) < len(free) and not self.exhausted:
            wanted = len(free) - len(self.spare)
            self._take(self.service.ask.remote(wanted, self.holder), wanted)
        if free and self.spare:  # a configuration that fits no free slot waits (Cohort.add)
            waiting = cohort.add([values for _, values in self.spare],
                                 [n for n, _ in self.spare], free)
            self.spare = [self.spare[i] for i in waiting]
        if self.spare and cohort.finished:  # none of this trial's populations can host them
            cohort.add([values for _, values in self.spare], [n for n, _ in self.spare])
            self.spare = []
        if free and self.asking is None and not self.exhausted and not self.spare:
            self.asking = (self.service.ask.remote(len(free), self.holder), len(free))
        return self.exhausted and not self.spare and self.asking is None

    def _take(self, ref, wanted: int) -> None:
        asked = [tuple(p) for p in study_wait(ref, self.times)]
        self.spare.extend(asked)
        self.exhausted = self.exhausted or len(asked) < wanted


def study_wait(ref, times: dict[str, Any]) -> Any:
    """The result of a call to the study actor; the time waited on it is added to
    times["study_seconds"]."""
    import ray

    start = time.monotonic()
    try:
        return ray.get(ref)
    finally:
        times["study_seconds"] += time.monotonic() - start


def trial_dirname(trial) -> str:
    return trial.trial_id
