"""Turn a sweep's Parquet results into comparison tables, Pareto fronts, importances and plots.

One concept per module: ``loading`` (results, the sweep record, which sweep), ``configurations``
(the unit of comparison and its label), ``tables`` (statistics per configuration and
marginals), ``formatting``, ``fronts`` (Pareto fronts, threshold and learning curves),
``importance`` (Optuna study of the configurations, importance), ``plots``, ``cli``
(``python -m ufw.analysis RESULTS``). The notebooks in ``analysis/`` only call these.
"""

from ufw.analysis.cli import main
from ufw.analysis.configurations import (
    NON_PARAM_COLUMNS,
    config_means,
    configuration_labels,
    describe,
    swept_columns,
)
from ufw.analysis.formatting import display_table, format_table, to_markdown
from ufw.analysis.fronts import (
    best_configurations,
    epoch_curves,
    pareto_front,
    threshold_curves,
    threshold_pareto,
    top_configurations,
)
from ufw.analysis.importance import configuration_study, effects_study, importance
from ufw.analysis.loading import (
    AnalysisError,
    Sweep,
    completed,
    default_results,
    latest_sweep,
    left_out,
    left_out_note,
    load_results,
    load_sweep,
)
from ufw.analysis.tables import comparison_table, confirmation_table, marginal_table

__all__ = [
    "NON_PARAM_COLUMNS",
    "AnalysisError",
    "Sweep",
    "best_configurations",
    "comparison_table",
    "completed",
    "config_means",
    "configuration_labels",
    "configuration_study",
    "confirmation_table",
    "default_results",
    "describe",
    "display_table",
    "effects_study",
    "epoch_curves",
    "format_table",
    "importance",
    "latest_sweep",
    "left_out",
    "left_out_note",
    "load_results",
    "load_sweep",
    "main",
    "marginal_table",
    "pareto_front",
    "swept_columns",
    "threshold_curves",
    "threshold_pareto",
    "to_markdown",
    "top_configurations",
]
