"""Slots of a population pruned and refilled mid-run (Population.prune / replace).

A refilled slot must train exactly as its configuration would in a fresh population (own
parameters from its seed, own optimizer state and step count, own epoch count for the alpha
schedule), while the other members go on as if nothing happened.
"""

import pytest
import torch

from ufw import tensorfile
from ufw.config import AlphaSchedule, ConfigError, preset
from ufw.data import make_corpus, python_docs_text
from ufw.train import Population

TINY = {"dim": 16, "num_heads": 2, "batch_size": 8, "seq_len": 32, "max_epochs": 5,
        "patience": 10}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Models this small gain nothing from intra-op threads, and on a machine whose cores
    are busy the threads' synchronisation makes an epoch many times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def corpus():
    text = python_docs_text()
    return make_corpus("python-docs-slice", text[:5000], text[-2000:], batch_size=8, seq_len=32)


def tiny(name: str, **changes):
    return preset(name).with_overrides({**TINY, **changes})


# Dynamic alpha schedules and layer-wise LRs: a member's epoch and step count both matter.
A = tiny("asymmetric_best", seed=1, alpha_schedule=AlphaSchedule("linear", 0.9, 0.3))
B = tiny("layer_lr_decreasing", seed=2, lr=2e-3,
         alpha_schedule=AlphaSchedule("cosine", 0.8, 0.2))
C = tiny("layer_lr_increasing", seed=3, lr=3e-3, grad_clip=0.5, weight_decay=0.05,
         routing_threshold=0.8, alpha_schedule=AlphaSchedule("step", 0.9, 0.5, [1, 2]))


def curve(rows: list[dict], member: int) -> list[tuple]:
    return [(r["epoch"], r["alpha"], r["train_loss"], r["val_ppl"]) for r in rows
            if r["member"] == member]


def run(population: Population, epochs: int) -> list[dict]:
    return [row for _ in range(epochs) for row in population.run_epoch()]


def untimed(rows: list[dict]) -> list[dict]:
    """Rows without their wall-clock times (which no two runs share)."""
    return [{k: v for k, v in r.items() if k not in ("epoch_seconds", "train_seconds")}
            for r in rows]


def assert_same_curve(got: list[tuple], expected: list[tuple]) -> None:
    assert [g[0] for g in got] == [e[0] for e in expected]  # the member's own epochs
    assert [g[1] for g in got] == pytest.approx([e[1] for e in expected])  # its alpha
    for g, e in zip(got, expected, strict=True):
        assert g[2:] == pytest.approx(e[2:], rel=1e-5), f"epoch {e[0]}"


def test_refilled_slot_trains_as_a_fresh_population_and_neighbours_are_undisturbed(corpus):
    population = Population([A, B], corpus)
    before = run(population, 2)
    [row] = population.replace([0], [C])
    assert (row["seed"], row["epochs_run"], row["status"]) == (A.seed, 2, "running")
    assert population.epochs == [0, 2] and population.epoch == 2
    after = run(population, 3)

    fresh = Population([C], corpus)
    assert_same_curve(curve(after, 0), curve(run(fresh, 3), 0))
    # The schedule restarted: C's alpha at its own epochs 0, 1, 2, not the population's 2, 3, 4.
    assert [r[1] for r in curve(after, 0)] == pytest.approx([0.9, 0.7, 0.5])
    alone = Population([B], corpus)
    assert_same_curve(curve(before + after, 1), curve(run(alone, 5), 0))
    assert population.members[1].status == "completed" and population.epochs == [3, 5]
    assert population.members[0].status == "running" and not population.finished
    results = population.results()
    assert results[0]["seed"] == C.seed and results[0]["epochs_run"] == 3
    assert results[0]["best_ppl"] == pytest.approx(fresh.results()[0]["best_ppl"], rel=1e-5)


def test_slots_refilled_together_each_train_as_a_fresh_population(corpus):
    """A sweep refills all of an epoch's freed slots of a population in one call (one write
    per tensor): each new member still trains as alone, and the member between them as if
    nothing happened."""
    D = tiny("asymmetric_best", seed=4, lr=1.5e-3)
    population = Population([A, B, D], corpus)
    before = run(population, 1)
    population.replace([2, 0], [A, C])  # out of order: each slot gets its own configuration
    assert [c.seed for c in population.configs] == [C.seed, B.seed, A.seed]
    assert population.epochs == [0, 1, 0]
    after = run(population, 2)
    for slot, config in ((0, C), (2, A)):
        assert_same_curve(curve(after, slot), curve(run(Population([config], corpus), 2), 0))
    assert_same_curve(curve(before + after, 1), curve(run(Population([B], corpus), 3), 0))


def test_replace_returns_the_slots_row_before_refilling(corpus):
    population = Population([A, B], corpus)
    run(population, 1)
    expected = population.results()[1]
    assert population.replace([1], [C]) == [expected]
    assert population.configs[1] is population.objective.configs[1]
    assert population.configs[1].seed == C.seed and population.members[1].epochs_run == 0
    assert population.optimizer.steps.tolist() == [len(corpus.train_x), 0]


