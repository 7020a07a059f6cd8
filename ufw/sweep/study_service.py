"""The sweep's Optuna study as one Ray actor: asks, tells, and per-epoch pruning decisions.

With `--cohort K` one Ray trial trains K configurations, so Ray Tune's schedulers could only
stop all of them together. Pruning is therefore done per configuration by Optuna's own
pruners (successive halving / ASHA, Hyperband, median) over the sweep's study, and the study
lives in one actor that every trial on every node reaches through Ray: Ray already connects
the nodes, an actor needs no port, storage or credentials of its own, and each decision sees
every configuration reported so far, whichever trial or node trained it. (Optuna's gRPC
storage proxy would do the same with a server to start, secure and find.)

TPE's cost per ask grows with the study (its acquisition is evaluated against every finished
trial), and one actor asks for every trial of the sweep: with refill, a population frees a
hundred slots an epoch. On a machine with cores to spare the actor therefore hands TPE's draws
to a few `SamplerReplica` actors beside it, each a copy of the study's finished trials with its
own stream of the space's sampler, and only records what they drew (an enqueued trial: no
sampling). The draws are the same algorithm from the same history, split over processes.

The actor runs on the driver's node and keeps the study in the sweep's journal file
(ufw/study.py): intermediate values, the rungs' records and the pruning decisions already
taken survive a killed driver, and `--resume` continues from them.

Who holds which Optuna trial: each asked trial records its holder (user attribute
`ufw_holder`: a Ray trial id, or "searcher" while a cohort waits for its Ray trial). A Ray
trial restarted from a checkpoint says which trials it still holds; trials it had asked for
after that checkpoint are closed as failed orphans (user attribute `ufw_orphan`) and do not
count against `--num-samples`, so no configuration is lost or trained twice.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import time
from typing import Any

HOLDER = "ufw_holder"
ORPHAN = "ufw_orphan"
SEED_STRIDE = 1000  # sampler seeds per trial of a resumed study: above its replicas' (< 1000)
PRUNERS = ("none", "asha", "hyperband", "median")


def service_name(sweep: str) -> str:
    """The Ray name of a sweep's study actor (trials find it by this name)."""
    return f"ufw-study-{sweep}"


def make_pruner(pruning: dict[str, Any] | None):
    """Optuna's pruner for `--pruner` and its knobs (None or "none": never prune)."""
    import optuna

    kind = (pruning or {}).get("pruner", "none")
    if kind == "none":
        return optuna.pruners.NopPruner()
    min_resource = pruning.get("min_resource", 1)
    factor = pruning.get("reduction_factor", 3)
    if kind == "asha":  # Optuna's SuccessiveHalvingPruner is asynchronous (ASHA)
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=min_resource,
                                                      reduction_factor=factor)
    if kind == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=min_resource,
                                              max_resource=pruning["max_resource"],
                                              reduction_factor=factor)
    if kind == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=min_resource - 1)
    raise ValueError(f"pruner: {kind!r}; allowed: {', '.join(PRUNERS)}")


