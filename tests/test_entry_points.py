"""The commands: `python -m ufw.<tool>` prints no runpy warning, and the console scripts
that pyproject.toml declares are the same commands."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
from conftest import ROOT

ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
COMMANDS = {"ufw.train": "ufw-train", "ufw.sweep": "ufw-sweep", "ufw.analysis": "ufw-analysis",
            "ufw.confirm": "ufw-confirm"}


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=120)


def console_scripts() -> dict[str, str]:
    """pyproject.toml's [project.scripts]: name -> "module:function"."""
    text = (ROOT / "pyproject.toml").read_text()
    section = text.split("[project.scripts]\n", 1)[1].split("\n[", 1)[0]
    return dict(re.findall(r'^([\w-]+) = "([\w.:]+)"$', section, re.MULTILINE))


def test_pyproject_declares_a_script_per_command():
    assert set(console_scripts()) == set(COMMANDS.values())


@pytest.mark.parametrize("module", COMMANDS)
def test_help_prints_no_warning_and_the_script_is_the_same_command(module):
    proc = run("-m", module, "--help")
    assert proc.returncode == 0, proc.stderr
    assert f"python -m {module}" in proc.stdout
    assert proc.stderr == ""  # no runpy RuntimeWarning, nothing else
    # What pip's `ufw-...` wrapper does: load the entry point, exit with what it returns.
    name = COMMANDS[module]
    target = console_scripts()[name]
    assert target.split(":")[0] == module
    wrapper = run("-c", "import sys; from importlib.metadata import EntryPoint; "
                        f"sys.exit(EntryPoint({name!r}, {target!r}, 'console_scripts').load()())",
                  "--help")
    assert wrapper.returncode == 0, wrapper.stderr
    assert wrapper.stdout == proc.stdout and wrapper.stderr == ""


def test_a_train_run_prints_its_row_and_no_warning():
    sets = ["max_epochs=1", "dim=16", "num_heads=2", "batch_size=8", "seq_len=32"]
    proc = run("-m", "ufw.train", "--preset", "lpt", "--train-chars", "4000",
               "--val-chars", "2000", *[a for kv in sets for a in ("--set", kv)])
    assert proc.returncode == 0, proc.stderr
    assert "RuntimeWarning" not in proc.stderr, proc.stderr
    row = json.loads(proc.stdout)
    assert row["status"] == "completed" and row["epochs_run"] == 1 and row["dim"] == 16