def test_pruned_member_is_frozen_and_reports_the_epoch_it_reached(corpus):
    population = Population([A, B], corpus)
    run(population, 2)
    population.prune(0)
    frozen = population.model.member_state(0)
    rows = run(population, 2)
    assert {r["member"] for r in rows} == {1} and [r["epoch"] for r in rows] == [3, 4]
    for name, p in population.model.member_state(0).items():
        assert torch.equal(p, frozen[name]), name
    assert not torch.equal(population.model.member_state(1)["head"],
                           Population([A, B], corpus).model.member_state(1)["head"])
    pruned, running = population.results()
    assert (pruned["status"], pruned["epochs_run"], running["status"]) == ("pruned", 2, "running")
    assert 1 <= pruned["best_epoch"] <= 2 and pruned["best_ppl"] > 1
    assert population.epochs == [2, 4]
    run(population, 1)
    assert population.finished  # no member running: B completed, A pruned
    population.prune(1)  # already completed: it stays so
    assert population.results()[1]["status"] == "completed"


def test_state_round_trip_after_a_refill_continues_identically(corpus, tmp_path):
    population = Population([A, B], corpus)
    run(population, 1)
    population.replace([0], [C])
    run(population, 1)
    path = tmp_path / "population.safetensors"
    tensorfile.save(path, population.state_dict(), tensorfile.CHECKPOINT)
    restored = Population([A, B], corpus)  # as a resumed trial builds it: its first configs
    restored.load_state_dict(tensorfile.load(path, tensorfile.CHECKPOINT))
    assert restored.configs[0] == C and restored.objective.configs[0] == C
    assert restored.epochs == population.epochs == [1, 2]
    assert restored.optimizer.steps.tolist() == population.optimizer.steps.tolist()
    assert untimed(run(restored, 1)) == untimed(run(population, 1))
    assert untimed(restored.results()) == untimed(population.results())


def test_a_state_with_one_shared_step_count_and_epoch_still_loads(corpus):
    """Checkpoints from before per-member counts: one scalar `steps`, one `epoch`."""
    population = Population([A, B], corpus)
    run(population, 1)
    state = population.state_dict()
    state["optimizer"]["steps"] = state["optimizer"]["steps"][0].clone()
    del state["epochs"], state["configs"]
    restored = Population([A, B], corpus)
    restored.load_state_dict(state)
    assert restored.epochs == [1, 1]
    assert restored.optimizer.steps.tolist() == [len(corpus.train_x)] * 2


def test_can_host_refuses_what_would_change_the_traced_structure(corpus):
    population = Population([A, B], corpus)
    assert population.can_host(C)
    assert not population.can_host(C.with_overrides({"dim": 32}))  # another shape
    assert not population.can_host(C.with_overrides({"max_epochs": 6}))
    assert not population.can_host(C.with_overrides({"confidence_method": "entropy"}))
    assert not population.can_host(C.with_overrides({"distillation_alpha": 0.5}))
    with pytest.raises(ConfigError, match="cannot refill slot 1"):
        population.replace([1], [C.with_overrides({"num_layers": 4})])
    assert population.configs[1] == B  # refused before anything changed


def test_a_refill_that_fits_no_free_slot_waits_instead_of_starting_a_population(corpus):
    """A sweep's refill of another shape than the freed slot's (a swept dim, expert count or
    confidence method) waits for a slot it fits, instead of starting a population of its own
    (and its own compilation) at every epoch; without free slots it starts one."""
    from ufw.sweep.cohort import Cohort

    spec = {"sweep": "t", "fixed": {**TINY, "preset": "asymmetric_best"}, "overrides": {},
            "seeds": 1, "objectives": [["best_ppl", "minimize"]], "data": {}}
    cohort = Cohort(spec, lambda configs: Population(configs, corpus))
    assert cohort.add([{"lr": 1e-3}, {"lr": 2e-3}], [0, 1]) == []
    cohort.run_epoch()
    cohort.prune([0])
    free = cohort.free_slots()
    assert free == [(0, [0])]
    wider, fitting = {"lr": 1e-3, "dim": 24}, {"lr": 3e-3}
    assert cohort.add([wider, fitting], [2, 3], free) == [0]  # the dim-24 point waits
    assert len(cohort.populations) == 1 and len(cohort.points) == 3
    assert cohort.populations[0].configs[0].lr == 3e-3 and cohort.numbers[2] == 3
    assert cohort.add([wider], [2]) == []  # no free slots given: a population of its own
    assert len(cohort.populations) == 2 and cohort.populations[1].configs[0].dim == 24
    rows = cohort.result_rows({})
    assert [(r["optuna_number"], r["status"]) for r in rows] == [
        (0, "pruned"), (1, "running"), (3, "running"), (2, "running")]
