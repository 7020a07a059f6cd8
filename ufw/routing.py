"""Confidence measures and confidence routing at evaluation time.

All functions work per token on tensors with a leading member axis [K, N], so one forward
pass gives the routed metrics of every member and of a whole grid of thresholds.
"""

from __future__ import annotations

import math

import torch

# Thresholds at which every evaluation also reports routed PPL and compute cost: the
# per-member threshold curve, free because it reuses the evaluation's forward pass.
# Low values matter for entropy and margin confidences, which rarely come near 1.
THRESHOLD_GRID = (0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.925,
                  0.95, 0.975, 0.99, 1.0)


def confidence(logits: torch.Tensor, method: str) -> torch.Tensor:
    """Confidence in [0, 1] (higher = surer) of each token's prediction, from logits [..., V].

    entropy: 1 - H(p) / log(V), so a one-hot distribution scores 1 and a uniform one 0.
    margin: top-1 minus top-2 probability.
    """
    probs = torch.softmax(logits.float(), dim=-1)
    if method == "max_softmax":
        return probs.max(-1).values
    if method == "entropy":
        entropy = -(probs * torch.log(probs.clamp_min(1e-30))).sum(-1)
        return 1 - entropy / math.log(logits.shape[-1])
    if method == "margin":
        top2 = probs.topk(2, dim=-1).values
        return top2[..., 0] - top2[..., 1]
    raise ValueError(f"confidence method {method!r} has no closed form (learned uses a head)")


def assign_exits(confs: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """Index of the exit each token leaves at: the first whose threshold it meets.

    confs: [E, K, N] confidence at each early exit; thresholds: [..., K, E] (0 disables an
    exit; leading dims, e.g. a grid of thresholds, broadcast). Returns [..., K, N] with values
    0..E, where E means the final layer.
    """
    E, K, N = confs.shape
    lead = thresholds.shape[:-2]
    thr = thresholds.movedim(-1, 0)[..., None]  # [E, ..., K, 1]
    confs = confs.reshape(E, *[1] * len(lead), K, N)
    meets = (confs >= thr) & (thr > 0)  # [E, ..., K, N]
    exit_index = torch.full(meets.shape[1:], E, device=confs.device)
    for e in reversed(range(E)):  # deepest first, so the first exit met has the last word
        exit_index = torch.where(meets[e], e, exit_index)
    return exit_index


def routed_metrics(exit_index: torch.Tensor, ce: torch.Tensor, correct: torch.Tensor,
                   exit_depths: list[int], num_layers: int,
                   experts_top_k: int = 1) -> dict[str, torch.Tensor]:
    """PPL, accuracy, shares and compute cost of a routing, per member.

    exit_index [..., K, N] from `assign_exits`; ce, correct: [E+1, K, N] per exit, final
    last. compute_cost = sum over tokens of the depth they ran to / (tokens * num_layers), in
    layer units; expert_ffns_per_token = mean depth reached * experts_top_k, the FFNs
    (experts) a token passes through (= mean depth for a dense FFN). Results are [..., K].
    """
    lead = exit_index.shape[:-2]

    def per_token(values: torch.Tensor) -> torch.Tensor:  # the chosen exit's value
        values = values.reshape(values.shape[0], *[1] * len(lead), *values.shape[1:])
        return values.expand(values.shape[0], *exit_index.shape).gather(0, exit_index[None])[0]

    depths = torch.tensor([*exit_depths, num_layers], device=ce.device, dtype=torch.float32)
    shares = torch.stack([(exit_index == e).float().mean(-1) for e in range(len(depths))], -1)
    mean_depth = (shares * depths).sum(-1)
    return {
        "ppl": per_token(ce).mean(-1).exp(),
        "acc": per_token(correct).float().mean(-1),
        "shallow_ratio": 1 - shares[..., -1],
        "compute_cost": mean_depth / num_layers,
        "expert_ffns_per_token": mean_depth * experts_top_k,
        "exit_shares": shares,  # [..., K, E+1]
    }


def threshold_curve(confs: torch.Tensor, ce: torch.Tensor, correct: torch.Tensor,
                    exit_depths: list[int], num_layers: int,
                    grid: tuple[float, ...] = THRESHOLD_GRID) -> dict[str, torch.Tensor]:
    """Routed metrics at every grid threshold (the same threshold at every exit): [K, G].

    One batched routing over the whole grid, not a loop: a few kernels whatever its size.
    """
    E, K, _ = confs.shape
    thresholds = torch.tensor(grid, device=confs.device)[:, None, None].expand(-1, K, E)
    metrics = routed_metrics(assign_exits(confs, thresholds), ce, correct, exit_depths,
                             num_layers)
    return {key: metrics[key].T for key in ("ppl", "compute_cost", "shallow_ratio")}
