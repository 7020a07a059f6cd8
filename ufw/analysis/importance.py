"""Hyperparameter importance, and the Optuna study that Optuna's evaluators and plots read.

A sweep's configurations become an in-memory Optuna study (one trial per configuration, its
value the seed mean of the target), over exactly the knobs the sweep varied: one parameter per
swept knob, never a derived copy of one (``exit_thresholds`` of a one-exit model copies
``routing_threshold``), since a copy would split the knob's importance with it.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import pandas as pd

from ufw.analysis.configurations import config_means, swept_columns
from ufw.analysis.loading import AnalysisError, Sweep, require
from ufw.space import POINT


def _distribution(values: pd.Series):
    """Optuna distribution for one column: numbers become float/int ranges, the rest categories.

    Log scale is assumed for positive ranges spanning two decades or more (learning rates),
    since PED-ANOVA's density estimates are taken in the distribution's own scale.
    """
    from optuna.distributions import (
        CategoricalDistribution,
        FloatDistribution,
        IntDistribution,
    )

    present = values.dropna()
    if pd.api.types.is_bool_dtype(present) or not pd.api.types.is_numeric_dtype(present):
        choices = sorted({str(v) for v in present})
        return (CategoricalDistribution(choices), str) if len(choices) > 1 else None
    low, high = float(present.min()), float(present.max())
    if low == high:
        return None
    log = low > 0 and high / low >= 100
    if pd.api.types.is_integer_dtype(present):
        return IntDistribution(int(low), int(high), log=log), int
    return FloatDistribution(low, high, log=log), float


def configuration_study(
    trials: pd.DataFrame,
    params: Sequence[str] | None = None,
    target: str = "best_ppl",
    direction: str = "min",
):
    """An in-memory ``optuna.Study`` with one completed trial per configuration.

    Its value is the configuration's mean ``target`` over seeds (negated for ``direction``
    ``"max"``, so the study minimises); its params are the swept columns (``params``, else
    configurations.swept_columns), with distributions inferred from the values: numbers ->
    Float/IntDistribution over the observed range (log when positive and spanning >= 100x),
    the rest -> CategoricalDistribution of the values as text. A null value leaves the
    parameter out of that trial (a conditional parameter). Only configurations with a completed
    row take part: a pruned one's value is that of a partly trained model. The study's user
    attribute ``left_out`` counts the others (loading.left_out). Raises AnalysisError when
    fewer than two configurations or no varying parameter remain.
    """
    import optuna

    if direction not in ("min", "max"):
        raise AnalysisError(f"direction must be 'min' or 'max', got {direction!r}")
    require(trials, (target,), "trials", "the frame")
    params = swept_columns(trials, params)
    means = config_means(trials, params, extra=[target])
    means = means[pd.to_numeric(means[target], errors="coerce").notna()]
    dists = {}
    for col in params:
        d = _distribution(means[col]) if col in means.columns else None
        if d is not None:
            dists[col] = d
    if len(means) < 2 or not dists:
        raise AnalysisError(
            f"importance needs >= 2 completed configurations and a parameter that varies "
            f"(got {len(means)} configurations, varying: {', '.join(dists) or 'none'})")
    sign = 1.0 if direction == "min" else -1.0
    frozen = []
    for _, row in means.iterrows():
        values = {c: cast(row[c]) for c, (_, cast) in dists.items() if pd.notna(row[c])}
        frozen.append(optuna.trial.create_trial(
            value=sign * float(row[target]), params=values,
            distributions={c: dists[c][0] for c in values},
            user_attrs={"config_id": str(row["config_id"]), "label": str(row["model"])}))
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "study created" chatter
    try:
        study = optuna.create_study(direction="minimize", study_name=target)
        study.add_trials(frozen)
        study.set_user_attr("left_out", means.attrs["left_out"])
    finally:
        optuna.logging.set_verbosity(verbosity)
    return study


def effects_study(sweep: Sweep, target: str = "best_ppl"):
    """The study to draw parameter effects from: the sweep's own (its parameters as the space
    names and samples them, log scales included) when it optimised ``target`` alone, else
    configuration_study of its rows."""
    own = sweep.study() if list(sweep.objectives) == [target] else None
    if own is not None and any(t.params and POINT not in t.params for t in own.trials):
        return own
    return configuration_study(sweep.trials, sweep.params, target)


def importance(
    trials: pd.DataFrame,
    params: Sequence[str] | None = None,
    target: str = "best_ppl",
    direction: str = "min",
    method: str = "ped_anova",
    quantile: float | None = None,
    seed: int = 0,
) -> pd.Series:
    """How much each swept knob matters for ``target``, with Optuna's importance evaluators.

    Evaluated on configuration_study (one trial per configuration, seeds averaged).
    ``method``: ``"ped_anova"`` (default; PedAnovaImportanceEvaluator, no extra dependency;
    importance of reaching the best ``quantile`` of configurations, default max(0.1, 5/n) so
    that at least ~5 are in the top set as the PED-ANOVA authors advise) or ``"fanova"``
    (FanovaImportanceEvaluator, a random-forest fANOVA; needs scikit-learn). Returns
    normalised importances (sum 1), highest first, one per swept knob that varies;
    ``attrs["left_out"]`` counts the configurations without a completed row (not evaluated).
    """
    import optuna

    study = configuration_study(trials, params, target, direction)
    n = len(study.trials)
    if method == "ped_anova":
        q = quantile if quantile is not None else min(0.5, max(0.1, 5 / n))
        evaluator = optuna.importance.PedAnovaImportanceEvaluator(target_quantile=q)
    elif method == "fanova":
        try:
            import sklearn  # noqa: F401
        except ImportError:
            raise AnalysisError("method='fanova' needs scikit-learn: pip install scikit-learn") \
                from None
        evaluator = optuna.importance.FanovaImportanceEvaluator(seed=seed)
    else:
        raise AnalysisError(f"method must be 'ped_anova' or 'fanova', got {method!r}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        result = optuna.importance.get_param_importances(study, evaluator=evaluator)
    series = pd.Series(result, name="importance", dtype=float)
    series.index.name = "param"
    series = series.sort_values(ascending=False, kind="stable")
    series.attrs["left_out"] = study.user_attrs["left_out"]
    return series
