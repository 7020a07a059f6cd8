"""ufw.analysis on hand-made frames whose answers are known, plus the CLI's user errors.

write_results() builds a small but realistic results directory (Parquet parts, as the sweep
driver writes them); test_notebooks.py reuses it.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ufw.analysis import (
    AnalysisError,
    best_configurations,
    comparison_table,
    config_means,
    describe,
    display_table,
    epoch_curves,
    format_table,
    importance,
    load_results,
    load_sweep,
    marginal_table,
    pareto_front,
    threshold_curves,
    threshold_pareto,
    to_markdown,
)

ROOT = Path(__file__).resolve().parents[1]
T_975_DF2 = 4.302652729749464  # Student t quantile 0.975 with 2 degrees of freedom (tables)

# preset -> (layer weights L1/L2/L3, routing threshold, typical best PPL)
PRESETS = {
    "standard_llm": ((0.0, 0.0, 1.0), 0.0, 5.00),
    "lpt": ((1 / 3, 1 / 3, 1 / 3), 0.0, 5.25),
    "asymmetric_best": ((0.7, 0.0, 0.3), 0.95, 4.70),
    "deep_focus": ((0.3, 0.0, 0.7), 0.95, 4.95),
}
THRESHOLDS = [0.0, 0.5, 0.7, 0.9, 0.95, 1.0]


def _curve(deep_ppl: float, strength: float) -> str:
    """Routed PPL/compute per threshold: 0 routes all deep, lower thresholds route more shallow."""
    points = []
    for t in THRESHOLDS:
        shallow = 0.0 if t == 0 else strength * (1.0 - t) + 0.02
        points.append({"threshold": t, "ppl": deep_ppl * (1 + 0.4 * shallow**2),
                       "compute_cost": 1 - shallow * 2 / 3, "shallow_ratio": shallow})
    return json.dumps(points)


def _row(sweep: str, trial_id: str, member: int, seed: int, preset: str | None,
         config_id: str, weights, threshold: float, ppl: float, rng, **extra) -> dict:
    shallow = 0.0 if threshold == 0 else float(rng.uniform(0.2, 0.5))
    row = {
        "sweep": sweep, "trial_id": trial_id, "member": member, "seed": seed,
        "preset": preset, "config_id": config_id,
        "alpha_start": float("nan"), "alpha_end": float("nan"), "schedule": "none",
        "layer_weight_1": weights[0], "layer_weight_2": weights[1], "layer_weight_3": weights[2],
        "lr_scale_1": 1.0, "lr_scale_2": 1.0, "lr_scale_3": 1.0,
        "routing_threshold": threshold, "exit_layer": 1, "lr": 1e-3, "dim": 64, "num_layers": 3,
        "best_ppl": ppl, "best_epoch": int(rng.integers(3, 9)), "acc": 0.5 - 0.01 * ppl,
        "shallow_ratio": shallow, "compute_cost": 1 - shallow * 2 / 3,
        "epochs_run": 10, "train_seconds": float(rng.uniform(5, 9)),
        "status": "completed", "error": None,
        "ufw_version": "0.1.0", "torch_version": "2.13.0", "device": "cpu",
        "dataset": "python-docs", "threshold_curve": _curve(ppl, 0.6 if threshold else 0.8),
    }
    row.update(extra)
    return row


def _epochs(row: dict) -> list[dict]:
    n = row["epochs_run"]
    return [{"sweep": row["sweep"], "trial_id": row["trial_id"], "member": row["member"],
             "epoch": e, "train_loss": 2.5 - 0.08 * e,
             "val_ppl": row["best_ppl"] * (1 + 0.5 * math.exp(-e)) if row["best_ppl"] == row[
                 "best_ppl"] else float("nan"),
             "alpha": row["alpha_start"], "config_id": row["config_id"],
             "shallow_ratio": row["shallow_ratio"],
             "compute_cost": row["compute_cost"]} for e in range(n)]


def write_results(root: Path, sweep: str = "quickstart", seeds: int = 3,
                  samples: int = 12) -> Path:
    """A results directory like the sweep driver's: one Parquet part per trial.

    Presets are trials whose members are seed replicates; ``samples`` more trials hold
    sampled configurations (preset null) whose PPL is driven by ``alpha_start`` and ``lr``,
    plus one pruned and one failed member, so every code path has data.
    """
    rng = np.random.default_rng(0)
    out = root / sweep
    parts: dict[str, list[dict]] = {}
    for p, (preset, (weights, threshold, ppl)) in enumerate(PRESETS.items()):
        tid = f"preset{p}"
        parts[tid] = [
            _row(sweep, tid, m, 42 + m, preset, f"cfg-{preset}", weights, threshold,
                 ppl + float(rng.normal(0, 0.04)), rng)
            for m in range(seeds)
        ]
    for i in range(samples):
        tid = f"sample{i}"
        a, lr = float(rng.uniform(0.1, 0.9)), float(10 ** rng.uniform(-4, -2))
        weights = (a, 0.0, 1 - a)
        ppl = 4.5 + 2.0 * (a - 0.7) ** 2 + 0.3 * abs(math.log10(lr) + 3)
        parts[tid] = [
            _row(sweep, tid, m, 42 + m, None, f"cfg-s{i}", weights, 0.9,
                 ppl + float(rng.normal(0, 0.02)), rng, alpha_start=a, lr=lr,
                 schedule=["constant", "cosine"][i % 2], alpha_end=a / 2 if i % 2 else a)
            for m in range(2)
        ]
    bad = parts["sample0"]
    bad[1].update(status="pruned", epochs_run=2)
    parts["failed"] = [_row(sweep, "failed", 0, 42, None, "cfg-f", (0.5, 0, 0.5), 0.9,
                            float("nan"), rng, status="failed", error="CUDA out of memory",
                            threshold_curve=None, best_epoch=None)]
    for kind in ("trials", "epochs"):
        (out / kind).mkdir(parents=True, exist_ok=True)
    for tid, rows in parts.items():
        pq.write_table(pa.Table.from_pylist(rows), out / "trials" / f"{tid}.parquet")
        epochs = [e for r in rows for e in _epochs(r)]
        pq.write_table(pa.Table.from_pylist(epochs), out / "epochs" / f"{tid}.parquet")
    return out


def frame(groups: dict[str, list[float]], **columns) -> pd.DataFrame:
    """Trials with the given PPL per seed for each preset (other metrics fixed)."""
    rows = []
    for g, ppls in groups.items():
        for s, ppl in enumerate(ppls):
            rows.append({"trial_id": f"{g}-{s}", "member": 0, "seed": s, "preset": g,
                         "config_id": f"id-{g}", "status": "completed", "best_ppl": ppl,
                         "best_epoch": 4 + s, "shallow_ratio": 0.25, "compute_cost": 0.8,
                         **columns})
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- table

def test_means_ci_and_rank():
    trials = frame({"a": [10.0, 12.0, 14.0], "b": [9.0, 9.5, 10.0], "c": [20.0]})
    table = comparison_table(trials).set_index("model")
    assert table.loc["a", "n_seeds"] == 3
    assert table.loc["a", "ppl_mean"] == pytest.approx(12.0)
    assert table.loc["a", "ppl_std"] == pytest.approx(2.0)
    half = T_975_DF2 * 2.0 / math.sqrt(3)
    assert table.loc["a", "ci_low"] == pytest.approx(12.0 - half)
    assert table.loc["a", "ci_high"] == pytest.approx(12.0 + half)
    assert table.loc["a", "best_epoch"] == pytest.approx(5.0)
    assert table.loc["a", "compute_pct"] == pytest.approx(80.0)
    assert table.loc["a", "shallow_ratio"] == pytest.approx(0.25)
    assert list(table.index) == ["b", "a", "c"]  # sorted by rank
    assert table["rank"].tolist() == [1, 2, 3]


def test_single_seed_ci_is_undefined_and_said():
    table = comparison_table(frame({"a": [10.0, 11.0], "solo": [9.0]}))
    solo = table.set_index("model").loc["solo"]
    assert math.isnan(solo["ci_low"]) and math.isnan(solo["ci_high"])
    assert any("1 configuration(s) with one seed" in n for n in table.attrs["notes"])
    shown = display_table(table).set_index("Configuration")
    assert shown.loc["solo", "95% CI"] == "" and shown.loc["a", "95% CI"].startswith("[")


def test_ties_share_rank_and_other_confidence():
    table = comparison_table(frame({"a": [5.0, 7.0], "b": [6.0, 6.0]}), confidence=0.9)
    assert table["rank"].tolist() == [1, 1]
    a = table.set_index("model").loc["a"]
    from scipy import stats
    half = stats.t.ppf(0.95, 1) * math.sqrt(2) / math.sqrt(2)
    assert a["ci_high"] - a["ppl_mean"] == pytest.approx(half)


def test_significance_clear_and_unclear():
    trials = frame({
        "standard_llm": [10.0, 10.1, 9.9, 10.05],
        "better": [8.0, 8.1, 7.9, 8.05],
        "same": [10.2, 9.2, 11.2, 9.9],
        "solo": [7.0],
    })
    table = comparison_table(trials).set_index("model")  # baseline standard_llm by default
    assert table.loc["better", "ppl_change_pct"] == pytest.approx(-20.0, abs=0.3)
    assert table.loc["better", "significant"]
    assert table.loc["better", "p_value"] < 1e-4
    assert not table.loc["same", "significant"]
    assert table.loc["same", "p_value"] > 0.3
    assert pd.isna(table.loc["solo", "significant"])  # one seed: no test possible
    assert pd.isna(table.loc["standard_llm", "significant"])
    assert table.loc["standard_llm", "ppl_change_pct"] == pytest.approx(0.0)
    text = format_table(table.reset_index())
    assert "PPL vs standard_llm" in text and "*" in text


def test_explicit_baseline_and_welch_p():
    from scipy import stats
    a, b = [5.0, 5.5, 6.0], [7.0, 9.0, 8.0, 7.5]
    table = comparison_table(frame({"a": a, "b": b}), baseline="b").set_index("model")
    assert table.loc["a", "p_value"] == pytest.approx(stats.ttest_ind(a, b, equal_var=False).pvalue)
    with pytest.raises(AnalysisError, match="nope"):
        comparison_table(frame({"a": a}), baseline="nope")


def test_only_completed_rows_count():
    trials = frame({"a": [10.0, 12.0]})
    extra = frame({"a": [1.0, float("nan")]}).assign(status=["pruned", "failed"])
    table = comparison_table(pd.concat([trials, extra], ignore_index=True))
    assert table.loc[0, "n_seeds"] == 2 and table.loc[0, "ppl_mean"] == pytest.approx(11.0)


def test_null_preset_keeps_its_configuration_and_baseline_by_config_id():
    trials = frame({"a": [10.0, 11.0], "b": [12.0, 13.0]})
    trials.loc[trials["preset"] == "b", "preset"] = None
    table = comparison_table(trials, baseline="id-a")  # a baseline named by its config_id
    assert table["config_id"].tolist() == ["id-a", "id-b"]
    assert table.set_index("config_id").loc["id-b", "ppl_change_pct"] == pytest.approx(
        100 * (12.5 / 10.5 - 1))
    with pytest.raises(AnalysisError, match="wat"):
        marginal_table(trials, "wat")


def quickstart_frame(seeds: int = 1) -> pd.DataFrame:
    """What `ufw.sweep search_spaces/quickstart.yaml` writes: every row names the space's
    preset, but 8 sampled configurations differ from it (and from each other); one of them is
    the preset exactly."""
    rng = np.random.default_rng(3)
    rows = []
    for i in range(8):
        thr, w1, lr = ((0.95, 0.7, 1e-3) if i == 0 else
                       (float(rng.uniform(0.5, 1)), float(rng.uniform(0.1, 0.9)),
                        float(10 ** rng.uniform(-3.5, -2))))
        for s in range(seeds):
            rows.append({"trial_id": f"t{i // 4}", "member": (i % 4) * seeds + s, "seed": 42 + s,
                         "preset": "asymmetric_best", "config_id": f"cfg{i}",
                         "status": "completed", "routing_threshold": thr,
                         "exit_thresholds": json.dumps([thr]), "layer_weight_1": w1,
                         "layer_weight_2": 0.0, "layer_weight_3": 0.3, "lr": lr, "dim": 32,
                         "schedule": "none", "best_ppl": 17 + i + 0.1 * s,
                         "compute_cost": 0.99, "shallow_ratio": 0.02, "best_epoch": 2})
    return pd.DataFrame(rows)


def test_quickstart_sweep_is_one_row_per_configuration():
    table = comparison_table(quickstart_frame())
    assert len(table) == 8 and table["config_id"].is_unique
    assert (table["n_seeds"] == 1).all() and table["ci_low"].isna().all()
    labels = table.set_index("config_id")["model"]
    assert labels["cfg0"] == "asymmetric_best"  # the preset exactly
    assert labels.drop("cfg0").str.startswith("thr .").all()  # the others: what was varied
    assert labels.is_unique and not labels.drop("cfg0").str.contains("asymmetric").any()
    text = format_table(table)
    assert "Seeds" in text and "[" not in text.split("\n")[2]  # no CI with one seed
    assert "One row per configuration (8)" in text


def test_ci_only_with_two_or_more_seeds():
    trials = pd.concat([quickstart_frame(seeds=3).query("config_id == 'cfg1'"),
                        quickstart_frame(seeds=1).query("config_id == 'cfg2'")])
    table = comparison_table(trials).set_index("config_id")
    assert table.loc["cfg1", "n_seeds"] == 3 and np.isfinite(table.loc["cfg1", "ci_low"])
    assert table.loc["cfg2", "n_seeds"] == 1 and np.isnan(table.loc["cfg2", "ci_low"])
    shown = display_table(comparison_table(trials)).set_index("config_id")
    assert shown.loc["cfg1", "95% CI"].startswith("[") and shown.loc["cfg2", "95% CI"] == ""


def test_labels_describe_what_the_sweep_varied():
    row = pd.Series({"schedule": "linear", "alpha_start": 0.49, "alpha_end": 0.11,
                     "alpha_steps": "[]", "lr_scale_1": 0.2, "lr_scale_2": 0.74,
                     "lr_scale_3": 0.18, "routing_threshold": 0.95, "num_layers": 3})
    params = ["schedule", "alpha_start", "alpha_end", "lr_scale_1", "lr_scale_2", "lr_scale_3",
              "routing_threshold"]
    assert describe(row, params) == "linear .49->.11, lr .20/.74/.18, thr .95"
    assert describe(pd.Series({"schedule": "none"}), ["schedule"]) == "no alpha"
    assert describe(pd.Series({"lr": 0.0024, "dim": 64}), ["lr", "dim"]) == "lr 2.4e-3, dim 64"


def test_marginal_is_over_configurations_not_seeds():
    trials = quickstart_frame(seeds=3)
    trials["schedule"] = np.where(trials["config_id"].isin(["cfg0", "cfg1", "cfg2"]),
                                  "none", "linear")
    table = marginal_table(trials, "schedule").set_index("group")
    assert table.loc["none", "n_configs"] == 3 and table.loc["none", "n_rows"] == 9
    means = [17.1, 18.1, 19.1]  # the three configurations' seed means
    assert table.loc["none", "ppl_mean"] == pytest.approx(np.mean(means))
    assert table.loc["none", "ppl_sd"] == pytest.approx(np.std(means, ddof=1))
    text = format_table(marginal_table(trials, "schedule"))
    assert "Configurations" in text and "across configurations" in text
    assert "Seeds" not in text and "CI" not in text


def test_markdown_formatter():
    df = pd.DataFrame({"name": ["x", "longer"], "v": [1.5, 10.25]})
    lines = to_markdown(df).splitlines()
    assert len({len(line) for line in lines}) == 1
    assert lines[0].startswith("| name") and lines[1].endswith(":|")  # numbers right-aligned
    assert "10.25" in lines[3]


# ----------------------------------------------------------------------------- Pareto

def test_pareto_front_constructed():
    pts = pd.DataFrame({
        "compute_cost": [1, 2, 3, 2, 4, 5, 4, 0.5, np.nan],
        "best_ppl": [10, 8, 8, 9, 5, 6, 5, 12, 1],
        "name": list("abcdefghi"),
    })
    front = pareto_front(pts)
    assert front["name"].tolist() == ["h", "a", "b", "e", "g"]  # sorted by compute; dup kept
    assert front["compute_cost"].is_monotonic_increasing
    assert front["best_ppl"].is_monotonic_decreasing


def test_threshold_curves_and_front(tmp_path):
    trials, _ = load_results(write_results(tmp_path, samples=2))
    curves = threshold_curves(trials)
    std = curves[curves["model"] == "standard_llm"]
    assert len(std) == len(THRESHOLDS) and (std["n_seeds"] == 3).all()
    raw = threshold_curves(trials, average_seeds=False)
    assert len(raw) == len(THRESHOLDS) * (completed_rows := (trials["status"] == "completed").sum())
    assert completed_rows == 4 * 3 + 3
    front = threshold_pareto(trials)
    assert front["compute_cost"].is_monotonic_increasing
    assert front["ppl"].is_monotonic_decreasing
    # a hand check: no curve point is both cheaper and better than a front point
    for _, p in front.iterrows():
        dominated = (curves["compute_cost"] <= p["compute_cost"]) & (curves["ppl"] <= p["ppl"]) & (
            (curves["compute_cost"] < p["compute_cost"]) | (curves["ppl"] < p["ppl"]))
        assert not dominated.any()


def test_threshold_pareto_known_points():
    curves = [
        [{"threshold": 0, "ppl": 5.0, "compute_cost": 1.0, "shallow_ratio": 0},
         {"threshold": 0.5, "ppl": 6.0, "compute_cost": 0.6, "shallow_ratio": 0.6}],
        [{"threshold": 0, "ppl": 5.5, "compute_cost": 1.0, "shallow_ratio": 0},
         {"threshold": 0.5, "ppl": 5.8, "compute_cost": 0.7, "shallow_ratio": 0.45}],
    ]
    trials = frame({"a": [5.0], "b": [5.5]}).assign(threshold_curve=[json.dumps(c) for c in curves])
    front = threshold_pareto(trials)
    assert list(zip(front["model"], front["threshold"])) == [("a", 0.5), ("b", 0.5), ("a", 0.0)]


def test_best_configurations_average_seeds():
    trials = pd.concat([
        frame({"cheap": [6.0, 6.2]}, compute_cost=0.5),
        frame({"good": [5.0, 5.2]}, compute_cost=0.9),
        frame({"worse": [6.5, 6.5]}, compute_cost=0.8),
        frame({"lucky": [4.0, 9.0]}, compute_cost=0.9),  # one great seed, bad on average
    ], ignore_index=True)
    best = best_configurations(trials)
    assert best["config_id"].tolist() == ["id-good", "id-cheap"]
    assert best.loc[0, "best_ppl"] == pytest.approx(5.1) and best.loc[0, "n_seeds"] == 2
    assert best.loc[0, "preset"] == "good"
    only_ppl = best_configurations(trials, {"best_ppl": "min"})
    assert only_ppl["config_id"].tolist() == ["id-good"]
    cheap_acc = best_configurations(trials.assign(acc=trials["best_ppl"]),
                                    {"acc": "max", "compute_cost": "min"})
    assert cheap_acc["config_id"].tolist() == ["id-worse", "id-cheap"]


def test_config_means_and_epoch_curves(tmp_path):
    trials, epochs = load_results(write_results(tmp_path, samples=2))
    means = config_means(trials).set_index("model")
    std = trials[(trials["preset"] == "standard_llm")]
    assert means.loc["standard_llm", "n_seeds"] == 3
    assert means.loc["standard_llm", "best_ppl"] == pytest.approx(std["best_ppl"].mean())
    assert means.loc["standard_llm", "ppl_std"] == pytest.approx(std["best_ppl"].std())
    assert means.set_index("config_id").loc["cfg-s0", "n_seeds"] == 1  # pruned seed left out
    assert "layer_weight_1" in means.columns and "trial_id" not in means.columns
    curves = epoch_curves(trials, epochs)
    lpt = curves[curves["model"] == "lpt"]
    assert lpt["epoch"].tolist() == list(range(10)) and (lpt["n"] == 3).all()
    first = epochs.merge(trials.loc[trials["preset"] == "lpt", ["trial_id", "member"]])
    assert lpt["val_ppl"].iloc[0] == pytest.approx(first.loc[first["epoch"] == 0, "val_ppl"].mean())
    assert epoch_curves(trials, epochs.iloc[:0]).empty


# ----------------------------------------------------------------------------- importance

def test_importance_ranks_driver_above_noise():
    rng = np.random.default_rng(1)
    n = 60
    lr = 10 ** rng.uniform(-4, -2, n)
    noise = rng.uniform(0, 1, n)
    schedule = rng.choice(["constant", "cosine"], n)
    trials = pd.DataFrame({
        "trial_id": [f"t{i}" for i in range(n)], "member": 0, "seed": 42, "preset": None,
        "config_id": [f"c{i}" for i in range(n)], "status": "completed",
        "lr": lr, "noise": noise, "schedule": schedule, "dim": 64,  # dim constant: skipped
        "best_ppl": 5 + 2 * np.abs(np.log10(lr) + 3) + rng.normal(0, 0.05, n),
        "compute_cost": 1.0, "acc": 0.5,
    })
    imp = importance(trials)
    assert set(imp.index) == {"lr", "noise", "schedule"}
    assert imp.index[0] == "lr" and imp["lr"] > 2 * imp["noise"]
    assert imp.sum() == pytest.approx(1.0)
    copy = importance(trials.assign(lr_copy=trials["lr"]))
    assert "lr_copy" not in copy.index and "lr" in copy.index
    maxed = importance(trials.assign(acc=-trials["best_ppl"]), target="acc", direction="max",
                       params=["lr", "noise"])
    assert maxed.index[0] == "lr"


def test_importance_one_entry_per_swept_knob(tmp_path):
    """exit_thresholds of a one-exit model copies routing_threshold: one knob, one entry."""
    trials = quickstart_frame()
    inferred = importance(trials)
    assert set(inferred.index) == {"routing_threshold", "layer_weight_1", "lr"}
    out = tmp_path / "quickstart-1"
    (out / "trials").mkdir(parents=True)
    pq.write_table(pa.Table.from_pandas(trials), out / "trials" / "part-t.parquet")
    space = {"parameters": [{"name": "routing_threshold"}, {"name": "layer_weights.1"}],
             "fixed": {"preset": "asymmetric_best"}}
    (out / "sweep.json").write_text(json.dumps({"space": space}))
    sweep = load_sweep(out)
    assert sweep.params == ["routing_threshold", "layer_weight_1"]
    assert sweep.fixed_preset == "asymmetric_best" and sweep.name == "quickstart-1"
    assert set(importance(sweep.trials, sweep.params).index) == set(sweep.params)


def test_default_results_is_the_newest_sweep(tmp_path, monkeypatch):
    from ufw.analysis import default_results, latest_sweep

    monkeypatch.chdir(tmp_path)
    with pytest.raises(AnalysisError, match="no sweep under results"):
        default_results()
    old, new = (write_results(tmp_path / "results", sweep=n, samples=1) for n in ("b-1", "a-2"))
    os.utime(old / "trials", (1, 1))
    os.utime(new / "trials", (2, 2))
    assert latest_sweep("results") == "results/a-2"
    monkeypatch.setenv("UFW_RESULTS", str(old))
    assert default_results() == str(old) and load_sweep().name == "b-1"


def test_importance_needs_something_to_vary():
    with pytest.raises(AnalysisError, match="varying"):
        importance(frame({"a": [5.0, 6.0]}))


def test_importance_fanova_needs_sklearn():
    trials = frame({"a": [5.0], "b": [6.0], "c": [7.0]}).assign(lr=[1e-3, 2e-3, 3e-3])
    try:
        import sklearn  # noqa: F401
    except ImportError:
        with pytest.raises(AnalysisError, match="scikit-learn"):
            importance(trials, method="fanova")
    else:
        assert importance(trials, method="fanova").index[0] == "lr"


# ----------------------------------------------------------------------------- loading

def test_load_results_roundtrip(tmp_path):
    path = write_results(tmp_path)
    trials, epochs = load_results(path)
    assert len(trials) == 4 * 3 + 12 * 2 + 1
    assert set(trials["status"]) == {"completed", "pruned", "failed"}
    assert len(epochs) == trials["epochs_run"].sum()
    assert trials["preset"].isna().sum() == 12 * 2 + 1
    table = comparison_table(trials)
    assert table.loc[0, "model"] == "cfg-s0" or table["rank"].is_monotonic_increasing


def test_load_results_merges_differing_parts(tmp_path):
    out = tmp_path / "s"
    (out / "trials").mkdir(parents=True)
    base = {"trial_id": "a", "member": 0, "seed": 1, "status": "completed",
            "best_ppl": 5.0, "compute_cost": 1.0}
    pq.write_table(pa.Table.from_pylist([{**base, "preset": None}]), out / "trials" / "a.parquet")
    pq.write_table(pa.Table.from_pylist([{**base, "trial_id": "b", "steps": 3, "preset": "x"}]),
                   out / "trials" / "b.parquet")
    pq.write_table(pa.Table.from_pylist([base]), out / "trials" / ".b.parquet.tmp")
    trials, epochs = load_results(out)
    assert sorted(trials["trial_id"]) == ["a", "b"] and "steps" in trials.columns
    assert trials["preset"].tolist() == [None, "x"] or trials["preset"].isna().sum() == 1
    assert epochs.empty and "val_ppl" in epochs.columns
    both, _ = load_results(tmp_path)  # the parent of several sweeps reads them all
    assert len(both) == 2


def test_load_results_errors(tmp_path):
    with pytest.raises(AnalysisError, match="no such results directory"):
        load_results(tmp_path / "missing")
    (tmp_path / "empty" / "trials").mkdir(parents=True)
    with pytest.raises(AnalysisError, match="no results"):
        load_results(tmp_path / "empty")
    out = _without_column(tmp_path, "best_ppl")
    with pytest.raises(AnalysisError, match="best_ppl"):
        load_results(out)


def _without_column(tmp_path: Path, column: str) -> Path:
    path = write_results(tmp_path / "src", samples=2)
    out = tmp_path / "broken"
    (out / "trials").mkdir(parents=True)
    trials, _ = load_results(path)
    pq.write_table(pa.Table.from_pandas(trials.drop(columns=[column])),
                   out / "trials" / "part.parquet")
    return out


# ----------------------------------------------------------------------------- CLI

def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    return subprocess.run([sys.executable, "-m", "ufw.analysis", *map(str, args)],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=120,
                          check=False)


def test_cli_table_formats(tmp_path):
    path = write_results(tmp_path, samples=2)
    md = _cli(path)
    assert md.returncode == 0, md.stderr
    assert "| Rank" in md.stdout and "standard_llm" in md.stdout and "95% CI" in md.stdout
    csv = _cli(path, "--format", "csv", "--baseline", "lpt")
    assert csv.returncode == 0, csv.stderr
    from io import StringIO
    table = pd.read_csv(StringIO(csv.stdout))
    assert {"rank", "model", "ppl_mean", "ci_low", "ppl_change_pct", "significant"} <= set(
        table.columns)
    html = _cli(path, "--format", "html", "--by", "schedule")
    assert html.returncode == 0 and "<table" in html.stdout
    assert "Configurations" in html.stdout and "across configurations" in html.stdout


def test_cli_missing_dir(tmp_path):
    result = _cli(tmp_path / "nowhere")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0 and "nowhere" in result.stderr


def test_cli_missing_column(tmp_path):
    result = _cli(_without_column(tmp_path, "status"))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0 and "status" in result.stderr


def test_cli_bad_group_and_baseline(tmp_path):
    path = write_results(tmp_path, samples=2)
    for args, word in ((["--by", "nosuch"], "nosuch"), (["--baseline", "nosuch"], "nosuch")):
        result = _cli(path, *args)
        assert result.returncode == 2 and word in result.stderr
        assert "Traceback" not in result.stderr


def test_every_written_column_that_is_not_a_knob_is_never_taken_for_a_parameter():
    """A column ufw writes that varies between configurations but is not configured (a
    time, a study number) must not turn up in labels or marginals as a swept knob."""
    from ufw.analysis.configurations import NON_PARAM_COLUMNS
    from ufw.config import UniversalConfig
    from ufw.results import RESULT_TYPES

    epochs_table_only = {"epoch", "train_loss", "val_ppl", "val_bpc", "alpha", "epoch_seconds"}
    knobs = set(UniversalConfig().flat())
    assert not set(RESULT_TYPES) - knobs - epochs_table_only - NON_PARAM_COLUMNS
