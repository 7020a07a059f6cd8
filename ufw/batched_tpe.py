"""Optuna's TPE, fitted once per batch of asks instead of once per ask.

A sweep asks configurations in batches: a cohort of K at a Ray trial's start, or, with
pruning and refill, the slots a population freed in one epoch (about a hundred per epoch at
cohort 256). TPE's cost per ask grows with the study: every ask splits all finished trials
into good and bad ones and fits a Parzen estimator to each, for each group of parameters
(about 30 ms per configuration at 1,500 trials and 130 ms at 4,000 on a 2-core CPU). The
study actor asks for every trial of every node, so that cost, not the GPUs, set the pace of
a pruned sweep.

Without the constant liar, what TPE fits depends only on the finished (completed and pruned)
trials, and between the asks of one batch none finishes. So this sampler keeps the split
and both estimators of each parameter group for as long as the set of finished trials is
the same, and draws each ask's candidates from them. Every ask then gets exactly the values
Optuna's `TPESampler(constant_liar=False)` would give it with the same seed and history
(tests/test_batched_tpe.py checks this), at a fraction of the cost.

Why not the constant liar (Optuna 5's default): it counts running trials as bad ones, so
every ask changes what the next one fits, and a batch would cost as much as one ask each.
Without it, the asks of a batch are independent draws of the same TPE, like Optuna's TPE
in several processes before 5.0.

The same holds for the search space the multivariate TPE (Optuna 5's default for one
objective) infers before each ask: the intersection of the finished trials' distributions.
Optuna recomputes it per ask, scanning every trial back to the oldest running one; with
hundreds of configurations in flight that was half of an ask's cost. It is kept as long as
the finished trials are the same, too.

Uses TPESampler's internal steps (`_split_trials`, `_build_parzen_estimator`,
`_compute_acquisition_func`, `_compare`); when an Optuna release changes them, this falls
back to Optuna's own `_sample` (same values, without the saving).
"""

from __future__ import annotations

from typing import Any

import optuna
from optuna.samplers._tpe import sampler as tpe_module
from optuna.trial import TrialState

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


class BatchedTPESampler(optuna.samplers.TPESampler):
    """`optuna.samplers.TPESampler(constant_liar=False, ...)` whose fitted estimators are
    reused by the asks between which no trial finished."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(constant_liar=False, **kwargs)
        # What this sampler keeps while the finished trials stay the same: the estimators per
        # parameter group, and the inferred search space (None: not inferred yet).
        self._fitted: dict[Any, tuple[Any, Any]] = {}
        self._space: dict[str, Any] | None = None
        self._kept_for: tuple[int, int] = (-1, -1)  # (study id, finished trials)
        self._internals = hasattr(tpe_module, "_split_trials") and all(
            hasattr(self, name) for name in ("_build_parzen_estimator",
                                             "_compute_acquisition_func", "_compare", "_gamma"))

    def _finished(self, study) -> list:
        """The study's finished trials; forgets what was kept when one finished since."""
        finished = study._get_trials(deepcopy=False, states=FINISHED, use_cache=True)
        if (study._study_id, len(finished)) != self._kept_for:
            self._fitted, self._space = {}, None
            self._kept_for = (study._study_id, len(finished))
        return finished

    def infer_relative_search_space(self, study, trial) -> dict[str, Any]:
        if not self._internals:
            return super().infer_relative_search_space(study, trial)
        self._finished(study)
        if self._space is None:
            self._space = super().infer_relative_search_space(study, trial)
        return dict(self._space)

    def _sample(self, study, trial, search_space: dict[str, Any]) -> dict[str, Any]:
        if not self._internals:
            return super()._sample(study, trial, search_space)
        finished = self._finished(study)
        key = tuple((name, repr(dist)) for name, dist in search_space.items())
        if key not in self._fitted:
            self._fitted[key] = self._fit(study, finished, search_space)
        below, above = self._fitted[key]
        # From here on as TPESampler._sample: candidates from the good trials' estimator,
        # the one where good is most likely against bad.
        samples = below.sample(self._rng.rng, self._n_ei_candidates)
        best = self._compare(samples, self._compute_acquisition_func(samples, below, above))
        return {name: dist.to_external_repr(best[name]) for name, dist in search_space.items()}

    def _fit(self, study, finished: list, search_space: dict[str, Any]) -> tuple[Any, Any]:
        """TPESampler._sample's split of the finished trials and its two estimators."""
        if self._gamma is None:
            self._gamma = (tpe_module.default_gamma if len(study.directions) <= 1
                           else tpe_module.default_gamma_multiobjective)
        below_trials, above_trials = tpe_module._split_trials(study, finished,
                                                              self._gamma(len(finished)))
        return (self._build_parzen_estimator(study, search_space, below_trials,
                                             handle_below=True),
                self._build_parzen_estimator(study, search_space, above_trials,
                                             handle_below=False))
