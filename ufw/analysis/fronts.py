"""Pareto fronts and per-configuration curves (routing threshold curves, learning curves).

Everything here is per configuration: seeds of one ``config_id`` are averaged (``n_seeds``
says over how many), and each configuration carries its label (``model``) from
configurations.config_means, so curves, fronts and the comparison table name it alike.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from ufw.analysis.configurations import config_means
from ufw.analysis.loading import AnalysisError, completed, require


def non_dominated(values: np.ndarray) -> np.ndarray:
    """Mask of rows no other row dominates (all objectives minimised).

    A row is dominated when another is at least as good everywhere and better somewhere; exact
    duplicates do not dominate each other, so both stay. O(n^2) in numpy: fine for sweeps of
    thousands of rows, and the rule is easy to check.
    """
    keep = np.ones(len(values), dtype=bool)
    for i, v in enumerate(values):
        no_worse = (values <= v).all(axis=1)
        better = (values < v).any(axis=1)
        keep[i] = not (no_worse & better).any()
    return keep


def pareto_front(df: pd.DataFrame, x: str = "compute_cost", y: str = "best_ppl") -> pd.DataFrame:
    """The non-dominated rows of ``df`` with both ``x`` and ``y`` minimised, sorted by ``x``.

    With the defaults: the configurations for which no other is both cheaper and better.
    Rows with a missing ``x`` or ``y`` cannot be placed and are left out.
    """
    require(df, (x, y), "rows", "the frame")
    valid = df[df[x].notna() & df[y].notna()]
    front = valid[non_dominated(valid[[x, y]].to_numpy(dtype=float))]
    return front.sort_values([x, y], kind="stable").reset_index(drop=True)


def best_configurations(
    trials: pd.DataFrame,
    objectives: Mapping[str, str] | None = None,
    params: Sequence[str] | None = None,
) -> pd.DataFrame:
    """The configurations no other beats on every objective, averaged over seeds.

    ``objectives`` maps a column to ``"min"``/``"minimize"`` or ``"max"``/``"maximize"``
    (default: PPL and compute cost, both minimised). Seeds of one configuration are averaged
    first (config_means), so a configuration is judged on its mean, not on one lucky seed.
    Returns the Pareto-optimal rows of config_means, sorted by the first objective (best
    first). With a single objective that is the best configuration (and any exact ties).
    """
    objectives = {k: str(v)[:3] for k, v in (objectives or {"best_ppl": "min",
                                                            "compute_cost": "min"}).items()}
    bad = {k: v for k, v in objectives.items() if v not in ("min", "max")}
    if not objectives or bad:
        raise AnalysisError(f"objectives must map columns to 'min' or 'max', got {objectives}")
    require(trials, ["config_id", *objectives], "trials", "the frame")
    means = config_means(trials, params, extra=list(objectives))
    sign = np.array([1.0 if d == "min" else -1.0 for d in objectives.values()])
    values = means[list(objectives)].to_numpy(dtype=float) * sign
    ok = np.isfinite(values).all(axis=1)
    front = means[ok][non_dominated(values[ok])]
    lead, how = next(iter(objectives.items()))
    return front.sort_values(lead, ascending=how == "min", kind="stable").reset_index(drop=True)


def top_configurations(trials: pd.DataFrame, n: int, params: Sequence[str] | None = None,
                       metric: str = "best_ppl", direction: str = "min") -> pd.DataFrame:
    """The ``n`` best configurations by their mean ``metric`` (config_means rows)."""
    means = config_means(trials, params, extra=[metric])
    return means.sort_values(metric, ascending=direction.startswith("min"),
                             kind="stable").head(n).reset_index(drop=True)


def _curve(text: object) -> list[dict]:
    if text is None or (isinstance(text, float) and math.isnan(text)):
        return []
    points = json.loads(text) if isinstance(text, (str, bytes)) else list(text)
    return [dict(p) for p in points]


def threshold_curves(trials: pd.DataFrame, average_seeds: bool = True,
                     params: Sequence[str] | None = None) -> pd.DataFrame:
    """Expand the ``threshold_curve`` JSON of completed rows into one row per threshold.

    Rows carry ``model`` (the configuration's label), ``config_id``, and the curve's
    ``threshold``, ``ppl``, ``compute_cost``, ``shallow_ratio``, sorted by configuration and
    threshold. With ``average_seeds`` (default) a configuration's seeds are averaged at each
    threshold (``n_seeds``), because an operating point should be chosen from what a
    configuration does on average, not from its luckiest seed; otherwise every member keeps
    its own curve (with ``trial_id``, ``member``, ``seed``).
    """
    require(trials, ("threshold_curve", "config_id"), "trials", "the frame")
    done = completed(trials)
    names = dict(zip(*config_means(trials, params)[["config_id", "model"]].to_numpy().T))
    keys = [c for c in ("sweep", "trial_id", "member", "seed", "preset", "config_id")
            if c in done.columns]
    rows = []
    for _, row in done.iterrows():
        try:
            points = _curve(row["threshold_curve"])
        except (ValueError, TypeError) as exc:
            raise AnalysisError(
                f"threshold_curve of trial {row['trial_id']} is not a JSON list: {exc}"
            ) from None
        for p in points:
            rows.append({"model": names[row["config_id"]], **{k: row[k] for k in keys}, **p})
    metrics = ["threshold", "ppl", "compute_cost", "shallow_ratio"]
    if not rows:
        return pd.DataFrame(columns=["model", *keys, *metrics])
    curves = pd.DataFrame(rows)
    if not average_seeds:
        return curves.sort_values(["model", "threshold"], kind="stable").reset_index(drop=True)
    group = ["config_id", "model", "threshold"]
    present = [m for m in metrics[1:] if m in curves.columns]
    grouped = curves.groupby(group, sort=False, dropna=False)
    out = grouped[present].mean()
    out["n_seeds"] = grouped.size()
    return out.reset_index().sort_values(["model", "threshold"], kind="stable").reset_index(
        drop=True)


def threshold_pareto(trials: pd.DataFrame, average_seeds: bool = True,
                     params: Sequence[str] | None = None) -> pd.DataFrame:
    """Pareto front over every (configuration, routing threshold) operating point.

    Routing trades PPL for compute after training, so the best deployable points come from the
    threshold curves, not just each run's trained threshold. Minimises ``compute_cost`` and
    ``ppl``; see threshold_curves for ``average_seeds``.
    """
    curves = threshold_curves(trials, average_seeds=average_seeds, params=params)
    return pareto_front(curves, x="compute_cost", y="ppl")


def epoch_curves(trials: pd.DataFrame, epochs: pd.DataFrame,
                 params: Sequence[str] | None = None) -> pd.DataFrame:
    """Mean validation PPL (and train loss) per configuration and epoch, over its seeds.

    ``model`` is the configuration's label, as in comparison_table. Members stop early at
    different epochs; ``n`` says how many members each mean covers. Epochs are numbered as the
    results number them.
    """
    columns = ["config_id", "model", "epoch", "val_ppl", "train_loss", "n"]
    if epochs.empty:
        return pd.DataFrame(columns=columns)
    done = completed(trials)
    labels = config_means(trials, params)[["config_id", "model"]]
    keys = [c for c in ("sweep", "trial_id", "member") if c in done.columns and c in epochs]
    names = done[[*keys, "config_id"]].drop_duplicates(keys).merge(labels, on="config_id")
    joined = epochs.drop(columns=[c for c in ("config_id", "model") if c in epochs.columns])
    joined = joined.merge(names, on=keys, how="inner")
    values = [c for c in ("val_ppl", "train_loss") if c in joined.columns]
    grouped = joined.groupby(["config_id", "model", "epoch"], sort=True)
    out = grouped[values].mean()
    out["n"] = grouped.size()
    return out.reset_index()
