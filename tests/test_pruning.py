"""Multi-fidelity sweeps: the study actor's pruning rule, budget and holders; pruned and
refilled configurations in real sweeps (real Ray, real Optuna)."""

from __future__ import annotations

import json
import math

import optuna
import pandas as pd
import pytest

from ufw import sweep
from ufw.space import parse_space
from ufw.study import load_study
from ufw.sweep.study_service import HOLDER, ORPHAN, StudyService

SPACE = {"fixed": {"dim": 16, "num_heads": 2},
         "parameters": {"lr": {"type": "float", "low": 1e-3, "high": 1e-2}},
         "sampler": {"type": "random", "seed": 3}}
ASHA = {"pruner": "asha", "min_resource": 1, "reduction_factor": 3, "max_resource": 9}


def service(tmp_path, num_samples: int, pruning=None, resume: bool = False) -> StudyService:
    return StudyService(parse_space(SPACE).to_dict(), str(tmp_path / "study.journal"), "s",
                        num_samples, pruning, resume)


def test_asha_decisions_follow_the_successive_halving_rule(tmp_path):
    """Nine configurations report one epoch each, in this order: with reduction factor 3
    a configuration goes on only if its value is within the best third of those seen at the
    rung so far (at least the best one): worked out by hand, 6, 7, 8 and 9 stop."""
    study = service(tmp_path, 9, ASHA)
    numbers = [n for n, _ in study.ask(9, "t")]
    values = [5, 4, 3, 6, 2, 7, 1, 8, 9]
    pruned = [study.report([(n, 1, float(v))]) for n, v in zip(numbers, values)]
    assert [v for v, p in zip(values, pruned) if p] == [6, 7, 8, 9]
    # Optuna's own pruner on a study of its own, fed the same reports, decides the same.
    reference = optuna.create_study(pruner=optuna.pruners.SuccessiveHalvingPruner(
        min_resource=1, reduction_factor=3))
    expected = []
    for v in values:
        trial = reference.ask()
        trial.report(float(v), 1)
        expected.append(trial.should_prune())
    assert [bool(p) for p in pruned] == expected
    states = [t.state for t in load_study(str(tmp_path / "study.journal")).trials]
    assert states.count(optuna.trial.TrialState.PRUNED) == 4  # told to the study as pruned
    # A decision stands: reported again (a trial re-run from a checkpoint), still pruned.
    assert study.report([(numbers[3], 1, 0.5)]) == [numbers[3]]
    # Promoted configurations go on to the next rung (epoch 3) and are judged there.
    assert study.report([(numbers[2], 2, 2.0)]) == []
    assert study.report([(numbers[2], 3, 2.0)]) == []  # the first at rung 1: promoted


def test_the_actor_says_where_its_time_went(tmp_path):
    study = service(tmp_path, 5, ASHA)
    assert study.load() == {}
    numbers = [n for n, _ in study.ask(2, "t")] + [n for n, _ in study.ask(2, "t")]
    study.report([(n, 1, 1.0) for n in numbers])
    study.tell([(numbers[0], [1.0])])
    calls = {phase: n for phase, (n, _seconds) in study.load().items()}
    # no sampler replicas here: nothing was drawn in them
    assert calls == {"ask, waiting for another ask": 2, "ask, sampling or recording": 2,
                     "report": 1, "tell": 1}


def test_median_and_hyperband_pruners_are_optunas(tmp_path):
    from ufw.sweep.study_service import make_pruner

    assert isinstance(make_pruner({"pruner": "median", "min_resource": 2}),
                      optuna.pruners.MedianPruner)
    assert isinstance(make_pruner({**ASHA, "pruner": "hyperband"}),
                      optuna.pruners.HyperbandPruner)
    assert isinstance(make_pruner(None), optuna.pruners.NopPruner)
    with pytest.raises(ValueError, match="allowed"):
        make_pruner({"pruner": "bogus"})


