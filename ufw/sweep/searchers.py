"""How a sweep samples: Optuna through Ray Tune's OptunaSearch (cohort 1), or a
`CohortSearcher` that hands each Ray trial a cohort of configurations asked from the sweep's
study actor (ufw/sweep/study_service.py)."""

from __future__ import annotations

import json
from typing import Any

from ufw.space import SearchSpace
from ufw.sweep.lazy_ray import ray_subclasses
from ufw.sweep.members import MEMBERS, NUMBERS


class DefineByRun:
    """Ray Tune OptunaSearch's define-by-run function: picklable (a small class)."""

    def __init__(self, space: SearchSpace):
        self.space = space

    def __call__(self, trial) -> None:
        self.space.sample(trial)


class _CohortSearcher:
    """Hands each Ray trial a cohort of configurations asked from the sweep's study actor.

    The study, its sampler and the budget of `num_samples` live in the StudyService actor
    (ufw/sweep/study_service.py), which the trials reach too (per-epoch pruning, refills).
    Asking is slow once a study is large (TPE refits its estimators for every parameter of
    every configuration: seconds per cohort after a thousand trials), and the driver thread
    that would wait for it also serves every running trial's reports: `suggest` returns None
    (Tune asks again shortly) while the cohort is still being asked. Running trials refill
    their freed slots from the same budget (ufw/sweep/trainable.py), so a cohort is asked only
    when Tune starts a trial, never ahead: one asked ahead would wait unused while they refill.

    Its state is JSON (`save`/`restore`): which Ray trial holds which Optuna trials. The
    study itself is in its journal file; nothing here is pickled by ufw.
    `CohortSearcher` is this on top of ray.tune.search.Searcher (see `__getattr__` below).
    """

    def __init__(self, space: SearchSpace, sweep: str, cohort: int):
        metrics = [o.metric for o in space.objectives]
        modes = [o.mode for o in space.objectives]
        super().__init__(metric=metrics if len(metrics) > 1 else metrics[0],
                         mode=modes if len(modes) > 1 else modes[0])
        self.sweep = sweep
        self.cohort = cohort
        self.pending: dict[str, list[list]] = {}  # Ray trial id -> [[number, values], ...]
        self._asking = None  # the cohort being asked: a Ray object ref
        self._finished = False

    def _service(self):
        from ufw.sweep.study_service import find_service

        return find_service(self.sweep)

    def suggest(self, trial_id: str) -> dict | None:
        import ray

        if trial_id in self.pending:  # asked again for the same trial: the same points
            return cohort_config(self.pending[trial_id])
        if self._finished:
            return "FINISHED"  # Searcher.FINISHED
        if self._asking is None:
            self._asking = self._service().ask.remote(self.cohort, "searcher")
        # With none of its trials running (the sweep's start and end) the driver has no
        # reports to serve, and Tune would sleep a second after each None: wait for the ask.
        ready, _ = ray.wait([self._asking], timeout=0.05 if self.pending else None)
        if not ready:
            return None
        points = [list(p) for p in ray.get(self._asking)]
        self._asking = None
        if not points:  # the budget is spent (refills may have used it)
            self._finished = True
            return "FINISHED"
        ray.get(self._service().hold.remote(trial_id, [n for n, _ in points]))
        self.pending[trial_id] = points
        return cohort_config(points)

    def on_trial_complete(self, trial_id: str, result: dict | None = None,
                          error: bool = False) -> None:
        """The trial told its configurations as they finished; close what it did not."""
        if self.pending.pop(trial_id, None) is not None:
            self._service().end.remote(trial_id)

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "w") as f:
            json.dump({"pending": self.pending, "finished": self._finished}, f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path) as f:
            state = json.load(f)
        self.pending = {k: [list(p) for p in v] for k, v in state["pending"].items()}
        self._finished = state["finished"]

    def __getstate__(self) -> dict[str, Any]:
        """Ray Tune keeps this object in its experiment state: without the pending ask."""
        return {k: v for k, v in self.__dict__.items() if k != "_asking"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _asking=None)


def cohort_config(points: list[list]) -> dict[str, Any]:
    """A Ray trial's config for a cohort: the sampled values and their Optuna numbers."""
    return {MEMBERS: [values for _, values in points],
            NUMBERS: [number for number, _ in points]}


class _StudySearch:
    """Ray Tune's OptunaSearch (cohort 1) on a study kept in a file (ufw/study.py).

    It does not report each epoch to the study as an intermediate value: with one
    configuration per trial, Ray Tune's own schedulers (ASHA, HyperBand, median stopping)
    prune (`--pruner`), every report would take the journal's file lock on the driver thread
    that serves all trials, and after a driver is killed the file may already hold a trial
    as finished that Ray runs again from its checkpoint (Optuna refuses to update a finished
    trial; its final value is told as before, and a second tell is refused and logged by
    OptunaSearch).
    """

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        pass

    def on_trial_complete(self, trial_id: str, result: dict | None = None,
                          error: bool = False) -> None:
        """A trial that Ray Tune's scheduler stopped (its last report is not its final one)
        is told to the study as PRUNED (OptunaSearch does so for a result without a value)."""
        if result and not error and not result.get("final", True):
            result = None
        super().on_trial_complete(trial_id, result, error)


# CohortSearcher and StudySearch: the classes above on top of Ray's, made on first use.
__getattr__ = ray_subclasses(globals(), {
    "CohortSearcher": (_CohortSearcher, "ray.tune.search", "Searcher"),
    "StudySearch": (_StudySearch, "ray.tune.search.optuna", "OptunaSearch"),
})
