"""How a sweep samples: Optuna through Ray Tune's OptunaSearch (cohort 1), or a
`CohortSearcher` that asks an Optuna study for a cohort of configurations per Ray trial."""

from __future__ import annotations

import json
import threading
from typing import Any

from ufw.space import SearchSpace
from ufw.sweep.lazy_ray import ray_subclasses
from ufw.sweep.members import MEMBERS


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

    Picklable (an in-memory study travels whole; a study in a journal file as its path), so
    `Tuner.restore` continues the same study.
    `CohortSearcher` is this on top of ray.tune.search.Searcher (see `__getattr__` below).
    """

    def __init__(self, space: SearchSpace, num_samples: int, cohort: int, storage=None,
                 study_name: str | None = None):
        metrics = [o.metric for o in space.objectives]
        modes = [o.mode for o in space.objectives]
        super().__init__(metric=metrics if len(metrics) > 1 else metrics[0],
                         mode=modes if len(modes) > 1 else modes[0])
        self.space = space
        self.num_samples = num_samples
        self.cohort = cohort
        self.study = space.create_study(storage, study_name)  # storage: ufw.study
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
            # skip_if_finished: told before a driver was killed, and run again from a checkpoint
            if point is None:
                self.study.tell(number, state=optuna.trial.TrialState.FAIL,
                                skip_if_finished=True)
            else:
                self.study.tell(number, point if len(point) > 1 else point[0],
                                skip_if_finished=True)

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
        self._fail_orphans()

    def _fail_orphans(self) -> None:
        """Trials a killed driver asked after its last checkpoint are still RUNNING in a study
        kept in a file; no Ray trial will report them, so close them as failed (TPE ignores
        failed trials; the dashboard shows them as such) and ask anew."""
        import optuna

        mine = {n for numbers in self.pending.values() for n in numbers}
        mine.update(self.ready[1] if self.ready else ())
        for trial in self.study.get_trials(deepcopy=False,
                                           states=(optuna.trial.TrialState.RUNNING,)):
            if trial.number not in mine:
                self.study.tell(trial.number, state=optuna.trial.TrialState.FAIL)


class _StudySearch:
    """Ray Tune's OptunaSearch (cohort 1) on a study kept in a file (ufw/study.py).

    It does not report each epoch to the study as an intermediate value: ufw prunes nothing,
    every report would take the journal's file lock on the driver thread that serves all
    trials, and after a driver is killed the file may already hold a trial as finished that
    Ray runs again from its checkpoint (Optuna refuses to update a finished trial; its final
    value is told as before, and a second tell is refused and logged by OptunaSearch).
    """

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        pass


# CohortSearcher and StudySearch: the classes above on top of Ray's, made on first use.
__getattr__ = ray_subclasses(globals(), {
    "CohortSearcher": (_CohortSearcher, "ray.tune.search", "Searcher"),
    "StudySearch": (_StudySearch, "ray.tune.search.optuna", "OptunaSearch"),
})
