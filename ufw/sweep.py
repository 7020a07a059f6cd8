"""`python -m ufw.sweep SPACE.yaml`: a hyperparameter sweep on Ray Tune + Optuna into Parquet.

The driver validates the search space (ufw.space) before Ray starts, then runs one Ray Tune
experiment whose trials each train a *population*: the `seeds` replicates of one sampled
configuration (cohort 1, sampled by Ray Tune's OptunaSearch with a define-by-run function),
or `cohort` sampled configurations x seeds (a `CohortSearcher` asks an Optuna study for
`cohort` points per trial and tells it every point's result). Trials report every epoch with
a checkpoint of the population, so a retried trial, or a resumed sweep, continues from its
last epoch. When a trial ends, the driver (a Tune callback, `SweepCallback`) writes its rows
as Parquet parts (ufw.results) and prints a progress line; at the end it prints the best
configurations and where the files are.

Layout of `<results>/<name>/`: `trials/` and `epochs/` (Parquet parts), `ray/` (Ray Tune's
experiment: checkpoints, searcher state), `sweep.json` (what was run).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import sys
import tempfile
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Ray reads these when it is imported or when a run starts: quiet, driver-written results.
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")  # no result.json/CSV/TB
os.environ.setdefault("TUNE_PRINT_ALL_TRIAL_ERRORS", "0")  # the progress line says it
os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "5")  # experiment state: often, it is small
os.environ.setdefault("RAY_DEDUP_LOGS", "1")

# Ray and Optuna are imported where they are used: a bad space fails fast, before loading them.
import torch

import ufw
from ufw import cli
from ufw.config import ConfigError, UniversalConfig
from ufw.data import load_corpus
from ufw.results import EMPTY_METRICS, ResultsWriter, join, read_epochs, read_trials
from ufw.space import (
    Objective,
    SearchSpace,
    as_number,
    build_config,
    is_numeric_key,
    knob_name,
    load_space,
    space_from_dict,
)
from ufw.train import PRECISIONS, members_that_fit

# Unix times of a trial's start and end, its set-up before the first epoch, and the time it
# waited on Ray for its progress reports and checkpoints (NaN: unknown).
TRIAL_TIMES = {"started_at": math.nan, "finished_at": math.nan, "setup_seconds": math.nan,
               "report_seconds": math.nan}
SPEC = "ufw"  # the trial config's key for everything that is not a sampled value
MEMBERS = "members"  # cohort trials: the list of sampled points
HEAVY_KEYS = ("rows", "epoch_rows")  # final-result keys the driver removes once written
STATE_FILE = "population.pt"


# ====================================================================== the trainable
@dataclass
class Member:
    index: int  # position in the trial (0 .. points*seeds - 1)
    point: int  # which sampled configuration
    config: UniversalConfig | None
    preset: str | None
    params: dict[str, Any]
    error: str = ""  # a configuration that could not even be built


def trial_points(config: dict[str, Any]) -> list[dict[str, Any]]:
    """The sampled configurations of one Ray trial (cohort: a list; cohort 1: the config)."""
    if MEMBERS in config:
        return [dict(p) for p in config[MEMBERS]]
    return [{k: v for k, v in config.items() if k != SPEC}]


def expand_members(spec: dict[str, Any], points: list[dict[str, Any]]) -> list[Member]:
    members: list[Member] = []
    seeds = spec["seeds"]
    for i, params in enumerate(points):
        try:
            config, preset_name = build_config(spec["fixed"], params, spec["overrides"])
        except ConfigError as e:
            for _ in range(seeds):
                members.append(Member(len(members), i, None, params.get("preset"), params,
                                      f"invalid configuration: {e}"))
            continue
        for s in range(seeds):
            members.append(Member(len(members), i, dataclasses.replace(config,
                                                                          seed=config.seed + s),
                                  preset_name, params))
    return members


def column_of(name: str) -> str | None:
    """The Parquet column of a parameter name (None: it has no column of its own)."""
    head, dot, rest = name.partition(".")
    if not dot:
        return name
    return {"layer_weights": f"layer_weight_{rest}", "layer_lr_scales": f"lr_scale_{rest}"}.get(
        head)


def failed_rows(spec: dict[str, Any], members: list[Member], error: str,
                extra: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Rows for members that never trained: their configuration, NaN metrics, the error."""
    rows = []
    for m in members:
        if m.config is not None:
            row = m.config.flat()
        else:  # not even a configuration: the sampled values under their column names
            row = {column_of(k): v for k, v in m.params.items() if column_of(k)}
            row["config_id"] = None
        row.update(member=m.index, cohort_size=len(members), **EMPTY_METRICS,
                   status="failed", error=m.error or error, ufw_version=ufw.__version__,
                   torch_version=str(torch.__version__), device=None,
                   dataset=spec.get("dataset"))
        row.update(sweep=spec["sweep"], trial_id=None, preset=m.preset,
                   seed=m.config.seed if m.config else None, node=None, node_id=None, gpu=None,
                   resumed_from_epoch=0, **TRIAL_TIMES)
        row.update(extra or {})
        rows.append(row)
    return rows


