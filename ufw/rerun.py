"""Re-training one row of a sweep's results: `python -m ufw.train --from RESULTS --config-id ID`.

A trials row holds every knob of its configuration under its canonical name (docs/knobs.md),
so the row itself says what to train. The data is the sweep's: its `sweep.json` records the
data flags the trials loaded (the row's `dataset` column names the corpus but not, for
example, how many characters of it were used).

The configuration is rebuilt two ways and the one whose `config_id` equals the row's wins:
from the sweep's own record (its fixed values, the row's sampled parameters, its `--set`
overrides: the path the sweep took) and from the row's columns alone (which also works when
the record is gone or a later ufw changed a default). Both give the same training; they can
differ in how a value is written (an explicit `lr_scale_N` of 1 against no scales at all),
which changes the id but not the run.
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass, replace
from typing import Any

from ufw.config import ALPHA_KNOBS, ConfigError, UniversalConfig
from ufw.results import read_sweep_record, read_trials, sweep_dir
from ufw.space import build_config, space_from_dict

# Fields whose column is not the field's value itself (flat() spreads or encodes them).
_ENCODED = ("layer_weights", "layer_lr_scales", "exit_layers", "exit_thresholds",
            "alpha_schedule")


@dataclass
class Rerun:
    config: UniversalConfig
    preset: str | None
    data: dict[str, Any] | None  # the sweep's data flags; None: no record of them
    row: dict[str, Any]  # the row being re-trained
    notes: list[str]  # what the user should know (which seed, what differs)


def rerun_of(results: str, config_id: str, seed: int | None = None) -> Rerun:
    """The configuration and data of the row of `results` (`<results>/<sweep>`) with this
    config_id (or a unique prefix of it) and seed; ConfigError if there is none."""
    frame = read_trials(results)
    if not len(frame) or "config_id" not in frame:
        raise ConfigError(f"--from {results}: no trial rows there (expected "
                          "<results>/<sweep>/trials/part-*.parquet)")
    ids = sorted({i for i in frame["config_id"].dropna().unique() if str(i).startswith(config_id)})
    if len(ids) != 1:
        known = sorted(frame["config_id"].dropna().unique())
        what = "is ambiguous" if ids else "is not"
        raise ConfigError(f"--config-id {config_id}: {what} among the {len(known)} "
                          f"configurations of {results} (e.g. {', '.join(known[:3])})")
    rows = frame[frame["config_id"] == ids[0]].sort_values("seed")
    seeds = [int(s) for s in rows["seed"]]
    notes = []
    if seed is None:
        seed = seeds[0]
        if len(seeds) > 1:
            notes.append(f"config {ids[0]} was trained with seeds {', '.join(map(str, seeds))}; "
                         f"training seed {seed} (--seed picks another)")
    elif seed not in seeds:
        notes.append(f"seed {seed}: not among the row's seeds ({', '.join(map(str, seeds))}); "
                     "training it anyway, so there is no best_ppl to compare with")
    row = {k: _plain(v) for k, v in rows.iloc[seeds.index(seed) if seed in seeds else 0].items()}
    record = read_sweep_record(results)
    candidates = [(config_from_row(row), row.get("preset"))]
    if record is not None:
        with contextlib.suppress(ConfigError, KeyError, TypeError):  # a record too old to read
            candidates.insert(0, _from_record(record, row))
    config, preset = next((c for c in candidates if c[0].config_id == ids[0]), candidates[-1])
    if config.config_id != ids[0]:
        notes.append(f"the rebuilt configuration's id is {config.config_id}, not {ids[0]}: the "
                     "same values, written differently (see ufw/rerun.py)")
    if record and record.get("precision", "fp32") != "fp32":
        notes.append(f"the sweep trained in {record['precision']}; this run trains in fp32")
    return Rerun(replace(config, seed=seed), preset, record and record.get("data"), row, notes)


def config_from_row(row: dict[str, Any]) -> UniversalConfig:
    """The configuration a trials row shows: every knob from its column."""
    knobs = {f: row[f] for f in UniversalConfig().to_dict() if f not in _ENCODED and f in row}
    layers = range(1, int(row["num_layers"]) + 1)
    knobs["layer_weights"] = {i: row[f"layer_weight_{i}"] for i in layers}
    scales = {i: row[f"lr_scale_{i}"] for i in layers}
    knobs["layer_lr_scales"] = None if all(s == 1.0 for s in scales.values()) else scales
    exits = json.loads(row["exit_layers"])
    knobs["exit_layers"] = None if exits == [row["exit_layer"]] else exits
    thresholds = json.loads(row["exit_thresholds"])
    same = all(t == row["routing_threshold"] for t in thresholds)
    knobs["exit_thresholds"] = None if same else thresholds
    if row["schedule"] not in (None, "none"):
        knobs.update({name: row[name] for name in ALPHA_KNOBS})
    return UniversalConfig.from_dict(knobs)


def _from_record(record: dict[str, Any], row: dict[str, Any]) -> tuple[UniversalConfig, str]:
    """What the sweep built: its fixed values, the row's sampled parameters, its overrides."""
    space = space_from_dict(record["space"])
    return build_config(space.fixed, space.point_of(row), record.get("overrides") or {})


def _plain(value: Any) -> Any:
    """A Parquet cell as plain Python (numpy scalars are not `int` to validation)."""
    value = value.item() if hasattr(value, "item") else value
    return None if isinstance(value, float) and math.isnan(value) else value


def rerun_command(results: str, config_id: str, seed: int | None = None,
                  device: str | None = None) -> str:
    """The command line that re-trains a row (the sweep's summary prints it)."""
    flags = "".join(f" --{flag} {value}" for flag, value in (("seed", seed), ("device", device))
                    if value is not None)
    return f"python -m ufw.train --from {sweep_dir(results)} --config-id {config_id}{flags}"
