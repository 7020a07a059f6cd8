"""Search spaces: YAML files saying what a sweep varies, what it keeps fixed, what it optimises.

A search space (see `search_spaces/*.yaml` and docs/sweep.md) has these top-level keys:

    description: free text
    fixed:       UniversalConfig values every configuration shares (may name a `preset`)
    parameters:  name -> {type: float|int, low, high, log, step} or {type: categorical, choices}
                 each with an optional `condition: {other_parameter: value or [values]}`
    objectives:  [{metric: best_ppl, direction: minimize}, ...]   (1 or 2 entries)
    defaults:    num_samples, cohort, seeds, max_concurrent
    data:        data, train_file, val_file, train_chars, val_chars, tokenizer (the data
                 flags): one corpus, and so one vocabulary, for the whole sweep
    sampler:     tpe | random | grid | nsga2, or {type: ..., seed: N, population_size: N}
    points:      instead of parameters, a list of explicit configurations (mappings of config
                 keys), each trained once x seeds (ufw.confirm writes such spaces)

Parameter (and fixed) names are knobs (docs/knobs.md) in any of their spellings: plain fields
(`lr`, `routing_threshold`, ...), per-layer entries (`layer_weight_1` or `layer_weights.1`,
`lr_scale_2` or `layer_lr_scales.2`, `exit_thresholds.1`), the alpha schedule's `schedule`
(constant, linear, cosine, step, or none for no schedule), `alpha_start`, `alpha_end` and
`alpha_steps` (or `alpha_schedule.start`, ...), and `preset` (a categorical over preset
names). Names are stored canonical, so a sampled parameter is named as its Parquet column.

`load_space()` validates everything, including one configuration built from every bound and
choice, so that a bad space fails with `ConfigError` (one message naming the key) before any
Ray or Optuna work starts. `SearchSpace.sample(trial)` is the define-by-run sampler: it asks
an Optuna trial for each active parameter, in dependency order, honouring conditions.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ufw.config import (
    PRESETS,
    SCHEDULES,
    ConfigError,
    UniversalConfig,
    apply_knobs,
    canonical_knob,
    is_numeric_knob,
    knob_field,
    parse_steps,
)
from ufw.tokenizer import parse_tokenizer

TOP_LEVEL_KEYS = ("description", "fixed", "parameters", "objectives", "defaults", "data",
                  "sampler", "points")
PARAM_TYPES = ("float", "int", "categorical")
PARAM_KEYS = {"float": ("type", "low", "high", "log", "step", "condition"),
              "int": ("type", "low", "high", "log", "step", "condition"),
              "categorical": ("type", "choices", "condition")}
# Metrics a trial reports per configuration (means over its seeds) that Optuna can optimise.
METRICS = ("best_ppl", "acc", "shallow_ratio", "compute_cost", "expert_ffns_per_token",
           "train_seconds", "best_epoch")
DIRECTIONS = ("minimize", "maximize")
DEFAULT_KEYS = ("num_samples", "cohort", "seeds", "max_concurrent")
# num_samples None: 8, or the whole grid with sampler grid.
DEFAULTS = {"num_samples": None, "cohort": 1, "seeds": 1, "max_concurrent": None}
POINT = "point"  # the study parameter of a space of explicit points: the point's index
DATA_KEYS = ("data", "train_file", "val_file", "train_chars", "val_chars", "tokenizer")
SAMPLERS = ("tpe", "random", "grid", "nsga2")
SAMPLER_KEYS = ("type", "seed", "population_size", "n_startup_trials")
MAPPING_FIELDS = ("layer_weights", "layer_lr_scales", "exit_thresholds")
# Fields that are not scalars: they can be fixed, but not swept as one parameter.
STRUCTURED_FIELDS = (*MAPPING_FIELDS, "alpha_schedule", "exit_layers")
_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def as_number(value: Any) -> Any:
    """YAML 1.1 reads `1e-3` as a string; make such strings the numbers they mean."""
    if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        text = value.strip()
        return int(text) if re.fullmatch(r"[-+]?\d+", text) else float(text)
    return value


def is_numeric_key(name: str) -> bool:
    """Keys whose values are numbers (so `1e-3` written in YAML means 0.001)."""
    return name != "preset" and is_numeric_knob(name)


def knob_name(name: str, where: str) -> str:
    """The canonical name (docs/knobs.md) of a fixed, parameter or --set key; `preset` too."""
    if name == "preset":
        return name
    try:
        return canonical_knob(name, also=("preset",))
    except ConfigError as e:
        raise ConfigError(f"{where} {e}" if where.startswith("--") else f"{where}.{e}") from None


def parameter_column(name: str) -> str | None:
    """The Parquet column of a parameter: its canonical knob name (docs/knobs.md); None for
    `exit_thresholds.N`, an entry of the list column `exit_thresholds`."""
    if name == "preset":
        return name
    canonical = canonical_knob(name)
    return None if knob_field(canonical)[0] == "exit_thresholds" else canonical


def build_config(*layers: dict[str, Any]) -> tuple[UniversalConfig, str | None]:
    """One configuration from layers of values (fixed, sampled, --set), later layers winning.

    Returns the validated config and the preset it started from (None if none).
    """
    preset_name = None
    for layer in layers:
        if "preset" in layer:
            preset_name = layer["preset"]
    if preset_name is not None:
        if preset_name not in PRESETS:
            raise ConfigError(f"preset: unknown {preset_name!r}; allowed: {', '.join(PRESETS)}")
        data = PRESETS[preset_name].to_dict()
    else:
        data = UniversalConfig().to_dict()
    for layer in layers:
        data = apply_knobs(data, {k: v for k, v in layer.items() if k != "preset"})
    return UniversalConfig.from_dict(data), preset_name


@dataclass
class Parameter:
    name: str
    type: str
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: list[Any] = field(default_factory=list)
    condition: dict[str, list[Any]] = field(default_factory=dict)

    def extremes(self) -> list[Any]:
        """The values a validation config is built from: both bounds, or every choice."""
        return list(self.choices) if self.type == "categorical" else [self.low, self.high]

    def suggest(self, trial) -> Any:
        if self.type == "float":
            return trial.suggest_float(self.name, self.low, self.high, log=self.log,
                                       step=self.step)
        if self.type == "int":
            return trial.suggest_int(self.name, self.low, self.high, log=self.log,
                                     step=self.step or 1)
        return trial.suggest_categorical(self.name, self.choices)

    def value_in(self, row: dict[str, Any]) -> Any:
        """This parameter's value in a configuration's result row (UniversalConfig.flat()
        columns): the inverse of sampling it, as one of its choices where it has them."""
        column = parameter_column(self.name)
        if column is None:  # exit_thresholds.N: a JSON list, one entry per exit layer
            layer = knob_field(canonical_knob(self.name))[1]
            layers, thresholds = json.loads(row["exit_layers"]), json.loads(row["exit_thresholds"])
            value = thresholds[layers.index(layer)]
        elif column == "alpha_steps":
            steps = parse_steps(row["alpha_steps"])
            value = next((c for c in self.choices if parse_steps(c) == steps), steps)
        else:
            value = row[column]
        value = value.item() if hasattr(value, "item") else value  # numpy scalars: plain
        if self.type == "categorical":
            return next((c for c in self.choices if c == value or (
                isinstance(c, (int, float)) and isinstance(value, (int, float))
                and math.isclose(c, value, rel_tol=1e-12))), value)
        return int(value) if self.type == "int" else float(value)

    def active(self, values: dict[str, Any]) -> bool:
        return all(name in values and values[name] in allowed
                   for name, allowed in self.condition.items())


@dataclass
class Objective:
    metric: str
    direction: str

    @property
    def mode(self) -> str:  # Ray Tune's spelling
        return "min" if self.direction == "minimize" else "max"

    def worst(self) -> float:
        return math.inf if self.direction == "minimize" else -math.inf


@dataclass
class SearchSpace:
    name: str
    fixed: dict[str, Any]
    parameters: list[Parameter]  # in sampling (dependency) order
    objectives: list[Objective]
    defaults: dict[str, Any]
    data: dict[str, Any]
    sampler: dict[str, Any]
    description: str = ""
    # explicit configurations instead of sampled parameters: each is one grid point
    points: list[dict[str, Any]] = field(default_factory=list)

    # ------------------------------------------------------------------ sampling
    def sample(self, trial) -> dict[str, Any]:
        """Define-by-run: ask `trial` for every active parameter, conditions honoured."""
        if self.points:  # the study records which point; the trial trains its values
            return dict(self.points[trial.suggest_categorical(POINT, self.grid()[POINT])])
        values: dict[str, Any] = {}
        for p in self.parameters:
            if p.active(values):
                values[p.name] = p.suggest(trial)
        return values

    def point_of(self, row: dict[str, Any]) -> dict[str, Any]:
        """The sampled values that gave a configuration, from its result row (the inverse of
        sample(); build_config(fixed, point, overrides) rebuilds the configuration)."""
        if self.points:
            raise ConfigError("point_of: a space of explicit points samples nothing")
        values: dict[str, Any] = {}
        for p in self.parameters:
            if p.active(values):
                values[p.name] = p.value_in(row)
        return values

    def grid(self) -> dict[str, list[Any]]:
        """Optuna GridSampler's search space (every parameter is categorical; with points,
        the index of each point)."""
        if self.points:
            return {POINT: list(range(len(self.points)))}
        return {p.name: list(p.choices) for p in self.parameters}

    @property
    def grid_size(self) -> int:
        return math.prod(len(choices) for choices in self.grid().values())

    def make_sampler(self, seed_offset: int = 0):
        """The space's Optuna sampler; ``seed_offset`` gives a copy its own stream of draws
        (added to the space's seed, if it fixes one)."""
        import optuna

        kind = self.sampler["type"]
        seed = self.sampler.get("seed")
        seed = None if seed is None else seed + seed_offset
        if kind == "grid":
            from ufw.grid_sampler import GridSampler

            return GridSampler(self.grid(), seed=seed)
        if kind == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        if kind == "nsga2":
            return optuna.samplers.NSGAIISampler(
                population_size=self.sampler.get("population_size", 50), seed=seed)
        from ufw.batched_tpe import BatchedTPESampler  # Optuna's TPE, fitted once per batch

        return BatchedTPESampler(seed=seed,
                                 n_startup_trials=self.sampler.get("n_startup_trials", 10))

    def create_study(self, storage=None, study_name: str | None = None):
        """An Optuna study of this space; with a ``storage``, the study ``study_name`` kept
        there (loaded when it exists, so that a resumed sweep continues it)."""
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        return optuna.create_study(sampler=self.make_sampler(), storage=storage,
                                   study_name=study_name, load_if_exists=storage is not None,
                                   directions=[o.direction for o in self.objectives])

    # ------------------------------------------------------------------ configurations
    def configs(self, params: dict[str, Any], overrides: dict[str, Any] | None = None,
                seeds: int = 1) -> list[tuple[UniversalConfig, str | None]]:
        """The `seeds` configurations of one sampled point: seeds base, base+1, ..."""
        config, preset_name = build_config(self.fixed, params, overrides or {})
        return [(dataclasses.replace(config, seed=config.seed + s), preset_name)
                for s in range(seeds)]

    def validate_configs(self, overrides: dict[str, Any] | None = None) -> UniversalConfig:
        """Build one configuration per bound/choice of every parameter; return the first.

        The others sit at their first value (low or first choice); a conditional parameter
        is checked with its condition met. A bad value fails with ConfigError naming it.
        """
        overrides = overrides or {}
        for i, point in enumerate(self.points):
            try:
                build_config(self.fixed, point, overrides)
            except ConfigError as e:
                raise ConfigError(f"points[{i}]: an invalid configuration: {e}") from None
        baseline = self._assignment({})
        try:
            first, _ = build_config(self.fixed, baseline, overrides)
        except ConfigError as e:
            where = "fixed" if not self.parameters else "fixed/parameters"
            raise ConfigError(f"{where}: the space gives an invalid configuration: {e}") from None
        for p in self.parameters:
            for label, value in zip(("low", "high") if p.type != "categorical" else
                                    itertools.repeat("choice"), p.extremes()):
                assignment = self._assignment({p.name: value})
                try:
                    build_config(self.fixed, assignment, overrides)
                except ConfigError as e:
                    raise ConfigError(f"parameters.{p.name}: {label} {value!r} gives an invalid "
                                      f"configuration: {e}") from None
        return first

    def _assignment(self, forced: dict[str, Any]) -> dict[str, Any]:
        """First values of every parameter, with `forced` ones and their conditions met."""
        wanted = dict(forced)
        for name in list(forced):  # meet the conditions of forced parameters (transitively)
            stack = [name]
            while stack:
                p = self.parameter(stack.pop())
                for cond, allowed in p.condition.items():
                    if cond not in wanted:
                        wanted[cond] = allowed[0]
                        stack.append(cond)
        values: dict[str, Any] = {}
        for p in self.parameters:
            if p.active(values):
                values[p.name] = wanted.get(p.name, p.extremes()[0])
        return values

    def parameter(self, name: str) -> Parameter:
        return next(p for p in self.parameters if p.name == name)

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def space_from_dict(data: dict[str, Any]) -> SearchSpace:
    """The inverse of `SearchSpace.to_dict()` (a sweep's record of its space)."""
    data = dict(data)
    data["parameters"] = [Parameter(**p) for p in data["parameters"]]
    data["objectives"] = [Objective(**o) for o in data["objectives"]]
    return SearchSpace(**data)


# ====================================================================== loading + validation
def load_space(path: str | Path) -> SearchSpace:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"search space {path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"search space {path}: not UTF-8 text") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"search space {path}: invalid YAML{where}: {problem}") from None
    if raw is None:  # it would train the default configuration num_samples times
        raise ConfigError(f"search space {path}: the file is empty; give at least "
                          "parameters to sample (docs/sweep.md)")
    return parse_space(raw, name=path.stem)


def parse_space(raw: Any, name: str = "space") -> SearchSpace:
    """Validate a search space given as plain data (the parsed YAML)."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"search space {name}: must be a mapping of "
                          f"{', '.join(TOP_LEVEL_KEYS)}")
    for key in raw:
        if key not in TOP_LEVEL_KEYS:
            raise ConfigError(f"{key}: unknown top-level key; allowed: "
                              f"{', '.join(TOP_LEVEL_KEYS)}")
    fixed = _parse_fixed(raw.get("fixed"))
    parameters = _parse_parameters(raw.get("parameters"))
    points = _parse_points(raw.get("points"))
    if points and parameters:
        raise ConfigError("points: a space gives either parameters to sample or explicit "
                          "points, not both")
    if points:
        given = raw.get("sampler")  # points are a grid (each once); a seed may order them
        raw = {**raw, "sampler": {"type": "grid",
                                  "seed": given.get("seed") if isinstance(given, dict) else None}}
    objectives = _parse_objectives(raw.get("objectives"))
    defaults = _parse_defaults(raw.get("defaults"))
    data = _parse_data(raw.get("data"))
    sampler = _parse_sampler(raw.get("sampler"), objectives)
    description = raw.get("description") or ""
    if not isinstance(description, str):
        raise ConfigError("description: must be text")
    overlap = sorted(set(fixed) & {p.name for p in parameters})
    if overlap:
        raise ConfigError(f"parameters.{overlap[0]}: also given in fixed; give it in one place")
    space = SearchSpace(name, fixed, parameters, objectives, defaults, data, sampler, description,
                        points)
    if sampler["type"] == "grid" and not points:
        for p in parameters:
            if p.type != "categorical":
                raise ConfigError(f"parameters.{p.name}: sampler grid needs categorical "
                                  "parameters (list the grid values as choices)")
            if p.condition:
                raise ConfigError(f"parameters.{p.name}.condition: not supported with "
                                  "sampler grid")
        if not parameters:
            raise ConfigError("parameters: sampler grid needs at least one parameter")
    return space


def _parse_points(raw: Any) -> list[dict[str, Any]]:
    if raw is None:
        return []
    if not isinstance(raw, list) or not raw:
        raise ConfigError("points: must be a non-empty list of configurations (mappings of "
                          "config keys)")
    return [_parse_fixed(point, f"points[{i}]") for i, point in enumerate(raw)]


def _mapping(value: Any, key: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: must be a mapping, got {value!r}")
    return value


def _parse_fixed(raw: Any, where: str = "fixed") -> dict[str, Any]:
    """Config values given as they are: the space's `fixed`, or one of its `points`."""
    fixed: dict[str, Any] = {}
    spelled: dict[str, str] = {}
    for key, value in _mapping(raw, where).items():
        key = _unique(knob_name(str(key), where), str(key), spelled, where)
        if key == "seed":
            raise ConfigError(f"{where}.seed: the seeds of a sweep are 42, 43, ... "
                              "(defaults.seeds sets how many); set the first one with --set "
                              "seed=N")
        if key == "preset" and value not in PRESETS:
            raise ConfigError(f"{where}.preset: unknown {value!r}; allowed: "
                              f"{', '.join(PRESETS)}")
        if key in MAPPING_FIELDS and isinstance(value, dict):
            value = {k: as_number(v) for k, v in value.items()}
        fixed[key] = as_number(value) if is_numeric_key(key) else value
    return fixed


def _unique(name: str, written: str, spelled: dict[str, str], where: str) -> str:
    """`name` (canonical), refusing a second spelling of a knob already in this section."""
    if name in spelled:
        raise ConfigError(f"{where}.{written}: the same knob as {spelled[name]} ({name}); "
                          "give it once")
    spelled[name] = written
    return name


# What a sweep can vary of a structured field, one entry at a time.
_ENTRIES = {"layer_weights": "layer_weight_1, ...", "layer_lr_scales": "lr_scale_1, ...",
            "exit_thresholds": "exit_thresholds.1, ...",
            "alpha_schedule": "schedule, alpha_start, alpha_end, alpha_steps"}


def _parse_parameters(raw: Any) -> list[Parameter]:
    params: dict[str, Parameter] = {}
    spelled: dict[str, str] = {}
    for written, spec in _mapping(raw, "parameters").items():
        key = f"parameters.{written}"
        name = _unique(knob_name(str(written), "parameters"), str(written), spelled,
                       "parameters")
        if name in STRUCTURED_FIELDS:
            entries = _ENTRIES.get(name)
            raise ConfigError(f"{key}: a mapping or list field cannot be one parameter; "
                              + (f"sweep its entries ({entries}) or " if entries else "")
                              + "fix it under fixed")
        if name == "seed":
            raise ConfigError(f"{key}: seeds are not sampled; defaults.seeds trains every "
                              "configuration with seeds 42, 43, ...")
        if not isinstance(spec, dict):
            raise ConfigError(f"{key}: must be a mapping like {{type: float, low: 0, high: 1}} "
                              f"or {{type: categorical, choices: [...]}}, got {spec!r}")
        kind = spec.get("type")
        if kind is None:
            raise ConfigError(f"{key}.type: missing; allowed: {', '.join(PARAM_TYPES)}")
        if kind not in PARAM_TYPES:
            raise ConfigError(f"{key}.type: unknown {kind!r}; allowed: {', '.join(PARAM_TYPES)}")
        for k in spec:
            if k not in PARAM_KEYS[kind]:
                raise ConfigError(f"{key}.{k}: unknown key for type {kind}; allowed: "
                                  f"{', '.join(PARAM_KEYS[kind])}")
        condition = _parse_condition(spec.get("condition"), key)
        if kind == "categorical":
            choices = spec.get("choices")
            if not isinstance(choices, list) or not choices:
                raise ConfigError(f"{key}.choices: must be a non-empty list, got {choices!r}")
            if is_numeric_key(name):
                choices = [as_number(c) for c in choices]
            for c in choices:
                if c is not None and not isinstance(c, (bool, int, float, str)):
                    raise ConfigError(f"{key}.choices: values must be numbers, text, booleans "
                                      f"or null, got {c!r}")
            if len(set(map(repr, choices))) != len(choices):
                raise ConfigError(f"{key}.choices: repeated values in {choices}")
            if name == "preset":
                bad = [c for c in choices if c not in PRESETS]
                if bad:
                    raise ConfigError(f"{key}.choices: unknown preset {bad[0]!r}; allowed: "
                                      f"{', '.join(PRESETS)}")
            if name == "schedule":
                bad = [c for c in choices if c not in (*SCHEDULES, "none")]
                if bad:
                    raise ConfigError(f"{key}.choices: unknown schedule {bad[0]!r}; allowed: "
                                      f"{', '.join(SCHEDULES)}, none")
            params[name] = Parameter(name, kind, choices=choices, condition=condition)
            continue
        bounds = {}
        for bound in ("low", "high"):
            if bound not in spec:
                raise ConfigError(f"{key}.{bound}: missing (type {kind} needs low and high)")
            value = as_number(spec[bound])
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            if kind == "int":
                ok = ok and float(value).is_integer()
                value = int(value) if ok else value
            if not ok or (isinstance(value, float) and not math.isfinite(value)):
                what = "integer" if kind == "int" else "number"
                raise ConfigError(f"{key}.{bound}: must be a finite {what}, got {spec[bound]!r}")
            bounds[bound] = float(value) if kind == "float" else value
        low, high = bounds["low"], bounds["high"]
        if low > high:
            raise ConfigError(f"{key}: low {low} is greater than high {high}")
        log = spec.get("log", False)
        if not isinstance(log, bool):
            raise ConfigError(f"{key}.log: must be true or false, got {log!r}")
        if log and low <= 0:
            raise ConfigError(f"{key}.low: log: true needs low > 0, got {low}")
        step = as_number(spec.get("step"))
        if step is not None:
            if not isinstance(step, (int, float)) or isinstance(step, bool) or step <= 0 or (
                    kind == "int" and not float(step).is_integer()):
                raise ConfigError(f"{key}.step: must be a positive "
                                  f"{'integer' if kind == 'int' else 'number'}, got {step!r}")
            if log:
                raise ConfigError(f"{key}.step: cannot be combined with log: true")
            step = int(step) if kind == "int" else float(step)
        params[name] = Parameter(name, kind, low=low, high=high, log=log, step=step,
                                 condition=condition)
    # Conditions name other parameters (categorical ones, with values they can take).
    for p in params.values():
        for cond, allowed in p.condition.items():
            key = f"parameters.{p.name}.condition.{cond}"
            if cond not in params:
                raise ConfigError(f"{key}: no parameter named {cond!r} in this space")
            if cond == p.name:
                raise ConfigError(f"{key}: a parameter cannot depend on itself")
            other = params[cond]
            if other.type != "categorical":
                raise ConfigError(f"{key}: conditions need a categorical parameter; "
                                  f"{cond} is {other.type}")
            bad = [v for v in allowed if v not in other.choices]
            if bad:
                raise ConfigError(f"{key}: {bad[0]!r} is not among its choices {other.choices}")
    return _dependency_order(params)


def _parse_condition(raw: Any, key: str) -> dict[str, list[Any]]:
    if raw is None:
        return {}
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"{key}.condition: must be a mapping like {{schedule: step}}, "
                          f"got {raw!r}")
    return {knob_name(str(k), f"{key}.condition"): (list(v) if isinstance(v, list) else [v])
            for k, v in raw.items()}


