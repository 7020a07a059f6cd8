"""Comparison tables: one row per configuration (its seeds are the replicates), or an explicit
marginal over configurations grouped by one column.

Statistics: the Student t interval over a configuration's seeds, only where it has >= 2, and
Welch's t-test (unequal variances) against a baseline configuration's seeds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import stats

from ufw.analysis.configurations import config_means, swept_columns
from ufw.analysis.loading import AnalysisError, completed, left_out_note

DEFAULT_BASELINE = "standard_llm"  # the seed framework's reference model, when a sweep has it


def t_interval(values: np.ndarray, confidence: float) -> tuple[float, float]:
    """``mean -+ t(1-(1-confidence)/2, n-1) * std/sqrt(n)``; NaNs for fewer than 2 values."""
    n = len(values)
    if n < 2:
        return math.nan, math.nan
    mean = float(values.mean())
    half = stats.t.ppf(0.5 + confidence / 2, n - 1) * float(values.std(ddof=1)) / math.sqrt(n)
    return mean - half, mean + half


def welch_p(a: np.ndarray, b: np.ndarray) -> float:
    """Welch's t-test p-value of two samples' means; NaN when either has < 2 values."""
    if len(a) < 2 or len(b) < 2:
        return math.nan
    p = stats.ttest_ind(a, b, equal_var=False).pvalue
    return float(p) if np.isfinite(p) else math.nan


def find_configuration(table: pd.DataFrame, name: str) -> int:
    """Index of the configuration called ``name``: its label, its config_id, or the one
    configuration that is preset ``name`` exactly."""
    for col in ("model", "config_id"):
        hits = table.index[table[col].astype(str) == name]
        if len(hits):
            break
    if len(hits) != 1:
        which = "no" if len(hits) == 0 else "more than one"
        shown = "; ".join(table["model"].head(12).astype(str))
        more = "; ..." if len(table) > 12 else ""
        raise AnalysisError(f"{which} configuration matches baseline {name!r}; name one by its "
                            f"label or config_id (configurations: {shown}{more})")
    return int(hits[0])


def comparison_table(
    trials: pd.DataFrame,
    baseline: str | None = None,
    confidence: float = 0.95,
    params: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Compare configurations over their seeds: one row per configuration (``config_id``).

    Per configuration: ``model`` (its label, see configurations.configuration_labels),
    ``config_id``, ``preset``, the swept values, ``n_seeds`` (completed seeds),
    ``ppl_mean``, ``ppl_std`` (over seeds), ``ci_low``/``ci_high`` (Student t interval, only
    with >= 2 seeds: one seed says nothing about the spread over seeds), ``best_epoch``,
    ``shallow_ratio``, ``acc`` (means), ``compute_pct`` (mean compute cost in %), and against
    the baseline: ``ppl_change_pct`` = ``100 * (mean / baseline_mean - 1)``, ``p_value`` of
    Welch's t-test between the seeds of both, ``significant`` = p < 1 - confidence (NA where
    either side has < 2 seeds); ``rank``: 1 = lowest mean PPL (ties share it).

    ``baseline``: a configuration's label or config_id (default: the configuration that is
    ``standard_llm`` exactly, when the sweep has one; else no comparison). ``params``: the
    swept columns (from the sweep's record; inferred when not given). Sorted by rank.
    Only completed rows are compared; the notes count the configurations left out (pruned,
    failed), and ``attrs["left_out"]`` holds those counts.
    """
    if not 0 < confidence < 1:
        raise AnalysisError(f"confidence must be in (0, 1), got {confidence}")
    done = completed(trials)
    if done.empty:
        raise AnalysisError("no completed trials to compare")
    params = swept_columns(trials, params)
    means = config_means(trials, params)
    samples = {cid: g["best_ppl"].to_numpy(dtype=float)
               for cid, g in done.groupby("config_id", sort=False, dropna=False)}
    table = pd.DataFrame({
        "model": means["model"], "config_id": means["config_id"],
        **({"preset": means["preset"]} if "preset" in means.columns else {}),
        **{p: means[p] for p in params if p in means.columns and p != "preset"},
        "n_seeds": means["n_seeds"], "ppl_mean": means["best_ppl"], "ppl_std": means["ppl_std"],
    })
    intervals = [t_interval(samples[cid], confidence) for cid in table["config_id"]]
    table["ci_low"] = [lo for lo, _ in intervals]
    table["ci_high"] = [hi for _, hi in intervals]
    for col in ("best_epoch", "shallow_ratio", "acc"):
        table[col] = means[col] if col in means.columns else math.nan
    table["compute_pct"] = 100 * means["compute_cost"]
    table.insert(0, "rank", table["ppl_mean"].rank(method="min").astype(int))

    notes = [f"One row per configuration ({len(table)}); Seeds = its replicates."]
    skipped = left_out_note(means.attrs["left_out"])
    if skipped:
        notes.append(skipped)
    single = int((table["n_seeds"] < 2).sum())
    if single:
        notes.append(f"No CI for the {single} configuration(s) with one seed: a single run "
                     "says nothing about the spread over seeds, and the best of many single "
                     "runs is biased low.")
    table["ppl_change_pct"] = math.nan
    table["p_value"] = math.nan
    table["significant"] = pd.array([pd.NA] * len(table), dtype="boolean")
    if baseline is None and DEFAULT_BASELINE in set(table["model"]):
        baseline = DEFAULT_BASELINE
    if baseline is not None:
        b = find_configuration(table, baseline)
        base = samples[table.at[b, "config_id"]]
        table["ppl_change_pct"] = 100 * (table["ppl_mean"] / base.mean() - 1)
        for i, cid in enumerate(table["config_id"]):
            p = math.nan if i == b else welch_p(samples[cid], base)
            if np.isfinite(p):
                table.loc[i, "p_value"] = p
                table.loc[i, "significant"] = bool(p < 1 - confidence)
        notes.append(f"Baseline {table.at[b, 'model']}; significance: Welch t-test p < "
                     f"{1 - confidence:.2g} (needs >= 2 seeds on both sides).")
        baseline = str(table.at[b, "model"])
    table = table.sort_values(["rank", "model"], kind="stable").reset_index(drop=True)
    table.attrs.update(kind="configurations", baseline=baseline, confidence=confidence,
                       notes=notes, params=list(params), left_out=means.attrs["left_out"])
    return table


