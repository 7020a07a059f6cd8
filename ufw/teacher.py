"""A saved ufw model loaded as a frozen distillation teacher."""

from __future__ import annotations

import torch

from ufw import tensorfile
from ufw.config import ConfigError, UniversalConfig
from ufw.model import EarlyExitLM, ModelShape
from ufw.tokenizer import CHAR


def load_teacher(path: str, device: torch.device, vocab_size: int,
                 vocab: list[str] | None = None,
                 tokenizer: str | None = None) -> EarlyExitLM | None:
    """A saved ufw model (see `Population.save_member`) as a frozen teacher; None for 'self'.

    Its vocabulary must be the student's: the same size, and the same tokenizer and symbols
    where known (a model saved before tokenizers were recorded is a character model).
    """
    if path == "self":
        return None
    saved = tensorfile.load(path, tensorfile.MODEL, what="teacher")
    try:
        # The teacher's own teacher is history, not needed (nor, perhaps, still on disk).
        config = UniversalConfig.from_dict({**saved["config"], "teacher": "self"})
        saved_vocab_size = int(saved["vocab_size"])
    except (ConfigError, KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"teacher {path}: not a complete ufw model ({e})") from None
    saved_tokenizer = saved.get("tokenizer", CHAR)
    if tokenizer is not None and saved_tokenizer != tokenizer:
        raise ConfigError(f"teacher: {path} was trained with tokenizer {saved_tokenizer}; "
                          f"this corpus uses {tokenizer}")
    if saved_vocab_size != vocab_size or (vocab and saved.get("vocab", vocab) != vocab):
        raise ConfigError(f"teacher: {path} was trained on another vocabulary "
                          f"({saved_vocab_size} symbols; this corpus has {vocab_size})")
    teacher = EarlyExitLM(ModelShape.of(config, vocab_size), [config.seed])
    try:
        with torch.no_grad():
            for name, p in teacher.named_member_params():
                p.copy_(saved["state"][name][None])
    except (KeyError, TypeError, RuntimeError) as e:
        raise ConfigError(f"teacher {path}: its parameters do not match its configuration "
                          f"({_first_line(e)})") from None
    return teacher.to(device).eval().requires_grad_(False)


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]

