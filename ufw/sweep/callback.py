"""The driver's side of a sweep: a Tune callback that writes each finished trial's Parquet
parts and prints a progress line."""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from typing import Any

from ufw.results import ResultsWriter, join, read_trials
from ufw.sweep import out_of_space
from ufw.sweep.lazy_ray import ray_subclasses
from ufw.sweep.members import expand_members, failed_rows, trial_points
from ufw.sweep.trainable import HEAVY_KEYS


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
    return error_line(text)


def error_line(text: str | None) -> str:
    lines = [line.strip() for line in (text or "").strip().splitlines() if line.strip()]
    return lines[-1] if lines else "trial failed"


def unrecorded_failed_rows(writer: ResultsWriter, spec: dict[str, Any], trial_id: str,
                           config: dict[str, Any], error: str,
                           extra: dict[str, Any]) -> list[dict]:
    """Failed rows for a failed trial's members, but those already in its numbered parts (a
    refilling trial that failed after writing some)."""
    recorded = writer.recorded_members(trial_id)
    return [row for row in failed_rows(spec, expand_members(spec, trial_points(config)),
                                       error, extra)
            if (row["config_id"], row["seed"]) not in recorded]


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
        self._ended: dict[str, int] = {}  # refilling trials: configurations done so far
        self._trial_best: dict[str, float] = {}  # each trial's best objective so far
        self._out_of_space: out_of_space.OutOfSpace | None = None  # stops the sweep

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

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        """A refilling trial trains configurations until the sweep's budget is spent: write
        the rows it sends with its checkpoints (part n) and say how many have ended."""
        if "rows_part" in result and not result.get("final"):
            rows = json.loads(result["rows"])
            if not self._write(trial, rows, json.loads(result["epoch_rows"]),
                               number=result["rows_part"], last=False):
                return
            self._note_best(trial.trial_id, rows)
        ended = result.get("configurations_ended")
        if not self.spec.get("refill") or ended is None:
            return
        if ended > self._ended.get(trial.trial_id, 0):
            self._ended[trial.trial_id] = ended
            if result.get("final"):  # the trial's own line (_progress) says it next
                return
            metric = self.spec["objectives"][0][0]
            best = result.get(metric)
            print(f"[{self.spec['sweep']}] configurations ended: {sum(self._ended.values())}/"
                  f"{self.spec['num_samples']} (trial {trial.trial_id}: {ended}, best {metric} "
                  f"{best if best is None else f'{best:.4g}'}) | elapsed "
                  f"{_fmt_seconds(time.time() - self._start)}", flush=True)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        result = trial.last_result or {}
        number = result.get("rows_part")
        if "rows" in result:
            rows = json.loads(result["rows"])
            epoch_rows = json.loads(result.get("epoch_rows", "[]"))
            error = None
            if not result.get("final", True):  # stopped by Ray Tune's scheduler (--pruner)
                for row in rows:
                    if row["status"] == "running":
                        row.update(status="pruned", ended_at=time.time())
        else:
            rows = unrecorded_failed_rows(self.writer, self.spec, trial.trial_id, trial.config,
                                          "trial ended without a final result",
                                          {"trial_id": trial.trial_id})
            epoch_rows, error, number = [], "ended without a final result", None
        if self._write(trial, rows, epoch_rows, number):
            self._progress(trial.trial_id, rows, error)

    def on_trial_recover(self, iteration, trials, trial, **info) -> None:
        self._stop_if_out_of_space(trial)
        print(f"[{self.spec['sweep']}] trial {trial.trial_id} raised "
              f"({trial_error(trial)}); retrying from its last checkpoint",
              flush=True)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._stop_if_out_of_space(trial)
        error = trial_error(trial)
        location = getattr(getattr(trial, "temporary_state", None), "location", None)
        extra = {"trial_id": trial.trial_id, "node": getattr(location, "hostname", None)}
        rows = unrecorded_failed_rows(self.writer, self.spec, trial.trial_id, trial.config,
                                      error, extra)
        if self._write(trial, rows, [], None):
            self._progress(trial.trial_id, rows, error)

    def _stop_if_out_of_space(self, trial) -> None:
        """A trial that could not save its checkpoint for lack of space did nothing wrong:
        stop the sweep (Ray resumes the trial from its last checkpoint on --resume) rather
        than retry it against a full disk or record it failed; so did one whose call to the
        study actor found the study's journal without space (the error names it). (Raised
        from Tune's handling of a trial's error, an exception ends the experiment.)"""
        error = trial_error(trial)
        why = out_of_space.reason(error)
        if why:
            what = out_of_space.what_of(error) or (
                f"a checkpoint of trial {trial.trial_id} under "
                f"{join(self.writer.root, self.spec['sweep'], 'ray')}")
            _stop_sweep(out_of_space.OutOfSpace(what, why))

    def on_step_end(self, iteration, trials, **info) -> None:
        """Stop the sweep after a part could not be written. Not raised where the write
        failed: Tune would log that with a traceback and count it as the trial's failure.
        The trial keeps its rows in Ray's state (saved before this), and the resumed driver
        writes its parts (finalize)."""
        if self._out_of_space is not None:
            _stop_sweep(self._out_of_space)

    def _write(self, trial, rows, epoch_rows, number: int | None = None,
               last: bool = True) -> bool:
        """Write the trial's last part (or its part `number`); False if the disk is full."""
        try:
            self.writer.write(trial.trial_id, rows, epoch_rows, number, last)
        except OSError as e:
            why = out_of_space.reason(e)
            if not why:
                raise
            self._out_of_space = out_of_space.OutOfSpace(
                f"the Parquet parts of trial {trial.trial_id} under "
                f"{join(self.writer.root, self.spec['sweep'])}", why)
            return False
        # The parts hold the rows now: keep Ray's experiment state small.
        with contextlib.suppress(Exception):
            trial.run_metadata.last_result = {k: v for k, v in trial.last_result.items()
                                              if k not in HEAVY_KEYS}
        if last:
            self._finished.add(trial.trial_id)
            self._finished_now += 1
        return True

    def _note_best(self, trial_id: str, rows: list[dict]) -> None:
        """Keep the best finite objective of the trial's rows and of the sweep so far."""
        metric, direction = self.spec["objectives"][0]
        better = min if direction == "minimize" else max
        values = [float(r[metric]) for r in rows if r.get(metric) is not None
                  and r.get("status") != "failed" and math.isfinite(float(r[metric]))]
        if values:
            best = better(values)
            if trial_id in self._trial_best:
                best = better(best, self._trial_best[trial_id])
            self._trial_best[trial_id] = best
            self._best = best if self._best is None else better(self._best, best)

    def _progress(self, trial_id: str, rows: list[dict], error: str | None) -> None:
        metric = self.spec["objectives"][0][0]
        self._note_best(trial_id, rows)
        trial_best = self._trial_best.get(trial_id)  # over all its parts
        done = min(len(self._finished), self.total)
        elapsed = time.time() - self._start
        if self.spec.get("refill"):  # trials refill until the budget is spent: count those
            ended, budget = sum(self._ended.values()), self.spec["num_samples"]
            trials = f"trials {done} of at most {self.total}"
            progress = f" | configurations ended: {ended}/{budget}"
            eta = elapsed / ended * max(0, budget - ended) if ended else math.nan
        else:
            trials, progress = f"trials {done}/{self.total}", ""
            remaining = max(0, self.total - done)
            eta = elapsed / self._finished_now * remaining if self._finished_now else math.nan
        failed = [r for r in rows if r.get("status") == "failed"]
        if error:
            what = f"failed: {error}"
        elif trial_best is not None:
            what = f"{metric} {trial_best:.4g}"
            if failed:
                what += f" ({len(failed)}/{len(rows)} members failed: {failed[0].get('error')})"
        else:
            what = f"failed: {failed[0].get('error') if failed else 'no finite result'}"
        best = f"{self._best:.4g}" if self._best is not None else "-"
        eta_text = _fmt_seconds(eta) if math.isfinite(eta) else "?"
        print(f"[{self.spec['sweep']}] {trials} | {trial_id} {what} | best so far {best}"
              f"{progress} | elapsed {_fmt_seconds(elapsed)} | ETA {eta_text}", flush=True)


def _stop_sweep(error: Exception) -> None:
    """End the experiment with `error` (the driver reports it in one line). Trials still
    running are abandoned with it: Ray would print each one's pending error, with its
    traceback, as "unhandled" when Tune lets go of them, so those messages are turned off."""
    os.environ["RAY_IGNORE_UNHANDLED_ERRORS"] = "1"  # read by Ray when it would print one
    raise error


# SweepCallback: the class above on top of ray.tune.Callback, made on first use.
__getattr__ = ray_subclasses(globals(), {"SweepCallback": (_SweepCallback, "ray.tune",
                                                           "Callback")})
