"""ufw: hyperparameter sweeps for early-exit transformers (Universal Training Framework)."""

__version__ = "0.1.0"
