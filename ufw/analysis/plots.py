"""The figures of the notebooks, one function each; every figure is titled with the sweep.

Each function takes tables from the other modules (so the numbers match the CLI's) and
returns a matplotlib Figure; the caller saves it. Parameter effects come from Optuna's own
matplotlib plots (``optuna.visualization.matplotlib``) on importance.configuration_study.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence

import pandas as pd

MAX_LABEL = 48  # legend and tick labels longer than this are cut (config_id stays in the CSV)


def _short(label: object) -> str:
    text = str(label)
    return text if len(text) <= MAX_LABEL else text[:MAX_LABEL - 3] + "..."


def left_out_suffix(frame: pd.DataFrame | pd.Series) -> str:
    """Title text for the configurations a table left out (``attrs["left_out"]``: pruned,
    failed), so that a figure of finished configurations never passes for the whole sweep."""
    counts = frame.attrs.get("left_out") or {}
    if not counts:
        return ""
    return "; left out: " + ", ".join(f"{n} {why}" for why, n in sorted(counts.items()))


def readable_log_axis(ax, axis: str = "y") -> None:
    """A log axis labelled with plain numbers (20, 30, 50) rather than 2x10^1."""
    import matplotlib.ticker as ticker

    target = ax.yaxis if axis == "y" else ax.xaxis
    low, high = (ax.get_ylim() if axis == "y" else ax.get_xlim())
    plain = ticker.FuncFormatter(lambda v, _: f"{v:g}")
    target.set_major_formatter(plain)
    few_decades = low > 0 and high / low < 100
    target.set_minor_locator(ticker.LogLocator(subs=(2, 3, 5) if few_decades else ()))
    target.set_minor_formatter(plain if few_decades else ticker.NullFormatter())


def plot_comparison(table: pd.DataFrame, sweep: str, top: int = 15):
    """Mean best PPL of the ``top`` configurations of comparison_table, best at the top; the
    table's CI where a configuration has >= 2 seeds, none where it has one."""
    import matplotlib.pyplot as plt

    shown = table.head(top).iloc[::-1]
    err = shown["ci_high"] - shown["ppl_mean"]  # NaN (one seed): no bar drawn
    fig, ax = plt.subplots(figsize=(8, 0.4 * len(shown) + 1.6))
    names = [_short(m) for m in shown["model"]]
    # points, not bars: the axis does not start at 0, so bar lengths would mislead
    ax.errorbar(shown["ppl_mean"], names, xerr=err, fmt="o", color="tab:blue", ecolor="k",
                capsize=3)
    ax.grid(axis="x", alpha=0.3)
    err = err.fillna(0)
    for y, (n, end) in enumerate(zip(shown["n_seeds"], shown["ppl_mean"] + err)):
        ax.annotate(f"{n} seed{'s' if n != 1 else ''}", (end, y),  # right of the CI bar
                    xytext=(4, -3), textcoords="offset points", fontsize=7)
    ax.set_xlim(0.95 * (shown["ppl_mean"] - err).min(), 1.05 * (shown["ppl_mean"] + err).max())
    ax.set_xlabel("validation PPL (mean over seeds; bars: 95% CI where >= 2 seeds)")
    # two lines: a long sweep name (e.g. a confirmation's) would run past the narrow figure
    ax.set_title(f"{sweep}:\nbest PPL of the top {len(shown)} of {len(table)} completed "
                 f"configurations{left_out_suffix(table)}", fontsize=10)
    fig.tight_layout()
    return fig


