"""What `--resume` repairs before Ray Tune continues a sweep: parts that are not readable
Parquet are set aside (renamed, never deleted) and their trials marked to run again.

A finished trial's rows live only in its parts (the driver drops them from Ray's experiment
state once written, to keep that state small), so a damaged part can only be rebuilt by
running its trial again. Ray Tune resumes errored trials from their last checkpoint
(`resume_errored=True`) but never re-runs finished ones, so such a trial is marked errored in
Ray's experiment state, a JSON file (`experiment_state-*.json`, the newest one is read):
it then continues from its last checkpoint and reports its rows again.
"""

from __future__ import annotations

import json

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
