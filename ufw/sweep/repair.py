"""What `--resume` repairs before Ray Tune continues a sweep: parts that are not readable
Parquet are set aside (renamed, never deleted) and their trials marked to run again, and a
last record of the Optuna journal that was cut short (a full disk) is dropped.

A finished trial's rows live only in its parts (the driver drops them from Ray's experiment
state once written, to keep that state small), so a damaged part can only be rebuilt by
running its trial again. Ray Tune resumes errored trials from their last checkpoint
(`resume_errored=True`) but never re-runs finished ones, so such a trial is marked errored in
Ray's experiment state, a JSON file (`experiment_state-*.json`, the newest one is read):
it then continues from its last checkpoint and reports its rows again.
"""

from __future__ import annotations

import json
import os

import pyarrow.fs as pafs

from ufw.results import ResultsWriter, filesystem, write_atomically


def set_aside_damaged_parts(root: str, name: str, experiment_path: str) -> dict[str, str]:
    """Set damaged parts aside; returns trial id -> what was wrong, and what happens now."""
    damaged = ResultsWriter(root, name).set_aside_damaged()
    if not damaged:
        return {}
    rerun = mark_trials_errored(experiment_path, set(damaged))
    return {trial_id: f"{problem}; " + ("its trial runs again" if trial_id in rerun else
                                        "its trial is not in Ray's state: its rows are lost")
            for trial_id, problem in damaged.items()}


def mark_trials_errored(experiment_path: str, trial_ids: set[str]) -> set[str]:
    """Mark these finished trials errored in Ray Tune's newest experiment state."""
    fs, base = filesystem(experiment_path)
    states = sorted(i.path for i in fs.get_file_info(pafs.FileSelector(base))
                    if i.base_name.startswith("experiment_state-")
                    and i.base_name.endswith(".json"))
    if not states:
        return set()
    with fs.open_input_stream(states[-1]) as f:
        experiment = json.loads(f.readall().decode())
    marked = set()
    for entry in experiment.get("trial_data", []):
        trial = json.loads(entry[0])
        if trial.get("trial_id") in trial_ids and trial.get("status") == "TERMINATED":
            trial["status"] = "ERROR"
            entry[0] = json.dumps(trial)
            marked.add(trial["trial_id"])
    if marked:
        write_atomically(fs, states[-1], json.dumps(experiment).encode())
    return marked


def drop_torn_journal_record(path: str) -> bool:
    """Cut the study journal's last record if a full disk (or a kill) left it without its
    newline; returns whether one was. Optuna skips such a record when it is last, but the
    next record appended would be glued to it and make the journal unreadable."""
    if not os.path.isfile(path):
        return False
    with open(path, "rb+") as f:
        end = f.seek(0, os.SEEK_END)
        position, block = end, 1 << 16
        while position > 0:  # from the end backwards, to the last newline
            start = max(0, position - block)
            f.seek(start)
            chunk = f.read(position - start)
            if position == end and chunk.endswith(b"\n"):
                return False  # intact
            newline = chunk.rfind(b"\n")
            if newline >= 0:
                f.truncate(start + newline + 1)
                return True
            position = start
        f.truncate(0)  # a single record, cut short
        return end > 0
