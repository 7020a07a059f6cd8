"""Corpora of symbols (characters, or BPE tokens: ufw.tokenizer), cut into fixed batches
that live on the training device.

Sequences of `seq_len` symbols are cut back to back without overlap; the target of a
sequence is the same span shifted by one symbol. Batches keep file order, so every run
(and every member of a population) sees exactly the same data in the same order.
"""

from __future__ import annotations

import math
import os
import re
import urllib.request
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ufw.config import ConfigError
from ufw.tokenizer import CHAR, make_tokenizer, parse_tokenizer

WIKITEXT2_URL = ("https://raw.githubusercontent.com/pytorch/examples/main/"
                 "word_language_model/data/wikitext-2/{split}.txt")
CACHE_DIR = Path(os.environ.get("UFW_CACHE", Path.home() / ".cache" / "ufw"))


@dataclass
class Corpus:
    name: str
    vocab: list[str]
    train_x: torch.Tensor  # [num_batches, batch_size, seq_len] int64
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    tokenizer: str  # the data setting: char or bpe:N
    val_chars: int  # characters of the validation text that the targets (all of val_y) cover

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    @property
    def chars_per_token(self) -> float:
        """Validation characters per validation target (1 for characters)."""
        return self.val_chars / self.val_y.numel()

    def bits_per_char(self, ppl: float) -> float:
        """Bits per character of a validation perplexity (per symbol) on this corpus.

        ln(ppl) is the mean NLL per target in nats; times the targets, it is the total NLL;
        over ln 2 and the characters those targets cover, bits per character.
        """
        return math.log(ppl) / (math.log(2) * self.chars_per_token)

    def to(self, device: str | torch.device) -> Corpus:
        move = {k: getattr(self, k).to(device) for k in ("train_x", "train_y", "val_x", "val_y")}
        return replace(self, **move)

    @property
    def train_batches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return list(zip(self.train_x, self.train_y))

    @property
    def val_batches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return list(zip(self.val_x, self.val_y))


def _batches(ids: list[int], batch_size: int, seq_len: int, what: str, unit: str):
    """Inputs and targets [num_batches, batch_size, seq_len]: ids[:n] and ids[1:n + 1]."""
    num_seqs = (len(ids) - 1) // seq_len
    num_batches = num_seqs // batch_size
    if num_batches <= 0:  # an empty file has -1 sequences
        raise ConfigError(f"{what}: {len(ids)} {unit} make no full batch of "
                          f"{batch_size} x {seq_len}; give more text or smaller batches")
    n = num_batches * batch_size * seq_len
    ids = torch.tensor(ids[:n + 1], dtype=torch.long)
    x = ids[:n].view(num_batches, batch_size, seq_len)
    y = ids[1:n + 1].view(num_batches, batch_size, seq_len)
    return x, y


def make_corpus(name: str, train_text: str, val_text: str, batch_size: int = 32,
                seq_len: int = 64, tokenizer: str = CHAR) -> Corpus:
    """A corpus of `tokenizer`'s symbols; a BPE learns from `train_text` only."""
    tokenizer = parse_tokenizer(tokenizer)
    symbols = make_tokenizer(tokenizer, train_text, val_text, CACHE_DIR / "tokenizers")
    unit = "characters" if tokenizer == CHAR else "tokens"
    train_x, train_y = _batches(symbols.encode(train_text).ids, batch_size, seq_len,
                                "train text", unit)
    val = symbols.encode(val_text)
    val_x, val_y = _batches(val.ids, batch_size, seq_len, "validation text", unit)
    # The targets are symbols 1 .. n of the validation text.
    val_chars = val.chars_between(1, val_y.numel())
    return Corpus(name, symbols.vocab, train_x, train_y, val_x, val_y,
                  tokenizer=tokenizer, val_chars=val_chars)


def python_docs_text() -> str:
    """English prose of Python's own documentation: shipped with every Python, so offline."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    return re.sub(r"[^\x20-\x7e\n]", "", text)  # keep printable ASCII: a small, stable vocab


def wikitext2_dir(directory: str | None) -> Path:
    """A directory holding WikiText-2 `*.txt` splits: the one given, or a download-once cache."""
    if directory:
        path = Path(directory).expanduser()
        if not path.is_dir():
            raise ConfigError(f"--data wikitext2:{directory}: no such directory")
        return path
    path = CACHE_DIR / "wikitext-2"
    for split in ("train", "valid", "test"):
        target = path / f"{split}.txt"
        if not target.exists():
            path.mkdir(parents=True, exist_ok=True)
            tmp = target.with_suffix(".part")
            try:
                urllib.request.urlretrieve(WIKITEXT2_URL.format(split=split), tmp)
            except OSError as e:
                raise ConfigError(f"--data wikitext2: download failed ({e}); pass "
                                  "wikitext2:DIR with the text files instead") from None
            tmp.rename(target)
    return path


def _read(path: str, chars: int | None, what: str) -> str:
    try:
        text = Path(path).expanduser().read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{what} {path}: cannot read as UTF-8 text ({e})") from None
    return text[:chars] if chars else text


def load_corpus(data: str = "python-docs", train_file: str | None = None,
                val_file: str | None = None, train_chars: int | None = None,
                val_chars: int | None = None, batch_size: int = 32, seq_len: int = 64,
                tokenizer: str = CHAR) -> Corpus:
    """The corpus named by the data flags (docs/design.md, section Data)."""
    if train_file or val_file:
        if not (train_file and val_file):
            raise ConfigError("--train-file and --val-file: give both")
        train = _read(train_file, train_chars, "--train-file")
        val = _read(val_file, val_chars, "--val-file")
        name = f"{Path(train_file).name}[:{train_chars}]+{Path(val_file).name}[:{val_chars}]"
        return make_corpus(name, train, val, batch_size, seq_len, tokenizer)
    kind, _, arg = data.partition(":")
    if kind == "python-docs":
        text = python_docs_text()
        cut = int(len(text) * 0.9)
        train, val = text[:cut], text[cut:]
    elif kind == "wikitext2":
        root = wikitext2_dir(arg or None)
        train_path = root / "train.txt"
        if not train_path.exists():  # the shared reference data has no train split
            train_path = root / "test.txt"
        train = _read(str(train_path), None, "--data wikitext2")
        val = _read(str(root / "valid.txt"), None, "--data wikitext2")
    else:
        raise ConfigError(f"--data: unknown corpus {data!r}; allowed: python-docs, "
                          "wikitext2[:DIR], or --train-file/--val-file")
    train = train[:train_chars] if train_chars else train
    val = val[:val_chars] if val_chars else val
    return make_corpus(data, train, val, batch_size, seq_len, tokenizer)