def marginal_table(
    trials: pd.DataFrame, by: str | Sequence[str], params: Sequence[str] | None = None
) -> pd.DataFrame:
    """A marginal over configurations: configurations grouped by ``by``, each counted once.

    Each configuration is first averaged over its seeds; a group then reports
    ``n_configs`` (configurations in it), ``n_rows`` (their completed seeds in all),
    ``ppl_mean`` (mean over its configurations), ``ppl_sd`` (the spread *across
    configurations*, not a seed error bar), ``ppl_best``/``ppl_worst`` (its best and worst
    configuration), ``compute_pct``, ``best_model`` (the label of its best configuration).
    """
    cols = [by] if isinstance(by, str) else list(by)
    missing = [c for c in cols if c not in trials.columns]
    if missing:
        raise AnalysisError(
            f"cannot group by missing column(s): {', '.join(missing)} "
            f"(available: {', '.join(map(str, trials.columns))})")
    means = config_means(trials, params)
    keys = means[cols].astype(object).where(means[cols].notna(), "(none)").astype(str)
    means["group"] = keys.agg(", ".join, axis=1) if len(cols) > 1 else keys[cols[0]]
    rows = []
    for name, group in means.groupby("group", sort=False):
        ppl = group["best_ppl"].to_numpy(dtype=float)
        best = group.loc[group["best_ppl"].idxmin()]
        rows.append({"group": name, "n_configs": len(group), "n_rows": int(group["n_seeds"].sum()),
                     "ppl_mean": float(ppl.mean()),
                     "ppl_sd": float(ppl.std(ddof=1)) if len(ppl) > 1 else math.nan,
                     "ppl_best": float(ppl.min()), "ppl_worst": float(ppl.max()),
                     "compute_pct": 100 * float(group["compute_cost"].mean()),
                     "best_model": best["model"]})
    table = pd.DataFrame(rows)
    table.insert(0, "rank", table["ppl_mean"].rank(method="min").astype(int))
    table = table.sort_values(["rank", "group"], kind="stable").reset_index(drop=True)
    label = ", ".join(cols)
    notes = [f"Marginal over configurations by {label}: each configuration (its seeds averaged) "
             "counts once; SD is the spread across configurations, not an error bar over seeds."]
    skipped = left_out_note(means.attrs["left_out"])
    table.attrs.update(kind="marginal", by=label, notes=notes + ([skipped] if skipped else []),
                       left_out=means.attrs["left_out"])
    return table


def confirmation_table(
    source: pd.DataFrame,
    confirmed: pd.DataFrame,
    baseline: str | None = None,
    confidence: float = 0.95,
    params: Sequence[str] | None = None,
) -> pd.DataFrame:
    """A sweep's estimates beside their re-training with fresh seeds (ufw.confirm).

    One row per configuration of ``confirmed`` (its rows, the fresh seeds): ``model``,
    ``config_id``, ``sweep_ppl`` and ``sweep_seeds`` (the source sweep's estimate: its mean over
    the source's seeds; NaN for a configuration the sweep did not train, such as a baseline),
    ``n_seeds``, ``ppl_mean``, ``ci_low``/``ci_high`` over the fresh seeds, ``shift_pct`` =
    ``100 * (confirmed / sweep - 1)`` (positive: the sweep's estimate was optimistic), and
    against the ``baseline`` configuration (a config_id or label, trained on the same seeds):
    ``ppl_change_pct``, Welch's ``p_value`` and ``significant``. Sorted by confirmed mean.
    """
    table = comparison_table(confirmed, baseline=baseline, confidence=confidence, params=params)
    estimates = completed(source).groupby("config_id")["best_ppl"].agg(["mean", "size"])
    table.insert(3, "sweep_ppl", table["config_id"].map(estimates["mean"]))
    table.insert(4, "sweep_seeds", table["config_id"].map(estimates["size"]).fillna(0).astype(int))
    table["shift_pct"] = 100 * (table["ppl_mean"] / table["sweep_ppl"] - 1)
    table.attrs.update(kind="confirmation")
    table.attrs["notes"] = [
        "Sweep PPL: the sweep's estimate (mean over its seeds); PPL and CI: the same "
        "configuration re-trained with fresh seeds; Shift: confirmed against the estimate.",
        *table.attrs["notes"][1:]]
    return table
