"""Shared fixtures: one local Ray instance for the whole test session, tiny sweep spaces."""

from __future__ import annotations

import logging
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# A model small enough that a trial trains in about a second on one CPU core.
TINY_FIXED = {"dim": 16, "num_heads": 2, "max_epochs": 2, "batch_size": 8, "seq_len": 32}
TINY_DATA = {"train_chars": 8000, "val_chars": 4000}


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray instance (2 CPUs), started once and shared by every test that needs it.

    Yields its GCS address, so that a driver in a subprocess can join it with --address.
    It declares one GPU even where there is none (Ray treats it as a plain resource), so that
    `--gpus-per-trial` can be tested: trials get a GPU id from Ray and still train on CPU.
    """
    ray = pytest.importorskip("ray")
    started = False
    if not ray.is_initialized():
        # address="local": never join some other Ray instance running on this machine.
        ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False,
                 log_to_driver=False, logging_level=logging.WARNING)
        started = True
    yield ray.get_runtime_context().gcs_address
    if started:
        ray.shutdown()


@pytest.fixture
def write_space(tmp_path):
    """Write a search space YAML into tmp_path; returns its path."""

    def write(text: str, name: str = "space.yaml") -> Path:
        path = tmp_path / name
        path.write_text(textwrap.dedent(text))
        return path

    return write


@pytest.fixture
def tiny_space(write_space):
    """A search space over a tiny model: text with {fixed} and {data} filled in."""

    def make(body: str, name: str = "tiny.yaml", **fixed) -> Path:
        values = {**TINY_FIXED, **fixed}
        fixed_text = ", ".join(f"{k}: {v}" for k, v in values.items())
        data_text = ", ".join(f"{k}: {v}" for k, v in TINY_DATA.items())
        return write_space(f"fixed: {{{fixed_text}}}\ndata: {{{data_text}}}\n"
                           + textwrap.dedent(body), name)

    return make


@pytest.fixture
def one_thread():
    """Train in this process as a sweep's trials do (one CPU each): on a busy 2-core machine
    two threads per process make a tiny model many times slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
