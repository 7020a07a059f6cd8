"""ufw: hyperparameter sweeps for early-exit transformers (Universal Training Framework)."""

__version__ = "0.1.0"

from ufw.config import PRESETS, AlphaSchedule, UniversalConfig

__all__ = ["PRESETS", "AlphaSchedule", "UniversalConfig", "UniversalTrainer", "__version__"]


def __getattr__(name: str):
    # Imported on first use: `python -m ufw.train` runs ufw.train as __main__, and Python warns
    # on stderr when the package has already imported it under its own name.
    if name == "UniversalTrainer":
        from ufw.train import UniversalTrainer

        return UniversalTrainer
    raise AttributeError(f"module 'ufw' has no attribute {name!r}")
