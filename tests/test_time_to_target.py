"""bench/time_to_target.py's numbers, on two hand-made sweeps whose answers are worked out by
hand (the script's sweeps themselves need the GPU and ufw.sweep --pruner)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pandas as pd
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ttt():
    import sys

    sys.path.insert(0, str(ROOT / "bench"))  # the script imports bench/common.py as `common`
    try:
        spec = importlib.util.spec_from_file_location("time_to_target",
                                                      ROOT / "bench" / "time_to_target.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # its dataclass looks its module up by name
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT / "bench"))
    return module


def rows(spec: list[tuple], **columns) -> pd.DataFrame:
    """(config_id, status, best_ppl, finished_at) per row."""
    return pd.DataFrame([{"trial_id": f"t{i}", "config_id": c, "status": s, "best_ppl": p,
                          "finished_at": f, **{k: v[i] for k, v in columns.items()}}
                         for i, (c, s, p, f) in enumerate(spec)])


NAN = float("nan")
# (a) no pruning: launched at 1000 on 2 GPUs, ran 100 s; best PPL 7.0 (c4, 50 s after launch)
FULL = rows([("c1", "completed", 10.0, 1010.0), ("c2", "completed", 8.0, 1020.0),
             ("c3", "completed", 9.0, 1030.0), ("c4", "completed", 7.0, 1050.0),
             ("c5", "failed", NAN, 1005.0)], train_seconds=[20.0, 20.0, 30.0, 40.0, 10.0])
# (b) ASHA: launched at 5000 on 2 GPUs, ran 40 s; one Ray trial (finished_at 5040) whose
# configurations ended one after another (ended_at; c2's is missing: finished_at stands in)
PRUNING = rows([("c1", "pruned", 12.0, 5040.0), ("c4", "pruned", 9.5, 5040.0),
                ("c6", "completed", 7.05, 5040.0), ("c2", "completed", 8.0, 5040.0),
                ("c7", "failed", NAN, 5040.0)],
               ended_at=[5005.0, 5006.0, 5010.0, NAN, 5003.0],
               trial_train_seconds=[6.0] * 5)


def test_compare_on_hand_made_sweeps(ttt):
    full = ttt.SweepRun(FULL, launched_at=1000.0, wall_seconds=100.0, gpus=2)
    pruning = ttt.SweepRun(PRUNING, launched_at=5000.0, wall_seconds=40.0, gpus=2)
    record = ttt.compare(full, pruning, slots=2)
    assert record["best_ppl_no_pruning"] == 7.0
    assert record["target_ppl"] == pytest.approx(7.07)
    # (a) reaches 7.0 at 1050: 50 s x 2 GPUs; (b) finishes c6 (7.05 <= 7.07) at 5010: 10 s x 2
    assert record["gpu_seconds_to_target"] == {"no_pruning": 100.0, "asha": 20.0}
    assert record["asha_over_no_pruning"] == pytest.approx(0.2)
    assert record["best_over_time_no_pruning"] == [(20.0, 10.0), (40.0, 8.0), (100.0, 7.0)]
    assert record["best_over_time_asha"] == [(20.0, 7.05)]  # c2 (8.0, at 80) is no improvement
    # top 1% of (a)'s 4 completed configurations: at least one, c4, which (b) pruned
    assert record["top_1pct_of_no_pruning"] == {
        "top_configurations": 1, "in_pruning_sweep": 1, "pruned": 1, "pruned_fraction": 1.0,
        "pruned_fraction_of_drawn": 1.0}
    # rows with a result: 4 of (a)'s in 200 GPU-s; 4 of (b)'s (pruned count) in 80 GPU-s
    assert record["configurations_per_gpu_hour"] == {
        "no_pruning": pytest.approx(4 / (200 / 3600)), "asha": pytest.approx(4 / (80 / 3600))}
    assert record["rows"]["asha"] == {"pruned": 2, "completed": 2, "failed": 1}
    # training time (one row per Ray trial here) over wall time x 2 trial slots: (a)'s rows
    # have only each member's train_seconds (rows from before trial_train_seconds), (b)'s
    # the trial's time in its epochs
    assert record["training_share"] == {"no_pruning": pytest.approx(120 / 200),
                                        "asha": pytest.approx(30 / 80)}
    json.dumps(record)  # the record is written as JSON


def test_top_share_counts_configurations_the_pruning_sweep_never_drew(ttt):
    # top 3 of (a): c4, c2, c3; (b) drew c4 (pruned) and c2 (completed), never c3
    top = ttt.top_configurations_pruned(FULL, PRUNING, share=0.75)
    assert top["top_configurations"] == 3 and top["in_pruning_sweep"] == 2
    assert top["pruned"] == 1
    assert top["pruned_fraction"] == pytest.approx(1 / 3)
    assert top["pruned_fraction_of_drawn"] == pytest.approx(0.5)


def test_target_never_reached_and_no_ended_at(ttt):
    full = ttt.SweepRun(FULL, launched_at=1000.0, wall_seconds=100.0, gpus=1)
    worse = ttt.SweepRun(PRUNING.drop(columns="ended_at").query("config_id != 'c6'"),
                         launched_at=5000.0, wall_seconds=40.0, gpus=1)
    record = ttt.compare(full, worse)
    assert record["gpu_seconds_to_target"]["asha"] is None
    assert record["asha_over_no_pruning"] is None
    assert record["best_over_time_asha"] == [(40.0, 8.0)]  # finished_at stands in
    together = ttt.SweepRun(FULL.assign(finished_at=1050.0), 1000.0, 100.0, 1)
    assert ttt.best_over_time(together) == [(50.0, 7.0)]  # one trial's rows: one point
    assert not math.isnan(record["configurations_per_gpu_hour"]["asha"])


def test_seeded_space_fixes_the_sampler_seed_once(ttt, tmp_path):
    space = ROOT / "search_spaces" / "alpha_lr.yaml"
    copy, seed = ttt.seeded_space(space, 7, tmp_path)
    assert copy.parent == tmp_path and seed == 7
    text = yaml.safe_load(copy.read_text())
    assert text["sampler"]["seed"] == 7
    assert text["parameters"] == yaml.safe_load(space.read_text())["parameters"]
    again, seed = ttt.seeded_space(copy, 99, tmp_path / "unused")
    assert again == copy and seed == 7  # a space's own seed wins


def curves(spec: dict[str, list[float]]) -> pd.DataFrame:
    """Epochs rows: config_id -> validation PPL per epoch from 1 (one seed)."""
    return pd.DataFrame([{"config_id": c, "epoch": e, "val_ppl": v, "seed": 0}
                         for c, values in spec.items() for e, v in enumerate(values, 1)])


def test_successive_halving_replayed_on_full_curves(ttt):
    # 6 configurations, rungs at epochs 1, 3 (reduction factor 3, then 9: nobody gets there).
    # Epoch 1: best 6 // 3 = 2 go on (a: 9, b: 10); c's 10 ties b's and is kept too.
    # Epoch 3 (best so far): a 8.0, b 9.5, c 7.0 -> 3 // 3 = 1 goes on: c; a and b stop.
    # f stopped on its own after epoch 1 (patience) but was still ranked at rung 1.
    epochs = curves({"a": [9, 8.5, 8.0, 7.9], "b": [10, 9.5, 9.7, 9.6],
                     "c": [10, 8, 7.0, 6.5], "d": [11, 6, 5, 4], "e": [12, 12, 12, 12],
                     "f": [13]})
    assert ttt.successive_halving_replay(epochs) == {"a", "b", "d", "e", "f"}
    # grace period of 3 epochs: one rung at 3 of all 5 that trained that far -> 5 // 3 = 1
    assert ttt.successive_halving_replay(epochs, min_resource=3) == {"a", "b", "c", "e"}
    # a later-good configuration (d: 11 at epoch 1, 5 at 3) is what the rule loses
    full = ttt.SweepRun(rows([(c, "completed", float(min(v)), 1000.0) for c, v in
                              {"a": [7.9], "b": [9.5], "c": [6.5], "d": [4.0], "e": [12.0],
                               "f": [13.0]}.items()]), 1000.0, 10.0, 1, epochs=epochs)
    replayed = ttt.top_configurations_in_replay(full, 1, 3, share=0.3)
    assert replayed["top_configurations"] == 2  # d and c
    assert replayed["stopped"] == 1 and replayed["stopped_fraction"] == 0.5
    assert replayed["all_stopped_fraction"] == pytest.approx(5 / 6)
    assert ttt.top_configurations_in_replay(ttt.SweepRun(FULL, 0.0, 1.0, 1), 1, 3) is None


def test_rungs_follow_the_pruning_flags(ttt):
    assert ttt.rungs("") == {"min_resource": 1, "reduction_factor": 3}
    assert ttt.rungs("--reduction-factor 4 --min-resource 2 --max-resource 20") == {
        "min_resource": 2, "reduction_factor": 4}