def _dependency_order(params: dict[str, Parameter]) -> list[Parameter]:
    """Parameters in file order, except that a condition's parameter comes before its users."""
    ordered: list[Parameter] = []
    state: dict[str, str] = {}

    def visit(name: str, path: list[str]) -> None:
        if state.get(name) == "done":
            return
        if state.get(name) == "visiting":
            cycle = " -> ".join([*path, name])
            raise ConfigError(f"parameters.{name}.condition: circular conditions ({cycle})")
        state[name] = "visiting"
        for cond in params[name].condition:
            visit(cond, [*path, name])
        state[name] = "done"
        ordered.append(params[name])

    for name in params:
        visit(name, [])
    return ordered


def _parse_objectives(raw: Any) -> list[Objective]:
    if raw is None:
        return [Objective("best_ppl", "minimize")]
    if isinstance(raw, dict):
        raw = [raw]
    if not isinstance(raw, list) or not 1 <= len(raw) <= 2:
        raise ConfigError("objectives: must be a list of 1 or 2 entries like "
                          "{metric: best_ppl, direction: minimize}")
    objectives = []
    for i, entry in enumerate(raw):
        key = f"objectives[{i}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{key}: must be a mapping {{metric: ..., direction: ...}}")
        for k in entry:
            if k not in ("metric", "direction"):
                raise ConfigError(f"{key}.{k}: unknown key; allowed: metric, direction")
        metric = entry.get("metric")
        if metric not in METRICS:
            raise ConfigError(f"{key}.metric: unknown {metric!r}; allowed: {', '.join(METRICS)}")
        direction = entry.get("direction", "minimize")
        if direction not in DIRECTIONS:
            raise ConfigError(f"{key}.direction: unknown {direction!r}; allowed: "
                              f"{', '.join(DIRECTIONS)}")
        objectives.append(Objective(metric, direction))
    if len({o.metric for o in objectives}) != len(objectives):
        raise ConfigError("objectives: the same metric is listed twice")
    return objectives


