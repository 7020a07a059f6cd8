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


def journal_storage(path: str, backend=None):
    """An Optuna JournalStorage on the file ``path`` (created with its directory if missing),
    or on ``backend`` (e.g. a BatchedJournalFile of that path)."""
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    os.makedirs(os.path.dirname(path), exist_ok=True)
    return JournalStorage(backend or JournalFileBackend(path))


def batched_journal(path: str):
    """A journal backend for the one process that writes a sweep's study (its study actor):
    operations collect in memory and reach the file in one locked, synced append at
    ``flush()``. Optuna's file backend appends, locks and syncs the file once per operation
    (asking one configuration is about ten), which made the study, not the GPU, the limit
    of a pruned sweep. Reads are the file's records and then the ones not yet flushed."""
    import threading

    from optuna.storages.journal import BaseJournalBackend, JournalFileBackend

    class BatchedJournalFile(BaseJournalBackend):
        def __init__(self) -> None:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            self.file = JournalFileBackend(path)
            self.on_file = sum(1 for _ in self.file.read_logs(0))
            self.pending: list[dict] = []
            self.lock = threading.Lock()

        def read_logs(self, log_number_from: int):
            with self.lock:
                on_file, pending = self.on_file, list(self.pending)
            if log_number_from < on_file:
                yield from self.file.read_logs(log_number_from)
            yield from pending[max(0, log_number_from - on_file):]

        def append_logs(self, logs: list[dict]) -> None:
            with self.lock:
                self.pending.extend(logs)

        def flush(self) -> None:
            with self.lock:
                if self.pending:
                    self.file.append_logs(self.pending)
                    self.on_file += len(self.pending)
                    self.pending = []

    return BatchedJournalFile()


def load_study(path: str):
    """The study in the journal file ``path`` (a sweep keeps one), read-only use."""
    import optuna

    if not os.path.isfile(path):
        raise FileNotFoundError(path)
    return optuna.load_study(storage=journal_storage(path), study_name=None)