def plot_pareto(means: pd.DataFrame, front: pd.DataFrame, sweep: str,
                x: str = "compute_cost", y: str = "best_ppl"):
    """Every configuration's seed-mean ``y`` against ``x``, the front stepped and labelled."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    ax.scatter(100 * means[x], means[y], color="0.6", s=18,
               label=f"configurations ({len(means)})")
    ax.step(100 * front[x], front[y], where="post", color="k", lw=1)
    ax.scatter(100 * front[x], front[y], color="tab:red", s=30, zorder=3,
               label=f"Pareto front ({len(front)})")
    for i, (_, row) in enumerate(front.iterrows()):
        ax.annotate(_short(row["model"]), (100 * row[x], row[y]), fontsize=7,
                    xytext=(5, 6 if i % 2 else -10), textcoords="offset points")
    ax.set_xlabel("compute (% of full depth)")
    ax.set_ylabel("validation PPL (mean over seeds)")
    ax.set_title(f"{sweep}: PPL against compute, {len(means)} completed configurations"
                 f"{left_out_suffix(means)}", fontsize=10)
    ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


def plot_threshold_curves(curves: pd.DataFrame, models: Sequence[str], front: pd.DataFrame,
                          sweep: str):
    """One routed PPL/compute curve per configuration in ``models`` (points in threshold
    order, the thresholds at the ends marked), and the front over all operating points.

    Threshold 0 means routing off (every token to the last layer); it is left off the line,
    which would otherwise jump from full compute to the lowest threshold's."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    for model in models:
        c = curves[(curves["model"] == model) & (curves["threshold"] > 0)]
        c = c.sort_values("threshold")
        if c.empty:
            continue
        line, = ax.plot(100 * c["compute_cost"], c["ppl"], marker=".", label=_short(model))
        for _, end in c.iloc[[0, -1]].iterrows():
            ax.annotate(f"t={end['threshold']:g}", (100 * end["compute_cost"], end["ppl"]),
                        fontsize=6, color=line.get_color(), xytext=(3, 3),
                        textcoords="offset points")
    ax.step(100 * front["compute_cost"], front["ppl"], where="post", color="k", ls="--", lw=1,
            label="front over all configurations and thresholds")
    ax.set_xlabel("compute (% of full depth)")
    ax.set_ylabel("routed validation PPL (mean over seeds)")
    ax.set_title(f"{sweep}: routing threshold curves of the top {len(models)} configurations",
                 fontsize=10)
    ax.legend(fontsize="x-small")
    fig.tight_layout()
    return fig


def plot_learning_curves(curves: pd.DataFrame, models: Sequence[str], sweep: str):
    """Validation PPL per epoch of each configuration in ``models`` (mean over its seeds)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for model in models:
        c = curves[curves["model"] == model]
        ax.plot(c["epoch"], c["val_ppl"], marker=".", label=_short(model))
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation PPL (mean over seeds)")
    if len(curves) and curves["val_ppl"].min() > 0:
        ax.set_yscale("log")
        readable_log_axis(ax, "y")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_title(f"{sweep}: learning curves of the top {len(models)} configurations",
                 fontsize=10)
    if len(curves):
        ax.legend(fontsize="x-small")
    fig.tight_layout()
    return fig


def plot_importance(importances: Mapping[str, pd.Series], sweep: str):
    """One bar chart per target: the swept knobs' normalised importance."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, max(1, len(importances)),
                             figsize=(5 * max(1, len(importances)), 4), squeeze=False)
    for ax, (target, series) in zip(axes[0], importances.items()):
        s = series.iloc[::-1]
        ax.barh(s.index, s.values, color="tab:green")
        ax.set_xlabel("importance (PED-ANOVA, normalised)")
        ax.set_title(target)
    first = next(iter(importances.values()), pd.Series(dtype=float))
    fig.suptitle(f"{sweep}: importance of the swept parameters{left_out_suffix(first)}",
                 fontsize=10)
    fig.tight_layout()
    return fig


def plot_parameter_effects(study, sweep: str, target: str = "best_ppl"):
    """The objective against each swept parameter: Optuna's slice plot of the study (one
    point per configuration), titled with the sweep."""
    import optuna
    from optuna.visualization.matplotlib import plot_slice

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        axes = plot_slice(study, target_name=target)
    first = axes.flat[0] if hasattr(axes, "flat") else axes
    fig = first.figure
    n = len(getattr(axes, "flat", [axes]))
    fig.set_size_inches(max(6.0, 3.2 * n), 4)
    fig.suptitle(f"{sweep}: {target} against each swept parameter "
                 f"({len(study.trials)} configurations)", fontsize=10)
    for ax in getattr(axes, "flat", [axes]):
        if ax.get_xscale() == "log":
            readable_log_axis(ax, "x")
    return fig


def plot_parallel(study, sweep: str, target: str = "best_ppl"):
    """Optuna's parallel-coordinate plot of the study: each configuration a line over the
    swept parameters, coloured by ``target``."""
    import optuna
    from optuna.visualization.matplotlib import plot_parallel_coordinate

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        ax = plot_parallel_coordinate(study, target_name=target)
    fig = ax.figure
    n = len(study.best_trial.params) + 1
    fig.set_size_inches(max(6.0, math.ceil(1.6 * n)), 4.5)
    ax.set_title(f"{sweep}: {target} over the swept parameters", fontsize=10)
    return fig
