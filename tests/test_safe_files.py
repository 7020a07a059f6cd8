"""Saved models are safetensors + JSON: a file can carry no code, and a file that is not a
ufw model is refused with one line. A pickle planted as a teacher does not run."""

from __future__ import annotations

import math
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ufw import tensorfile
from ufw.config import ConfigError, UniversalConfig
from ufw.data import make_corpus
from ufw.train import Population, load_teacher

ROOT = Path(__file__).resolve().parents[1]


class Payload:
    """Unpickling this opens (so creates) the marker file: what an attacker's code would do."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def planted_pickle(path: Path, marker: Path, as_torch: bool) -> Path:
    """A file that runs Payload when unpickled: a plain pickle, or torch.save's zip format."""
    value = {"config": {}, "vocab_size": 3, "state": Payload(marker)}
    if as_torch:
        torch.save(value, path)
    else:
        path.write_bytes(pickle.dumps(value))
    return path


def run_train(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "ufw.train", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("as_torch", [False, True], ids=["pickle", "torch.save"])
def test_a_pickle_payload_as_teacher_does_not_run_and_is_refused(tmp_path, as_torch):
    marker = tmp_path / "payload-ran"
    evil = planted_pickle(tmp_path / "evil.pt", marker, as_torch)
    # The payload is real: an unpickler (torch.load without weights_only) runs it.
    if as_torch:
        torch.load(evil, weights_only=False)
    else:
        pickle.loads(evil.read_bytes())
    assert marker.exists()
    marker.unlink()
    # Distillation is off (alpha 1.0): the old loader read the teacher anyway.
    result = run_train("--preset", "standard_llm", "--set", f"teacher={evil}",
                       "--set", "max_epochs=1", "--train-chars", "4000", "--val-chars", "3000")
    assert result.returncode == 2, result.stderr
    assert not marker.exists()
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert lines[0] == (f"error: teacher: must be 'self' or the path of a saved ufw model, "
                        f"got '{evil}'")
    # Past the configuration's check, the loader itself refuses it too.
    with pytest.raises(ConfigError, match="not a ufw-model file"):
        load_teacher(str(evil), torch.device("cpu"), 3)
    assert not marker.exists()


def tiny_corpus():
    return make_corpus("abc", "abcd " * 400, "dcba " * 200, batch_size=4, seq_len=16)


def test_a_saved_member_loads_back_as_the_same_model(tmp_path):
    corpus = tiny_corpus()
    config = UniversalConfig(dim=16, num_heads=2, max_epochs=1, batch_size=4, seq_len=16)
    population = Population([config, config.with_overrides({"seed": 7})], corpus)
    population.run_epoch()
    path = tmp_path / "member.safetensors"
    population.save_member(1, str(path))
    assert path.read_bytes()[8:9] == b"{"  # a safetensors header, not a pickle or a zip
    teacher = load_teacher(str(path), torch.device("cpu"), corpus.vocab_size, corpus.vocab)
    saved = population.model.member_state(1)
    for name, p in teacher.named_member_params():
        assert torch.equal(p[0], saved[name])
    # Another corpus's vocabulary is refused, naming the sizes.
    with pytest.raises(ConfigError, match="another vocabulary"):
        load_teacher(str(path), torch.device("cpu"), corpus.vocab_size + 1)


def test_files_of_another_kind_or_damaged_are_refused(tmp_path):
    state = {"a": [torch.arange(3.0), {"b": torch.ones(2, 2).t()}], "nan": math.nan,
             "text": "x", "none": None}
    path = tmp_path / "state.safetensors"
    tensorfile.save(path, state, tensorfile.CHECKPOINT)
    back = tensorfile.load(path, tensorfile.CHECKPOINT)
    assert torch.equal(back["a"][0], state["a"][0]) and torch.equal(back["a"][1]["b"],
                                                                    state["a"][1]["b"])
    assert math.isnan(back["nan"]) and back["text"] == "x" and back["none"] is None
    with pytest.raises(ConfigError, match="not a ufw-model file"):
        tensorfile.load(path, tensorfile.MODEL, what="teacher")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(ConfigError, match="not a ufw-trial-checkpoint file"):
        tensorfile.load(truncated, tensorfile.CHECKPOINT)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(ConfigError, match="not a ufw-model file"):
        tensorfile.load(text, tensorfile.MODEL)
