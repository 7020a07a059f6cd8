"""`python -m ufw.sweep` end to end on a real local Ray (shared, see conftest.py) and real
Optuna: Parquet rows and schema, cohorts, seeds, --set overrides, failed and diverged trials,
and resuming after the driver is SIGKILLed. The model is tiny (dim 16, 2 epochs, 8000
training characters), so a trial takes about a second."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from conftest import TINY_FIXED

from ufw import sweep
from ufw.config import UniversalConfig
from ufw.data import make_corpus
from ufw.results import ResultsWriter, read_epochs, read_trials
from ufw.study import load_study
from ufw.sweep.repair import set_aside_damaged_parts
from ufw.train import Population

ROOT = Path(__file__).resolve().parents[1]

# The trials columns of docs/design.md: every trials part must have these.
REQUIRED_COLUMNS = [
    "sweep", "trial_id", "member", "seed", "config_id", "preset", "node", "gpu",
    "alpha_start", "alpha_end", "schedule",
    "lr_scale_1", "lr_scale_2", "lr_scale_3", "layer_weight_1", "layer_weight_2", "layer_weight_3",
    "routing_threshold", "lr", "dim", "max_epochs",
    "best_ppl", "best_epoch", "acc", "shallow_ratio", "compute_cost", "epochs_run",
    "train_seconds", "status", "error", "ufw_version", "torch_version", "device", "dataset",
]
EPOCH_COLUMNS = ["sweep", "trial_id", "member", "seed", "config_id", "epoch", "train_loss",
                 "val_ppl", "acc", "shallow_ratio", "compute_cost", "alpha", "epoch_seconds"]

SPACE = """
parameters:
  routing_threshold: {type: float, low: 0.5, high: 1.0}
  lr: {type: float, low: 1.0e-3, high: 1.0e-2, log: true}
  layer_lr_scales.2: {type: float, low: 0.5, high: 1.0}
