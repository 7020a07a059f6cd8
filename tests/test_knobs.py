"""One name per knob (docs/knobs.md): every spelling of a knob, through every entry point that
takes a configuration (`ufw.train --set`, YAML config files, search spaces' fixed values,
parameters and `ufw.sweep --set`), gives the same configuration; an unknown key is refused
with the closest known one; the knob table in the docs is the code's."""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from ufw import cli, sweep
from ufw.config import KNOBS, ConfigError, UniversalConfig, canonical_knob, knob_table, preset
from ufw.space import build_config, knob_name, parse_space

ROOT = Path(__file__).resolve().parents[1]
BASE = "lpt"  # no alpha schedule, no layer LR scales: every change below shows in config_id

# A valid value for every knob that has aliases (N: layer 2).
VALUES = {"layer_weight_N": 0.4, "lr_scale_N": 0.25, "schedule": "cosine", "alpha_start": 0.8,
          "alpha_end": 0.1, "alpha_steps": [2, 4]}


def spellings(knob) -> list[str]:
    return [s.replace("N", "2") for s in (knob.name, *knob.aliases)]


def through_train_set(key: str, value) -> UniversalConfig:
    args = argparse.Namespace(preset=BASE, config=None, seed=None,
                              set=[f"{key}={json.dumps(value)}"])
    return cli.config_from_args(args)


def through_yaml(key: str, value, tmp_path: Path) -> UniversalConfig:
    path = tmp_path / "config.yaml"
    path.write_text(f"preset: {BASE}\n{key}: {json.dumps(value)}\n")
    return UniversalConfig.from_yaml(path)


def through_space_fixed(key: str, value) -> UniversalConfig:
    space = parse_space({"fixed": {"preset": BASE, key: value}})
    return build_config(space.fixed, {})[0]


def through_space_parameter(key: str, value) -> UniversalConfig:
    choice = ",".join(map(str, value)) if isinstance(value, list) else value  # "2,4"
    space = parse_space({"fixed": {"preset": BASE},
                         "parameters": {key: {"type": "categorical", "choices": [choice]}}})
    (parameter,) = space.parameters
    return build_config(space.fixed, {parameter.name: choice})[0]


def through_sweep_set(key: str, value) -> UniversalConfig:
    return build_config({"preset": BASE}, {}, {knob_name(key, "--set"): value})[0]


@pytest.mark.parametrize("knob", [k for k in KNOBS if k.aliases], ids=lambda k: k.name)
def test_every_spelling_through_every_entry_point_gives_one_config_id(knob, tmp_path):
    value = VALUES[knob.name]
    ids = {}
    for key in spellings(knob):
        ids[key, "train --set"] = through_train_set(key, value).config_id
        ids[key, "yaml"] = through_yaml(key, value, tmp_path).config_id
        ids[key, "space fixed"] = through_space_fixed(key, value).config_id
        ids[key, "space parameter"] = through_space_parameter(key, value).config_id
        ids[key, "sweep --set"] = through_sweep_set(key, value).config_id
    if knob.name.startswith("alpha_") or knob.name == "schedule":  # the nested YAML mapping
        field = knob.aliases[0].split(".")[1]
        path = tmp_path / "nested.yaml"
        path.write_text(f"preset: {BASE}\nalpha_schedule: {{{field}: {json.dumps(value)}}}\n")
        ids["alpha_schedule: {...}", "yaml"] = UniversalConfig.from_yaml(path).config_id
    assert len(set(ids.values())) == 1, ids
    assert preset(BASE).config_id not in ids.values()  # the value took effect


def test_every_knob_has_a_value_here():
    assert set(VALUES) == {k.name for k in KNOBS if k.aliases}


def test_result_columns_typed_back_give_the_same_config():
    """What the issue tried: the winning row's column values copied into --set."""
    config = preset("asymmetric_best").with_overrides({
        "alpha_schedule": {"type": "step", "start": 0.9, "end": 0.3, "steps": [2, 4]},
        "layer_lr_scales": {1: 1.0, 2: 0.5, 3: 0.2}, "exit_layers": [1, 2],
        "exit_thresholds": {1: 0.9, 2: 0.8}})
    row = config.flat()
    copied = {k: row[k] for k in ("schedule", "alpha_start", "alpha_end", "alpha_steps",
                                  "lr_scale_1", "lr_scale_2", "lr_scale_3", "exit_layers")}
    copied["exit_thresholds"] = json.loads(row["exit_thresholds"])  # a list, in exit order
    copied["exit_layers"] = json.loads(copied["exit_layers"])
    assert preset("asymmetric_best").with_overrides(copied).config_id == config.config_id


