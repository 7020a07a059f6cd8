"""Tokenizers: how text becomes the model's symbols (the data setting `tokenizer`).

`char` (the default) makes every character of the training and validation text a symbol.
`bpe:N` is a byte-level BPE (as GPT-2's) with a vocabulary of at most N symbols, trained by
HuggingFace `tokenizers` on the training text only. Training it takes seconds, so it is done
once and cached as the library's own JSON file, keyed by the training text, N and the
library's version: every trial of a sweep, and every later run on the same text, loads it.

Bits per character compare runs of different tokenizers: every encoding also says how many
characters each span of tokens covers (`Encoded.chars_between`).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ufw.config import ConfigError

CHAR = "char"
BYTE_SYMBOLS = 256  # a byte-level BPE starts from every byte value
MIN_BPE_VOCAB = BYTE_SYMBOLS + 1  # and needs at least one merge to be more than bytes


def parse_tokenizer(spec: str, what: str = "--tokenizer") -> str:
    """The tokenizer setting in its canonical spelling (`char`, `bpe:N`); ConfigError if bad.

    `what` names the setting in the message: the flag, or a space file's `data.tokenizer`.
    """
    if spec == CHAR:
        return spec
    kind, sep, size = str(spec).partition(":")
    if kind != "bpe" or not sep:
        raise ConfigError(f"{what}: unknown {spec!r}; allowed: char, bpe:N "
                          f"(N >= {MIN_BPE_VOCAB})")
    if not size.isdigit() or int(size) < MIN_BPE_VOCAB:
        raise ConfigError(f"{what} {spec}: N must be an integer >= {MIN_BPE_VOCAB} (the "
                          f"{BYTE_SYMBOLS} byte symbols and at least one merge)")
    return f"bpe:{int(size)}"


@dataclass
class Encoded:
    """A text as symbol ids, with where each symbol's characters end.

    `ends[i]` is the character offset just past the characters that symbol i touches. A
    byte-level symbol may hold part of a multi-byte character; counting a character for the
    symbol that holds its first byte, the characters of symbols i+1 .. j are exactly
    ends[j] - ends[i] (the sum telescopes), which is what `chars_between` returns.
    """

    ids: list[int]
    ends: Sequence[int]

    def chars_between(self, first: int, last: int) -> int:
        """Characters covered by symbols first .. last (inclusive), first >= 1."""
        return self.ends[last] - self.ends[first - 1]


class CharTokenizer:
    """Every character is a symbol; the vocabulary is the characters of both texts, sorted."""

    def __init__(self, *texts: str):
        self.vocab = sorted(set().union(*texts))
        self._index = {ch: i for i, ch in enumerate(self.vocab)}

    def encode(self, text: str) -> Encoded:
        # Character i ends at i + 1: a range says so without a list as long as the text.
        return Encoded([self._index[ch] for ch in text], range(1, len(text) + 1))

    def decode(self, ids: list[int]) -> str:
        return "".join(self.vocab[i] for i in ids)


class BpeTokenizer:
    """A byte-level BPE of HuggingFace `tokenizers`: lossless for any text, no unknown symbol."""

    def __init__(self, train_text: str, vocab_size: int, cache_dir: Path):
        import tokenizers

        key = hashlib.sha256(train_text.encode("utf-8"))
        key.update(f"|{vocab_size}|tokenizers {tokenizers.__version__}".encode())
        self.path = Path(cache_dir) / f"bpe-{vocab_size}-{key.hexdigest()[:20]}.json"
        self._tokenizer = _cached(self.path)
        if self._tokenizer is None:
            self._tokenizer = _train_bpe(train_text, vocab_size)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Trials of one sweep may train it at once: each writes its own file and renames
            # it into place, so a reader never sees half a file.
            partial = self.path.with_name(f".{self.path.name}.{os.getpid()}")
            self._tokenizer.save(str(partial))
            os.replace(partial, self.path)
        by_id = sorted(self._tokenizer.get_vocab().items(), key=lambda item: item[1])
        self.vocab = [symbol for symbol, _ in by_id]

    def encode(self, text: str) -> Encoded:
        encoding = self._tokenizer.encode(text)
        return Encoded(encoding.ids, [end for _, end in encoding.offsets])

    def decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids)


def _cached(path: Path):
    """The tokenizer saved at `path` (JSON: loading it runs no code), or None to train one."""
    from tokenizers import Tokenizer

    if not path.is_file():
        return None
    try:
        return Tokenizer.from_file(str(path))
    except Exception:  # a damaged file (the library raises plain Exception): train again
        return None


def _train_bpe(text: str, vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    # No prefix space: decoding gives back exactly the text that was encoded.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([text], trainer, length=len(text))
    return tokenizer


def make_tokenizer(spec: str, train_text: str, val_text: str,
                   cache_dir: Path) -> CharTokenizer | BpeTokenizer:
    """The tokenizer `spec` (as `parse_tokenizer` spells it) for this corpus."""
    if spec == CHAR:
        return CharTokenizer(train_text, val_text)
    return BpeTokenizer(train_text, int(spec.partition(":")[2]), cache_dir)
