"""`python -m ufw.train --from RESULTS --config-id ID` on a real sweep (real Ray, real Optuna,
tiny model on CPU): the re-trained row reproduces the sweep's best_ppl; the sweep's summary
prints the command; wrong ids and directories exit 2 with one line."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ufw import sweep, train
from ufw.results import read_trials

ROOT = Path(__file__).resolve().parents[1]

# Aliases on purpose (alpha_schedule.type, layer_weights.1): the row names them canonically.
SPACE = """
fixed: {dim: 16, num_heads: 2, max_epochs: 2, batch_size: 8, seq_len: 32,
        alpha_schedule.type: linear}
data: {train_chars: 8000, val_chars: 4000}
parameters:
  routing_threshold: {type: float, low: 0.5, high: 1.0}
  layer_weights.1: {type: float, low: 0.1, high: 0.9}
  alpha_end: {type: float, low: 0.1, high: 0.5}
  lr_scale_2: {type: float, low: 0.5, high: 1.0}
defaults: {num_samples: 2, cohort: 2, seeds: 2}
"""


@pytest.fixture(scope="module")
def swept(ray_local, tmp_path_factory):
    """A finished 2-configuration x 2-seed sweep: (its directory, rows, summary output)."""
    base = tmp_path_factory.mktemp("rerun")
    space = base / "space.yaml"
    space.write_text(textwrap.dedent(SPACE))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert sweep.main([str(space), "--results", str(base / "results"), "--name", "s"]) == 0
    directory = base / "results" / "s"
    return directory, read_trials(str(directory)), out.getvalue()


pytestmark = pytest.mark.usefixtures("one_thread")


def rerun(capsys, *args: str) -> tuple[dict, str]:
    assert train.main(["--from", *args]) == 0
    captured = capsys.readouterr()
    return json.loads(captured.out), captured.err


def test_summary_command_reproduces_the_best_row(swept, capsys):
    directory, rows, summary = swept
    assert len(rows) == 4 and set(rows["status"]) == {"completed"}
    line = next(x for x in summary.splitlines() if x.startswith("Re-train the best"))
    command = line.split(": ", 1)[1].split()
    assert command[:4] == ["python", "-m", "ufw.train", "--from"]
    assert command[4] == str(directory)
    best = rows.groupby("config_id")["best_ppl"].mean().idxmin()
    assert command[5:] == ["--config-id", best]

    row, err = rerun(capsys, *command[4:])
    original = rows[(rows["config_id"] == best) & (rows["seed"] == 42)].iloc[0]
    assert row["config_id"] == best and row["seed"] == 42  # the first of its seeds ...
    assert "seeds 42, 43; training seed 42" in err  # ... and it says so
    assert row["best_ppl"] == pytest.approx(original["best_ppl"], rel=1e-4)
    assert row["best_epoch"] == original["best_epoch"]
    assert row["dataset"] == original["dataset"] and row["lr_scale_2"] == original["lr_scale_2"]


def test_seed_and_set_pick_the_run(swept, capsys):
    directory, rows, _ = swept
    other = rows.sort_values("best_ppl").iloc[-1]  # any row: the worst, seed 42 or 43
    seed = 85 - int(other["seed"])  # the other seed of its configuration
    twin = rows[(rows["config_id"] == other["config_id"]) & (rows["seed"] == seed)].iloc[0]
    row, err = rerun(capsys, str(directory), "--config-id", other["config_id"][:8],
                     "--seed", str(seed), "--set", "alpha_schedule.end=0.5")
    assert row["seed"] == seed and row["alpha_end"] == 0.5 and "seeds" not in err
    assert row["config_id"] != twin["config_id"]  # --set changed the configuration
    row, _ = rerun(capsys, str(directory), "--config-id", other["config_id"], "--seed", str(seed))
    assert row["best_ppl"] == pytest.approx(twin["best_ppl"], rel=1e-4)


def test_without_the_sweeps_record_the_row_and_data_flags_suffice(swept, capsys, tmp_path):
    directory, rows, _ = swept
    copy = tmp_path / "copy"
    shutil.copytree(directory / "trials", copy / "trials")  # no sweep.json
    config_id = rows["config_id"].iloc[0]
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--from", str(copy), "--config-id", config_id])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1
    assert "no sweep.json records its data; give the data flags" in err
    # From the columns alone: lr_scale_N of 1 are written out, so the id differs, the run not.
    row, err = rerun(capsys, str(copy), "--config-id", config_id, "--seed", "42",
                     "--train-chars", "8000", "--val-chars", "4000")
    original = rows[(rows["config_id"] == config_id) & (rows["seed"] == 42)].iloc[0]
    assert row["best_ppl"] == pytest.approx(original["best_ppl"], rel=1e-4)
    assert "the same values, written differently" in err


def test_unknown_id_or_no_trials_exit_2_with_one_line(swept, tmp_path, capsys):
    proc = subprocess.run([sys.executable, "-m", "ufw.train", "--from", str(swept[0]),
                           "--config-id", "0123456789ab"], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == ("error: --config-id 0123456789ab: is not among the 2 "
                           f"configurations of {swept[0]} (e.g. "
                           f"{', '.join(sorted(set(swept[1]['config_id'])))})\n")
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--from", str(tmp_path), "--config-id", "0123456789ab"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1
    assert f"--from {tmp_path}: no trial rows there" in err


def test_from_and_config_id_go_together(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--from", "results/x"])
    assert exit_info.value.code == 2
    assert "--from and --config-id go together" in capsys.readouterr().err
