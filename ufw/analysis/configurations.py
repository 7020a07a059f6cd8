"""Configurations: the unit every table and plot compares, and what each one is called.

A configuration is one set of resolved hyperparameters (its ``config_id``); the rows that
share it are seeds of that configuration. Its name is the preset's when it equals that preset
exactly, else a short description of the values the sweep varied, e.g.
``linear .49->.11, lr .20/.74/.18, thr .95``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from ufw.analysis.loading import AnalysisError, completed, left_out, require
from ufw.config import PRESETS, UniversalConfig

# Columns that are not hyperparameters: identity, metrics, outcome and provenance. When a
# sweep's record does not say what it varied, every other column that varies is a parameter.
NON_PARAM_COLUMNS = frozenset({
    "sweep", "trial_id", "member", "seed", "preset", "config_id", "source_sweep",
    "best_ppl", "best_bpc", "best_epoch", "acc", "shallow_ratio", "compute_cost", "epochs_run",
    "train_seconds", "status", "error", "threshold_curve", "expert_ffns_per_token",
    "exit_shares", "ufw_version", "torch_version", "device", "dataset", "tokenizer",
    "vocab_size",
    # where and how a row was trained, not what was configured
    "cohort_size", "node", "node_id", "gpu", "resumed_from_epoch", "started_at",
    "finished_at", "setup_seconds", "report_seconds", "precision", "ended_at",
    "study_seconds", "trial_train_seconds", "optuna_number",
})
METRIC_COLUMNS = ("best_ppl", "best_bpc", "best_epoch", "acc", "shallow_ratio",
                  "compute_cost", "epochs_run", "train_seconds")
PER_ROW_COLUMNS = ("trial_id", "member", "seed", "status", "error", "threshold_curve")
ALPHA_COLUMNS = ("schedule", "alpha_start", "alpha_end", "alpha_steps")
# per-layer families: column prefix -> short name in labels
LAYER_FAMILIES = {"layer_weight_": "w", "lr_scale_": "lr"}
SHORT_NAMES = {"routing_threshold": "thr", "lr": "lr", "confidence_method": "conf",
               "distillation_alpha": "distill", "distillation_temperature": "T",
               "num_experts": "experts", "experts_top_k": "top", "exit_thresholds": "thr"}


def _scalar(value: object) -> object:
    """A JSON list of one value (``exit_thresholds`` of a one-exit model) as that value."""
    if isinstance(value, str) and value.startswith("["):
        try:
            items = json.loads(value)
        except ValueError:
            return value
        if isinstance(items, list) and len(items) == 1:
            return items[0]
    return value


def swept_columns(trials: pd.DataFrame, params: Sequence[str] | None = None) -> list[str]:
    """The parameter columns of a sweep: ``params`` (from its record) when given, else inferred.

    Inferred: columns outside NON_PARAM_COLUMNS that take more than one value over the completed
    rows, leaving out a column that copies an earlier one (``layer_weight_1`` set from
    ``alpha_start``, ``exit_thresholds`` of a one-exit model set from ``routing_threshold``),
    since a copy is one knob, not two.
    """
    if params:
        return [p for p in params if p in trials.columns]
    done = completed(trials)
    columns, seen = [], set()
    for col in done.columns:
        if col in NON_PARAM_COLUMNS:
            continue
        values = done[col].map(_scalar)
        if values.astype(str).nunique(dropna=False) < 2:
            continue
        key = tuple(values.map(lambda v: round(v, 9) if isinstance(v, float) else v).astype(str))
        if key in seen:
            continue
        seen.add(key)
        columns.append(col)
    return columns


def _number(value: float) -> str:
    """Short numbers for labels: .49, 0, 1, 64, 1.2e-3."""
    if isinstance(value, (bool, np.bool_)):
        return str(value)
    v = float(value)
    if math.isnan(v):
        return "-"
    if v == int(v) and abs(v) < 1e6:
        return str(int(v))
    if 0.01 <= abs(v) < 1:
        text = f"{abs(v):.2f}".lstrip("0")
        return ("-" if v < 0 else "") + text
    if abs(v) < 0.01:
        mantissa, exp = f"{v:.1e}".split("e")
        return f"{mantissa}e{int(exp)}"
    return f"{v:.3g}"


def _value(value: object) -> str:
    value = _scalar(value)
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
        return _number(value)
    return str(value)


def _alpha(row: pd.Series) -> str:
    kind = row.get("schedule")
    if kind in (None, "none") or (isinstance(kind, float) and math.isnan(kind)):
        return "no alpha"
    start, end = _value(row.get("alpha_start")), _value(row.get("alpha_end"))
    if kind == "constant":
        return f"const {start}"
    text = f"{kind} {start}->{end}"
    return text + f" @{_value(row.get('alpha_steps')).strip('[]')}" if kind == "step" else text


def describe(row: pd.Series, params: Sequence[str]) -> str:
    """What the sweep varied in this configuration, in short (the columns ``params``)."""
    parts: list[str] = []
    done: set[str] = set()
    for col in params:
        if col in done:
            continue
        if col in ALPHA_COLUMNS:
            parts.append(_alpha(row))
            done.update(ALPHA_COLUMNS)
            continue
        family = next((p for p in LAYER_FAMILIES if col.startswith(p)), None)
        if family:
            members = [c for c in params if c.startswith(family)]
            done.update(members)
            if len(members) == 1:
                parts.append(f"{LAYER_FAMILIES[family]}{col[len(family):]} {_value(row[col])}")
            else:
                values = "/".join(_value(row[c]) for c in members)
                layers = "" if len(members) == row.get("num_layers") else ",".join(
                    c[len(family):] for c in members)
                parts.append(f"{LAYER_FAMILIES[family]}{layers} {values}")
            continue
        done.add(col)
        if col == "preset":
            parts.append(_value(row[col]))
        else:
            parts.append(f"{SHORT_NAMES.get(col, col)} {_value(row[col])}")
    return ", ".join(parts)


def _missing(value: object) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _same(a: object, b: object) -> bool:
    a, b = _scalar(a), _scalar(b)
    if _missing(a) or _missing(b):
        return _missing(a) and _missing(b)
    numbers = (int, float, np.number)
    if isinstance(a, numbers) and isinstance(b, numbers):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
    return str(a) == str(b)


def _preset_columns() -> list[str]:
    """The columns in which presets differ (from each other or from the defaults): what a
    preset sets. Scale settings (dim, epochs, lr, ...) are the sweep's, not the preset's."""
    flats = [UniversalConfig().flat(), *(p.flat() for p in PRESETS.values())]
    return [c for c in flats[0] if c != "config_id"
            and any(not _same(f.get(c), flats[0][c]) for f in flats[1:])]


_PRESET_COLUMNS = _preset_columns()


def equals_preset(row: pd.Series, params: Sequence[str]) -> bool:
    """Whether a configuration is its ``preset`` exactly: every value the sweep varied and every
    value a preset sets (layer weights, LR scales, thresholds, ...) is the preset's. A name
    that is not one of ufw's presets (a hand-made table) is taken at its word."""
    name = row.get("preset")
    if not isinstance(name, str):
        return False
    if name not in PRESETS:
        return True
    own = PRESETS[name].flat()
    return all(_same(row[c], own[c]) for c in dict.fromkeys([*params, *_PRESET_COLUMNS])
               if c in row.index and c in own)


