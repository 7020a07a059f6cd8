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
    """Starts the Ray trials of a cohort sweep; each asks the sweep's study actor for its
    cohort of configurations when it starts (ufw/sweep/trainable.py), not here.

    The study, its sampler and the budget of `num_samples` live in the StudyService actor
    (ufw/sweep/study_service.py), which the trials reach too (per-epoch pruning, refills).
    Tune creates a trial when it calls `suggest`, which can be long before the trial runs: on
    a cluster (--address) every trial is created at once and waits for resources (an
    autoscaler sizes the cluster to them). Had each been handed its cohort here, the whole
    budget would be drawn before any result reached the sampler (TPE no better than random
    draws) and nothing left for running trials to refill their freed slots with. A trial that
    starts once the budget is spent asks, gets nothing and ends.

    Its state is JSON (`save`/`restore`): which Ray trials it started. The study itself is in
    its journal file; nothing here is pickled by ufw.
    `CohortSearcher` is this on top of ray.tune.search.Searcher (see `__getattr__` below).
    """

    def __init__(self, space: SearchSpace, sweep: str, cohort: int):
        metrics = [o.metric for o in space.objectives]
        modes = [o.mode for o in space.objectives]
        super().__init__(metric=metrics if len(metrics) > 1 else metrics[0],
                         mode=modes if len(modes) > 1 else modes[0])
        self.sweep = sweep
        self.cohort = cohort
        self.pending: dict[str, list[list]] = {}  # Ray trial id -> [] (asked when it starts)
        self._finished = False

    def _service(self):
        from ufw.sweep.study_service import find_service

        return find_service(self.sweep)

    def suggest(self, trial_id: str) -> dict | None:
        import ray

        if trial_id in self.pending:  # asked again for the same trial: the same config
            return cohort_config(self.pending[trial_id])
        if self._finished or ray.get(self._service().remaining.remote()) <= 0:
            self._finished = True  # the budget is spent (running trials refill from it)
            return "FINISHED"  # Searcher.FINISHED
        self.pending[trial_id] = []
        return cohort_config([])

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


def cohort_config(points: list[list]) -> dict[str, Any]:
    """A Ray trial's config for a cohort: the sampled values and their Optuna numbers (none:
    the trial asks for its cohort when it starts)."""
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
