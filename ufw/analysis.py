"""Turn a sweep's Parquet results into comparison tables, Pareto fronts and importances.

Everything here is plain pandas/pyarrow/scipy (and Optuna for importance) so that the
notebooks in ``analysis/`` stay thin and the same numbers come out of the command line:

    python -m ufw.analysis results/quickstart --baseline standard_llm --format markdown

Results layout (DESIGN.md section 4): ``RESULTS/trials/`` holds one row per trained
configuration and seed, ``RESULTS/epochs/`` one row per member per epoch.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from scipy import stats

from ufw.arguments import ArgumentParser

__all__ = [
    "AnalysisError",
    "best_configurations",
    "comparison_table",
    "completed",
    "config_means",
    "display_table",
    "epoch_curves",
    "format_table",
    "importance",
    "load_results",
    "main",
    "pareto_front",
    "threshold_curves",
    "threshold_pareto",
    "to_markdown",
]

# Columns the analysis cannot work without. Everything else is optional: a sweep that does not
# vary a parameter may still write it, and future config keys simply show up as more columns.
TRIAL_COLUMNS = ("trial_id", "member", "seed", "status", "best_ppl", "compute_cost")
EPOCH_COLUMNS = ("trial_id", "member", "epoch", "val_ppl")

# Columns that are not hyperparameters: identity, metrics, outcome and provenance. importance()
# treats every other column that varies as a parameter (pass params= when a writer adds metrics).
NON_PARAM_COLUMNS = frozenset({
    "sweep", "trial_id", "member", "seed", "preset", "config_id",
    "best_ppl", "best_epoch", "acc", "shallow_ratio", "compute_cost", "epochs_run",
    "train_seconds", "status", "error", "threshold_curve", "expert_ffns_per_token",
    "exit_shares", "ufw_version", "torch_version", "device", "dataset",
    # where and how a row was trained, not what was configured
    "cohort_size", "node", "node_id", "gpu", "resumed_from_epoch", "started_at",
    "finished_at", "setup_seconds", "report_seconds",
})


class AnalysisError(ValueError):
    """A user-facing problem with the results (missing, empty, wrong columns).

    The CLI turns it into one line on stderr and exit status 2, so its message must say what is
    wrong and where, without a traceback to lean on.
    """


# ----------------------------------------------------------------------------- loading

def _filesystem(path: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """Local paths and pyarrow URIs (``s3://...``) alike, since a cluster writes to either."""
    text = os.fspath(path)
    if "://" in text:
        try:
            return pafs.FileSystem.from_uri(text)
        except (pa.ArrowException, ValueError) as exc:
            raise AnalysisError(f"cannot open results location {text}: {exc}") from None
    return pafs.LocalFileSystem(), os.path.abspath(text)


def _is_dir(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type == pafs.FileType.Directory


def _read_parts(fs: pafs.FileSystem, directory: str) -> pd.DataFrame | None:
    """Read every Parquet part under ``directory`` into one frame (None when there are none).

    Parts are read one by one and concatenated with schema promotion rather than through one
    dataset, because parts of one sweep may carry different columns (conditional parameters,
    a different number of layers) and a dataset would take the first part's schema and silently
    drop the rest. Hidden files and ``.tmp`` names are the writer's in-flight temporaries.
    """
    infos = fs.get_file_info(pafs.FileSelector(directory, recursive=True, allow_not_found=True))
    files = sorted(
        info.path for info in infos
        if info.type == pafs.FileType.File
        and not info.base_name.startswith((".", "_"))
        and ".tmp" not in info.base_name
    )
    tables = []
    for file in files:
        try:
            tables.append(pq.read_table(file, filesystem=fs))
        except (pa.ArrowException, OSError) as exc:
            raise AnalysisError(f"cannot read Parquet part {file}: {exc}") from None
    if not tables:
        return None
    try:
        table = pa.concat_tables(tables, promote_options="permissive")
    except pa.ArrowException:  # irreconcilable types (say str vs float): let pandas use object
        return pd.concat([t.to_pandas() for t in tables], ignore_index=True)
    return table.to_pandas()


def _require(df: pd.DataFrame, columns: Sequence[str], what: str, where: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise AnalysisError(f"{what} in {where} lack required column(s): {', '.join(missing)}")


def load_results(path: str | os.PathLike) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Read a sweep's results directory into ``(trials, epochs)``.

    ``path`` is ``results/<sweep>`` (local or a pyarrow URI). A directory holding several
    sweeps (``results/``, each with its own ``trials/``) is read as one, so sweeps can be
    compared; the ``sweep`` column tells them apart. A missing ``epochs/`` gives an empty epochs
    frame, since tables and fronts only need trials. Raises AnalysisError when there is nothing
    to read or a required column is missing, naming the column(s).
    """
    fs, root = _filesystem(path)
    shown = os.fspath(path)
    if not _is_dir(fs, root):
        raise AnalysisError(f"no such results directory: {shown}")
    if _is_dir(fs, f"{root}/trials"):
        sweeps = [root]
    else:
        children = fs.get_file_info(pafs.FileSelector(root))
        sweeps = sorted(
            c.path for c in children
            if c.type == pafs.FileType.Directory and _is_dir(fs, f"{c.path}/trials")
        )
    trials_parts = [t for t in (_read_parts(fs, f"{s}/trials") for s in sweeps) if t is not None]
    if not trials_parts:
        raise AnalysisError(f"no results in {shown}: expected Parquet parts under {shown}/trials/")
    epochs_parts = [e for e in (_read_parts(fs, f"{s}/epochs") for s in sweeps) if e is not None]
    trials = (pd.concat(trials_parts, ignore_index=True) if len(trials_parts) > 1
              else trials_parts[0])
    _require(trials, TRIAL_COLUMNS, "trials", shown)
    if epochs_parts:
        epochs = pd.concat(epochs_parts, ignore_index=True)
        _require(epochs, EPOCH_COLUMNS, "epochs", shown)
    else:
        epochs = pd.DataFrame({c: pd.Series(dtype="float64") for c in EPOCH_COLUMNS})
    return trials, epochs


def completed(trials: pd.DataFrame) -> pd.DataFrame:
    """Rows whose training completed: pruned and failed runs have no comparable best PPL."""
    _require(trials, ("status", "best_ppl"), "trials", "the frame")
    done = trials[(trials["status"] == "completed") & trials["best_ppl"].notna()]
    return done.reset_index(drop=True)


# ----------------------------------------------------------------------------- grouping

def _labels(df: pd.DataFrame, by: list[str]) -> pd.Series:
    """One readable group name per row.

    A null ``preset`` (a sweep's sampled configuration) falls back to its ``config_id``, so
    unnamed configurations stay apart instead of collapsing into one "None" group.
    """
    parts = []
    for col in by:
        values = df[col]
        if col == "preset" and "config_id" in df.columns:
            values = values.where(values.notna(), df["config_id"])
        values = values.astype(object).where(values.notna(), "(none)").map(str)
        parts.append(values if len(by) == 1 else col + "=" + values)
    label = parts[0]
    for p in parts[1:]:
        label = label + ", " + p
    return label


def _model_names(df: pd.DataFrame) -> pd.Series:
    """Preset name, else config_id, else trial_id: what a row is called in plots and tables."""
    for col in ("preset", "config_id"):
        if col in df.columns:
            return _labels(df, [col])
    return df["trial_id"].map(str)


def _resolve_by(trials: pd.DataFrame, by: str | Sequence[str] | None) -> list[str]:
    if by is None:
        has_preset = "preset" in trials.columns and trials["preset"].notna().any()
        by = "preset" if has_preset else "config_id"
    cols = [by] if isinstance(by, str) else list(by)
    missing = [c for c in cols if c not in trials.columns]
    if missing:
        raise AnalysisError(
            f"cannot group by missing column(s): {', '.join(missing)} "
            f"(available: {', '.join(map(str, trials.columns))})"
        )
    return cols


def _find_baseline(table: pd.DataFrame, name: str) -> int:
    """Index of the baseline group: by its label, else by its preset name (for by=config_id)."""
    hits = table.index[table["model"] == name]
    if len(hits) == 0 and "preset" in table.columns:
        hits = table.index[table["preset"] == name]
    if len(hits) != 1:
        which = "no" if len(hits) == 0 else "more than one"
        raise AnalysisError(
            f"{which} group matches baseline {name!r} (groups: {', '.join(table['model'])})"
        )
    return int(hits[0])


def comparison_table(
    trials: pd.DataFrame,
    by: str | Sequence[str] | None = None,
    baseline: str | None = None,
    confidence: float = 0.95,
) -> pd.DataFrame:
    """Compare configurations over their seeds: the framework's ranked PPL table, with error bars.

    Groups the completed rows by ``by`` (default ``preset``, or ``config_id`` when no preset is
    named; a list groups by several columns) and reports, per group:

    - ``n_seeds``: completed rows (seed replicates) in the group;
    - ``ppl_mean``, ``ppl_std`` (over seeds), ``ci_low``/``ci_high``: the Student t interval
      ``mean +- t(1-(1-confidence)/2, n-1) * std/sqrt(n)``. It is NaN for a single seed, where
      the spread over seeds is unknown (a note in ``table.attrs["notes"]`` says so);
    - ``best_epoch``, ``shallow_ratio``, ``acc`` (means) and ``compute_pct`` (mean compute
      cost in %);
    - ``ppl_change_pct``: ``100 * (mean / baseline_mean - 1)``, negative = lower PPL than the
      baseline; ``p_value`` of Welch's t-test (unequal variances) between the group's seeds and
      the baseline's, and ``significant`` = p < 1 - confidence (0.05 at 95%); NA when either
      side has fewer than two seeds, because no test is possible then;
    - ``rank``: 1 = lowest mean PPL (ties share the rank).

    ``baseline`` is a group's name (``model`` column), or a preset's name when grouping by
    ``config_id``; default ``standard_llm`` when such a group exists (the seed's reference),
    else no comparison columns are filled. Rows come sorted by rank.
    """
    if not 0 < confidence < 1:
        raise AnalysisError(f"confidence must be in (0, 1), got {confidence}")
    cols = _resolve_by(trials, by)
    done = completed(trials)
    if done.empty:
        raise AnalysisError("no completed trials to compare")
    done = done.assign(model=_labels(done, cols))

    rows = []
    samples: dict[str, np.ndarray] = {}
    for name, group in done.groupby("model", sort=False):
        ppl = group["best_ppl"].to_numpy(dtype=float)
        samples[name] = ppl
        n = len(ppl)
        mean = float(ppl.mean())
        std = float(ppl.std(ddof=1)) if n > 1 else math.nan
        half = stats.t.ppf(0.5 + confidence / 2, n - 1) * std / math.sqrt(n) if n > 1 else math.nan
        row = {"model": name}
        for col in cols:
            row[col] = group[col].iloc[0]
        if "preset" in group.columns and "preset" not in cols:
            row["preset"] = group["preset"].iloc[0]
        row.update(
            n_seeds=n, ppl_mean=mean, ppl_std=std, ci_low=mean - half, ci_high=mean + half,
            best_epoch=_mean(group, "best_epoch"), shallow_ratio=_mean(group, "shallow_ratio"),
            acc=_mean(group, "acc"), compute_pct=100 * _mean(group, "compute_cost"),
        )
        rows.append(row)
    table = pd.DataFrame(rows)
    table.insert(0, "rank", table["ppl_mean"].rank(method="min").astype(int))

    notes = []
    single = table.loc[table["n_seeds"] < 2, "model"].tolist()
    if single:
        notes.append(f"CI undefined (one seed): {', '.join(single)}")
    table["ppl_change_pct"] = math.nan
    table["p_value"] = math.nan
    table["significant"] = pd.array([pd.NA] * len(table), dtype="boolean")
    if baseline is None and "standard_llm" in set(table["model"]) | set(table.get("preset", [])):
        baseline = "standard_llm"
    if baseline is not None:
        b = _find_baseline(table, baseline)
        base = samples[table.at[b, "model"]]
        table["ppl_change_pct"] = 100 * (table["ppl_mean"] / base.mean() - 1)
        for i, name in enumerate(table["model"]):
            ppl = samples[name]
            if i == b or len(ppl) < 2 or len(base) < 2:
                continue
            p = stats.ttest_ind(ppl, base, equal_var=False).pvalue
            if np.isfinite(p):
                table.loc[i, "p_value"] = p
                table.loc[i, "significant"] = bool(p < 1 - confidence)
        notes.append(
            f"baseline {table.at[b, 'model']}; significance: Welch t-test p < "
            f"{1 - confidence:.2g} (needs >= 2 seeds on both sides)"
        )
    table = table.sort_values(["rank", "model"], kind="stable").reset_index(drop=True)
    table.attrs["baseline"] = baseline
    table.attrs["confidence"] = confidence
    table.attrs["notes"] = notes
    return table


def _mean(df: pd.DataFrame, col: str) -> float:
    return float(pd.to_numeric(df[col], errors="coerce").mean()) if col in df.columns else math.nan


# ----------------------------------------------------------------------------- Pareto

def _non_dominated(values: np.ndarray) -> np.ndarray:
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
    _require(df, (x, y), "rows", "the frame")
    valid = df[df[x].notna() & df[y].notna()]
    values = valid[[x, y]].to_numpy(dtype=float)
    front = valid[_non_dominated(values)]
    return front.sort_values([x, y], kind="stable").reset_index(drop=True)


def _curve(text: object) -> list[dict]:
    if text is None or (isinstance(text, float) and math.isnan(text)):
        return []
    points = json.loads(text) if isinstance(text, (str, bytes)) else list(text)
    return [dict(p) for p in points]


def threshold_curves(trials: pd.DataFrame, average_seeds: bool = True) -> pd.DataFrame:
    """Expand the ``threshold_curve`` JSON of completed rows into one row per threshold.

    Each row carries ``model`` (preset name, else config_id), ``config_id``/``preset`` when
    present, and the curve's ``threshold``, ``ppl``, ``compute_cost``, ``shallow_ratio``.
    With ``average_seeds`` (default) the seeds of one configuration are averaged at each
    threshold (``n_seeds`` says over how many), because an operating point should be chosen
    from what a configuration does on average, not from its luckiest seed; otherwise every
    member keeps its own curve (with ``trial_id``, ``member``, ``seed``).
    """
    _require(trials, ("threshold_curve",), "trials", "the frame")
    done = completed(trials)
    keys = [c for c in ("sweep", "trial_id", "member", "seed", "preset", "config_id")
            if c in done.columns]
    rows = []
    for (_, row), name in zip(done.iterrows(), _model_names(done)):
        try:
            points = _curve(row["threshold_curve"])
        except (ValueError, TypeError) as exc:
            raise AnalysisError(
                f"threshold_curve of trial {row['trial_id']} is not a JSON list: {exc}"
            ) from None
        for p in points:
            rows.append({"model": name, **{k: row[k] for k in keys}, **p})
    metrics = ["threshold", "ppl", "compute_cost", "shallow_ratio"]
    if not rows:
        return pd.DataFrame(columns=["model", *keys, *metrics])
    curves = pd.DataFrame(rows)
    if not average_seeds:
        return curves.sort_values(["model", "threshold"], kind="stable").reset_index(drop=True)
    group = ["model"] + [c for c in ("sweep", "config_id") if c in curves.columns] + ["threshold"]
    present = [m for m in metrics[1:] if m in curves.columns]
    out = curves.groupby(group, sort=True, dropna=False)[present].mean()
    out["n_seeds"] = curves.groupby(group, sort=True, dropna=False).size()
    return out.reset_index()


def threshold_pareto(trials: pd.DataFrame, average_seeds: bool = True) -> pd.DataFrame:
    """Pareto front over every (configuration, routing threshold) operating point.

    Routing trades PPL for compute after training, so the best deployable points come from the
    threshold curves, not just each run's trained threshold. Minimises ``compute_cost`` and
    ``ppl``; see threshold_curves for ``average_seeds``.
    """
    curves = threshold_curves(trials, average_seeds=average_seeds)
    return pareto_front(curves, x="compute_cost", y="ppl")


# ----------------------------------------------------------------------------- importance

def _distribution(values: pd.Series):
    """Optuna distribution for one column: numbers become float/int ranges, the rest categories.

    Log scale is assumed for positive ranges spanning two decades or more (learning rates),
    since PED-ANOVA's density estimates are taken in the distribution's own scale.
    """
    from optuna.distributions import (
        CategoricalDistribution,
        FloatDistribution,
        IntDistribution,
    )

    present = values.dropna()
    if pd.api.types.is_bool_dtype(present) or not pd.api.types.is_numeric_dtype(present):
        choices = sorted({str(v) for v in present})
        return (CategoricalDistribution(choices), str) if len(choices) > 1 else None
    low, high = float(present.min()), float(present.max())
    if low == high:
        return None
    log = low > 0 and high / low >= 100
    if pd.api.types.is_integer_dtype(present):
        return IntDistribution(int(low), int(high), log=log), int
    return FloatDistribution(low, high, log=log), float


def importance(
    trials: pd.DataFrame,
    params: Sequence[str] | None = None,
    target: str = "best_ppl",
    direction: str = "min",
    method: str = "ped_anova",
    quantile: float | None = None,
    seed: int = 0,
) -> pd.Series:
    """How much each hyperparameter matters for ``target``, with Optuna's importance evaluators.

    The completed rows become an in-memory Optuna study: one ``optuna.trial.create_trial`` per
    row, value = ``target``, and a distribution per parameter column inferred from its values:
    numeric columns -> FloatDistribution / IntDistribution over the observed [min, max] (log
    scale when positive and spanning >= 100x), anything else (strings, bools) ->
    CategoricalDistribution of the observed values as strings. A null value leaves the
    parameter out of that trial (conditional parameters). ``params`` defaults to every column
    that is not an identity/metric/provenance column (NON_PARAM_COLUMNS) and takes more than
    one value; pass it explicitly when the results carry other metric columns. By default a
    column identical to an earlier one (e.g. ``layer_weight_1`` derived from ``alpha_start``)
    is left out, since two copies of one signal would split its importance between them;
    ``result.attrs["aliases"]`` lists what was merged into which parameter.

    ``method``: ``"ped_anova"`` (default; PedAnovaImportanceEvaluator, no extra dependency;
    importance of reaching the best ``quantile`` of trials, default max(0.1, 5/n) so that at
    least ~5 trials are in the top set as the PED-ANOVA authors advise) or ``"fanova"``
    (FanovaImportanceEvaluator, a random-forest fANOVA; needs scikit-learn). ``direction``
    ``"max"`` negates the target (e.g. for ``acc``). Returns normalised importances (sum 1),
    highest first.
    """
    import optuna

    if direction not in ("min", "max"):
        raise AnalysisError(f"direction must be 'min' or 'max', got {direction!r}")
    _require(trials, (target,), "trials", "the frame")
    done = completed(trials)
    done = done[pd.to_numeric(done[target], errors="coerce").notna()]
    explicit = params is not None
    if params is None:
        params = [c for c in done.columns if c not in NON_PARAM_COLUMNS and c != target]
    else:
        _require(done, list(params), "trials", "the frame")
    dists, aliases, seen = {}, {}, {}
    for col in params:
        d = _distribution(done[col])
        if d is None:
            continue
        key = tuple(done[col].astype(str))  # a column equal to an earlier one (a derived value)
        if explicit is False and key in seen:  # would split that one's importance with it
            aliases.setdefault(seen[key], []).append(col)
            continue
        seen[key] = col
        dists[col] = d
    if len(done) < 2 or not dists:
        raise AnalysisError(
            f"importance needs >= 2 completed trials and a parameter that varies "
            f"(got {len(done)} trials, varying: {', '.join(dists) or 'none'})"
        )

    if method == "ped_anova":
        q = quantile if quantile is not None else min(0.5, max(0.1, 5 / len(done)))
        evaluator = optuna.importance.PedAnovaImportanceEvaluator(target_quantile=q)
    elif method == "fanova":
        try:
            import sklearn  # noqa: F401
        except ImportError:
            raise AnalysisError("method='fanova' needs scikit-learn: pip install scikit-learn") \
                from None
        evaluator = optuna.importance.FanovaImportanceEvaluator(seed=seed)
    else:
        raise AnalysisError(f"method must be 'ped_anova' or 'fanova', got {method!r}")

    sign = 1.0 if direction == "min" else -1.0
    frozen = []
    for _, row in done.iterrows():
        values, distributions = {}, {}
        for col, (dist, cast) in dists.items():
            if pd.notna(row[col]):
                values[col] = cast(row[col])
                distributions[col] = dist
        frozen.append(optuna.trial.create_trial(
            value=sign * float(row[target]), params=values, distributions=distributions,
        ))
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "study created" chatter
    try:
        study = optuna.create_study(direction="minimize")
        study.add_trials(frozen)
        result = optuna.importance.get_param_importances(study, evaluator=evaluator)
    finally:
        optuna.logging.set_verbosity(verbosity)
    series = pd.Series(result, name="importance", dtype=float)
    series.index.name = "param"
    series.attrs["aliases"] = aliases
    return series.sort_values(ascending=False, kind="stable")


# ----------------------------------------------------------------------------- best configs

METRIC_COLUMNS = ("best_ppl", "best_epoch", "acc", "shallow_ratio", "compute_cost",
                  "epochs_run", "train_seconds")
PER_ROW_COLUMNS = ("trial_id", "member", "seed", "status", "error", "threshold_curve")


def config_means(
    trials: pd.DataFrame, by: str = "config_id", extra: Sequence[str] = ()
) -> pd.DataFrame:
    """One row per configuration: its metrics averaged over its completed seeds.

    Seed replicates share ``config_id`` (DESIGN section 4), so this is the level at which
    configurations should be compared and plotted. Columns: ``by``, ``model`` (preset name,
    else config_id), ``n_seeds``, the means of the metric columns (and of ``extra``),
    ``ppl_std`` over seeds (NaN for one seed), then the configuration's own columns.
    """
    _require(trials, (by,), "trials", "the frame")
    done = completed(trials)
    if done.empty:
        raise AnalysisError("no completed trials")
    metrics = [c for c in dict.fromkeys([*METRIC_COLUMNS, *extra]) if c in done.columns]
    done[metrics] = done[metrics].apply(pd.to_numeric, errors="coerce")
    groups = done.groupby(by, sort=False, dropna=False)
    config = groups.first().drop(columns=[c for c in (*metrics, *PER_ROW_COLUMNS)
                                          if c in done.columns and c != by])
    out = pd.concat([groups.size().rename("n_seeds"), groups[metrics].mean(),
                     groups["best_ppl"].std().rename("ppl_std"), config], axis=1).reset_index()
    out.insert(1, "model", _model_names(out) if by == "config_id" else out[by].map(str))
    return out


def best_configurations(
    trials: pd.DataFrame,
    objectives: Mapping[str, str] | None = None,
    by: str = "config_id",
) -> pd.DataFrame:
    """The configurations no other beats on every objective, averaged over seeds.

    ``objectives`` maps a column to ``"min"`` or ``"max"`` (default: PPL and compute cost, both
    minimised). Seeds of one configuration (same ``by``, default ``config_id``) are averaged
    first (config_means), so a configuration is judged on its mean, not on one lucky seed.
    Returns the Pareto-optimal rows of config_means, sorted by the first objective (best
    first). With a single objective that is the best configuration (and any exact ties).
    """
    objectives = dict(objectives or {"best_ppl": "min", "compute_cost": "min"})
    bad = {k: v for k, v in objectives.items() if v not in ("min", "max")}
    if not objectives or bad:
        raise AnalysisError(f"objectives must map columns to 'min' or 'max', got {objectives}")
    _require(trials, [by, *objectives], "trials", "the frame")
    means = config_means(trials, by=by, extra=list(objectives))
    sign = np.array([1.0 if d == "min" else -1.0 for d in objectives.values()])
    values = means[list(objectives)].to_numpy(dtype=float) * sign
    ok = np.isfinite(values).all(axis=1)
    front = means[ok][_non_dominated(values[ok])]
    lead, how = next(iter(objectives.items()))
    return front.sort_values(lead, ascending=how == "min", kind="stable").reset_index(drop=True)


def epoch_curves(
    trials: pd.DataFrame, epochs: pd.DataFrame, by: str | Sequence[str] | None = None
) -> pd.DataFrame:
    """Mean validation PPL (and train loss) per group and epoch, over completed members.

    Groups as comparison_table does, so learning curves line up with the table's rows. Members
    stop early at different epochs; ``n`` says how many members each mean covers.
    """
    cols = _resolve_by(trials, by)
    done = completed(trials)
    if epochs.empty:
        return pd.DataFrame(columns=["model", "epoch", "val_ppl", "train_loss", "n"])
    keys = [c for c in ("sweep", "trial_id", "member") if c in done.columns and c in epochs]
    names = done[keys].assign(model=_labels(done, cols)).drop_duplicates(keys)
    joined = epochs.merge(names, on=keys, how="inner")
    values = [c for c in ("val_ppl", "train_loss") if c in joined.columns]
    grouped = joined.groupby(["model", "epoch"], sort=True)
    out = grouped[values].mean()
    out["n"] = grouped.size()
    return out.reset_index()


# ----------------------------------------------------------------------------- formatting

def _fmt(value: object, digits: int = 2) -> str:
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, (float, np.floating)):
        return f"{value:.{digits}f}"
    return str(value)


def display_table(table: pd.DataFrame) -> pd.DataFrame:
    """A human-readable version of comparison_table's output (strings, one CI column)."""
    pct = round(100 * table.attrs.get("confidence", 0.95))
    base = table.attrs.get("baseline")
    model = table["model"]
    if "preset" in table.columns:  # grouped by config_id: name the preset too
        named = table["preset"].notna() & (table["preset"] != model)
        model = model.where(~named, model + " (" + table["preset"].astype(str) + ")")
    out = pd.DataFrame({"Rank": table["rank"], "Model": model, "Seeds": table["n_seeds"]})
    out["PPL"] = [_fmt(v) for v in table["ppl_mean"]]
    out[f"{pct}% CI"] = [
        f"[{lo:.2f}, {hi:.2f}]" if np.isfinite(lo) else "n/a (1 seed)"
        for lo, hi in zip(table["ci_low"], table["ci_high"])
    ]
    out["Best epoch"] = [_fmt(v, 1) for v in table["best_epoch"]]
    out["Shallow %"] = [_fmt(100 * v, 1) for v in table["shallow_ratio"]]
    out["Compute %"] = [_fmt(v, 1) for v in table["compute_pct"]]
    if base is not None:
        cells = []
        for change, p, sig in zip(table["ppl_change_pct"], table["p_value"], table["significant"]):
            if not np.isfinite(change):
                cells.append("")
            elif change == 0 and not np.isfinite(p):
                cells.append("baseline")
            else:
                mark = " (n/a)" if pd.isna(sig) else (" *" if sig else "")
                cells.append(f"{change:+.1f}%{mark}")
        out[f"PPL vs {base}"] = cells
        out["p"] = [f"{p:.3g}" if np.isfinite(p) else "" for p in table["p_value"]]
    return out


def to_markdown(df: pd.DataFrame) -> str:
    """A GitHub pipe table, numbers right-aligned; small on purpose (no tabulate dependency)."""
    cells = [[_fmt(v) for v in row] for row in df.itertuples(index=False)]
    header = [str(c) for c in df.columns]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(header)]
    numeric = [pd.api.types.is_numeric_dtype(df[c]) or _looks_numeric(df[c]) for c in df.columns]

    def line(values: list[str]) -> str:
        padded = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)]
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if num else ("-" * (w + 2))
                          for w, num in zip(widths, numeric)) + "|"
    return "\n".join([line(header), rule, *(line(r) for r in cells)])


def _looks_numeric(col: pd.Series) -> bool:
    """Right-align formatted numbers such as "+4.4% *" or "4.97e-05" like real numbers."""
    values = [v.replace("(n/a)", "").rstrip(" *%") for v in col if isinstance(v, str) and v]
    try:
        [float(v) for v in values if v != "baseline"]
    except ValueError:
        return False
    return bool(values)


def format_table(table: pd.DataFrame, fmt: str = "markdown") -> str:
    """Render comparison_table output: ``markdown``/``html`` for people, ``csv`` raw numbers."""
    if fmt == "csv":
        return table.to_csv(index=False)
    shown = display_table(table)
    notes = table.attrs.get("notes", [])
    if fmt == "html":
        return shown.to_html(index=False) + "".join(f"\n<p>{n}</p>" for n in notes)
    if fmt == "markdown":
        return to_markdown(shown) + "".join(f"\n\n{n}" for n in notes)
    raise AnalysisError(f"unknown format {fmt!r} (allowed: markdown, csv, html)")


# ----------------------------------------------------------------------------- command line

def main(argv: Sequence[str] | None = None) -> int:
    """``python -m ufw.analysis RESULTS``: print the comparison table; user errors exit 2."""
    parser = ArgumentParser(
        prog="python -m ufw.analysis",
        description="Print the seed-averaged PPL comparison table of a sweep's results.",
    )
    parser.add_argument("results", help="results directory, e.g. results/quickstart")
    parser.add_argument("--baseline", help="group to compare against (default: standard_llm)")
    parser.add_argument("--by", help="column(s) to group by, comma-separated "
                                     "(default: preset, else config_id)")
    parser.add_argument("--format", default="markdown", choices=["markdown", "csv", "html"])
    parser.add_argument("--confidence", type=float, default=0.95)
    args = parser.parse_args(argv)
    by = args.by.split(",") if args.by and "," in args.by else args.by
    try:
        trials, _ = load_results(args.results)
        table = comparison_table(trials, by=by, baseline=args.baseline,
                                 confidence=args.confidence)
        print(format_table(table, args.format))
    except AnalysisError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
