"""ufw: hyperparameter sweeps for early-exit transformers (Universal Training Framework).

The method, populations, the Parquet schema and the data are described in docs/design.md.
"""

from __future__ import annotations

from typing import Any

# Recorded in every row (ufw_version). Raised whenever a change alters what training computes,
# so that rows from before and after can be told apart. 0.2.0: top-1 MoE gates are the
# router probability; compiled losses use static shapes (docs/design.md).
__version__ = "0.2.0"

from ufw.config import PRESETS, AlphaSchedule, UniversalConfig

__all__ = ["PRESETS", "AlphaSchedule", "UniversalConfig", "UniversalTrainer", "__version__"]


def __getattr__(name: str) -> Any:
    """`ufw.UniversalTrainer`, imported on first use (PEP 562).

    It loads torch, which `import ufw` (configurations, presets) does not need.
    """
    if name == "UniversalTrainer":
        from ufw.trainer import UniversalTrainer

        return UniversalTrainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
