"""Configuration of one early-exit training run: the Universal Training Framework's knobs.

A `UniversalConfig` is plain data. Everything a sweep may vary is a field here, so a
search space, a YAML file, `--set key=value` and the Parquet columns all speak the same names.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

SCHEDULES = ("constant", "linear", "cosine", "step")
CONFIDENCE_METHODS = ("max_softmax", "entropy", "margin", "learned")
ALPHA = "\N{GREEK SMALL LETTER ALPHA}"  # describe() writes alpha as the framework does


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
                self.teacher != "self" and not Path(self.teacher).is_file()):
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
        data = dict(data)
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ConfigError(f"{unknown[0]}: unknown config key; allowed: "
                              f"{', '.join(f.name for f in dataclasses.fields(cls))}")
        for key in ("layer_weights", "layer_lr_scales", "exit_thresholds"):
            if isinstance(data.get(key), dict):
                data[key] = {_layer_key(key, k): v for k, v in data[key].items()}
        schedule = data.get("alpha_schedule")
        if isinstance(schedule, dict):
            schedule = dict(schedule)
            if "type" in schedule:
                schedule["schedule_type"] = schedule.pop("type")
            bad = sorted(set(schedule) - {f.name for f in dataclasses.fields(AlphaSchedule)})
            if bad:
                raise ConfigError(f"alpha_schedule.{bad[0]}: unknown key; allowed: "
                                  "schedule_type (or type), start, end, steps")
            data["alpha_schedule"] = AlphaSchedule(**schedule)
        elif schedule is not None and not isinstance(schedule, AlphaSchedule):
            raise ConfigError(f"alpha_schedule: must be a mapping, got {schedule!r}")
        return cls(**data).validate()

    @classmethod
    def from_yaml(cls, path: str | Path) -> UniversalConfig:
        try:
            data = yaml.safe_load(Path(path).read_text())
        except OSError as e:
            raise ConfigError(f"config file {path}: {e.strerror}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path}: invalid YAML: {e}") from None
        if "preset" in (data or {}):
            base = preset(data.pop("preset")).to_dict()
            return cls.from_dict({**base, **data})
        return cls.from_dict(data or {})

    def with_overrides(self, overrides: dict[str, Any]) -> UniversalConfig:
        """Apply flat `key=value` overrides; dotted keys reach into mappings (`layer_weights.1`)."""
        data = self.to_dict()
        for key, value in overrides.items():
            head, _, rest = key.partition(".")
            if rest:
                sub = data.get(head) or {}
                if not isinstance(sub, dict):
                    raise ConfigError(f"{key}: {head} is not a mapping")
                sub[rest if head == "alpha_schedule" else _layer_key(head, rest)] = value
                data[head] = sub
            else:
                data[head] = value
        return UniversalConfig.from_dict(data)

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


def _layer_key(field_name: str, key: Any) -> int:
    try:
        return int(key)
    except (TypeError, ValueError):
        raise ConfigError(f"{field_name}: keys must be layer numbers, got {key!r}") from None


_THIRD = 1 / 3
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
