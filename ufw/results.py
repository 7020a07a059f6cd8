"""Sweep results as Parquet, written by the sweep driver, read by anyone (docs/design.md).

Layout under `<results>/<sweep>/` (a local directory or any pyarrow filesystem URI such as
`s3://bucket/results` or `file:///mnt/nfs/results`):

    trials/part-<trial_id>.parquet   one row per population member (configuration x seed)
    epochs/part-<trial_id>.parquet   one row per member per epoch
    trials/part-<trial_id>.<n>.parquet, epochs/...   what a refilling trial had finished by
                                     its n-th checkpoint (written while it runs)
    sweep.json                       what the sweep ran: its space, overrides, data flags

Every part is written to a hidden temporary name in its directory and then renamed, so a
reader never sees half a file; a retried or resumed trial replaces its own part, so rows are
never duplicated. A trial's parts numbered n are written with its checkpoint n; a trial
retried from checkpoint n writes part n again and removes its parts numbered above n (rows
of a timeline that was lost), and `part-<trial_id>.parquet`, its last, says it finished.
Column types come from `UniversalConfig`'s annotations and the tables below, so that every
part of a sweep has the same schema even when a value is null in one of them.

`pandas.read_parquet("<results>/<sweep>/trials")` reads a sweep; `read_trials()` /
`read_epochs()` do the same through pyarrow.fs (URIs) and unify schemas across parts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import typing
import uuid
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from ufw.config import UniversalConfig

TRIALS, EPOCHS = "trials", "epochs"
SWEEP_RECORD = "sweep.json"

_PY_TO_ARROW = {int: pa.int64(), float: pa.float64(), bool: pa.bool_(), str: pa.string()}

# Columns beyond the configuration fields, with their types.
RESULT_TYPES: dict[str, pa.DataType] = {
    "sweep": pa.string(), "source_sweep": pa.string(), "trial_id": pa.string(),
    "member": pa.int64(), "seed": pa.int64(),
    "preset": pa.string(), "config_id": pa.string(), "cohort_size": pa.int64(),
    "schedule": pa.string(), "alpha_start": pa.float64(), "alpha_end": pa.float64(),
    "alpha_steps": pa.string(), "exit_layers": pa.string(), "exit_thresholds": pa.string(),
    "best_ppl": pa.float64(), "best_epoch": pa.int64(), "acc": pa.float64(),
    "shallow_ratio": pa.float64(), "compute_cost": pa.float64(),
    "expert_ffns_per_token": pa.float64(), "exit_shares": pa.string(),
    "threshold_curve": pa.string(), "epochs_run": pa.int64(), "train_seconds": pa.float64(),
    "status": pa.string(), "error": pa.string(), "ufw_version": pa.string(),
    "torch_version": pa.string(), "device": pa.string(), "dataset": pa.string(),
    "tokenizer": pa.string(), "vocab_size": pa.int64(), "best_bpc": pa.float64(),
    "val_bpc": pa.float64(),
    "node": pa.string(), "node_id": pa.string(), "gpu": pa.string(),
    "started_at": pa.float64(), "finished_at": pa.float64(), "setup_seconds": pa.float64(),
    "ended_at": pa.float64(), "optuna_number": pa.int64(),
    "report_seconds": pa.float64(), "study_seconds": pa.float64(),
    "trial_train_seconds": pa.float64(),
    "epoch": pa.int64(), "train_loss": pa.float64(), "val_ppl": pa.float64(),
    "alpha": pa.float64(), "epoch_seconds": pa.float64(),
}
_PREFIX_TYPES = {"layer_weight_": pa.float64(), "lr_scale_": pa.float64()}

# The metric columns of a trials row, as a member that never finished an epoch has them.
EMPTY_METRICS: dict[str, Any] = {
    "best_ppl": math.nan, "best_bpc": math.nan, "best_epoch": -1, "acc": math.nan,
    "shallow_ratio": math.nan, "compute_cost": math.nan, "expert_ffns_per_token": math.nan,
    "exit_shares": "[]", "threshold_curve": "[]", "epochs_run": 0, "train_seconds": 0.0,
}


# Columns that hold a list or an object, stored in Parquet as its JSON text.
JSON_TEXT_COLUMNS = ("alpha_steps", "exit_layers", "exit_thresholds", "exit_shares",
                     "threshold_curve")


def json_row(row: dict[str, Any]) -> dict[str, Any]:
    """A result row as strict JSON values: the JSON-text columns as real lists and objects,
    NaN (no best epoch, no alpha schedule) as None."""
    out = {}
    for key, value in row.items():
        if key in JSON_TEXT_COLUMNS and isinstance(value, str):
            value = json.loads(value)
        elif isinstance(value, float) and math.isnan(value):
            value = None
        out[key] = value
    return out


def _config_types() -> dict[str, pa.DataType]:
    hints = typing.get_type_hints(UniversalConfig)
    return {f.name: _PY_TO_ARROW[hints[f.name]] for f in dataclasses.fields(UniversalConfig)
            if hints[f.name] in _PY_TO_ARROW}


COLUMN_TYPES = {**_config_types(), **RESULT_TYPES}


def column_type(name: str, values: list[Any]) -> pa.DataType:
    if name in COLUMN_TYPES:
        return COLUMN_TYPES[name]
    for prefix, t in _PREFIX_TYPES.items():
        if name.startswith(prefix) and name[len(prefix):].isdigit():
            return t
    inferred = pa.array(values).type
    return pa.string() if pa.types.is_null(inferred) else inferred


def _cell(value: Any, t: pa.DataType) -> Any:
    if value is None:
        return None
    if pa.types.is_string(t):
        return str(value)
    if pa.types.is_floating(t):
        return float(value)
    if pa.types.is_integer(t):
        if isinstance(value, float) and not math.isfinite(value):
            return None
        return int(value)
    if pa.types.is_boolean(t):
        return bool(value)
    return value


def to_table(rows: list[dict[str, Any]], columns: list[str] | None = None) -> pa.Table:
    """Rows -> a typed table; `columns` fixes the column order (and adds missing ones)."""
    names: list[str] = list(columns or [])
    for row in rows:
        names.extend(k for k in row if k not in names)
    arrays, fields = [], []
    for name in names:
        values = [row.get(name) for row in rows]
        t = column_type(name, values)
        arrays.append(pa.array([_cell(v, t) for v in values], type=t))
        fields.append(pa.field(name, t))
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and path for a local directory or a URI (s3://, gs://, file://)."""
    if "://" in uri:
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))


