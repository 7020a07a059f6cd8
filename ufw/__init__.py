"""ufw: hyperparameter sweeps for early-exit transformers (Universal Training Framework)."""

__version__ = "0.1.0"

from ufw.config import PRESETS, AlphaSchedule, UniversalConfig

__all__ = ["PRESETS", "AlphaSchedule", "UniversalConfig", "UniversalTrainer", "__version__"]


def __getattr__(name: str):
    # Imported on first use: importing ufw.train here would load it twice under
    # `python -m ufw.train` (as ufw.train and as __main__), which runpy warns about on stderr.
    if name == "UniversalTrainer":
        from ufw.train import UniversalTrainer

        return UniversalTrainer
    raise AttributeError(f"module 'ufw' has no attribute {name!r}")
