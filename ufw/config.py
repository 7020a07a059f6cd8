"""Configuration of one early-exit training run: the Universal Training Framework's knobs.

A `UniversalConfig` is plain data. Everything a sweep may vary is a field here, so a
search space, a YAML file, `--set key=value` and the Parquet columns all speak the same names.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import hashlib
import itertools
import json
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

SCHEDULES = ("constant", "linear", "cosine", "step")
CONFIDENCE_METHODS = ("max_softmax", "entropy", "margin", "learned")
ALPHA = "\N{GREEK SMALL LETTER ALPHA}"  # describe() writes alpha as the framework does


# Limits no real run reaches (a seed must also fit NumPy's and Parquet's integers).
UPPER_BOUNDS = {"max_epochs": 100_000, "patience": 100_000, "seed": 2**32 - 1}


class ConfigError(ValueError):
    """A user mistake in a configuration: the message names the field and what is allowed."""


@dataclass
class AlphaSchedule:
    """Weight of the first exit over training; `1 - alpha` goes to the last layer.

    Evaluated per epoch (counted from 0, as the framework's `train_epoch(epoch=...)` passes
    it) with progress = min(1, epoch / max(1, max_epochs - 1)). Defaults are the framework's.
    """

    schedule_type: str = "constant"
    start: float = 0.7
    end: float = 0.5
    steps: list[int] = field(default_factory=list)  # epochs, counted from 0, of each drop

    def get_alpha(self, epoch: int, max_epochs: int) -> float:
        progress = min(1.0, epoch / max(1, max_epochs - 1))
        if self.schedule_type == "constant":
            return self.start
        if self.schedule_type == "linear":
            return self.start + (self.end - self.start) * progress
        if self.schedule_type == "cosine":
            return self.end + (self.start - self.end) * (1 + math.cos(math.pi * progress)) / 2
        if self.schedule_type == "step":
            if not self.steps:
                return self.start
            drop = (self.start - self.end) / len(self.steps)
            alpha = self.start - drop * sum(1 for s in self.steps if epoch >= s)
            # "never below end" for a decreasing schedule; an increasing one never above it.
            return max(alpha, self.end) if self.start >= self.end else min(alpha, self.end)
        raise ConfigError(f"alpha_schedule.schedule_type: unknown {self.schedule_type!r}, "
                          f"allowed: {', '.join(SCHEDULES)}")

    def describe(self) -> str:
        """One line for humans, as the framework writes it (e.g. "alpha: 0.9 -> 0.5 (cosine)",
        with the Greek letter and an arrow)."""
        if self.schedule_type == "constant":
            return f"{ALPHA}={self.start} (constant)"
        if self.schedule_type == "step":
            return f"{ALPHA}: {self.start}\N{RIGHTWARDS ARROW}{self.end} (step at {self.steps})"
        return f"{ALPHA}: {self.start}\N{RIGHTWARDS ARROW}{self.end} ({self.schedule_type})"

    def validate(self) -> None:
        if self.schedule_type not in SCHEDULES:
            raise ConfigError(f"alpha_schedule.schedule_type: unknown {self.schedule_type!r}, "
                              f"allowed: {', '.join(SCHEDULES)}")
        for name in ("start", "end"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0 <= value <= 1:
                raise ConfigError(f"alpha_schedule.{name}: must be a number in [0, 1], "
                                  f"got {value!r}")
        steps = list(self.steps)
        if any(not isinstance(s, int) or s < 0 for s in steps):
            raise ConfigError("alpha_schedule.steps: must be non-negative integer epochs, "
                              f"got {steps}")
        if any(b <= a for a, b in itertools.pairwise(steps)):
            raise ConfigError(f"alpha_schedule.steps: must be strictly increasing, got {steps}")


@dataclass
class UniversalConfig:
    # --- the Universal Training Framework ---
    layer_weights: dict[int, float] = field(default_factory=lambda: {1: 0.0, 2: 0.0, 3: 1.0})
    exit_layer: int = 1
    routing_threshold: float = 0.95  # 0 disables routing: every token goes deep
    normalize_weights: bool = False
    alpha_schedule: AlphaSchedule | None = None
    layer_lr_scales: dict[int, float] | None = None
    # --- beyond the framework (docs/design.md, section Extensions) ---
    confidence_method: str = "max_softmax"
    confidence_loss_weight: float = 0.1  # weight of the learned confidence head's loss
    exit_layers: list[int] | None = None  # several exits; None means [exit_layer]
    exit_thresholds: dict[int, float] | None = None  # per exit; None means routing_threshold
    distillation_alpha: float = 1.0  # 1.0: no distillation; loss = a*task + (1-a)*KL
    distillation_temperature: float = 1.0
    teacher: str = "self"  # "self" (the model's final exit) or a path to a saved ufw model
    num_experts: int = 1  # 1: dense FFN
    experts_top_k: int = 1
    moe_aux_weight: float = 0.01
    # --- model ---
    dim: int = 64
    num_layers: int = 3
    num_heads: int = 4
    # --- training ---
    lr: float = 1e-3
    weight_decay: float = 0.01  # torch.optim.AdamW's default, as the seed used it
    max_epochs: int = 50
    patience: int = 0
    grad_clip: float = 1.0
    batch_size: int = 32
    seq_len: int = 64
    seed: int = 42

    # ---------------------------------------------------------------- derived values
    @property
    def exits(self) -> list[int]:
        """Early exits in depth order; the last layer is always the final exit."""
        return sorted(self.exit_layers) if self.exit_layers else [self.exit_layer]

    @property
    def thresholds(self) -> list[float]:
        if self.exit_thresholds:
            return [float(self.exit_thresholds[e]) for e in self.exits]
        return [float(self.routing_threshold)] * len(self.exits)

    @property
    def has_routing(self) -> bool:
        """Routing is on: a threshold > 0 (a token leaves early when its confidence meets it)."""
        return any(t > 0 for t in self.thresholds)

    @property
    def has_dynamic_alpha(self) -> bool:
        """An alpha schedule that changes over training (a constant one does not)."""
        return self.alpha_schedule is not None and self.alpha_schedule.schedule_type != "constant"

    @property
    def has_layer_lr(self) -> bool:
        return self.layer_lr_scales is not None

    def describe(self) -> str:
        """One line for humans, in the framework's words: weights, routing, alpha, LR scales."""
        weights = ", ".join(f"L{k}:{v:.2f}" for k, v in sorted(self.layer_weights.items()))
        routing = f"threshold={self.routing_threshold}" if self.has_routing else "disabled"
        text = f"Weights: [{weights}], Routing: {routing}"
        if self.has_dynamic_alpha:
            text += f", {self.alpha_schedule.describe()}"
        if self.layer_lr_scales is not None:
            scales = ", ".join(f"L{k}:{v:.2f}x" for k, v in sorted(self.layer_lr_scales.items()))
            text += f", LR scales: [{scales}]"
        return text

    def get_layer_weights(self, epoch: int = 0, max_epochs: int | None = None) -> dict[int, float]:
        """Loss weight of every layer (1-indexed) at this epoch (counted from 0).

        The framework's order: `normalize_weights` scales the configured weights to sum 1
        (once: they do not depend on the epoch), then an alpha schedule overwrites the first
        exit's weight with alpha and the last layer's with 1 - alpha; middle layers keep
        their (normalised) weight. `max_epochs` None means the configuration's.
        """
        weights = {i: float(self.layer_weights.get(i, 0.0)) for i in range(1, self.num_layers + 1)}
        if self.normalize_weights:
            total = sum(weights.values())
            if total > 0:
                weights = {i: w / total for i, w in weights.items()}
        if self.alpha_schedule is not None:
            alpha = self.alpha_schedule.get_alpha(epoch, max_epochs or self.max_epochs)
            weights[self.exits[0]] = alpha
            weights[self.num_layers] = 1.0 - alpha
        if not any(weights.values()):  # every weight 0: train the final layer alone
            weights[self.num_layers] = 1.0
        return weights

    def lr_scale(self, layer: int) -> float:
        return float((self.layer_lr_scales or {}).get(layer, 1.0))

    @property
    def shape_key(self) -> tuple:
        """Configurations with equal keys can train together as one population."""
        return (self.dim, self.num_layers, self.num_heads, tuple(self.exits), self.num_experts,
                self.experts_top_k, self.confidence_method == "learned", self.batch_size,
                self.seq_len, self.max_epochs, self.teacher)

    # ---------------------------------------------------------------- validation
    def validate(self) -> UniversalConfig:
        def fail(key: str, allowed: str, got: Any) -> None:
            raise ConfigError(f"{key}: {allowed}, got {got!r}")

        for key in ("dim", "num_layers", "num_heads", "max_epochs", "batch_size", "seq_len",
                    "num_experts", "experts_top_k"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                fail(key, "must be a positive integer", value)
        if self.dim % self.num_heads or (self.dim // self.num_heads) % 2:
            fail("num_heads", f"must divide dim={self.dim} into an even head size", self.num_heads)
        for key in ("patience", "seed"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                fail(key, "must be a non-negative integer", value)
        for key, most in UPPER_BOUNDS.items():  # beyond these a value can only be a typo
            if getattr(self, key) > most:
                fail(key, f"must be at most {most:,}", getattr(self, key))
        for key in ("lr", "distillation_temperature"):
            value = getattr(self, key)
            if not isinstance(value, (int, float)) or not value > 0:
                fail(key, "must be a number > 0", value)
        for key in ("grad_clip", "weight_decay", "confidence_loss_weight", "moe_aux_weight"):
            value = getattr(self, key)
            if not isinstance(value, (int, float)) or not value >= 0:
                fail(key, "must be a number >= 0", value)
        layers = range(1, self.num_layers + 1)
        allowed_layers = f"layers 1..{self.num_layers}"
        if not isinstance(self.layer_weights, dict):
            fail("layer_weights", "must be a mapping layer -> weight", self.layer_weights)
        for layer, w in self.layer_weights.items():
            if layer not in layers:
                fail("layer_weights", f"keys must be {allowed_layers}", layer)
            if not isinstance(w, (int, float)) or not w >= 0:
                fail(f"layer_weights.{layer}", "must be a number >= 0", w)
        if self.exit_layer not in range(1, self.num_layers):
            fail("exit_layer", f"must be a layer before the last (1..{self.num_layers - 1})",
                 self.exit_layer)
        if not isinstance(self.routing_threshold, (int, float)) or not (
                0 <= self.routing_threshold <= 1):
            fail("routing_threshold", "must be in [0, 1]", self.routing_threshold)
        if self.exit_layers is not None and (
                not isinstance(self.exit_layers, (list, tuple)) or not self.exit_layers
                or len(set(self.exit_layers)) != len(self.exit_layers)
                or any(not isinstance(e, int) or isinstance(e, bool)
                       or e not in range(1, self.num_layers) for e in self.exit_layers)):
            fail("exit_layers", f"must be a list of distinct layers in 1..{self.num_layers - 1}",
                 self.exit_layers)
        if self.exit_thresholds is not None:
            if not isinstance(self.exit_thresholds, dict):
                fail("exit_thresholds", "must be a mapping exit layer -> threshold",
                     self.exit_thresholds)
            if set(self.exit_thresholds) != set(self.exits):
                fail("exit_thresholds", f"must give one threshold per exit {self.exits}",
                     self.exit_thresholds)
            for e, t in self.exit_thresholds.items():
                if not isinstance(t, (int, float)) or not 0 <= t <= 1:
                    fail(f"exit_thresholds.{e}", "must be in [0, 1]", t)
        if self.layer_lr_scales is not None:
            for layer, s in self.layer_lr_scales.items():
                if layer not in layers:
                    fail("layer_lr_scales", f"keys must be {allowed_layers}", layer)
                if not isinstance(s, (int, float)) or not s > 0:
                    fail(f"layer_lr_scales.{layer}", "must be a number > 0", s)
        if self.alpha_schedule is not None:
            self.alpha_schedule.validate()
        if self.confidence_method not in CONFIDENCE_METHODS:
            fail("confidence_method", f"must be one of {', '.join(CONFIDENCE_METHODS)}",
                 self.confidence_method)
        if not isinstance(self.distillation_alpha, (int, float)) or not (
                0 <= self.distillation_alpha <= 1):
            fail("distillation_alpha", "must be in [0, 1]", self.distillation_alpha)
        if not isinstance(self.teacher, str) or (
                self.teacher != "self" and not _is_saved_model(self.teacher)):
            fail("teacher", "must be 'self' or the path of a saved ufw model", self.teacher)
        if self.experts_top_k > self.num_experts:
            fail("experts_top_k", f"must be <= num_experts={self.num_experts}",
                 self.experts_top_k)
        return self

    # ---------------------------------------------------------------- (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> UniversalConfig:
        """A validated configuration from knob values in any spelling (docs/knobs.md);
        knobs not given keep their defaults."""
        fields = apply_knobs(cls().to_dict(), data)
        if fields["alpha_schedule"] is not None:
            fields["alpha_schedule"] = AlphaSchedule(**fields["alpha_schedule"])
        return cls(**fields).validate()

    @classmethod
    def from_yaml(cls, path: str | Path) -> UniversalConfig:
        try:
            data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except OSError as e:
            raise ConfigError(f"config file {path}: {e.strerror}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"config file {path}: not UTF-8 text") from None
        except yaml.YAMLError as e:
            first = str(e).splitlines()[0] if str(e) else "cannot parse"
            raise ConfigError(f"config file {path}: invalid YAML: {first}") from None
        if data is not None and not isinstance(data, dict):
            raise ConfigError(f"config file {path}: must be a mapping of config keys to "
                              f"values, got a {type(data).__name__}")
        if "preset" in (data or {}):
            return preset(data.pop("preset")).with_overrides(data)
        return cls.from_dict(data or {})

    def with_overrides(self, overrides: dict[str, Any]) -> UniversalConfig:
        """This configuration with knobs changed, in any spelling (`alpha_end`,
        `layer_weight_1`, `layer_weights.1`, ...; see docs/knobs.md)."""
        return UniversalConfig.from_dict(apply_knobs(self.to_dict(), overrides))

    def flat(self) -> dict[str, Any]:
        """One column per value, as the Parquet schema (docs/design.md) names them."""
        row: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in ("layer_weights", "layer_lr_scales", "exit_thresholds",
                          "alpha_schedule", "exit_layers"):
                continue
            row[f.name] = value
        for i in range(1, self.num_layers + 1):
            row[f"layer_weight_{i}"] = float(self.layer_weights.get(i, 0.0))
            row[f"lr_scale_{i}"] = self.lr_scale(i)
        s = self.alpha_schedule
        row["schedule"] = s.schedule_type if s else "none"
        row["alpha_start"] = s.start if s else float("nan")
        row["alpha_end"] = s.end if s else float("nan")
        row["alpha_steps"] = json.dumps(s.steps if s else [])
        row["exit_layers"] = json.dumps(self.exits)
        row["exit_thresholds"] = json.dumps(self.thresholds)
        row["config_id"] = self.config_id
        return row

    @property
    def config_id(self) -> str:
        """Identifies the configuration without its seed, so seed replicates share it."""
        data = self.to_dict()
        data.pop("seed")
        return hashlib.sha1(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _is_saved_model(path: str) -> bool:
    """Whether `path` is a model saved by ufw (its header only: cheap, and runs no code)."""
    from ufw import tensorfile

    return Path(path).is_file() and tensorfile.kind_of(path) == tensorfile.MODEL


def _layer_key(field_name: str, key: Any) -> int:
    try:
        return int(key)
    except (TypeError, ValueError):
        raise ConfigError(f"{field_name}: keys must be layer numbers, got {key!r}") from None


_THIRD = 1 / 3
# Arithmetic precisions of training (ufw.train's Objective explains each).
PRECISIONS = ("fp32", "tf32", "bf16")

PRESETS: dict[str, UniversalConfig] = {
    "standard_llm": UniversalConfig(layer_weights={1: 0, 2: 0, 3: 1}, routing_threshold=0.0),
    "lpt": UniversalConfig(layer_weights={1: _THIRD, 2: _THIRD, 3: _THIRD}, routing_threshold=0.0),
    "lpt_routing": UniversalConfig(layer_weights={1: _THIRD, 2: _THIRD, 3: _THIRD},
                                   routing_threshold=0.7),
    "standard_routing": UniversalConfig(layer_weights={1: 0.5, 2: 0, 3: 0.5},
                                        routing_threshold=0.95),
    "asymmetric_best": UniversalConfig(layer_weights={1: 0.7, 2: 0, 3: 0.3},
                                       routing_threshold=0.95),
    "asymmetric_with_l2": UniversalConfig(layer_weights={1: 0.7, 2: 1.0, 3: 0.3},
                                          routing_threshold=0.95),
    "deep_focus": UniversalConfig(layer_weights={1: 0.3, 2: 0, 3: 0.7}, routing_threshold=0.95),
    "layer_lr_decreasing": UniversalConfig(layer_weights={1: 0.7, 2: 0, 3: 0.3},
                                           routing_threshold=0.95,
                                           layer_lr_scales={1: 1.0, 2: 0.5, 3: 0.1}),
    "layer_lr_increasing": UniversalConfig(layer_weights={1: 0.7, 2: 0, 3: 0.3},
                                           routing_threshold=0.95,
                                           layer_lr_scales={1: 0.1, 2: 0.5, 3: 1.0}),
}


def preset(name: str) -> UniversalConfig:
    """A fresh copy of a preset, safe to modify."""
    if name not in PRESETS:
        raise ConfigError(f"preset: unknown {name!r}; allowed: {', '.join(PRESETS)}")
    return UniversalConfig.from_dict(PRESETS[name].to_dict())


# ==================================================================== knob names
# Every knob has one canonical name: the Parquet column that results and sweep summaries show
# it under (`UniversalConfig.flat()`), so that a value read off a results table can be typed
# back as it is. The nested spellings of the dataclass fields (`alpha_schedule.start`,
# `layer_weights.1`) stay accepted as aliases. `--set`, YAML config files and search spaces
# all resolve names here (`canonical_knob`, `apply_knobs`). "N" stands for a layer number.
@dataclass(frozen=True)
class Knob:
    name: str  # canonical
    aliases: tuple[str, ...]
    allowed: str  # what validation accepts, in words
    meaning: str


KNOBS: tuple[Knob, ...] = (
    Knob("layer_weight_N", ("layer_weights.N",), "number >= 0",
         "loss weight of layer N (the framework's w_N)"),
    Knob("layer_weights", (), "mapping layer -> weight >= 0, layers 1..num_layers",
         "every layer_weight_N at once; layers left out weigh 0"),
    Knob("normalize_weights", (), "true or false", "divide the weights by their sum"),
    Knob("exit_layer", (), "integer in 1..num_layers-1", "the early exit (one exit)"),
    Knob("routing_threshold", (), "number in [0, 1]",
         "confidence at which a token leaves at the exit; 0 routes every token deep"),
    Knob("schedule", ("alpha_schedule.schedule_type", "alpha_schedule.type"),
         "constant, linear, cosine, step, or none (no schedule)",
         "dynamic alpha: the first exit's weight over training, 1 - alpha on the last layer"),
    Knob("alpha_start", ("alpha_schedule.start",), "number in [0, 1]",
         "alpha at the first epoch"),
    Knob("alpha_end", ("alpha_schedule.end",), "number in [0, 1]",
         "alpha at the last epoch (linear, cosine) or after the last step"),
    Knob("alpha_steps", ("alpha_schedule.steps",),
         "increasing epochs >= 0: a list, or text \"5,10\"", "epochs where a step schedule drops"),
    Knob("alpha_schedule", (), "mapping {schedule_type (or type), start, end, steps}, or null",
         "schedule, alpha_start, alpha_end and alpha_steps at once"),
    Knob("lr_scale_N", ("layer_lr_scales.N",), "number > 0",
         "learning rate of layer N's block: lr x lr_scale_N"),
    Knob("layer_lr_scales", (), "mapping layer -> scale > 0, or null (all 1)",
         "every lr_scale_N at once"),
    Knob("confidence_method", (), "max_softmax, entropy, margin, learned",
         "how an exit measures its confidence"),
    Knob("confidence_loss_weight", (), "number >= 0", "weight of the learned head's loss"),
    Knob("exit_layers", (), "list of distinct layers in 1..num_layers-1, or null",
         "several early exits (null: [exit_layer])"),
    Knob("exit_thresholds.N", (), "number in [0, 1]", "routing threshold of exit N"),
    Knob("exit_thresholds", (),
         "mapping exit -> threshold in [0, 1], a list in exit order (as its column shows "
         "it), or null", "every exit's threshold at once (null: routing_threshold)"),
    Knob("distillation_alpha", (), "number in [0, 1]",
         "loss = a x task + (1 - a) x KL to the teacher; 1: no distillation"),
    Knob("distillation_temperature", (), "number > 0", "softmax temperature of distillation"),
    Knob("teacher", (), "self, or the path of a saved ufw model", "distillation teacher"),
    Knob("num_experts", (), "integer >= 1", "Mixture-of-Experts FFNs per block (1: dense)"),
    Knob("experts_top_k", (), "integer in 1..num_experts", "experts each token uses"),
    Knob("moe_aux_weight", (), "number >= 0", "weight of the MoE load-balancing loss"),
    Knob("dim", (), "integer >= 1, num_heads x an even head size", "model width"),
    Knob("num_layers", (), "integer >= 1", "transformer blocks"),
    Knob("num_heads", (), "integer >= 1 dividing dim into an even head size",
         "attention heads"),
    Knob("lr", (), "number > 0", "base learning rate (AdamW)"),
    Knob("weight_decay", (), "number >= 0", "AdamW weight decay"),
    Knob("max_epochs", (), "integer >= 1", "epochs at most"),
    Knob("patience", (), "integer >= 0", "stop once validation PPL has not improved for "
         "more than this many epochs (0: at the first epoch that is not better)"),
    Knob("grad_clip", (), "number >= 0", "gradient norm clip per block (0: off)"),
    Knob("batch_size", (), "integer >= 1", "sequences per batch"),
    Knob("seq_len", (), "integer >= 1", "characters per sequence"),
    Knob("seed", (), "integer >= 0", "initialisation seed (not part of config_id)"),
)

# The alpha schedule's knobs: canonical name -> AlphaSchedule field.
ALPHA_KNOBS = {"schedule": "schedule_type", "alpha_start": "start", "alpha_end": "end",
               "alpha_steps": "steps"}
# Per-layer knobs: "layer_weight_N" -> the mapping field it is an entry of.
_PER_LAYER = {"layer_weight_N": "layer_weights", "lr_scale_N": "layer_lr_scales",
              "exit_thresholds.N": "exit_thresholds"}
_FIELD_NAMES = tuple(f.name for f in dataclasses.fields(UniversalConfig))


def _pattern(spelling: str) -> re.Pattern:
    return re.compile(re.escape(spelling).replace("N", r"(\d+)") + "$")


# (pattern of a spelling, its canonical name), for every spelling of every knob.
_SPELLINGS = [(_pattern(spelling), knob.name) for knob in KNOBS
              for spelling in (knob.name, *knob.aliases)]


@functools.lru_cache(maxsize=4096)  # a pure function, called per key of every configuration
def canonical_knob(name: str, also: tuple[str, ...] = ()) -> str:
    """The canonical name of a knob given in any spelling (`alpha_schedule.end` ->
    `alpha_end`, `layer_weights.2` -> `layer_weight_2`); `also` names other keys the caller
    accepts (for the suggestion). An unknown name raises ConfigError with the closest one."""
    for pattern, canonical in _SPELLINGS:
        match = pattern.match(name)
        if match:
            return canonical.replace("N", str(int(match[1]))) if match.groups() else canonical
    raise ConfigError(f"{name}: unknown config key; {_suggestion(name, also)}")


def _suggestion(name: str, also: tuple[str, ...]) -> str:
    layer = re.search(r"(\d+)$", name)
    known = [spelling.replace("N", layer[1] if layer else "1")
             for knob in KNOBS for spelling in (knob.name, *knob.aliases)]
    close = difflib.get_close_matches(name, [*known, *also], n=1, cutoff=0.6)
    if close:
        return f"did you mean {close[0]!r}? (every knob: docs/knobs.md)"
    return "every knob and its spellings: docs/knobs.md"


def knob_field(name: str) -> tuple[str, int | None]:
    """The UniversalConfig field a canonical knob belongs to, and its layer (if per-layer)."""
    if name in ALPHA_KNOBS:
        return "alpha_schedule", None
    for template, field_name in _PER_LAYER.items():
        match = _pattern(template).match(name)
        if match:
            return field_name, int(match[1])
    return name, None


def is_numeric_knob(name: str) -> bool:
    """Whether a knob (any spelling) takes a number."""
    canonical = canonical_knob(name)
    field_name, layer = knob_field(canonical)
    return (layer is not None or canonical in ("alpha_start", "alpha_end")
            or typing.get_type_hints(UniversalConfig).get(field_name) in (int, float))


def parse_steps(value: Any, key: str = "alpha_steps") -> list[int]:
    """`alpha_steps` as a list of epochs: a list, one epoch, or text such as '2,4' or '[2, 4]'
    (text lets it be a categorical choice, and is how its Parquet column shows it)."""
    if isinstance(value, str):
        try:
            return [int(s) for s in value.replace("[", "").replace("]", "").split(",") if s.strip()]
        except ValueError:
            raise ConfigError(f"{key}: expected epochs like '2,4', got {value!r}") from None
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    if isinstance(value, list):
        return value
    raise ConfigError(f"{key}: expected a list of epochs (or a string '2,4'), got {value!r}")


def apply_knobs(data: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """`data` (fields as `to_dict()` gives them) with `values` applied: knobs in any spelling.

    Whole fields are applied before entries, so that `layer_weights: {...}` and
    `layer_weight_2: 0.5` together set the mapping and then change layer 2. Giving one knob
    twice under two spellings is an error.
    """
    data = dict(data)
    given: dict[str, str] = {}
    entries: dict[str, tuple[str, Any]] = {}
    for key, value in values.items():
        name = canonical_knob(str(key))
        if name in given:
            raise ConfigError(f"{key}: the same knob as {given[name]} ({name}); give it once")
        given[name] = str(key)
        if name in _FIELD_NAMES:
            data[name] = _whole_field(name, value)
        else:
            entries[name] = (str(key), value)
    if isinstance(data.get("exit_thresholds"), list):
        data["exit_thresholds"] = _thresholds_by_exit(data)
    alpha = {}
    for name, (key, value) in entries.items():
        field_name, layer = knob_field(name)
        if layer is None:
            alpha[name] = (key, value)
            continue
        mapping = data.get(field_name)
        if mapping is not None and not isinstance(mapping, dict):
            raise ConfigError(f"{key}: {field_name} is not a mapping ({mapping!r})")
        data[field_name] = {**(mapping or {}), layer: value}
    if alpha:
        data["alpha_schedule"] = _alpha_schedule(data.get("alpha_schedule"), alpha)
    return data


def _whole_field(name: str, value: Any) -> Any:
    if name == "alpha_schedule":
        if value is None:
            return None
        if isinstance(value, AlphaSchedule):
            return dataclasses.asdict(value)
        if not isinstance(value, dict):
            raise ConfigError(f"alpha_schedule: must be a mapping, got {value!r}")
        alpha = {}
        for key, entry in value.items():
            canonical = canonical_knob(f"alpha_schedule.{key}")
            if canonical not in ALPHA_KNOBS:
                raise ConfigError(f"alpha_schedule.{key}: unknown key; allowed: "
                                  "schedule_type (or type), start, end, steps")
            alpha[canonical] = (f"alpha_schedule.{key}", entry)
        return _alpha_schedule(None, alpha)
    if name in _PER_LAYER.values() and isinstance(value, dict):
        return {_layer_key(name, k): v for k, v in value.items()}
    return value


def _alpha_schedule(schedule: dict[str, Any] | AlphaSchedule | None,
                    alpha: dict[str, tuple[str, Any]]) -> dict[str, Any] | None:
    """`schedule` with alpha knobs applied (canonical name -> (spelling, value)); None for
    `schedule: none`. Without a schedule yet, the others start from AlphaSchedule's defaults."""
    if isinstance(schedule, AlphaSchedule):
        schedule = dataclasses.asdict(schedule)
    schedule = dict(schedule or dataclasses.asdict(AlphaSchedule()))
    for name, (key, value) in alpha.items():
        if name == "schedule" and value in (None, "none"):
            return None
        schedule[ALPHA_KNOBS[name]] = parse_steps(value, key) if name == "alpha_steps" else value
    return schedule


def _thresholds_by_exit(data: dict[str, Any]) -> Any:
    """exit_thresholds given as a list (its column's form): one per exit, in depth order."""
    thresholds, layers = data["exit_thresholds"], data.get("exit_layers")
    exits = sorted(layers) if isinstance(layers, list) and layers else [data.get("exit_layer")]
    if len(thresholds) != len(exits):
        raise ConfigError(f"exit_thresholds: {len(thresholds)} thresholds for the exits "
                          f"{exits}; give one per exit")
    return dict(zip(exits, thresholds))


def knob_table() -> str:
    """The Markdown table of every knob (docs/knobs.md), defaults from `UniversalConfig()`."""
    lines = ["| knob | also accepted | allowed values | default | meaning |",
             "|---|---|---|---|---|"]
    for knob in KNOBS:
        aliases = ", ".join(f"`{a}`" for a in knob.aliases) or ""
        lines.append(f"| `{knob.name}` | {aliases} | {knob.allowed} | {_default_text(knob)} "
                     f"| {knob.meaning} |")
    return "\n".join(lines)


def _default_text(knob: Knob) -> str:
    default = UniversalConfig()
    if knob.name == "exit_thresholds.N":
        return "routing_threshold"
    if knob.name in _PER_LAYER:
        flat = default.flat()
        return ", ".join(f"{i}: {flat[knob.name.replace('N', str(i))]:g}"
                         for i in range(1, default.num_layers + 1))
    if knob.name in ALPHA_KNOBS:
        if knob.name == "schedule":
            return "none"
        value = getattr(AlphaSchedule(), ALPHA_KNOBS[knob.name])
        return f"{value} (once a schedule is set)"
    value = getattr(default, knob.name)
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {v:g}" for k, v in value.items()) + "}"
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(
        value)

