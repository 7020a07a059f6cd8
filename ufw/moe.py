"""Mixture-of-Experts feed-forward layers for a population: the dense reference and the
sparse dispatch whose cost follows top-k.

Both compute, for every member k and token n, sum_e gates[k, n, e] * GLU_e(x[k, n]) with
the gates of `EarlyExitLM.expert_gates` (exactly 0 outside a token's top-k experts).
The dense path runs every expert on every token and weighs the results; its cost grows
with the number of experts. The sparse path groups each member's tokens by expert and runs
each expert only on the tokens routed to it: cost ~ top_k / num_experts of the dense one,
plus the gathering. Its shapes depend on the routing (a host sync per layer), so it cannot
be captured in a CUDA graph; `EarlyExitLM` falls back to the dense path while capturing.

Dense is the default because it was faster wherever measured. On an H200 at (512, 8, 8, 256),
batch 32, 8 experts, bf16, compiled (`bench/scale.py --moe`, bench/results/scale_cuda_moe.json):
dense 5.6 s per epoch for top-1 and 5.8 s for top-2, sparse 21.0 s and 26.5 s. The per-expert
loop, its gathers and a host sync per layer cost more than the expert products it skips, and
its routing-dependent shapes keep it out of CUDA graphs and make torch.compile recompile. On
a 2-core CPU at dim 64 sparse was slower too. A sparse path that pays off needs grouped
matrix products in one kernel; `moe_dispatch="sparse"` keeps this one as the reference
implementation of top-k routing by tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dense_experts(x: torch.Tensor, gates: torch.Tensor, w_gate: torch.Tensor,
                  w_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """Every expert on every token: x [K, N, D], gates [K, N, E], weights [K, E, ., .]."""
    a = (F.silu(torch.einsum("knd,kedf->kenf", x, w_gate))
         * torch.einsum("knd,kedf->kenf", x, w_up))
    return torch.einsum("kenf,kefd,kne->knd", a, w_down, gates)


def sparse_experts(x: torch.Tensor, gates: torch.Tensor, top_k: int, w_gate: torch.Tensor,
                   w_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """Each expert on its own tokens only; the same result as `dense_experts`.

    Per member, the N * top_k (token, expert) assignments are sorted by expert. Expert e
    then takes, for every member at once, a [K, C_e] block of its tokens (C_e: the most any
    member routes to e; members with fewer pad with weight 0) through one batched product,
    and adds its weighted outputs back to their tokens.
    """
    K, N, D = x.shape
    E = gates.shape[-1]
    weight, expert = gates.topk(top_k, dim=-1)  # the k nonzero gates of every token
    expert, weight = expert.reshape(K, N * top_k), weight.reshape(K, N * top_k)
    order = expert.argsort(dim=1, stable=True)
    token = torch.arange(N, device=x.device).repeat_interleave(top_k)[order]  # [K, A]
    weight = weight.gather(1, order)
    counts = torch.zeros(K, E, dtype=torch.long, device=x.device)
    counts.scatter_add_(1, expert, torch.ones_like(expert))
    starts = counts.cumsum(1) - counts
    widths = counts.amax(0).tolist()  # the one host sync: the blocks' sizes
    out = x.new_zeros(K, N, D, dtype=torch.float32)
    for e, width in enumerate(widths):
        if width == 0:
            continue
        slot = torch.arange(width, device=x.device)
        valid = slot < counts[:, e, None]  # [K, C]
        position = (starts[:, e, None] + slot).clamp(max=N * top_k - 1)
        tokens = token.gather(1, position)
        xe = x.gather(1, tokens[..., None].expand(K, width, D))
        a = F.silu(torch.bmm(xe, w_gate[:, e])) * torch.bmm(xe, w_up[:, e])
        ye = torch.bmm(a, w_down[:, e]).float() * (weight.gather(1, position) * valid)[..., None]
        out = out.scatter_add(1, tokens[..., None].expand(K, width, D), ye)
    return out
