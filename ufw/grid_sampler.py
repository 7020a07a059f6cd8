"""Optuna's GridSampler for sweeps that Ray Tune drives (imported only when a grid is used)."""

from __future__ import annotations

import optuna


class GridSampler(optuna.samplers.GridSampler):
    """A GridSampler that never stops the study.

    Optuna's stops the study from `after_trial` once the grid is used up, which Optuna allows
    only inside `study.optimize`; under Ray Tune, `tell` runs outside it and that raised on the
    last grid point. A sweep asks for exactly the grid's size, so there is nothing to stop.
    """

    def after_trial(self, study, trial, state, values) -> None:
        pass
