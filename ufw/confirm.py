"""`python -m ufw.confirm RESULTS --top K --seeds S`: re-train a sweep's winners with fresh seeds.

The best of many single-seed configurations is biased low (the winner's curse): its seed was
lucky as well as its hyperparameters. Confirmation re-trains the sweep's top K configurations
(by its objective; with two objectives, its Pareto front) with S seeds the sweep did not use,
together with a baseline on the same seeds, and prints each configuration's sweep estimate
beside its confirmed mean and CI, and its difference to the baseline with Welch's t-test.

It is a sweep like any other, run by the sweep driver (ufw.sweep): a generated search space of
explicit points (the chosen configurations and the baseline, `points:` in docs/sweep.md) x S
seeds, written to `<results>/<source>-confirm/` with a `source_sweep` column, resumable with
`--resume`. Every flag of `python -m ufw.sweep` other than the space, --num-samples and
--seeds (GPUs, cohort, precision, data, Ray address, ...) is passed on to it.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

import pandas as pd
import yaml

from ufw import cli
from ufw.analysis import (
    AnalysisError,
    best_configurations,
    confirmation_table,
    format_table,
    left_out,
    left_out_note,
    load_sweep,
    top_configurations,
)
from ufw.analysis.loading import Sweep
from ufw.config import PRESETS, ConfigError
from ufw.space import build_config, space_from_dict
from ufw.study import study_file

FALLBACK_BASELINE = "standard_llm"


def choose(sweep: Sweep, top: int) -> pd.DataFrame:
    """The sweep's top configurations (seed means): by its objective, or for two objectives
    its Pareto front (best first by the first objective), at most ``top`` of them. Only
    completed configurations are candidates: a pruned one was never trained to its end."""
    objectives = {m: d[:3] for m, d in sweep.objectives.items()}
    if len(objectives) > 1:
        return best_configurations(sweep.trials, objectives, sweep.params).head(top)
    (metric, direction), = objectives.items()
    return top_configurations(sweep.trials, top, sweep.params, metric, direction)


def _point(space, row: pd.Series, overrides: dict[str, Any]) -> dict[str, Any]:
    """The chosen configuration as the point that rebuilds it exactly (checked by config_id)."""
    point = space.point_of(row.to_dict())
    config, _ = build_config(space.fixed, point, overrides)
    if config.config_id != row["config_id"]:
        raise AnalysisError(f"cannot rebuild configuration {row['config_id']} from the sweep's "
                            f"record (got {config.config_id}); was the space file changed?")
    return point


def _baseline_point(sweep: Sweep, space, name: str | None) -> dict[str, Any]:
    """A preset's name (default: the preset the space starts from, else standard_llm), or a
    configuration of the sweep by config_id."""
    name = name or sweep.fixed_preset or FALLBACK_BASELINE
    if name in PRESETS:
        return {"preset": name}
    rows = sweep.trials[sweep.trials["config_id"] == name]
    if rows.empty:
        raise AnalysisError(f"--baseline: {name!r} is neither a preset ({', '.join(PRESETS)}) "
                            "nor a config_id of the sweep")
    return space.point_of(rows.iloc[0].to_dict())


def confirmation_space(sweep: Sweep, top: int, seeds: int,
                       baseline: str | None = None) -> tuple[dict[str, Any], str, list[str]]:
    """The generated search space, the baseline's config_id and the chosen config_ids.

    The space keeps the source's fixed values, objectives and data; its points are the chosen
    configurations then the baseline (once, if it is also chosen). The source's --set
    overrides are returned by sweep_arguments().
    """
    record = sweep.record
    if not record.get("space"):
        raise AnalysisError(f"{sweep.path}: no sweep.json with its search space: "
                            "confirmation needs one sweep written by ufw.sweep")
    space = space_from_dict(record["space"])
    if space.points:
        raise AnalysisError(f"{sweep.name} is itself a confirmation (explicit points); "
                            "confirm the sweep it came from")
    overrides = record.get("overrides") or {}
    chosen = choose(sweep, top)
    points = [_point(space, row, overrides) for _, row in chosen.iterrows()]
    ids = list(chosen["config_id"])
    base = _baseline_point(sweep, space, baseline)
    base_id = build_config(space.fixed, base, overrides)[0].config_id
    if base_id not in ids:
        points.append(base)
    generated = {
        "description": f"confirmation of {sweep.name}: its top {len(ids)} configurations and "
                       f"a baseline, {seeds} fresh seeds each",
        "fixed": space.fixed, "points": points,
        "objectives": [{"metric": o.metric, "direction": o.direction}
                       for o in space.objectives],
        "defaults": {"seeds": seeds, "cohort": len(points)},
        "data": {k: v for k, v in (record.get("data") or {}).items() if v is not None},
    }
    return generated, base_id, ids


def fresh_first_seed(sweep: Sweep) -> int:
    """The first seed after every seed the sweep used (seeds run first, first + 1, ...)."""
    return int(pd.to_numeric(sweep.trials["seed"], errors="coerce").max()) + 1


def build_parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(
        prog="python -m ufw.confirm",
        description="Re-train a sweep's top configurations with fresh seeds, beside a baseline "
                    "on the same seeds, and print the confirmed table. Other flags (GPUs, "
                    "cohort, precision, data, --address, --results, --name, --resume) are "
                    "python -m ufw.sweep's.")
    p.add_argument("results", help="the sweep to confirm, e.g. results/alpha_lr-20260101-1200")
    p.add_argument("--top", type=int, default=5, help="configurations to confirm (default 5)")
    p.add_argument("--seeds", type=int, default=5, help="fresh seeds each (default 5)")
    p.add_argument("--baseline", help="a preset's name or a config_id of the sweep (default: the "
                                      "preset the space starts from, else standard_llm)")
    return p


def _results_root(source: Sweep) -> str:
    """Where the source sweep lies (a directory or URI): the confirmation goes beside it."""
    path = source.path.rstrip("/")
    return path.rsplit("/", 1)[0] if "://" in path else os.path.dirname(os.path.abspath(path))


def _set_flags(overrides: dict[str, Any]) -> list[str]:
    """--set values (YAML) that give back ``overrides`` (the source's, so that the chosen
    configurations are rebuilt exactly)."""
    def text(value: Any) -> str:
        return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("\n...")

    return [f"{key}={text(value)}" for key, value in overrides.items()]


def confirm(results: str, top: int = 5, seeds: int = 5, baseline: str | None = None,
            sweep_args: Sequence[str] = ()) -> int:
    """Run the confirmation of sweep ``results`` (see the module's docstring); returns the
    exit status. ``sweep_args``: further python -m ufw.sweep flags."""
    from ufw.sweep.driver import run
    from ufw.sweep.plan import build_parser as sweep_parser
    from ufw.sweep.plan import make_plan

    with cli.user_errors():
        for flag, value in (("--top", top), ("--seeds", seeds)):
            if value < 1:
                raise ConfigError(f"{flag}: must be a positive integer, got {value}")
        passed = sweep_parser().parse_args(["space.yaml", *sweep_args])
        if passed.num_samples:
            raise ConfigError("--num-samples: confirmation trains the chosen configurations; "
                              "give --top and --seeds")
        try:
            source = load_sweep(results)
            generated, base_id, _ = confirmation_space(source, top, seeds, baseline)
        except AnalysisError as e:
            raise ConfigError(str(e)) from None
        skipped = left_out_note(left_out(source.trials))
        if skipped:  # say that the top K are of the finished configurations only
            print(f"[{source.name}] choosing among completed configurations. {skipped}",
                  flush=True)
        explicit_root = any(a.startswith("--results") for a in sweep_args)
        passed.results = passed.results if explicit_root else _results_root(source)
        passed.name = passed.name or f"{source.name}-confirm"
        # the generated space lives beside the confirmation's study (a local file)
        passed.space = os.path.join(
            os.path.dirname(study_file(passed.results, passed.name)), "confirm_space.yaml")
        os.makedirs(os.path.dirname(passed.space), exist_ok=True)
        with open(passed.space, "w") as f:
            yaml.safe_dump(generated, f, sort_keys=False)
        overrides = {**(source.record.get("overrides") or {}), "seed": fresh_first_seed(source)}
        passed.set = [*_set_flags(overrides), *passed.set]
        passed.seeds = seeds
        plan = make_plan(passed)
        plan.source_sweep = source.name
    status = run(plan)
    try:
        confirmed = load_sweep(plan.sweep_uri)
        table = confirmation_table(source.trials, confirmed.trials, baseline=base_id,
                                   params=source.params)
    except AnalysisError as e:  # e.g. every trial failed: the sweep's lines said why
        print(f"error: no confirmed table: {e}", file=sys.stderr)
        return status or cli.USER_ERROR
    print(f"\nConfirmation of {source.name} ({plan.sweep_uri})\n\n{format_table(table)}")
    return status


def main(argv: Sequence[str] | None = None) -> int:
    args, rest = build_parser().parse_known_args(argv)
    return confirm(args.results, args.top, args.seeds, args.baseline, rest)


if __name__ == "__main__":
    sys.exit(main())