def join(*parts: str) -> str:
    return "/".join(p.rstrip("/") for p in parts if p)


def write_atomically(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write `path` under a hidden temporary name, then rename it into place: a reader sees
    the old file or the new one, never half of one, even when the disk fills up meanwhile
    (the temporary file is then removed and the error raised)."""
    directory, _, name = path.rpartition("/")
    # A leading "." hides the temporary file from pyarrow/pandas dataset readers.
    tmp = join(directory, f".{name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with fs.open_output_stream(tmp) as f:
            f.write(data)
        fs.move(tmp, path)  # a rename on local and POSIX filesystems: atomic
    except BaseException:
        with contextlib.suppress(OSError):
            fs.delete_file(tmp)
        raise


class ResultsWriter:
    """Writes one trials part and one epochs part per finished Ray trial, atomically."""

    def __init__(self, root: str, sweep: str):
        self.root, self.sweep = root, sweep
        self._fs: pafs.FileSystem | None = None
        self._path = ""

    def __getstate__(self):  # picklable (Ray keeps callbacks in tuner.pkl): no live filesystem
        return {"root": self.root, "sweep": self.sweep, "_fs": None, "_path": ""}

    @property
    def fs(self) -> pafs.FileSystem:
        if self._fs is None:
            self._fs, base = filesystem(self.root)
            self._path = join(base, self.sweep)
        return self._fs

    def dir(self, kind: str) -> str:
        _ = self.fs
        return join(self._path, kind)

    def part(self, kind: str, trial_id: str, number: int | None = None) -> str:
        """The trial's last part, or its part `number` (written with that checkpoint)."""
        return self._named(kind, trial_id if number is None else f"{trial_id}.{number}")

    def _named(self, kind: str, name: str) -> str:
        """The part `<name>` (`<trial_id>` or `<trial_id>.<n>`, see `_part_names`)."""
        return join(self.dir(kind), f"part-{name}.parquet")

    def write(self, trial_id: str, rows: list[dict], epoch_rows: list[dict],
              number: int | None = None, last: bool = True) -> None:
        """The trial's last part (`last`), or its part `number`. Parts numbered from `number`
        on (after the last part) or above it are another timeline's: removed first.
        Epochs first, trials last: a trial's last trials part means it is fully recorded."""
        if number is not None:
            for kind in (TRIALS, EPOCHS):
                for n, path in self.numbered_parts(kind, trial_id).items():
                    if n > number or (last and n == number):
                        self.fs.delete_file(path)
        at = None if last else number
        self._write(EPOCHS, self.part(EPOCHS, trial_id, at), epoch_rows)
        self._write(TRIALS, self.part(TRIALS, trial_id, at), rows)

    def _write(self, kind: str, path: str, rows: list[dict]) -> None:
        directory = self.dir(kind)
        self.fs.create_dir(directory, recursive=True)
        known = self._known_schema(kind)
        if known is not None and not rows:
            # e.g. a refilling trial's last part when all its rows went in numbered parts:
            # types inferred from no values (text) would clash with the other parts'
            table = known.empty_table()
        else:
            table = to_table(rows, known.names if known is not None else None)
        buffer = pa.BufferOutputStream()
        pq.write_table(table, buffer)
        write_atomically(self.fs, path, buffer.getvalue().to_pybytes())

    def _known_schema(self, kind: str) -> pa.Schema | None:
        """The schema of one of the sweep's existing parts, so that a new part matches it."""
        for name in sorted(self._part_names(kind)):
            try:
                schema = pq.read_schema(self._named(kind, name), filesystem=self.fs)
            except (OSError, pa.ArrowInvalid):
                continue
            if len(schema):  # not a part written without rows or columns
                return schema
        return None

    def _part_names(self, kind: str) -> set[str]:
        """`<trial_id>` and `<trial_id>.<n>` of every part of `kind`."""
        selector = pafs.FileSelector(self.dir(kind), allow_not_found=True)
        return {info.base_name[len("part-"):-len(".parquet")]
                for info in self.fs.get_file_info(selector)
                if info.base_name.startswith("part-") and info.base_name.endswith(".parquet")}

    def trial_ids(self, kind: str = TRIALS) -> set[str]:
        """Trials with their last part: finished (or failed) and fully recorded."""
        return {name for name in self._part_names(kind) if "." not in name}

    def trials_with_parts(self) -> set[str]:
        """Every trial with any part, numbered or last, of either kind."""
        return {name.split(".")[0] for kind in (TRIALS, EPOCHS)
                for name in self._part_names(kind)}

    def numbered_parts(self, kind: str, trial_id: str) -> dict[int, str]:
        """The trial's parts written with its checkpoints: number -> path."""
        parts = {}
        for name in self._part_names(kind):
            owner, _, number = name.partition(".")
            if owner == trial_id and number.isdigit():
                parts[int(number)] = self.part(kind, trial_id, int(number))
        return parts

    def recorded_members(self, trial_id: str) -> set[tuple[str, int]]:
        """(config_id, seed) of the rows in the trial's numbered trials parts."""
        recorded = set()
        for path in self.numbered_parts(TRIALS, trial_id).values():
            table = pq.read_table(path, columns=["config_id", "seed"], filesystem=self.fs)
            recorded.update(zip(table["config_id"].to_pylist(), table["seed"].to_pylist()))
        return recorded

    def delete(self, trial_id: str) -> None:
        for kind in (TRIALS, EPOCHS):
            paths = [self.part(kind, trial_id), *self.numbered_parts(kind, trial_id).values()]
            for path in paths:
                if self.fs.get_file_info(path).type != pafs.FileType.NotFound:
                    self.fs.delete_file(path)

    def set_aside_damaged(self) -> dict[str, str]:
        """Rename parts that are not readable Parquet (a truncated copy, a full disk) to
        `_damaged-part-<name>.parquet` (readers skip names starting with "_"), with the other
        kind's part of the same name. Returns part name (`<trial_id>`, or `<trial_id>.<n>`
        for a part written with checkpoint n) -> what was wrong."""
        damaged: dict[str, str] = {}
        for kind in (TRIALS, EPOCHS):
            for name in sorted(self._part_names(kind)):
                try:
                    pq.read_metadata(self._named(kind, name), filesystem=self.fs)
                except (OSError, pa.ArrowException) as e:
                    damaged.setdefault(name, f"{kind} part: {str(e).splitlines()[0]}")
        for name in damaged:
            for kind in (TRIALS, EPOCHS):
                path = self._named(kind, name)
                if self.fs.get_file_info(path).type == pafs.FileType.File:
                    self.fs.move(path, join(self.dir(kind), f"_damaged-part-{name}.parquet"))
        return damaged

    def clean_temporary(self) -> None:
        """Remove temporary files a killed driver left behind."""
        for kind in (TRIALS, EPOCHS):
            selector = pafs.FileSelector(self.dir(kind), allow_not_found=True)
            for info in self.fs.get_file_info(selector):
                if info.base_name.startswith(".part-") and info.base_name.endswith(".tmp"):
                    self.fs.delete_file(info.path)


def _read(uri: str, kind: str):
    import pandas as pd

    fs, base = filesystem(uri)
    path = base if Path(base).name == kind else join(base, kind)
    selector = pafs.FileSelector(path, allow_not_found=True)
    files = [i.path for i in fs.get_file_info(selector)
             if i.base_name.startswith("part-") and i.base_name.endswith(".parquet")]
    if not files:
        return pd.DataFrame()
    schemas = [pq.read_schema(f, filesystem=fs) for f in files]
    dataset = ds.dataset(sorted(files), schema=pa.unify_schemas(schemas), filesystem=fs,
                         format="parquet")
    return dataset.to_table().to_pandas()


def read_trials(uri: str):
    """All trial rows of a sweep (`<results>/<sweep>` or its trials/ directory) as a DataFrame."""
    return _read(uri, TRIALS)


def read_epochs(uri: str):
    """All epoch rows of a sweep as a DataFrame."""
    return _read(uri, EPOCHS)


def sweep_dir(uri: str) -> str:
    """`<results>/<sweep>` from itself or from its trials/ or epochs/ directory."""
    uri = uri.rstrip("/")
    head, _, tail = uri.rpartition("/")
    return head if tail in (TRIALS, EPOCHS) and head else uri


def read_sweep_record(uri: str) -> dict[str, Any] | None:
    """The sweep's `sweep.json` (written by its driver), or None where there is none."""
    fs, base = filesystem(sweep_dir(uri))
    try:
        with fs.open_input_stream(join(base, SWEEP_RECORD)) as f:
            return json.loads(f.readall().decode())
    except (OSError, ValueError):
        return None
