"""Reading a sweep: its Parquet parts, its record (`sweep.json`) and which sweep to read.

Results layout (DESIGN.md section 4): ``RESULTS/trials/`` holds one row per trained
configuration and seed, ``RESULTS/epochs/`` one row per member per epoch, ``RESULTS/sweep.json``
what was run (the search space, so the analysis knows which parameters the sweep varied).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from ufw.space import parameter_column
from ufw.study import STUDY_FILE, load_study

# Columns the analysis cannot work without. Everything else is optional: a sweep that does not
# vary a parameter may still write it, and future config keys simply show up as more columns.
TRIAL_COLUMNS = ("trial_id", "member", "seed", "status", "best_ppl", "compute_cost")
EPOCH_COLUMNS = ("trial_id", "member", "epoch", "val_ppl")
RESULTS_ENV = "UFW_RESULTS"  # names the sweep that notebooks and the CLI read by default


class AnalysisError(ValueError):
    """A user-facing problem with the results (missing, empty, wrong columns).

    The CLI turns it into one line on stderr and exit status 2, so its message must say what is
    wrong and where, without a traceback to lean on.
    """


def require(df: pd.DataFrame, columns: Sequence[str], what: str, where: str) -> None:
    """Raise AnalysisError naming the columns of ``columns`` that ``df`` lacks."""
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise AnalysisError(f"{what} in {where} lack required column(s): {', '.join(missing)}")


def _filesystem(path: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """Local paths and pyarrow URIs (``s3://...``) alike, since a cluster writes to either."""
    text = os.fspath(path)
    if "://" in text:
        try:
            return pafs.FileSystem.from_uri(text)
        except (pa.ArrowException, ValueError) as exc:
            raise AnalysisError(f"cannot open results location {text}: {exc}") from None
    return pafs.LocalFileSystem(), os.path.abspath(text)


def _is_dir(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type == pafs.FileType.Directory


def _read_parts(fs: pafs.FileSystem, directory: str) -> pd.DataFrame | None:
    """Read every Parquet part under ``directory`` into one frame (None when there are none).

    Parts are read one by one and concatenated with schema promotion rather than through one
    dataset, because parts of one sweep may carry different columns (conditional parameters,
    a different number of layers) and a dataset would take the first part's schema and silently
    drop the rest. Hidden files and ``.tmp`` names are the writer's in-flight temporaries.
    """
    infos = fs.get_file_info(pafs.FileSelector(directory, recursive=True, allow_not_found=True))
    files = sorted(
        info.path for info in infos
        if info.type == pafs.FileType.File
        and not info.base_name.startswith((".", "_"))
        and ".tmp" not in info.base_name
    )
    tables = []
    for file in files:
        try:
            tables.append(pq.read_table(file, filesystem=fs))
        except (pa.ArrowException, OSError) as exc:
            raise AnalysisError(f"cannot read Parquet part {file}: {exc}") from None
    if not tables:
        return None
    try:
        table = pa.concat_tables(tables, promote_options="permissive")
    except pa.ArrowException:  # irreconcilable types (say str vs float): let pandas use object
        return pd.concat([t.to_pandas() for t in tables], ignore_index=True)
    return table.to_pandas()


def _sweep_dirs(fs: pafs.FileSystem, root: str) -> list[str]:
    """``root`` itself when it is a sweep, else the sweeps directly under it."""
    if _is_dir(fs, f"{root}/trials"):
        return [root]
    children = fs.get_file_info(pafs.FileSelector(root))
    return sorted(c.path for c in children
                  if c.type == pafs.FileType.Directory and _is_dir(fs, f"{c.path}/trials"))


def load_results(path: str | os.PathLike) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Read a sweep's results directory into ``(trials, epochs)``.

    ``path`` is ``results/<sweep>`` (local or a pyarrow URI). A directory holding several
    sweeps (``results/``, each with its own ``trials/``) is read as one, so sweeps can be
    compared; the ``sweep`` column tells them apart. A missing ``epochs/`` gives an empty epochs
    frame, since tables and fronts only need trials. Raises AnalysisError when there is nothing
    to read or a required column is missing, naming the column(s).
    """
    fs, root = _filesystem(path)
    shown = os.fspath(path)
    if not _is_dir(fs, root):
        raise AnalysisError(f"no such results directory: {shown}")
    sweeps = _sweep_dirs(fs, root)
    trials_parts = [t for t in (_read_parts(fs, f"{s}/trials") for s in sweeps) if t is not None]
    if not trials_parts:
        raise AnalysisError(f"no results in {shown}: expected Parquet parts under {shown}/trials/")
    epochs_parts = [e for e in (_read_parts(fs, f"{s}/epochs") for s in sweeps) if e is not None]
    trials = (pd.concat(trials_parts, ignore_index=True) if len(trials_parts) > 1
              else trials_parts[0])
    require(trials, TRIAL_COLUMNS, "trials", shown)
    if epochs_parts:
        epochs = pd.concat(epochs_parts, ignore_index=True)
        require(epochs, EPOCH_COLUMNS, "epochs", shown)
    else:
        epochs = pd.DataFrame({c: pd.Series(dtype="float64") for c in EPOCH_COLUMNS})
    return trials, epochs


def completed(trials: pd.DataFrame) -> pd.DataFrame:
    """Rows whose training completed: pruned and failed runs have no comparable best PPL.

    ``status`` (docs/design.md): ``completed`` (trained to its early stop or epoch limit),
    ``pruned`` (stopped early by the sweep's pruner: its metrics are those of a partly trained
    model, so ranking it beside finished ones would flatter or bury it) or ``failed``.
    """
    require(trials, ("status", "best_ppl"), "trials", "the frame")
    done = trials[(trials["status"] == "completed") & trials["best_ppl"].notna()]
    return done.reset_index(drop=True)


def left_out(trials: pd.DataFrame) -> dict[str, int]:
    """How many configurations have no completed row, by why: ``pruned`` when the pruner
    stopped any of its rows, else its rows' status (``failed``). Rankings, fronts and
    importance leave these out (completed()), and say so with left_out_note()."""
    require(trials, ("status", "best_ppl"), "trials", "the frame")
    key = trials["config_id"] if "config_id" in trials.columns else pd.Series(trials.index)
    key = key.astype(str).to_numpy()  # one label per configuration, null ones included
    status = trials["status"].to_numpy()
    finished = (status == "completed") & trials["best_ppl"].notna().to_numpy()
    unfinished = ~pd.Series(key).isin(set(key[finished])).to_numpy()
    pruned = set(key[unfinished & (status == "pruned")])
    why = pd.Series(status[unfinished], index=key[unfinished]).groupby(level=0).first()
    why[why.index.isin(pruned)] = "pruned"
    return {str(k): int(v) for k, v in why.value_counts().items()}


def left_out_note(counts: dict[str, int]) -> str | None:
    """One sentence for the configurations left_out() counted, or None when there are none."""
    if not counts:
        return None
    parts = [f"{n} {why}" for why, n in sorted(counts.items())]
    pruned = (" (pruned: stopped early by the sweep's pruner, so only partly trained)"
              if "pruned" in counts else "")
    return f"Left out: {', '.join(parts)} configuration(s) without a completed row{pruned}."


# ----------------------------------------------------------------------------- a sweep

@dataclass
class Sweep:
    """One sweep's rows and what its record says about them.

    ``params`` are the result columns of the parameters the search space varied, in the
    space's order (empty when no ``sweep.json`` was found: the analysis then infers them from
    the columns that vary); ``fixed_preset`` is the preset every configuration starts from,
    if the space fixes one; ``objectives`` maps metric -> ``minimize``/``maximize``.
    """

    name: str
    path: str
    trials: pd.DataFrame
    epochs: pd.DataFrame
    params: list[str] = field(default_factory=list)
    objectives: dict[str, str] = field(default_factory=lambda: {"best_ppl": "minimize"})
    fixed_preset: str | None = None
    record: dict[str, Any] = field(default_factory=dict)

    def study(self):
        """The sweep's own Optuna study (``study.journal`` beside its Parquet, ufw/study.py),
        or None where there is none (a sweep from before, several sweeps, remote results)."""
        path = os.path.join(self.path, STUDY_FILE)
        if "://" in self.path or not os.path.isfile(path):
            return None
        return load_study(path)


def _read_record(fs: pafs.FileSystem, sweep_dir: str) -> dict[str, Any]:
    """The sweep's ``sweep.json`` (plain JSON: safe to read from anywhere), or {}."""
    try:
        with fs.open_input_stream(f"{sweep_dir}/sweep.json") as f:
            record = json.loads(f.readall().decode())
    except (OSError, ValueError, pa.ArrowException):
        return {}
    return record if isinstance(record, dict) else {}


def swept_parameters(record: dict[str, Any]) -> list[str]:
    """Result columns of the parameters a sweep record's space varies, in its order."""
    space = record.get("space") or {}
    names = [str(p.get("name")) for p in space.get("parameters") or [] if isinstance(p, dict)]
    # exit_thresholds.N have no column each: they share the JSON column exit_thresholds
    columns = [parameter_column(n) or n.partition(".")[0] for n in names]
    return list(dict.fromkeys(columns))


def load_sweep(path: str | os.PathLike | None = None) -> Sweep:
    """Read a sweep (default: default_results()) with what its record says about it.

    ``path`` may also hold several sweeps (they are read as one; their swept parameters are
    the union of theirs).
    """
    path = default_results() if path is None else path
    trials, epochs = load_results(path)
    fs, root = _filesystem(path)
    records = [r for r in (_read_record(fs, s) for s in _sweep_dirs(fs, root)) if r]
    params: list[str] = []
    objectives: dict[str, str] = {}
    presets = set()
    for record in records:
        params.extend(p for p in swept_parameters(record) if p not in params)
        space = record.get("space") or {}
        for o in space.get("objectives") or []:
            objectives.setdefault(o.get("metric"), o.get("direction", "minimize"))
        presets.add((space.get("fixed") or {}).get("preset"))
    name = os.path.basename(os.fspath(path).rstrip("/")) or os.fspath(path)
    return Sweep(name=name, path=os.fspath(path), trials=trials, epochs=epochs,
                 params=[p for p in params if p in trials.columns],
                 objectives=objectives or {"best_ppl": "minimize"},
                 fixed_preset=presets.pop() if len(presets) == 1 else None,
                 record=records[0] if len(records) == 1 else {})


def latest_sweep(root: str | os.PathLike = "results") -> str:
    """The newest sweep directory under ``root`` (by its record's time, else modification)."""
    base = Path(root)
    sweeps = [d for d in base.glob("*") if (d / "trials").is_dir()] if base.is_dir() else []
    if not sweeps:
        raise AnalysisError(f"no sweep under {root}/: run one first, e.g. "
                            "python -m ufw.sweep search_spaces/quickstart.yaml")
    return str(max(sweeps, key=lambda d: ((d / "sweep.json").stat().st_mtime
                                          if (d / "sweep.json").exists()
                                          else d.stat().st_mtime, d.name)))


def default_results() -> str:
    """The sweep to read when none is named: $UFW_RESULTS, else the newest under results/."""
    return os.environ.get(RESULTS_ENV) or latest_sweep("results")
