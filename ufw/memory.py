"""A population's memory, estimated before anything is allocated, checked against the device.

A mistyped size (`--set dim=100000`) would otherwise try to allocate ~120 GB and die in the
allocator (or take the machine down with it). The estimate is coarse but of the right size:
parameters, gradients and AdamW's two moments, plus the activations of one training step
(hidden states and attention scores of every layer, logits of every exit). At seed scale
(dim 64, 3 layers, batches of 32 x 64) it gives ~35 MB per member, where a CUDA population
measured 14-28 MB per member (README, Performance); a configuration is refused only when
the estimate exceeds what the device has free, so the check never stands in a real run's way.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ufw.config import ConfigError, UniversalConfig

BYTES = 4  # fp32 weights, optimizer state and (for the estimate) activations


def parameters_per_member(config: UniversalConfig, vocab_size: int) -> int:
    """Parameters of one member (ufw.model.init_member's shapes)."""
    d, f, e = config.dim, 4 * config.dim, config.num_experts
    block = 3 * d * d + d * d + 2 * d + e * 3 * d * f + (d * e if e > 1 else 0)
    heads = len(config.exits) * (d + 1) if config.confidence_method == "learned" else 0
    return 2 * vocab_size * d + config.num_layers * block + heads


def estimate_bytes(config: UniversalConfig, vocab_size: int, members: int) -> int:
    """Peak memory of `members` members like `config` training one step (an estimate)."""
    tokens = config.batch_size * config.seq_len
    state = 4 * parameters_per_member(config, vocab_size)  # weights, grads, AdamW m and v
    hidden = tokens * config.dim * config.num_layers * 10 * max(1, config.experts_top_k)
    attention = 2 * config.batch_size * config.num_heads * config.seq_len ** 2 * config.num_layers
    logits = 2 * tokens * vocab_size * (len(config.exits) + 1)
    return BYTES * members * (state + hidden + attention + logits)


def available_bytes(device: str | torch.device) -> int | None:
    """Memory free for a new population on `device` (None: unknown)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    if device.type == "cpu":
        try:  # Linux: what can be had without swapping, page cache included
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
    return None


def check_fits(config: UniversalConfig, vocab_size: int, members: int,
               device: str | torch.device) -> None:
    """ConfigError naming the sizes if `members` members like `config` cannot fit `device`."""
    need = estimate_bytes(config, vocab_size, members)
    have = available_bytes(device)
    if have is not None and need > have:
        raise ConfigError(
            f"memory: {members} member(s) of dim {config.dim}, {config.num_layers} layers, "
            f"{config.num_experts} expert(s), batches of {config.batch_size} x "
            f"{config.seq_len} need about {need / 2**30:.1f} GiB; {torch.device(device)} has "
            f"{have / 2**30:.1f} GiB free")