def point_objectives(spec: dict[str, Any], members: list[Member],
                     rows: list[dict[str, Any]]) -> list[list[float] | None]:
    """Per sampled point: each objective's mean over its seeds (None: no seed has a value)."""
    objectives = [Objective(*o) for o in spec["objectives"]]
    by_point: dict[int, list[dict]] = defaultdict(list)
    for m, row in zip(members, rows):
        if row.get("status") != "failed":
            by_point[m.point].append(row)
    values: list[list[float] | None] = []
    for point in range(max(m.point for m in members) + 1):
        result = []
        for o in objectives:
            finite = [float(r[o.metric]) for r in by_point.get(point, [])
                      if r.get(o.metric) is not None and math.isfinite(float(r[o.metric]))]
            result.append(sum(finite) / len(finite) if finite else None)
        values.append(None if any(v is None for v in result) else result)
    return values


def summary_metrics(spec: dict[str, Any], values: list[list[float] | None]) -> dict[str, float]:
    """What Ray Tune sees: each objective's best point (the worst value if none finished)."""
    metrics = {}
    for j, (metric, direction) in enumerate(spec["objectives"]):
        o = Objective(metric, direction)
        finite = [v[j] for v in values if v is not None]
        best = min if direction == "minimize" else max
        metrics[metric] = best(finite) if finite else o.worst()
    return metrics


def _device() -> tuple[str, str | None]:
    import ray

    gpu_ids = ",".join(str(g) for g in ray.get_gpu_ids()) or None  # what Ray assigned
    return ("cuda" if gpu_ids and torch.cuda.is_available() else "cpu"), gpu_ids