def configuration_labels(configs: pd.DataFrame, params: Sequence[str]) -> pd.Series:
    """One unique, readable name per configuration (row of ``configs``).

    The preset's name when the configuration is that preset exactly, else describe(); two
    configurations that read alike (values rounded in the label) get their config_id appended.
    """
    labels = []
    for _, row in configs.iterrows():
        if equals_preset(row, params):
            labels.append(str(row["preset"]))
            continue
        text = describe(row, [p for p in params if p != "preset" or
                              not isinstance(row.get("preset"), str)])
        preset = row.get("preset")
        if isinstance(preset, str) and "preset" not in params and not text:
            text = f"{preset} (changed)"
        labels.append(text or str(row.get("config_id")))
    labels = pd.Series(labels, index=configs.index, dtype=object)
    repeated = labels.duplicated(keep=False)
    if repeated.any() and "config_id" in configs.columns:
        labels[repeated] = labels[repeated] + " [" + configs.loc[repeated, "config_id"].astype(
            str) + "]"
    return labels


def config_means(
    trials: pd.DataFrame, params: Sequence[str] | None = None, extra: Sequence[str] = ()
) -> pd.DataFrame:
    """One row per configuration: its metrics averaged over its completed seeds.

    Seed replicates share ``config_id`` (DESIGN section 4), so this is the level at which
    configurations are compared and plotted. Columns: ``config_id``, ``model`` (its label,
    configuration_labels), ``n_seeds``, the means of the metric columns (and of ``extra``),
    ``ppl_std`` over seeds (NaN for one seed), then the configuration's own columns.
    ``params``: the swept columns (swept_columns infers them when not given). Configurations
    without a completed row (pruned, failed) are not among them; ``attrs["left_out"]`` counts
    them (loading.left_out), so that every table and figure built on this can say so.
    """
    require(trials, ("config_id",), "trials", "the frame")
    done = completed(trials)
    if done.empty:
        raise AnalysisError("no completed trials")
    params = swept_columns(trials, params)
    metrics = [c for c in dict.fromkeys([*METRIC_COLUMNS, *extra]) if c in done.columns]
    done[metrics] = done[metrics].apply(pd.to_numeric, errors="coerce")
    groups = done.groupby("config_id", sort=False, dropna=False)
    config = groups.first().drop(columns=[c for c in (*metrics, *PER_ROW_COLUMNS)
                                          if c in done.columns])
    out = pd.concat([groups.size().rename("n_seeds"), groups[metrics].mean(),
                     groups["best_ppl"].std().rename("ppl_std"), config], axis=1).reset_index()
    out.insert(1, "model", configuration_labels(out, params))
    out.attrs.update(params=list(params), left_out=left_out(trials))
    return out