def test_budget_holders_and_orphans(tmp_path):
    study = service(tmp_path, 5)
    cohort = study.ask(2, "searcher")
    study.hold("trial-a", [n for n, _ in cohort])
    study.ask(2, "trial-a")  # asked by trial-a after its last checkpoint: its refills
    assert study.remaining() == 1
    assert len(study.ask(3, "searcher")) == 1  # never more than num_samples
    assert study.ask(1, "searcher") == []
    study.tell([(cohort[0][0], [3.0]), (cohort[1][0], None)])
    # trial-a restarts from a checkpoint that held only its cohort: the refills are orphans,
    # closed as failed and given back to the budget.
    study.hold("trial-a", [n for n, _ in cohort])
    trials = load_study(str(tmp_path / "study.journal")).trials
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL", "FAIL", "FAIL", "RUNNING"]
    assert [bool(t.user_attrs.get(ORPHAN)) for t in trials] == [False, False, True, True, False]
    assert study.remaining() == 2
    # A resumed sweep: what the searcher had asked but not handed out is an orphan too.
    resumed = service(tmp_path, 5, resume=True)
    trials = load_study(str(tmp_path / "study.journal")).trials
    assert trials[4].user_attrs[HOLDER] == "searcher" and trials[4].state.name == "FAIL"
    assert resumed.remaining() == 3
    resumed.end("trial-a")  # nothing of trial-a is running: nothing changes
    assert [t.state.name for t in load_study(str(tmp_path / "study.journal")).trials][:2] == [
        "COMPLETE", "FAIL"]


def test_a_resumed_study_does_not_draw_again_what_it_drew_before(tmp_path):
    """A seeded sampler restarted with the sweep (--resume) would repeat its first draws:
    the resumed study actor draws from a seed of its own."""
    study = service(tmp_path, 6)
    drawn = [values for _, values in study.ask(3, "trial-a")]
    resumed = service(tmp_path, 6, resume=True)
    again = [values for _, values in resumed.ask(3, "trial-b")]
    assert len(again) == 3 and not [v for v in again if v in drawn]


def test_cohort_searcher_state_is_json_and_restores(ray_local, tmp_path):
    from ufw.sweep.study_service import start_service

    space = parse_space(SPACE)
    actor = start_service({"sweep": "js"}, space.to_dict(), str(tmp_path / "study.journal"),
                          5, False)  # (a handle must be held, as the driver does)
    searcher = sweep.CohortSearcher(space, "js", 2)
    first = suggest_when_ready(searcher, "a")
    assert len(first["members"]) == 2 and len(first["numbers"]) == 2
    searcher.save(str(tmp_path / "searcher.json"))
    with open(tmp_path / "searcher.json") as f:
        assert list(json.load(f)["pending"]) == ["a"]  # JSON, not a pickle
    # The driver is killed and resumed: a new study actor over the same journal, and a
    # searcher restored from its JSON, which hands the pending trial the same points.
    actor = start_service({"sweep": "js"}, space.to_dict(), str(tmp_path / "study.journal"),
                          5, True)
    restored = sweep.CohortSearcher(space, "js", 2)
    restored.restore(str(tmp_path / "searcher.json"))
    assert restored.suggest("a") == first  # the same pending points
    assert len(suggest_when_ready(restored, "b")["members"]) == 2
    assert len(suggest_when_ready(restored, "c")["members"]) == 1  # 5 = 2 + 2 + 1
    assert suggest_when_ready(restored, "d") == "FINISHED"
    del actor


def suggest_when_ready(searcher, trial_id: str, tries: int = 600):
    """What Tune does: ask again while the searcher answers None (its cohort is being asked)."""
    for _ in range(tries):
        suggestion = searcher.suggest(trial_id)
        if suggestion is not None:
            return suggestion
    raise AssertionError("the cohort never became ready")


PRUNED_SPACE = """
parameters:
  lr: {type: float, low: 0.0001, high: 0.05, log: true}
sampler: {type: random, seed: 7}
"""


