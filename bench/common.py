"""What every benchmark shares: the reference corpus, the timed population's configurations and
a JSON record of where it ran."""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path

import torch

from ufw.config import UniversalConfig, preset
from ufw.data import CACHE_DIR, Corpus, load_corpus

# The WikiText-2 files: UFW_WIKITEXT2 names their directory; else where `--data wikitext2`
# downloads them (docs/design.md).
SHARED = Path(os.environ.get("UFW_WIKITEXT2", CACHE_DIR / "wikitext-2"))
RESULTS = Path(__file__).resolve().parent / "results"


def reference_corpus(batch_size: int = 32, seq_len: int = 64) -> Corpus:
    """The reference benchmark (docs/design.md, section Data), or the offline corpus
    without the WikiText-2 files."""
    if (SHARED / "test.txt").exists():
        return load_corpus(train_file=str(SHARED / "test.txt"), val_file=str(SHARED / "valid.txt"),
                           train_chars=100_000, val_chars=10_000, batch_size=batch_size,
                           seq_len=seq_len)
    return load_corpus("python-docs", train_chars=100_000, val_chars=10_000,
                       batch_size=batch_size, seq_len=seq_len)


def device_label(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def population_configs(K: int) -> list[UniversalConfig]:
    """K members of one shape with different seeds and learning rates; patience high so that
    no member stops while it is timed."""
    return [preset("asymmetric_best").with_overrides(
        {"seed": k, "lr": 1e-3 * (1 + k % 4) / 2, "patience": 100}) for k in range(K)]


def save(name: str, record: dict) -> Path:
    record = {"command": " ".join([Path(sys.executable).name, *sys.argv]),
              "torch_version": torch.__version__, **record}
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / name
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def training_share(trials, wall_seconds: float, slots: float) -> float:
    """Share of a sweep's wall time x concurrent trial slots spent training: each Ray trial's
    time in its populations' epochs (trial_train_seconds). Rows from before that column: the
    longest-running member's train_seconds, right only for trials that did not refill."""
    column = "trial_train_seconds" if "trial_train_seconds" in trials else "train_seconds"
    return float(trials.groupby("trial_id")[column].max().sum() / (wall_seconds * slots))
