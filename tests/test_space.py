"""Search spaces: parsing, validation (exit 2 before Ray, one message naming the key) and
define-by-run sampling with conditions, on real Optuna studies."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import optuna
import pytest

from ufw.config import PRESETS, ConfigError
from ufw.space import build_config, load_space, parse_space, space_from_dict

ROOT = Path(__file__).resolve().parents[1]
SPACES = sorted((ROOT / "search_spaces").glob("*.yaml"))

GOOD = {
    "fixed": {"dim": 16, "num_heads": 2, "max_epochs": 2},
    "parameters": {"lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}},
}

# (name, YAML text, a string the error message must contain: the key at fault)
BAD_SPACES = [
    ("unknown_top_level", "paramters: {}\n", "paramters"),
    ("unknown_parameter", "parameters:\n  learning_rate: {type: float, low: 0, high: 1}\n",
     "learning_rate"),
    ("unknown_fixed_key", "fixed: {dimension: 16}\n", "dimension"),
    ("low_above_high", "parameters:\n  routing_threshold: {type: float, low: 0.9, high: 0.1}\n",
     "routing_threshold"),
    ("log_low_zero", "parameters:\n  lr: {type: float, low: 0, high: 0.1, log: true}\n",
     "lr.low"),
    ("unknown_type", "parameters:\n  lr: {type: gaussian, low: 0, high: 1}\n", "lr.type"),
    ("unknown_param_key",
     "parameters:\n  lr: {type: float, low: 1.0e-4, high: 0.1, distribution: loguniform}\n",
     "lr.distribution"),
    ("condition_missing_param",
     "parameters:\n  alpha_steps: {type: categorical, choices: ['2'], "
     "condition: {schedule: step}}\n", "alpha_steps.condition.schedule"),
    ("yaml_syntax", "parameters:\n  lr: {type: float, low: 1\n", "invalid YAML"),
    ("objective_metric", "objectives:\n  - {metric: perplexity, direction: minimize}\n",
     "objectives[0].metric"),
    ("objective_direction", "objectives:\n  - {metric: best_ppl, direction: lower}\n",
     "objectives[0].direction"),
    ("value_outside_config_range",
     "parameters:\n  routing_threshold: {type: float, low: 0.5, high: 1.5}\n",
     "routing_threshold"),
    ("bad_preset_choice", "parameters:\n  preset: {type: categorical, choices: [lpt, best]}\n",
     "preset"),
    ("bad_defaults", "defaults: {num_samples: 0}\n", "defaults.num_samples"),
]


# ---------------------------------------------------------------------- the CLI: exit 2
def test_bad_spaces_exit_2_with_the_key_and_no_traceback(tmp_path):
    """Every kind of bad space: `python -m ufw.sweep` exits 2 naming the key, no traceback.

    The subprocesses run two at a time (each imports torch, Ray and Optuna: ~2 s).
    """
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for name, text, _ in BAD_SPACES:
        (tmp_path / f"{name}.yaml").write_text(text)
    results = {}
    pending = list(enumerate(BAD_SPACES))
    running: list[tuple[int, subprocess.Popen]] = []
    while pending or running:
        while pending and len(running) < 2:
            i, (name, _, _) = pending.pop(0)
            running.append((i, subprocess.Popen(
                [sys.executable, "-m", "ufw.sweep", str(tmp_path / f"{name}.yaml"),
                 "--results", str(tmp_path / "results")],
                cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))
        i, proc = running.pop(0)
        out, err = proc.communicate(timeout=120)
        results[i] = (proc.returncode, out, err)
    for i, (name, _, key) in enumerate(BAD_SPACES):
        rc, out, err = results[i]
        assert rc == 2, (name, rc, out, err)
        assert "Traceback" not in err, (name, err)
        assert key in err, (name, err)
        assert len([line for line in err.splitlines() if line.startswith("error:")]) == 1, err
    assert not (tmp_path / "results").exists()  # nothing ran: Ray never started


def test_missing_space_file_exits_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "ufw.sweep", str(tmp_path / "nope.yaml")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "nope.yaml" in proc.stderr and "Traceback" not in proc.stderr


def test_bad_set_override_exits_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "ufw.sweep",
                           str(ROOT / "search_spaces" / "quickstart.yaml"),
                           "--set", "dimension=16", "--results", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "--set dimension" in proc.stderr and "Traceback" not in proc.stderr


# ---------------------------------------------------------------------- the parser
@pytest.mark.parametrize("name,text,key", BAD_SPACES, ids=[b[0] for b in BAD_SPACES])
def test_parser_rejects(write_space, name, text, key):
    with pytest.raises(ConfigError, match=None) as info:
        space = load_space(write_space(text))
        space.validate_configs()
    assert key in str(info.value)


@pytest.mark.parametrize("raw,key", [
    ({"parameters": {"lr": {"type": "float", "low": 0.1}}}, "lr.high"),
    ({"parameters": {"dim": {"type": "int", "low": 8.5, "high": 16}}}, "dim.low"),
    ({"parameters": {"lr": "1e-3"}}, "parameters.lr"),
    ({"parameters": {"schedule": {"type": "categorical", "choices": ["linear", "expo"]}}},
     "schedule.choices"),
    ({"parameters": {"layer_weights": {"type": "float", "low": 0, "high": 1}}},
     "parameters.layer_weights"),
    ({"parameters": {"layer_weights.x": {"type": "float", "low": 0, "high": 1}}},
     "layer_weights.x"),
    ({"parameters": {"lr_scales.1": {"type": "float", "low": 0.1, "high": 1}}}, "lr_scales.1"),
    ({"parameters": {"a": {"type": "categorical", "choices": []}}}, "a"),
    ({"parameters": {"lr": {"type": "categorical", "choices": [0.1], "condition": {"y": 1}}}},
     "lr.condition.y"),
    ({"parameters": {
        "schedule": {"type": "categorical", "choices": ["linear", "step"]},
        "alpha_steps": {"type": "categorical", "choices": ["2"],
                        "condition": {"schedule": "cosine"}}}},
     "alpha_steps.condition.schedule"),
    ({"parameters": {"seed": {"type": "int", "low": 1, "high": 9}}}, "parameters.seed"),
    ({"objectives": [{"metric": "best_ppl"}, {"metric": "acc"}, {"metric": "compute_cost"}]},
     "objectives"),
    ({"objectives": [{"metric": "best_ppl"}, {"metric": "best_ppl"}]}, "objectives"),
    ({"sampler": "cmaes"}, "sampler.type"),
    ({"sampler": "grid", "parameters": {"lr": {"type": "float", "low": 0.1, "high": 1}}},
     "parameters.lr"),
    ({"data": {"corpus": "x"}}, "data.corpus"),
    ({"data": {"train_chars": -5}}, "data.train_chars"),
    ({"defaults": {"workers": 2}}, "defaults.workers"),
    ({"fixed": {"preset": "nope"}}, "fixed.preset"),
    ({"fixed": {"lr": 1e-3}, "parameters": {"lr": {"type": "float", "low": 0.1, "high": 1}}},
     "parameters.lr"),
])
def test_parse_space_rejects(raw, key):
    with pytest.raises(ConfigError) as info:
        parse_space(raw).validate_configs()
    assert key in str(info.value)


def test_validation_builds_every_bound_and_choice():
    # dim 16 with num_heads 2 is fine, but num_heads 3 does not divide dim: found before Ray.
    raw = {"fixed": {"dim": 16},
           "parameters": {"num_heads": {"type": "categorical", "choices": [2, 3]}}}
    with pytest.raises(ConfigError, match=r"parameters\.num_heads: choice 3"):
        parse_space(raw).validate_configs()
    # A conditional parameter is checked with its condition met.
    raw = {"parameters": {
        "schedule": {"type": "categorical", "choices": ["none", "linear"]},
        "alpha_end": {"type": "float", "low": 0.0, "high": 1.2,
                      "condition": {"schedule": "linear"}}}}
    with pytest.raises(ConfigError, match=r"parameters\.alpha_end: high 1\.2"):
        parse_space(raw).validate_configs()
    # --set overrides are part of every validation config.
    ok = parse_space({"parameters": {"num_heads": {"type": "categorical", "choices": [2, 4]}}})
    ok.validate_configs()
    with pytest.raises(ConfigError, match="num_heads"):
        ok.validate_configs({"dim": 12})


def test_yaml_1e_numbers_are_numbers(write_space):
    space = load_space(write_space("""
        fixed: {lr: 1e-3, layer_weights: {1: 5e-1, 2: 0, 3: 5e-1}}
        parameters:
          weight_decay: {type: float, low: 1e-5, high: 1e-1, log: true}
    """))
    config = space.validate_configs()
    assert config.lr == 0.001 and config.layer_weights[1] == 0.5
    assert space.parameters[0].low == 1e-5


def test_shipped_spaces_are_valid():
    assert {p.stem for p in SPACES} >= {"quickstart", "seed_table", "alpha_lr", "pareto"}
    for path in SPACES:
        load_space(path).validate_configs()
    pareto = load_space(ROOT / "search_spaces" / "pareto.yaml")
    assert [o.metric for o in pareto.objectives] == ["best_ppl", "compute_cost"]
    assert pareto.sampler["type"] == "nsga2"


# ---------------------------------------------------------------------- config building
def test_build_config_maps_names_onto_the_config():
    config, preset = build_config(
        {"preset": "asymmetric_best", "dim": 32},
        {"layer_lr_scales.2": 0.5, "layer_weights.1": 0.6, "routing_threshold": 0.8,
         "schedule": "step", "alpha_start": 0.9, "alpha_end": 0.3, "alpha_steps": "2,4",
         "confidence_method": "entropy"},
        {"max_epochs": 5})
    assert preset == "asymmetric_best"
    assert config.dim == 32 and config.max_epochs == 5
    assert config.layer_lr_scales == {2: 0.5}
    assert config.layer_weights == {1: 0.6, 2: 0.0, 3: 0.3}
    assert config.routing_threshold == 0.8 and config.confidence_method == "entropy"
    s = config.alpha_schedule
    assert (s.schedule_type, s.start, s.end, s.steps) == ("step", 0.9, 0.3, [2, 4])
    none, _ = build_config({"schedule": "linear", "alpha_start": 0.9}, {"schedule": "none"})
    assert none.alpha_schedule is None
    # A sampled preset overrides a fixed one; later layers win.
    config, preset = build_config({"preset": "lpt"}, {"preset": "deep_focus"})
    assert preset == "deep_focus" and config.layer_weights == {1: 0.3, 2: 0, 3: 0.7}


def test_configs_give_seed_replicates_sharing_config_id():
    space = parse_space(GOOD)
    configs = space.configs({"lr": 0.01}, {}, seeds=3)
    assert [c.seed for c, _ in configs] == [42, 43, 44]
    assert len({c.config_id for c, _ in configs}) == 1
    shifted = space.configs({"lr": 0.01}, {"seed": 7}, seeds=2)
    assert [c.seed for c, _ in shifted] == [7, 8]


def test_space_round_trips_through_its_record():
    space = load_space(ROOT / "search_spaces" / "alpha_lr.yaml")
    assert space_from_dict(space.to_dict()) == space


# ---------------------------------------------------------------------- sampling
def test_define_by_run_sampling_respects_conditions():
    space = load_space(ROOT / "search_spaces" / "alpha_lr.yaml")
    names = [p.name for p in space.parameters]
    assert names.index("schedule") < names.index("alpha_steps")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(80):
        trial = study.ask()
        values = space.sample(trial)
        schedule = values["schedule"]
        seen.add(schedule)
        assert ("alpha_steps" in values) == (schedule == "step")
        assert ("alpha_start" in values) == (schedule != "none")
        assert ("alpha_end" in values) == (schedule in ("linear", "cosine", "step"))
        assert set(trial.params) == set(values)  # Optuna saw exactly the active parameters
        for key in ("lr_scale_1", "lr_scale_2", "lr_scale_3"):
            assert 0.1 <= values[key] <= 1.0
        config, _ = build_config(space.fixed, values)  # every sample is a valid config
        assert (config.alpha_schedule is None) == (schedule == "none")
        study.tell(trial, 1.0)
    assert seen == {"none", "constant", "linear", "cosine", "step"}


def test_int_and_log_parameters_sample_inside_their_range():
    space = parse_space({"parameters": {
        "patience": {"type": "int", "low": 0, "high": 4},
        "lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
        "grad_clip": {"type": "float", "low": 0.5, "high": 2.0, "step": 0.5}}})
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    for _ in range(30):
        values = space.sample(study.ask())
        assert isinstance(values["patience"], int) and 0 <= values["patience"] <= 4
        assert 1e-4 <= values["lr"] <= 1e-2
        assert values["grad_clip"] in (0.5, 1.0, 1.5, 2.0)


def test_grid_sampler_enumerates_every_preset_once():
    space = load_space(ROOT / "search_spaces" / "seed_table.yaml")
    assert space.grid_size == len(PRESETS) == 9
    study = space.create_study()
    presets = [space.sample(study.ask())["preset"] for _ in range(space.grid_size)]
    assert sorted(presets) == sorted(PRESETS)


def test_two_objectives_make_a_two_direction_study():
    space = load_space(ROOT / "search_spaces" / "pareto.yaml")
    study = space.create_study()
    assert len(study.directions) == 2
    trial = study.ask()
    values = space.sample(trial)
    study.tell(trial, [10.0, 0.8])
    assert study.best_trials[0].values == [10.0, 0.8]
    assert set(values) == {p.name for p in space.parameters}
    assert not math.isnan(values["routing_threshold"])


def test_yaml_error_message_has_line_number(write_space):
    with pytest.raises(ConfigError, match=r"invalid YAML \(line \d+"):
        load_space(write_space(textwrap.dedent("""
            parameters:
              lr: [1, 2
        """)))


def test_explicit_points_are_a_grid_of_configurations():
    space = parse_space({"fixed": {"dim": 16}, "points": [
        {"preset": "lpt"}, {"routing_threshold": 0.8, "layer_weights.1": 0.5}]})
    assert space.grid_size == 2 and space.sampler["type"] == "grid"
    space.validate_configs()
    study = space.create_study()
    sampled = []
    for _ in range(2):
        trial = study.ask()
        sampled.append(space.sample(trial))
        study.tell(trial, 1.0)
    assert sorted(sampled, key=str) == sorted(space.points, key=str)  # each point once
    for raw, where in (({"points": [{"nope": 1}]}, "points[0].nope"),
                       ({"points": [{"seed": 1}]}, "points[0].seed"),
                       ({"points": []}, "points"),
                       ({"points": [{"lr": 1e-3}], "parameters": {"dim": {
                           "type": "int", "low": 8, "high": 16}}}, "points")):
        with pytest.raises(ConfigError, match=re.escape(where)):
            parse_space(raw)
    with pytest.raises(ConfigError, match=re.escape("points[1]")):
        parse_space({"points": [{"lr": 1e-3}, {"routing_threshold": 7}]}).validate_configs()
