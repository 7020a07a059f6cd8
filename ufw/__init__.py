"""ufw: hyperparameter sweeps for early-exit transformers (Universal Training Framework)."""

__version__ = "0.1.0"

from ufw.config import PRESETS, AlphaSchedule, UniversalConfig
from ufw.train import UniversalTrainer

__all__ = ["PRESETS", "AlphaSchedule", "UniversalConfig", "UniversalTrainer", "__version__"]
