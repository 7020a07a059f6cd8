"""Where a sweep keeps its Optuna study: an Optuna journal file beside its Parquet.

`<results>/<sweep>/study.journal` holds every trial Optuna asked and was told (one per
sampled configuration: its parameters under their search-space names and its objective values,
the means over its seeds), so that `optuna-dashboard <that file>` shows the sweep live,
Optuna's plotting and importance functions read it, and `--resume` continues the same study.

A journal file needs a local filesystem with file locks, so with `--results s3://...` (or any
URI) the study stays on the driver's disk, at `results/<sweep>/study.journal` under the
directory the driver was started in; only the Parquet and Ray's checkpoints go to the URI.
"""

from __future__ import annotations

import os

STUDY_FILE = "study.journal"


def study_file(root: str, sweep: str) -> str:
    """The journal file of sweep ``sweep`` under results root ``root`` (a directory or URI)."""
    if "://" in root:
        root = "results"  # a URI root: kept on the driver's disk (see the module's docstring)
    return os.path.join(os.path.abspath(os.path.expanduser(root)), sweep, STUDY_FILE)


def journal_storage(path: str):
    """An Optuna JournalStorage on the file ``path`` (created with its directory if missing)."""
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    os.makedirs(os.path.dirname(path), exist_ok=True)
    return JournalStorage(JournalFileBackend(path))


def load_study(path: str):
    """The study in the journal file ``path`` (a sweep keeps one), read-only use."""
    import optuna

    if not os.path.isfile(path):
        raise FileNotFoundError(path)
    return optuna.load_study(storage=journal_storage(path), study_name=None)