@pytest.mark.parametrize("wrong, closest", [
    ("alpha_endd", "alpha_end"), ("layer_weigth_2", "layer_weight_2"),
    ("lr_scales.3", "lr_scale_3"), ("exit_threshold.1", "exit_thresholds.1"),
    ("routing_treshold", "routing_threshold"), ("alpha_schedule.strat", "alpha_schedule.start"),
])
def test_unknown_key_names_the_closest_known_one(wrong, closest):
    for attempt in (lambda: preset(BASE).with_overrides({wrong: 0.5}),
                    lambda: UniversalConfig.from_dict({wrong: 0.5}),
                    lambda: parse_space({"fixed": {wrong: 0.5}}),
                    lambda: parse_space({"parameters": {
                        wrong: {"type": "float", "low": 0.1, "high": 0.5}}})):
        with pytest.raises(ConfigError) as err:
            attempt()
        assert wrong in str(err.value) and f"did you mean {closest!r}" in str(err.value)


def test_nonsense_key_points_to_the_knob_table():
    with pytest.raises(ConfigError, match=r"docs/knobs\.md"):
        canonical_knob("bananas")


def test_one_knob_twice_under_two_spellings_is_refused():
    with pytest.raises(ConfigError, match="the same knob as alpha_end"):
        preset(BASE).with_overrides({"alpha_end": 0.1, "alpha_schedule.end": 0.2})
    with pytest.raises(ConfigError, match="the same knob"):
        parse_space({"parameters": {"layer_weight_1": {"type": "float", "low": 0, "high": 1},
                                    "layer_weights.1": {"type": "float", "low": 0, "high": 1}}})
    with pytest.raises(ConfigError, match="also given in fixed"):
        parse_space({"fixed": {"layer_weights.1": 0.5},
                     "parameters": {"layer_weight_1": {"type": "float", "low": 0, "high": 1}}})


def test_space_conditions_accept_any_spelling():
    space = parse_space({"parameters": {
        "alpha_schedule.type": {"type": "categorical", "choices": ["linear", "step"]},
        "alpha_steps": {"type": "categorical", "choices": ["2,4"],
                        "condition": {"schedule": "step"}}}})
    assert [p.name for p in space.parameters] == ["schedule", "alpha_steps"]
    assert space.parameters[1].condition == {"schedule": ["step"]}


def test_cli_wrong_keys_exit_2_with_one_line(capsys):
    proc = subprocess.run([sys.executable, "-m", "ufw.train", "--preset", BASE, "--set",
                           "alpha_endd=0.1"], capture_output=True, text=True, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("error: alpha_endd: unknown config key; did you mean "
                                   "'alpha_end'? (every knob: docs/knobs.md)")
    space = ROOT / "search_spaces" / "quickstart.yaml"
    with pytest.raises(SystemExit) as exit_info:  # before Ray starts
        sweep.main([str(space), "--set", "lr_scale2=0.5"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--set lr_scale2: unknown config key" in err
    assert "did you mean 'lr_scale_2'" in err


# ---------------------------------------------------------------------- the knob table
def test_docs_knob_table_is_the_codes():
    text = (ROOT / "docs" / "knobs.md").read_text()
    assert knob_table() in text, ("docs/knobs.md is out of date: paste in the output of "
                                  "python -c 'from ufw.config import knob_table; "
                                  "print(knob_table())'")


def test_every_config_field_is_a_knob_and_every_spelling_resolves():
    names = {k.name for k in KNOBS}
    assert {f.name for f in dataclasses.fields(UniversalConfig)} <= names
    assert len(names) == len(KNOBS)
    for knob in KNOBS:
        for spelling in spellings(knob):
            assert canonical_knob(spelling) == knob.name.replace("N", "2")
    assert "[docs/knobs.md](docs/knobs.md)" in (ROOT / "README.md").read_text()
