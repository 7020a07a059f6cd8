"""What `ufw.train` and `ufw.sweep` share on the command line: data flags, `--set`, and
turning user mistakes into one message and exit status 2 (no traceback)."""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator
from typing import Any

import torch
import yaml

from ufw.arguments import USER_ERROR, ArgumentParser
from ufw.config import PRECISIONS, PRESETS, ConfigError, UniversalConfig, preset
from ufw.data import Corpus, load_corpus
from ufw.space import DATA_KEYS
from ufw.tokenizer import parse_tokenizer


def parser(prog: str, description: str) -> ArgumentParser:
    p = ArgumentParser(prog=prog, description=description)
    data = p.add_argument_group("data (docs/design.md, section Data)")
    data.add_argument("--data", help="python-docs (offline, default) or wikitext2[:DIR]")
    data.add_argument("--train-file", help="any UTF-8 text file to train on")
    data.add_argument("--val-file", help="any UTF-8 text file to validate on")
    data.add_argument("--train-chars", type=int, help="use the first N training characters")
    data.add_argument("--val-chars", type=int, help="use the first N validation characters")
    data.add_argument("--tokenizer", help="char (default: every character a symbol) or bpe:N "
                                          "(byte-level BPE of N symbols, learnt from the "
                                          "training text and cached)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a knob (YAML syntax; names: docs/knobs.md), e.g. "
                        "--set max_epochs=2 "
                        "--set layer_weight_1=0.5; repeatable")
    return p


def speed_flags(p: argparse.ArgumentParser) -> None:
    """--precision and --compile, the same for one run (ufw.train) and for a sweep."""
    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="fp32 (exact, default); tf32 or bf16 trade exactness for GPU speed")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the training loss (fuses element-wise work; each "
                        "process compiles once, in its first population)")


def preset_names() -> list[str]:
    return list(PRESETS)


def parse_sets(items: list[str]) -> dict[str, Any]:
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item}: expected KEY=VALUE")
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            raise ConfigError(f"--set {item}: value is not valid YAML") from None
        overrides[key.strip()] = _yaml_float(parsed)
    return overrides


def _yaml_float(value: Any) -> Any:
    """YAML 1.1 reads `1e-3` (no dot) as text; a learning rate written so is a number."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def config_from_args(args: argparse.Namespace) -> UniversalConfig:
    config = preset(args.preset) if args.preset else UniversalConfig.from_yaml(args.config)
    overrides = parse_sets(args.set)
    if getattr(args, "seed", None) is not None:
        overrides["seed"] = args.seed
    return config.with_overrides(overrides)


def data_flags(args: argparse.Namespace, base: dict[str, Any] | None = None) -> dict[str, Any]:
    """The data to load: `base` (a space's data section, a sweep's record) with the data flags
    given on the command line replacing its entries; python-docs if nothing names one."""
    data = dict(base or {})
    for flag in DATA_KEYS:
        value = getattr(args, flag)
        if value is not None:
            if flag in ("train_chars", "val_chars") and value < 1:
                raise ConfigError(f"--{flag.replace('_', '-')}: must be a positive integer")
            data[flag] = parse_tokenizer(value) if flag == "tokenizer" else value
    data.setdefault("data", "python-docs")
    return data


def corpus_from_args(args: argparse.Namespace, config: UniversalConfig,
                     base: dict[str, Any] | None = None) -> Corpus:
    return load_corpus(**data_flags(args, base), batch_size=config.batch_size,
                       seq_len=config.seq_len)


def check_device(device: str) -> str:
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"--device: unknown device {device!r}; e.g. cpu, cuda, cuda:0") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: CUDA is not available on this machine")
    return device


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn a ConfigError into one line on stderr and exit status 2."""
    try:
        yield
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(USER_ERROR)
