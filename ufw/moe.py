"""Mixture-of-Experts feed-forward layers for a population: the dense reference and the
sparse dispatch whose cost follows top-k.

Both compute, for every member k and token n, sum_e gates[k, n, e] * GLU_e(x[k, n]) with
the gates of `EarlyExitLM.expert_gates` (exactly 0 outside a token's top-k experts).
The dense path runs every expert on every token and weighs the results; its cost grows
with the number of experts. The sparse path groups each member's tokens by expert and runs
each expert only on the tokens routed to it: cost ~ top_k / num_experts of the dense one,
plus the gathering. Its shapes depend on the routing (a host sync per layer), so it cannot
be captured in a CUDA graph; `EarlyExitLM` falls back to the dense path while capturing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Below this many tokens per batch the dense path's few large products should beat the
# sparse path's gathers and per-expert loop. A first guess, not yet measured where it
# matters: `bench/scale.py --moe` on a GPU decides it (on a busy 2-core CPU at dim 64,
# 2048 tokens, 8 experts, sparse was not faster: 1.9x slower top-1, 1.2x top-2).
SPARSE_MIN_TOKENS = 512


def sparse_is_cheaper(num_experts: int, top_k: int, num_tokens: int) -> bool:
    """Whether routing tokens only to their experts should beat running every expert."""
    return 2 * top_k <= num_experts and num_tokens >= SPARSE_MIN_TOKENS


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
