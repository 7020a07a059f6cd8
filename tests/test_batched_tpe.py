"""BatchedTPESampler asks exactly what Optuna's TPE (constant liar off) asks, and fits less."""

from __future__ import annotations

import random

import optuna
import pytest

from ufw.batched_tpe import BatchedTPESampler
from ufw.space import parse_space

RAW_SPACE = {
    "fixed": {"dim": 16, "num_heads": 2},
    "parameters": {
        "schedule": {"type": "categorical", "choices": ["none", "linear", "step"]},
        "alpha_start": {"type": "float", "low": 0.3, "high": 0.95,
                        "condition": {"schedule": ["linear", "step"]}},
        "lr_scale_1": {"type": "float", "low": 0.1, "high": 1.0, "log": True},
        "routing_threshold": {"type": "float", "low": 0.5, "high": 1.0},
    },
    "objectives": [{"metric": "best_ppl", "direction": "minimize"}],
}
SPACE = parse_space(RAW_SPACE)


def asked_in_batches(sampler, history: int = 120, batches: int = 4, size: int = 8):
    """Configurations `sampler` asks in batches after a random history of completed and
    pruned trials; each batch is told (so the next one fits anew)."""
    outcome = random.Random(0)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for i in range(history):
        trial = study.ask()
        SPACE.sample(trial)
        if i % 3 == 0:
            trial.report(outcome.random() + 7, 1)
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        else:
            study.tell(trial, outcome.random())
    study.sampler = sampler
    asked = []
    for _ in range(batches):
        batch = [study.ask() for _ in range(size)]
        asked += [SPACE.sample(trial) for trial in batch]
        for trial in batch:
            study.tell(trial, outcome.random())
    return asked


def test_same_values_as_optunas_tpe_without_constant_liar():
    ours = asked_in_batches(BatchedTPESampler(seed=3))
    optunas = asked_in_batches(optuna.samplers.TPESampler(seed=3, constant_liar=False))
    assert ours == optunas
    assert len({tuple(sorted(p.items())) for p in ours}) == len(ours)  # real, varied draws


def test_fits_once_per_batch_and_group(monkeypatch):
    fits = []
    original = BatchedTPESampler._fit
    monkeypatch.setattr(BatchedTPESampler, "_fit",
                        lambda self, *a: fits.append(1) or original(self, *a))
    asked_in_batches(BatchedTPESampler(seed=3), batches=3, size=8)
    # Per batch: the always-present parameters as one group, alpha_start (conditional) on
    # its own; never once per ask.
    assert 3 <= len(fits) <= 3 * 2


def test_infers_the_search_space_once_per_batch(monkeypatch):
    """The multivariate TPE's search space (the finished trials' intersection) is computed
    when a trial has finished since, not on every ask."""
    calls = []
    original = optuna.samplers.TPESampler.infer_relative_search_space
    monkeypatch.setattr(optuna.samplers.TPESampler, "infer_relative_search_space",
                        lambda self, *a: calls.append(1) or original(self, *a))
    ours = asked_in_batches(BatchedTPESampler(seed=3), batches=3, size=8)
    assert len(calls) == 3  # one per batch of 8
    calls.clear()
    assert ours == asked_in_batches(
        optuna.samplers.TPESampler(seed=3, constant_liar=False), batches=3, size=8)
    assert len(calls) == 3 * 8  # Optuna's own: once per ask


def test_an_optuna_without_the_internals_falls_back(monkeypatch):
    sampler = BatchedTPESampler(seed=3)
    sampler._internals = False
    monkeypatch.setattr(BatchedTPESampler, "_fit",
                        lambda *a: pytest.fail("fitted although the internals are missing"))
    fallback = asked_in_batches(sampler, batches=1)
    assert fallback == asked_in_batches(
        optuna.samplers.TPESampler(seed=3, constant_liar=False), batches=1)


def test_a_tpe_space_uses_it():
    assert isinstance(SPACE.make_sampler(), BatchedTPESampler)


def test_sampler_replicas_draw_what_the_study_actor_records(tmp_path, ray_local):
    """With replicas (real Ray actors), asks are drawn by them from the study's finished
    trials and recorded by the actor: the budget, holders and values hold as without."""
    import ray

    from ufw.sweep.study_service import StudyService

    space = parse_space({**RAW_SPACE, "sampler": {"type": "tpe", "seed": 5,
                                                        "n_startup_trials": 4}})
    service = StudyService(space.to_dict(), str(tmp_path / "study.journal"), "s", 30,
                           replicas=2)
    assert len(service.replicas) == 2
    outcome = random.Random(1)
    asked = []
    for size in (6, 6, 7):
        batch = service.ask(size, "trial-a")
        service.tell([(number, [outcome.random() + 7]) for number, _ in batch])
        asked += batch
    assert [n for n, _ in asked] == list(range(19))
    # every finished trial reached each replica once; the last batch drew from 12 of them
    assert [len(sent) for sent in service._sent] == [12, 12]
    study = service.study
    for number, values in asked:
        trial = study.trials[number]
        assert trial.user_attrs["ufw_holder"] == "trial-a" and trial.params == values
        assert 0.1 <= values["lr_scale_1"] <= 1.0
        assert ("alpha_start" in values) == (values["schedule"] != "none")
    assert len({tuple(sorted(v.items())) for _, v in asked}) == len(asked)  # no twin draws
    assert len(service.ask(20, "trial-b")) == 11  # the budget: 30 in all
    assert service.ask(5, "trial-b") == []

    # A replica that dies: the actor draws itself from then on.
    spare = StudyService(space.to_dict(), str(tmp_path / "other.journal"), "o", 10, replicas=2)
    ray.kill(spare.replicas[0])
    assert len(spare.ask(4, "t")) == 4 and spare.replicas == []