def test_asha_sweep_prunes_and_refills_population_slots(ray_local, tiny_space, tmp_path,
                                                        capsys):
    """12 configurations, cohorts of 3 on 2 CPUs: pruned configurations hand their slots to
    new ones, so fewer than 4 Ray trials train all 12, each exactly once."""
    results = tmp_path / "results"
    space = tiny_space(PRUNED_SPACE, max_epochs=6, patience=6)
    assert sweep.main([str(space), "--num-samples", "12", "--cohort", "3", "--pruner", "asha",
                       "--results", str(results), "--name", "p"]) == 0
    # The driver counts what ended, and its ETA counts configurations, not the trials
    # planned (refills spend the budget).
    out = capsys.readouterr().out
    assert "[p] configurations ended: " in out
    last = [line for line in out.splitlines() if line.startswith("[p] trials ")][-1]
    assert "of at most 4 |" in last and "configurations ended: 12/12 |" in last, last
    assert last.endswith("ETA 0s"), last
    frame = pd.read_parquet(results / "p" / "trials")
    assert len(frame) == 12 and frame["config_id"].is_unique
    assert frame["optuna_number"].notna().all() and frame["optuna_number"].is_unique
    # A refilling trial writes what ended with its checkpoints (parts numbered n), before
    # its last part: its rows reach Parquet while it runs.
    trials_dir = results / "p" / "trials"
    numbered = list(trials_dir.glob("part-*.*.parquet"))
    assert numbered, sorted(p.name for p in trials_dir.iterdir())
    for part in numbered:
        last = trials_dir / f"{part.name.split('.')[0]}.parquet"
        assert part.stat().st_mtime < last.stat().st_mtime
        assert pd.read_parquet(part)["ended_at"].max() < pd.read_parquet(last)[
            "finished_at"].max()
    statuses = frame["status"].value_counts().to_dict()
    assert statuses.get("pruned", 0) >= 1 and statuses.get("completed", 0) >= 1, statuses
    pruned = frame[frame["status"] == "pruned"]
    assert (pruned["epochs_run"] < 6).all() and pruned["best_ppl"].notna().all()
    assert frame.groupby("trial_id").size().max() > 3  # a trial trained more than its cohort
    study = load_study(str(results / "p" / "study.journal"))
    by_number = {t.number: t.state.name for t in study.trials}
    for number, status in zip(frame["optuna_number"], frame["status"]):
        assert by_number[int(number)] == {"pruned": "PRUNED", "completed": "COMPLETE"}[status]
    assert all(not math.isnan(t) for t in frame["ended_at"])
    # the epochs table keeps a pruned configuration's curve up to where it stopped
    epochs = pd.read_parquet(results / "p" / "epochs")
    for _, row in pruned.iterrows():
        curve = epochs[epochs["config_id"] == row["config_id"]]
        assert curve["epoch"].max() == row["epochs_run"]


def test_a_sweep_without_pruner_refills_and_waits_for_slots_of_its_shape(ray_local, tiny_space,
                                                                        tmp_path):
    """No pruner: early-stopped configurations hand their slots on too (two Ray trials of 3
    train all 12). The space has two shapes (dense FFN or 2 experts): a refill of the other
    shape waits for a slot
    of its own (or for its trial's populations to end), and every configuration is trained
    exactly once."""
    results = tmp_path / "results"
    space = tiny_space(PRUNED_SPACE.replace("parameters:\n", "parameters:\n  num_experts: "
                                            "{type: categorical, choices: [1, 2]}\n"),
                       max_epochs=4, patience=0)
    assert sweep.main([str(space), "--num-samples", "12", "--cohort", "3",
                       "--results", str(results), "--name", "w"]) == 0
    frame = pd.read_parquet(results / "w" / "trials")
    assert len(frame) == 12 and frame["config_id"].is_unique
    assert set(frame["status"]) == {"completed"} and set(frame["num_experts"]) == {1, 2}
    assert frame["optuna_number"].is_unique
    assert frame.groupby("trial_id").size().max() > 3  # a trial trained more than its cohort


