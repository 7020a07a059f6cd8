"""A Ray trial's configuration as members, and the rows its members become.

A trial's config holds the sweep's `spec` (under SPEC) and either one sampled point (cohort
1: the point's values at the top level) or a list of points (under MEMBERS). Each point x
each seed is one *member*; the members' result rows, and per point the objectives' means
over seeds, are what the trial reports.
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch

import ufw
from ufw.config import ConfigError, UniversalConfig
from ufw.results import EMPTY_METRICS
from ufw.space import Objective, build_config, parameter_column
from ufw.tokenizer import CHAR

# Unix times of a trial's start and end, its set-up before the first epoch, and the time it
# waited on Ray for its progress reports and checkpoints (NaN: unknown).
TRIAL_TIMES = {"started_at": math.nan, "finished_at": math.nan, "setup_seconds": math.nan,
               "report_seconds": math.nan, "study_seconds": math.nan,
               "trial_train_seconds": math.nan}
SPEC = "ufw"  # the trial config's key for everything that is not a sampled value
MEMBERS = "members"  # cohort trials: the list of sampled points
NUMBERS = "numbers"  # cohort trials: each point's Optuna trial number


@dataclass
class Member:
    index: int  # position in the trial (0 .. points*seeds - 1)
    point: int  # which sampled configuration
    config: UniversalConfig | None
    preset: str | None
    params: dict[str, Any]
    error: str = ""  # a configuration that could not even be built


def trial_points(config: dict[str, Any]) -> list[dict[str, Any]]:
    """The sampled configurations of one Ray trial (cohort: a list; cohort 1: the config)."""
    if MEMBERS in config:
        return [dict(p) for p in config[MEMBERS]]
    return [{k: v for k, v in config.items() if k != SPEC}]


def trial_numbers(config: dict[str, Any]) -> list[int | None]:
    """Each point's Optuna trial number (cohort trials; None where the study is Ray's)."""
    points = trial_points(config)
    return list(config.get(NUMBERS, [None] * len(points)))


def expand_members(spec: dict[str, Any], points: list[dict[str, Any]]) -> list[Member]:
    members: list[Member] = []
    seeds = spec["seeds"]
    for i, params in enumerate(points):
        try:
            config, preset_name = build_config(spec["fixed"], params, spec["overrides"])
        except ConfigError as e:
            for _ in range(seeds):
                members.append(Member(len(members), i, None, params.get("preset"), params,
                                      f"invalid configuration: {e}"))
            continue
        for s in range(seeds):
            members.append(Member(len(members), i, dataclasses.replace(config,
                                                                          seed=config.seed + s),
                                  preset_name, params))
    return members


def sweep_columns(spec: dict[str, Any]) -> dict[str, Any]:
    """The columns naming a row's sweep: ``sweep``, and ``source_sweep`` for a sweep that
    re-trains another's configurations (ufw.confirm)."""
    source = spec.get("source_sweep")
    return {"sweep": spec["sweep"], **({"source_sweep": source} if source else {})}


def failed_rows(spec: dict[str, Any], members: list[Member], error: str,
                extra: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Rows for members that never trained: their configuration, NaN metrics, the error."""
    rows = []
    for m in members:
        if m.config is not None:
            row = m.config.flat()
        else:  # not even a configuration: the sampled values under their column names
            row = {parameter_column(k): v for k, v in m.params.items() if parameter_column(k)}
            row["config_id"] = None
        row.update(member=m.index, cohort_size=len(members), **EMPTY_METRICS,
                   status="failed", error=m.error or error, ufw_version=ufw.__version__,
                   torch_version=str(torch.__version__), device=None,
                   dataset=spec.get("dataset"),
                   tokenizer=(spec.get("data") or {}).get("tokenizer", CHAR), vocab_size=None)
        row.update(**sweep_columns(spec), trial_id=None, preset=m.preset,
                   seed=m.config.seed if m.config else None, node=None, node_id=None, gpu=None,
                   resumed_from_epoch=0, **TRIAL_TIMES, ended_at=math.nan, optuna_number=None)
        row.update(extra or {})
        rows.append(row)
    return rows


def point_objectives(spec: dict[str, Any], members: list[Member],
                     rows: list[dict[str, Any]]) -> list[list[float] | None]:
    """Per sampled point: each objective's mean over its seeds (None: no seed has a value)."""
    by_point: dict[int, list[dict]] = defaultdict(list)
    for m, row in zip(members, rows):
        by_point[m.point].append(row)
    return [objective_means(spec, by_point.get(point, []))
            for point in range(max(m.point for m in members) + 1)]


def objective_means(spec: dict[str, Any], rows: list[dict[str, Any]]) -> list[float] | None:
    """One point's objectives: each one's mean over the rows (its seeds) that did not fail
    and have a finite value; None if an objective has no such row."""
    result = []
    for metric, _direction in spec["objectives"]:
        finite = [float(r[metric]) for r in rows if r.get("status") != "failed"
                  and r.get(metric) is not None and math.isfinite(float(r[metric]))]
        if not finite:
            return None
        result.append(sum(finite) / len(finite))
    return result


def summary_metrics(spec: dict[str, Any], values: list[list[float] | None]) -> dict[str, float]:
    """What Ray Tune sees: each objective's best point (the worst value if none finished)."""
    metrics = {}
    for j, (metric, direction) in enumerate(spec["objectives"]):
        o = Objective(metric, direction)
        finite = [v[j] for v in values if v is not None]
        best = min if direction == "minimize" else max
        metrics[metric] = best(finite) if finite else o.worst()
    return metrics