"""


def run_sweep(space: Path, results: Path, *args: str) -> int:
    return sweep.main([str(space), "--results", str(results), *args])


def parts(results: Path, name: str, kind: str = "trials") -> list[Path]:
    return sorted((results / name / kind).glob("part-*.parquet"))


def documented_columns(table: str) -> Callable[[str], bool]:
    """Whether docs/design.md's tables of `trials/` or `epochs/` name a column (a row's first
    cell; `layer_weight_1` .. `layer_weight_n` stands for every layer)."""
    text = (ROOT / "docs" / "design.md").read_text()
    section = text.split(f"### `{table}/`", 1)[1].split("\n## ", 1)[0].split("\n### ", 1)[0]
    names = {name for line in section.splitlines() if line.startswith("| `")
             for name in re.findall(r"`(\w+)`", line.split("|")[1])}
    prefixes = [n[:-1] for n in names if n.endswith("_n")]
    return lambda c: c in names or any(c.startswith(p) and c[len(p):].isdigit()
                                       for p in prefixes)


def assert_schema(frame: pd.DataFrame, results: Path, name: str) -> None:
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    assert not missing, missing
    schemas = [pq.read_schema(p) for p in parts(results, name)]
    assert all(s.equals(schemas[0]) for s in schemas), "parts differ in columns or types"
    epochs = read_epochs(str(results / name))
    assert len(epochs) and not [c for c in EPOCH_COLUMNS if c not in epochs.columns]
    # Every column written is documented, with its meaning and unit.
    for table, columns in (("trials", frame.columns), ("epochs", epochs.columns)):
        documented = documented_columns(table)
        undocumented = [c for c in columns if not documented(c)]
        assert not undocumented, (f"{table} columns missing from docs/design.md", undocumented)


# ---------------------------------------------------------------------- (a) cohort 1
def test_cohort_1_writes_one_row_per_configuration(ray_local, tiny_space, tmp_path, capsys):
    space = tiny_space(SPACE)
    results = tmp_path / "results"
    assert run_sweep(space, results, "--num-samples", "3", "--name", "c1") == 0
    out = capsys.readouterr().out
    assert "trials 3/3" in out and "Top 3 configurations" in out
    assert str(results / "c1" / "trials") in out

    frame = pd.read_parquet(results / "c1" / "trials")
    assert len(frame) == 3 and frame["config_id"].is_unique and frame["trial_id"].is_unique
    assert_schema(frame, results, "c1")
    assert len(parts(results, "c1")) == 3 == len(parts(results, "c1", "epochs"))
    assert set(frame["status"]) == {"completed"}
    assert frame["best_ppl"].map(math.isfinite).all()
    assert (frame["sweep"] == "c1").all() and (frame["seed"] == 42).all()
    assert (frame["dataset"] == "python-docs").all() and (frame["device"] == "cpu").all()
    assert frame["preset"].isna().all() and frame["gpu"].isna().all()
    assert frame["node"].notna().all()
    assert frame["routing_threshold"].between(0.5, 1.0).all()
    assert frame["lr_scale_2"].between(0.5, 1.0).all() and (frame["lr_scale_1"] == 1.0).all()
    assert (frame["dim"] == 16).all() and (frame["max_epochs"] == 2).all()
    # epochs/: one row per member per epoch trained, tied to its trial.
    epochs = pd.read_parquet(results / "c1" / "epochs")
    per_trial = epochs.groupby("trial_id").size()
    assert set(per_trial.index) == set(frame["trial_id"])
    assert (per_trial == frame.set_index("trial_id")["epochs_run"].loc[per_trial.index]).all()
    assert not epochs.duplicated(["trial_id", "member", "epoch"]).any()
    assert (epochs["epoch_seconds"] > 0).all()
    # Ray's experiment and the record of what ran sit beside the Parquet.
    assert (results / "c1" / "ray" / "tuner.pkl").exists()
    assert (results / "c1" / "sweep.json").exists()
    # The same name again is refused (it would overwrite Ray's tuner.pkl), before Ray runs.
    with pytest.raises(SystemExit) as exit_info:
        run_sweep(space, results, "--num-samples", "3", "--name", "c1")
    assert exit_info.value.code == 2
    assert "--resume" in capsys.readouterr().err


# ---------------------------------------------------------------------- (b) cohort 4
def test_cohort_4_trains_populations_of_configurations_and_seeds(ray_local, tiny_space,
                                                                tmp_path):
    space = tiny_space(SPACE)
    results = tmp_path / "results"
    code = run_sweep(space, results, "--num-samples", "5", "--cohort", "4", "--seeds", "2",
                     "--name", "c4")
    assert code == 0
    frame = read_trials(str(results / "c4"))
    assert_schema(frame, results, "c4")
    assert len(frame) == 10  # 5 configurations x 2 seeds
    assert frame["config_id"].nunique() == 5
    assert not frame.duplicated(["config_id", "seed"]).any()
    for _, group in frame.groupby("config_id"):
        assert sorted(group["seed"]) == [42, 43]
        assert group["trial_id"].nunique() == 1  # a configuration's seeds train together
    sizes = sorted(frame.groupby("trial_id").size())
    assert sizes == [2, 8]  # 4 configurations x 2 seeds, then the 1 left x 2 seeds
    for _, group in frame.groupby("trial_id"):
        assert sorted(group["member"]) == list(range(len(group)))
        assert (group["cohort_size"] == len(group)).all()
    assert set(frame["status"]) == {"completed"}


# ---------------------------------------------------------------------- (e) --set
def test_set_overrides_reach_every_row(ray_local, tiny_space, tmp_path, monkeypatch):
    space = tiny_space(SPACE, dim=32, num_heads=4, max_epochs=3)
    results = tmp_path / "results"
    # Data files relative to where the sweep starts (Ray runs trials in their own directories)
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "train.txt").write_text("the cat sat on the mat. " * 400)
    (tmp_path / "text" / "valid.txt").write_text("a dog sat on a log. " * 200)
    monkeypatch.chdir(tmp_path)
    code = run_sweep(space, results, "--num-samples", "2", "--name", "over",
                     "--set", "max_epochs=1", "--set", "dim=16", "--set", "lr=2e-3",
                     "--gpus-per-trial", "0.5", "--train-file", "text/train.txt",
                     "--val-file", "text/valid.txt")
    assert code == 0
    frame = read_trials(str(results / "over"))
    assert len(frame) == 2
    assert set(frame["status"]) == {"completed"}
    assert (frame["dataset"] == "train.txt[:8000]+valid.txt[:4000]").all()
    # The test session's Ray declares one GPU (conftest): each trial got half of GPU 0.
    assert (frame["gpu"] == "0").all()
    assert (frame["device"] != "cpu").all() if torch.cuda.is_available() else \
        (frame["device"] == "cpu").all()
    assert (frame["dim"] == 16).all() and (frame["max_epochs"] == 1).all()
    assert (frame["epochs_run"] == 1).all()
    assert (frame["lr"] == 0.002).all()  # --set wins over the sampled value
    epochs = read_epochs(str(results / "over"))
    assert len(epochs) == 2 and (epochs["epoch"] == 1).all()  # epochs count from 1


# ---------------------------------------------------------------------- (d) failures
def test_failed_and_diverged_trials_are_recorded_and_the_rest_complete(ray_local, tiny_space,
                                                                       tmp_path, capsys):
    # A saved ufw model of another vocabulary: the trial's ConfigError cannot go away on a
    # retry, so the trial is recorded failed at once (no "retrying").
    other = make_corpus("other", "xyz " * 300, "zyx " * 100, batch_size=8, seq_len=32)
    foreign = tmp_path / "teacher.safetensors"
    Population([UniversalConfig(**TINY_FIXED)], other).save_member(0, str(foreign))
    space = tiny_space(f"""
        sampler: grid
        parameters:
          lr: {{type: categorical, choices: [2.0e-3, 1.0e+6]}}
          teacher: {{type: categorical, choices: [self, "{foreign}"]}}
    """)
    results = tmp_path / "results"
    assert run_sweep(space, results, "--name", "fail") == 0
    captured = capsys.readouterr()
    assert "trials 4/4" in captured.out and "retrying" not in captured.out
    assert "[fail] 3 of 4 rows failed" in captured.err

    frame = read_trials(str(results / "fail"))
    assert len(frame) == 4 and frame["trial_id"].is_unique
    assert_schema(frame, results, "fail")
    by = {(row.lr, row.teacher == "self"): row for row in frame.itertuples()}
    ok = by[(2e-3, True)]
    assert ok.status == "completed" and math.isfinite(ok.best_ppl) and not ok.error
    diverged = by[(1e6, True)]
    assert diverged.status == "failed" and "diverged" in diverged.error
    for lr in (2e-3, 1e6):  # the teacher is refused inside the trial: failed, not retried
        raised = by[(lr, False)]
        assert raised.status == "failed"
        assert "another vocabulary" in raised.error
        assert math.isnan(raised.best_ppl) and raised.epochs_run == 0
        assert raised.dim == 16 and raised.config_id  # the configuration is still there
    epochs = read_epochs(str(results / "fail"))
    assert set(epochs["trial_id"]) == {ok.trial_id, diverged.trial_id}


# ---------------------------------------------------------------------- (c) SIGKILL + resume
def test_resume_after_the_driver_is_killed(ray_local, tiny_space, tmp_path):
    """The driver is SIGKILLed once some (not all) parts exist; --resume finishes the sweep
    with exactly num_samples rows, none twice. Both drivers join the test session's Ray.
    --resume without --name finds the latest sweep of the space (tiny-*)."""
    num_samples = 6
    space = tiny_space(SPACE, max_epochs=3)  # tiny.yaml
    results = tmp_path / "results"
    command = [sys.executable, "-m", "ufw.sweep", str(space), "--results", str(results),
               "--address", ray_local]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    name = "tiny-killed"
    driver = subprocess.Popen([*command, "--num-samples", str(num_samples), "--name", name],
                              cwd=ROOT,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
    deadline = time.time() + 240
    while not parts(results, name) and driver.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    driver.send_signal(signal.SIGKILL)
    first_out = driver.communicate()[0]
    written = len(parts(results, name))
    assert 1 <= written < num_samples, (written, first_out)

    resumed = subprocess.run([*command, "--resume"], cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"[{name}] resuming" in resumed.stdout and "Traceback" not in resumed.stderr

    frame = read_trials(str(results / name))
    assert len(frame) == num_samples, frame[["trial_id", "config_id", "status"]]
    assert not frame.duplicated(["config_id", "seed"]).any()
    assert frame["trial_id"].is_unique
    assert set(frame["status"]) == {"completed"}
    assert len(parts(results, name)) == num_samples
    epochs = read_epochs(str(results / name))
    assert not epochs.duplicated(["trial_id", "member", "epoch"]).any()
    assert (epochs["epoch_seconds"] > 0).all()
    assert set(epochs["trial_id"]) == set(frame["trial_id"])
    assert not list((results / name / "trials").glob(".part-*"))  # no temporary files
    # the Optuna study is kept beside the Parquet and the resumed driver continued it
    study = load_study(str(results / name / "study.journal"))
    assert study.study_name == name
    assert sum(t.state.name == "COMPLETE" for t in study.trials) == num_samples


# ---------------------------------------------------------------------- pieces, no Ray run
def test_results_writer_replaces_a_trials_part_atomically(tmp_path):
    writer = ResultsWriter(str(tmp_path), "s")
    row = {"sweep": "s", "trial_id": "t1", "member": 0, "seed": 42, "best_ppl": 5.0,
           "status": "completed", "error": "", "preset": None}
    writer.write("t1", [row], [{"trial_id": "t1", "member": 0, "epoch": 0, "val_ppl": 6.0}])
    writer.write("t1", [{**row, "best_ppl": 4.0}], [])  # a retried/resumed trial: replaced
    (tmp_path / "s" / "trials" / ".part-t2.abc.tmp").write_bytes(b"half a file")
    frame = pd.read_parquet(tmp_path / "s" / "trials")
    assert frame["best_ppl"].tolist() == [4.0]
    assert frame["preset"].isna().all()
    assert writer.trial_ids() == {"t1"}
    writer.clean_temporary()
    assert not list((tmp_path / "s" / "trials").glob(".part-*"))
    # A later part with a null where the first had text keeps the schema.
    writer.write("t2", [{**row, "trial_id": "t2", "preset": "lpt", "error": None}], [])
    assert len(read_trials(str(tmp_path / "s"))) == 2
    schemas = [pq.read_schema(p) for p in (tmp_path / "s" / "trials").glob("part-*")]
    assert schemas[0].equals(schemas[1])
    # A part without rows (a refilling trial's last part when its rows all went in numbered
    # parts) keeps the others' types too: ints would clash with no values inferred as text.
    writer.write("t3", [{**row, "trial_id": "t3", "resumed_from_epoch": 2}], [])
    (tmp_path / "s" / "trials" / "part-t1.parquet").unlink()
    (tmp_path / "s" / "trials" / "part-t2.parquet").unlink()
    writer.write("t4", [], [])
    frame = read_trials(str(tmp_path / "s"))
    assert frame["resumed_from_epoch"].tolist() == [2]
    assert writer.trial_ids() == {"t3", "t4"}


def test_numbered_parts_replace_a_lost_timeline_and_the_last_part_closes_the_trial(tmp_path):
    """A refilling trial's part n goes with its checkpoint n. Retried from checkpoint n, it
    writes part n again and its parts above n (a lost timeline's) go; its last part says it
    finished, and replaces the numbered parts from its own number on."""
    writer = ResultsWriter(str(tmp_path), "s")

    def rows(*ids):
        return [{"sweep": "s", "trial_id": "t1", "config_id": i, "seed": 42, "member": 0,
                 "best_ppl": 5.0, "status": "completed"} for i in ids]

    def epochs(*ids):
        return [{"trial_id": "t1", "config_id": i, "member": 0, "epoch": 1} for i in ids]

    for n, ids in enumerate([("a",), ("b",), ("c",)]):
        writer.write("t1", rows(*ids), epochs(*ids), n, last=False)
    assert writer.trial_ids() == set() and writer.trials_with_parts() == {"t1"}
    assert sorted(read_trials(str(tmp_path / "s"))["config_id"]) == ["a", "b", "c"]
    writer.write("t1", rows("b", "d"), epochs("b", "d"), 1, last=False)  # retried from 1
    assert sorted(read_trials(str(tmp_path / "s"))["config_id"]) == ["a", "b", "d"]
    assert sorted(read_epochs(str(tmp_path / "s"))["config_id"]) == ["a", "b", "d"]
    assert writer.recorded_members("t1") == {("a", 42), ("b", 42), ("d", 42)}
    # its last part sends part 1 again with the rest (restored from 1, no checkpoint since)
    writer.write("t1", rows("b", "d", "e"), epochs("b", "d", "e"), 1)
    assert writer.trial_ids() == {"t1"}
    assert sorted(read_trials(str(tmp_path / "s"))["config_id"]) == ["a", "b", "d", "e"]
    assert sorted(p.name for p in (tmp_path / "s" / "trials").glob("part-*")) == [
        "part-t1.0.parquet", "part-t1.parquet"]
    # a damaged numbered part is set aside under its own name
    writer.write("t2", rows("f"), epochs("f"), 0, last=False)
    damaged = tmp_path / "s" / "trials" / "part-t2.0.parquet"
    damaged.write_bytes(damaged.read_bytes()[:40])
    (tmp_path / "s" / "ray").mkdir()  # Ray's experiment: no state to rerun a trial from
    said = set_aside_damaged_parts(str(tmp_path), "s", str(tmp_path / "s" / "ray"))
    assert list(said) == ["t2.0"] and said["t2.0"].endswith("its rows are lost"), said
    assert (tmp_path / "s" / "trials" / "_damaged-part-t2.0.parquet").exists()
    assert not (tmp_path / "s" / "epochs" / "part-t2.0.parquet").exists()
    writer.delete("t1")
    assert not list((tmp_path / "s" / "trials").glob("part-*"))


def test_row_parts_send_what_ended_once_and_send_the_last_part_again_after_a_restore():
    from ufw.sweep.trainable import RowParts

    def rows(ended):
        return [{"member": m, "ended_at": 1.0 if m in ended else math.nan} for m in range(3)]

    parts = RowParts()
    epoch_rows = ["e1", "e2"]
    sent, epochs, number = parts.take(rows({0}), epoch_rows, final=False)
    assert ([r["member"] for r in sent], epochs, number, epoch_rows) == ([0], ["e1", "e2"], 0, [])
    saved = json.loads(json.dumps(parts.state_dict()))  # as its checkpoint keeps it
    epoch_rows.append("e3")
    assert parts.take(rows({0}), epoch_rows, final=False) == ([], [], None)  # nothing ended
    assert epoch_rows == ["e3"]  # kept for the next part
    sent, epochs, number = parts.take(rows({0, 1}), epoch_rows, final=False)
    assert ([r["member"] for r in sent], epochs, number) == ([1], ["e3"], 1)
    sent, epochs, number = parts.take(rows({0, 1, 2}), [], final=True)
    assert ([r["member"] for r in sent], number) == ([2], 2)
    # Restored from the checkpoint of part 0: part 0 again, with what ended since.
    restored = RowParts()
    restored.load_state_dict(saved)
    sent, epochs, number = restored.take(rows({0, 1}), ["e3'"], final=False)
    assert ([r["member"] for r in sent], epochs, number) == ([0, 1], ["e1", "e2", "e3'"], 0)
    sent, _, number = restored.take(rows({0, 1, 2}), [], final=True)
    assert ([r["member"] for r in sent], number) == ([2], 1)
    # a trial that does not refill sends everything, unnumbered
    assert RowParts().take(rows(set()), ["e"], final=True, everything=True) == (
        rows(set()), ["e"], None)


# ---------------------------------------------------------------------- grid sweeps
GRID = """
parameters:
  preset: {type: categorical, choices: [standard_llm, lpt, asymmetric_best]}
sampler: grid
"""


@pytest.mark.parametrize("cohort", ["1", "3"])
def test_grid_runs_every_point_once_without_errors(ray_local, tiny_space, tmp_path, capsys,
                                                   cohort):
    """Optuna's GridSampler stops the study after the last point, which raised inside
    `tell` under Ray Tune and made the last trial fail and retry."""
    results = tmp_path / "results"
    assert run_sweep(tiny_space(GRID), results, "--cohort", cohort, "--name", "g") == 0
    out = capsys.readouterr().out
    assert "raised" not in out
    frame = pd.read_parquet(results / "g" / "trials")
    assert sorted(frame["preset"]) == ["asymmetric_best", "lpt", "standard_llm"]
    assert set(frame["status"]) == {"completed"}