def test_cohort_1_uses_ray_tunes_asha_scheduler(ray_local, tiny_space, tmp_path):
    results = tmp_path / "results"
    space = tiny_space(PRUNED_SPACE, max_epochs=6, patience=6)
    assert sweep.main([str(space), "--num-samples", "8", "--cohort", "1", "--pruner", "asha",
                       "--reduction-factor", "2", "--results", str(results),
                       "--name", "r"]) == 0
    frame = pd.read_parquet(results / "r" / "trials")
    assert len(frame) == 8 and set(frame["status"]) <= {"pruned", "completed"}
    assert (frame["status"] == "pruned").sum() >= 1
    assert (frame.loc[frame["status"] == "pruned", "epochs_run"] < 6).all()
    states = [t.state.name for t in load_study(str(results / "r" / "study.journal")).trials]
    assert states.count("PRUNED") == (frame["status"] == "pruned").sum()


@pytest.mark.slow
def test_pruned_sweep_killed_and_resumed_keeps_every_configuration_once(ray_local, tiny_space,
                                                                        tmp_path):
    """SIGKILL of the driver mid-trial and as a part is written, then --resume: pruning
    decisions already taken stand, and each of the 12 configurations has one row."""
    from test_faults import Driver, count

    results, name = tmp_path / "results", "pk"
    space = tiny_space(PRUNED_SPACE, max_epochs=6, patience=6)
    base = [str(space), "--results", str(results), "--address", ray_local, "--name", name,
            "--cohort", "3", "--pruner", "asha"]
    driver = Driver(*base, "--num-samples", "12")
    driver.wait_for(lambda: any((results / name / "ray").glob("*/checkpoint_*")))
    assert driver.kill()
    driver.finish()
    # --address, no --max-concurrent: every trial and its cohort at once, and it says so
    assert "Optuna samples every configuration before any result" in driver.errors
    driver = Driver(*base, "--resume")
    driver.wait_for(lambda: count(results, name, "epochs") > 0)
    driver.kill()
    driver.finish()
    driver = Driver(*base, "--resume")
    assert driver.finish() == 0, driver.output
    frame = pd.read_parquet(results / name / "trials")
    assert len(frame) == 12 and frame["config_id"].is_unique, frame[["config_id", "status"]]
    assert frame["optuna_number"].is_unique
    assert set(frame["status"]) <= {"completed", "pruned"}
    study = load_study(str(results / name / "study.journal"))
    states = {t.number: t.state.name for t in study.trials}
    for number, status in zip(frame["optuna_number"], frame["status"]):
        assert states[int(number)] == {"pruned": "PRUNED", "completed": "COMPLETE"}[status]
    # Everything else the study holds was asked after a checkpoint and lost with a driver:
    # closed as an orphan, not trained, not counted.
    others = [t for t in study.trials if t.number not in set(frame["optuna_number"])]
    assert all(t.state.name == "FAIL" and t.user_attrs.get(ORPHAN) for t in others)


def test_a_tpe_sweep_with_sampler_replicas_records_what_they_drew(ray_local, tiny_space,
                                                                  tmp_path, monkeypatch):
    """On a driver machine with the cores for them, the study actor's TPE draws come from
    sampler replicas (here 2, as on a machine with 8 cores): a pruned, refilling sweep still
    trains 12 configurations, each once, and the study holds exactly their parameters."""
    from ufw.sweep import study_service

    monkeypatch.setattr(study_service, "replicas_for_this_machine", lambda: 2)
    results = tmp_path / "results"
    space = tiny_space(PRUNED_SPACE.replace("random, seed: 7",
                                            "tpe, seed: 7, n_startup_trials: 3"),
                       max_epochs=6, patience=6)
    assert sweep.main([str(space), "--num-samples", "12", "--cohort", "3", "--pruner", "asha",
                       "--results", str(results), "--name", "r"]) == 0
    frame = pd.read_parquet(results / "r" / "trials")
    assert len(frame) == 12 and frame["config_id"].is_unique
    study = load_study(str(results / "r" / "study.journal"))
    trained = {t.number: t for t in study.trials if not t.user_attrs.get(ORPHAN)}
    assert sorted(trained) == sorted(int(n) for n in frame["optuna_number"])
    for number, lr in zip(frame["optuna_number"], frame["lr"]):
        assert trained[int(number)].params["lr"] == pytest.approx(lr)
    # asked in batches larger than one, some configurations came from the replicas
    assert any("fixed_params" in t.system_attrs for t in trained.values())