def run_trial(config: dict[str, Any]) -> None:
    """Ray Tune function trainable: train the trial's members epoch by epoch, report, resume."""
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
    extra = {"sweep": spec["sweep"], "trial_id": tune.get_context().get_trial_id(),
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
            state = torch.load(os.path.join(d, STATE_FILE), map_location=device,
                               weights_only=False)
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
            torch.save({"populations": [p.state_dict() for p in populations],
                        "epoch_rows": epoch_rows}, os.path.join(d, STATE_FILE))
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


# ====================================================================== searchers
class DefineByRun:
    """Ray Tune OptunaSearch's define-by-run function: picklable (a small class)."""

    def __init__(self, space: SearchSpace):
        self.space = space

    def __call__(self, trial) -> None:
        self.space.sample(trial)


class _CohortSearcher:
    """Asks an Optuna study for `cohort` configurations per Ray trial; tells it each result.

    Asking is slow once a study is large (TPE refits its estimators for every parameter of
    every configuration: seconds per cohort after a thousand trials), and the driver thread
    that would wait for it also serves every running trial's reports. So cohorts are asked on
    a background thread, and the next one as soon as one is handed out: a slot that frees up
    gets its trial at once (and Ray Tune reuses the actor, CUDA context and compiled code
    that the finished trial leaves; it keeps only one such actor while no trial waits). The
    price: a cohort is sampled without the results of the trials running when it was asked,
    as if one more trial ran at once. `suggest` returns None (Tune asks again shortly) while
    a cohort is still being asked.

    Picklable (the Optuna study lives in memory), so `Tuner.restore` continues the same study.
    `CohortSearcher` is this on top of ray.tune.search.Searcher (see `__getattr__` below).
    """

    def __init__(self, space: SearchSpace, num_samples: int, cohort: int):
        metrics = [o.metric for o in space.objectives]
        modes = [o.mode for o in space.objectives]
        super().__init__(metric=metrics if len(metrics) > 1 else metrics[0],
                         mode=modes if len(modes) > 1 else modes[0])
        self.space = space
        self.num_samples = num_samples
        self.cohort = cohort
        self.study = space.create_study()
        self.asked = 0
        self.pending: dict[str, list[int]] = {}  # Ray trial id -> Optuna trial numbers
        # the next cohort: its points and their Optuna trial numbers, once asked
        self.ready: tuple[list[dict], list[int]] | None = None
        self._asking: threading.Thread | None = None
        self._error: BaseException | None = None

    def _start_asking(self) -> None:
        size = min(self.cohort, self.num_samples - self.asked)
        self.asked += size
        self._asking = threading.Thread(target=self._ask, args=(size,), daemon=True,
                                        name="ufw-cohort-ask")
        self._asking.start()

    def suggest(self, trial_id: str) -> dict | None:
        if trial_id in self.pending:  # asked again for the same trial: the same points
            trials = self.study.get_trials(deepcopy=False)
            return {MEMBERS: [trials[n].params for n in self.pending[trial_id]]}
        if self.ready is None and self._asking is None:
            if self.asked >= self.num_samples:
                return "FINISHED"  # Searcher.FINISHED
            self._start_asking()
            self._wait_for_ask(0.05)  # a small study answers at once: no need to come back
        elif self._asking is not None:
            self._wait_for_ask(0.0)
        if self.ready is None or self._asking is not None:
            return None
        (points, self.pending[trial_id]), self.ready = self.ready, None
        if self.asked < self.num_samples:
            self._start_asking()  # the next cohort, ready when a slot frees up
        return {MEMBERS: points}

    def _wait_for_ask(self, seconds: float | None) -> None:
        """Wait up to `seconds` (None: until done) for the cohort being asked."""
        self._asking.join(seconds)
        if self._asking.is_alive():
            return
        self._asking = None
        if self._error is not None:  # a sampler error: the sweep cannot go on
            error, self._error = self._error, None
            raise error

    def _ask(self, size: int) -> None:
        try:
            points, numbers = [], []
            for _ in range(size):
                trial = self.study.ask()
                points.append(self.space.sample(trial))
                numbers.append(trial.number)
            self.ready = points, numbers
        except BaseException as e:
            self._error = e

    def on_trial_complete(self, trial_id: str, result: dict | None = None,
                          error: bool = False) -> None:
        import optuna

        numbers = self.pending.pop(trial_id, None)
        if numbers is None:
            return
        values = None
        if result and not error and "objective_values" in result:
            values = json.loads(result["objective_values"])
        for i, number in enumerate(numbers):
            point = values[i] if values is not None and i < len(values) else None
            if point is None:
                self.study.tell(number, state=optuna.trial.TrialState.FAIL)
            else:
                self.study.tell(number, point if len(point) > 1 else point[0])

    def __getstate__(self) -> dict[str, Any]:
        """The state without the asking thread: an ask in flight is finished first."""
        if self._asking is not None:
            self._wait_for_ask(None)
        return {k: v for k, v in self.__dict__.items() if k != "_asking"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _asking=None)

    def save(self, checkpoint_path: str) -> None:
        import pickle

        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.__getstate__(), f)

    def restore(self, checkpoint_path: str) -> None:
        import pickle

        with open(checkpoint_path, "rb") as f:
            self.__setstate__(pickle.load(f))


