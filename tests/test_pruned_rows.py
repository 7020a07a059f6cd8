"""Rows of configurations the pruner stopped (status ``pruned``) never pass for finished ones.

The hand-made sweep below gives its pruned configurations the *lowest* PPL and compute cost
(a partly trained model's metrics can be anything), so a table, front, importance or top-K
choice that let one in would show it first: every check here fails if pruned rows count.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ufw.analysis import (
    best_configurations,
    comparison_table,
    config_means,
    format_table,
    importance,
    left_out,
    load_sweep,
    marginal_table,
    top_configurations,
)
from ufw.analysis.plots import plot_comparison, plot_pareto
from ufw.confirm import choose

ROOT = Path(__file__).resolve().parents[1]

N_COMPLETED, N_PRUNED, N_FAILED = 8, 3, 2


def sweep_rows() -> pd.DataFrame:
    """8 completed configurations (PPL driven by ``lr_scale_1``), 3 pruned ones that look
    better than all of them, 2 failed ones, and one configuration with a completed and a pruned
    seed (the pruned seed must not count towards its mean)."""
    rows = []

    def add(cid: str, status: str, ppl: float, scale: float, cost: float, seed: int = 0,
            epochs: int = 10) -> None:
        rows.append({"sweep": "s", "trial_id": f"t-{cid}-{seed}", "member": seed, "seed": seed,
                     "preset": None, "config_id": cid, "status": status, "best_ppl": ppl,
                     "compute_cost": cost, "best_epoch": min(epochs, 4), "acc": 0.5,
                     "shallow_ratio": 0.3, "epochs_run": epochs, "lr_scale_1": scale,
                     "schedule": ["none", "linear"][len(rows) % 2],
                     "error": "diverged: loss is nan" if status == "failed" else None})

    for i in range(N_COMPLETED):
        add(f"c{i}", "completed", 5.0 + 0.5 * i, 0.1 + 0.1 * i, 0.9 - 0.02 * i)
    for i in range(N_PRUNED):  # stopped at epoch 2 with (spuriously) the best numbers
        add(f"p{i}", "pruned", 1.0 + 0.1 * i, 0.95 - 0.01 * i, 0.3, epochs=2)
    for i in range(N_FAILED):
        add(f"f{i}", "failed", float("nan"), 0.5, float("nan"), epochs=1)
    add("mixed", "completed", 6.2, 0.33, 0.85, seed=0)
    add("mixed", "pruned", 1.5, 0.33, 0.85, seed=1, epochs=2)
    return pd.DataFrame(rows)


FINISHED = {f"c{i}" for i in range(N_COMPLETED)} | {"mixed"}
PARAMS = ["lr_scale_1", "schedule"]


def test_left_out_counts_configurations_by_why():
    assert left_out(sweep_rows()) == {"pruned": N_PRUNED, "failed": N_FAILED}


def test_tables_rank_only_completed_and_say_what_was_left_out():
    trials = sweep_rows()
    table = comparison_table(trials, params=PARAMS)
    assert set(table["config_id"]) == FINISHED
    assert table.loc[0, "config_id"] == "c0"  # the best completed, not a pruned one
    mixed = table.set_index("config_id").loc["mixed"]
    assert mixed["n_seeds"] == 1 and mixed["ppl_mean"] == pytest.approx(6.2)
    text = format_table(table)
    assert f"Left out: {N_FAILED} failed, {N_PRUNED} pruned configuration(s)" in text
    assert table.attrs["left_out"] == {"pruned": N_PRUNED, "failed": N_FAILED}

    marginal = marginal_table(trials, "schedule", PARAMS)
    assert marginal["n_configs"].sum() == len(FINISHED)
    assert f"{N_PRUNED} pruned" in format_table(marginal)


def test_fronts_and_top_k_hold_only_completed_configurations():
    trials = sweep_rows()
    front = best_configurations(trials, params=PARAMS)
    # with pruned rows the front would be p0 alone (cheapest and best); without, the completed
    # configurations trade PPL against compute: c0 best PPL, each later one cheaper
    assert set(front["config_id"]) <= FINISHED and "c0" in set(front["config_id"])
    top = top_configurations(trials, 3, PARAMS)
    assert list(top["config_id"]) == ["c0", "c1", "c2"]
    assert top.attrs["left_out"] == {"pruned": N_PRUNED, "failed": N_FAILED}
    means = config_means(trials, PARAMS)
    assert set(means["config_id"]) == FINISHED


def test_importance_sees_only_completed_configurations():
    from ufw.analysis import configuration_study

    trials = sweep_rows()
    study = configuration_study(trials, PARAMS)
    assert {t.user_attrs["config_id"] for t in study.trials} == FINISHED
    assert min(t.value for t in study.trials) == pytest.approx(5.0)
    series = importance(trials, PARAMS)
    # PPL rises with lr_scale_1 among completed configurations; the pruned ones (high scale,
    # low PPL) would reverse that, but they are not in the study
    assert series.index[0] == "lr_scale_1"
    assert series.attrs["left_out"]["pruned"] == N_PRUNED


def test_figures_are_titled_with_what_was_left_out():
    import matplotlib

    matplotlib.use("Agg")
    trials = sweep_rows()
    means = config_means(trials, PARAMS)
    fig = plot_pareto(means, best_configurations(trials, params=PARAMS), "s")
    assert f"left out: {N_FAILED} failed, {N_PRUNED} pruned" in fig.axes[0].get_title()
    fig = plot_comparison(comparison_table(trials, params=PARAMS), "s")
    assert f"{len(FINISHED)} completed configurations" in fig.axes[0].get_title()


def test_confirm_chooses_among_completed_configurations(tmp_path):
    out = tmp_path / "s"
    (out / "trials").mkdir(parents=True)
    pq.write_table(pa.Table.from_pandas(sweep_rows()), out / "trials" / "part.parquet")
    (out / "sweep.json").write_text(json.dumps({"space": {"parameters": [
        {"name": "layer_lr_scales.1"}, {"name": "schedule"}]}}))
    sweep = load_sweep(out)
    chosen = choose(sweep, 4)  # mixed would lead (mean 3.85) if its pruned seed counted
    assert list(chosen["config_id"]) == ["c0", "c1", "c2", "mixed"]


def test_sweep_summary_ranks_only_completed_rows(tmp_path):
    from ufw.sweep.driver import summary
    from ufw.sweep.plan import build_parser, make_plan

    plan = make_plan(build_parser().parse_args([
        str(ROOT / "search_spaces" / "alpha_lr.yaml"), "--results", str(tmp_path),
        "--name", "s"]))
    trials = sweep_rows().assign(device="cpu")
    (tmp_path / "s" / "trials").mkdir(parents=True)
    pq.write_table(pa.Table.from_pandas(trials), tmp_path / "s" / "trials" / "part-x.parquet")
    text = summary(plan, top=3)
    ranked = text.split("Re-train")[0]
    assert "c0" in ranked and not any(f"p{i}" in ranked for i in range(N_PRUNED))
    assert "--config-id c0" in text
    assert f"Rows: {N_COMPLETED + 1} completed, {N_FAILED} failed, {N_PRUNED + 1} pruned" in text
