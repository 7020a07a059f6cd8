"""Tables for people: markdown, HTML or CSV of comparison_table / marginal_table output."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from ufw.analysis.loading import AnalysisError


def cell(value: object, digits: int = 2) -> str:
    """A table cell: numbers with ``digits`` decimals, missing values empty."""
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, (float, np.floating)):
        return f"{value:.{digits}f}"
    return str(value)


def _configurations(table: pd.DataFrame) -> pd.DataFrame:
    pct = round(100 * table.attrs.get("confidence", 0.95))
    base = table.attrs.get("baseline")
    out = pd.DataFrame({"Rank": table["rank"], "Configuration": table["model"],
                        "config_id": table["config_id"], "Seeds": table["n_seeds"]})
    out["PPL"] = [cell(v) for v in table["ppl_mean"]]
    out[f"{pct}% CI"] = [f"[{lo:.2f}, {hi:.2f}]" if np.isfinite(lo) else ""
                         for lo, hi in zip(table["ci_low"], table["ci_high"])]
    out["Best epoch"] = [cell(v, 1) for v in table["best_epoch"]]
    out["Shallow %"] = [cell(100 * v, 1) for v in table["shallow_ratio"]]
    out["Compute %"] = [cell(v, 1) for v in table["compute_pct"]]
    if base is not None:
        cells = []
        for model, change, sig in zip(table["model"], table["ppl_change_pct"],
                                      table["significant"]):
            if model == base:
                cells.append("baseline")
            elif not np.isfinite(change):
                cells.append("")
            else:
                mark = " (n/a)" if pd.isna(sig) else (" *" if sig else "")
                cells.append(f"{change:+.1f}%{mark}")
        out[f"PPL vs {base}"] = cells
        out["p"] = [f"{p:.3g}" if np.isfinite(p) else "" for p in table["p_value"]]
    return out


def _marginal(table: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({
        "Rank": table["rank"], table.attrs.get("by", "group"): table["group"],
        "Configurations": table["n_configs"], "Rows": table["n_rows"],
        "Mean PPL of configurations": [cell(v) for v in table["ppl_mean"]],
        "SD across configurations": [cell(v) for v in table["ppl_sd"]],
        "Best PPL": [cell(v) for v in table["ppl_best"]],
        "Worst PPL": [cell(v) for v in table["ppl_worst"]],
        "Compute %": [cell(v, 1) for v in table["compute_pct"]],
        "Best configuration": table["best_model"],
    })


def _confirmation(table: pd.DataFrame) -> pd.DataFrame:
    out = _configurations(table)
    out.insert(3, "Sweep PPL", [cell(v) for v in table["sweep_ppl"]])
    out.insert(4, "Sweep seeds", table["sweep_seeds"])
    out.insert(8, "Shift", [f"{v:+.1f}%" if np.isfinite(v) else "" for v in table["shift_pct"]])
    return out.rename(columns={"Seeds": "Fresh seeds"})


def display_table(table: pd.DataFrame) -> pd.DataFrame:
    """A human-readable version of a comparison, marginal or confirmation table (strings)."""
    kind = table.attrs.get("kind")
    if kind == "marginal":
        return _marginal(table)
    return _confirmation(table) if kind == "confirmation" else _configurations(table)


def to_markdown(df: pd.DataFrame) -> str:
    """A GitHub pipe table, numbers right-aligned; small on purpose (no tabulate dependency)."""
    cells = [[cell(v) for v in row] for row in df.itertuples(index=False)]
    header = [str(c) for c in df.columns]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(header)]
    numeric = [pd.api.types.is_numeric_dtype(df[c]) or _looks_numeric(df[c]) for c in df.columns]

    def line(values: list[str]) -> str:
        padded = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)]
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if num else ("-" * (w + 2))
                          for w, num in zip(widths, numeric)) + "|"
    return "\n".join([line(header), rule, *(line(r) for r in cells)])


def _looks_numeric(col: pd.Series) -> bool:
    """Right-align formatted numbers such as "+4.4% *" or "4.97e-05" like real numbers."""
    values = [v.replace("(n/a)", "").rstrip(" *%") for v in col if isinstance(v, str) and v]
    try:
        [float(v) for v in values if v != "baseline"]
    except ValueError:
        return False
    return bool(values)


def format_table(table: pd.DataFrame, fmt: str = "markdown") -> str:
    """Render a comparison/marginal table: ``markdown``/``html`` for people, ``csv`` numbers."""
    if fmt == "csv":
        return table.to_csv(index=False)
    shown = display_table(table)
    notes = table.attrs.get("notes", [])
    if fmt == "html":
        return shown.to_html(index=False) + "".join(f"\n<p>{n}</p>" for n in notes)
    if fmt == "markdown":
        return to_markdown(shown) + "".join(f"\n\n{n}" for n in notes)
    raise AnalysisError(f"unknown format {fmt!r} (allowed: markdown, csv, html)")