# ====================================================================== driver callback
def _fmt_seconds(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def trial_error(trial) -> str:
    """The last line of a trial's latest error (the exception and its message)."""
    text = None
    try:
        if trial.error_file and os.path.exists(trial.error_file):
            with open(trial.error_file) as f:
                text = f.read()
        else:
            text = trial.get_error()
    except Exception:
        pass
    return _error_line(text)


def _error_line(text: str | None) -> str:
    lines = [line.strip() for line in (text or "").strip().splitlines() if line.strip()]
    return lines[-1] if lines else "trial failed"


class _SweepCallback:
    """Writes each finished trial's Parquet parts (driver side) and prints progress.

    `SweepCallback` is this on top of ray.tune.Callback (see `__getattr__` below).
    """

    def __init__(self, spec: dict[str, Any], root: str, total_trials: int):
        self.spec, self.root, self.total = spec, root, total_trials
        self.writer = ResultsWriter(root, spec["sweep"])
        self._start = time.time()
        self._finished: set[str] = set()
        self._finished_now = 0
        self._best: float | None = None

    def setup(self, **info) -> None:
        self._start = time.time()
        self._finished = set(self.writer.trial_ids())
        self._finished_now = 0
        metric, direction = self.spec["objectives"][0]
        try:
            frame = read_trials(join(self.root, self.spec["sweep"]))
            if len(frame) and metric in frame:
                values = frame[metric].dropna()
                values = values[values.abs() != math.inf]
                if len(values):
                    self._best = float(values.min() if direction == "minimize" else values.max())
        except Exception:  # progress is best effort: never stop a sweep for it
            pass

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        result = trial.last_result or {}
        if "rows" in result:
            rows = json.loads(result["rows"])
            epoch_rows = json.loads(result.get("epoch_rows", "[]"))
            error = None
        else:
            members = expand_members(self.spec, trial_points(trial.config))
            rows = failed_rows(self.spec, members, "trial ended without a final result",
                               {"trial_id": trial.trial_id})
            epoch_rows, error = [], "ended without a final result"
        self._write(trial, rows, epoch_rows, error)

    def on_trial_recover(self, iteration, trials, trial, **info) -> None:
        print(f"[{self.spec['sweep']}] trial {trial.trial_id} raised "
              f"({trial_error(trial)}); retrying from its last checkpoint",
              flush=True)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        error = trial_error(trial)
        members = expand_members(self.spec, trial_points(trial.config))
        location = getattr(getattr(trial, "temporary_state", None), "location", None)
        extra = {"trial_id": trial.trial_id, "node": getattr(location, "hostname", None)}
        self._write(trial, failed_rows(self.spec, members, error, extra), [], error)

    def _write(self, trial, rows, epoch_rows, error: str | None) -> None:
        self.writer.write(trial.trial_id, rows, epoch_rows)
        # The parts hold the rows now: keep Ray's experiment state small.
        with contextlib.suppress(Exception):
            trial.run_metadata.last_result = {k: v for k, v in trial.last_result.items()
                                              if k not in HEAVY_KEYS}
        self._finished.add(trial.trial_id)
        self._finished_now += 1
        self._progress(trial.trial_id, rows, error)

    def _progress(self, trial_id: str, rows: list[dict], error: str | None) -> None:
        metric, direction = self.spec["objectives"][0]
        better = min if direction == "minimize" else max
        values = [float(r[metric]) for r in rows if r.get(metric) is not None
                  and r.get("status") != "failed" and math.isfinite(float(r[metric]))]
        if values:
            trial_best = better(values)
            self._best = trial_best if self._best is None else better(self._best, trial_best)
        done = min(len(self._finished), self.total)
        elapsed = time.time() - self._start
        remaining = max(0, self.total - done)
        eta = elapsed / self._finished_now * remaining if self._finished_now else math.nan
        failed = [r for r in rows if r.get("status") == "failed"]
        if error:
            what = f"failed: {error}"
        elif values:
            what = f"{metric} {better(values):.4g}"
            if failed:
                what += f" ({len(failed)}/{len(rows)} members failed: {failed[0].get('error')})"
        else:
            what = f"failed: {failed[0].get('error') if failed else 'no finite result'}"
        best = f"{self._best:.4g}" if self._best is not None else "-"
        eta_text = _fmt_seconds(eta) if math.isfinite(eta) else "?"
        print(f"[{self.spec['sweep']}] trials {done}/{self.total} | {trial_id} {what} | "
              f"best so far {best} | elapsed {_fmt_seconds(elapsed)} | ETA {eta_text}",
              flush=True)


_RAY_CLASSES = {"CohortSearcher": ("_CohortSearcher", "ray.tune.search", "Searcher"),
                "SweepCallback": ("_SweepCallback", "ray.tune", "Callback")}


def __getattr__(name: str):
    """`CohortSearcher` and `SweepCallback`, made on first use (also when unpickled).

    They subclass Ray's Searcher and Callback; building them lazily keeps `import ufw.sweep`
    (and so every bad-input error) free of Ray's import time. They pickle by reference as
    `ufw.sweep.CohortSearcher` / `ufw.sweep.SweepCallback`.
    """
    if name in _RAY_CLASSES:
        import importlib

        impl, module, base = _RAY_CLASSES[name]
        base_class = getattr(importlib.import_module(module), base)
        cls = type(name, (globals()[impl], base_class), {"__module__": __name__,
                                                         "__qualname__": name,
                                                         "__doc__": globals()[impl].__doc__})
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _ray_class(name: str):
    return globals().get(name) or __getattr__(name)


# ====================================================================== planning (no Ray)
@dataclass
class Plan:
    space: SearchSpace
    space_path: str
    name: str
    root: str  # results root: a directory or a URI
    num_samples: int
    cohort: int
    seeds: int
    max_concurrent: int | None
    cpus_per_trial: float
    gpus_per_trial: float
    overrides: dict[str, Any]
    data: dict[str, Any]
    dataset: str
    resume: bool
    address: str | None
    resources_per_trial: dict[str, float] = dataclasses.field(default_factory=dict)
    precision: str = "fp32"
    compile: bool = False
    checkpoint_seconds: float = 0.0

    @property
    def sweep_uri(self) -> str:
        return join(self.root, self.name)

    @property
    def experiment_path(self) -> str:
        return join(self.sweep_uri, "ray")

    @property
    def num_trials(self) -> int:
        return -(-self.num_samples // self.cohort)

    def spec(self) -> dict[str, Any]:
        """What every trial needs (it travels in the trial config)."""
        return {"sweep": self.name, "fixed": self.space.fixed, "overrides": self.overrides,
                "seeds": self.seeds, "data": self.data, "dataset": self.dataset,
                "objectives": [[o.metric, o.direction] for o in self.space.objectives],
                "cpus_per_trial": self.cpus_per_trial, "precision": self.precision,
                "compile": self.compile, "checkpoint_seconds": self.checkpoint_seconds}


def build_parser() -> cli.ArgumentParser:
    p = cli.parser("python -m ufw.sweep",
                   "Sweep early-exit training hyperparameters with Ray Tune + Optuna; "
                   "results go to Parquet (see docs/sweep.md).")
    p.add_argument("space", metavar="SPACE", help="search space YAML (search_spaces/*.yaml)")
    p.add_argument("--num-samples", type=int, help="configurations to sample")
    p.add_argument("--cohort", type=_cohort,
                   help="configurations trained together as one population per Ray trial, "
                        "or auto: as many as fit the trial's share of free GPU memory")
    p.add_argument("--seeds", type=int, help="seeds per configuration (42, 43, ...)")
    p.add_argument("--gpus-per-trial", type=float, default=0.0,
                   help="GPUs per trial (fractions share a GPU); default 0")
    p.add_argument("--cpus-per-trial", type=float, default=1.0, help="CPUs per trial; default 1")
    p.add_argument("--resources-per-trial", metavar="JSON",
                   help='custom Ray resources per trial, e.g. \'{"a100": 1}\' (a JSON object of '
                        "resource name to amount; nodes declare them with ray start "
                        "--resources)")
    p.add_argument("--max-concurrent", type=int, help="most trials running at once")
    p.add_argument("--address", help="Ray cluster: auto or HOST:PORT (default: start a local "
                                     "Ray sized to this machine)")
    p.add_argument("--results", default="results",
                   help="results root, a directory or URI (s3://..., file://...); default "
                        "results")
    p.add_argument("--name", help="sweep name (default: SPACE's name and the time)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted sweep (--name, or the latest of SPACE)")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="fp32 (exact, default); tf32 or bf16 trade exactness for GPU speed")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the training loss (fuses element-wise work; each "
                        "worker compiles once, in its first trial)")
    p.add_argument("--checkpoint-seconds", type=float, default=0.0,
                   help="checkpoint a trial, and report its progress to Ray, at most this "
                        "often (0: every epoch); a large population's checkpoint is hundreds "
                        "of MB, so on a GPU use e.g. 60")
    p.set_defaults(data=None)  # a space's data section applies unless --data is given
    return p


def _cohort(value: str) -> int | str:
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a positive integer or auto, got {value!r}") from None


def auto_cohort(first, corpus, num_samples: int, seeds: int, gpus_per_trial: float,
                precision: str) -> int:
    """Configurations per trial that fit the trial's share of free GPU memory.

    Measured here, on the driver's GPU, which stands for the workers' (same kind in a
    cluster); without one, 8 (a CPU gains little from larger populations).
    """
    if not (gpus_per_trial > 0 and torch.cuda.is_available()):
        return min(8, num_samples)
    members = members_that_fit(first, corpus, "cuda", min(1.0, gpus_per_trial), precision)
    return max(1, min(num_samples, members // seeds))


def _positive(value: Any, flag: str) -> None:
    if value is not None and value < 1:
        raise ConfigError(f"{flag}: must be a positive integer, got {value}")


def parse_resources(text: str | None) -> dict[str, float]:
    """--resources-per-trial: a JSON object of custom resource name -> amount (>= 0)."""
    flag = "--resources-per-trial"
    if text is None:
        return {}
    try:
        value = json.loads(text)
    except ValueError:
        raise ConfigError(f"{flag}: {text!r} is not JSON; expected an object such as "
                          '\'{"a100": 1}\'') from None
    if not isinstance(value, dict):
        raise ConfigError(f"{flag}: expected a JSON object of resource name to amount, got "
                          f"{text!r}")
    resources = {}
    for name, amount in value.items():
        if name.lower() in ("cpu", "gpu", "memory", "object_store_memory"):
            raise ConfigError(f"{flag}: {name!r} is not a custom resource; use --cpus-per-trial "
                              "or --gpus-per-trial")
        if (isinstance(amount, bool) or not isinstance(amount, (int, float))
                or not math.isfinite(amount) or amount < 0):
            raise ConfigError(f"{flag}: {name}: the amount must be a number >= 0, got "
                              f"{amount!r}")
        if not name:
            raise ConfigError(f"{flag}: a resource name must not be empty")
        resources[name] = float(amount)
    return resources


def absolute_data_paths(data: dict[str, Any]) -> dict[str, Any]:
    """The data flags with their local paths made absolute (relative to this directory)."""
    data = dict(data)
    for key in ("train_file", "val_file"):
        if data.get(key):
            data[key] = os.path.abspath(os.path.expanduser(data[key]))
    kind, _, directory = str(data["data"]).partition(":")
    if kind == "wikitext2" and directory:
        data["data"] = f"{kind}:{os.path.abspath(os.path.expanduser(directory))}"
    return data


def make_plan(args) -> Plan:
    space = load_space(args.space)
    for flag in ("num_samples", "seeds", "max_concurrent", "train_chars", "val_chars"):
        _positive(getattr(args, flag), "--" + flag.replace("_", "-"))
    if args.cohort != "auto":
        _positive(args.cohort, "--cohort")
    if args.checkpoint_seconds < 0:
        raise ConfigError(f"--checkpoint-seconds: must be >= 0, got {args.checkpoint_seconds}")
    if args.cpus_per_trial <= 0:
        raise ConfigError(f"--cpus-per-trial: must be > 0, got {args.cpus_per_trial}")
    if args.gpus_per_trial < 0:
        raise ConfigError(f"--gpus-per-trial: must be >= 0, got {args.gpus_per_trial}")
    resources = parse_resources(args.resources_per_trial)
    overrides = {}
    for key, value in cli.parse_sets(args.set).items():
        key = knob_name(key, "--set")
        overrides[key] = as_number(value) if is_numeric_key(key) else value
    first = space.validate_configs(overrides)
    data = dict(space.data)
    for key in ("data", "train_file", "val_file", "train_chars", "val_chars"):
        if getattr(args, key) is not None:
            data[key] = getattr(args, key)
    data.setdefault("data", "python-docs")
    data = absolute_data_paths(data)  # Ray Tune runs trials in their own directories
    corpus = load_corpus(**data, batch_size=first.batch_size, seq_len=first.seq_len)
    defaults = space.defaults
    grid = space.sampler["type"] == "grid"
    num_samples = (args.num_samples or defaults["num_samples"]
                   or (space.grid_size if grid else 8))
    if grid and num_samples > space.grid_size:
        raise ConfigError(f"--num-samples: {num_samples} is more than the grid's "
                          f"{space.grid_size} points")
    root = args.results
    if "://" not in root:
        root = os.path.abspath(os.path.expanduser(root))
    plan = Plan(space=space, space_path=str(args.space), name=args.name or "", root=root,
                num_samples=num_samples, cohort=args.cohort or defaults["cohort"],
                seeds=args.seeds or defaults["seeds"], precision=args.precision,
                compile=args.compile, checkpoint_seconds=args.checkpoint_seconds,
                max_concurrent=args.max_concurrent or defaults["max_concurrent"],
                cpus_per_trial=args.cpus_per_trial, gpus_per_trial=args.gpus_per_trial,
                overrides=overrides, data=data, dataset=corpus.name, resume=args.resume,
                address=args.address, resources_per_trial=resources)
    if args.name is not None and (not args.name or "/" in args.name
                                  or args.name.startswith(".")):
        raise ConfigError(f"--name: {args.name!r} must be a plain, non-empty name")
    if plan.cohort == "auto" and not plan.resume:
        plan.cohort = auto_cohort(first, corpus, num_samples, plan.seeds, plan.gpus_per_trial,
                                  plan.precision)
    if plan.resume:
        plan.name = plan.name or _latest_sweep(plan)
        if not can_restore(plan.experiment_path):
            raise ConfigError(f"--resume: no sweep to resume at {plan.experiment_path}")
        saved = _load_plan(plan)  # the sweep as it was started, whatever the flags say now
        for key in ("num_samples", "cohort", "seeds", "overrides", "data", "dataset"):
            setattr(plan, key, saved[key])
        plan.space = space_from_dict(saved["space"])
    else:
        plan.name = plan.name or f"{space.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        if can_restore(plan.experiment_path):
            raise ConfigError(f"--name: a sweep {plan.name!r} already exists under {root}; "
                              "pass --resume to continue it or another --name")
    return plan


def can_restore(experiment_path: str) -> bool:
    """Whether Ray Tune's experiment state is there (what tune.Tuner.can_restore checks)."""
    import pyarrow.fs as pafs

    from ufw.results import filesystem

    fs, path = filesystem(experiment_path)
    return fs.get_file_info(join(path, "tuner.pkl")).type == pafs.FileType.File


def _latest_sweep(plan: Plan) -> str:
    import pyarrow.fs as pafs

    from ufw.results import filesystem

    fs, base = filesystem(plan.root)
    infos = fs.get_file_info(pafs.FileSelector(base, allow_not_found=True))
    names = sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory
                   and i.base_name.startswith(plan.space.name + "-"))
    for name in reversed(names):
        if can_restore(join(plan.root, name, "ray")):
            return name
    raise ConfigError(f"--resume: no sweep of {plan.space.name} under {plan.root} to resume; "
                      "pass --name")


def _plan_record(plan: Plan) -> dict[str, Any]:
    return {"name": plan.name, "space_path": plan.space_path, "space": plan.space.to_dict(),
            "num_samples": plan.num_samples, "cohort": plan.cohort, "seeds": plan.seeds,
            "overrides": plan.overrides, "data": plan.data, "dataset": plan.dataset,
            "ufw_version": ufw.__version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}


def _save_plan(plan: Plan) -> None:
    from ufw.results import filesystem

    fs, base = filesystem(plan.sweep_uri)
    fs.create_dir(base, recursive=True)
    with fs.open_output_stream(join(base, "sweep.json")) as f:
        f.write(json.dumps(_plan_record(plan), indent=2, default=str).encode())


def _load_plan(plan: Plan) -> dict[str, Any]:
    from ufw.results import filesystem

    fs, base = filesystem(plan.sweep_uri)
    try:
        with fs.open_input_stream(join(base, "sweep.json")) as f:
            return json.loads(f.readall().decode())
    except (OSError, ValueError):
        raise ConfigError(f"--resume: {join(plan.sweep_uri, 'sweep.json')} is missing or "
                          "unreadable") from None


# ====================================================================== running
def _init_ray(plan: Plan) -> None:
    import ray

    if ray.is_initialized():  # e.g. tests, notebooks: use the running instance
        return
    common = {"include_dashboard": False, "logging_level": logging.WARNING,
              "log_to_driver": False}
    if plan.address:
        try:
            ray.init(address=plan.address, **common)
        except (ConnectionError, ValueError, RuntimeError) as e:
            raise ConfigError(f"--address {plan.address}: cannot connect to a Ray cluster "
                              f"({_error_line(str(e))})") from None
    else:
        ray.init(address="local", num_cpus=os.cpu_count(), **common)


def _trial_resources(plan: Plan) -> dict[str, tuple[str, float]]:
    """Ray resource name -> (the flag that asks for it, amount per trial)."""
    needs = {"CPU": ("--cpus-per-trial", plan.cpus_per_trial)}
    if plan.gpus_per_trial > 0:
        needs["GPU"] = ("--gpus-per-trial", plan.gpus_per_trial)
    for name, amount in plan.resources_per_trial.items():
        if amount > 0:
            needs[name] = ("--resources-per-trial", amount)
    return needs


def _check_resources(plan: Plan) -> None:
    """A trial that can never be placed would wait forever: say so before starting."""
    import ray

    if plan.address:  # a cluster may scale up to fit
        return
    resources = ray.cluster_resources()
    for name, (flag, need) in _trial_resources(plan).items():
        have = resources.get(name, 0)
        if need > have:
            what = "" if flag != "--resources-per-trial" else f" {name}"
            raise ConfigError(f"{flag}:{what} {need:g} requested but this machine's Ray has "
                              f"{have:g}")


def _concurrency(plan: Plan, resources: dict[str, float] | None = None) -> int:
    """Trials at once (and so trials Ray keeps pending): --max-concurrent; on a cluster
    (--address) every trial, since an autoscaling cluster starts without the workers that will
    run them and sizes itself to what is pending; else what this machine's Ray fits."""
    if plan.max_concurrent:
        return plan.max_concurrent
    if plan.address:
        return plan.num_trials
    if resources is None:
        import ray

        resources = ray.cluster_resources()
    slots = plan.num_trials
    for name, (_, need) in _trial_resources(plan).items():
        slots = min(slots, int(resources.get(name, 0) // need))
    return max(1, slots)


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
    from ray.tune.search.optuna import OptunaSearch

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = plan.space
    spec = plan.spec()
    objectives = space.objectives
    metric = [o.metric for o in objectives]
    mode = [o.mode for o in objectives]
    if len(objectives) == 1:
        metric, mode = metric[0], mode[0]
    if plan.cohort == 1:
        search = OptunaSearch(space=DefineByRun(space), metric=metric, mode=mode,
                              sampler=space.make_sampler())
    else:
        search = _ray_class("CohortSearcher")(space, plan.num_samples, plan.cohort)
    # max_concurrent_trials also sets how many trials Ray keeps pending (not just 1).
    concurrency = _concurrency(plan)
    callback = _ray_class("SweepCallback")(spec, plan.root, plan.num_trials)
    return tune.Tuner(
        _trainable(plan),
        param_space={SPEC: spec},
        tune_config=tune.TuneConfig(search_alg=search, num_samples=plan.num_trials,
                                    max_concurrent_trials=concurrency, reuse_actors=True,
                                    trial_dirname_creator=trial_dirname),
        run_config=RunConfig(name="ray", storage_path=plan.sweep_uri, verbose=0,
                             failure_config=FailureConfig(max_failures=2),
                             checkpoint_config=CheckpointConfig(num_to_keep=1),
                             callbacks=[callback]))


def finalize(plan: Plan, grid) -> bool:
    """Give every trial of the experiment its parts, drop parts of unknown trials.

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
                         json.loads(metrics.get("epoch_rows", "[]")))
        elif result.error is not None:
            members = expand_members(spec, trial_points(result.config or {SPEC: spec}))
            writer.write(trial_id, failed_rows(spec, members, _error_line(str(result.error)),
                                               {"trial_id": trial_id}), [])
        else:
            complete = False
    for trial_id in writer.trial_ids() - known:
        writer.delete(trial_id)  # a trial the experiment forgot (driver killed before saving)
    writer.clean_temporary()
    return complete and len(known) >= plan.num_trials


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
        ok = frame[frame["status"] != "failed"]
        params = [c for c in (column_of(p.name) for p in plan.space.parameters)
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
    from ray import tune

    with cli.user_errors():
        _init_ray(plan)
        _check_resources(plan)
    _quiet_ray_logs()
    if plan.resume:
        print(f"[{plan.name}] resuming {plan.experiment_path}", flush=True)
        tuner = tune.Tuner.restore(plan.experiment_path, trainable=_trainable(plan),
                                   resume_errored=True)
    else:
        _save_plan(plan)
        print(f"[{plan.name}] {plan.num_samples} configurations x {plan.seeds} seed(s), "
              f"cohort {plan.cohort} -> {plan.num_trials} trials; results in {plan.sweep_uri}",
              flush=True)
        tuner = make_tuner(plan)
    grid = tuner.fit()
    complete = finalize(plan, grid)
    print(summary(plan), flush=True)
    if not complete:
        print(f"[{plan.name}] the sweep did not finish; continue it with: python -m ufw.sweep "
              f"{plan.space_path} --resume --name {plan.name} --results {plan.root}", flush=True)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with cli.user_errors():
        plan = make_plan(args)
    return run(plan)


if __name__ == "__main__":
    sys.exit(main())