class StudyService:
    """The sweep's study, its sampler and pruner, and the budget of `num_samples`.

    Made a Ray actor by `start_service`; a plain object in tests of the rules. Its methods
    are called from several threads of the actor (max_concurrency), so a lock keeps the
    budget's bookkeeping consistent; Optuna's storage has its own.
    """

    def __init__(self, space: dict[str, Any], study_file: str, study_name: str,
                 num_samples: int, pruning: dict[str, Any] | None = None,
                 resume: bool = False, replicas: int = 0):
        import optuna

        from ufw.space import space_from_dict
        from ufw.study import batched_journal, journal_storage

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.space = space_from_dict(space)
        # This actor alone writes the study while the sweep runs: each call's operations
        # reach the file together, before the call returns (ufw/study.py).
        self.study_file = study_file
        self.journal = batched_journal(study_file)
        self.study = self.space.create_study(journal_storage(study_file, self.journal),
                                             study_name)
        self.study.pruner = make_pruner(pruning)
        # A resumed study's sampler draws on from a seed of its own, not again from the
        # space's seed: a seeded sampler (and its replicas) would repeat the draws it made
        # before the driver stopped. Each start's seeds lie above every earlier start's.
        seed_offset = SEED_STRIDE * len(self.study.trials)
        if seed_offset:
            self.study.sampler = self.space.make_sampler(seed_offset)
        self.num_samples = num_samples
        self._lock = threading.Lock()
        # Where the actor's time goes, per phase: [calls, seconds] (`load`).
        self.busy: dict[str, list[float]] = {}
        self._busy_lock = threading.Lock()
        if resume:  # a cohort asked but never handed to a Ray trial: nobody will train it
            self._close_orphans(lambda t: t.user_attrs.get(HOLDER) == "searcher")
        self._flush()
        # TPE's draws spread over sampler replicas (Ray actors beside this one); other
        # samplers are cheap per ask, or (grid, NSGA-II) keep state that must stay here.
        self.replicas: list[Any] = []
        self._sent: list[set[int]] = []  # per replica: the finished trials it has
        if replicas >= 2 and self.space.sampler["type"] == "tpe":
            self.replicas = start_replicas(space, replicas, seed_offset)
            self._sent = [set() for _ in self.replicas]

    # ------------------------------------------------------------------ asking
    def remaining(self) -> int:
        """Configurations still to ask: num_samples minus those asked (orphans excluded)."""
        trials = self.study.get_trials(deepcopy=False)
        return self.num_samples - sum(not t.user_attrs.get(ORPHAN) for t in trials)

    def ask(self, n: int, holder: str) -> list[tuple[int, dict[str, Any]]]:
        """Up to n new configurations as (Optuna trial number, sampled values); fewer, or
        none, when the budget is spent."""
        with self._timed("ask, waiting for another ask"):
            self._lock.acquire()
        try:  # two askers must not both take the last configurations
            n = max(0, min(n, self.remaining()))
            drawn = None
            if n >= 2 and self.replicas:
                with self._timed("ask, drawing in sampler replicas"):
                    drawn = self._draw_in_replicas(n)
            asked = []
            with self._timed("ask, sampling or recording"):
                for values in drawn or [None] * n:
                    if values is not None:  # drawn by a replica: the trial only records it
                        self.study.enqueue_trial(values)
                    trial = self.study.ask()
                    trial.set_user_attr(HOLDER, holder)
                    asked.append((trial.number, self.space.sample(trial)))
                self._flush()
            return asked
        finally:
            self._lock.release()

    def _draw_in_replicas(self, n: int) -> list[dict[str, Any]] | None:
        """n configurations drawn by the replicas at once, each sent the finished trials it
        lacks first; None once one failed (the actor asks itself from then on)."""
        import ray

        from ufw.batched_tpe import FINISHED  # the trials TPE learns from

        finished = self.study.get_trials(deepcopy=False, states=FINISHED)
        shares = [n // len(self.replicas) + (i < n % len(self.replicas))
                  for i in range(len(self.replicas))]
        calls = []
        for replica, sent, share in zip(self.replicas, self._sent, shares):
            if share:
                new = [t for t in finished if t.number not in sent]
                sent.update(t.number for t in new)
                calls.append(replica.draw.remote(new, share))
        try:
            return [values for drawn in ray.get(calls) for values in drawn]
        except ray.exceptions.RayError:  # a replica is gone: draw here from now on
            self.replicas, self._sent = [], []
            return None

    def hold(self, holder: str, numbers: list[int]) -> None:
        """These trials are now `holder`'s (a Ray trial given a cohort, or restarted from a
        checkpoint holding them); any other running trial it held (asked for after that
        checkpoint) is an orphan."""
        keep = set(numbers)
        with self._lock:
            trials = self.study.get_trials(deepcopy=False)
            for n in numbers:
                if not trials[n].state.is_finished():  # told ones stay as they are
                    self._trial(n).set_user_attr(HOLDER, holder)
            self._close_orphans(lambda t: t.user_attrs.get(HOLDER) == holder
                                and t.number not in keep)
            self._flush()

    # ------------------------------------------------------------------ results
    def report(self, reports: list[tuple[int, int, float]]) -> list[int]:
        """Intermediate values (trial number, epoch, objective value); returns the numbers
        the pruner stops now, told to the study as PRUNED."""
        import optuna

        with self._timed("report"):
            pruned = []
            trials = self.study.get_trials(deepcopy=False)
            for number, step, value in reports:
                state = trials[number].state
                if state == optuna.trial.TrialState.PRUNED:  # decided before a driver was
                    pruned.append(number)                     # killed: the decision stands
                    continue
                if state.is_finished():
                    continue
                trial = self._trial(number)
                trial.report(value if math.isfinite(value) else math.nan, step)
                if trial.should_prune():
                    self.study.tell(number, state=optuna.trial.TrialState.PRUNED,
                                    skip_if_finished=True)
                    pruned.append(number)
            self._flush()
            return pruned

    def tell(self, results: list[tuple[int, list[float] | None]]) -> None:
        """Final objective values per trial number (None: failed)."""
        import optuna

        with self._timed("tell"):
            for number, values in results:
                if values is None:
                    self.study.tell(number, state=optuna.trial.TrialState.FAIL,
                                    skip_if_finished=True)
                else:
                    self.study.tell(number, values if len(values) > 1 else values[0],
                                    skip_if_finished=True)
            self._flush()

    def end(self, holder: str) -> None:
        """A Ray trial is over (finished or failed for good): what it held and did not tell
        failed."""
        import optuna

        for t in self.study.get_trials(deepcopy=False,
                                       states=(optuna.trial.TrialState.RUNNING,)):
            if t.user_attrs.get(HOLDER) == holder:
                self.study.tell(t.number, state=optuna.trial.TrialState.FAIL,
                                skip_if_finished=True)
        self._flush()

    def finish(self) -> None:
        """The sweep is over: no running trial is left open in the study."""
        self._close_orphans(lambda t: True)
        self._flush()

    def load(self) -> dict[str, tuple[int, float]]:
        """Where the actor's time went: (calls, seconds) per phase, summed over its threads
        (so they may add up to more than the sweep's wall time)."""
        with self._busy_lock:
            return {phase: (int(calls), seconds) for phase, (calls, seconds) in self.busy.items()}

    # ------------------------------------------------------------------ helpers
    @contextlib.contextmanager
    def _timed(self, phase: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            with self._busy_lock:
                entry = self.busy.setdefault(phase, [0, 0.0])
                entry[0] += 1
                entry[1] += time.perf_counter() - start

    def _flush(self) -> None:
        """This call's operations to the journal file. A full disk stops the sweep naming the
        study (the trial whose call this was did nothing wrong), as ufw/sweep/out_of_space.py
        describes."""
        from ufw.sweep import out_of_space

        try:
            self.journal.flush()
        except OSError as e:
            why = out_of_space.reason(e)
            if why:
                raise out_of_space.OutOfSpace(f"the sweep's Optuna study {self.study_file}",
                                              why) from e
            raise

    def _trial(self, number: int):
        import optuna

        storage = self.study._storage  # Optuna's documented storage API, on the study's own
        trial_id = storage.get_trial_id_from_study_id_trial_number(self.study._study_id,
                                                                   number)
        return optuna.trial.Trial(self.study, trial_id)

    def _close_orphans(self, is_orphan) -> None:
        """Fail the running trials `is_orphan` picks, marked so they leave the budget."""
        import optuna

        for t in self.study.get_trials(deepcopy=False,
                                       states=(optuna.trial.TrialState.RUNNING,)):
            if is_orphan(t):
                self._trial(t.number).set_user_attr(ORPHAN, True)
                self.study.tell(t.number, state=optuna.trial.TrialState.FAIL,
                                skip_if_finished=True)


class SamplerReplica:
    """The space's sampler over a copy of the study's finished trials, in its own process:
    draws configurations for the study actor, which records them."""

    def __init__(self, space: dict[str, Any], seed_offset: int):
        import optuna

        from ufw.space import space_from_dict

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.space = space_from_dict(space)
        self.study = optuna.create_study(sampler=self.space.make_sampler(seed_offset),
                                         directions=[o.direction for o in self.space.objectives])

    def draw(self, finished: list, n: int) -> list[dict[str, Any]]:
        """Learn `finished` (trials new to this replica), then draw n configurations; each
        draw's trial is closed as failed here, which TPE ignores."""
        import optuna

        self.study.add_trials(finished)
        drawn = []
        for _ in range(n):
            trial = self.study.ask()
            drawn.append(self.space.sample(trial))
            self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
        return drawn


def replicas_for_this_machine() -> int:
    """Sampler replicas beside the study actor: a quarter of the cores, at most 4; none on a
    machine with fewer than 8 (they would take the trials' cores)."""
    return min(4, (os.cpu_count() or 1) // 4) if (os.cpu_count() or 1) >= 8 else 0


def start_replicas(space: dict[str, Any], count: int, seed_offset: int = 0) -> list[Any]:
    """`count` SamplerReplica actors on this node, each with its own stream of draws."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return [ray.remote(SamplerReplica).options(num_cpus=0, scheduling_strategy=here)
            .remote(space, seed_offset + i + 1) for i in range(count)]


def start_service(plan_spec: dict[str, Any], space: dict[str, Any], study_file: str,
                  num_samples: int, resume: bool):
    """The sweep's StudyService as a named Ray actor on this (the driver's) node, beside
    the journal file."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = ray.get_runtime_context().get_node_id()
    name = service_name(plan_spec["sweep"])
    with contextlib.suppress(ValueError):  # left by an earlier run in this process (tests)
        ray.kill(ray.get_actor(name))
    actor = ray.remote(StudyService).options(
        name=name, num_cpus=0, max_concurrency=8,
        scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False))
    return actor.remote(space, study_file, plan_spec["sweep"], num_samples,
                        plan_spec.get("pruning"), resume, replicas_for_this_machine())


def find_service(sweep: str):
    """The running sweep's StudyService actor (from a trial or the searcher)."""
    import ray

    return ray.get_actor(service_name(sweep))
