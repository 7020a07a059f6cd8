"""What `--resume` repairs before Ray Tune continues a sweep: parts that are not readable
Parquet are set aside (renamed, never deleted) and their trials marked to run again, and a
last record of the Optuna journal that was cut short (a full disk) is dropped, and so is
Ray's experiment state if it was cut short.

A finished trial's rows live only in its parts (the driver drops them from Ray's experiment
state once written, to keep that state small), so a damaged part can only be rebuilt by
running its trial again. Ray Tune resumes errored trials from their last checkpoint
(`resume_errored=True`) but never re-runs finished ones, so such a trial is marked errored in
Ray's experiment state, a JSON file (`experiment_state-*.json`, the newest one is read):
it then continues from its last checkpoint and reports its rows again.

Ray saves that state in a local staging directory on the driver's machine and then copies
it into `<results>/<sweep>/ray/` in place, so a full disk can cut the copy short. Ray would
then start the experiment afresh (it logs "Failed to restore the run state") and the parts of
every trial it forgot would be dropped. So before Ray starts, a state that is not readable
JSON is replaced by Ray's staging copy where that is still on this machine (under Ray's
temporary directory, `<tmp>/ray/session_*/artifacts/*/ray/driver_artifacts/`: Ray's own
layout, Ray 2.x); else that session's state files are set aside, and Ray resumes from the
previous session's state (trials since then run again); with none, resuming is refused.
"""

from __future__ import annotations

import glob
import json
import os
import tempfile

import pyarrow.fs as pafs

from ufw.config import ConfigError
from ufw.results import ResultsWriter, filesystem, join, write_atomically


def set_aside_damaged_parts(root: str, name: str, experiment_path: str) -> dict[str, str]:
    """Set damaged parts aside; returns part name -> what was wrong, and what happens now.
    A trial whose last part was damaged runs again from its last checkpoint; a part written
    at an earlier checkpoint (`<trial_id>.<n>`) cannot be written again: its rows are lost
    (the Optuna study keeps those configurations' results)."""
    damaged = ResultsWriter(root, name).set_aside_damaged()
    if not damaged:
        return {}
    rerun = mark_trials_errored(experiment_path, {n for n in damaged if "." not in n})
    return {part: f"{problem}; " + ("its trial runs again" if part in rerun else
                                    "its rows are lost" if "." in part else
                                    "its trial is not in Ray's state: its rows are lost")
            for part, problem in damaged.items()}


def mark_trials_errored(experiment_path: str, trial_ids: set[str]) -> set[str]:
    """Mark these finished trials errored in Ray Tune's newest experiment state."""
    fs, base = filesystem(experiment_path)
    states = _experiment_states(fs, base)
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


STATE_FILE_PREFIXES = ("experiment_state-", "searcher-state-", "search_gen_state-")


def _experiment_states(fs: pafs.FileSystem, base: str) -> list[str]:
    """Paths of Ray Tune's experiment states under `base`, oldest first (Ray names each
    after its session's start time and resumes from the newest)."""
    return sorted(i.path for i in fs.get_file_info(pafs.FileSelector(base))
                  if i.base_name.startswith("experiment_state-")
                  and i.base_name.endswith(".json"))


def _readable(fs: pafs.FileSystem, path: str) -> bool:
    try:
        with fs.open_input_stream(path) as f:
            json.loads(f.readall())
        return True
    except (OSError, ValueError):
        return False


def repair_experiment_state(experiment_path: str) -> str | None:
    """Make Ray's newest experiment state readable (see the module's docstring); returns
    what was done, None if nothing was needed. Raises ConfigError if it cannot be."""
    fs, base = filesystem(experiment_path)
    states = _experiment_states(fs, base)
    if not states or _readable(fs, states[-1]):
        return None
    newest = states[-1].rpartition("/")[2]
    session = newest[len("experiment_state-"):-len(".json")]
    names = [i.base_name for i in fs.get_file_info(pafs.FileSelector(base))
             if i.base_name.startswith(STATE_FILE_PREFIXES)
             and i.base_name.rpartition(".")[0].endswith(session)]
    staged = glob.glob(os.path.join(os.environ.get("RAY_TMPDIR", tempfile.gettempdir()),
                                    "ray", "session_*", "artifacts", "*",
                                    os.path.basename(base.rstrip("/")), "driver_artifacts",
                                    newest))
    local = pafs.LocalFileSystem()
    for copy in staged:
        if _readable(local, copy):
            for name in names:
                source = os.path.join(os.path.dirname(copy), name)
                if os.path.isfile(source):
                    with open(source, "rb") as f:
                        write_atomically(fs, join(base, name), f.read())
            return f"{newest} was cut short (a full disk?): restored from Ray's copy {copy}"
    if len(states) == 1:
        raise ConfigError(f"--resume: Ray's experiment state {states[-1]} was cut short (a "
                          "full disk?) and no copy of it is left: start a new sweep")
    for name in names:
        fs.move(join(base, name), join(base, f"_damaged-{name}"))
    return (f"{newest} was cut short (a full disk?) and no copy of it is left: set aside as "
            f"_damaged-{newest}; resuming from {states[-2].rpartition('/')[2]} (trials "
            "since then run again)")


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
