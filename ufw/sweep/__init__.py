"""`python -m ufw.sweep SPACE.yaml`: a hyperparameter sweep on Ray Tune + Optuna into Parquet.

The driver validates the search space (ufw.space) before Ray starts, then runs one Ray Tune
experiment whose trials each train a *population*: the `seeds` replicates of one sampled
configuration (cohort 1, sampled by Ray Tune's OptunaSearch with a define-by-run function),
or `cohort` sampled configurations x seeds (a `CohortSearcher` asks an Optuna study for
`cohort` points per trial and tells it every point's result). Trials report every epoch with
a checkpoint of the population, so a retried trial, or a resumed sweep, continues from its
last epoch. When a trial ends, and with each checkpoint of a trial that refills, the driver
(a Tune callback, `SweepCallback`) writes its rows as Parquet parts (ufw.results) and prints a
progress line; at the end it prints the best
configurations and where the files are.

Layout of `<results>/<name>/`: `trials/` and `epochs/` (Parquet parts), `ray/` (Ray Tune's
experiment: checkpoints, searcher state), `sweep.json` (what was run), `study.journal` (the
Optuna study, ufw/study.py).

The package, from bottom to top: `members` (a trial's configuration as members and rows),
`trainable` (run_trial), `searchers`, `callback` (the driver's Parquet writer and progress),
`plan` (the command line, resources, resume records), `driver` (Ray, the tuner, the summary).
"""

import os

# Ray reads these when it is imported or when a run starts: quiet, driver-written results.
# Set here, in the package, so that they are in place whichever of its modules comes first.
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")  # no result.json/CSV/TB
os.environ.setdefault("TUNE_PRINT_ALL_TRIAL_ERRORS", "0")  # the progress line says it
os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "5")  # experiment state: often, it is small
os.environ.setdefault("RAY_DEDUP_LOGS", "1")

# Nothing heavy is imported here: the study actor and its sampler replicas import
# ufw.sweep.study_service, and with the driver's and the trainable's modules (torch, Ray Tune)
# each of those processes took seconds to start, which the sweep's first trials waited for.
# Ray and Optuna are imported where they are used: a bad space fails fast, before loading them.
import importlib

# Each public name and the module that holds it, imported on first use; CohortSearcher and
# SweepCallback subclass Ray's classes (lazy_ray.py), and are also what pickles of sweeps
# started before ufw.sweep became a package refer to.
_EXPORTS = {"Plan": "driver", "_trainable": "driver", "build_parser": "driver",
            "finalize": "driver", "main": "driver", "make_plan": "driver",
            "make_tuner": "driver", "pareto_front": "driver", "run": "driver",
            "summary": "driver", "_concurrency": "plan", "DefineByRun": "searchers",
            "CohortSearcher": "searchers", "run_trial": "trainable",
            "SweepCallback": "callback"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"ufw.sweep.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