def _parse_defaults(raw: Any) -> dict[str, Any]:
    defaults = dict(DEFAULTS)
    for key, value in _mapping(raw, "defaults").items():
        if key not in DEFAULT_KEYS:
            raise ConfigError(f"defaults.{key}: unknown key; allowed: {', '.join(DEFAULT_KEYS)}")
        if value is None and key == "max_concurrent":
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"defaults.{key}: must be a positive integer, got {value!r}")
        defaults[key] = value
    return defaults


def _parse_data(raw: Any) -> dict[str, Any]:
    data = {}
    for key, value in _mapping(raw, "data").items():
        if key not in DATA_KEYS:
            raise ConfigError(f"data.{key}: unknown key; allowed: {', '.join(DATA_KEYS)}")
        if key in ("train_chars", "val_chars"):
            value = as_number(value)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                      or value < 1):
                raise ConfigError(f"data.{key}: must be a positive integer, got {value!r}")
        elif value is not None and not isinstance(value, str):
            raise ConfigError(f"data.{key}: must be text, got {value!r}")
        elif key == "tokenizer" and value is not None:
            value = parse_tokenizer(value, "data.tokenizer")
        data[key] = value
    return data


def _parse_sampler(raw: Any, objectives: list[Objective]) -> dict[str, Any]:
    if raw is None:
        raw = {"type": "nsga2" if len(objectives) > 1 else "tpe"}
    elif isinstance(raw, str):
        raw = {"type": raw}
    if not isinstance(raw, dict):
        raise ConfigError(f"sampler: must be one of {', '.join(SAMPLERS)} or a mapping "
                          f"{{type: ..., seed: ...}}, got {raw!r}")
    for k in raw:
        if k not in SAMPLER_KEYS:
            raise ConfigError(f"sampler.{k}: unknown key; allowed: {', '.join(SAMPLER_KEYS)}")
    kind = raw.get("type", "tpe")
    if kind not in SAMPLERS:
        raise ConfigError(f"sampler.type: unknown {kind!r}; allowed: {', '.join(SAMPLERS)}")
    for k in ("seed", "population_size", "n_startup_trials"):
        v = raw.get(k)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
            raise ConfigError(f"sampler.{k}: must be a non-negative integer, got {v!r}")
    if "population_size" in raw and kind != "nsga2":
        raise ConfigError("sampler.population_size: only for sampler nsga2")
    if "n_startup_trials" in raw and kind != "tpe":
        raise ConfigError("sampler.n_startup_trials: only for sampler tpe")
    if raw.get("population_size") is not None and raw["population_size"] < 2:
        raise ConfigError("sampler.population_size: must be at least 2")
    return {**raw, "type": kind}
